"""Metrics: the official scoring rules of each benchmark, as the reference scripts compute them.

- VQA, in the two steps of LLaVA's VQAv2 pipeline: `evalai_answer`, the EvalAIAnswerProcessor
  (LLaVA's `m4c_evaluator.py`) that `convert_vqav2_for_submission.py` applies to each prediction,
  then `vqa_accuracy`, the official VQA evaluation (GT-Vision-Lab VQA `vqaEval.py`, as the
  evaluation server runs it): the ground truth is normalized only when its answers disagree,
  then for each of the 10 human answers min(1, #matches among the other 9 / 3), averaged.
- `cider_d`: CIDEr-D exactly as pycocoevalcap's `Cider` (cider_scorer.py) computes it.
- `parse_box`, `box_iou`: REC box text "[x0,y0,x1,y1]" normalized to [0, 1] (Shikra / LION /
  LLaVA-1.5 REC data); a prediction is correct when IoU >= 0.5 (lmms-eval), unparsable = wrong.
- `pope_metrics`: POPE (Li et al. 2023) accuracy / precision / recall / F1 / yes-ratio with the
  yes/no extraction of LLaVA's `llava/eval/eval_pope.py`.
- `parse_choice`: the option a multiple-choice reply names, by LLaVA's `eval_science_qa.py` rules;
  `circular_accuracy`: MMBench's circular evaluation over rotations of the options.
Pure Python, no torch: they score prediction files of any model.
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter, defaultdict
from typing import Hashable


# ---------------------------------------------------------------------------------------------
# VQA accuracy

# Tables of vqaEval.py (m4c_evaluator.py's EvalAIAnswerProcessor holds the same), kept verbatim:
# their oddities ("somebody'd" -> "somebodyd") are part of how published numbers were computed.
VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
VQA_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
VQA_ARTICLES = {"a", "an", "the"}
VQA_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">",
                   "<", "@", "`", ",", "?", "!"]
COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a mistyped look-behind that
# never matches anything, so the rule in force is "drop a period not followed by a digit".
PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# Both official scripts call periodStrip.sub("", text, re.UNICODE): the third argument of a compiled
# pattern's sub is the count, so at most re.UNICODE = 32 periods are dropped.
PERIODS_DROPPED = int(re.UNICODE)


def _clean_whitespace(text: str) -> str:
    """Newlines and tabs to spaces, ends stripped: vqaEval.py's first step on both sides."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """vqaEval.py's processPunctuation (EvalAIAnswerProcessor.process_punctuation is the same
    rule): a mark touching a space ("yes , it"), or any mark at all in a text holding a
    "1,000"-style number, is deleted; a mark inside a word ("black-and-white") becomes a space;
    then periods not before a digit go."""
    stripped = text
    for mark in VQA_PUNCTUATION:
        if mark + " " in text or " " + mark in text or COMMA_BETWEEN_DIGITS.search(text):
            stripped = stripped.replace(mark, "")
        else:
            stripped = stripped.replace(mark, " ")
    return PERIOD_NOT_BEFORE_DIGIT.sub("", stripped, count=PERIODS_DROPPED)


def process_digit_article(text: str) -> str:
    """vqaEval.py's processDigitArticle: lowercased words, number words to digits, articles
    dropped, then the contractions table ("dont" -> "don't")."""
    words = [VQA_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(VQA_CONTRACTIONS.get(word, word) for word in words if word not in VQA_ARTICLES)


def normalize_vqa_answer(answer: str) -> str:
    """vqaEval.py's normalization, processPunctuation then processDigitArticle ("Two dogs." ->
    "2 dogs", "a dog" -> "dog"): what the official scoring applies to both sides of a question
    whose human answers disagree."""
    return process_digit_article(process_punctuation(_clean_whitespace(answer)))


def evalai_answer(prediction: str) -> str:
    """EvalAIAnswerProcessor of LLaVA's m4c_evaluator.py, which LLaVA's
    convert_vqav2_for_submission.py runs on every prediction before upload: lowercase, commas and
    "?" deleted, "'s" split off as " 's", then whitespace, punctuation, digits / articles /
    contractions as vqaEval.py ("Two dogs." -> "2 dogs", "1,000" -> "1000", "it's" -> "it 's").
    Its comma test in process_punctuation differs from vqaEval.py's but can no longer fire."""
    tokenized = prediction.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return normalize_vqa_answer(tokenized)


def vqa_accuracy(answer: str, gt_answers: list[str]) -> float:
    """vqaEval.py's accuracy of one submitted answer (after `evalai_answer` in LLaVA's pipeline)
    against the human answers (10 in VQAv2). Both sides get newlines / tabs to spaces and are
    stripped; only when the human answers differ (`if len(set(gtAnswers)) > 1:`) are both
    normalized (`normalize_vqa_answer`), else they are compared as written. Then for each human
    answer i, min(1, #other answers equal to the submitted one / 3), averaged. (The script drops
    answer i by comparing answer records, unique in VQAv2 by answer_id: one by position here.)"""
    if not gt_answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    submitted = _clean_whitespace(answer)
    humans = [_clean_whitespace(gt) for gt in gt_answers]
    if len(set(humans)) > 1:
        submitted = normalize_vqa_answer(submitted)
        humans = [normalize_vqa_answer(gt) for gt in humans]
    matches = sum(gt == submitted for gt in humans)
    return sum(min(1.0, (matches - (gt == submitted)) / 3) for gt in humans) / len(humans)


# ---------------------------------------------------------------------------------------------
# CIDEr-D

def _ngram_counts(sentence: str, max_n: int) -> Counter:
    """Counts of the 1..max_n-grams of a whitespace-tokenized sentence (pycocoevalcap `precook`)."""
    words = sentence.split()
    return Counter(tuple(words[i:i + n]) for n in range(1, max_n + 1)
                   for i in range(len(words) - n + 1))


def cider_d(predictions: dict[Hashable, str], references: dict[Hashable, list[str]],
            max_n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D (Vedantam et al. 2015) as pycocoevalcap's `Cider().compute_score` computes it, on
    already tokenized text (tokens separated by spaces).

    Per image: tf-idf vectors of the 1..4-grams with idf = log(#images) - log(max(1, df)), df =
    the number of images whose references contain the n-gram; for each reference and each n,
    sum(min(h, r) * r) / (|h| |r|) (the "clipping" that makes it CIDEr-D) times the Gaussian length
    penalty exp(-(len_h - len_r)^2 / (2 sigma^2)), where a length is a count of bigrams (as in the
    pycocoevalcap code); mean over n, over the references, times 10. Result: mean over images."""
    if set(predictions) != set(references):
        missing = set(references) ^ set(predictions)
        raise ValueError(f"cider_d: predictions and references differ in keys, e.g. {next(iter(missing))!r}")
    keys = list(references)
    reference_counts = {key: [_ngram_counts(reference, max_n) for reference in references[key]] for key in keys}
    document_frequency: Counter = Counter()
    for key in keys:
        document_frequency.update({ngram for counts in reference_counts[key] for ngram in counts})
    log_num_images = math.log(float(len(keys)))

    def tfidf(counts: Counter) -> tuple[list[dict], list[float], int]:
        vectors: list[dict] = [defaultdict(float) for _ in range(max_n)]
        squared_norms = [0.0] * max_n
        bigram_count = 0
        for ngram, term_frequency in counts.items():
            order = len(ngram) - 1
            weight = float(term_frequency) * (log_num_images - math.log(max(1.0, document_frequency[ngram])))
            vectors[order][ngram] = weight
            squared_norms[order] += weight ** 2
            if order == 1:
                bigram_count += term_frequency
        return vectors, [math.sqrt(value) for value in squared_norms], bigram_count

    def similarity(hypothesis: tuple, reference: tuple) -> list[float]:
        (hyp_vectors, hyp_norms, hyp_length), (ref_vectors, ref_norms, ref_length) = hypothesis, reference
        penalty = math.e ** (-(float(hyp_length - ref_length) ** 2) / (2 * sigma ** 2))
        scores = []
        for order in range(max_n):
            score = 0.0
            for ngram, weight in hyp_vectors[order].items():
                reference_weight = ref_vectors[order].get(ngram, 0.0)
                score += min(weight, reference_weight) * reference_weight
            if hyp_norms[order] != 0 and ref_norms[order] != 0:
                score /= hyp_norms[order] * ref_norms[order]
            scores.append(score * penalty)
        return scores

    image_scores = []
    for key in keys:
        hypothesis = tfidf(_ngram_counts(predictions[key], max_n))
        per_order = [0.0] * max_n
        for counts in reference_counts[key]:
            for order, value in enumerate(similarity(hypothesis, tfidf(counts))):
                per_order[order] += value
        image_scores.append(sum(per_order) / max_n / len(reference_counts[key]) * 10.0)
    return sum(image_scores) / len(image_scores)


def caption_tokens(text: str) -> str:
    """Lowercased words separated by spaces, punctuation dropped: what pycocoevalcap's Java
    PTBTokenizer yields for plain captions, without needing Java."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


# ---------------------------------------------------------------------------------------------
# Boxes (REC) and POPE

_NUMBER = r"\s*(-?(?:\d+(?:\.\d*)?|\.\d+))\s*"
BOX_PATTERN = re.compile(r"\[" + ",".join([_NUMBER] * 4) + r"\]")


def parse_box(text: str) -> list[float] | None:
    """The first "[x0,y0,x1,y1]" in `text` (spaces and any number of decimals allowed), or None."""
    match = BOX_PATTERN.search(text)
    return [float(value) for value in match.groups()] if match else None


def box_iou(a: list[float], b: list[float]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes; a degenerate box has IoU 0."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    intersection = max(0.0, width) * max(0.0, height)
    union = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - intersection
    return intersection / union if union > 0 else 0.0


def pope_answer(text: str) -> str:
    """LLaVA's POPE extraction (eval_pope.py): keep the first sentence, drop commas, split on
    spaces; "no" if a word is "No", "no" or "not", else "yes" (case and word list as LLaVA's)."""
    first_sentence = text.split(".")[0].replace(",", "")
    return "no" if {"No", "no", "not"} & set(first_sentence.split(" ")) else "yes"


def pope_metrics(predictions: list[str], labels: list[str]) -> dict[str, float]:
    """POPE metrics with "yes" as the positive class: accuracy, precision, recall, F1 and the
    share of "yes" answers. Predictions are raw model texts (passed through `pope_answer`); labels
    are "yes" / "no". An empty denominator gives 0 instead of LLaVA's ZeroDivisionError."""
    if len(predictions) != len(labels) or not labels:
        raise ValueError(f"pope_metrics: {len(predictions)} predictions for {len(labels)} labels")
    said_yes = [pope_answer(text) == "yes" for text in predictions]
    is_yes = [label == "yes" for label in labels]
    true_positive = sum(p and t for p, t in zip(said_yes, is_yes))
    false_positive = sum(p and not t for p, t in zip(said_yes, is_yes))
    false_negative = sum(t and not p for p, t in zip(said_yes, is_yes))
    correct = sum(p == t for p, t in zip(said_yes, is_yes))
    precision = true_positive / (true_positive + false_positive) if true_positive + false_positive else 0.0
    recall = true_positive / (true_positive + false_negative) if true_positive + false_negative else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": correct / len(labels), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(said_yes) / len(labels)}


# LLaVA's eval_science_qa.py: its --options default, and its pattern ("." matches any character).
SCIENCEQA_OPTIONS = "ABCDE"
ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_choice(text: str, num_choices: int) -> int | None:
    """The option a multiple-choice reply names (A = 0), by the rules of LLaVA's
    eval_science_qa.py, in its order: the reply is exactly an option letter ("B"); it starts with
    an option letter, a period and a space ("B. dog"); it holds exactly one "The answer is X."
    (X any capital letter). Otherwise None, the script's "FAILED", scored wrong; "B.", "(B)" or
    "A dog is shown." all fail. The option letters are A-E as the script's, or one per choice
    when there are more. An index beyond the choices is scored wrong, as the script's -1. The
    reply is stripped first, as model_vqa_science.py / model_vqa_mmbench.py store it."""
    reply = text.strip()
    options = list(string.ascii_uppercase[:max(len(SCIENCEQA_OPTIONS), num_choices)])  # a list: "" is no option
    if reply in options:
        letter = reply
    elif len(reply) >= 3 and reply[0] in options and reply[1:3] == ". ":
        letter = reply[0]
    else:
        found = ANSWER_IS.findall(reply)
        if len(found) != 1:
            return None
        letter = found[0]
    return ord(letter) - ord("A")


def circular_accuracy(question_ids: list[Hashable], correct: list[bool]) -> float:
    """MMBench's circular evaluation (LLaVA's model_vqa_mmbench.py --all-rounds asks each
    question once per rotation of its options): a question counts as right only if every one of
    its rotations is; the share of such questions."""
    if len(question_ids) != len(correct) or not correct:
        raise ValueError(f"circular_accuracy: {len(correct)} results for {len(question_ids)} question ids")
    all_right: dict[Hashable, bool] = {}
    for question_id, right in zip(question_ids, correct):
        all_right[question_id] = all_right.get(question_id, True) and right
    return sum(all_right.values()) / len(all_right)


def format_table(task: str, split: str, metrics: dict[str, float]) -> str:
    """A markdown table of one task's metrics."""
    lines = ["| task | split | metric | value |", "|---|---|---|---|"]
    for name, value in metrics.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"| {task} | {split} | {name} | {shown} |")
    return "\n".join(lines)


def vision_ladder(results: dict, oracle: dict | None) -> dict:
    """Each reported metric's rungs: blind (every image zeros), image (the recipe), oracle_text
    (the same LLM recipe reading the scene as text instead: perfect vision), and
    vision_gap_closed = (image - blind) / (oracle_text - blind), the share of what perfect vision
    would add that the image tokens deliver (1: as good as the text; 0: no better than blind)."""
    rungs = {}
    for key, value in results.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or key == "wall_seconds":
            continue
        blind, top = results.get("blind", {}).get(key), (oracle or {}).get(key)
        rungs[key] = {"blind": blind, "image": value, "oracle_text": top}
        if blind is not None and top is not None and top != blind:
            rungs[key]["vision_gap_closed"] = (value - blind) / (top - blind)
    return rungs
