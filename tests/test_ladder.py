"""The main job's ladder: the oracle-text rung (each image replaced by its scene written out, in
training and in eval) and results.json's blind / image / oracle_text comparison."""
import json
import re
from pathlib import Path

import pytest

import data
import eval as evaluation
import shapes
import train
from conftest import tiny_mllm_config
from conversation import IMAGE_PLACEHOLDER, read_oracle_objects
from metrics import vision_ladder
from model import MLLM


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return shapes.build_world(tmp_path_factory.mktemp("world"), seed=0, num_train_images=24, num_eval_images=6)


def test_the_scene_text_writes_boxes_as_the_rec_answers_do(world):
    tags = json.loads((world / "tags.json").read_text())
    records = json.loads((world / "train" / "instruct.json").read_text())
    answers = 0
    for record in records:
        turns = record["conversations"]
        for question, reply in zip(turns[::2], turns[1::2]):
            if question["value"].replace(IMAGE_PLACEHOLDER + "\n", "").startswith(data.REC_PROMPT):
                assert reply["value"] in {o["box_text"] for o in tags[record["image"]]["objects"]}
                answers += 1
    assert answers > 10
    scene = read_oracle_objects(str(world / "tags.json"))[records[0]["image"]]
    objects = tags[records[0]["image"]]["objects"]
    assert scene == "Objects: " + "; ".join(f"{o['name']} {o['box_text']}" for o in objects) + ".\n"


def test_the_oracle_dataset_reads_the_scene_where_the_image_was(world):
    tokenizer = data.load_tokenizer(str(world / "tokenizer.json"))
    model = MLLM(tiny_mllm_config(tokenizer))
    scenes = read_oracle_objects(str(world / "tags.json"))
    stage = train.StageConfig(name="s", data=str(world / "train" / "instruct.json"), image_folder=str(world / "images"),
                              max_seq_len=512)
    config = train.TrainConfig(tokenizer=str(world / "tokenizer.json"))
    plain = train.build_dataset(stage, config, model, tokenizer)
    oracle = train.build_dataset(train.StageConfig(**{**vars(stage), "oracle_text": str(world / "tags.json")}), config,
                                 model, tokenizer)
    assert len(oracle) == len(plain) and not any(oracle.has_image) and any(plain.has_image)
    record = json.loads((world / "train" / "instruct.json").read_text())[0]
    sample = oracle[0]
    assert sample["pixel_values"] is None and model.config.image_token_index not in sample["input_ids"]
    text = tokenizer.decode(sample["input_ids"].tolist(), skip_special_tokens=False)
    assert scenes[record["image"]].strip() in text
    # The same answers are supervised.
    supervised = [tokenizer.decode(s["input_ids"][s["labels"] != -100].tolist()) for s in (plain[0], sample)]
    assert supervised[0] == supervised[1]


def test_the_oracle_eval_asks_with_the_scene_and_no_image(world, monkeypatch):
    tokenizer = data.load_tokenizer(str(world / "tokenizer.json"))
    model = MLLM(tiny_mllm_config(tokenizer)).eval()
    scenes = read_oracle_objects(str(world / "tags.json"))
    asked = []
    original = MLLM.generate

    def recording_generate(self, input_ids, pixel_values=None, *args, **kwargs):
        asked.append((input_ids, pixel_values))
        return original(self, input_ids, pixel_values, *args, **kwargs)

    monkeypatch.setattr(MLLM, "generate", recording_generate)
    metrics = evaluation.run_eval(model, tokenizer, "refcoco", world, limit=3, max_new_tokens=4, progress=False,
                                  print_results=False, oracle_text=str(world / "tags.json"))
    assert "accuracy" in metrics and asked
    for input_ids, pixel_values in asked:
        assert pixel_values is None and not (input_ids == model.config.image_token_index).any()
    prompt = tokenizer.decode(asked[0][0][0].tolist(), skip_special_tokens=True)
    assert re.search(r"Objects: .*\]\.\s", prompt) and any(scene.strip() in prompt for scene in scenes.values())
    with pytest.raises(ValueError, match="has no objects for image"):
        (world / "empty.json").write_text("{}")
        evaluation.run_eval(model, tokenizer, "refcoco", world, limit=1, oracle_text=str(world / "empty.json"))


def test_the_ladder_says_how_much_of_the_gap_vision_closes():
    results = {"vqa_accuracy": 0.6, "pope_f1": 0.7, "cider": 1.0, "wall_seconds": 900.0,
               "blind": {"vqa_accuracy": 0.4, "pope_f1": 0.7, "cider": 0.2}, "tasks": {}}
    oracle = {"vqa_accuracy": 0.9, "pope_f1": 0.7, "cider": 2.2}
    rungs = vision_ladder(results, oracle)
    assert set(rungs) == {"vqa_accuracy", "pope_f1", "cider"}
    assert rungs["vqa_accuracy"] == {"blind": 0.4, "image": 0.6, "oracle_text": 0.9, "vision_gap_closed": pytest.approx(0.4)}
    assert rungs["cider"]["vision_gap_closed"] == pytest.approx(0.4)
    assert "vision_gap_closed" not in rungs["pope_f1"]  # the oracle adds nothing: no gap to close
    assert vision_ladder(results, None)["vqa_accuracy"] == {"blind": 0.4, "image": 0.6, "oracle_text": None}
