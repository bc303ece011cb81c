"""checkpoints.py: the rule mechanism both ways, its tensor transforms, and `convert` of pickles."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from checkpoints import (CheckpointError, Rule, convert_keys, convert_pickle, fold_bias, join_three, split_folded_bias,
                         split_in_three, transpose)

ROOT = Path(__file__).resolve().parents[1]

# An EVA-style attention (fused qkv weight, q and v biases folded around a zero k third, an output
# projection stored transposed) against ours (separate q/k/v, no key bias).
EVA_LIKE = (
    Rule("blocks.*.attn.qkv.weight", ("layers.*.q_proj.weight", "layers.*.k_proj.weight", "layers.*.v_proj.weight"),
         to_ours=split_in_three, to_theirs=join_three),
    Rule("blocks.*.attn.qkv.bias", ("layers.*.q_proj.bias", "layers.*.v_proj.bias"),
         to_ours=split_folded_bias, to_theirs=fold_bias),
    Rule("blocks.*.attn.proj_t", "layers.*.o_proj.weight", to_ours=transpose, to_theirs=transpose),
    Rule("blocks.*", "layers.*"),
)


def eva_like_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"blocks.3.attn.qkv.weight": torch.randn(12, 4),
            "blocks.3.attn.qkv.bias": torch.cat([torch.randn(4), torch.zeros(4), torch.randn(4)]),
            "blocks.3.attn.proj_t": torch.randn(4, 6), "blocks.3.norm.weight": torch.randn(4), "cls_token": torch.randn(4)}


def test_rules_split_fold_transpose_and_round_trip():
    theirs = eva_like_state()
    ours = convert_keys(theirs, EVA_LIKE, to="ours")
    assert sorted(ours) == ["cls_token", "layers.3.k_proj.weight", "layers.3.norm.weight", "layers.3.o_proj.weight",
                            "layers.3.q_proj.bias", "layers.3.q_proj.weight", "layers.3.v_proj.bias",
                            "layers.3.v_proj.weight"]
    assert torch.equal(ours["layers.3.k_proj.weight"], theirs["blocks.3.attn.qkv.weight"][4:8])
    assert torch.equal(ours["layers.3.v_proj.bias"], theirs["blocks.3.attn.qkv.bias"][8:])
    assert torch.equal(ours["layers.3.o_proj.weight"], theirs["blocks.3.attn.proj_t"].t())
    back = convert_keys(ours, EVA_LIKE, to="theirs")
    assert sorted(back) == sorted(theirs) and all(torch.equal(back[key], theirs[key]) for key in theirs)


def test_rules_name_a_missing_part():
    ours = convert_keys(eva_like_state(), EVA_LIKE, to="ours")
    del ours["layers.3.v_proj.bias"]
    with pytest.raises(CheckpointError, match=r"\['layers.3.q_proj.bias'\] need \['layers.3.v_proj.bias'\]"):
        convert_keys(ours, EVA_LIKE, to="theirs")


def test_first_matching_rule_wins_and_unmatched_keys_keep_their_names():
    layout = (Rule("model.mm_projector.0.*", "projector.linear_1.*"), Rule("model.*", "language_model.model.*"))
    state = {"model.mm_projector.0.weight": torch.ones(1), "model.norm.weight": torch.ones(1), "extra": torch.ones(1)}
    assert sorted(convert_keys(state, layout, to="ours")) == ["extra", "language_model.model.norm.weight",
                                                              "projector.linear_1.weight"]


class NotATensor:
    pass


def test_convert_writes_the_tensors_with_their_names(tmp_path):
    state = {"bridge.latents": torch.randn(3, 4), "LLM.model.layers.0.output_adapter.scaling": torch.tensor(0.5)}
    torch.save({"model": state, "epoch": 3}, tmp_path / "finetune_lynx.pt")
    result = subprocess.run([sys.executable, str(ROOT / "checkpoints.py"), "convert",
                             str(tmp_path / "finetune_lynx.pt"), str(tmp_path / "converted")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    written = load_file(tmp_path / "converted" / "model.safetensors")
    assert sorted(written) == sorted(state) and all(torch.equal(written[key], state[key]) for key in state)


def test_convert_refuses_what_is_not_tensors_and_names_the_file(tmp_path):
    torch.save({"model": {"weight": torch.ones(2)}, "hook": NotATensor()}, tmp_path / "code.pth")
    with pytest.raises(CheckpointError, match=r"code\.pth: not a weights-only checkpoint.*NotATensor"):
        convert_pickle(tmp_path / "code.pth", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"missing\.pth: no such checkpoint file"):
        convert_pickle(tmp_path / "missing.pth", tmp_path / "out")
    torch.save({"step": 3}, tmp_path / "empty.bin")
    with pytest.raises(CheckpointError, match=r"empty\.bin: holds no tensors"):
        convert_pickle(tmp_path / "empty.bin", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_rules_and_collisions_are_refused():
    with pytest.raises(ValueError, match="same number of"):
        Rule("a.*.b.*", "c.*")
    with pytest.raises(ValueError, match="to_ours and to_theirs"):
        Rule("qkv.*", ("q.*", "k.*", "v.*"))
    layout = (Rule("model.mm_projector.0.*", "projector.*"), Rule("model.mm_projector.*", "projector.*"))
    state = {"model.mm_projector.0.weight": torch.ones(1), "model.mm_projector.weight": torch.ones(1)}
    with pytest.raises(CheckpointError, match="model.mm_projector.0.weight and model.mm_projector.weight both "
                                              "become projector.weight"):
        convert_keys(state, layout, to="ours")
    with pytest.raises(ValueError, match="to must be 'ours' or 'theirs'"):
        convert_keys(state, layout, to="Ours")


def test_pickle_lists_and_wrappers(tmp_path):
    """Tensors inside lists keep an index in their name; a wrapper is dropped only when it holds
    every tensor, so a stray top-level tensor keeps the full names."""
    torch.save({"model": {"layers": [torch.ones(1), torch.zeros(2)]}, "epoch": 1}, tmp_path / "a.pth")
    assert sorted(load_file(convert_pickle(tmp_path / "a.pth", tmp_path / "a"))) == ["layers.0", "layers.1"]
    torch.save({"model": {"w": torch.ones(1)}, "scale": torch.ones(1)}, tmp_path / "b.pth")
    assert sorted(load_file(convert_pickle(tmp_path / "b.pth", tmp_path / "b"))) == ["model.w", "scale"]


def test_shards_convert_to_an_indexed_safetensors_release(tmp_path):
    from checkpoints import convert_shards, load_safetensors
    torch.save({"a": torch.ones(2), "b": torch.zeros(3)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"c": torch.arange(4.0)}, tmp_path / "pytorch_model-00002-of-00002.bin")
    sources = sorted(tmp_path.glob("*.bin"))
    convert_shards(sources, tmp_path / "release")
    state = load_safetensors(tmp_path / "release")
    assert sorted(state) == ["a", "b", "c"] and torch.equal(state["c"], torch.arange(4.0))
    torch.save({"a": torch.ones(1)}, tmp_path / "pytorch_model-00002-of-00002.bin")
    with pytest.raises(CheckpointError, match=r"\['a'\] are in model-00001-of-00002.safetensors already"):
        convert_shards(sources, tmp_path / "again")
