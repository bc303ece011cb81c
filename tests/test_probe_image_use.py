"""probe_image_use.py: the answer loss matches the model's own loss, differs between images for a
model that reads them, and is the same under every image for one that cannot."""
import json
from pathlib import Path

import pytest
import torch

import data
import probe_image_use
import shapes
from conftest import tiny_mllm_config
from model import MLLM


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return shapes.build_world(tmp_path_factory.mktemp("world"), seed=0, num_train_images=16, num_eval_images=4)


def tiny_model_and_dataset(world: Path, json_path: Path) -> tuple[MLLM, data.InstructionDataset]:
    tokenizer = data.load_tokenizer(str(world / "tokenizer.json"))
    torch.manual_seed(0)
    config = tiny_mllm_config(tokenizer)
    model = MLLM(config)
    dataset = data.InstructionDataset(str(json_path), str(world / "images"), tokenizer, "vicuna_v1",
                                      config.image_token_index, model.num_image_tokens, 32, True, 512)
    return model, dataset


def test_own_image_loss_is_the_models_loss_and_images_matter(world, tmp_path):
    records = [r for r in json.loads((world / "train" / "instruct.json").read_text()) if r["id"].endswith("_vqa")]
    path = tmp_path / "vqa.json"
    path.write_text(json.dumps(records[:8]))
    model, dataset = tiny_model_and_dataset(world, path)
    results = probe_image_use.image_use(model, dataset, num_samples=8, batch_size=8)
    assert list(results) == ["vqa"]
    batch = data.collate([dataset[i] for i in range(8)], model.config.pad_token_id)
    with torch.no_grad():
        expected = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], labels=batch["labels"])[1]
    assert results["vqa"]["own image"] == pytest.approx(float(expected), rel=1e-5)
    losses = results["vqa"]
    assert abs(losses["own image"] - losses["zeros"]) > 1e-4
    assert abs(losses["own image"] - losses["another sample's image"]) > 1e-6


def test_a_model_blind_to_its_image_scores_every_image_alike(world):
    model, dataset = tiny_model_and_dataset(world, world / "train" / "instruct.json")
    with torch.no_grad():  # the connector's output no longer depends on the pixels
        model.multi_modal_projector.linear_2.weight.zero_()
    results = probe_image_use.image_use(model, dataset, num_samples=12, batch_size=4)
    assert {"vqa", "grounding"} <= set(results)
    for kind, losses in results.items():
        assert losses["own image"] == pytest.approx(losses["zeros"], abs=1e-5), kind
        assert losses["own image"] == pytest.approx(losses["another sample's image"], abs=1e-5), kind


def test_sample_kind():
    assert probe_image_use.sample_kind("000000000012_grounding") == "grounding"
    assert probe_image_use.sample_kind("text_000003") == "all"
