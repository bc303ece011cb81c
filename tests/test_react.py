"""REACT (the LLaVA dissertation, chapter 2): gated image blocks, locked-text gated-image tuning,
the contrastive loss of eq. 2.4-2.6, retrieval from a pool, zero-shot classification, and the
official OpenCLIP checkpoint layout against an independent OpenCLIP-style forward."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import checkpoints
import data
import eval as evaluation
import retrieval
import shapes
import train
from adapters import set_trainable
from layers import quick_gelu
from vision import CLIPConfig, CLIPModel, contrastive_loss

VISION = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2, image_size=16,
              patch_size=8)
TEXT = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=12, eos_token_id=2)


def tiny_clip(num_gated_layers: int = 0, seed: int = 0) -> CLIPModel:
    torch.manual_seed(seed)
    return CLIPModel(CLIPConfig.from_dict(dict(projection_dim=16, text_config=TEXT,
                                               vision_config=dict(VISION, num_gated_layers=num_gated_layers))))


def set_gates(model: CLIPModel, attention: float, dense: float) -> None:
    for block in model.vision_model.encoder["layers"]:
        if block.gated_block is not None:
            block.gated_block.alpha_attn.data.fill_(attention)
            block.gated_block.alpha_dense.data.fill_(dense)


def test_gated_blocks_leave_the_tower_unchanged_until_their_gates_open(tmp_path):
    model = tiny_clip()
    pixels = torch.randn(2, 3, 16, 16)
    before = model.vision_model(pixels)
    model.vision_model.add_gated_blocks(2)
    assert model.config.vision_config.num_gated_layers == 2
    assert [block.gated_block is not None for block in model.vision_model.encoder["layers"]] == [False, True, True]
    assert all(torch.equal(a, b) for a, b in zip(before, model.vision_model(pixels)))  # exactly: tanh(0) = 0
    set_gates(model, 0.5, -0.3)
    opened = model.vision_model(pixels)
    assert torch.equal(opened[1], before[1]) and not torch.allclose(opened[2], before[2])
    # Saved and loaded in our (transformers-style) layout, gates and all.
    model.save_pretrained(tmp_path)
    loaded = CLIPModel.from_pretrained(tmp_path)
    assert loaded.config.vision_config.num_gated_layers == 2
    assert torch.equal(loaded.vision_model(pixels)[-1], opened[-1])
    with pytest.raises(ValueError, match="last 2 blocks; asked for 1"):
        model.vision_model.add_gated_blocks(1)
    with pytest.raises(ValueError, match="has 3 blocks"):
        tiny_clip().vision_model.add_gated_blocks(4)


def test_contrastive_loss_is_eq_2_5_and_2_6_by_hand():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.5, 1.5, 0.0], [0.0, 1.0, 3.0]])
    positives = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    image_to_text = [-(sum(math.log(math.exp(logits[i, k]) / sum(math.exp(logits[i, j]) for j in range(3)))
                           for k in range(3) if positives[i, k]) / int(positives[i].sum())) for i in range(3)]
    text_to_image = [-(sum(math.log(math.exp(logits[k, j]) / sum(math.exp(logits[i, j]) for i in range(3)))
                           for k in range(3) if positives[k, j]) / int(positives[:, j].sum())) for j in range(3)]
    expected = (sum(image_to_text) / 3 + sum(text_to_image) / 3) / 2
    assert contrastive_loss(logits, positives).item() == pytest.approx(expected, rel=1e-6)
    assert contrastive_loss(logits).item() == pytest.approx(contrastive_loss(logits, torch.eye(3, dtype=torch.bool)).item())


def test_positive_threshold_pairs_the_texts_that_agree():
    model = tiny_clip().eval()
    pixels = torch.randn(3, 3, 16, 16)
    input_ids = torch.tensor([[5, 6, 7, 39], [5, 6, 8, 39], [9, 3, 4, 39]])
    with torch.no_grad():
        texts = F.normalize(model.encode_text(input_ids), dim=-1)
    agreement = (texts @ texts.t()).fill_diagonal_(-2)
    # A gamma between the two most agreeing pairs of texts: exactly one pair is positive.
    highest, second = agreement.flatten().unique().sort(descending=True).values[[0, 2]]
    pair = (agreement == highest) | torch.eye(3, dtype=torch.bool)
    logits, clip_loss = model(pixels, input_ids)
    _, loss = model(pixels, input_ids, positive_threshold=float(highest + second) / 2)
    assert loss.item() == pytest.approx(contrastive_loss(logits, pair).item(), rel=1e-6)
    assert clip_loss.item() == pytest.approx(contrastive_loss(logits).item(), rel=1e-6)
    assert loss.item() != pytest.approx(clip_loss.item(), rel=1e-3)
    # At gamma 1 only identical texts pair; their logit columns are identical too, so eq. 2.5-2.6
    # average equal terms and give CLIP's loss exactly.
    same = torch.tensor([[5, 6, 7, 39], [5, 6, 7, 39], [9, 3, 4, 39]])
    logits, clip_loss = model(pixels, same)
    _, unicl_loss = model(pixels, same, positive_threshold=1.0)
    same_text = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    assert unicl_loss.item() == pytest.approx(contrastive_loss(logits, same_text).item(), rel=1e-6)
    assert unicl_loss.item() == pytest.approx(clip_loss.item(), rel=1e-6)


def test_locked_text_gated_image_tuning_moves_only_the_gated_blocks():
    model = tiny_clip(num_gated_layers=2)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    trainable = set_trainable(model, [r"\.gated_block\."])
    assert trainable and all(".gated_block." in name for name in trainable)
    optimizer = train.build_optimizer(model, train.StageConfig(objective="clip", learning_rate=1e-2,
                                                               weight_decay=0.1, trainable=[r"\.gated_block\."]))
    _, loss = model(torch.randn(4, 3, 16, 16), torch.randint(3, 38, (4, 6)).index_fill_(1, torch.tensor([5]), 39),
                    positive_threshold=0.9)
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    changed = {key for key in after if not torch.equal(after[key], before[key])}
    assert changed and all(".gated_block." in key for key in changed)
    assert any(key.endswith("alpha_attn") for key in changed)
    assert all(torch.equal(after[key], value) for key, value in before.items() if key.startswith("text_model."))


# ---------------------------------------------------------------------------------------------
# The official layout: OpenCLIP names (microsoft/react's gated checkpoints), against an
# independent forward written the way OpenCLIP computes it (nn.MultiheadAttention, x @ proj).

def openclip_state(layers: int = 3, gated_layers: int = 2, width: int = 64, text_width: int = 64) -> dict:
    torch.manual_seed(1)

    def block(prefix: str, width: int, alphas: bool) -> dict:
        state = {f"{prefix}ln_1.weight": 1 + 0.1 * torch.randn(width), f"{prefix}ln_1.bias": 0.1 * torch.randn(width),
                 f"{prefix}attn.in_proj_weight": 0.1 * torch.randn(3 * width, width),
                 f"{prefix}attn.in_proj_bias": 0.1 * torch.randn(3 * width),
                 f"{prefix}attn.out_proj.weight": 0.1 * torch.randn(width, width),
                 f"{prefix}attn.out_proj.bias": 0.1 * torch.randn(width),
                 f"{prefix}ln_2.weight": 1 + 0.1 * torch.randn(width), f"{prefix}ln_2.bias": 0.1 * torch.randn(width),
                 f"{prefix}mlp.c_fc.weight": 0.1 * torch.randn(4 * width, width),
                 f"{prefix}mlp.c_fc.bias": 0.1 * torch.randn(4 * width),
                 f"{prefix}mlp.c_proj.weight": 0.1 * torch.randn(width, 4 * width),
                 f"{prefix}mlp.c_proj.bias": 0.1 * torch.randn(width)}
        if alphas:
            state.update({f"{prefix}alpha_attn": torch.tensor(0.7), f"{prefix}alpha_dense": torch.tensor(-0.4)})
        return state

    state = {"visual.class_embedding": torch.randn(width), "visual.positional_embedding": 0.1 * torch.randn(5, width),
             "visual.conv1.weight": 0.1 * torch.randn(width, 3, 8, 8),
             "visual.ln_pre.weight": torch.ones(width), "visual.ln_pre.bias": torch.zeros(width),
             "visual.ln_post.weight": torch.ones(width), "visual.ln_post.bias": torch.zeros(width),
             "visual.proj": 0.1 * torch.randn(width, 16),
             "token_embedding.weight": 0.1 * torch.randn(40, text_width),
             "positional_embedding": 0.1 * torch.randn(12, text_width),
             "ln_final.weight": torch.ones(text_width), "ln_final.bias": torch.zeros(text_width),
             "text_projection": 0.1 * torch.randn(text_width, 16), "logit_scale": torch.tensor(math.log(1 / 0.07))}
    for index in range(layers):
        state.update(block(f"visual.transformer.resblocks.{index}.", width, False))
        if index >= layers - gated_layers:
            state.update(block(f"visual.transformer.resblocks.{index}.gated_attn_block.", width, True))
    for index in range(2):
        state.update(block(f"transformer.resblocks.{index}.", text_width, False))
    return state


def openclip_block(x: torch.Tensor, state: dict, prefix: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    width = x.shape[-1]
    attention = nn.MultiheadAttention(width, width // 64, batch_first=True)  # OpenCLIP's head width 64
    attention.load_state_dict({name: state[f"{prefix}attn.{name}"] for name in
                               ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")})
    gates = [torch.tanh(state[f"{prefix}alpha_{name}"]) if f"{prefix}alpha_{name}" in state else 1.0
             for name in ("attn", "dense")]
    normed = F.layer_norm(x, (width,), state[f"{prefix}ln_1.weight"], state[f"{prefix}ln_1.bias"])
    x = x + gates[0] * attention(normed, normed, normed, need_weights=False, attn_mask=mask)[0]
    normed = F.layer_norm(x, (width,), state[f"{prefix}ln_2.weight"], state[f"{prefix}ln_2.bias"])
    hidden = quick_gelu(F.linear(normed, state[f"{prefix}mlp.c_fc.weight"], state[f"{prefix}mlp.c_fc.bias"]))
    return x + gates[1] * F.linear(hidden, state[f"{prefix}mlp.c_proj.weight"], state[f"{prefix}mlp.c_proj.bias"])


def openclip_encode_image(state: dict, pixels: torch.Tensor) -> torch.Tensor:
    width = state["visual.class_embedding"].shape[0]
    patches = F.conv2d(pixels, state["visual.conv1.weight"], stride=8).flatten(2).transpose(1, 2)
    x = torch.cat([state["visual.class_embedding"].expand(len(pixels), 1, -1), patches], 1)
    x = F.layer_norm(x + state["visual.positional_embedding"], (width,), state["visual.ln_pre.weight"],
                     state["visual.ln_pre.bias"])
    for index in range(3):
        prefix = f"visual.transformer.resblocks.{index}."
        if f"{prefix}gated_attn_block.alpha_attn" in state:  # REACT: the gated block runs first
            x = openclip_block(x, state, f"{prefix}gated_attn_block.")
        x = openclip_block(x, state, prefix)
    pooled = F.layer_norm(x[:, 0], (width,), state["visual.ln_post.weight"], state["visual.ln_post.bias"])
    return pooled @ state["visual.proj"]


def openclip_encode_text(state: dict, input_ids: torch.Tensor) -> torch.Tensor:
    length = input_ids.shape[1]
    x = state["token_embedding.weight"][input_ids] + state["positional_embedding"][:length]
    causal = torch.full((length, length), float("-inf")).triu(1)
    for index in range(2):
        x = openclip_block(x, state, f"transformer.resblocks.{index}.", causal)
    x = F.layer_norm(x, (x.shape[-1],), state["ln_final.weight"], state["ln_final.bias"])
    return x[torch.arange(len(x)), input_ids.argmax(-1)] @ state["text_projection"]


def test_react_gated_checkpoint_converts_and_matches_openclip(tmp_path):
    state = openclip_state()
    source = tmp_path / "react_vit-tiny-gated-image.pt"
    torch.save({"state_dict": {f"module.{key}": value for key, value in state.items()}, "epoch": 3}, source)
    checkpoints.main(["convert", str(source), str(tmp_path / "react")])  # nested wrappers dropped
    model = CLIPModel.from_pretrained(tmp_path / "react").eval()
    assert model.config.vision_config.num_gated_layers == 2
    assert (model.config.vision_config.image_size, model.config.vision_config.num_attention_heads) == (16, 1)
    pixels, input_ids = torch.randn(2, 3, 16, 16), torch.tensor([[3, 7, 9, 39, 0], [4, 39, 0, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels), openclip_encode_image(state, pixels),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_text(input_ids), openclip_encode_text(state, input_ids),
                                   atol=1e-5, rtol=1e-5)
    # Back to OpenCLIP's names, tensor for tensor.
    theirs = checkpoints.state_to_theirs(model.state_dict(), checkpoints.OPENCLIP_LAYOUT)
    assert theirs.keys() == state.keys() and all(torch.equal(theirs[key], state[key]) for key in state)


def test_openclip_state_without_its_tower_is_refused_by_name():
    state = openclip_state()
    del state["visual.proj"]
    with pytest.raises(checkpoints.CheckpointError, match="visual.proj"):
        checkpoints.openclip_config(state)


# ---------------------------------------------------------------------------------------------
# Retrieval and zero-shot classification on a small shapes world

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return shapes.build_world(tmp_path_factory.mktemp("world"), seed=0, num_train_images=16, num_eval_images=8)


def world_clip(world) -> CLIPModel:
    tokenizer = data.load_tokenizer(str(world / "tokenizer.json"))
    torch.manual_seed(0)
    return CLIPModel(CLIPConfig.from_dict(dict(projection_dim=16, vision_config=dict(VISION, image_size=32),
                                               text_config=dict(TEXT, vocab_size=tokenizer.get_vocab_size(),
                                                                max_position_embeddings=64,
                                                                eos_token_id=tokenizer.token_to_id("</s>"))))).eval()


def test_text_to_text_retrieval_finds_the_pool_captions_equal_to_a_query(world, tmp_path):
    tokenizer = data.load_tokenizer(str(world / "tokenizer.json"))
    records = json.loads((world / "train" / "pretrain.json").read_text())
    captions = [record["conversations"][1]["value"] for record in records]
    pool_path = tmp_path / "pool.json"
    pool_path.write_text(json.dumps(records))
    pool = data.CaptionDataset(str(pool_path), str(world / "images"), tokenizer, 32, pad_to_square=True)
    model = world_clip(world)
    # A prompt equal to a pool caption has cosine 1 with it, the most any pair can have; a concept
    # scores a pair by its closest prompt.
    concepts = [["an unrelated prompt.", captions[3]], [captions[7]], [captions[3]]]
    chosen = retrieval.retrieve_pairs(model, tokenizer, pool, concepts, per_concept=1, by="text")
    assert [captions[index] for index in chosen] == [captions[3], captions[7]]  # the repeat counted once
    several = retrieval.retrieve_pairs(model, tokenizer, pool, concepts, per_concept=4, by="text")
    assert len(several) == len(set(several)) and 4 <= len(several) <= 12 and {3, 7} <= set(several)


def test_text_to_image_retrieval_skips_an_unreadable_image(world, tmp_path):
    tokenizer = data.load_tokenizer(str(world / "tokenizer.json"))
    images = tmp_path / "images"
    images.mkdir()
    records = json.loads((world / "train" / "pretrain.json").read_text())[:6]
    for record in records:
        Image.open(world / "images" / record["image"]).save(images / record["image"])
    (images / records[2]["image"]).write_bytes(b"not a png")
    (tmp_path / "pool.json").write_text(json.dumps(records))
    pool = data.CaptionDataset(str(tmp_path / "pool.json"), str(images), tokenizer, 32, pad_to_square=True)
    chosen = retrieval.retrieve_pairs(world_clip(world), tokenizer, pool, [["a small red star."], ["a circle."]],
                                 per_concept=6, by="image")
    assert sorted(chosen) == [0, 1, 3, 4, 5]
    assert pool.problems.total == 1 and records[2]["image"] in pool.problems.summary()


def test_zero_shot_classification_ensembles_the_templates(world, tmp_path):
    tokenizer = data.load_tokenizer(str(world / "tokenizer.json"))
    model = world_clip(world)
    metrics = retrieval.run_zero_shot_classification(model, tokenizer, world, "small", out_dir=tmp_path,
                                                      print_results=False)
    classes, templates, rows = retrieval.read_classification_task(str(world / "eval" / "classification" / "small.json"))
    assert classes == ["circle", "square", "triangle", "star", "diamond"] and len(rows) % len(classes) == 0
    # The same prediction by hand: per class, the mean of its normalized prompt embeddings.
    pad = tokenizer.token_to_id("<pad>")
    with torch.no_grad():
        class_embeddings = torch.stack([F.normalize(retrieval.embed_texts(model, data.CaptionDataset.encode_texts(
            tokenizer, [template.format(name) for template in templates], 64), pad).mean(0), dim=0) for name in classes])
        pixels = torch.stack([evaluation.preprocess_image(evaluation.load_image(str(world / "images" / row["image"])),
                                                          32, True) for row in rows])
        expected = (F.normalize(model.encode_image(pixels), dim=-1) @ class_embeddings.t()).argmax(1).tolist()
    predictions = [json.loads(line)["prediction"]
                   for line in (tmp_path / "classification_small.predictions.jsonl").read_text().splitlines()]
    assert predictions == [classes[index] for index in expected]
    assert metrics["accuracy"] == pytest.approx(sum(p == row["label"] for p, row in zip(predictions, rows)) / len(rows))
    assert metrics["chance"] == pytest.approx(0.2)


def test_a_classification_task_file_with_a_foreign_label_is_refused(tmp_path):
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"classes": ["circle"], "templates": ["a {}."],
                                "images": [{"image": "1.png", "label": "star"}]}))
    with pytest.raises(data.DataError, match=r"images\[0\].*'label' from 'classes'"):
        retrieval.read_classification_task(str(path))
    path.write_text(json.dumps({"classes": ["circle"], "templates": ["a circle."]}))
    with pytest.raises(data.DataError, match="'templates'"):
        retrieval.read_classification_task(str(path))


def test_react_settings_belong_to_the_clip_objective():
    for settings, message in ((dict(gated_image_layers=2), "gated_image_layers belongs to the clip"),
                              (dict(retrieval={"task": "t.json", "pool": "p.json", "per_concept": 5}),
                               "retrieval belongs to the clip")):
        with pytest.raises(ValueError, match=message):
            train.check_stage(train.StageConfig(name="s", objective="mllm", **settings))
    with pytest.raises(KeyError, match="retrieval needs 'task', 'pool', 'per_concept'"):
        train.check_stage(train.StageConfig(name="s", objective="clip", retrieval={"task": "t.json"}))
    with pytest.raises(ValueError, match="positive_threshold"):
        train.check_stage(train.StageConfig(name="s", objective="clip", positive_threshold=1.5))
