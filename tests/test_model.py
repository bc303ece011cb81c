"""model.py against transformers on tiny random checkpoints: every loadable layout gives the same
logits (1e-5, fp32), what we save transformers loads, bad checkpoints and batches name the culprit.

The tiny models have grouped-query attention, an untied head, rope_theta != 10000 and an RMSNorm
eps that is neither LLaMA-1's nor LLaMA-2's default, so a wrong convention anywhere shows."""
from __future__ import annotations

import json
import os

import pytest
import safetensors.torch
import torch
import transformers

from checkpoints import CheckpointError
from conftest import (IMAGE_TOKEN, NUM_IMAGE_TOKENS, PAD_TOKEN, hf_logits, our_logits,
                      text_with_images, tiny_clip_vision_config, tiny_hf_llava, tiny_llama_config)
from model import MLLM, LanguageModel, TextConfig

@pytest.fixture(scope="module")
def hf_llava_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("hf_llava"))
    model = tiny_hf_llava()
    model.save_pretrained(directory)
    return directory, model


def test_language_model_matches_llama_including_left_padding(tmp_path):
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(tiny_llama_config()).eval()
    reference.save_pretrained(tmp_path)
    ours = LanguageModel.from_pretrained(str(tmp_path)).eval()
    assert ours.config.rope_theta == 5000.0 and ours.config.rms_norm_eps == 3e-5
    input_ids = torch.randint(0, 120, (2, 9))
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0  # left padding
    expected = hf_logits(reference, input_ids, attention_mask=mask)
    actual = our_logits(ours, input_ids, attention_mask=mask)
    assert torch.allclose(actual[mask.bool()], expected[mask.bool()], atol=1e-5)


def test_tied_language_model_round_trip(tmp_path):
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True)).eval()
    reference.save_pretrained(tmp_path / "hf")
    ours = LanguageModel.from_pretrained(str(tmp_path / "hf")).eval()
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ours.save_pretrained(str(tmp_path / "ours"))
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    input_ids = torch.randint(0, 120, (1, 7))
    assert torch.allclose(our_logits(ours, input_ids), hf_logits(reloaded, input_ids), atol=1e-5)


def test_transformers5_saved_layout_matches_logits(hf_llava_dir):
    directory, reference = hf_llava_dir
    ours = MLLM.from_pretrained(directory).eval()
    assert ours.num_image_tokens == NUM_IMAGE_TOKENS
    input_ids, pixel_values = text_with_images()
    mask = (input_ids != PAD_TOKEN).long()
    expected = hf_logits(reference, input_ids, pixel_values, mask)
    actual = our_logits(ours, input_ids, pixel_values, mask)
    assert torch.allclose(actual[mask.bool()], expected[mask.bool()], atol=1e-5)


def test_hub_and_in_memory_layouts_load(hf_llava_dir, tmp_path):
    directory, reference = hf_llava_dir
    input_ids, pixel_values = text_with_images()
    expected = hf_logits(reference, input_ids[:1], pixel_values[:1])
    config = open(os.path.join(directory, "config.json")).read()
    layouts = {
        "hub": lambda key: key.replace("vision_tower.", "vision_tower.vision_model.", 1),
        "memory": None,
    }
    for name, rename in layouts.items():
        target = tmp_path / name
        target.mkdir()
        (target / "config.json").write_text(config)
        if rename is None:
            safetensors.torch.save_file(reference.state_dict(), target / "model.safetensors")
        else:
            state = safetensors.torch.load_file(os.path.join(directory, "model.safetensors"))
            safetensors.torch.save_file({rename(k): v for k, v in state.items()}, target / "model.safetensors")
        ours = MLLM.from_pretrained(str(target)).eval()
        assert torch.allclose(our_logits(ours, input_ids[:1], pixel_values[:1]), expected, atol=1e-5), name


def test_save_here_load_in_transformers(hf_llava_dir, tmp_path):
    directory, _ = hf_llava_dir
    ours = MLLM.from_pretrained(directory).eval()
    ours.save_pretrained(str(tmp_path))
    keys = safetensors.torch.load_file(tmp_path / "model.safetensors").keys()
    assert any(key.startswith("vision_tower.vision_model.") for key in keys)  # the hub's llava-hf layout
    assert "language_model.lm_head.weight" in keys
    reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    input_ids, pixel_values = text_with_images()
    mask = (input_ids != PAD_TOKEN).long()
    expected = our_logits(ours, input_ids, pixel_values, mask)
    assert torch.allclose(hf_logits(reloaded, input_ids, pixel_values, mask)[mask.bool()], expected[mask.bool()],
                          atol=1e-5)
    assert torch.allclose(our_logits(MLLM.from_pretrained(str(tmp_path)), input_ids, pixel_values, mask), expected)


def write_original_llava(hf_directory: str, target) -> None:
    """An original-LLaVA checkpoint of the same weights: LlamaForCausalLM keys + model.mm_projector.0/2,
    no vision tower, config.json = LlamaConfig fields + mm_* fields."""
    state = safetensors.torch.load_file(os.path.join(hf_directory, "model.safetensors"))
    renames = {"language_model.model.": "model.", "language_model.lm_head.": "lm_head.",
               "multi_modal_projector.linear_1.": "model.mm_projector.0.",
               "multi_modal_projector.linear_2.": "model.mm_projector.2."}
    original = {}
    for key, value in state.items():
        for theirs, ours in renames.items():
            if key.startswith(theirs):
                original[ours + key[len(theirs):]] = value
    target.mkdir()
    safetensors.torch.save_file(original, target / "model.safetensors")
    text_config = json.load(open(os.path.join(hf_directory, "config.json")))["text_config"]
    config = {**text_config, "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
              "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu",
              "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_hidden_size": 32,
              "image_aspect_ratio": "pad", "pad_token_id": 0}
    (target / "config.json").write_text(json.dumps(config))


def test_original_llava_layout_with_clip_checkpoint(hf_llava_dir, tmp_path):
    directory, reference = hf_llava_dir
    write_original_llava(directory, tmp_path / "llava")
    clip = transformers.CLIPModel(transformers.CLIPConfig(
        vision_config=tiny_clip_vision_config().to_dict(),
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16), projection_dim=8))
    clip.vision_model.load_state_dict(reference.model.vision_tower.state_dict())
    clip.save_pretrained(tmp_path / "clip")
    with pytest.raises(ValueError, match="vision_tower_path"):
        MLLM.from_pretrained(str(tmp_path / "llava"))
    ours = MLLM.from_pretrained(str(tmp_path / "llava"), vision_tower_path=str(tmp_path / "clip")).eval()
    assert ours.config.image_token_index == 128 and ours.config.pad_token_id == 0  # outside the vocabulary
    input_ids, pixel_values = text_with_images()
    mask = (input_ids != PAD_TOKEN).long()
    expected = hf_logits(reference, input_ids, pixel_values, mask)
    ours_ids = input_ids.masked_fill(input_ids == IMAGE_TOKEN, 128)
    actual = our_logits(ours, ours_ids, pixel_values, mask)
    assert torch.allclose(actual[mask.bool()], expected[mask.bool()], atol=1e-5)


def test_from_vision_and_language_resizes_explicitly(tmp_path):
    torch.manual_seed(0)
    vision = transformers.CLIPVisionModel(tiny_clip_vision_config()).eval()
    vision.save_pretrained(tmp_path / "clip")
    llama = transformers.LlamaForCausalLM(tiny_llama_config(vocab_size=100, pad_token_id=None)).eval()
    llama.save_pretrained(tmp_path / "llama")
    model = MLLM.from_vision_and_language(str(tmp_path / "clip"), str(tmp_path / "llama"),
                                          image_token_index=100, pad_token_id=101, projector_type="linear").eval()
    assert model.config.text_config.vocab_size == 102
    embeddings = model.language_model.model.embed_tokens.weight
    assert torch.allclose(embeddings[100], llama.model.embed_tokens.weight.mean(0))
    assert torch.equal(embeddings[:100], llama.model.embed_tokens.weight)
    pixel_values = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = vision(pixel_values, output_hidden_states=True).hidden_states[-2]
        assert torch.allclose(model.vision_tower(pixel_values)[-2], expected, atol=1e-5)
    input_ids = torch.randint(0, 100, (1, 6))
    assert torch.allclose(our_logits(model, input_ids)[..., :100], hf_logits(llama, input_ids), atol=1e-5)
    assert our_logits(model, torch.tensor([[1] + [100] * NUM_IMAGE_TOKENS]), pixel_values[:1]).shape == (1, 5, 102)


def test_bad_checkpoint_names_every_key(hf_llava_dir, tmp_path):
    directory, _ = hf_llava_dir
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes(open(os.path.join(directory, name), "rb").read())
    state = safetensors.torch.load_file(tmp_path / "model.safetensors")
    del state["language_model.model.norm.weight"]
    state["language_model.model.extra.weight"] = torch.zeros(1)
    state["multi_modal_projector.linear_2.bias"] = torch.zeros(5)
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as error:
        MLLM.from_pretrained(str(tmp_path))
    message = str(error.value)
    for key in ("language_model.model.norm.weight", "language_model.model.extra.weight",
                "multi_modal_projector.linear_2.bias"):
        assert key in message


def test_unknown_layout_lists_the_understood_ones(tmp_path):
    safetensors.torch.save_file({"encoder.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="understood layouts") as error:
        MLLM.from_pretrained(str(tmp_path))
    assert "llava-hf" in str(error.value) and "original LLaVA" in str(error.value)


def test_image_token_mismatch_names_the_sample(hf_llava_dir):
    model = MLLM.from_pretrained(hf_llava_dir[0]).eval()
    input_ids, pixel_values = text_with_images()
    broken = input_ids.clone()
    broken[2, 1] = 5  # sample 2 loses one image token
    with pytest.raises(ValueError, match="sample 2: 7 image tokens"):
        model(broken, pixel_values)
    with pytest.raises(ValueError, match="sample 2: 8 image tokens .* fill 4 .*pixel_values has 2 images"):
        model(input_ids, pixel_values[:2])


def test_mixed_batch_equals_separate_samples(hf_llava_dir):
    model = MLLM.from_pretrained(hf_llava_dir[0]).eval()
    input_ids, pixel_values = text_with_images()
    mask = (input_ids != PAD_TOKEN).long()
    labels = input_ids.masked_fill((input_ids == IMAGE_TOKEN) | (mask == 0), -100)
    with torch.no_grad():
        batch_logits, batch_loss = model(input_ids, pixel_values, mask, labels)
    images = {0: pixel_values[:1], 1: None, 2: pixel_values[1:]}
    for index, images_of_sample in images.items():
        length = int(mask[index].sum())
        alone = our_logits(model, input_ids[index:index + 1, :length], images_of_sample)
        assert torch.allclose(batch_logits[index:index + 1, :length], alone, atol=1e-5)
    assert torch.isfinite(batch_loss) and batch_loss > 0


def test_gradient_checkpointing_gives_the_same_gradients(hf_llava_dir):
    model = MLLM.from_pretrained(hf_llava_dir[0]).train()
    input_ids, pixel_values = text_with_images()
    labels = input_ids.masked_fill(input_ids == IMAGE_TOKEN, -100)
    gradients = []
    for enabled in (False, True):
        model.zero_grad()
        model.language_model.gradient_checkpointing = enabled
        model(input_ids, pixel_values, labels=labels)[1].backward()
        gradients.append(model.multi_modal_projector.linear_1.weight.grad.clone())
    assert torch.allclose(gradients[0], gradients[1], atol=1e-6)


def test_text_config_rejects_what_it_cannot_compute():
    with pytest.raises(ValueError, match="rope scaling"):
        TextConfig.from_dict({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}})
    with pytest.raises(ValueError, match="attention_bias"):
        TextConfig.from_dict({"attention_bias": True})
