"""probe_text_binding.py: the documents answer POPE's question right and are balanced, and the
accuracy reads each row's own last position through the padding."""
import json
from pathlib import Path

import pytest
import torch

import data
import probe_text_binding
import shapes
from model import LanguageModel, TextConfig

NUM_TRAIN, NUM_HELDOUT = 60, 200


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("text_binding")
    probe_text_binding.write_documents(out_dir, num_train=NUM_TRAIN, num_heldout=NUM_HELDOUT, num_questions=4)
    return out_dir


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    world = shapes.build_world(tmp_path_factory.mktemp("world"), seed=0, num_train_images=16, num_eval_images=4)
    return data.load_tokenizer(str(world / "tokenizer.json"))


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
    yes_id, no_id = probe_text_binding.answer_token_ids(tokenizer)
    bos_id = tokenizer.token_to_id(data.BOS_TOKEN)
    expected = 0
    with torch.no_grad():
        for row in rows:  # one row at a time: no padding
            ids = [bos_id] + tokenizer.encode(row["context"], add_special_tokens=False).ids
            last = model(torch.tensor([ids]))[0, -1]
            expected += bool(last[yes_id] > last[no_id]) == (row["answer"] == " yes")
    batched = probe_text_binding.yes_no_accuracy(model, tokenizer, rows, batch_size=8)
    assert batched == pytest.approx(expected / len(rows))
    always_yes = torch.nn.Linear(32, tokenizer.get_vocab_size())  # logits that ignore the text
    with torch.no_grad():
        always_yes.weight.zero_()
        always_yes.bias.zero_()
        always_yes.bias[yes_id] = 1.0
    model.lm_head = always_yes
    yes_share = sum(row["answer"] == " yes" for row in rows) / len(rows)
    assert probe_text_binding.yes_no_accuracy(model, tokenizer, rows, batch_size=8) == pytest.approx(yes_share)
