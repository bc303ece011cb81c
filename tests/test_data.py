"""Tests of conversation.py and data.py: templates and their loss masks, the LLaVA JSON datasets, CLIP preprocessing
against transformers, collate and the modality/length-grouped sampler. All inputs are built in
tmp_path; the tokenizer is a tiny BPE trained here with `tokenizers`."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import conversation
import data
import shapes
import vision
from conversation import TEMPLATES, DataError, format_conversation, render_conversation, show_supervision

IMAGE_TOKEN_INDEX = 1000  # outside the tiny vocabulary, as llava-hf's 32000 can be
NUM_IMAGE_TOKENS = 4

MULTI_TURN = [
    {"from": "human", "value": "What color is the circle?\n<image>"},
    {"from": "gpt", "value": "The circle is red."},
    {"from": "human", "value": "How many squares are there?"},
    {"from": "gpt", "value": "There are 3 squares."},
]


def build_tokenizer(pre_tokenizer: str = "byte_level") -> Tokenizer:
    """A tiny BPE with the project's special tokens; byte-level (GPT-2 / LLaMA-3 style) or
    metaspace (SentencePiece / LLaMA-2 style) pre-tokenization."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    if pre_tokenizer == "byte_level":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        alphabet = list("\n#")
    corpus = [template.system for template in TEMPLATES.values()]
    corpus += ["USER: ASSISTANT: ### Human: ### Assistant:", "a caption of shapes."]
    corpus += [turn["value"] for turn in MULTI_TURN]
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False, initial_alphabet=alphabet,
                                  special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"])
    tokenizer.train_from_iterator(corpus * 10, trainer)
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return build_tokenizer()


def supervised_text(input_ids: list[int], labels: list[int], tokenizer: Tokenizer) -> str:
    """The decoded supervised tokens, one string per contiguous run, joined by '|'."""
    runs, current = [], []
    for token_id, label in zip(input_ids, labels):
        if label != data.IGNORE_INDEX:
            assert label == token_id
            current.append(token_id)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return "|".join(tokenizer.decode(run, skip_special_tokens=False) for run in runs)


# --------------------------------------------------------------------------------------------
# Templates and masks
# --------------------------------------------------------------------------------------------

V1_SYSTEM, V0_SYSTEM = TEMPLATES["vicuna_v1"].system, TEMPLATES["vicuna_v0"].system


@pytest.mark.parametrize("template,expected_shown,expected_supervised", [
    ("vicuna_v1",
     f"<s>{V1_SYSTEM} USER: <image>x4\nWhat color is the circle? ASSISTANT:"
     "[ The circle is red.</s>]USER: How many squares are there? ASSISTANT:"
     "[ There are 3 squares.</s>]",
     " The circle is red.</s>| There are 3 squares.</s>"),
    ("vicuna_v0",
     f"<s>{V0_SYSTEM}\n\n### Human: <image>x4\nWhat color is the circle?\n"
     "### Assistant:[ The circle is red.\n###] Human: How many squares are there?\n"
     "### Assistant:[ There are 3 squares.\n###] ",
     " The circle is red.\n###| There are 3 squares.\n###"),
])
def test_multi_turn_mask(tokenizer, template, expected_shown, expected_supervised):
    shown = show_supervision(MULTI_TURN, template, tokenizer, NUM_IMAGE_TOKENS)
    print("\n" + shown)
    assert shown == expected_shown
    input_ids, labels = render_conversation(MULTI_TURN, template, tokenizer,
                                                 IMAGE_TOKEN_INDEX, NUM_IMAGE_TOKENS)
    assert supervised_text(input_ids, labels, tokenizer) == expected_supervised


def test_image_placeholder_is_expanded_and_bos_first(tokenizer):
    input_ids, labels = render_conversation(MULTI_TURN, "vicuna_v1", tokenizer,
                                                 IMAGE_TOKEN_INDEX, NUM_IMAGE_TOKENS)
    assert input_ids[0] == tokenizer.token_to_id("<s>") and labels[0] == data.IGNORE_INDEX
    assert input_ids.count(tokenizer.token_to_id("<s>")) == 1
    image_positions = [i for i, token in enumerate(input_ids) if token == IMAGE_TOKEN_INDEX]
    assert image_positions == list(range(image_positions[0], image_positions[0] + NUM_IMAGE_TOKENS))
    assert all(labels[i] == data.IGNORE_INDEX for i in image_positions)
    assert tokenizer.token_to_id("<image>") not in input_ids


def test_plain_mask_supervises_caption_and_newline_only(tokenizer):
    caption = [{"from": "human", "value": "Describe the image briefly.\n<image>"},
               {"from": "gpt", "value": "a caption of shapes."}]
    shown = show_supervision(caption, "plain", tokenizer, NUM_IMAGE_TOKENS)
    print("\n" + shown)
    assert shown == "<s><image>x4[a caption of shapes.\n]"
    input_ids, labels = render_conversation(caption, "plain", tokenizer, IMAGE_TOKEN_INDEX,
                                                 NUM_IMAGE_TOKENS)
    assert input_ids[:1 + NUM_IMAGE_TOKENS] == [tokenizer.token_to_id("<s>")] + \
        [IMAGE_TOKEN_INDEX] * NUM_IMAGE_TOKENS
    assert labels[:1 + NUM_IMAGE_TOKENS] == [data.IGNORE_INDEX] * (1 + NUM_IMAGE_TOKENS)
    assert all(label != data.IGNORE_INDEX for label in labels[1 + NUM_IMAGE_TOKENS:])
    assert tokenizer.token_to_id("</s>") not in input_ids  # LLaVA's plain template has no EOS
    with pytest.raises(DataError, match="one human and one gpt"):
        render_conversation(MULTI_TURN, "plain", tokenizer, IMAGE_TOKEN_INDEX, 1)


@pytest.mark.parametrize("template", ["vicuna_v1", "vicuna_v0", "plain"])
@pytest.mark.parametrize("pre_tokenizer", ["byte_level", "metaspace"])
def test_supervised_tokens_cover_exactly_the_answer_spans(template, pre_tokenizer):
    """Whatever the pre-tokenizer merges, the supervised tokens are the answers + stop."""
    tokenizer = build_tokenizer(pre_tokenizer)
    conversation = MULTI_TURN[:2] if template == "plain" else MULTI_TURN
    text, spans = format_conversation(conversation, template)
    input_ids, labels = render_conversation(conversation, template, tokenizer,
                                                 IMAGE_TOKEN_INDEX, NUM_IMAGE_TOKENS)
    # Line the tokenizer's own tokens up with the rendered labels (BOS and image expansion out).
    placeholder_id = tokenizer.token_to_id("<image>")
    encoding = tokenizer.encode(text, add_special_tokens=False)
    offsets = [offset for token, offset in zip(encoding.ids, encoding.offsets) if token != placeholder_id]
    text_labels = [label for token, label in zip(input_ids[1:], labels[1:]) if token != IMAGE_TOKEN_INDEX]
    assert len(offsets) == len(text_labels)
    covered = "".join(text[start:end] for (start, end), label in zip(offsets, text_labels)
                      if label != data.IGNORE_INDEX)
    assert covered == "".join(text[start:end] for start, end in spans)


def test_generation_prompt_ends_with_assistant_role(tokenizer):
    question = MULTI_TURN[:1]
    text, spans = format_conversation(question, "vicuna_v1", for_generation=True)
    assert text.endswith("USER: <image>\nWhat color is the circle? ASSISTANT:") and spans == []
    text_v0, _ = format_conversation(question, "vicuna_v0", for_generation=True)
    assert text_v0.endswith("### Human: <image>\nWhat color is the circle?\n### Assistant:")
    input_ids, labels = render_conversation(question, "vicuna_v1", tokenizer,
                                                 IMAGE_TOKEN_INDEX, NUM_IMAGE_TOKENS,
                                                 for_generation=True)
    assert all(label == data.IGNORE_INDEX for label in labels)
    # The training sequence continues the generation prompt token for token.
    train_ids, _ = render_conversation(MULTI_TURN, "vicuna_v1", tokenizer,
                                            IMAGE_TOKEN_INDEX, NUM_IMAGE_TOKENS)
    assert train_ids[:len(input_ids)] == input_ids
    with pytest.raises(DataError, match="ends with a human turn"):
        format_conversation(MULTI_TURN, "vicuna_v1", for_generation=True)


def test_malformed_conversations_are_named(tokenizer):
    with pytest.raises(DataError, match="turn 1 has 'from' 'bot'"):
        format_conversation([{"from": "human", "value": "hi"},
                                  {"from": "bot", "value": "x"}], "vicuna_v1")
    with pytest.raises(DataError, match="no gpt answer"):
        format_conversation([{"from": "human", "value": "hi"}], "vicuna_v1")
    with pytest.raises(DataError, match="turn 0 needs the keys"):
        format_conversation([{"value": "hi"}], "vicuna_v1")


def test_format_box_styles():
    """LION's three decimals, and LLaVA-1.5's "[0.32, 0.8, 0.59, 1.0]"; both clamp to [0, 1]."""
    assert data.format_box([0.525, 0.0, 0.675, 0.3941]) == "[0.525,0.000,0.675,0.394]"
    assert data.format_box([-0.00001, 0.5, 1.0004, 0.25]) == "[0.000,0.500,1.000,0.250]"
    assert data.format_box([0.3216, 0.8, 0.5912, 1.0004], style="llava15") == "[0.32, 0.8, 0.59, 1.0]"
    assert data.format_box([-0.00001, 0.005, 0.999, 0.25], style="llava15") == "[0.0, 0.01, 1.0, 0.25]"
    with pytest.raises(ValueError, match="unknown box style 'shikra'"):
        data.format_box([0, 0, 1, 1], style="shikra")


def test_padded_square_boxes_land_where_expand2square_pastes_the_image():
    assert vision.padded_square(96, 64) == (96, 0, 16) and vision.padded_square(31, 45) == (45, 7, 0)
    assert vision.padded_square_box((0, 0, 96, 64), 96, 64) == [0.0, 16 / 96, 1.0, 80 / 96]
    image = Image.new("RGB", (31, 45), (0, 0, 0))
    image.putpixel((3, 10), (255, 255, 255))
    square = vision.expand2square(image, (9, 9, 9))
    x0, y0, _, _ = vision.padded_square_box([3, 10, 4, 11], 31, 45)
    assert square.getpixel((round(x0 * square.width), round(y0 * square.height))) == (255, 255, 255)
    box = [3.0, 10.0, 20.5, 44.0]
    assert vision.box_from_padded_square(vision.padded_square_box(box, 31, 45), 31, 45) == pytest.approx(box)


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

def random_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("width,height", [(50, 30), (37, 30), (31, 47), (40, 40)])
def test_preprocess_matches_transformers_clip_and_llava(width, height):
    transformers = pytest.importorskip("transformers")
    image = random_image(width, height, seed=width)
    size = 24  # 37x30 -> long side 24 * 37 / 30 = 29.6: transformers floors to 29, crop left 2
    clip = transformers.CLIPImageProcessorPil(size={"shortest_edge": size},
                                              crop_size={"height": size, "width": size})
    expected = clip(image, return_tensors="pt")["pixel_values"][0]
    ours = vision.preprocess_image(image, size, pad_to_square=False)
    assert ours.shape == (3, size, size)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)

    llava = transformers.LlavaImageProcessorPil(size={"shortest_edge": size}, do_pad=True,
                                                crop_size={"height": size, "width": size})
    expected_padded = llava(image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(vision.preprocess_image(image, size, pad_to_square=True),
                               expected_padded, atol=1e-5, rtol=0)


def test_expand2square_centers_on_clip_mean_background():
    assert vision.CLIP_BACKGROUND == (122, 116, 104)
    image = Image.new("RGB", (6, 2), (255, 0, 0))
    square = vision.expand2square(image, vision.CLIP_BACKGROUND)
    pixels = np.asarray(square)
    assert square.size == (6, 6)
    assert (pixels[2:4] == (255, 0, 0)).all()
    assert (pixels[:2] == vision.CLIP_BACKGROUND).all() and (pixels[4:] == vision.CLIP_BACKGROUND).all()


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------

def write_world(tmp_path, records, jsonl=False):
    """PNGs (non-square) and an instruction file in tmp_path; returns (json path, image folder)."""
    image_folder = tmp_path / "images"
    image_folder.mkdir(exist_ok=True)
    for index, (width, height) in enumerate([(40, 30), (30, 44), (36, 36)]):
        random_image(width, height, seed=index).save(image_folder / f"{index}.png")
    (image_folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    if jsonl:
        path = tmp_path / "instruct.jsonl"
        path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line)
                                  for line in records) + "\n")
    else:
        path = tmp_path / "instruct.json"
        path.write_text(json.dumps(records))
    return str(path), str(image_folder)


def qa(question, answer):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


GOOD_RECORDS = [
    {"id": "multi", "image": "0.png", "conversations": MULTI_TURN},
    {"id": "text", "conversations": qa("How many squares are there?", "There are 3 squares.")},
    {"id": "vqa", "image": "1.png", "conversations": qa("<image>\nWhat color is the circle?", "red")},
    {"id": "square", "image": "2.png", "conversations": qa("<image>\nHow many?", "3")},
]


def make_dataset(path, folder, tokenizer, **overrides):
    arguments = dict(template="vicuna_v1", image_token_index=IMAGE_TOKEN_INDEX,
                     num_image_tokens=NUM_IMAGE_TOKENS, image_size=16, pad_to_square=True,
                     max_seq_len=200)
    arguments.update(overrides)
    return data.InstructionDataset(path, folder, tokenizer, **arguments)


def test_instruction_dataset_items(tmp_path, tokenizer):
    dataset = make_dataset(*write_world(tmp_path, GOOD_RECORDS), tokenizer)
    assert len(dataset) == 4 and dataset.problems.total == 0
    assert dataset.has_image == [True, False, True, True]
    for index in range(len(dataset)):
        sample = dataset[index]
        assert sample["length"] == len(sample["input_ids"]) == dataset.lengths[index]
        assert sample["input_ids"].dtype == torch.long and sample["labels"].shape == sample["input_ids"].shape
        if dataset.has_image[index]:
            assert sample["pixel_values"].shape == (3, 16, 16)
            assert (sample["input_ids"] == IMAGE_TOKEN_INDEX).sum() == NUM_IMAGE_TOKENS
        else:
            assert sample["pixel_values"] is None and IMAGE_TOKEN_INDEX not in sample["input_ids"]


def test_truncation_never_cuts_an_image(tmp_path, tokenizer):
    long_answer = " ".join(["The circle is red."] * 30)
    records = [
        # Image late in a long conversation: the image block would straddle the cut -> dropped.
        {"id": "late_image", "image": "0.png",
         "conversations": qa("There are 3 squares.", long_answer) + qa("<image>\nAnd now?", "red")},
        # Image first, long answer: cut after the image, the answer partly kept -> truncated.
        {"id": "long_answer", "image": "1.png", "conversations": qa("<image>\nWhat?", long_answer)},
        # Text-only and long: truncated.
        {"id": "long_text", "conversations": qa("Hi?", long_answer)},
        {"id": "short", "image": "2.png", "conversations": qa("<image>\nHow many?", "3")},
    ]
    # The tiny BPE spends ~95 tokens on the system message; the image takes 20.
    dataset = make_dataset(*write_world(tmp_path, records), tokenizer, max_seq_len=160,
                           num_image_tokens=20)
    assert [record["id"] for record in dataset.records] == ["long_answer", "long_text", "short"]
    assert dataset.problems.counts == {"too_long": 1}
    assert "record 0 (id 'late_image')" in dataset.problems.summary()
    assert dataset.num_truncated == 2
    for index in range(len(dataset)):
        sample = dataset[index]
        assert len(sample["input_ids"]) <= 160 == max(dataset.lengths)
        assert (sample["labels"] != data.IGNORE_INDEX).any()
    assert (dataset[0]["input_ids"] == IMAGE_TOKEN_INDEX).sum() == 20
    # At 120 no answer token of an image sample fits after its image: only the text sample
    # stays. Dropping is policy, not an error: on_error="raise" does not raise for it.
    dataset = make_dataset(*write_world(tmp_path, records), tokenizer, max_seq_len=120,
                           num_image_tokens=20, on_error="raise")
    assert [record["id"] for record in dataset.records] == ["long_text"]


BAD_RECORDS = [
    {"id": "missing", "image": "nowhere.png", "conversations": qa("<image>\nWhat?", "red")},
    {"id": "bad_from", "conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}]},
    {"id": "no_answer", "conversations": [{"from": "human", "value": "hi"}]},
    {"conversations": "not a list"},
    {"id": "stray_placeholder", "conversations": qa("<image>\nWhat?", "x")},
    {"id": "no_placeholder", "image": "0.png", "conversations": qa("What?", "x")},
]


def test_malformed_records_and_missing_images_are_skipped_and_counted(tmp_path, tokenizer):
    path, folder = write_world(tmp_path, GOOD_RECORDS + BAD_RECORDS)
    dataset = make_dataset(path, folder, tokenizer)
    assert len(dataset) == 4
    assert dataset.problems.counts == {"malformed_record": 5, "missing_image": 1}
    summary = dataset.problems.summary()
    print("\n" + summary)
    assert f"{path} record 4 (id 'missing'): image file not found: {folder}/nowhere.png" in summary
    assert "record 5 (id 'bad_from'): turn 1 has 'from' 'bot'" in summary
    assert "record 6 (id 'no_answer'): the conversation has no gpt answer" in summary
    with pytest.raises(DataError, match="record 4 .*nowhere.png"):
        make_dataset(path, folder, tokenizer, on_error="raise")


def test_jsonl_bad_line_is_named_by_line_number(tmp_path, tokenizer):
    lines = [GOOD_RECORDS[0], "{not json", "", GOOD_RECORDS[1], BAD_RECORDS[1]]
    path, folder = write_world(tmp_path, lines, jsonl=True)
    dataset = make_dataset(path, folder, tokenizer)
    assert len(dataset) == 2 and dataset.problems.counts == {"malformed_record": 2}
    summary = dataset.problems.summary()
    assert f"{path} line 2: invalid JSON" in summary
    assert f"{path} line 5 (id 'bad_from')" in summary
    with pytest.raises(DataError, match="line 2: invalid JSON"):
        make_dataset(path, folder, tokenizer, on_error="raise")


def test_corrupt_image_is_skipped_through_the_dataloader(tmp_path, tokenizer):
    records = GOOD_RECORDS + [{"id": "corrupt", "image": "corrupt.png",
                               "conversations": qa("<image>\nWhat?", "red")}]
    path, folder = write_world(tmp_path, records)
    dataset = make_dataset(path, folder, tokenizer)
    assert len(dataset) == 5  # the file exists; only decoding shows it is corrupt
    loader = data.make_dataloader(dataset, batch_size=5, pad_token_id=3)
    batches = list(loader)
    assert len(batches) == 2  # image batch, text batch
    for batch in batches:
        dataset.problems.extend(batch["problems"])
    assert sum(batch["input_ids"].shape[0] for batch in batches) == 4
    assert dataset.problems.counts == {"corrupt_image": 1}
    assert f"record 4 (id 'corrupt'): cannot decode image {folder}/corrupt.png" in \
        dataset.problems.summary()
    raising = make_dataset(path, folder, tokenizer, on_error="raise")
    with pytest.raises(DataError, match="id 'corrupt'.*corrupt.png"):
        raising[4]


def test_caption_and_text_datasets(tmp_path, tokenizer):
    path, folder = write_world(tmp_path, GOOD_RECORDS + [{"id": "no_image", "conversations": qa("a", "b")}])
    captions = data.CaptionDataset(path, folder, tokenizer, image_size=16, max_text_len=5)
    assert len(captions) == 3 and captions.problems.counts == {"malformed_record": 2}
    sample = captions[0]
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    assert sample["input_ids"][0] == bos and sample["input_ids"][-1] == eos
    assert len(sample["input_ids"]) == 5 and sample["pixel_values"].shape == (3, 16, 16)
    batch = data.collate([captions[0], captions[1]], pad_token_id=3)
    assert batch["labels"] is None and batch["pixel_values"].shape == (2, 3, 16, 16)

    text_path = tmp_path / "text.jsonl"
    text_path.write_text(json.dumps({"text": "There are 3 squares. " * 8}) + "\n"
                         + json.dumps({"text": "red"}) + "\n" + json.dumps({"txt": "x"}) + "\n")
    texts = data.TextDataset(str(text_path), tokenizer, max_seq_len=16)
    assert texts.problems.counts == {"malformed_record": 1}
    document = [bos] + tokenizer.encode("There are 3 squares. " * 8, add_special_tokens=False).ids + [eos]
    chunks = [texts[index]["input_ids"].tolist() for index in range(len(texts) - 1)]
    assert sum(chunks, []) == document and all(len(chunk) <= 16 for chunk in chunks)
    red = tokenizer.encode("red", add_special_tokens=False).ids
    assert texts[len(texts) - 1]["input_ids"].tolist() == [bos, *red, eos]
    assert torch.equal(texts[0]["labels"], texts[0]["input_ids"]) and texts[0]["pixel_values"] is None


def test_caption_regions_are_mapped_to_the_view_and_phrases_deduplicated(tmp_path, tokenizer):
    regions = {"0.png": [{"phrase": "red circle", "box": [0, 0, 20, 15]}, {"phrase": "blue square", "box": [20, 15, 40, 30]}],
               "1.png": [{"phrase": "red circle", "box": [5, 4, 25, 44]}]}
    records = [{"id": name, "image": name, "conversations": qa("<image>\nDescribe.", "shapes"), "regions": boxes}
               for name, boxes in regions.items()]
    records.append({"id": "unboxed", "image": "2.png", "conversations": qa("<image>\nDescribe.", "shapes"),
                    "regions": [{"phrase": "red circle", "box": [10, 10, 5, 20]}]})
    path, folder = write_world(tmp_path, records)
    captions = data.CaptionDataset(path, folder, tokenizer, image_size=16, pad_to_square=True, with_regions=True)
    assert len(captions) == 2 and captions.problems.counts == {"malformed_record": 1}
    assert "id 'unboxed'" in captions.problems.summary() and "regions[0]" in captions.problems.summary()
    # 0.png is 40 x 30: padded to 40 x 40 with 5 rows above; 1.png is 30 x 44: 7 columns to the left.
    torch.testing.assert_close(captions[0]["region_boxes"], torch.tensor([[0, 5 / 40, 0.5, 20 / 40],
                                                                           [0.5, 20 / 40, 1.0, 35 / 40]]))
    torch.testing.assert_close(captions[1]["region_boxes"], torch.tensor([[12 / 44, 4 / 44, 32 / 44, 1.0]]))
    assert vision.box_in_view([0, 0, 20, 15], (40, 30), pad_to_square=False) == [0.0, 0.0, 15 / 30, 0.5]

    batch = data.collate([captions[0], captions[1]], pad_token_id=3)
    regions = batch["regions"]
    assert regions["image_index"].tolist() == [0, 0, 1] and regions["phrase_index"].tolist() == [0, 1, 0]
    red = tokenizer.encode("red circle", add_special_tokens=False).ids
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    assert regions["phrase_ids"][0, :regions["phrase_mask"][0].sum()].tolist() == [bos, *red, eos]
    assert regions["phrase_ids"].shape[0] == 2 and regions["boxes"].shape == (3, 4)
    path, folder = write_world(tmp_path, [{"id": "a", "image": "0.png", "conversations": qa("<image>", "x")}])
    with pytest.raises(DataError, match="record 0 .*'regions' list"):
        data.CaptionDataset(path, folder, tokenizer, image_size=16, with_regions=True, on_error="raise")


# --------------------------------------------------------------------------------------------
# Collate and sampler
# --------------------------------------------------------------------------------------------

def test_pad_sequences_right_and_left():
    values, mask = data.pad_sequences([[5, 6, 7], torch.tensor([8])], pad_value=0)
    assert values.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    values, mask = data.pad_sequences([(5, 6, 7), (8,)], pad_value=-1, side="left")
    assert values.tolist() == [[5, 6, 7], [-1, -1, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert values.dtype == mask.dtype == torch.long
    assert data.pad_sequences([], pad_value=0)[0].shape == (0, 0)
    with pytest.raises(ValueError, match="side"):
        data.pad_sequences([[1]], pad_value=0, side="middle")


def test_collate_right_pads_and_stacks_only_images(tmp_path, tokenizer):
    dataset = make_dataset(*write_world(tmp_path, GOOD_RECORDS), tokenizer)
    samples = [dataset[0], dataset[1], dataset[2]]  # image, text, image
    batch = data.collate(samples, pad_token_id=3)
    lengths = [sample["length"] for sample in samples]
    assert batch["input_ids"].shape == batch["labels"].shape == (3, max(lengths))
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    torch.testing.assert_close(batch["pixel_values"][1], samples[2]["pixel_values"])
    for row, length in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (max(lengths) - length)
        assert (batch["input_ids"][row, length:] == 3).all()
        assert (batch["labels"][row, length:] == data.IGNORE_INDEX).all()
        assert torch.equal(batch["input_ids"][row, :length], samples[row]["input_ids"])
    text_only = data.collate([dataset[1]], pad_token_id=3)
    assert text_only["pixel_values"] is None
    empty = data.collate([{"problem": ("corrupt_image", "x")}], pad_token_id=3)
    assert empty["input_ids"].shape == (0, 0) and empty["problems"] == [("corrupt_image", "x")]


def make_sampler(**overrides):
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 100, (53,), generator=generator).tolist()
    has_image = (torch.rand(53, generator=generator) < 0.6).tolist()
    arguments = dict(lengths=lengths, has_image=has_image, batch_size=4, seed=1,
                     batches_per_megabatch=2)
    arguments.update(overrides)
    return data.ModalityLengthGroupedSampler(**arguments)


def test_sampler_single_modality_deterministic_and_covers_everything():
    sampler = make_sampler()
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert all(len({sampler.has_image[i] for i in batch}) == 1 for batch in batches)
    assert sorted(sum(batches, [])) == list(range(53))  # world 1: no padding, each once
    assert batches == list(make_sampler())
    sampler.set_epoch(1)
    assert list(sampler) != batches
    sampler.set_epoch(0)
    assert list(sampler) == batches
    # Lengths are grouped: within a megabatch, batches are sorted longest first.
    full = [batch for batch in batches if len(batch) == 4]
    assert any(min(sampler.lengths[i] for i in batch) > 50 for batch in full)


def test_sampler_rank_slices_partition_each_global_batch():
    single = list(make_sampler(batch_size=6))
    world = [list(make_sampler(batch_size=3, world_size=2, rank=rank)) for rank in range(2)]
    has_image = make_sampler().has_image
    assert len(world[0]) == len(world[1]) == len(single)
    # Same global batch size, same seed: rank 0 + rank 1 = the single-process batch.
    for step, global_batch in enumerate(single[:-2]):  # the last two are the remainders
        assert world[0][step] + world[1][step] == global_batch
    for step in range(len(single)):
        assert len(world[0][step]) == len(world[1][step])  # remainders padded for the ranks
        assert len({has_image[i] for i in world[0][step] + world[1][step]}) == 1
    assert set(sum(world[0] + world[1], [])) == set(range(53))


def test_sampler_resume_from_position():
    sampler = make_sampler(batch_size=3, world_size=2, rank=1)
    sampler.set_epoch(3)
    full_epoch = list(sampler)
    sampler.skip_batches(5)
    assert list(sampler) == full_epoch[5:]
    assert list(sampler) == full_epoch  # the skip applies to one iteration only
    resumed = make_sampler(batch_size=3, world_size=2, rank=1)
    resumed.set_epoch(3)
    resumed.skip_batches(5)
    assert list(resumed) == full_epoch[5:]


def test_make_dataloader_with_workers(tmp_path, tokenizer):
    dataset = make_dataset(*write_world(tmp_path, GOOD_RECORDS * 3), tokenizer)
    loader = data.make_dataloader(dataset, batch_size=2, pad_token_id=3, num_workers=2, seed=0)
    batches = list(loader)
    assert len(batches) == len(loader) == 7  # 9 image samples -> 5 batches, 3 text -> 2
    in_process = list(data.make_dataloader(dataset, batch_size=2, pad_token_id=3, seed=0))
    for batch, expected in zip(batches, in_process):
        assert torch.equal(batch["input_ids"], expected["input_ids"])


def metaspace_tokenizer(prepend_scheme: str) -> Tokenizer:
    """A LLaMA-style SentencePiece BPE in tokenizer.json form: Metaspace pre-tokenizer with
    "always" (the legacy LLaMA behaviour: every piece between special tokens gets the leading
    "\u2581") or "first" (non-legacy: only the start of the whole input does)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=prepend_scheme)
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme=prepend_scheme)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<image>"])
    tokenizer.train_from_iterator([json.dumps(MULTI_TURN), TEMPLATES["vicuna_v1"].system] * 20, trainer)
    return tokenizer


def llava_tokenizer_image_token(prompt: str, tokenizer: Tokenizer, image_token_index: int) -> list[int]:
    """LLaVA's `tokenizer_image_token` (llava/mm_utils.py), written against `tokenizers`: each
    piece between "<image>" markers is tokenized as its own input with BOS, BOS is kept once, and
    the pieces are joined with the image token."""
    bos = tokenizer.token_to_id("<s>")
    chunks = [[bos] + tokenizer.encode(chunk, add_special_tokens=False).ids for chunk in prompt.split("<image>")]
    input_ids = [bos]
    for index, chunk in enumerate(chunks):
        if index:
            input_ids.append(image_token_index)
        input_ids += chunk[1:]
    return input_ids


@pytest.mark.parametrize("prepend_scheme", ["always", "first"])
def test_image_pieces_are_tokenized_as_llava_does(prepend_scheme):
    """The ids around an image are LLaVA's with a legacy and a non-legacy SentencePiece tokenizer;
    with the non-legacy one, tokenizing the whole string would lose the piece's leading marker."""
    tokenizer = metaspace_tokenizer(prepend_scheme)
    text, _ = format_conversation(MULTI_TURN, "vicuna_v1")
    input_ids, _ = render_conversation(MULTI_TURN, "vicuna_v1", tokenizer, IMAGE_TOKEN_INDEX, 1)
    assert input_ids == llava_tokenizer_image_token(text, tokenizer, IMAGE_TOKEN_INDEX)
    whole = tokenizer.encode(text, add_special_tokens=False).ids
    whole = [tokenizer.token_to_id("<s>")] + [IMAGE_TOKEN_INDEX if i == tokenizer.token_to_id("<image>") else i
                                             for i in whole]
    assert (whole == input_ids) == (prepend_scheme == "always")


def test_encoder_decoder_items_are_one_answer_each(tmp_path, tokenizer):
    """T5's prefix-LM split: each answer an item; the encoder reads everything before it, without
    BOS, earlier answers included; the decoder's labels are the answer and its EOS. Joined, the
    two are the decoder-only rendering without BOS."""
    path, folder = write_world(tmp_path, GOOD_RECORDS)
    decoder_only = make_dataset(path, folder, tokenizer)
    split = make_dataset(path, folder, tokenizer, encoder_decoder=True)
    assert len(split) == 5 and split.has_image == [True, True, False, True, True]
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    first, second = split[0], split[1]
    assert bos not in first["input_ids"].tolist() and first["labels"][-1] == eos
    assert tokenizer.decode(first["labels"].tolist()).strip() == "The circle is red."
    assert "The circle is red." in tokenizer.decode(second["input_ids"].tolist())
    assert tokenizer.decode(second["labels"].tolist()).strip() == "There are 3 squares."
    whole = decoder_only[0]["input_ids"].tolist()
    assert second["input_ids"].tolist() + second["labels"].tolist() == whole[1:]
    assert (first["input_ids"] == IMAGE_TOKEN_INDEX).sum() == NUM_IMAGE_TOKENS
    with pytest.raises(data.DataError, match="no supervised token"):
        conversation.split_for_encoder_decoder([5, 6], [data.IGNORE_INDEX] * 2, eos)
    assert conversation.split_for_encoder_decoder([5, 6, 7], [data.IGNORE_INDEX, 6, 7], eos) == ([5], [6, 7, eos])


def test_prefix_lm_text_items_split_each_chunk_once(tmp_path, tokenizer):
    text_path = tmp_path / "text.jsonl"
    text_path.write_text("".join(json.dumps({"text": text}) + "\n" for text in
                                 ["There are 3 squares. " * 4, "red", "The circle is red."]))
    texts = data.TextDataset(str(text_path), tokenizer, max_seq_len=12, prefix_lm=True, seed=1)
    eos = tokenizer.token_to_id("</s>")
    document = tokenizer.encode("There are 3 squares. " * 4, add_special_tokens=False).ids + [eos]
    items = [texts[index] for index in range(len(texts))]
    assert all(len(item["input_ids"]) >= 1 and len(item["labels"]) >= 1 for item in items)
    rejoined = [item["input_ids"].tolist() + item["labels"].tolist() for item in items]
    joined = sum(rejoined[:len(rejoined) - 2], [])  # the first document's chunks: no BOS, each token once,
    assert joined == document[:len(joined)] and len(document) - len(joined) <= 1  # but a 1-token tail
    again = data.TextDataset(str(text_path), tokenizer, max_seq_len=12, prefix_lm=True, seed=1)
    other = data.TextDataset(str(text_path), tokenizer, max_seq_len=12, prefix_lm=True, seed=2)
    assert again.split_points == texts.split_points != other.split_points


# --------------------------------------------------------------------------------------------
# LION: task levels and soft-prompted tags
# --------------------------------------------------------------------------------------------

LEVELED_RECORDS = [
    {"id": "rec", "image": "0.png", "task_level": "region",
     "conversations": qa("<image>\nWhere is the circle?", "[0.1,0.2,0.3,0.4]")},
    {"id": "vqa", "image": "1.png", "conversations": qa("<image>\nWhat color is the circle?", "red")},
    {"id": "bad", "image": "2.png", "task_level": "pixel", "conversations": qa("<image>\nHow many?", "3")},
    {"id": "odd", "image": "2.png", "task_level": ["region"], "conversations": qa("<image>\nHow many?", "3")},
]


def test_task_levels_are_read_filtered_and_collated(tmp_path, tokenizer):
    path, folder = write_world(tmp_path, LEVELED_RECORDS)
    dataset = make_dataset(path, folder, tokenizer)
    assert len(dataset) == 2 and dataset.problems.counts == {"malformed_record": 2}
    assert [dataset[index]["task_level"] for index in range(2)] == [data.TASK_LEVELS["region"], data.TASK_LEVELS["image"]]
    batch = data.collate([dataset[0], dataset[1]], pad_token_id=0)
    assert batch["task_level"].tolist() == [0, 1]
    assert len(make_dataset(path, folder, tokenizer, task_levels=["region"])) == 1
    assert [make_dataset(path, folder, tokenizer, task_levels=["image"])[0]["task_level"]] == [1]
    with pytest.raises(ValueError, match="pixel"):
        make_dataset(path, folder, tokenizer, task_levels=["pixel"])


def write_tags(tmp_path, entries) -> str:
    path = tmp_path / "tags.json"
    path.write_text(json.dumps({name: {"tags": tags} for name, tags in entries.items()}))
    return str(path)


def test_tags_are_read_per_file_name_and_a_noisy_tagger_is_deterministic(tmp_path):
    entries = {f"{index}.png": [f"tag{index}", f"tag{index + 1}", f"tag{index + 2}"] for index in range(50)}
    path = write_tags(tmp_path, entries)
    assert conversation.read_tags(path) == entries
    noisy = conversation.read_tags(path, noise=0.5)
    assert noisy == conversation.read_tags(path, noise=0.5)  # the same wrong tags every time, as a real tagger's
    kept = sum(tag in entries[name] for name, tags in noisy.items() for tag in tags)
    assert 0.3 * 150 < kept < 0.7 * 150 and sum(map(len, noisy.values())) < 150  # some dropped, some swapped
    with pytest.raises(ValueError, match="noise"):
        conversation.read_tags(path, noise=1.5)
    (tmp_path / "broken.json").write_text(json.dumps({"0.png": ["no", "tags", "key"]}))
    with pytest.raises(DataError, match="broken.json"):
        conversation.read_tags(str(tmp_path / "broken.json"))


def test_the_tag_sentence_goes_before_the_first_question_but_not_into_the_qformer(tmp_path, tokenizer):
    path, folder = write_world(tmp_path, LEVELED_RECORDS[:2])
    tags = conversation.read_tags(write_tags(tmp_path, {"0.png": ["red circle", "blue star"]}))
    with_hint = conversation.tag_sentence(["red circle", "blue star"], "<hint>")
    assert with_hint == ("According to <hint>, you are allowed to use or partially use the following tags: "
                         "[red circle, blue star]. ")
    qformer = shapes.train_qformer_tokenizer(["Where is the circle?", with_hint])
    dataset = make_dataset(path, folder, tokenizer, tags=tags, hint="<hint>", qformer_tokenizer=qformer,
                           max_seq_len=400)
    assert len(dataset) == 1 and dataset.problems.counts == {"missing_tags": 1}  # 1.png has no tags
    text = tokenizer.decode([i for i in dataset[0]["input_ids"].tolist() if i != IMAGE_TOKEN_INDEX])
    assert with_hint.strip() + " Where is the circle?" in text
    assert qformer.decode(dataset[0]["qformer_input_ids"].tolist()) == "where is the circle?"
