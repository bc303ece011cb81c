"""Conversations to token ids: the templates of LLaVA and LLaVA-1.5, and the supervision mask.

What LLaVA's `llava/conversation.py` and the `preprocess_*` functions of `llava/train/train.py`
do, written so that labels can never drift from the text:
- Conversation templates (the dissertation, section 3.4, Table 3.2):
    plain      stage-1 feature alignment: "<image>" + caption + "\\n" (`preprocess_plain`);
    vicuna_v0  the original LLaVA: Vicuna-v0 system message, "###" as <STOP> (Table 3.2);
    vicuna_v1  LLaVA-1.5 (section 4.3): "USER: ... ASSISTANT: ...</s>" (`preprocess_v1`);
    lynx       Lynx (sec. 2.2; the official LYNX.yaml): the image, then BOS, then
               "user: ...\nbot: ...</s>", all text lowercased.
  Only the assistant answers and the stop string that ends them are supervised ("the model is
  trained to predict the assistant answers and where to stop", Table 3.2); everything else is
  IGNORE_INDEX.
- Masking by character offsets. LLaVA tokenizes each round again to count its tokens and
  prints "tokenization mismatch" when a sub-word merge crosses a round boundary (the whole
  sample then silently loses its loss). Here the full text is rendered once together with the
  character spans that must be supervised, tokenized once, and a token is supervised when its
  characters overlap a supervised span.
- An encoder-decoder's (T5's) view of a rendered sample: the prompt for the encoder, the last
  answer + EOS for the decoder (T5's prefix LM, Raffel et al. 2020, sec. 3.3.2).
- LION's tag sentence with its soft-prompt token (sec. 3.2, Fig. 5), put before the first
  question of a conversation, from a tags file per image.
data.py builds the datasets on this; eval.py renders its prompts with the same functions.
"""
import json
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from layers import IGNORE_INDEX

IMAGE_PLACEHOLDER = "<image>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"


class DataError(ValueError):
    """A problem with one input file or record; `kind` names the category counted when skipped
    ("malformed_record", "missing_image", "corrupt_image")."""

    def __init__(self, message: str, kind: str = "malformed_record"):
        super().__init__(message)
        self.kind = kind


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

def require_token_id(tokenizer: Tokenizer, token: str) -> int:
    """The id of a token the pipeline needs (<s>, </s>, <pad>, <image>), or a clear error."""
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"the tokenizer has no token {token!r}; add it as a special token")
    return token_id


# --------------------------------------------------------------------------------------------
# Conversation templates
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Template:
    """How a conversation becomes one string (LLaVA `llava/conversation.py`, `train.py`).

    A user turn is `turn_prefix + user_role + ": " + message + user_end` and an assistant turn
    `turn_prefix + assistant_role + ": " + answer + assistant_end`; the conversation is
    `system + system_end + turns + conversation_end`. `stop` is the string the model must emit
    to end an answer: it starts right after the answer and is supervised with it. Eval stops
    generation on it.
    """

    name: str
    system: str
    system_end: str
    user_role: str
    assistant_role: str
    turn_prefix: str
    user_end: str
    assistant_end: str
    conversation_end: str
    stop: str
    image_only_user_turn: bool = False  # plain: the user turn is replaced by its image alone
    image_first: bool = False  # lynx: the image comes before everything, BOS included
    lowercase: bool = False  # lynx: every message lowercased (the official `lower_text`)


TEMPLATES: dict[str, Template] = {
    # LLaVA-1.5 (`conv_vicuna_v1`, SeparatorStyle.TWO: sep " ", sep2 "</s>"):
    # "<system> USER: <image>\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT: A2</s>"
    "vicuna_v1": Template(
        name="vicuna_v1",
        system="A chat between a curious user and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        system_end=" ", user_role="USER", assistant_role="ASSISTANT", turn_prefix="",
        user_end=" ", assistant_end=EOS_TOKEN, conversation_end="", stop=EOS_TOKEN),
    # Original LLaVA as trained by `preprocess` + `_add_speaker_and_signal` (not the SINGLE style
    # of conversation.py, which has no "\n\n" and no spaces around "###"):
    # "<system>\n\n### Human: <image>\nQ\n### Assistant: A\n### Human: Q2\n### Assistant: A2\n### "
    # Supervised: " A\n###", the answer and <STOP> = "###" (Table 3.2). LLaVA's `_mask_targets`
    # masks only human sentences, so it also supervises each "### Assistant:" header; we do not,
    # since the prompt always ends with that header at inference.
    "vicuna_v0": Template(
        name="vicuna_v0",
        system="A chat between a curious human and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the human's questions.",
        system_end="\n\n", user_role="Human", assistant_role="Assistant", turn_prefix="### ",
        user_end="\n", assistant_end="\n", conversation_end="### ", stop="\n###"),
    # Stage-1 alignment (`preprocess_plain`): "<image>" + caption + "\n"; the question is dropped,
    # BOS and image are masked, the caption and "\n" supervised, no EOS.
    "plain": Template(
        name="plain", system="", system_end="", user_role="", assistant_role="", turn_prefix="",
        user_end="", assistant_end="\n", conversation_end="", stop="\n",
        image_only_user_turn=True),
    # Lynx: "User: {question}\nBot:" lowercased after the 32 resampler tokens and BOS; the answer
    # ends with EOS, and a next turn (the describe-first dialogue) follows it directly.
    "lynx": Template(
        name="lynx", system="", system_end="", user_role="user", assistant_role="bot", turn_prefix="",
        user_end="\n", assistant_end=EOS_TOKEN, conversation_end="", stop=EOS_TOKEN, image_first=True,
        lowercase=True),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def _message(turn: Any, index: int) -> tuple[str, str]:
    """(speaker, text) of one conversation turn, or a DataError naming the turn."""
    if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
        raise DataError(f"turn {index} needs the keys 'from' and 'value', got {turn!r:.80}")
    speaker, text = turn["from"], turn["value"]
    if speaker not in ("human", "gpt"):
        raise DataError(f"turn {index} has 'from' {speaker!r}; expected 'human' or 'gpt'")
    if not isinstance(text, str):
        raise DataError(f"turn {index} has a non-string 'value' {text!r:.80}")
    return speaker, text


def format_conversation(conversations: list[dict], template: str | Template,
                        for_generation: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """Renders LLaVA `conversations` to one string and returns it with the supervised
    character spans [start, end).

    Turns must alternate human, gpt, human, ...; a leading gpt turn is dropped as LLaVA's
    `preprocess_v1` does. A turn holding "<image>" is rewritten as "<image>\\n" + the rest
    (LLaVA `preprocess_multimodal`), the LLaVA-1.5 layout; an `image_first` template puts it at
    the very start instead (and _tokenize_with_labels puts BOS after it). With `for_generation` the
    conversation must end with a human turn, and the text ends with the assistant role
    ("ASSISTANT:"); the answer of training, " A</s>", starts with the space this leaves out.
    """
    template = get_template(template) if isinstance(template, str) else template
    turns = [_message(turn, index) for index, turn in enumerate(conversations)]
    if turns and turns[0][0] == "gpt":
        turns = turns[1:]
    for index, (speaker, _) in enumerate(turns):
        if speaker != ("human" if index % 2 == 0 else "gpt"):
            raise DataError(f"turn {index} is from {speaker!r}; turns must alternate human, gpt")
    if for_generation:
        if not turns or turns[-1][0] != "human":
            raise DataError("for_generation needs a conversation that ends with a human turn")
    elif len(turns) < 2:
        raise DataError("the conversation has no gpt answer")
    if template.image_only_user_turn and len(turns) > (1 if for_generation else 2):
        raise DataError(f"template {template.name!r} takes one human and one gpt turn, "
                        f"got {len(turns)} turns")

    image_first = template.image_first and any(IMAGE_PLACEHOLDER in text for _, text in turns)
    pieces = [(IMAGE_PLACEHOLDER if image_first else "") + template.system + template.system_end]
    spans: list[tuple[int, int]] = []
    length = len(pieces[0])
    for speaker, text in turns:
        if template.lowercase:
            text = text.lower()
        if IMAGE_PLACEHOLDER in text:
            rest = text.replace(IMAGE_PLACEHOLDER, "").strip()
            text = rest if template.image_first else IMAGE_PLACEHOLDER + "\n" + rest
        if speaker == "human":
            if template.image_only_user_turn:
                if IMAGE_PLACEHOLDER not in text:
                    raise DataError(f"template {template.name!r} needs an image in the human turn")
                piece = IMAGE_PLACEHOLDER
            else:
                piece = template.turn_prefix + template.user_role + ": " + text + template.user_end
        else:
            header = template.turn_prefix + template.assistant_role + ":" if template.assistant_role else ""
            # The space between "ASSISTANT:" and the answer belongs to the answer: the
            # generation prompt ends at the colon, so the model must produce " A...".
            answer = (" " + text) if header else text
            piece = header + answer + template.assistant_end
            start = length + len(header)
            spans.append((start, start + len(answer)))
        pieces.append(piece)
        length += len(piece)
    if for_generation:
        if template.assistant_role:
            pieces.append(template.turn_prefix + template.assistant_role + ":")
    else:
        pieces.append(template.conversation_end)
    text = "".join(pieces)
    # Extend each answer span over the stop string that follows it ("</s>", "\n###", "\n").
    spans = [(start, end + len(template.stop)) for start, end in spans]
    assert all(text.startswith(template.stop, end - len(template.stop)) for _, end in spans)
    return text, spans


def tokenize_around_images(texts: list[str], tokenizer: Tokenizer) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(ids, character offsets) of each text as LLaVA's `tokenizer_image_token` makes them: the
    text is cut at every "<image>", each piece is tokenized on its own, and the pieces are joined
    with the "<image>" token's id. Tokenizing the whole string once gives other ids with a
    non-legacy SentencePiece tokenizer (Metaspace, prepend_scheme="first"): the piece after an
    image would lose its leading "\u2581", and the official weights never saw such prompts. All
    pieces go through one `encode_batch`. No special tokens are added."""
    placeholder_id = require_token_id(tokenizer, IMAGE_PLACEHOLDER)
    pieces = [text.split(IMAGE_PLACEHOLDER) for text in texts]
    encodings = iter(tokenizer.encode_batch([piece for text_pieces in pieces for piece in text_pieces],
                                            add_special_tokens=False))
    tokenized = []
    for text_pieces in pieces:
        ids, offsets, start = [], [], 0
        for index, piece in enumerate(text_pieces):
            if index:
                ids.append(placeholder_id)
                offsets.append((start, start + len(IMAGE_PLACEHOLDER)))
                start += len(IMAGE_PLACEHOLDER)
            encoding = next(encodings)
            ids += encoding.ids
            offsets += [(start + begin, start + end) for begin, end in encoding.offsets]
            start += len(piece)
        tokenized.append((ids, offsets))
    return tokenized


def _tokenize_with_labels(text: str, spans: list[tuple[int, int]], tokenizer: Tokenizer,
                          image_token_index: int, num_image_tokens: int, add_bos: bool = True,
                          bos_after_image: bool = False) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """Tokenizes `text` (around its images, as LLaVA does) and labels every token from the
    character spans.

    Returns (input_ids, labels, offsets) with BOS first and each "<image>" expanded to
    `num_image_tokens` copies of `image_token_index`; `offsets` gives each output token's
    characters (BOS gets (0, 0)). BOS is added here, not by the tokenizer's post-processor
    (`add_special_tokens=False`): tokenizer.json files differ on whether they add one, and a
    missing or doubled BOS silently hurts a pretrained LLM. T5 has no BOS (`add_bos=False`).
    `bos_after_image`: a text that starts with its image gets BOS after the image tokens (Lynx).
    """
    placeholder_id = require_token_id(tokenizer, IMAGE_PLACEHOLDER)
    token_ids, token_offsets = tokenize_around_images([text], tokenizer)[0]
    supervised_chars = np.zeros(len(text) + 1, dtype=np.int64)
    for start, end in spans:
        supervised_chars[start:end] = 1
    # supervised_before[i] = supervised characters in text[:i], so a range test is O(1).
    supervised_before = np.concatenate([[0], np.cumsum(supervised_chars)]).tolist()
    input_ids, labels, offsets = ([require_token_id(tokenizer, BOS_TOKEN)], [IGNORE_INDEX], [(0, 0)]) if add_bos \
        else ([], [], [])
    for token_id, (start, end) in zip(token_ids, token_offsets):
        if token_id == placeholder_id:
            input_ids += [image_token_index] * num_image_tokens
            labels += [IGNORE_INDEX] * num_image_tokens
            offsets += [(start, end)] * num_image_tokens
            continue
        # A token is supervised when any of its characters is: a merge across a span border
        # (": A" as one token) must still be predicted, since it carries answer characters.
        # Zero-width tokens (some pre-tokenizers emit them) take the flag of their position.
        is_supervised = supervised_before[max(end, start + 1)] > supervised_before[start]
        input_ids.append(token_id)
        labels.append(token_id if is_supervised else IGNORE_INDEX)
        offsets.append((start, end))
    if add_bos and bos_after_image and token_ids[:1] == [placeholder_id]:
        image_end = 1 + num_image_tokens
        input_ids, labels, offsets = (sequence[1:image_end] + sequence[:1] + sequence[image_end:]
                                      for sequence in (input_ids, labels, offsets))
    return input_ids, labels, offsets


def render_conversation(conversations: list[dict], template: str | Template, tokenizer: Tokenizer,
                        image_token_index: int, num_image_tokens: int,
                        for_generation: bool = False, add_bos: bool = True) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a LLaVA conversation, BOS first (unless not `add_bos`), each
    "<image>" expanded to `num_image_tokens` copies of `image_token_index`, labels IGNORE_INDEX
    except on the assistant answers and their stop string. See `format_conversation` for
    `for_generation`."""
    template = get_template(template) if isinstance(template, str) else template
    text, spans = format_conversation(conversations, template, for_generation)
    input_ids, labels, _ = _tokenize_with_labels(text, spans, tokenizer, image_token_index,
                                                 num_image_tokens, add_bos, template.image_first)
    return input_ids, labels


def show_supervision(conversations: list[dict], template: str | Template, tokenizer: Tokenizer,
                     num_image_tokens: int = 1) -> str:
    """The rendered sample for a human: supervised tokens inside [brackets], the BOS as <s>, and
    an image as "<image>xN". The text is cut from the rendered string at the token offsets,
    so the brackets sit exactly where the loss starts and stops."""
    template = get_template(template) if isinstance(template, str) else template
    text, spans = format_conversation(conversations, template)
    image_marker = -1  # any id outside the vocabulary tells image tokens apart here
    input_ids, labels, offsets = _tokenize_with_labels(text, spans, tokenizer, image_marker,
                                                       num_image_tokens, bos_after_image=template.image_first)
    bos_at = next(index for index, token_id in enumerate(input_ids) if token_id != image_marker)
    pieces, cursor, inside, position = [], 0, False, 0
    while position < len(input_ids):
        if position == bos_at:
            pieces.append(BOS_TOKEN)
            position += 1
            continue
        start, end = offsets[position]
        if start > cursor:  # characters no token covers (spaces a pre-tokenizer drops)
            pieces.append(text[cursor:start])
            cursor = start
        supervised = labels[position] != IGNORE_INDEX
        if supervised != inside:
            pieces.append("[" if supervised else "]")
            inside = supervised
        if input_ids[position] == image_marker:
            pieces.append(f"{IMAGE_PLACEHOLDER}x{num_image_tokens}")
            position += num_image_tokens
        else:
            pieces.append(text[cursor:end])
            position += 1
        cursor = max(cursor, end)
    if inside:
        pieces.append("]")
    return "".join(pieces) + text[cursor:]


def split_for_encoder_decoder(input_ids: list[int], labels: list[int], eos_id: int) -> tuple[list[int], list[int]]:
    """A decoder-only sample as an encoder-decoder's (T5's prefix LM, Raffel et al. 2020, sec.
    3.3.2): the last supervised run of `labels` is the decoder's target, ending with EOS as T5's
    targets do (appended when the template's stop string is not EOS), and everything before it
    the encoder's input. What follows the run (a template's closing text) is dropped."""
    start, end = last_supervised_run(labels)
    if end == 0:
        raise DataError("no supervised token survives to be the decoder's target")
    target = labels[start:end]
    return input_ids[:start], target if target[-1] == eos_id else target + [eos_id]


def last_supervised_run(labels: Sequence[int]) -> tuple[int, int]:
    """[start, end) of the last run of labels != IGNORE_INDEX: the final answer; (0, 0) if none."""
    end = max((i for i, label in enumerate(labels) if label != IGNORE_INDEX), default=-1) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start, end


# ----------------------------------------------------------------------------------------------
# LION's soft-prompted tags (sec. 3.2, Fig. 5)

# The official prompt prefix; {hint} is the token whose embedding the learned soft prompt replaces.
TAG_PROMPT = "According to {hint}, you are allowed to use or partially use the following tags: [{tags}]. "
# Without the soft prompt (Table 4's ablation) the sentence names its source in words.
PLAIN_HINT = "the image tags"


def read_tags(path: str, noise: float = 0.0) -> dict[str, list[str]]:
    """Image file name -> tags from a tags file ({file name: {"tags": [...]}, RAM's output in LION;
    the shapes world's tags.json). With `noise`, an imperfect tagger: each tag is dropped or
    swapped for another tag of the file with probability `noise` (half each), drawn from a seed
    of the file name, so an image keeps the same wrong tags across epochs and runs, as a real
    tagger's are."""
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"tag noise must be in [0, 1], not {noise}")
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
        tags = {name: list(entry["tags"]) for name, entry in entries.items()}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise DataError(f"{path}: not a tags file ({{image file name: {{\"tags\": [...]}}}}): {error}") from error
    vocabulary = sorted({tag for image_tags in tags.values() for tag in image_tags})
    for name, image_tags in tags.items():
        rng = random.Random(zlib.crc32(name.encode()))
        kept = []
        for tag in image_tags:
            if rng.random() >= noise:
                kept.append(tag)
            elif rng.random() < 0.5:
                kept.append(rng.choice([other for other in vocabulary if other != tag] or [tag]))
        tags[name] = kept
    return tags


def tag_hint(tokenizer: Tokenizer, hint_token_index: int | None) -> str:
    """The hint of a model's tag sentence: its soft prompt's token, or PLAIN_HINT without one."""
    return PLAIN_HINT if hint_token_index is None else tokenizer.id_to_token(hint_token_index)


def tag_sentence(tags: list[str], hint: str) -> str:
    """LION's sentence for an image's tags: hint = the soft prompt's token, or PLAIN_HINT."""
    return TAG_PROMPT.format(hint=hint, tags=", ".join(tags))


def with_tag_prompt(conversations: list[dict], tags: list[str], hint: str) -> list[dict]:
    """The conversation with LION's tag sentence before the first question, as the official code
    prefixes it to the question."""
    return with_question_prefix(conversations, tag_sentence(tags, hint))


def read_oracle_objects(path: str) -> dict[str, str]:
    """Image file name -> the scene written out, "Objects: large cyan star [0.490,...]; ...", from a
    tags file whose entries list "objects" with "name" and "box_text" (the shapes world's
    tags.json). The oracle-text rung reads this in place of the image: perfect vision as text,
    the upper bound of what the LLM can do with what an image holds."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
        return {name: "Objects: " + "; ".join(f"{o['name']} {o['box_text']}" for o in entry["objects"]) + ".\n"
                for name, entry in entries.items()}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise DataError(f"{path}: not an objects file ({{image file name: {{\"objects\": [{{\"name\", "
                        f"\"box_text\"}}]}}}}): {error!r}") from error


def without_image(conversations: list[dict], prefix: str) -> list[dict]:
    """The conversation with its image placeholder replaced by `prefix` before the first question."""
    first = next(index for index, turn in enumerate(conversations) if turn.get("from") == "human")
    text = conversations[first]["value"].replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "")
    return [*conversations[:first], {**conversations[first], "value": prefix + text}, *conversations[first + 1:]]


def with_question_prefix(conversations: list[dict], prefix: str) -> list[dict]:
    """The conversation with `prefix` before the first question, after the image placeholder."""
    first = next(index for index, turn in enumerate(conversations) if turn.get("from") == "human")
    text = conversations[first]["value"]
    image = IMAGE_PLACEHOLDER + "\n" if text.startswith(IMAGE_PLACEHOLDER + "\n") else ""
    return [*conversations[:first], {**conversations[first], "value": image + prefix + text[len(image):]},
            *conversations[first + 1:]]


# ----------------------------------------------------------------------------------------------
# Lyrics' spatial representation (sec. 3.1)

# "[BOS]" opens the spatial representation in the MQ-Former's text and "[MLM]" replaces it for
# masked spatial prediction (sec. 3.2); the six markup tokens wrap each object, spelled as the
# paper writes them ("<Bbox>" closes with "</Box>").
LYRICS_SPATIAL_BOS, LYRICS_MLM = "[BOS]", "[MLM]"
LYRICS_MARKUP = ("<br>", "</br>", "<T>", "</T>", "<Bbox>", "</Box>")


def with_lyrics_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer with Lyrics' tokens added as special tokens (each one id, never split, never
    normalized), after its own vocabulary, so the ids it had stay; a model reading it grows its
    embeddings to `get_vocab_size()`. Adding them again changes nothing."""
    tokenizer.add_special_tokens([LYRICS_SPATIAL_BOS, LYRICS_MLM, *LYRICS_MARKUP])
    return tokenizer


def spatial_question_prefix(objects: Sequence[str]) -> str:
    """An image's objects as the LLM reads them before its first question (sec. 3.3's option):
    their spatial representations one after another, then a new line; nothing without objects."""
    return "".join(objects) + "\n" if objects else ""


def spatial_representation(tag: str, box: Sequence[float]) -> str:
    """One object as Lyrics writes it for the LLM and the MQ-Former (sec. 3.1):
    "<br><T>tag</T><Bbox>(x1, y1), (x2, y2)</Box></br>", the box's corners as fractions of the
    image the tower sees, two decimals."""
    x1, y1, x2, y2 = box
    return f"<br><T>{tag}</T><Bbox>({x1:.2f}, {y1:.2f}), ({x2:.2f}, {y2:.2f})</Box></br>"
