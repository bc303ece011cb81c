"""adapters.py: LoRA starts as the identity, merged == unmerged, unmerge restores the base weights,
save_pretrained writes merged plain weights, set_trainable freezes by regex."""
from __future__ import annotations

import pytest
import safetensors.torch
import torch

from adapters import (LLAVA15_LORA_TARGETS, LoRALinear, apply_lora, merge_lora, set_trainable,
                      unmerge_lora)
from conftest import text_with_images, tiny_hf_llava
from model import MLLM


@pytest.fixture()
def tiny_mllm(tmp_path):
    tiny_hf_llava().save_pretrained(tmp_path / "base")
    return MLLM.from_pretrained(str(tmp_path / "base")).eval()


def randomize_lora(model: MLLM) -> None:
    """Non-zero B, as after some training."""
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.weight.normal_(std=0.05)


def logits(model: MLLM) -> torch.Tensor:
    input_ids, pixel_values = text_with_images()
    with torch.no_grad():
        return model(input_ids, pixel_values)


def test_zero_b_leaves_the_model_unchanged_and_keeps_key_names(tiny_mllm):
    before = logits(tiny_mllm)
    base_keys = set(tiny_mllm.state_dict())
    wrapped = apply_lora(tiny_mllm, LLAVA15_LORA_TARGETS, rank=4, alpha=8, dropout=0.1)
    assert len(wrapped) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert not any("lm_head" in name or "projector" in name for name in wrapped)
    assert base_keys <= set(tiny_mllm.state_dict())  # `.weight` of the base kept its name
    assert torch.equal(logits(tiny_mllm), before)


def test_merged_equals_unmerged_and_unmerge_restores(tiny_mllm):
    apply_lora(tiny_mllm, LLAVA15_LORA_TARGETS, rank=4, alpha=8)
    randomize_lora(tiny_mllm)
    base_weight = tiny_mllm.language_model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    unmerged = logits(tiny_mllm)
    merge_lora(tiny_mllm)
    assert not torch.equal(tiny_mllm.language_model.model.layers[0].self_attn.q_proj.weight, base_weight)
    assert torch.allclose(logits(tiny_mllm), unmerged, atol=1e-5)
    unmerge_lora(tiny_mllm)
    assert torch.allclose(tiny_mllm.language_model.model.layers[0].self_attn.q_proj.weight, base_weight, atol=1e-6)
    assert torch.allclose(logits(tiny_mllm), unmerged, atol=1e-6)


def test_save_pretrained_writes_merged_weights(tiny_mllm, tmp_path):
    apply_lora(tiny_mllm, LLAVA15_LORA_TARGETS, rank=4, alpha=8)
    randomize_lora(tiny_mllm)
    tiny_mllm.save_pretrained(str(tmp_path / "lora"))
    keys = safetensors.torch.load_file(tmp_path / "lora" / "model.safetensors").keys()
    assert not any("lora" in key for key in keys)
    plain = MLLM.from_pretrained(str(tmp_path / "lora")).eval()
    assert torch.allclose(logits(plain), logits(tiny_mllm), atol=1e-5)
    assert not tiny_mllm.language_model.model.layers[0].self_attn.q_proj.merged  # saving did not merge in place


def test_set_trainable_selects_by_regex(tiny_mllm):
    apply_lora(tiny_mllm, LLAVA15_LORA_TARGETS, rank=4, alpha=8)
    trainable = set_trainable(tiny_mllm, [r"lora_", r"^multi_modal_projector\."])
    assert trainable and all("lora_" in name or name.startswith("multi_modal_projector.") for name in trainable)
    frozen = [name for name, p in tiny_mllm.named_parameters() if not p.requires_grad]
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in frozen
    assert "vision_tower.embeddings.class_embedding" in frozen
    with pytest.raises(ValueError, match="no parameter name matches"):
        set_trainable(tiny_mllm, [r"^nothing_like_this$"])
