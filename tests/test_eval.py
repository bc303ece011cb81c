"""Tests of eval.py and metrics.py: metrics on hand-checked cases (CIDEr-D against pycocoevalcap), the task
loaders on tiny files in the public formats, and the eval loop end to end on a tiny random MLLM."""
import json
import math
import pickle
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

import conversation
import eval as evaluation
from eval import load_task
from metrics import (box_iou, cider_d, circular_accuracy, evalai_answer, normalize_vqa_answer, parse_box, parse_choice,
                     pope_metrics, vqa_accuracy)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("answer, normalized", [
    ("Two", "2"), ("two dogs", "2 dogs"), ("none", "0"), ("a dog", "dog"), ("The Dog.", "dog"),
    ("It's", "it's"), ("its", "its"), ("dont", "don't"), ("yes.", "yes"), ("3.5", "3.5"),
    ("black-and-white", "black and white"), ("yes , it is", "yes it is"), ("1,000", "1000"),
    ("  red\n", "red"), ("an apple", "apple"),
])
def test_vqa_normalization(answer, normalized):
    assert normalize_vqa_answer(answer) == normalized


def test_vqa_normalization_drops_at_most_32_periods():
    # vqaEval.py: `outText = self.periodStrip.sub("", outText, re.UNICODE)`; the third argument of a
    # compiled pattern's sub is the count, and re.UNICODE == 32.
    assert normalize_vqa_answer("." * 40) == "." * 8


@pytest.mark.parametrize("prediction, submitted", [
    # m4c_evaluator.py EvalAIAnswerProcessor.word_tokenize: `word = word.lower()`,
    # `word.replace(",", "").replace("?", "").replace("'s", " 's")`; then punctuation and
    # digits / articles as vqaEval.py.
    ("Two dogs.", "2 dogs"), ("Yes, it is", "yes it is"), ("1,000", "1000"), ("What?", "what"),
    ("It's red", "it 's red"), ("The man's hat", "man 's hat"), ("black-and-white", "black and white"),
    ("dont", "don't"), ("  A Dog\n", "dog"), ("3.5", "3.5"),
])
def test_evalai_answer_processor(prediction, submitted):
    assert evalai_answer(prediction) == submitted


@pytest.mark.parametrize("agreeing, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_with_ten_answers(agreeing, expected):
    # k annotators agree: the k leave-one-out subsets that drop an agreeing one see k - 1 matches,
    # the others see k; e.g. k = 2: (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    answers = ["2"] * agreeing + ["3"] * (10 - agreeing)
    assert vqa_accuracy(evalai_answer("two"), answers) == pytest.approx(expected)


def test_vqa_accuracy_normalizes_the_ground_truth_only_when_annotators_disagree():
    # vqaEval.py: `if len(set(gtAnswers)) > 1:` processPunctuation / processDigitArticle on every
    # gt answer and on resAns; otherwise both are compared as written (after `.strip()` and
    # newlines / tabs to spaces).
    assert vqa_accuracy("Two", ["Two"] * 10) == 1.0  # ten identical, unnormalized: compared as written
    assert vqa_accuracy("2", ["Two"] * 10) == 0.0  # ... so the digit does not match
    assert vqa_accuracy(evalai_answer("Two"), ["Two"] * 10) == 0.0  # LLaVA's upload says "2": 0 on the server
    assert vqa_accuracy("2", ["Two"] * 9 + ["three"]) == 1.0  # they disagree: "Two" -> "2"
    assert vqa_accuracy("Red", ["red"] * 5 + ["red\t"] * 5) == 0.0  # identical once stripped: not normalized
    assert vqa_accuracy(" red\n", ["red"] * 10) == 1.0
    assert vqa_accuracy("it's red", ["it's red"] * 3 + ["blue"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy(evalai_answer("It's red"), ["it's red"] * 3 + ["blue"] * 7) == 0.0  # "it 's red"
    assert vqa_accuracy(evalai_answer("A dog."), ["dog"] * 10) == 1.0
    assert vqa_accuracy("", ["dog"] * 10) == 0.0


def _random_captions(rng: random.Random, count: int) -> list[str]:
    words = "a the dog cat red blue small big circle square on left of is sits near".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(0, 12))) for _ in range(count)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cider_d_matches_pycocoevalcap(seed):
    cider_module = pytest.importorskip("pycocoevalcap.cider.cider")
    rng = random.Random(seed)
    references = {f"img{i}": _random_captions(rng, rng.randint(1, 5)) for i in range(12)}
    predictions = {key: _random_captions(rng, 1)[0] for key in references}
    predictions["img0"] = references["img0"][0]  # one exact hit, so the score is not ~0
    expected, _ = cider_module.Cider().compute_score(references, {k: [v] for k, v in predictions.items()})
    assert abs(cider_d(predictions, references) - expected) < 1e-9
    assert cider_d(predictions, references) > 0


def test_cider_d_rejects_mismatched_keys():
    with pytest.raises(ValueError, match="keys"):
        cider_d({"a": "x"}, {"b": ["x"]})


@pytest.mark.parametrize("text, box", [
    ("[0.525,0.000,0.675,0.394]", [0.525, 0.0, 0.675, 0.394]),
    ("[0.1, 0.2, 0.3, 0.4]", [0.1, 0.2, 0.3, 0.4]),
    ("It is at [ 0.12 ,0.5,1,1 ].", [0.12, 0.5, 1.0, 1.0]),
    ("[1,2,3,4] then [5,6,7,8]", [1.0, 2.0, 3.0, 4.0]),
    ("[.5,0.25,1.,2]", [0.5, 0.25, 1.0, 2.0]),
    ("[-0.1,0,0.5,0.5]", [-0.1, 0.0, 0.5, 0.5]),
    ("[0.1,0.2,0.3] [0.1,0.2,0.3,0.4]", [0.1, 0.2, 0.3, 0.4]),
])
def test_parse_box(text, box):
    assert parse_box(text) == pytest.approx(box)


@pytest.mark.parametrize("text", ["", "no box here", "[0.1,0.2,0.3]", "[a,b,c,d]", "[0.1;0.2;0.3;0.4]",
                                  "(0.1,0.2,0.3,0.4)", "[0.1,0.2,0.3,0.4", "[,,,]", "[1..2,3,4,5]"])
def test_parse_box_garbage(text):
    assert parse_box(text) is None


def test_box_iou():
    assert box_iou([0, 0, 2, 2], [0, 0, 2, 2]) == 1.0
    assert box_iou([0, 0, 2, 2], [1, 0, 3, 2]) == pytest.approx(1 / 3)
    assert box_iou([0, 0, 4, 4], [1, 1, 3, 3]) == pytest.approx(0.25)
    assert box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    assert box_iou([0, 0, 1, 1], [1, 0, 2, 1]) == 0.0  # touching edges
    assert box_iou([1, 1, 1, 1], [1, 1, 1, 1]) == 0.0  # degenerate
    assert box_iou([2, 2, 0, 0], [0, 0, 2, 2]) == 0.0  # inverted prediction


def test_pope_metrics_hand_case():
    predictions = ["Yes, there is.", "No.", "There is not a cat.", "yes", "NO"]
    labels = ["yes", "no", "yes", "no", "no"]
    # LLaVA's extraction: "NO" is not one of its words (No / no / not), so it counts as yes.
    # said yes: 1 0 0 1 1 -> TP 1, FP 2, FN 1, TN 1.
    metrics = pope_metrics(predictions, labels)
    assert metrics == pytest.approx({"accuracy": 0.4, "precision": 1 / 3, "recall": 0.5, "f1": 0.4, "yes_ratio": 0.6})
    assert pope_metrics(["no", "no"], ["yes", "no"])["precision"] == 0.0  # no division by zero


# eval_science_qa.py: `if pred_text in args.options:` (options A-E); `elif len(pred_text) >= 3 and
# pred_text[0] in args.options and pred_text[1:3] == ". ":`; else `re.compile(r'The answer is
# ([A-Z]).')` with `if len(res) == 1:`, otherwise answer = "FAILED".
@pytest.mark.parametrize("text, index", [
    ("B", 1), ("B. dog", 1), ("The answer is C.", 2), ("Dogs bark. The answer is A.", 0), (" B\n", 1),
    ("The answer is Bx", 1),  # the pattern's "." is any character
    ("E", 4), ("The answer is Z.", 25),  # parsed, but no choice of three: wrong, as get_pred_idx's -1
    ("A dog is shown.", None), ("B.", None), ("(C)", None), ("B) cat", None), ("cat", None), ("b", None),
    ("The answer is B", None), ("The answer is A. The answer is B.", None), ("Z", None), ("AB", None), ("", None),
])
def test_parse_choice_follows_eval_science_qa(text, index):
    assert parse_choice(text, 3) == index


def test_parse_choice_letters_beyond_e_for_longer_lists():
    assert parse_choice("F", 6) == 5 and parse_choice("F. owl", 7) == 5
    assert parse_choice("F", 3) is None  # A-E only, as eval_science_qa.py's --options


def test_failed_parses_are_counted_and_scored_wrong():
    samples = [evaluation.Sample(str(i), None, "Which?", 1, choices=["cat", "dog", "bird"]) for i in range(4)]
    _, scored = evaluation.score_task("choice", samples, ["A dog is shown.", "The answer is B.", "B", "dog"], True)
    assert scored["accuracy"] == 0.5 and scored["failed_parses"] == 2 and "img_accuracy" not in scored


def test_circular_accuracy():
    # MMBench circular evaluation: right only if every rotation is right.
    assert circular_accuracy(["q1", "q1", "q2", "q2", "q3"], [True, True, True, False, True]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        circular_accuracy(["q1"], [])


def test_box_normalization_to_padded_square_and_back():
    # 100 x 50 padded to 100 x 100 with the image 25 px down (expand2square centers it).
    assert evaluation.normalize_box([0, 0, 100, 50], (100, 50), True) == [0.0, 0.25, 1.0, 0.75]
    assert evaluation.normalize_box([10, 5, 60, 45], (100, 50), False) == [0.1, 0.1, 0.6, 0.9]
    for pad in (True, False):
        box = [3.0, 7.0, 41.0, 29.0]
        normalized = evaluation.normalize_box(box, (45, 31), pad)
        assert evaluation.denormalize_box(normalized, (45, 31), pad) == pytest.approx(box)


def test_rec_scoring_counts_unparsable_as_wrong():
    samples = [evaluation.Sample("1", Path("x.png"), "left circle", [0, 0, 50, 50], image_size=(100, 100)),
               evaluation.Sample("2", Path("x.png"), "right circle", [50, 50, 100, 100], image_size=(100, 100))]
    records, metrics = evaluation.score_task("rec", samples, ["[0.0,0.0,0.5,0.5]", "somewhere"], pad_to_square=True)
    assert metrics["accuracy"] == 0.5 and metrics["unparsable"] == 1
    assert records[0]["iou"] == 1.0 and records[1]["box"] is None


# ---------------------------------------------------------------------------------------------
# Task loaders on tiny files in the public formats
# ---------------------------------------------------------------------------------------------

IMAGE_SIZES = {1: (40, 30), 2: (32, 32), 3: (30, 44), 4: (36, 36)}


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A miniature dataset root in the shapes-world layout (shapes.py): images/, eval/<task>/."""
    root = tmp_path_factory.mktemp("world")
    (root / "images").mkdir()
    for image_id, size in IMAGE_SIZES.items():
        Image.new("RGB", size, (40 * image_id, 90, 160)).save(root / "images" / f"{image_id:012d}.png")

    refer = root / "eval" / "refcoco"
    refer.mkdir(parents=True)
    refs = [{"ref_id": 0, "ann_id": 10, "image_id": 1, "category_id": 1, "split": "val",
             "sentences": [{"sent_id": 100, "sent": "red circle", "tokens": ["red", "circle"]},
                           {"sent_id": 101, "sent": "the left shape", "tokens": ["the", "left", "shape"]}]},
            {"ref_id": 1, "ann_id": 11, "image_id": 3, "category_id": 1, "split": "val",
             "sentences": [{"sent_id": 102, "sent": "blue square", "tokens": ["blue", "square"]}]},
            {"ref_id": 2, "ann_id": 12, "image_id": 2, "category_id": 1, "split": "testA",
             "sentences": [{"sent_id": 103, "sent": "small star", "tokens": ["small", "star"]}]}]
    with open(refer / "refs(unc).p", "wb") as file:
        pickle.dump(refs, file)
    instances = {"images": [{"id": i, "file_name": f"{i:012d}.png", "width": w, "height": h}
                            for i, (w, h) in IMAGE_SIZES.items()],
                 "annotations": [{"id": 10, "image_id": 1, "bbox": [2, 3, 10, 12], "category_id": 1},
                                 {"id": 11, "image_id": 3, "bbox": [5, 5, 20, 30], "category_id": 1},
                                 {"id": 12, "image_id": 2, "bbox": [0, 0, 16, 16], "category_id": 1}],
                 "categories": [{"id": 1, "name": "shape"}]}
    (refer / "instances.json").write_text(json.dumps(instances))
    _write_jsonl(refer / "refcoco_testB.jsonl", [
        {"image": "000000000004.png", "expression": "green star", "bbox": [1, 2, 20, 30], "width": 36, "height": 36}])

    vqa = root / "eval" / "vqa"
    vqa.mkdir()
    questions = [{"question_id": 7, "image_id": 1, "question": "What color is the circle?"},
                 {"question_id": 8, "image_id": 2, "question": "How many shapes?"},
                 {"question_id": 9, "image_id": 3, "question": "Is there a star?"}]
    answers = ["red"] * 8 + ["orange"] * 2
    (vqa / "questions.json").write_text(json.dumps({"questions": questions}))
    (vqa / "annotations.json").write_text(json.dumps({"annotations": [
        {"question_id": q["question_id"], "image_id": q["image_id"], "question_type": question_type,
         "answer_type": answer_type,
         "answers": [{"answer": a, "answer_id": i + 1, "answer_confidence": "yes"} for i, a in enumerate(answers)]}
        for q, question_type, answer_type in zip(questions, ("what color is the", "how many", "what color is the"),
                                                 ("other", "number", "other"))]}))

    captions = root / "eval" / "captions"
    captions.mkdir()
    (captions / "captions.json").write_text(json.dumps({"images": [
        {"filename": f"{i:012d}.png", "imgid": i, "cocoid": 100 + i, "split": "test" if i < 4 else "train",
         "sentences": [{"raw": f"A red circle {i}.", "tokens": ["a", "red", "circle", str(i)]},
                       {"raw": "Some shapes on a plain background.", "tokens": ["some", "shapes"]}]}
        for i in IMAGE_SIZES]}))

    pope = root / "eval" / "pope"
    pope.mkdir()
    for offset, split in enumerate(evaluation.POPE_SPLITS):
        _write_jsonl(pope / f"pope_{split}.jsonl", [
            {"question_id": offset * 10 + i, "image": f"{i:012d}.png", "text": "Is there a circle in the image?",
             "label": "yes" if i % 2 else "no"} for i in (1, 2)])

    mc = root / "eval" / "mc"
    mc.mkdir()
    _write_jsonl(mc / "questions.jsonl", [
        {"question_id": i, "image": f"{i:012d}.png", "question": question,
         "choices": ["circle", "square", "star"], "answer": i % 3}
        for i, question in [(1, "Which shape is the largest one in this picture?"), (2, "Which shape?"),
                            (3, "Which shape is largest?")]])
    return root


def test_refer_pickle_loader(world):
    samples = load_task("refcoco", world, "val")
    assert [s.sample_id for s in samples] == ["100", "101", "102"]  # one sample per sentence
    assert samples[0].target == [2, 3, 12, 15]  # COCO [x, y, w, h] -> [x0, y0, x1, y1]
    assert samples[0].image_size == (40, 30) and samples[0].image == world / "images" / "000000000001.png"
    assert samples[1].text == "the left shape"
    assert [s.sample_id for s in load_task("refcoco", world, "testA")] == ["103"]


def test_refer_jsonl_form_and_refcocog_pickle_name(world, tmp_path):
    with pytest.raises(ValueError, match="no refs in split 'testB'"):  # the pickle, when present, is the source
        load_task("refcoco", world, "testB")
    jsonl_only = tmp_path / "refcoco"
    jsonl_only.mkdir()
    (jsonl_only / "refcoco_testB.jsonl").write_text((world / "eval" / "refcoco" / "refcoco_testB.jsonl").read_text())
    [sample] = load_task("refcoco", world, "testB", annotation_dir=jsonl_only)
    assert sample.text == "green star" and sample.target == [1, 2, 20, 30] and sample.image_size == (36, 36)
    with pytest.raises(FileNotFoundError, match=r"refs\(umd\)\.p"):
        load_task("refcocog", world, "val", annotation_dir=world / "eval" / "refcoco")


def test_vqa_loader_with_image_template(world):
    samples = load_task("vqa", world, "val", image_template="{image_id:012d}.png")
    assert [s.sample_id for s in samples] == ["7", "8", "9"]
    assert len(samples[0].target) == 10 and samples[1].image.name == "000000000002.png"
    coco = load_task("vqa", world, "val")  # COCO's default template
    assert coco[0].image.name == "COCO_val2014_000000000001.jpg"


def test_caption_loader_filters_split(world):
    samples = load_task("captions", world, "test")
    assert [s.sample_id for s in samples] == ["101", "102", "103"]
    assert samples[0].target == ["A red circle 1.", "Some shapes on a plain background."]


def test_pope_loader_reads_all_splits(world):
    samples = load_task("pope", world, "all")
    assert [s.group for s in samples] == ["random"] * 2 + ["popular"] * 2 + ["adversarial"] * 2
    assert [s.target for s in load_task("pope", world, "popular")] == ["yes", "no"]


def test_multiple_choice_loader(world):
    samples = load_task("mc", world, "test")
    assert samples[0].choices == ["circle", "square", "star"] and samples[0].target == 1


def test_malformed_jsonl_line_is_named(world, tmp_path):
    good = json.dumps({"question_id": 1, "image": "x.png", "text": "Is there a dog?", "label": "no"})
    (tmp_path / "pope_random.jsonl").write_text(good + "\n\n" + '{"question_id": 2, "image": \n')
    with pytest.raises(ValueError, match=r"pope_random\.jsonl, line 3: malformed JSON"):
        load_task("pope", world, "random", annotation_dir=tmp_path)
    (tmp_path / "pope_random.jsonl").write_text(good + "\n" + json.dumps({"question_id": 2, "image": "x.png"}) + "\n")
    with pytest.raises(ValueError, match=r"line 2: missing key\(s\) text, label"):
        load_task("pope", world, "random", annotation_dir=tmp_path)
    (tmp_path / "pope_random.jsonl").write_text(good.replace('"no"', '"maybe"') + "\n")
    with pytest.raises(ValueError, match="line 1: label must be yes or no"):
        load_task("pope", world, "random", annotation_dir=tmp_path)


def test_missing_annotation_file_is_named(world, tmp_path):
    with pytest.raises(FileNotFoundError, match="questions.json"):
        load_task("vqa", tmp_path, "val")
    with pytest.raises(FileNotFoundError, match=r"refs\(unc\)\.p"):
        load_task("refcoco", tmp_path, "val")
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps([]))
    with pytest.raises(FileNotFoundError, match="instances.json"):
        load_task("refcoco", tmp_path, "val", annotation_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="pope_adversarial.jsonl"):
        load_task("pope", world, "adversarial", annotation_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown task"):
        load_task("coco", world, "val")


# ---------------------------------------------------------------------------------------------
# End to end on a tiny random MLLM
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    model_module = pytest.importorskip("model")
    from shapes import SPECIAL_TOKENS, train_tokenizer
    from vision import VisionConfig
    torch.manual_seed(0)
    tokenizer = train_tokenizer(["A chat between a curious user and an assistant. USER: ASSISTANT:",
                                 "What color is the red circle? Answer the question using a single word."] * 5)
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    text = model_module.TextConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512, bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
                                   pad_token_id=ids["<pad>"])
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=28, patch_size=14)
    config = model_module.MLLMConfig(vision_config=vision, text_config=text, image_token_index=ids["<image>"],
                                     pad_token_id=ids["<pad>"])
    return model_module.MLLM(config).eval(), tokenizer


VQA_TEMPLATE = "{image_id:012d}.png"


@pytest.mark.parametrize("task, split", [("refcoco", "val"), ("vqa", "val"), ("captions", "test"), ("pope", "all"),
                                         ("mc", "test"), ("mc-rank", "test")])
def test_run_eval_end_to_end(tiny_model, world, tmp_path, task, split):
    model, tokenizer = tiny_model
    metrics = evaluation.run_eval(model, tokenizer, task, world, split, batch_size=2, limit=6, out_dir=tmp_path,
                                  image_template=VQA_TEMPLATE, max_new_tokens=6, progress=False)
    records = [json.loads(line) for line in (tmp_path / f"{task}_{split}.predictions.jsonl").read_text().splitlines()]
    saved = json.loads((tmp_path / f"{task}_{split}.metrics.json").read_text())
    assert len(records) == metrics["samples"] == min(6, len(load_task(task, world, split, image_template=VQA_TEMPLATE)))
    assert saved["metrics"] == pytest.approx(metrics)
    counts = ("samples", "unparsable", "failed_parses", "samples_per_second")
    scores = [value for name, value in metrics.items() if name not in counts]
    assert scores and all(0.0 <= value <= (10.0 if task == "captions" else 1.0) for value in scores)
    assert all(isinstance(record["prediction"], str) for record in records)



def test_vqa_accuracy_per_question_and_answer_type(world):
    # vqaEval.py reports accuracy['perQuestionType'] and accuracy['perAnswerType'] beside 'overall'.
    samples = load_task("vqa", world, "val", image_template=VQA_TEMPLATE)
    assert [s.group for s in samples] == ["what color is the", "how many", "what color is the"]
    assert [s.answer_type for s in samples] == ["other", "number", "other"]
    records, metrics = evaluation.score_task("vqa", samples, ["Red.", "red", "orange"], pad_to_square=True)
    assert metrics["accuracy"] == pytest.approx((1.0 + 1.0 + 0.6) / 3)
    assert metrics["accuracy[what color is the]"] == pytest.approx(0.8)
    assert metrics["accuracy[how many]"] == pytest.approx(1.0)
    assert metrics["accuracy[answer_type=other]"] == pytest.approx(0.8)
    assert metrics["accuracy[answer_type=number]"] == pytest.approx(1.0)
    assert records[0]["prediction"] == "Red." and records[0]["submitted"] == "red"  # what LLaVA would upload


def test_vqa_scores_the_processed_prediction_as_the_server_does():
    # Ten identical answers written unnormalized ("Two"): vqaEval.py compares them as written, and
    # LLaVA's upload is evalai_answer("Two") == "2", so the server scores 0.
    sample = evaluation.Sample("1", Path("x.png"), "How many?", ["Two"] * 10)
    records, metrics = evaluation.score_task("vqa", [sample], ["Two"], pad_to_square=True)
    assert records[0]["submitted"] == "2" and metrics["accuracy"] == 0.0


def test_batch_size_does_not_change_answers_or_their_order(tiny_model, world, tmp_path):
    # The loop batches questions sorted by length (question 1 is the longest, so it is asked
    # last) and must write the results back in the file's order. Candidate log-likelihoods are
    # distinct floats, so a shuffled write-back cannot go unnoticed.
    model, tokenizer = tiny_model
    written = {}
    for batch_size in (1, 2):
        evaluation.run_eval(model, tokenizer, "mc-rank", world, "test", batch_size=batch_size, out_dir=tmp_path / str(batch_size),
                            progress=False, print_results=False)
        lines = (tmp_path / str(batch_size) / "mc-rank_test.predictions.jsonl").read_text().splitlines()
        written[batch_size] = [json.loads(line) for line in lines]
    assert [record["id"] for record in written[2]] == ["1", "2", "3"]
    style = evaluation.PROMPT_STYLES["llava15"]
    evaluator = evaluation.Evaluator(model, tokenizer, style)
    for batch_size, records in written.items():
        for record, sample in zip(records, load_task("mc", world, "test")):
            [alone] = evaluator.rank_choices([sample], [[(evaluation.user_message("rank", sample, style), None)]])
            assert record["log_likelihoods"] == pytest.approx(alone, abs=1e-4)


def test_batched_generation_matches_one_by_one(tiny_model, world):
    model, tokenizer = tiny_model
    style = evaluation.PROMPT_STYLES["llava15"]
    samples = load_task("vqa", world, "val", image_template=VQA_TEMPLATE)
    # Prompts of different lengths, so the batch really is left-padded.
    samples[1].text = "How many shapes are there in this picture, counting all of them?"
    evaluator = evaluation.Evaluator(model, tokenizer, style)
    dialogues = [[(evaluation.user_message("vqa", s, style), None)] for s in samples]
    batched = evaluator.generate(samples, dialogues, max_new_tokens=5)
    single = [evaluator.generate([s], [d], max_new_tokens=5)[0] for s, d in zip(samples, dialogues)]
    assert batched == single


def test_rank_scores_are_candidate_log_likelihoods(tiny_model, world):
    model, tokenizer = tiny_model
    style = evaluation.PROMPT_STYLES["llava15"]
    evaluator = evaluation.Evaluator(model, tokenizer, style)
    samples = load_task("mc", world, "test")
    dialogues = [[(evaluation.user_message("rank", s, style), None)] for s in samples]
    batched = evaluator.rank_choices(samples, dialogues)
    sample, dialogue = samples[0], dialogues[0]
    for choice, score in zip(sample.choices, batched[0]):
        ids, labels = evaluator.encode_dialogue(dialogue, choice)
        pixel_values = evaluator.image_inputs([sample])["pixel_values"]
        with torch.no_grad():
            _, mean_loss = model(torch.tensor([ids]), pixel_values=pixel_values, labels=torch.tensor([labels]))
        answer_tokens = sum(label != evaluation.IGNORE_INDEX for label in labels)
        assert answer_tokens >= 2  # the candidate and the end of the turn
        assert score == pytest.approx(-mean_loss.item() * answer_tokens, rel=1e-4, abs=1e-4)


def test_describe_first_puts_the_description_in_the_dialogue(tiny_model, world, tmp_path):
    model, tokenizer = tiny_model
    evaluation.run_eval(model, tokenizer, "vqa", world, "val", batch_size=3, limit=2, out_dir=tmp_path,
                        image_template=VQA_TEMPLATE, describe_first=True, describe_max_new_tokens=4,
                        max_new_tokens=3, progress=False, print_results=False)
    records = [json.loads(line) for line in (tmp_path / "vqa_val.predictions.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all("description" in record for record in records)
    evaluator = evaluation.Evaluator(model, tokenizer, evaluation.PROMPT_STYLES["llava15"])
    with_history, _ = evaluator.encode_dialogue([("Describe the image in detail.", "a red circle"), ("Q?", None)], None)
    assert tokenizer.decode(with_history).count("ASSISTANT:") == 2


@pytest.mark.parametrize("style", ["instructblip", "lynx", "llava"])
def test_other_prompt_styles_run(tiny_model, world, tmp_path, style):
    model, tokenizer = tiny_model
    metrics = evaluation.run_eval(model, tokenizer, "pope", world, "random", limit=2, prompt_style=style,
                                  max_new_tokens=3, progress=False, print_results=False)
    assert 0.0 <= metrics["f1"] <= 1.0
    evaluator = evaluation.Evaluator(model, tokenizer, evaluation.PROMPT_STYLES[style])
    ids, _ = evaluator.encode_dialogue([("Is there a dog?", None)], None)
    assert ids.count(model.config.image_token_index) == model.num_image_tokens


def test_visualize_blind_and_decoding_options(tiny_model, world, tmp_path):
    model, tokenizer = tiny_model
    metrics = evaluation.run_eval(model, tokenizer, "refcoco", world, "val", limit=3, out_dir=tmp_path, visualize=2,
                                  blind=True, num_beams=2, no_repeat_ngram_size=2, max_new_tokens=4,
                                  stop_strings=["]"], progress=False, print_results=False)
    assert metrics["unparsable"] + metrics["accuracy"] * 3 <= 3
    pictures = sorted((tmp_path / "refcoco_val_boxes").glob("*.png"))
    assert len(pictures) == 2
    assert min(Image.open(pictures[0]).size) >= 384  # drawn at a size a person reads, the text below the image


def test_missing_image_is_named_before_generation(tiny_model, world, tmp_path):
    model, tokenizer = tiny_model
    with pytest.raises(FileNotFoundError, match="COCO_val2014_000000000001.jpg"):
        evaluation.run_eval(model, tokenizer, "vqa", world, "val", progress=False)


def test_odd_answers_never_crash():
    for prediction in ["", "\n\n", "[[[[", "ASSISTANT: </s>", "🙂" * 40]:
        for kind, target, choices in [("vqa", ["red"] * 10, []), ("rec", [0, 0, 5, 5], []), ("pope", "yes", []),
                                      ("choice", 0, ["a", "b"]), ("caption", ["a red circle"], [])]:
            sample = evaluation.Sample("1", Path("x.png"), "q", target, choices=choices, image_size=(10, 10), group="random")
            _, metrics = evaluation.score_task(kind, [sample], [prediction], pad_to_square=True)
            assert all(math.isfinite(value) for value in metrics.values())


def test_command_line_on_a_saved_checkpoint(tiny_model, world, tmp_path, capsys):
    model, tokenizer = tiny_model
    model.save_pretrained(str(tmp_path / "ckpt"))
    tokenizer.save(str(tmp_path / "ckpt" / "tokenizer.json"))
    metrics = evaluation.main(["--task", "refcoco", "--ckpt", str(tmp_path / "ckpt"), "--data", str(world),
                               "--out", str(tmp_path / "out"), "--limit", "2", "--max-new-tokens", "3",
                               "--num-beams", "2", "--device", "cpu", "--visualize", "1"])
    assert metrics["samples"] == 2 and (tmp_path / "out" / "refcoco_val.metrics.json").is_file()
    assert "| refcoco | val | accuracy |" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# ScienceQA text-only questions, MMBench hints and circular evaluation, official token caps
# ---------------------------------------------------------------------------------------------

@pytest.fixture()
def mixed_mc(world, tmp_path) -> Path:
    """Multiple choice with text-only questions among image ones (ScienceQA) and hints (MMBench)."""
    _write_jsonl(tmp_path / "questions.jsonl", [
        {"question_id": 1, "image": "000000000001.png", "question": "Which shape?", "choices": ["circle", "square"],
         "answer": 0},
        {"question_id": 2, "question": "Which of these is a mammal that lives in the sea?",
         "choices": ["whale", "trout", "crab"], "answer": 0, "hint": "Mammals breathe air."},
        {"question_id": 3, "image": "000000000002.png", "question": "Which color?", "choices": ["red", "blue", "green"],
         "answer": 2, "hint": "nan"},
        {"question_id": 4, "question": "Which is a number?", "choices": ["seven", "blue"], "answer": 0, "hint": None}])
    return tmp_path


def _load_mixed(world: Path, mixed_mc: Path) -> list:
    return load_task("mc", world, "test", annotation_dir=mixed_mc)


def test_text_only_questions_and_hints_load(world, mixed_mc):
    samples = _load_mixed(world, mixed_mc)
    assert [s.image is None for s in samples] == [False, True, False, True]
    # model_vqa_mmbench.py: `if not is_none(hint): question = hint + '\n' + question`
    # (is_none: None, a NaN float, "nan" or "none" in any case).
    assert samples[1].text == "Mammals breathe air.\nWhich of these is a mammal that lives in the sea?"
    assert [samples[i].text for i in (0, 2, 3)] == ["Which shape?", "Which color?", "Which is a number?"]
    assert evaluation.question_with_hint("Q?", float("nan")) == "Q?" == evaluation.question_with_hint("Q?", "None")


@pytest.mark.parametrize("style", ["llava15", "instructblip"])
def test_text_only_prompts_have_no_image_tokens(tiny_model, style):
    # model_vqa_science.py: `if 'image' in line:` prepends DEFAULT_IMAGE_TOKEN; else `images = None`.
    model, tokenizer = tiny_model
    evaluator = evaluation.Evaluator(model, tokenizer, evaluation.PROMPT_STYLES[style])
    with_image, _ = evaluator.encode_dialogue([("Which?", None)], None)
    text_only, _ = evaluator.encode_dialogue([("Which?", None)], None, image_tokens=0)
    assert with_image.count(model.config.image_token_index) == model.num_image_tokens
    assert model.config.image_token_index not in text_only
    assert len(with_image) - len(text_only) >= model.num_image_tokens


def test_mixed_batches_match_one_by_one(tiny_model, world, mixed_mc):
    model, tokenizer = tiny_model
    style = evaluation.PROMPT_STYLES["llava15"]
    evaluator = evaluation.Evaluator(model, tokenizer, style)
    samples = _load_mixed(world, mixed_mc)
    assert evaluator.image_inputs(samples)["pixel_values"].shape[0] == 2  # images of the questions that have one
    assert evaluator.image_inputs([samples[1], samples[3]]) == {}
    for kind in ("choice", "rank"):
        dialogues = [[(evaluation.user_message(kind, s, style), None)] for s in samples]
        if kind == "choice":
            batched = evaluator.generate(samples, dialogues, max_new_tokens=4)
            single = [evaluator.generate([s], [d], max_new_tokens=4)[0] for s, d in zip(samples, dialogues)]
            assert batched == single
        else:
            batched = evaluator.rank_choices(samples, dialogues)
            for scores, sample, dialogue in zip(batched, samples, dialogues):
                assert scores == pytest.approx(evaluator.rank_choices([sample], [dialogue])[0], abs=1e-4)


@pytest.mark.parametrize("task", ["mc", "mc-rank"])
def test_run_eval_on_text_only_and_circular(tiny_model, world, mixed_mc, tmp_path, task):
    model, tokenizer = tiny_model
    common = dict(annotation_dir=mixed_mc, batch_size=3, max_new_tokens=3, progress=False, print_results=False)
    plain = evaluation.run_eval(model, tokenizer, task, world, "test", out_dir=tmp_path / "plain", **common)
    lines = (tmp_path / "plain" / f"{task}_test.predictions.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert plain["samples"] == 4 and [r["image"] is None for r in records] == [False, True, False, True]
    # eval_science_qa.py: IMG-Accuracy over the questions whose prompt holds '<image>'.
    right = [r["chosen"] == r["answer"] for r in records]
    assert plain["img_accuracy"] == (right[0] + right[2]) / 2 and plain["accuracy"] == sum(right) / 4
    if task == "mc-rank":  # each option is scored on its own text: rotating its letter changes nothing
        with pytest.raises(ValueError, match="circular"):
            evaluation.run_eval(model, tokenizer, task, world, "test", circular=True, **common)
        return
    circular = evaluation.run_eval(model, tokenizer, task, world, "test", out_dir=tmp_path / "circular", circular=True,
                                   blind=True, **common)
    assert circular["samples"] == 2 + 3 + 3 + 2 and circular["questions"] == 4
    rotations = [json.loads(line) for line in
                 (tmp_path / "circular" / f"{task}_test.predictions.jsonl").read_text().splitlines()]
    right_every_time = {}
    for record in rotations:
        question = record["id"].rsplit("/", 1)[0]
        right_every_time[question] = right_every_time.get(question, True) and record["chosen"] == record["answer"]
    assert circular["circular_accuracy"] == sum(right_every_time.values()) / 4
    assert circular["accuracy"] == sum(r["chosen"] == r["answer"] for r in rotations) / 10
    saved = json.loads((tmp_path / "circular" / f"{task}_test.metrics.json").read_text())
    assert saved["circular"] is True and saved["metrics"] == pytest.approx(circular)


def test_rotations_and_circular_scoring():
    # model_vqa_mmbench.py --all-rounds: `options = options[1:] + options[:1]` after each round,
    # lettered A, B, ... afresh.
    sample = evaluation.Sample("7", None, "Which?", 2, choices=["cat", "dog", "bird"])
    rotated = evaluation.rotate_choices([sample])
    assert [r.choices for r in rotated] == [["cat", "dog", "bird"], ["dog", "bird", "cat"], ["bird", "cat", "dog"]]
    assert [r.target for r in rotated] == [2, 1, 0] and {r.rotation_of for r in rotated} == {"7"}
    assert [r.sample_id for r in rotated] == ["7/0", "7/1", "7/2"]
    other = evaluation.rotate_choices([evaluation.Sample("8", None, "Which?", 0, choices=["red", "blue"])])
    _, scored = evaluation.score_task("choice", rotated + other, ["C", "B", "A", "A", "A"], True, circular=True)
    assert scored["accuracy"] == pytest.approx(4 / 5)
    assert scored["circular_accuracy"] == 0.5 and scored["questions"] == 2


def test_circular_is_for_multiple_choice_only(tiny_model, world):
    model, tokenizer = tiny_model
    with pytest.raises(ValueError, match="circular"):
        evaluation.run_eval(model, tokenizer, "pope", world, "random", circular=True, progress=False)


def test_official_token_caps_and_the_shapes_configs_own(tiny_model, world, tmp_path):
    # model_vqa_loader.py: --max_new_tokens default 128 (vqav2.sh, pope.sh); a caller's own cap wins.
    model, tokenizer = tiny_model
    common = dict(limit=1, progress=False, print_results=False)
    evaluation.run_eval(model, tokenizer, "pope", world, "random", out_dir=tmp_path / "default", **common)
    evaluation.run_eval(model, tokenizer, "pope", world, "random", out_dir=tmp_path / "own", max_new_tokens=2, **common)
    caps = [json.loads((tmp_path / run / "pope_random.metrics.json").read_text())["decoding"]["max_new_tokens"]
            for run in ("default", "own")]
    assert caps == [128, 2]
    import train
    root = Path(__file__).resolve().parent.parent
    for name in ("shapes_llava15.py", "shapes_llava.py"):
        config, _ = train.load_config(str(root / "configs" / name), [])
        caps = {task["task"]: task["max_new_tokens"] for task in config.eval_tasks}
        assert caps == {"vqa": 16, "refcoco": 48, "pope": 8, "captions": 40}, name  # the main job's caps


def test_describe_first_describes_only_questions_with_an_image(tiny_model, world, mixed_mc):
    model, tokenizer = tiny_model
    style = evaluation.PROMPT_STYLES["lynx"]
    evaluator = evaluation.Evaluator(model, tokenizer, style)
    asked = []
    generate = evaluator.generate

    def recording_generate(samples, dialogues, **decoding):
        asked.extend((sample.sample_id, len(dialogue)) for sample, dialogue in zip(samples, dialogues))
        return generate(samples, dialogues, **decoding)

    evaluator.generate = recording_generate
    samples = _load_mixed(world, mixed_mc)
    _, descriptions, _ = evaluation.answer_samples(evaluator, "choice", samples, 4, True, 3, None, max_new_tokens=2)
    # Each image question: one description (a one-turn dialogue), then the question after it (two turns).
    assert sorted(asked) == [("1", 1), ("1", 2), ("2", 1), ("3", 1), ("3", 2), ("4", 1)]
    assert descriptions[1] == descriptions[3] == ""


@pytest.fixture(scope="module")
def tiny_flan_t5_model(tiny_model):
    """BLIP-2-FlanT5 in miniature, on tiny_model's tokenizer and tower: queries + prompt into a T5
    encoder, the answer from its decoder."""
    from connectors import QFormerConfig
    from model import MLLM, MLLMConfig, T5Config
    llava, tokenizer = tiny_model
    torch.manual_seed(1)
    ids = {token: tokenizer.token_to_id(token) for token in ("<pad>", "</s>", "<image>")}
    config = MLLMConfig(
        vision_config=llava.config.vision_config, projector_type="qformer", num_query_tokens=3,
        qformer_config=QFormerConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                                     encoder_hidden_size=32),
        text_config=T5Config(vocab_size=tokenizer.get_vocab_size(), d_model=32, d_kv=8, d_ff=48, num_layers=2,
                             num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                             pad_token_id=ids["<pad>"], decoder_start_token_id=ids["<pad>"], eos_token_id=ids["</s>"]),
        image_token_index=ids["<image>"], pad_token_id=ids["<pad>"], vision_feature_layer=-1,
        vision_feature_select_strategy="full")
    return MLLM(config).eval(), tokenizer


@pytest.mark.parametrize("style", ["llava15", "instructblip"])
def test_an_encoder_decoder_is_asked_and_scored_as_it_trains(tiny_flan_t5_model, world, style):
    """T5's prompt has no BOS and goes to the encoder; a candidate's score is the decoder's
    log-likelihood of it (the loss model() reports, times its tokens); batched equals one by one."""
    model, tokenizer = tiny_flan_t5_model
    prompt_style = evaluation.PROMPT_STYLES[style]
    evaluator = evaluation.Evaluator(model, tokenizer, prompt_style)
    samples = load_task("mc", world, "test")[:3]
    dialogues = [[(evaluation.user_message("rank", s, prompt_style), None)] for s in samples]
    prompt, _ = evaluator.encode_dialogue(dialogues[0], None)
    assert tokenizer.token_to_id("<s>") not in prompt and prompt.count(model.config.image_token_index) == 3
    batched = evaluator.rank_choices(samples, dialogues)
    for choice, score in zip(samples[0].choices, batched[0]):
        ids, labels = evaluator.encode_dialogue(dialogues[0], choice)
        encoder_ids, target = conversation.split_for_encoder_decoder(ids, labels, tokenizer.token_to_id("</s>"))
        with torch.no_grad():
            _, mean_loss = model(torch.tensor([encoder_ids]), pixel_values=evaluator.image_inputs(samples[:1])["pixel_values"],
                                 labels=torch.tensor([target]))
        assert score == pytest.approx(-mean_loss.item() * len(target), rel=1e-4, abs=1e-4)
    answers = evaluator.generate(samples, dialogues, max_new_tokens=4)
    assert answers == [evaluator.generate([s], [d], max_new_tokens=4)[0] for s, d in zip(samples, dialogues)]


def test_lion_tags_go_into_the_prompt_and_rec_runs_the_router_at_region_level(tiny_model, world, tmp_path,
                                                                              monkeypatch):
    """With a tags file, each image's question starts with LION's tag sentence (plain words as
    hint for a model without a soft prompt), and model.generate gets the task level: region for
    REC, image for the rest."""
    model, tokenizer = tiny_model
    tags_path = tmp_path / "tags.json"
    tags_path.write_text(json.dumps({f"{image_id:012d}.png": {"tags": ["red circle"]} for image_id in IMAGE_SIZES}))
    seen = []
    original_generate = model.generate

    def recording_generate(input_ids, *args, task_level=None, **kwargs):
        seen.append((tokenizer.decode(input_ids[0].tolist()), task_level))
        return original_generate(input_ids, *args, task_level=task_level, **kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    for task, split in (("refcoco", "val"), ("vqa", "val")):
        evaluation.run_eval(model, tokenizer, task, world, split, batch_size=2, limit=2, image_template=VQA_TEMPLATE,
                            max_new_tokens=2, progress=False, print_results=False, tags=str(tags_path))
    assert [level for _, level in seen] == [0, 1]
    sentence = conversation.tag_sentence(["red circle"], conversation.PLAIN_HINT)
    assert all(sentence.strip() in prompt for prompt, _ in seen)
    with pytest.raises(ValueError, match="no entry for image"):
        tags_path.write_text(json.dumps({"other.png": {"tags": []}}))
        evaluation.run_eval(model, tokenizer, "vqa", world, "val", limit=1, image_template=VQA_TEMPLATE,
                            max_new_tokens=2, progress=False, print_results=False, tags=str(tags_path))
