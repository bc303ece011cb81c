"""The Q-Former's text side through the pipeline: its own tokenizer in the shapes world, the
captions of BLIP-2's stage 1, InstructBLIP's instruction per image in training batches and in
eval, BLIP-2's prompts (query tokens before BOS) and the InstructBLIP decoding preset."""
import argparse
from pathlib import Path

import pytest
import torch

import data
import eval as evaluation
import shapes
import train
from connectors import QFormerConfig
from model import MLLM, MLLMConfig, TextConfig
from vision import VisionConfig


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return shapes.build_world(tmp_path_factory.mktemp("world"), seed=0, num_train_images=16, num_eval_images=4)


@pytest.fixture(scope="module")
def qformer_tokenizer(world):
    return data.load_qformer_tokenizer(str(world / "qformer_tokenizer.json"))


def test_the_worlds_qformer_tokenizer_is_berts_form(qformer_tokenizer):
    assert qformer_tokenizer.token_to_id("[PAD]") == 0
    assert qformer_tokenizer.token_to_id("[DEC]") == qformer_tokenizer.get_vocab_size() - 1  # added last, as LAVIS
    assert qformer_tokenizer.encode("A small RED circle.").tokens == ["[CLS]", "a", "small", "red", "circle", ".",
                                                                     "[SEP]"]


def test_truncation_keeps_cls_and_sep_on_either_side(qformer_tokenizer):
    words = "a small red circle left of a big blue star"
    ids, mask = data.encode_qformer_texts(qformer_tokenizer, [words, "red"], max_length=5)
    cls, sep = qformer_tokenizer.token_to_id("[CLS]"), qformer_tokenizer.token_to_id("[SEP]")
    assert [qformer_tokenizer.id_to_token(i) for i in ids[0].tolist()] == ["[CLS]", "a", "small", "red", "[SEP]"]
    assert ids[1].tolist() == [cls, qformer_tokenizer.token_to_id("red"), sep, 0, 0]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    left, _ = data.encode_qformer_texts(qformer_tokenizer, [words], max_length=5, truncation_side="left")
    # LAVIS cuts an instruction from the left, by tokens (a word may lose its first pieces).
    assert left[0].tolist() == [cls, *qformer_tokenizer.encode(words, add_special_tokens=False).ids[-3:], sep]


def test_a_tokenizer_without_the_qformer_tokens_is_refused(world, tmp_path):
    with pytest.raises(ValueError, match=r"tokenizer.json: the Q-Former tokenizer has no '\[PAD\]'"):
        data.load_qformer_tokenizer(str(world / "tokenizer.json"))


def test_stage1_captions_batch_with_the_qformer_pad(world, qformer_tokenizer):
    dataset = data.QFormerCaptionDataset(str(world / "train" / "pretrain.json"), str(world / "images"),
                                         qformer_tokenizer, image_size=32, pad_to_square=True, max_text_len=8)
    batch = data.collate([dataset[0], dataset[1], dataset[2]], pad_token_id=0)
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["input_ids"].shape[1] <= 8
    first = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert first[0] == qformer_tokenizer.token_to_id("[CLS]") and first[-1] == qformer_tokenizer.token_to_id("[SEP]")


def test_instructions_travel_one_row_per_image(world, qformer_tokenizer):
    tokenizer = data.load_tokenizer(str(world / "tokenizer.json"))
    dataset = data.InstructionDataset(str(world / "train" / "instruct.json"), str(world / "images"), tokenizer,
                                      "vicuna_v1", tokenizer.token_to_id("<image>"), 4, 32, True, 512,
                                      qformer_tokenizer=qformer_tokenizer)
    with_image = [i for i, has in enumerate(dataset.has_image) if has][:2]
    text_only = [i for i, has in enumerate(dataset.has_image) if not has][:1]
    assert text_only, "the world's mixture has text-only samples"
    items = [dataset[with_image[0]], dataset[text_only[0]], dataset[with_image[1]]]
    batch = data.collate(items, pad_token_id=tokenizer.token_to_id("<pad>"))
    assert batch["pixel_values"].shape[0] == 2 == batch["qformer_input_ids"].shape[0]
    question = data.first_question(dataset.records[with_image[1]]["conversations"])
    row = batch["qformer_input_ids"][1][batch["qformer_attention_mask"][1].bool()]
    assert qformer_tokenizer.decode(row.tolist()) == qformer_tokenizer.decode(
        qformer_tokenizer.encode(question).ids) and "<image>" not in question
    chunks = train.split_batch(batch, 2, tokenizer.token_to_id("<image>"))  # rows 0-1 | row 2
    assert [c["qformer_input_ids"].shape[0] for c in chunks] == [1, 1]
    assert torch.equal(chunks[1]["qformer_input_ids"], batch["qformer_input_ids"][1:])


def tiny_instructblip(tokenizer, qformer_tokenizer) -> MLLM:
    torch.manual_seed(0)
    config = MLLMConfig(
        vision_config=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=32, patch_size=8),
        text_config=TextConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               bos_token_id=tokenizer.token_to_id("<s>"), eos_token_id=tokenizer.token_to_id("</s>")),
        projector_type="qformer", num_query_tokens=4,
        qformer_config=QFormerConfig(vocab_size=qformer_tokenizer.get_vocab_size(), hidden_size=16,
                                     num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                     encoder_hidden_size=32, use_qformer_text_input=True),
        image_token_index=tokenizer.token_to_id("<image>"), pad_token_id=tokenizer.token_to_id("<pad>"))
    return MLLM(config).eval()


def test_eval_gives_each_image_its_question(world, qformer_tokenizer, monkeypatch):
    tokenizer = data.load_tokenizer(str(world / "tokenizer.json"))
    model = tiny_instructblip(tokenizer, qformer_tokenizer)
    with pytest.raises(ValueError, match="qformer_tokenizer"):
        evaluation.Evaluator(model, tokenizer, evaluation.PROMPT_STYLES["instructblip"])
    evaluator = evaluation.Evaluator(model, tokenizer, evaluation.PROMPT_STYLES["instructblip"],
                                     qformer_tokenizer=qformer_tokenizer)
    seen = {}
    original = model.generate

    def recording_generate(input_ids, **kwargs):
        seen.update(kwargs)
        return original(input_ids, **kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    style = evaluation.PROMPT_STYLES["instructblip"]
    metrics = evaluation.run_eval(model, tokenizer, "pope", world, "random", limit=2, max_new_tokens=2,
                                  prompt_style="instructblip", qformer_tokenizer=qformer_tokenizer, progress=False,
                                  print_results=False)
    assert metrics["samples"] == 2
    questions = [sample.text for sample in evaluation.load_task("pope", world, "random")[:2]]
    given = sorted(row[mask.bool()].tolist() for row, mask in zip(seen["qformer_input_ids"],
                                                                   seen["qformer_attention_mask"]))
    assert given == sorted(qformer_tokenizer.encode(style.short_answer.format(question=q)).ids for q in questions)
    # Its prompts put the query tokens before BOS, as transformers' processor does.
    ids, _ = evaluator.encode_dialogue([("Is there a dog?", None)], None)
    assert ids[:5] == [model.config.image_token_index] * 4 + [model.config.text_config.bos_token_id]


def test_the_instructblip_decoding_preset_under_explicit_flags():
    parser = argparse.ArgumentParser()
    evaluation.add_decoding_arguments(parser)
    preset = evaluation.decoding_options(parser.parse_args(["--decoding-preset", "instructblip"]))
    assert preset["num_beams"] == 5 and preset["max_new_tokens"] == 256 and preset["repetition_penalty"] == 1.5
    overridden = evaluation.decoding_options(parser.parse_args(["--decoding-preset", "instructblip",
                                                                "--num-beams", "2"]))
    assert overridden == {**preset, "num_beams": 2}
