"""Lynx ("What Matters in Training a GPT4-Style Language Model with Multimodal Inputs?"): the Perceiver
resampler (sec. 2.1) against a plain-tensor re-computation of the official equations, its media-only
keys and values, video frames; the adapters after every second layer (Fig. 3b); left padding with
cumsum positions; the "lynx" template and eval's use of it; the decoding preset; the official
checkpoint layout (bridge.*, LLM.*, vision_encoder.* with q/k/v split), whole and partial; the
resolution-enhancement stage. Every model is tiny (EVA tower of 2 blocks at width 32, a 4-layer
LLaMA at width 32)."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

import eval as evaluation
import train
from adapters import OutputAdapter
from checkpoints import LYNX_LAYOUT, state_to_theirs
from conftest import randomize, tiny_llama_config
from connectors import PerceiverResampler, ResamplerConfig
from conversation import format_conversation, render_conversation, show_supervision
from model import LanguageModel, MLLM, MLLMConfig, TextConfig
from vision import EVAVisionConfig

ROOT = Path(__file__).resolve().parent.parent
VISION = EVAVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         image_size=28, patch_size=7)  # 16 patches + CLS
RESAMPLER = dict(num_latents=5, depth=2, num_attention_heads=2, head_dim=8, ff_mult=4)
VOCAB, IMAGE, PAD, BOS = 60, 59, 0, 1
LYNX_FIELDS = dict(projector_type="resampler", resampler_config=RESAMPLER, output_adapter_every=2,
                   image_token_index=IMAGE, pad_token_id=PAD)


def llama_config() -> TextConfig:
    return TextConfig.from_dict(tiny_llama_config(vocab_size=VOCAB, pad_token_id=PAD, num_hidden_layers=4).to_dict())


def build_lynx(seed: int = 0, **fields) -> MLLM:
    torch.manual_seed(seed)
    config = MLLMConfig(vision_config=VISION, text_config=llama_config(), **{**LYNX_FIELDS, **fields})
    return randomize(MLLM(config), seed)


def official_resampler(state: dict, media: torch.Tensor, depth: int, heads: int) -> torch.Tensor:
    """bytedance/lynx-llm `bridges/resampler.py` in plain tensors, from the official keys."""
    latents = state["bridge.latents"].expand(media.shape[0], -1, -1)
    for layer in range(depth):
        key = f"bridge.layers.{layer}."
        x = F.layer_norm(media, media.shape[-1:], state[key + "0.norm_media.weight"], state[key + "0.norm_media.bias"])
        queries_in = F.layer_norm(latents, latents.shape[-1:], state[key + "0.norm_latents.weight"],
                                  state[key + "0.norm_latents.bias"])
        q = queries_in @ state[key + "0.to_q.weight"].T
        k, v = (x @ state[key + "0.to_kv.weight"].T).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
        similarity = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
        attention = (similarity - similarity.amax(-1, keepdim=True)).softmax(-1)
        latents = (attention @ v).transpose(1, 2).flatten(2) @ state[key + "0.to_out.weight"].T + latents
        hidden = F.layer_norm(latents, latents.shape[-1:], state[key + "1.0.weight"], state[key + "1.0.bias"])
        latents = F.gelu(hidden @ state[key + "1.1.weight"].T) @ state[key + "1.3.weight"].T + latents
    return F.layer_norm(latents, latents.shape[-1:], state["bridge.norm.weight"], state["bridge.norm.bias"])


def test_resampler_matches_the_official_equations_and_sizes():
    model = build_lynx()
    resampler = model.multi_modal_projector
    media = torch.randn(3, 17, 32)
    ours = resampler.project(media)
    assert ours.shape == (3, 5, 32) and resampler.num_image_tokens == 5
    theirs = state_to_theirs({f"multi_modal_projector.{k}": v for k, v in resampler.state_dict().items()}, LYNX_LAYOUT)
    assert theirs["bridge.layers.0.0.to_kv.weight"].shape == (2 * 16, 32)  # 2 heads of 8, for k and v
    assert theirs["bridge.layers.1.1.1.weight"].shape == (4 * 32, 32) and "bridge.layers.1.1.1.bias" not in theirs
    torch.testing.assert_close(ours, official_resampler(theirs, media, depth=2, heads=2), rtol=1e-5, atol=1e-5)
    # An image reaches the resampler as the tower's raw last layer, class token included (901 at 420 px).
    pixels = torch.randn(2, 3, 28, 28)
    raw = model.vision_tower(pixels)[-1]
    torch.testing.assert_close(model.image_features(pixels), resampler.project(raw))


def test_latents_never_enter_the_keys_and_values():
    resampler = build_lynx().multi_modal_projector
    seen = []
    for layer in resampler.layers:
        for projection in (layer.cross_attn.k_proj, layer.cross_attn.v_proj):
            projection.register_forward_hook(lambda module, inputs, output: seen.append(output.detach().clone()))
    media = torch.randn(2, 17, 32)
    before = resampler.project(media)
    first, seen[:] = list(seen), []
    with torch.no_grad():
        resampler.latents.add_(torch.randn_like(resampler.latents))
    after = resampler.project(media)
    assert not torch.allclose(before, after)  # the latents matter, as queries...
    assert len(seen) == len(first) == 4 and all(torch.equal(a, b) for a, b in zip(first, seen))  # ...never as k, v


def test_video_frames_get_their_positions_and_are_concatenated():
    resampler = PerceiverResampler(VISION, 32, ResamplerConfig(**{**RESAMPLER, "num_frames": 3}))
    frames = torch.randn(2, 3, 17, 32)
    expected = resampler.project((frames + resampler.frame_position_embedding).flatten(1, 2))
    torch.testing.assert_close(resampler.project(frames), expected)
    assert resampler.frame_position_embedding.shape == (1, 3, 1, 32)
    with pytest.raises(ValueError, match="a video of 2 frames, but this resampler has frame positions for 3"):
        resampler.project(frames[:, :2])
    model = build_lynx(resampler_config={**RESAMPLER, "num_frames": 3})
    video = torch.randn(1, 3, 3, 28, 28)
    per_frame = model.vision_tower(video[0])[-1]
    torch.testing.assert_close(model.image_features(video), model.multi_modal_projector.project(per_frame[None]))


def test_adapters_sit_after_every_second_layer_on_its_output():
    model = build_lynx()
    layers = model.language_model.model.layers
    assert [index for index, layer in enumerate(layers) if layer.output_adapter is not None] == [0, 2]
    assert all(layer.parallel_adapter is None for layer in layers)
    adapter = layers[2].output_adapter
    assert adapter.down_proj.out_features == 16  # half the width
    h = torch.randn(2, 3, 32)
    expected = adapter.scale * adapter.up_proj(F.silu(adapter.down_proj(F.layer_norm(h, (32,), adapter.norm.weight,
                                                                                     adapter.norm.bias))))
    torch.testing.assert_close(adapter(h), expected)
    layer = layers[2]
    without = layer.output_adapter
    layer.output_adapter = None
    plain = layer(h, is_causal=True)
    layer.output_adapter = without
    torch.testing.assert_close(layer(h, is_causal=True), plain + without(plain))
    fresh = OutputAdapter(32)  # the official init: N(0, 0.02) projections, zero biases, scale 1
    assert 0.01 < float(fresh.up_proj.weight.detach().std()) < 0.03 and float(fresh.up_proj.bias.detach().abs().sum()) == 0.0


def test_zero_adapter_up_projections_leave_the_llm_unchanged():
    model = build_lynx()
    plain = build_lynx(output_adapter_every=0)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "output_adapter" not in k})
    input_ids = torch.tensor([[IMAGE] * 5 + [BOS, 7, 8, 9]])
    pixels = torch.randn(1, 3, 28, 28)
    assert not torch.allclose(model(input_ids, pixels), plain(input_ids, pixels))
    for layer in model.language_model.model.layers:
        if layer.output_adapter is not None:
            torch.nn.init.zeros_(layer.output_adapter.up_proj.weight)
            torch.nn.init.zeros_(layer.output_adapter.up_proj.bias)
    torch.testing.assert_close(model(input_ids, pixels), plain(input_ids, pixels))


def test_left_padding_with_cumsum_positions_gives_the_unpadded_logits():
    """Lynx pads between the visual tokens and the text; the usual left padding puts the pads
    first. Positions count real tokens only (cumsum(mask) - 1), so both give the unpadded logits."""
    model = build_lynx()
    pixels = torch.randn(1, 3, 28, 28)
    image, text = [IMAGE] * 5, [BOS, 7, 8, 9, 10]
    reference = model(torch.tensor([image + text]), pixels)
    for ids, mask in (([PAD, PAD] + image + text, [0, 0] + [1] * 10), (image + [PAD, PAD] + text, [1] * 5 + [0, 0] + [1] * 5)):
        logits = model(torch.tensor([ids]), pixels, attention_mask=torch.tensor([mask]))
        torch.testing.assert_close(logits[0, torch.tensor(mask).bool()], reference[0], rtol=1e-5, atol=1e-5)


def test_lynx_template_puts_the_image_first_and_lowercases():
    conversation = [{"from": "human", "value": "<image>\nWhat Color is the Circle?"}, {"from": "gpt", "value": "Red"},
                    {"from": "human", "value": "And the SQUARE?"}, {"from": "gpt", "value": "Blue"}]
    text, spans = format_conversation(conversation, "lynx")
    assert text == "<image>user: what color is the circle?\nbot: red</s>user: and the square?\nbot: blue</s>"
    assert [text[start:end] for start, end in spans] == [" red</s>", " blue</s>"]
    prompt, _ = format_conversation(conversation[:1], "lynx", for_generation=True)
    assert prompt == "<image>user: what color is the circle?\nbot:"


@pytest.fixture(scope="module")
def world_tokenizer(tmp_path_factory):
    from data import load_tokenizer
    from shapes import SMALL_WORLD, build_world
    world = build_world(tmp_path_factory.mktemp("world"), **SMALL_WORLD)
    return load_tokenizer(str(world / "tokenizer.json"))


def test_lynx_ids_put_bos_after_the_image_tokens_and_eval_asks_the_same(world_tokenizer):
    tokenizer = world_tokenizer
    bos = tokenizer.token_to_id("<s>")
    conversation = [{"from": "human", "value": "<image>\nIs there a circle?"}, {"from": "gpt", "value": "Yes"}]
    input_ids, labels = render_conversation(conversation, "lynx", tokenizer, 999, 3)
    assert input_ids[:4] == [999, 999, 999, bos] and bos not in input_ids[4:]
    supervised = [token for token in labels if token != -100]
    assert labels[:4] == [-100] * 4 and supervised[-1] == tokenizer.token_to_id("</s>")
    assert tokenizer.decode(supervised, skip_special_tokens=True).strip() == "yes"
    assert show_supervision(conversation, "lynx", tokenizer, 3).startswith("<image>x3<s>user: is there a circle?\nbot:[")
    model = build_lynx(image_token_index=999)
    evaluator = evaluation.build_evaluator(model, tokenizer, prompt_style="lynx")
    prompt, _ = evaluator.encode_dialogue([("Is there a circle?", None)], None)
    expected, _ = render_conversation(conversation[:1], "lynx", tokenizer, 999, 5, for_generation=True)
    assert prompt == expected and prompt[5] == bos


def test_lynx_decoding_preset_is_the_official_config():
    assert evaluation.DECODING_PRESETS["lynx"] == dict(
        do_sample=True, num_beams=5, top_p=0.9, top_k=3, max_new_tokens=64, min_new_tokens=2, length_penalty=-2.0,
        no_repeat_ngram_size=2, temperature=1.0, repetition_penalty=1.0)


def test_lynx_checkpoint_round_trips_in_the_official_names(tmp_path):
    model = build_lynx()
    model.save_pretrained(tmp_path)
    from checkpoints import read_checkpoint
    values, state = read_checkpoint(tmp_path)
    assert values["model_type"] == "lynx"
    assert {"bridge.latents", "bridge.norm.weight", "bridge.layers.1.0.to_kv.weight", "bridge.layers.1.1.3.weight",
            "LLM.model.layers.2.output_adapter.adapter_norm_before.weight",
            "LLM.model.layers.0.output_adapter.scaling", "vision_encoder.blocks.1.attn.q_proj.bias",
            "vision_encoder.blocks.1.attn.k_proj.weight", "vision_encoder.blocks.1.attn.v_proj.bias",
            "vision_encoder.pos_embed"} <= set(state)
    assert "vision_encoder.blocks.1.attn.k_proj.bias" not in state  # EVA: no key bias
    assert not any("output_adapter" in key for key in state if key.startswith("LLM.model.layers.1."))
    loaded = MLLM.from_pretrained(str(tmp_path))
    input_ids, pixels = torch.tensor([[IMAGE] * 5 + [BOS, 7, 8]]), torch.randn(1, 3, 28, 28)
    torch.testing.assert_close(loaded(input_ids, pixels), model(input_ids, pixels))


def test_adapters_beside_an_mlp_connector_round_trip_in_the_llava_hf_layout(tmp_path):
    """The resampler's comparison (configs/shapes_lynx_mlp.py): LLaVA-1.5's connector with Lynx's
    adapters saves as llava-hf plus the adapter setting, and loads back whole."""
    model = build_lynx(projector_type="mlp2x_gelu", resampler_config=None, vision_feature_layer=-1,
                       vision_feature_select_strategy="full")
    model.save_pretrained(tmp_path)
    loaded = MLLM.from_pretrained(str(tmp_path))
    assert loaded.config.output_adapter_every == 2 and loaded.language_model.model.layers[2].output_adapter is not None
    input_ids, pixels = torch.tensor([[IMAGE] * model.num_image_tokens + [BOS, 7, 8]]), torch.randn(1, 3, 28, 28)
    torch.testing.assert_close(loaded(input_ids, pixels), model(input_ids, pixels))


def test_partial_official_release_loads_over_its_components_at_its_resolution(tmp_path):
    """finetune_lynx.pt in the official names, as a pickle holding the trained parts and a tower
    at a higher resolution (42 px: 36 patches), converted, then loaded over an EVA checkpoint and
    a LLaMA checkpoint; a key the model does not have is named."""
    torch.manual_seed(0)
    hf_vision = transformers.Blip2VisionModel(transformers.Blip2VisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=28,
        patch_size=7)).eval()
    hf_vision.save_pretrained(tmp_path / "eva")
    language = randomize(LanguageModel(llama_config()), 1)
    language.save_pretrained(tmp_path / "llm")
    release = build_lynx(seed=2)
    release.vision_tower.interpolate_position_embedding(42)
    official = state_to_theirs(release.state_dict(), LYNX_LAYOUT)
    trained = {key: value for key, value in official.items()
               if key.startswith(("bridge.", "vision_encoder.")) or "output_adapter" in key}
    torch.save({"model": trained}, tmp_path / "finetune_lynx.pt")
    subprocess.run([sys.executable, str(ROOT / "checkpoints.py"), "convert", str(tmp_path / "finetune_lynx.pt"),
                    str(tmp_path / "lynx")], check=True, capture_output=True, cwd=ROOT)
    components = (str(tmp_path / "eva"), str(tmp_path / "llm"))
    model = MLLM.from_pretrained(str(tmp_path / "lynx"), components=components, **LYNX_FIELDS)
    assert model.config.vision_config.image_size == 42 and model.vision_tower.config.num_patches == 36
    ours = model.state_dict()
    for key, value in release.state_dict().items():
        expected = language.state_dict()[key.removeprefix("language_model.")] if (
            key.startswith("language_model.") and "output_adapter" not in key) else value
        torch.testing.assert_close(ours[key], expected, msg=key)
    torch.save({"model": {**trained, "bridge.extra": torch.ones(1)}}, tmp_path / "bad.pt")
    subprocess.run([sys.executable, str(ROOT / "checkpoints.py"), "convert", str(tmp_path / "bad.pt"),
                    str(tmp_path / "bad")], check=True, capture_output=True, cwd=ROOT)
    with pytest.raises(Exception, match="bridge.extra"):
        MLLM.from_pretrained(str(tmp_path / "bad"), components=components, **LYNX_FIELDS)


def test_resolution_stage_interpolates_the_tower_and_schedules_decay_linearly():
    model = build_lynx()
    before = model.vision_tower.embeddings.position_embedding.weight.detach().clone()
    model.vision_tower.interpolate_position_embedding(42)
    assert model.config.vision_config.image_size == 42 and model.num_image_tokens == 5
    assert model.vision_tower.embeddings.position_embedding.weight.shape == (37, 32)
    torch.testing.assert_close(model.vision_tower.embeddings.position_embedding.weight[0], before[0])
    assert model.image_features(torch.randn(1, 3, 42, 42)).shape == (1, 5, 32)
    factors = [train.learning_rate_factor(step, 10, 2, 0.1, "linear") for step in range(11)]
    assert factors[:3] == [0.5, 1.0, 1.0] and factors[10] == pytest.approx(0.1)
    assert factors[6] == pytest.approx(0.1 + 0.9 * (1 - 4 / 8))
    assert train.learning_rate_factor(5, 10, 2, 0.1, "constant") == 1.0


def test_lynx_configs_load_with_the_papers_stages():
    config, stages = train.load_config(str(ROOT / "configs" / "lynx.py"), [])
    assert [(s.name, s.learning_rate, s.global_batch_size, s.max_steps, s.image_size) for s in stages] == [
        ("pretrain", 1e-4, 1536, 100_000, 0), ("resolution", 1e-5, 448, 10_000, 420),
        ("instruct", 2e-5, 480, 20_000, 0)]
    assert all(s.schedule == "linear" and s.warmup_ratio == 0.05 and s.weight_decay == 0.01 and s.template == "lynx"
               for s in stages)
    assert config.model["resampler_config"] == dict(num_latents=32, depth=3, num_attention_heads=8, head_dim=64,
                                                    ff_mult=4)
    for name in ("shapes_lynx", "shapes_lynx_low_resolution", "shapes_lynx_full_finetune", "shapes_lynx_mlp"):
        train.load_config(str(ROOT / "configs" / f"{name}.py"), [])
    assert math.isclose(stages[0].min_lr_ratio, 0.1)
    with pytest.raises(ValueError, match="'pretrain.schedule' must be one of"):
        train.check_stage(train.StageConfig(name="pretrain", schedule="lineer"))
    with pytest.raises(ValueError, match="image_size resizes an MLLM's tower; the 'lm' objective has none"):
        train.check_stage(train.StageConfig(name="lm", objective="lm", image_size=96))


def test_output_adapters_refuse_a_t5_by_name():
    from model import T5Config
    t5 = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
    with pytest.raises(ValueError, match="output adapters follow LLaMA decoder layers; this LLM is T5"):
        MLLM(MLLMConfig(vision_config=VISION, text_config=t5, **LYNX_FIELDS))
