"""Scale on one CPU: packing with per-sample attention, the units FSDP shards and compile
compiles, when DDP searches for unused parameters, and the memory estimate."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import data
import parallel
import shapes
import train
from conftest import tiny_mllm_config
from adapters import set_trainable
from layers import IGNORE_INDEX, causal_attention_mask, positions_in_samples
from model import MLLM


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return shapes.build_world(tmp_path_factory.mktemp("world"), seed=0, num_train_images=24, num_eval_images=4)


def sample_batch(world: Path, model: MLLM, count: int = 6) -> dict:
    """`count` samples of the world's instruction mixture, a text-only one second, collated."""
    tokenizer = data.load_tokenizer(str(world / "tokenizer.json"))
    stage = train.StageConfig(name="s", data=str(world / "train" / "instruct.json"), image_folder=str(world / "images"),
                              max_seq_len=256)
    dataset = train.build_dataset(stage, train.TrainConfig(tokenizer=str(world / "tokenizer.json")), model, tokenizer)
    text_only = [index for index, has_image in enumerate(dataset.has_image) if not has_image][:1]
    with_image = [index for index, has_image in enumerate(dataset.has_image) if has_image][:count - 1]
    assert text_only
    indices = [with_image[0], text_only[0], *with_image[1:]]
    return data.collate([dataset[index] for index in indices], tokenizer.token_to_id("<pad>"))


def sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX)


def test_packed_rows_mask_and_positions_by_sample():
    mask = torch.tensor([[1, 1, 1, 2, 2, 3, 0]])
    assert positions_in_samples(mask).tolist() == [[0, 1, 2, 0, 1, 0, 0]]
    assert positions_in_samples(torch.tensor([[0, 0, 1, 1]])).tolist() == [[0, 0, 0, 1]]  # left padding
    allowed, is_causal = causal_attention_mask(mask, 7, 0)
    expected = torch.tensor([[1, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0],
                             [0, 0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1, 0],
                             [0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert not is_causal and torch.equal(allowed[0, 0], expected)


def test_pack_rows_first_fit_keeps_images_with_their_samples():
    """Lengths 5, 3, 4, 2 into rows of 7: first-fit gives [0, 3] and [1, 2]; rows 0, 1 and 3 hold
    images 0, 1, 2, which must now come in reading order 0, 2, 1."""
    image = 9
    rows = [[1, image, 4, 4, 4], [1, image, 5], [1, 6, 6, 6], [1, image]]
    input_ids = torch.zeros(4, 5, dtype=torch.long)
    mask = torch.zeros(4, 5, dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, :len(row)], mask[index, :len(row)] = torch.tensor(row), 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, IGNORE_INDEX),
             "pixel_values": torch.tensor([[0.0], [1.0], [2.0]])}
    packed = data.pack_rows(batch, max_length=7, image_token_index=image)
    assert packed["input_ids"].tolist() == [[1, image, 4, 4, 4, 1, image], [1, image, 5, 1, 6, 6, 6]]
    assert packed["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 2, 2], [1, 1, 1, 2, 2, 2, 2]]
    assert packed["labels"][0].tolist() == [IGNORE_INDEX, image, 4, 4, 4, IGNORE_INDEX, image]
    assert packed["pixel_values"].squeeze(1).tolist() == [0.0, 2.0, 1.0]
    # LION's router reads one level per row: a row takes samples of one level only.
    by_level = data.pack_rows({**batch, "task_level": torch.tensor([0, 1, 0, 0])}, max_length=7, image_token_index=image)
    assert by_level["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 2, 2], [1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0]]
    assert by_level["task_level"].tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="longer than the rows"):
        data.pack_rows(batch, max_length=4, image_token_index=image)


def test_a_packed_batch_gives_every_sample_its_own_loss(world):
    """The bug of packing without per-sample masks (nanoVLM's issue #201): here each sample's loss
    in a packed row equals its loss alone, and the batch loss is unchanged."""
    tokenizer = data.load_tokenizer(str(world / "tokenizer.json"))
    torch.manual_seed(0)
    model = MLLM(tiny_mllm_config(tokenizer)).eval()
    batch = sample_batch(world, model)
    del batch["task_level"]  # LION's router levels: this model has none
    lengths = batch["attention_mask"].sum(1).tolist()
    packed = data.pack_rows(batch, max_length=sum(lengths), image_token_index=model.config.image_token_index)
    assert packed["input_ids"].shape == (1, sum(lengths))  # one row, the samples in order
    inputs = {key: packed.get(key) for key in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        alone, images = [], 0
        for row, length in enumerate(lengths):
            ids = batch["input_ids"][row:row + 1, :length]
            has_image = bool((ids == model.config.image_token_index).any())
            pixels = batch["pixel_values"][images:images + 1] if has_image else None
            images += has_image
            alone.append(sample_loss(model(ids, pixels)[0], batch["labels"][row, :length]))
        packed_logits = model(**inputs)[0]
        naive_logits = model(**{**inputs, "attention_mask": (packed["attention_mask"] != 0).long()})[0]
        _, packed_loss = model(**inputs, labels=packed["labels"])
        _, batch_loss = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["labels"])
    starts = [sum(lengths[:row]) for row in range(len(lengths))]
    found = [sample_loss(packed_logits[start:start + length], batch["labels"][row, :length])
             for row, (start, length) in enumerate(zip(starts, lengths))]
    naive = [sample_loss(naive_logits[start:start + length], batch["labels"][row, :length])
             for row, (start, length) in enumerate(zip(starts, lengths))]
    assert torch.allclose(torch.stack(found), torch.stack(alone), atol=1e-5)
    leaked = (torch.stack(naive) - torch.stack(alone))[1:].abs()  # a plain mask lets every later sample read the earlier
    assert leaked.min() > 1e-6 and leaked.max() > 1e-3
    assert torch.allclose(packed_loss, batch_loss, atol=1e-5)


def test_memory_estimate_counts_what_each_mode_keeps(world):
    tokenizer = data.load_tokenizer(str(world / "tokenizer.json"))
    model = MLLM(tiny_mllm_config(tokenizer))
    set_trainable(model, [r"^multi_modal_projector\.", r"^language_model\."])
    text = model.config.text_config
    hidden, intermediate = text.hidden_size, text.intermediate_size
    key_value = text.num_key_value_heads * hidden // text.num_attention_heads
    per_token = 11 * hidden + 2 * key_value + 3 * intermediate  # 7 projections' inputs and outputs, 2 norms
    assert parallel.activation_elements_per_token(model.language_model.model.layers[0]) == per_token
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tokens, layers, vocabulary = 2 * 10, text.num_hidden_layers, text.vocab_size
    logits = 2 * 4 * tokens * vocabulary
    plain = parallel.estimate_memory(model, 2, 10, processes=4, gradient_checkpointing=False, tokens_per_image=17)
    assert plain["ddp"] == {"weights": 4 * total, "gradients": 4 * trainable, "optimizer": 8 * trainable,
                            "activations": layers * 2 * tokens * per_token + logits,  # the frozen tower keeps nothing
                            "total": plain["ddp"]["total"]}
    assert plain["fsdp"]["optimizer"] == 8 * trainable / 4 and plain["fsdp"]["gradients"] == 4 * trainable / 4
    largest_block = sum(p.numel() for p in model.language_model.model.layers[0].parameters())
    assert plain["fsdp"]["weights"] == 4 * total / 4 + 2 * 2 * largest_block
    checkpointed = parallel.estimate_memory(model, 2, 10, processes=4, gradient_checkpointing=True, tokens_per_image=17)
    assert checkpointed["ddp"]["activations"] == layers * 2 * tokens * hidden + 2 * tokens * per_token + logits
    set_trainable(model, [r"^vision_tower\."])  # a training tower keeps its blocks' activations, per image token
    tower = parallel.estimate_memory(model, 2, 10, processes=4, gradient_checkpointing=False, tokens_per_image=17)
    vision_block = model.vision_tower.encoder.layers[0]
    assert tower["ddp"]["activations"] - plain["ddp"]["activations"] == \
        len(model.vision_tower.encoder.layers) * 2 * 2 * 17 * parallel.activation_elements_per_token(vision_block)


def test_estimate_memory_builds_every_stage_on_the_meta_device(world, tmp_path, capsys):
    tokenizer = data.load_tokenizer(str(world / "tokenizer.json"))
    MLLM(tiny_mllm_config(tokenizer)).save_pretrained(str(tmp_path / "tiny"))
    config = tmp_path / "recipe.py"
    config.write_text(f"out_dir = {str(tmp_path / 'out')!r}\ntokenizer = {str(world / 'tokenizer.json')!r}\n"
                      f"stages = [dict(name='finetune', init={str(tmp_path / 'tiny')!r}, max_seq_len=64),\n"
                      f"          dict(name='lora', lora=dict(targets=['_proj$'], rank=4), trainable=['lora_'],\n"
                      f"               parallel='fsdp', gradient_checkpointing=True, max_seq_len=64)]\n")
    train.main([str(config), "--estimate_memory", "--processes", "4"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "per GPU, 4 processes: weights + gradients + optimizer + activations = total"
    assert [line.split()[:2] for line in lines[1:]] == [["[finetune]", "ddp"], ["[finetune]", "fsdp"],
                                                       ["[lora]", "ddp"], ["[lora]", "fsdp"]]
    assert lines[2].endswith("MiB") and lines[4].endswith("(this stage's choice)")
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_ddp_searches_for_unused_parameters_only_when_a_step_can_leave_some(world):
    tokenizer = data.load_tokenizer(str(world / "tokenizer.json"))
    model = MLLM(tiny_mllm_config(tokenizer))
    stage = train.StageConfig(name="s", data=str(world / "train" / "instruct.json"), image_folder=str(world / "images"))
    dataset = train.build_dataset(stage, train.TrainConfig(tokenizer=str(world / "tokenizer.json")), model, tokenizer)
    assert not all(dataset.has_image) and train.has_unused_parameters(stage, model, dataset)
    dataset.has_image = [True] * len(dataset.has_image)  # an image-only mixture (LLaVA's stage 1)
    assert not train.has_unused_parameters(stage, model, dataset)
    model.config.visual_input = "QFORMER"  # LION reading one branch
    assert train.has_unused_parameters(stage, model, dataset)
    assert not train.has_unused_parameters(train.StageConfig(name="t", objective="lm"), model, dataset)


def test_shard_and_compile_units_are_the_outermost_blocks(world):
    tokenizer = data.load_tokenizer(str(world / "tokenizer.json"))
    model = MLLM(tiny_mllm_config(tokenizer))
    model.vision_tower.add_gated_blocks(1)  # REACT: a gated block inside the tower's last block
    units = parallel.transformer_blocks(model)
    assert units == [*model.vision_tower.encoder.layers, *model.language_model.model.layers]
    gated = model.vision_tower.encoder.layers[-1].gated_block
    assert all(gated is not unit for unit in units)  # it is sharded and compiled with the block that holds it
