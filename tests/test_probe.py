"""probe.py. vision: the linear probe separates what is linearly there from what is not, and the
object features line up with the scenes' objects. image-use: the answer loss matches the model's
own loss, differs between images for a model that reads them, and is the same under every image
for one that cannot. lookup: the idealized task's answers, decoded independently. text-binding:
the documents answer POPE's question right and are balanced, and the accuracy reads each row's
own last position through the padding. text-loss: the LLM's own loss, through the padding of a
batch, from an MLLM checkpoint or its LLM's."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import probe
import shapes
from conftest import tiny_mllm_config
from conversation import BOS_TOKEN
from model import MLLM, LanguageModel, TextConfig
from vision import VisionConfig, VisionTransformer

NUM_TRAIN, NUM_HELDOUT = 60, 200


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return shapes.build_world(tmp_path_factory.mktemp("world"), seed=0, num_train_images=16, num_eval_images=4)


@pytest.fixture(scope="module")
def tokenizer(world):
    return data.load_tokenizer(str(world / "tokenizer.json"))


# vision

def test_linear_probe_reads_encoded_labels_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (600,), generator=generator)
    noise = torch.randn(600, 16, generator=generator)
    encoded = torch.cat([torch.nn.functional.one_hot(labels, 5).float(), noise], dim=1)
    accuracy, majority = probe.linear_probe_accuracy(encoded, labels)
    assert accuracy > 0.95 and majority < 0.35
    accuracy, _ = probe.linear_probe_accuracy(noise, labels)
    assert accuracy < 0.4


def test_object_features_follow_the_scenes_objects():
    tower = VisionTransformer(VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8))
    scenes = [shapes.sample_scene(0, "train", index, index + 1, 48) for index in range(3)]
    features, labels = probe.object_features(tower, scenes, layer=-2, batch_size=2)
    objects = [obj for scene in scenes for obj in scene.objects]
    assert features.shape == (len(objects), 32) and torch.isfinite(features).all()
    assert [shapes.SHAPES[i] for i in labels["shape"]] == [obj.shape for obj in objects]
    assert [shapes.COLORS[i] for i in labels["color"]] == [obj.color for obj in objects]


# image-use

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
    results = probe.image_use(model, dataset, num_samples=8, batch_size=8)
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
    results = probe.image_use(model, dataset, num_samples=12, batch_size=4)
    assert {"vqa", "grounding"} <= set(results)
    for kind, losses in results.items():
        assert losses["own image"] == pytest.approx(losses["zeros"], abs=1e-5), kind
        assert losses["own image"] == pytest.approx(losses["another sample's image"], abs=1e-5), kind


def test_another_image_is_another_file():
    assert probe.rows_of_other_images(["a", "a", "a", "b", "c", "c"]) == [3, 3, 3, 4, 0, 0]
    assert probe.rows_of_other_images(["a", "a"]) == [0, 1]


def test_sample_kind():
    assert probe.sample_kind("000000000012_grounding") == "grounding"
    assert probe.sample_kind("text_000003") == "all"


# text-binding

@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("text_binding")
    probe.write_documents(out_dir, num_train=NUM_TRAIN, num_heldout=NUM_HELDOUT, num_questions=4)
    return out_dir


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_answers_are_right_and_balanced(documents):
    heldout = read_jsonl(documents / "heldout.jsonl")
    assert len(heldout) == NUM_HELDOUT and len(read_jsonl(documents / "train.jsonl")) == NUM_TRAIN
    for index, row in enumerate(heldout):
        scene = shapes.sample_scene(0, "eval", index, index + 1, shapes.DEFAULT_IMAGE_SIZE)
        category = row["context"].rsplit("Is there ", 1)[1].removesuffix(" in the image?").split(" ", 1)[1]
        present = category in {o.category for o in scene.objects}
        assert row["answer"] == (" yes" if present else " no"), row
    yes_share = sum(row["answer"] == " yes" for row in heldout) / len(heldout)
    assert 0.4 < yes_share < 0.6


def test_accuracy_reads_each_rows_last_position(documents, tokenizer):
    rows = read_jsonl(documents / "heldout.jsonl")[:24]
    torch.manual_seed(0)
    model = LanguageModel(TextConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                                     pad_token_id=tokenizer.token_to_id("<pad>")))
    yes_id, no_id = probe.answer_token_ids(tokenizer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    expected = 0
    with torch.no_grad():
        for row in rows:  # one row at a time: no padding
            ids = [bos_id] + tokenizer.encode(row["context"], add_special_tokens=False).ids
            last = model(torch.tensor([ids]))[0, -1]
            expected += bool(last[yes_id] > last[no_id]) == (row["answer"] == " yes")
    batched = probe.yes_no_accuracy(model, tokenizer, rows, batch_size=8)
    assert batched == pytest.approx(expected / len(rows))
    always_yes = torch.nn.Linear(32, tokenizer.get_vocab_size())  # logits that ignore the text
    with torch.no_grad():
        always_yes.weight.zero_()
        always_yes.bias.zero_()
        always_yes.bias[yes_id] = 1.0
    model.lm_head = always_yes
    yes_share = sum(row["answer"] == " yes" for row in rows) / len(rows)
    assert probe.yes_no_accuracy(model, tokenizer, rows, batch_size=8) == pytest.approx(yes_share)


# the command line

@pytest.mark.parametrize("command", [[], ["vision"], ["image-use"], ["text-binding"], ["text-binding", "write"],
                                     ["text-binding", "score"], ["text-loss"]])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        probe.main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: " in capsys.readouterr().out


@pytest.fixture(scope="module")
def llava_checkpoint(world, tokenizer, tmp_path_factory) -> Path:
    """A tiny random LLaVA-1.5 saved in the llava-hf layout, as train.py's stages write it."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llava")
    MLLM(tiny_mllm_config(tokenizer)).save_pretrained(str(path))
    return path


def test_vision_reads_the_tower_of_a_llava_checkpoint(llava_checkpoint, capsys):
    probe.main(["vision", str(llava_checkpoint), "--images", "20", "--image-size", "48"])
    table = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in table[-3:]] == ["| color", "| size", "| shape"]


def test_image_use_through_the_command_line(llava_checkpoint, world, capsys):
    probe.main(["image-use", str(llava_checkpoint), "--data", str(world / "train" / "instruct.json"),
                "--image-folder", str(world / "images"), "--tokenizer", str(world / "tokenizer.json"),
                "--samples", "8"])
    assert "| sample kind | own image | another sample's image | zeros |" in capsys.readouterr().out


def test_text_binding_write_and_score_through_the_command_line(world, tokenizer, tmp_path, capsys):
    documents, checkpoint = tmp_path / "documents", tmp_path / "lm"
    probe.main(["text-binding", "write", str(documents), "--num-train", "5", "--questions", "2"])
    assert [row["text"].count("Is there") for row in read_jsonl(documents / "train.jsonl")] == [2] * 5
    LanguageModel(TextConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
                             num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=256,
                             pad_token_id=tokenizer.token_to_id("<pad>"))).save_pretrained(str(checkpoint))
    probe.main(["text-binding", "score", str(checkpoint), "--data", str(documents),
                "--tokenizer", str(world / "tokenizer.json")])
    assert f"on {len(read_jsonl(documents / 'heldout.jsonl'))} held-out questions" in capsys.readouterr().out


def test_text_loss_is_the_llms_own_loss_through_either_checkpoint(llava_checkpoint, world, tokenizer, tmp_path, capsys):
    model = MLLM.from_pretrained(str(llava_checkpoint))
    model.language_model.save_pretrained(str(tmp_path / "lm"))
    arguments = ["--tokenizer", str(world / "tokenizer.json"), "--documents", "3", "--batch-size", "2"]
    probe.main(["text-loss", str(llava_checkpoint), *arguments])
    probe.main(["text-loss", str(tmp_path / "lm"), *arguments])
    losses = [float(line.split("loss ")[1].split()[0]) for line in capsys.readouterr().out.splitlines()]
    scenes = [shapes.sample_scene(0, "eval", index, index + 1, shapes.DEFAULT_IMAGE_SIZE) for index in range(3)]
    total = count = 0
    for scene in scenes:  # one document at a time, no padding: the model's own mean loss, weighted by length
        ids = [tokenizer.token_to_id(BOS_TOKEN)] + tokenizer.encode(
            shapes.text_document(shapes.annotation_rng(scene, "train"), scene), add_special_tokens=False).ids
        _, loss = model.language_model(torch.tensor([ids]), labels=torch.tensor([ids]))
        total, count = total + float(loss.detach()) * (len(ids) - 1), count + len(ids) - 1
    assert losses[0] == losses[1] == pytest.approx(total / count, rel=1e-4)


def test_vqa_compare_pairs_questions_and_refuses_different_ones():
    first = [{"id": str(i), "question": q, "accuracy": a}
             for i, (q, a) in enumerate([("How many?", 1.0), ("What color is the small star?", 1.0),
                                         ("What color is the big star?", 0.0), ("How many stars?", 0.6)])]
    second = [dict(row, accuracy=b) for row, b in zip(first, [0.0, 1.0, 0.0, 0.0])]
    everything = probe.paired_accuracy(first, second)
    assert everything["questions"] == 4 and everything["difference"] == pytest.approx(0.4)
    differences = [1.0, 0.0, 0.0, 0.6]  # their standard deviation / sqrt(4)
    mean = sum(differences) / 4
    spread = (sum((d - mean) ** 2 for d in differences) / 3) ** 0.5
    assert everything["standard_error"] == pytest.approx(spread / 2)
    counting = probe.paired_accuracy(first, second, "^How many")
    assert (counting["questions"], counting["first"], counting["second"]) == (2, 0.8, 0.0)
    with pytest.raises(ValueError, match="different questions"):
        probe.paired_accuracy(first, second[:3])


def test_training_loss_is_drawn_per_modality(tmp_path):
    """Rare text-only steps get a curve of their own instead of spikes in the image curve."""
    from PIL import Image

    records = [{"step": step, "loss": 1.0 / step, "modality": "image" if step % 7 else "text"} for step in range(1, 60)]
    probe.plot_training_loss(records, tmp_path / "loss.png", "finetune")
    colors = set(Image.open(tmp_path / "loss.png").convert("RGB").getdata())
    assert probe.CURVE_COLORS[0] in colors and probe.CURVE_COLORS[1] in colors  # image, then text
    probe.plot_training_loss([{"step": s, "loss": 1.0} for s in (1, 2, 3)], tmp_path / "one.png", "lm")
    assert probe.CURVE_COLORS[1] not in set(Image.open(tmp_path / "one.png").convert("RGB").getdata())


def test_lookup_batch_answers_whether_the_asked_object_is_in_the_scene(capsys):
    """The idealized existence task, decoded independently: each row is a scene of two-token objects
    in slots, IS <color> <shape> ?, then the constant filler; the answer is yes exactly when the pair
    is among the scene's objects, half the time, and the absent pairs often share an attribute."""
    colors, kinds = len(shapes.COLORS), len(shapes.SHAPES)
    tokens, answers = probe.lookup_batch(np.random.default_rng(0), 400, slots=8, filler=3)
    assert tokens.shape == (400, 2 * 8 + 4 + 3)
    yes, sharing = 0, 0
    for row, answer in zip(tokens.tolist(), answers.tolist()):
        scene, query, filler = row[:16], row[16:20], row[20:]
        pairs = [(scene[i], scene[i + 1]) for i in range(0, 16, 2) if scene[i] != 0]
        assert 1 <= len(pairs) <= shapes.MAX_OBJECTS and len(set(pairs)) == len(pairs)
        assert all(1 <= c <= colors < k <= colors + kinds for c, k in pairs)
        assert query[0] == 1 + colors + kinds and query[3] == 2 + colors + kinds
        assert filler == [5 + colors + kinds + i for i in range(3)]
        present = (query[1], query[2]) in pairs
        assert answer == (3 if present else 4) + colors + kinds
        yes += present
        sharing += not present and any(query[1] == c or query[2] == k for c, k in pairs)
    assert 160 < yes < 240 and sharing > 60
    probe.main(["lookup", "--slots", "4", "--steps", "2", "--batch-size", "4", "--every", "1"])
    assert capsys.readouterr().out.count("held-out accuracy") == 2
