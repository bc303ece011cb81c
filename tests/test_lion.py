"""LION ("LION: Empowering MLLM with Dual-Level Visual Knowledge"): the vision aggregator (sec.
3.1.3, eqs. 4-5) against transformers' BertLayer, its initialization and the ViT layers it reads;
the mixture of adapters and its router (sec. 3.1.2, eqs. 1-3); the soft prompt (sec. 3.2); the
official checkpoint's key layout, whole and trimmed; the stage recipe's frozen and trained parts."""
import runpy
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers

from adapters import TASK_LEVELS, AdapterRouter, BottleneckAdapter, set_trainable
from checkpoints import LION_LAYOUT, CheckpointError, state_to_ours, state_to_theirs
from conftest import randomize, tiny_llama_config
from connectors import QFormerConfig, QFormerStage1, QFormerStage1Config, VisionAggregator, VisionAggregatorConfig
from model import MLLM, MLLMConfig, T5Config, T5LanguageModel, TextConfig
from vision import VisionConfig

ROOT = Path(__file__).resolve().parent.parent
VISION = VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                      image_size=28, patch_size=7)  # 16 patches + CLS
QFORMER = QFormerConfig(vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=40, encoder_hidden_size=32, use_qformer_text_input=True)
AGGREGATOR = dict(num_attention_heads=4, intermediate_size=40)
NUM_QUERIES, IMAGE, HINT = 5, 59, 58


def t5_config() -> T5Config:
    return T5Config(vocab_size=58, d_model=24, d_kv=6, d_ff=40, num_layers=2, num_decoder_layers=2, num_heads=4,
                    pad_token_id=0, decoder_start_token_id=0, eos_token_id=1)


def lion(text_config=None, seed: int = 0, **fields) -> MLLM:
    """A tiny LION: 4-block tower, 5 queries, the aggregator, 2 adapters per feed-forward, a hint
    id (58) outside the 58-word vocabulary; every parameter random except the adapters' zero up
    projections (LION's initialization), unless randomized afterwards."""
    torch.manual_seed(seed)
    config = MLLMConfig(vision_config=VISION, text_config=text_config or t5_config(), projector_type="lion",
                        qformer_config=QFORMER, num_query_tokens=NUM_QUERIES, image_token_index=IMAGE,
                        pad_token_id=0, vision_feature_layer=-1, vision_feature_select_strategy="full",
                        **{"aggregator_config": AGGREGATOR, "num_adapters": 2, "hint_token_index": HINT, **fields})
    model = randomize(MLLM(config), seed).eval()
    model.initialize_lion_parts()
    return model.eval()


def inputs(model: MLLM, text: list[int] = (5, HINT, 7, 8)) -> dict:
    ids = torch.tensor([[IMAGE] * model.num_image_tokens + list(text)] * 2)
    return dict(input_ids=ids, pixel_values=torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1)),
                attention_mask=torch.ones_like(ids), qformer_input_ids=torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0]]),
                qformer_attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]))


def t5_logits(model: MLLM, task_level=None, **overrides) -> torch.Tensor:
    with torch.no_grad():
        return model(**{**inputs(model), **overrides}, decoder_input_ids=torch.tensor([[0, 9, 10]] * 2),
                     task_level=task_level)


# ----------------------------------------------------------------------------------------------
# The vision aggregator

def test_aggregator_starts_with_zeroed_output_projections_and_counts_its_tokens():
    model = lion()
    blocks = model.multi_modal_projector.vision_aggregator.blocks
    assert len(blocks) == 2
    for block in blocks:
        for linear in (block.self_attn.o_proj, block.cross_attn.o_proj, block.mlp.fc2):
            assert not linear.weight.any() and not linear.bias.any()
        assert float(block.self_attn.q_proj.weight.detach().std()) == pytest.approx(0.02, rel=0.3)
    for visual_input, expected in (("ALL", NUM_QUERIES + 17), ("QFORMER", NUM_QUERIES), ("AGGREGATOR", 17)):
        model.multi_modal_projector.visual_input = visual_input
        assert model.num_image_tokens == expected
        features = model.image_features(inputs(model)["pixel_values"], *list(inputs(model).values())[3:])
        assert features.shape == (2, expected, 24)


@pytest.mark.parametrize("tapped, expected", [([], [3, 2, 1]), ([3, 1, 0], [3, 1, 0])])
def test_aggregator_reads_exactly_its_tapped_layers(tapped, expected):
    """Perturbing a ViT layer's output changes the aggregator's output exactly when it is tapped
    (block b's output is hidden state b + 1; the default is LION's (L-1, 2L/3, L/3))."""
    aggregator = VisionAggregator(VISION, VisionAggregatorConfig(**AGGREGATOR, tapped_layers=tapped))
    randomize(aggregator, seed=3)
    assert aggregator.tapped_layers == expected
    states = [torch.randn(1, 17, 32, generator=torch.Generator().manual_seed(index)) for index in range(5)]
    reference = aggregator(states)
    for index in range(5):
        perturbed = [state + (10.0 if position == index else 0.0) * torch.randn_like(state)
                     for position, state in enumerate(states)]
        assert (not torch.allclose(aggregator(perturbed), reference)) == (index - 1 in expected), index
    with pytest.raises(ValueError, match="tapped"):
        VisionAggregator(VISION, VisionAggregatorConfig(tapped_layers=[3, 9, 1]))


def test_aggregator_block_equals_transformers_bert_layer():
    """One aggregator block is an HF BertLayer with cross-attention (the official FusionAdapter's),
    its keys mapped by LION's layout; called as the official code calls it, without masks."""
    config = transformers.BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=40,
                                     add_cross_attention=True, is_decoder=True, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    reference = randomize(transformers.models.bert.modeling_bert.BertLayer(config), seed=5).eval()
    aggregator = VisionAggregator(VISION, VisionAggregatorConfig(**AGGREGATOR))
    theirs = {f"fusion_adapter.blocks.0.{key}": value for key, value in reference.state_dict().items()}
    ours = {key.removeprefix("multi_modal_projector.vision_aggregator.blocks.0."): value
            for key, value in state_to_ours(theirs, LION_LAYOUT).items()}
    block = aggregator.blocks[0]
    assert set(ours) == {key for key in block.state_dict() if not key.startswith("query_mlp")}
    block.load_state_dict(ours, strict=False)
    hidden, context = torch.randn(2, 17, 32), torch.randn(2, 17, 32)
    with torch.no_grad():
        expected = reference(hidden, encoder_hidden_states=context)
        expected = expected[0] if isinstance(expected, tuple) else expected
        assert torch.allclose(block(hidden, context=context), expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Adapters and the router

def test_router_with_one_hot_gates_is_the_selected_adapter_alone():
    router = AdapterRouter(16, bottleneck=4)
    for seed, adapter in enumerate(router.adapters):
        randomize(adapter, seed=seed)
    x = torch.randn(3, 5, 16)
    for level in TASK_LEVELS.values():
        router.task_level = level
        assert torch.allclose(router(x), router.adapters[level](x))
    router.task_level = torch.tensor([0, 1, 0])
    rows = router(x)
    assert torch.allclose(rows[1], router.adapters[1](x[1])) and torch.allclose(rows[2], router.adapters[0](x[2]))
    summed = AdapterRouter(16, bottleneck=4, learned_gates=False)
    summed.adapters.load_state_dict(router.adapters.state_dict())
    assert "router_gates" not in dict(summed.named_parameters())  # fixed: no trainable pattern reaches it
    set_trainable(summed, [r"."])
    assert torch.allclose(summed(x), router.adapters[0](x) + router.adapters[1](x))


def test_bottleneck_adapter_is_relu_bottleneck_times_a_learned_scale():
    adapter = BottleneckAdapter(8, bottleneck=3)
    assert not adapter.up_proj.weight.any() and adapter.scale.item() == 1.0
    randomize(adapter, seed=2)
    x = torch.randn(4, 8)
    expected = adapter.up_proj(torch.relu(adapter.down_proj(x))) * adapter.scale
    assert torch.allclose(adapter(x), expected)


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_fresh_adapters_leave_the_llm_unchanged_and_trained_ones_follow_the_task_level(family):
    text = t5_config() if family == "t5" else TextConfig.from_dict(tiny_llama_config(vocab_size=58).to_dict())
    with_adapters = lion(text)
    plain = lion(text, num_adapters=0)
    plain.load_state_dict({key: value for key, value in with_adapters.state_dict().items()
                           if "parallel_adapter" not in key})
    extra = {} if family == "llama" else {"decoder_input_ids": torch.tensor([[0, 9, 10]] * 2)}
    with torch.no_grad():
        assert torch.equal(with_adapters(**inputs(with_adapters), **extra),
                           plain(**inputs(plain), **extra))
        for name, parameter in with_adapters.named_parameters():
            if "up_proj" in name:
                parameter.normal_()
        region = with_adapters(**inputs(with_adapters), **extra, task_level=TASK_LEVELS["region"])
        image = with_adapters(**inputs(with_adapters), **extra, task_level=TASK_LEVELS["image"])
        per_row = with_adapters(**inputs(with_adapters), **extra, task_level=torch.tensor([0, 1]))
    assert not torch.allclose(region, plain(**inputs(plain), **extra)) and not torch.allclose(region, image)
    assert torch.allclose(per_row[0], region[0], atol=1e-5) and torch.allclose(per_row[1], image[1], atol=1e-5)
    blocks = [name for name, module in with_adapters.named_modules() if isinstance(module, AdapterRouter)]
    expected = 4 if family == "t5" else 2  # every feed-forward: 2 encoder + 2 decoder layers, or 2 decoder layers
    assert len(blocks) == expected


def test_beam_search_with_a_per_sample_task_level():
    model = lion()
    for name, parameter in model.named_parameters():
        if "up_proj" in name:
            torch.nn.init.normal_(parameter)
    batch = inputs(model)
    tokens = model.generate(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                            batch["qformer_input_ids"], batch["qformer_attention_mask"],
                            task_level=torch.tensor([0, 1]), num_beams=3, max_new_tokens=4)
    assert tokens.shape[0] == 2 and 1 <= tokens.shape[1] <= 4


# ----------------------------------------------------------------------------------------------
# The soft prompt

def test_the_soft_prompt_replaces_the_hint_and_is_the_only_trained_text_embedding():
    model = lion()
    embeds = model.embed(inputs(model)["input_ids"], inputs(model)["pixel_values"],
                         *list(inputs(model).values())[3:])
    hint_at = model.num_image_tokens + 1
    assert torch.equal(embeds[0, hint_at], model.soft_prompt_hint)
    assert HINT >= model.config.text_config.vocab_size  # the hint's id needs no row of its own
    before = t5_logits(model)
    with torch.no_grad():
        model.soft_prompt_hint.add_(1.0)
    assert not torch.allclose(t5_logits(model), before)
    trainable = set_trainable(model, [r"^soft_prompt_hint$", r"\.parallel_adapter\."])
    embedding_tables = [name for name in trainable if "shared" in name or "embed" in name or "hint" in name]
    assert embedding_tables == ["soft_prompt_hint"]


# ----------------------------------------------------------------------------------------------
# The official key layout

def test_save_load_round_trip_in_the_official_names(tmp_path):
    model = lion()
    for name, parameter in model.named_parameters():
        if "up_proj" in name or "router_gates" in name:
            torch.nn.init.normal_(parameter)
    model.save_pretrained(str(tmp_path))
    saved = safetensors.torch.load_file(tmp_path / "model.safetensors")
    shapes = {key: tuple(value.shape) for key, value in saved.items()}
    assert shapes["t5_model.encoder.block.0.layer.1.adapter.router_ratio1"] == (2, 24)
    assert shapes["t5_model.decoder.block.1.layer.2.adapter.adapters.1.up_proj.weight"] == (24, 64)
    assert shapes["t5_model.decoder.block.1.layer.2.adapter.adapters.0.scale"] == (1,)
    assert shapes["fusion_adapter.blocks.1.crossattention.self.key.weight"] == (32, 32)
    assert shapes["fusion_adapter.blocks.0.output.LayerNorm.weight"] == (32,)
    assert shapes["adapter_proj.0.weight"] == (128, 32) and shapes["adapter_proj.2.weight"] == (24, 128)
    assert shapes["ln_adapter.weight"] == shapes["ln_vision.weight"] == (32,)
    assert shapes["t5_proj.weight"] == (24, 24) and shapes["query_tokens"] == (1, NUM_QUERIES, 24)
    assert shapes["soft_prompt_hint"] == (24,)
    assert shapes["Qformer.bert.embeddings.LayerNorm.weight"] == (24,)
    assert shapes["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"] == (24, 32)
    assert shapes["Qformer.bert.encoder.layer.1.intermediate_query.dense.weight"] == (40, 24)
    assert shapes["t5_model.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] == (32, 4)
    assert shapes["visual_encoder.cls_token"] == (1, 1, 32) and shapes["visual_encoder.pos_embed"] == (1, 17, 32)
    assert shapes["visual_encoder.blocks.3.attn.qkv.weight"] == (96, 32)
    assert "visual_encoder.blocks.3.attn.q_bias" in shapes and "visual_encoder.blocks.3.norm2.weight" in shapes
    loaded = MLLM.from_pretrained(str(tmp_path)).eval()
    assert loaded.config.projector_type == "lion" and loaded.config.hint_token_index == HINT
    assert torch.equal(t5_logits(loaded, task_level=0), t5_logits(model, task_level=0))


def test_a_trimmed_release_loads_over_its_components_and_names_what_came_from_where(tmp_path, capsys):
    """The published LION-FlanT5-XL.pth holds what LION trained, not the frozen tower and T5:
    loaded over a stage-1 Q-Former checkpoint and a T5 checkpoint, it gives the full model."""
    model = lion()
    for name, parameter in model.named_parameters():
        if "up_proj" in name:
            torch.nn.init.normal_(parameter)
    stage1 = QFormerStage1(QFormerStage1Config(vision_config=VISION, qformer_config=QFORMER,
                                               num_query_tokens=NUM_QUERIES))
    stage1.initialize_weights()
    stage1.vision_tower.load_state_dict(model.vision_tower.state_dict())
    stage1.save_pretrained(str(tmp_path / "qformer"))
    t5 = T5LanguageModel(model.config.text_config)
    t5.load_state_dict({key: value for key, value in model.language_model.state_dict().items()
                        if "parallel_adapter" not in key})
    t5.save_pretrained(str(tmp_path / "t5"))
    theirs = state_to_theirs(model.state_dict(), LION_LAYOUT)
    trimmed = {key: value for key, value in theirs.items()
               if not key.startswith("visual_encoder.") and (not key.startswith("t5_model.") or ".adapter." in key)}
    (tmp_path / "release").mkdir()
    safetensors.torch.save_file(trimmed, tmp_path / "release" / "model.safetensors")
    fields = dict(projector_type="lion", aggregator_config=AGGREGATOR, num_adapters=2, hint_token_index=HINT,
                  image_token_index=IMAGE, pad_token_id=0)
    loaded = MLLM.from_pretrained(str(tmp_path / "release"), components=(str(tmp_path / "qformer"),
                                                                          str(tmp_path / "t5")), **fields).eval()
    # The vocabulary grew to hold the image token's id (59), as for any stage-2 start; the rest is equal.
    assert torch.allclose(t5_logits(loaded)[..., :58], t5_logits(model), atol=1e-5)
    report = capsys.readouterr().err
    assert "loaded" in report and "vision_tower.encoder" in report.split("kept as built:")[1]
    trimmed["fusion_adapter.blocks.9.attention.self.query.weight"] = torch.zeros(32, 32)
    safetensors.torch.save_file(trimmed, tmp_path / "release" / "model.safetensors")
    with pytest.raises(CheckpointError, match="blocks.9"):
        MLLM.from_pretrained(str(tmp_path / "release"), components=(str(tmp_path / "qformer"), str(tmp_path / "t5")),
                             **fields)


# ----------------------------------------------------------------------------------------------
# The recipe: each stage trains the paper's modules

def test_lion_flant5xl_stages_train_exactly_the_papers_modules():
    """LION, Fig. 4: stage 1 the Q-Former (with its projection and ln_vision) and the image-level
    adapter; stage 2 the aggregator, its MLP and the region-level adapter; stage 3 all of them,
    the router and the soft prompt. The tower and the T5's own weights never train."""
    config = runpy.run_path(str(ROOT / "configs" / "lion_flant5xl.py"),
                            init_globals={"__file__": str(ROOT / "configs" / "lion_flant5xl.py")})
    model = lion()

    def trained_groups(patterns: list[str]) -> set[str]:
        groups = set()
        for name in set_trainable(model, patterns):
            parts = name.split(".")
            if "parallel_adapter" in parts:
                at = parts.index("parallel_adapter")
                groups.add(".".join(parts[at:at + 3]) if parts[at + 1] == "adapters" else "router_gates")
            else:
                groups.add(".".join(parts[:2]) if parts[0] == "multi_modal_projector" else parts[0] + "." + parts[1]
                           if parts[0] == "vision_tower" else parts[0])
        return groups

    stages = {stage["name"]: trained_groups(stage["trainable"]) for stage in config["stages"]}
    qformer = {"multi_modal_projector.query_tokens", "multi_modal_projector.qformer",
               "multi_modal_projector.language_projection", "vision_tower.post_layernorm"}
    aggregator = {"multi_modal_projector.vision_aggregator", "multi_modal_projector.aggregator_projector"}
    assert stages["image"] == qformer | {"parallel_adapter.adapters.1"}
    assert stages["region"] == aggregator | {"parallel_adapter.adapters.0"}
    assert stages["all"] == qformer | aggregator | {"parallel_adapter.adapters.0", "parallel_adapter.adapters.1",
                                                    "router_gates", "soft_prompt_hint"}
    visual_inputs = [stage["visual_input"] for stage in config["stages"]]
    assert visual_inputs == ["QFORMER", "AGGREGATOR", "ALL"]
    assert [stage.get("task_levels") for stage in config["stages"]] == [["image"], ["region"], None]
