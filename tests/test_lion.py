"""LION ("LION: Empowering MLLM with Dual-Level Visual Knowledge"): the vision aggregator (sec.
3.1.3, eqs. 4-5), its initialization, the ViT layers it reads and its parity with the official
FusionAdapter's transformers BertLayer; the mixture of adapters and its router (sec. 3.1.2, eqs.
1-3); the soft prompt (sec. 3.2); the official checkpoint's key layout, whole and trimmed; beam
search with a task level per sample; the stage recipe's trained parts. Every model here is tiny
(EVA tower of 4 blocks at width 32, 17 positions; Q-Former 2 x 24; Flan-T5 2 + 2 layers at 24, or
a 2-layer LLaMA)."""
import copy
import re
import runpy
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers

from adapters import TASK_LEVELS, AdapterRouter, BottleneckAdapter, set_task_level, set_trainable
from checkpoints import LION_LAYOUT, CheckpointError, state_to_ours, state_to_theirs
from conftest import randomize, tiny_llama_config
from connectors import LIONConnector, QFormerConfig, VisionAggregator, VisionAggregatorConfig
from model import MLLM, MLLMConfig, T5Config, T5LanguageModel, TextConfig
from pretraining import QFormerStage1, QFormerStage1Config
from vision import EVAVisionConfig

ROOT = Path(__file__).resolve().parent.parent
VISION = EVAVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                         image_size=28, patch_size=7)  # 16 patches + CLS = 17 positions
POSITIONS = 17
QFORMER = QFormerConfig(vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=40, encoder_hidden_size=32, use_qformer_text_input=True,
                        max_position_embeddings=16)
AGGREGATOR = dict(num_attention_heads=4, intermediate_size=40)
VOCAB, NUM_QUERIES = 60, 5
IMAGE, HINT = 59, 60  # the image token inside the vocabulary (no growth on loading), the hint outside it
TEXT_WIDTH = 24


def t5_config() -> T5Config:
    return T5Config(vocab_size=VOCAB, d_model=TEXT_WIDTH, d_kv=6, d_ff=40, num_layers=2, num_decoder_layers=2,
                    num_heads=4, pad_token_id=0, decoder_start_token_id=0, eos_token_id=1, dense_act_fn="gelu")


def llama_config() -> TextConfig:
    return TextConfig.from_dict(tiny_llama_config(vocab_size=VOCAB, pad_token_id=0).to_dict())


def build_lion(text_config=None, seed: int = 0, **fields) -> MLLM:
    """A tiny LION with every parameter random (conftest.randomize), then LION's parts fresh
    (initialize_lion_parts: aggregator zero-output init, adapters with zero up projections, hint)."""
    torch.manual_seed(seed)
    values = dict(aggregator_config=AGGREGATOR, num_adapters=2, hint_token_index=HINT, adapter_bottleneck=8)
    config = MLLMConfig(vision_config=VISION, text_config=text_config or t5_config(), projector_type="lion",
                        qformer_config=QFORMER, num_query_tokens=NUM_QUERIES, image_token_index=IMAGE, pad_token_id=0,
                        vision_feature_layer=-1, vision_feature_select_strategy="full", **{**values, **fields})
    model = randomize(MLLM(config), seed)
    model.initialize_lion_parts()
    return model.eval()


def randomize_adapters(model: torch.nn.Module, seed: int = 7) -> None:
    """Trained-looking adapters: every up projection random (the rest of each adapter already is)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".up_proj." in name and "parallel_adapter" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))


def batch(model: MLLM, text=(5, HINT, 7, 8)) -> dict:
    """Two samples, one image each (image tokens first), the hint in the text."""
    ids = torch.tensor([[IMAGE] * model.num_image_tokens + list(text)] * 2)
    ids[1, -1] = 11
    return dict(input_ids=ids, pixel_values=torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1)),
                attention_mask=torch.ones_like(ids), qformer_input_ids=torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0]]),
                qformer_attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]))


def logits(model: MLLM, task_level=None, **overrides) -> torch.Tensor:
    extra = {}
    if model.config.text_config.is_encoder_decoder:
        extra["decoder_input_ids"] = torch.tensor([[0, 9, 10], [0, 12, 13]])
    with torch.no_grad():
        return model(**{**batch(model), **extra, **overrides}, task_level=task_level)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: intra-op threads only cost here, and on a 2-core machine that is
    busy elsewhere (a training run) they cost 100x. Restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lion_t5() -> MLLM:
    """Shared, read-only: tests that change a model take a copy.deepcopy."""
    return build_lion()


# ----------------------------------------------------------------------------------------------
# 1. The vision aggregator's initialization and its token counts

def test_aggregator_initialization_zeroes_exactly_the_output_projections():
    aggregator = randomize(VisionAggregator(VISION, VisionAggregatorConfig(**AGGREGATOR)), seed=1)
    aggregator.initialize_weights()
    assert len(aggregator.blocks) == 2
    for block in aggregator.blocks:
        zeroed = {block.self_attn.o_proj, block.cross_attn.o_proj, block.mlp.fc2}
        for name, linear in block.named_modules():
            if not isinstance(linear, torch.nn.Linear):
                continue
            if linear in zeroed:
                assert not linear.weight.any() and not linear.bias.any(), name
            else:  # BERT's: N(0, 0.02) weights, zero biases
                assert linear.weight.abs().min() > 0 and not linear.bias.any(), name
                assert float(linear.weight.detach().std()) == pytest.approx(0.02, rel=0.35), name
        for norm in (block.self_attn_norm, block.cross_attn_norm, block.mlp_norm):
            assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.bias.any()
    # Consequence: each fresh block is LayerNorms of its stream, blind to the context it crosses.
    states = [torch.randn(2, POSITIONS, 32, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    # Default taps (3, 2, 1): the stream starts at states[4]; states[3] and states[2] are context.
    other_context = [state if index == 4 else 3 * state + 1 for index, state in enumerate(states)]
    with torch.no_grad():
        assert torch.allclose(aggregator(states), aggregator(other_context), atol=1e-6)
        assert not torch.allclose(aggregator(states), aggregator([*states[:4], states[4] + 1.0]))


@pytest.mark.parametrize("visual_input, expected", [("ALL", NUM_QUERIES + POSITIONS), ("QFORMER", NUM_QUERIES),
                                                    ("AGGREGATOR", POSITIONS)])
def test_visual_input_decides_the_image_token_count(lion_t5, visual_input, expected):
    connector = LIONConnector(VISION, TEXT_WIDTH, QFORMER, NUM_QUERIES, VisionAggregatorConfig(**AGGREGATOR),
                              visual_input)
    assert connector.num_image_tokens == expected
    model = copy.deepcopy(lion_t5)
    model.multi_modal_projector.visual_input = visual_input
    assert model.num_image_tokens == expected
    inputs = batch(model)
    with torch.no_grad():
        features = model.image_features(inputs["pixel_values"], inputs["qformer_input_ids"],
                                        inputs["qformer_attention_mask"])
        assert features.shape == (2, expected, TEXT_WIDTH)
        assert model(**inputs, decoder_input_ids=torch.tensor([[0, 9]] * 2)).shape == (2, 2, VOCAB)
        short = {**inputs, "input_ids": inputs["input_ids"][:, 1:], "attention_mask": inputs["attention_mask"][:, 1:]}
        with pytest.raises(ValueError, match="image tokens"):  # the MLLM wants exactly that many
            model(**short, decoder_input_ids=torch.tensor([[0, 9]] * 2))


def test_all_is_the_qformer_tokens_then_the_aggregator_tokens_and_only_the_qformer_reads_ln_vision(lion_t5):
    model = copy.deepcopy(lion_t5)
    randomize(model.multi_modal_projector.vision_aggregator, seed=4)  # a trained aggregator reads its context
    inputs = batch(model)
    args = (inputs["pixel_values"], inputs["qformer_input_ids"], inputs["qformer_attention_mask"])

    def features(visual_input: str) -> torch.Tensor:
        model.multi_modal_projector.visual_input = visual_input
        with torch.no_grad():
            return model.image_features(*args)

    both, qformer, aggregator = features("ALL"), features("QFORMER"), features("AGGREGATOR")
    assert torch.allclose(both[:, :NUM_QUERIES], qformer, atol=1e-6)
    assert torch.allclose(both[:, NUM_QUERIES:], aggregator, atol=1e-6)
    with torch.no_grad():  # ln_vision (the tower's post_layernorm) is the Q-Former's input norm only
        model.vision_tower.post_layernorm.weight.mul_(1.7)
        model.vision_tower.post_layernorm.bias.add_(0.3)
    assert torch.equal(features("AGGREGATOR"), aggregator)
    assert not torch.allclose(features("QFORMER"), qformer)


# ----------------------------------------------------------------------------------------------
# 2. Which ViT layers the aggregator reads

@pytest.mark.parametrize("tapped, expected", [([], [3, 2, 1]), ([2, 0, 3], [2, 0, 3])])
def test_aggregator_reads_exactly_its_tapped_layers(tapped, expected):
    """hidden_states[0] is the embeddings, hidden_states[b + 1] block b's output: perturbing one
    changes the output exactly when block b is tapped (default: LION's (L-1, 2L/3, L/3))."""
    aggregator = randomize(VisionAggregator(VISION, VisionAggregatorConfig(**AGGREGATOR, tapped_layers=tapped)), 3)
    assert aggregator.tapped_layers == expected
    states = [torch.randn(2, POSITIONS, 32, generator=torch.Generator().manual_seed(index)) for index in range(5)]
    with torch.no_grad():
        reference = aggregator(states)
        for index in range(5):
            noise = torch.randn(2, POSITIONS, 32, generator=torch.Generator().manual_seed(10 + index))
            perturbed = [state + noise if position == index else state for position, state in enumerate(states)]
            assert (not torch.allclose(aggregator(perturbed), reference, atol=1e-5)) == (index - 1 in expected), index
        # The roles: the stream starts at tapped[0]; block b cross-attends tapped[b + 1].
        start, first, second = (states[layer + 1] for layer in expected)
        stream = aggregator.blocks[1](aggregator.blocks[0](start, context=first), context=second)
        assert torch.allclose(reference, aggregator.layernorm(stream), atol=1e-6)


def test_tapped_layers_must_exist_and_match_the_blocks():
    for bad in ([3, 4, 1], [3, 2], [3, 2, 1, 0], [-1, 2, 1]):
        with pytest.raises(ValueError, match="tapped"):
            VisionAggregator(VISION, VisionAggregatorConfig(**AGGREGATOR, tapped_layers=bad))


def test_the_tower_feeds_the_aggregator_block_b_as_its_output(lion_t5):
    """End to end in the MLLM: changing ViT block 3's weights changes the aggregator tokens when
    block 3 is tapped, and leaves them alone when only blocks 0-2 are."""
    for tapped, reads_block_3 in (([3, 2, 1], True), ([2, 1, 0], False)):
        model = build_lion(aggregator_config={**AGGREGATOR, "tapped_layers": tapped}, visual_input="AGGREGATOR")
        randomize(model.multi_modal_projector.vision_aggregator, seed=4)
        inputs = batch(model)
        with torch.no_grad():
            before = model.image_features(inputs["pixel_values"], inputs["qformer_input_ids"],
                                          inputs["qformer_attention_mask"])
            model.vision_tower.encoder.layers[3].mlp.fc2.weight.add_(0.5)
            after = model.image_features(inputs["pixel_values"], inputs["qformer_input_ids"],
                                         inputs["qformer_attention_mask"])
        assert (not torch.allclose(before, after)) == reads_block_3, tapped


# ----------------------------------------------------------------------------------------------
# 3. Parity with the official FusionAdapter's block: transformers' BertLayer

def bert_layer(seed: int) -> transformers.models.bert.modeling_bert.BertLayer:
    config = transformers.BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=40,
                                     add_cross_attention=True, is_decoder=True)
    # Eager attention: without an attention mask it is bidirectional, as the BertLayer of the
    # transformers 4.x the official code ran. transformers 5's "sdpa" turns is_decoder into a
    # causal self-attention when no mask is given (SDPA's is_causal), which LION never had.
    config._attn_implementation = "eager"
    return randomize(transformers.models.bert.modeling_bert.BertLayer(config), seed).eval()


def test_aggregator_block_equals_transformers_bert_layer():
    reference = bert_layer(seed=5)
    theirs = {f"fusion_adapter.blocks.0.{key}": value for key, value in reference.state_dict().items()}
    prefix = "multi_modal_projector.vision_aggregator.blocks.0."
    ours = state_to_ours(theirs, LION_LAYOUT)
    block = VisionAggregator(VISION, VisionAggregatorConfig(**AGGREGATOR)).blocks[0].eval()
    assert all(key.startswith(prefix) for key in ours)
    block.load_state_dict({key.removeprefix(prefix): value for key, value in ours.items()}, strict=True)
    hidden, context = torch.randn(2, POSITIONS, 32), torch.randn(2, 9, 32)
    with torch.no_grad():
        expected = reference(hidden, encoder_hidden_states=context)
        expected = expected[0] if isinstance(expected, tuple) else expected
        assert torch.allclose(block(hidden, context=context), expected, atol=1e-5)
        # The reference is bidirectional: the first position reads the last.
        moved = reference(torch.cat([hidden[:, :-1], hidden[:, -1:] + 1], 1), encoder_hidden_states=context)
        moved = moved[0] if isinstance(moved, tuple) else moved
        assert not torch.allclose(moved[:, 0], expected[:, 0])


def test_aggregator_block_keys_are_a_bert_layers():
    reference = bert_layer(seed=5)
    block = VisionAggregator(VISION, VisionAggregatorConfig(**AGGREGATOR)).blocks[0]
    prefix = "multi_modal_projector.vision_aggregator.blocks.0."
    converted = state_to_theirs({prefix + key: value for key, value in block.state_dict().items()}, LION_LAYOUT)
    assert set(converted) == {f"fusion_adapter.blocks.0.{key}" for key in reference.state_dict()}
    for key, value in reference.state_dict().items():
        assert converted[f"fusion_adapter.blocks.0.{key}"].shape == value.shape, key


# ----------------------------------------------------------------------------------------------
# 4. The router

def trained_router(learned_gates: bool = True) -> AdapterRouter:
    router = AdapterRouter(16, bottleneck=4, learned_gates=learned_gates)
    for seed, adapter in enumerate(router.adapters):
        randomize(adapter, seed=seed + 1)
    return router


def test_router_starts_one_hot_each_level_reading_its_own_adapter():
    router = trained_router()
    assert router.router_gates.shape == (2, 2, 16) and router.router_gates.requires_grad
    expected_gates = torch.zeros(2, 2, 16)
    expected_gates[0, 0] = expected_gates[1, 1] = 1.0
    assert torch.equal(router.router_gates.detach(), expected_gates)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        alone = [adapter(x) for adapter in router.adapters]
        assert not torch.allclose(alone[0], alone[1])
        for level in TASK_LEVELS.values():
            router.task_level = level
            assert torch.allclose(router(x), alone[level], atol=1e-6)
        router.task_level = torch.tensor([0, 1, 0])
        rows = router(x)
        for row, level in enumerate([0, 1, 0]):
            assert torch.allclose(rows[row], alone[level][row], atol=1e-6)
        # Beam search repeats each sample's rows in place: 2 samples x 3 beams.
        router.task_level = torch.tensor([1, 0])
        beams = torch.randn(6, 5, 16)
        rows = router(beams)
        assert torch.allclose(rows[:3], router.adapters[1](beams[:3]), atol=1e-6)
        assert torch.allclose(rows[3:], router.adapters[0](beams[3:]), atol=1e-6)
        # A mixed gate: each adapter times its own per-channel gate.
        router.router_gates.copy_(torch.rand(2, 2, 16))
        router.task_level = 1
        mixed = router.router_gates[0, 1] * alone[0] + router.router_gates[1, 1] * alone[1]
        assert torch.allclose(router(x), mixed, atol=1e-6)


def test_router_without_learned_gates_sums_the_adapters_and_never_trains_the_gates():
    router = trained_router(learned_gates=False)
    assert not router.router_gates.requires_grad
    assert "router_gates" not in dict(router.named_parameters())
    set_trainable(router, [r"."])
    assert not router.router_gates.requires_grad
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        total = router.adapters[0](x) + router.adapters[1](x)
        for level in (0, 1, torch.tensor([1, 0, 1])):
            router.task_level = level
            assert torch.allclose(router(x), total, atol=1e-6)


def test_bottleneck_adapter_is_relu_bottleneck_times_a_learned_scale():
    adapter = BottleneckAdapter(8, bottleneck=3)
    assert not adapter.up_proj.weight.any() and not adapter.up_proj.bias.any() and adapter.scale.item() == 1.0
    randomize(adapter, seed=2)
    x = torch.randn(4, 8)
    expected = adapter.up_proj(torch.relu(adapter.down_proj(x))) * adapter.scale
    assert torch.allclose(adapter(x), expected)


def test_set_task_level_sets_every_router_and_none_is_image_level():
    model = torch.nn.ModuleList([trained_router(), trained_router()])
    levels = torch.tensor([0, 1])
    set_task_level(model, levels)
    assert all(router.task_level is levels for router in model)
    set_task_level(model, TASK_LEVELS["region"])
    assert all(router.task_level == TASK_LEVELS["region"] for router in model)
    set_task_level(model, None)
    assert all(router.task_level == TASK_LEVELS["image"] for router in model)


# ----------------------------------------------------------------------------------------------
# 5. Fresh adapters (zero up projection) leave the LLM as it was

@pytest.mark.parametrize("family", ["t5", "llama"])
def test_fresh_adapters_leave_the_llm_unchanged_and_trained_ones_follow_the_task_level(family):
    text = t5_config() if family == "t5" else llama_config()
    with_adapters = build_lion(text)
    routers = [module for module in with_adapters.language_model.modules() if isinstance(module, AdapterRouter)]
    assert len(routers) == (4 if family == "t5" else 2)  # one per feed-forward: 2 encoder + 2 decoder, or 2 layers
    for router in routers:
        for adapter in router.adapters:
            assert not adapter.up_proj.weight.any() and not adapter.up_proj.bias.any()
            assert adapter.down_proj.weight.any()
    plain = build_lion(text, num_adapters=0)
    assert not any(isinstance(module, AdapterRouter) for module in plain.modules())
    plain.load_state_dict({key: value for key, value in with_adapters.state_dict().items()
                           if ".parallel_adapter." not in key})
    reference = logits(plain)
    for level in (0, 1):
        assert torch.equal(logits(with_adapters, task_level=level), reference)
    randomize_adapters(with_adapters)
    region, image = logits(with_adapters, task_level=0), logits(with_adapters, task_level=1)
    assert not torch.allclose(region, reference, atol=1e-3) and not torch.allclose(image, reference, atol=1e-3)
    assert not torch.allclose(region, image, atol=1e-3)
    per_row = logits(with_adapters, task_level=torch.tensor([0, 1]))
    assert torch.allclose(per_row[0], region[0], atol=1e-5) and torch.allclose(per_row[1], image[1], atol=1e-5)
    assert torch.equal(logits(with_adapters), image)  # no task level: image-level


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_the_adapter_reads_the_feed_forwards_input_before_its_norm(family):
    """LION eq. 1 as the official forward_ffn_t5: h + FFN(norm(h)) + adapters(h), the adapters on
    the feed-forward's input h itself, not on the normalized h the FFN reads."""
    model = build_lion(t5_config() if family == "t5" else llama_config())
    randomize_adapters(model)
    block = (model.language_model.decoder if family == "t5" else model.language_model.model).layers[1]
    with torch.no_grad():  # a norm far from the identity on h
        block.post_attention_layernorm.weight.mul_(3.0)
    seen = []
    block.post_attention_layernorm.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    x = torch.randn(2, 3, TEXT_WIDTH if family == "t5" else 32, generator=torch.Generator().manual_seed(2))
    extra = {"context": torch.randn(2, 4, TEXT_WIDTH)} if family == "t5" else {}
    router = block.parallel_adapter
    with torch.no_grad():
        for level in (0, 1):
            router.task_level = level
            with_adapter = block(x, **extra)
            h = seen[-1]
            block.parallel_adapter = None
            without = block(x, **extra)
            block.parallel_adapter = router
            assert torch.allclose(with_adapter - without, router.adapters[level](h), atol=1e-5)
            assert not torch.allclose(with_adapter - without, router.adapters[level](block.post_attention_layernorm(h)),
                                      atol=1e-3)


def adapter_gradients(model: MLLM, task_level, checkpointing: bool) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model).train()
    model.language_model.gradient_checkpointing = checkpointing
    inputs = batch(model)
    if model.config.text_config.is_encoder_decoder:
        labels = torch.tensor([[9, 10, 1], [12, 13, 1]])
    else:
        labels = inputs["input_ids"].masked_fill((inputs["input_ids"] == IMAGE) | (inputs["input_ids"] == HINT), -100)
    _, loss = model(**inputs, labels=labels, task_level=task_level)
    loss.backward()
    return {name: parameter.grad for name, parameter in model.named_parameters() if ".parallel_adapter." in name}


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_gradient_checkpointing_recomputes_each_layer_at_the_batchs_task_level(family):
    """With gradient checkpointing the backward pass runs every layer's forward again; the
    adapters must then read the batch's task level, not whatever the routers were reset to when
    MLLM.forward returned: the gradients equal those without checkpointing. (A region-level
    batch whose recomputation reads the image-level gates trains the image-level adapter.)"""
    model = build_lion(t5_config() if family == "t5" else llama_config())
    randomize_adapters(model)
    for level in (TASK_LEVELS["region"], torch.tensor([0, 1])):
        plain = adapter_gradients(model, level, checkpointing=False)
        recomputed = adapter_gradients(model, level, checkpointing=True)
        wrong = [name for name, grad in plain.items() if not torch.allclose(recomputed[name], grad, atol=1e-5)]
        assert not wrong, f"task level {level.tolist() if isinstance(level, torch.Tensor) else level}: {wrong[:4]}"


# ----------------------------------------------------------------------------------------------
# 6. The soft prompt

def test_the_soft_prompt_stands_at_the_hint_positions(lion_t5):
    model = copy.deepcopy(lion_t5)
    assert HINT >= model.config.text_config.vocab_size  # the hint needs no row of the vocabulary
    inputs = batch(model)
    with torch.no_grad():
        embeds = model.embed(inputs["input_ids"], inputs["pixel_values"], inputs["qformer_input_ids"],
                             inputs["qformer_attention_mask"])
    is_hint = inputs["input_ids"] == HINT
    assert is_hint.sum() == 2
    assert torch.equal(embeds[is_hint], model.soft_prompt_hint.detach().expand(2, -1))
    text = (inputs["input_ids"] != HINT) & (inputs["input_ids"] != IMAGE)
    assert torch.equal(embeds[text], model.language_model.shared.weight[inputs["input_ids"][text]])
    before = logits(model)
    with torch.no_grad():
        model.soft_prompt_hint.add_(1.0)
    after = logits(model)
    assert not torch.allclose(after, before, atol=1e-4)
    # Without a hint in the text the soft prompt is not read.
    no_hint = batch(model, text=(5, 6, 7, 8))
    changed = {"input_ids": no_hint["input_ids"]}
    plain = logits(model, **changed)
    with torch.no_grad():
        model.soft_prompt_hint.add_(1.0)
    assert torch.equal(logits(model, **changed), plain)


def test_only_the_soft_prompt_trains_among_the_text_embeddings(lion_t5):
    model = copy.deepcopy(lion_t5).train()
    trainable = set_trainable(model, [r"^soft_prompt_hint$", r"parallel_adapter"])
    assert "soft_prompt_hint" in trainable
    assert all(name == "soft_prompt_hint" or ".parallel_adapter." in name for name in trainable)
    randomize_adapters(model)
    inputs = batch(model)
    labels = torch.tensor([[9, 10, 1], [12, 13, 1]])
    _, loss = model(**inputs, labels=labels, task_level=0)
    loss.backward()
    assert model.soft_prompt_hint.grad is not None and model.soft_prompt_hint.grad.any()
    for name, parameter in model.named_parameters():
        if name != "soft_prompt_hint" and ".parallel_adapter." not in name:
            assert parameter.grad is None, name
    assert model.language_model.shared.weight.grad is None and model.language_model.lm_head.weight.grad is None


# ----------------------------------------------------------------------------------------------
# 7. The official key layout

# Every key of the official LION (lion_t5.py on LAVIS): EVA ViT-g, ln_vision, query_tokens, the
# LAVIS Q-Former, t5_proj, the FusionAdapter's BertLayers, ln_adapter, adapter_proj, the soft
# prompt, and transformers' T5ForConditionalGeneration with an AdapterRouter in each feed-forward.
BERT_LAYER = (r"(attention|crossattention)\.(self\.(query|key|value)|output\.(dense|LayerNorm))"
              r"|intermediate(_query)?\.dense|output(_query)?\.(dense|LayerNorm)")
T5_BLOCK = (r"layer\.0\.(SelfAttention\.[qkvo]|layer_norm)|layer\.1\.(EncDecAttention\.[qkvo]|layer_norm)"
            r"|layer\.[12]\.(DenseReluDense\.(wi_0|wi_1|wo)|layer_norm)")
OFFICIAL_KEYS = [re.compile(pattern) for pattern in (
    r"visual_encoder\.(cls_token|pos_embed|patch_embed\.proj\.(weight|bias))",
    r"visual_encoder\.blocks\.\d+\.(norm[12]\.(weight|bias)|attn\.(qkv\.weight|q_bias|v_bias|proj\.(weight|bias))"
    r"|mlp\.fc[12]\.(weight|bias))",
    r"ln_vision\.(weight|bias)", r"query_tokens", r"t5_proj\.(weight|bias)", r"soft_prompt_hint",
    r"Qformer\.bert\.embeddings\.(word_embeddings\.weight|position_embeddings\.weight|LayerNorm\.(weight|bias))",
    rf"Qformer\.bert\.encoder\.layer\.\d+\.({BERT_LAYER})\.(weight|bias)",
    rf"fusion_adapter\.blocks\.\d+\.({BERT_LAYER})\.(weight|bias)",
    r"ln_adapter\.(weight|bias)", r"adapter_proj\.[02]\.(weight|bias)",
    r"t5_model\.(shared|lm_head)\.weight", r"t5_model\.(encoder|decoder)\.final_layer_norm\.weight",
    r"t5_model\.(encoder|decoder)\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight",
    rf"t5_model\.(encoder|decoder)\.block\.\d+\.({T5_BLOCK})\.weight",
    r"t5_model\.encoder\.block\.\d+\.layer\.1\.adapter\.(adapters\.[01]\.(down_proj|up_proj)\.(weight|bias)"
    r"|adapters\.[01]\.scale|router_ratio[12])",
    r"t5_model\.decoder\.block\.\d+\.layer\.2\.adapter\.(adapters\.[01]\.(down_proj|up_proj)\.(weight|bias)"
    r"|adapters\.[01]\.scale|router_ratio[12])",
)]


def trained(model: MLLM) -> MLLM:
    """A copy whose LION parts look trained (nothing zero, gates not one-hot), so that a key
    loaded into the wrong place shows in the logits."""
    model = copy.deepcopy(model)
    randomize(model.multi_modal_projector.vision_aggregator, seed=11)
    randomize_adapters(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("router_gates"):
                parameter.uniform_(0.2, 1.0)
    return model


def test_save_writes_the_official_names_and_loads_back(lion_t5, tmp_path):
    model = trained(lion_t5)
    model.save_pretrained(str(tmp_path))
    saved = safetensors.torch.load_file(tmp_path / "model.safetensors")
    strays = [key for key in saved if not any(pattern.fullmatch(key) for pattern in OFFICIAL_KEYS)]
    assert not strays, strays
    assert all(any(pattern.fullmatch(key) for key in saved) for pattern in OFFICIAL_KEYS)
    # Ours to theirs: q/k/v weights fused in each of the 4 EVA blocks, 2 gate rows for each of the 4 routers.
    assert len(saved) == len(model.state_dict()) - 4 * (3 - 1) + 4 * (2 - 1)
    shapes = {key: tuple(value.shape) for key, value in saved.items()}
    assert shapes["visual_encoder.blocks.3.attn.qkv.weight"] == (96, 32)
    assert shapes["visual_encoder.blocks.0.attn.q_bias"] == shapes["visual_encoder.blocks.0.attn.v_bias"] == (32,)
    assert shapes["visual_encoder.cls_token"] == (1, 1, 32) and shapes["visual_encoder.pos_embed"] == (1, POSITIONS, 32)
    assert shapes["visual_encoder.patch_embed.proj.weight"] == (32, 3, 7, 7)
    assert shapes["ln_vision.weight"] == shapes["ln_adapter.weight"] == (32,)
    assert shapes["query_tokens"] == (1, NUM_QUERIES, 24) and shapes["t5_proj.weight"] == (TEXT_WIDTH, 24)
    assert shapes["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"] == (24, 32)
    assert shapes["fusion_adapter.blocks.1.crossattention.self.key.weight"] == (32, 32)
    assert shapes["fusion_adapter.blocks.0.intermediate.dense.weight"] == (40, 32)
    assert shapes["adapter_proj.0.weight"] == (128, 32) and shapes["adapter_proj.2.weight"] == (TEXT_WIDTH, 128)
    assert shapes["soft_prompt_hint"] == (TEXT_WIDTH,)
    assert shapes["t5_model.encoder.block.1.layer.1.adapter.router_ratio1"] == (2, TEXT_WIDTH)
    assert shapes["t5_model.decoder.block.0.layer.2.adapter.router_ratio2"] == (2, TEXT_WIDTH)
    assert shapes["t5_model.decoder.block.1.layer.2.adapter.adapters.1.up_proj.weight"] == (TEXT_WIDTH, 8)
    assert shapes["t5_model.encoder.block.0.layer.1.adapter.adapters.0.scale"] == (1,)
    # router_ratioK is adapter K's gate row per task level (official: output_K * router_ratioK[router_idx]).
    router = model.language_model.encoder.layers[1].parallel_adapter
    for k in (1, 2):
        assert torch.equal(saved[f"t5_model.encoder.block.1.layer.1.adapter.router_ratio{k}"],
                           router.router_gates[k - 1].detach())
    loaded = MLLM.from_pretrained(str(tmp_path)).eval()
    assert loaded.config.projector_type == "lion" and loaded.config.hint_token_index == HINT
    assert loaded.config.aggregator_config == model.config.aggregator_config
    for level in (0, 1):
        assert torch.equal(logits(loaded, task_level=level), logits(model, task_level=level))


@pytest.fixture(scope="module")
def components(lion_t5, tmp_path_factory) -> tuple[str, str]:
    """A stage-1 Q-Former checkpoint (pretraining.QFormerStage1) holding lion_t5's tower, and a
    T5ForConditionalGeneration checkpoint holding its T5 (without the adapters)."""
    directory = tmp_path_factory.mktemp("components")
    torch.manual_seed(0)
    stage1 = QFormerStage1(QFormerStage1Config(vision_config=VISION, qformer_config=QFORMER,
                                               num_query_tokens=NUM_QUERIES))
    stage1.initialize_weights()
    stage1.vision_tower.load_state_dict(lion_t5.vision_tower.state_dict())
    stage1.save_pretrained(str(directory / "qformer"))
    t5 = T5LanguageModel(lion_t5.config.text_config)
    t5.load_state_dict({key: value for key, value in lion_t5.language_model.state_dict().items()
                        if ".parallel_adapter." not in key})
    t5.save_pretrained(str(directory / "t5"))
    return str(directory / "qformer"), str(directory / "t5")


LION_FIELDS = dict(projector_type="lion", aggregator_config=AGGREGATOR, num_adapters=2, adapter_bottleneck=8,
                   hint_token_index=HINT, image_token_index=IMAGE, pad_token_id=0)


def test_a_trimmed_release_loads_over_its_components(lion_t5, components, tmp_path, capsys):
    """The published LION-FlanT5-XL.pth holds what LION trained, not the frozen tower and T5:
    loaded over a stage-1 Q-Former checkpoint and a T5 checkpoint with the same tower and T5,
    it is the full model."""
    model = trained(lion_t5)
    full = state_to_theirs(model.state_dict(), LION_LAYOUT)
    trimmed = {key: value for key, value in full.items()
               if not key.startswith("visual_encoder.") and (not key.startswith("t5_model.") or ".adapter." in key)}
    assert any(key.startswith("t5_model.") for key in trimmed) and len(trimmed) < len(full)
    safetensors.torch.save_file(trimmed, tmp_path / "model.safetensors")  # and no config.json
    capsys.readouterr()
    loaded = MLLM.from_pretrained(str(tmp_path), components=components, **LION_FIELDS).eval()
    loaded_parts, kept_parts = capsys.readouterr().err.split("kept as built:")  # the loader says what came from where
    assert "multi_modal_projector.vision_aggregator" in loaded_parts and "vision_tower.encoder" in kept_parts
    for level in (0, 1):
        assert torch.equal(logits(loaded, task_level=level), logits(model, task_level=level))
    safetensors.torch.save_file({**trimmed, "fusion_adapter.blocks.9.attention.self.query.weight": torch.zeros(32, 32)},
                                tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"blocks\.9\."):
        MLLM.from_pretrained(str(tmp_path), components=components, **LION_FIELDS)


def test_a_fresh_lion_from_components_reading_the_qformer_is_instructblip(components):
    """from_qformer_and_language(projector_type="lion"): LION's parts start fresh and change
    nothing, so with visual_input QFORMER it is InstructBLIP from the same checkpoints (same
    seed, so the same language_projection); with ALL it runs, every parameter finite."""
    torch.manual_seed(3)
    instructblip = MLLM.from_qformer_and_language(*components, instruction_aware=True, image_token_index=IMAGE,
                                                  pad_token_id=0).eval()
    torch.manual_seed(3)
    lion = MLLM.from_qformer_and_language(*components, instruction_aware=True, visual_input="QFORMER",
                                          **LION_FIELDS).eval()
    assert all(torch.isfinite(parameter).all() for parameter in lion.parameters())
    aggregator = lion.multi_modal_projector.vision_aggregator
    assert not aggregator.blocks[0].cross_attn.o_proj.weight.any() and torch.equal(
        aggregator.layernorm.weight, torch.ones_like(aggregator.layernorm.weight))
    assert lion.soft_prompt_hint.any()
    no_hint = dict(input_ids=batch(lion, text=(5, 6, 7, 8))["input_ids"])
    for level in (0, 1):
        assert torch.equal(logits(lion, task_level=level, **no_hint), logits(instructblip, **no_hint))
    lion.multi_modal_projector.visual_input = "ALL"
    assert torch.isfinite(logits(lion)).all()


# ----------------------------------------------------------------------------------------------
# 8. Generation with a task level per sample

def test_beam_search_with_a_task_level_per_sample(lion_t5):
    model = copy.deepcopy(lion_t5)
    randomize_adapters(model)
    inputs = batch(model)
    args = [inputs[key] for key in ("input_ids", "pixel_values", "attention_mask", "qformer_input_ids",
                                    "qformer_attention_mask")]
    options = dict(num_beams=3, max_new_tokens=4)
    tokens = model.generate(*args, task_level=torch.tensor([0, 1]), **options)
    assert tokens.shape[0] == 2 and 1 <= tokens.shape[1] <= 4 and tokens.dtype == torch.long
    # Each row is what that sample gets alone at its own level, and the levels matter.
    for row, level in enumerate((0, 1)):
        alone = model.generate(*[arg[row:row + 1] for arg in args], task_level=level, **options)
        assert torch.equal(tokens[row, :alone.shape[1]], alone[0]) and not tokens[row, alone.shape[1]:].any()
    assert not torch.equal(model.generate(*args, task_level=torch.tensor([1, 0]), **options), tokens)
    # Greedy: the first token of each row is the argmax of that row's level's logits.
    first = model.generate(*args, task_level=torch.tensor([0, 1]), max_new_tokens=1)[:, 0]
    start = torch.tensor([[0], [0]])
    expected = [int(logits(model, task_level=level, decoder_input_ids=start)[row, 0].argmax())
                for row, level in ((0, 0), (1, 1))]
    assert first.tolist() == expected


# ----------------------------------------------------------------------------------------------
# The recipe: each stage trains the paper's modules

def test_lion_flant5xl_stages_train_exactly_the_papers_modules(lion_t5):
    """LION, Fig. 4: stage 1 the Q-Former (with its projection and ln_vision) and the image-level
    adapter; stage 2 the aggregator, its MLP and the region-level adapter; stage 3 all of them,
    the router and the soft prompt. The tower and the T5's own weights never train."""
    config = runpy.run_path(str(ROOT / "configs" / "lion_flant5xl.py"),
                            init_globals={"__file__": str(ROOT / "configs" / "lion_flant5xl.py")})
    model = copy.deepcopy(lion_t5)

    def trained_groups(patterns: list[str]) -> set[str]:
        groups = set()
        for name in set_trainable(model, patterns):
            parts = name.split(".")
            if "parallel_adapter" in parts:
                at = parts.index("parallel_adapter")
                groups.add(".".join(parts[at:at + 3]) if parts[at + 1] == "adapters" else "router_gates")
            else:
                groups.add(".".join(parts[:2]) if parts[0] in ("multi_modal_projector", "vision_tower") else parts[0])
        return groups

    stages = {stage["name"]: trained_groups(stage["trainable"]) for stage in config["stages"]}
    qformer = {"multi_modal_projector.query_tokens", "multi_modal_projector.qformer",
               "multi_modal_projector.language_projection", "vision_tower.post_layernorm"}
    aggregator = {"multi_modal_projector.vision_aggregator", "multi_modal_projector.aggregator_projector"}
    assert stages["image"] == qformer | {"parallel_adapter.adapters.1"}
    assert stages["region"] == aggregator | {"parallel_adapter.adapters.0"}
    assert stages["all"] == qformer | aggregator | {"parallel_adapter.adapters.0", "parallel_adapter.adapters.1",
                                                    "router_gates", "soft_prompt_hint"}
    assert [stage["visual_input"] for stage in config["stages"]] == ["QFORMER", "AGGREGATOR", "ALL"]
    assert [stage.get("task_levels") for stage in config["stages"]] == [["image"], ["region"], None]
