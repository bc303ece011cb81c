"""BLIP-2 and InstructBLIP: EVA ViT-g, the Q-Former and the LLM inputs against transformers'
Blip2ForConditionalGeneration / InstructBlipForConditionalGeneration, in both directions, and
the bad checkpoints and arguments that must be refused."""
import json
import os

import pytest
import safetensors.torch
import torch
import transformers

from checkpoints import CheckpointError
from conftest import (BLIP2_IMAGE_TOKEN as IMAGE_TOKEN, NUM_QUERIES, PAD_TOKEN, instructions, pixels, randomize,
                      tiny_blip2_configs)
from model import MLLM

BOS = 1


def tiny_hf_blip2(instruct: bool, seed: int = 0):
    if instruct:
        model = transformers.InstructBlipForConditionalGeneration(transformers.InstructBlipConfig(**tiny_blip2_configs()))
    else:
        model = transformers.Blip2ForConditionalGeneration(transformers.Blip2Config(**tiny_blip2_configs()))
    return randomize(model, seed)


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts as transformers 5's processor builds them: the query tokens' placeholders
    before BOS; the second LEFT-padded (generation's layout)."""
    image = [IMAGE_TOKEN] * NUM_QUERIES
    rows = [image + [BOS, 5, 7, 9, 11, 13], [PAD_TOKEN, PAD_TOKEN] + image + [BOS, 17, 19, 23]]
    input_ids = torch.tensor(rows)
    return input_ids, (input_ids != PAD_TOKEN).long()


def hf_forward(model, instruct: bool, input_ids, attention_mask, pixel_values):
    extra = dict(zip(("qformer_input_ids", "qformer_attention_mask"), instructions())) if instruct else {}
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, **extra).logits


def our_forward(model, instruct: bool, input_ids, attention_mask, pixel_values):
    extra = dict(zip(("qformer_input_ids", "qformer_attention_mask"), instructions())) if instruct else {}
    with torch.no_grad():
        return model(input_ids, pixel_values, attention_mask, **extra)


@pytest.fixture(scope="module", params=[False, True], ids=["blip2", "instructblip"])
def saved(request, tmp_path_factory):
    instruct = request.param
    reference = tiny_hf_blip2(instruct)
    directory = tmp_path_factory.mktemp("instructblip" if instruct else "blip2")
    reference.save_pretrained(directory)
    return instruct, reference, directory


def test_logits_and_greedy_tokens_match_transformers(saved):
    instruct, reference, directory = saved
    ours = MLLM.from_pretrained(str(directory)).eval()
    assert ours.num_image_tokens == NUM_QUERIES and ours.multi_modal_projector.takes_instruction is instruct
    input_ids, attention_mask = prompts()
    expected = hf_forward(reference, instruct, input_ids, attention_mask, pixels())
    got = our_forward(ours, instruct, input_ids, attention_mask, pixels())
    real = attention_mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)

    extra = dict(zip(("qformer_input_ids", "qformer_attention_mask"), instructions())) if instruct else {}
    with torch.no_grad():
        theirs = reference.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels(),
                                    max_new_tokens=6, do_sample=False, pad_token_id=PAD_TOKEN, eos_token_id=None,
                                    **extra)
    mine = ours.generate(input_ids, pixels(), attention_mask, max_new_tokens=6, eos_token_id=[], **extra)
    assert torch.equal(mine, theirs[:, input_ids.shape[1]:])


def test_saved_here_loads_there(saved, tmp_path):
    instruct, reference, directory = saved
    ours = MLLM.from_pretrained(str(directory))
    ours.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == ("instructblip" if instruct else "blip-2")
    model_class = (transformers.InstructBlipForConditionalGeneration if instruct
                   else transformers.Blip2ForConditionalGeneration)
    reloaded = model_class.from_pretrained(tmp_path).eval()
    input_ids, attention_mask = prompts()
    real = attention_mask.bool()
    torch.testing.assert_close(hf_forward(reloaded, instruct, input_ids, attention_mask, pixels())[real],
                               hf_forward(reference, instruct, input_ids, attention_mask, pixels())[real],
                               atol=1e-5, rtol=0)


def test_both_hub_forms_of_the_eva_bias_load_to_the_same_model(saved, tmp_path):
    """Older uploads store q_bias / v_bias, transformers now one qkv.bias = cat(q, k, v) whose k
    third is zero in BLIP-2; a nonzero one (ours is random) changes no output: the softmax
    cancels a bias added to every key alike."""
    instruct, reference, directory = saved
    state = safetensors.torch.load_file(os.path.join(directory, "model.safetensors"))
    assert state["vision_model.encoder.layers.0.self_attn.qkv.bias"].chunk(3)[1].abs().sum() > 0
    older = {}
    for key, value in state.items():
        if key.endswith("self_attn.qkv.bias"):
            q_bias, _, v_bias = value.chunk(3)
            older[key.replace("qkv.bias", "q_bias")], older[key.replace("qkv.bias", "v_bias")] = q_bias, v_bias
        else:
            older[key] = value
    for name in ("config.json",):
        (tmp_path / name).write_text((directory / name).read_text())
    safetensors.torch.save_file(older, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    folded, split = MLLM.from_pretrained(str(directory)).eval(), MLLM.from_pretrained(str(tmp_path)).eval()
    input_ids, attention_mask = prompts()
    assert torch.equal(our_forward(folded, instruct, input_ids, attention_mask, pixels()),
                       our_forward(split, instruct, input_ids, attention_mask, pixels()))
    torch.testing.assert_close(our_forward(split, instruct, input_ids, attention_mask, pixels())[attention_mask.bool()],
                               hf_forward(reference, instruct, input_ids, attention_mask, pixels())[attention_mask.bool()],
                               atol=1e-5, rtol=0)


def copy_with_config(source, destination, edit_config=None, edit_state=None):
    config = json.loads((source / "config.json").read_text())
    if edit_config:
        edit_config(config)
    destination.mkdir(exist_ok=True)
    (destination / "config.json").write_text(json.dumps(config))
    state = safetensors.torch.load_file(str(source / "model.safetensors"))
    if edit_state:
        state = edit_state(state)
    safetensors.torch.save_file(state, str(destination / "model.safetensors"), metadata={"format": "pt"})


def test_a_checkpoint_that_disagrees_with_its_config_is_refused(saved, tmp_path):
    _, _, directory = saved

    def more_queries(config):
        config["num_query_tokens"] = NUM_QUERIES + 1

    def cross_every_layer(config):
        config["qformer_config"]["cross_attention_frequency"] = 1

    cases = [(more_queries, None, r"multi_modal_projector.query_tokens: checkpoint \(1, 5, 24\), model \(1, 6, 24\)"),
             (cross_every_layer, None, r"missing keys.*\n.*multi_modal_projector.qformer.layers.1.cross_attn"),
             (lambda config: config["vision_config"].update(hidden_size=40, num_attention_heads=4), None,
              r"qformer.layers.0.cross_attn.k_proj.weight: checkpoint \(24, 32\), model \(24, 40\)")]
    for index, (edit_config, edit_state, message) in enumerate(cases):
        copy_with_config(directory, tmp_path / str(index), edit_config, edit_state)
        with pytest.raises(CheckpointError, match=message):
            MLLM.from_pretrained(str(tmp_path / str(index)))


def test_instruction_arguments_are_checked(saved):
    instruct, _, directory = saved
    model = MLLM.from_pretrained(str(directory)).eval()
    input_ids, attention_mask = prompts()
    if instruct:
        with pytest.raises(ValueError, match="qformer_input_ids is required"):
            model(input_ids, pixels(), attention_mask)
        ids, mask = instructions()
        with pytest.raises(ValueError, match="qformer_input_ids has 1 rows but pixel_values 2 images"):
            model(input_ids, pixels(), attention_mask, qformer_input_ids=ids[:1], qformer_attention_mask=mask[:1])
    else:
        with pytest.raises(ValueError, match="qformer_input_ids given.*BLIP-2"):
            model(input_ids, pixels(), attention_mask, qformer_input_ids=instructions()[0])
