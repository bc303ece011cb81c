"""bench.py at a tiny size: every subcommand parses, `data` and `eval` run end to end and print
their tables, and the module loads without transformers (only `model` needs it)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("command", [[], ["model"], ["t5"], ["data"], ["eval"], ["train"], ["decode"], ["memory"]])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: " in capsys.readouterr().out


def test_data_on_a_small_world(tmp_path, capsys):
    """The shipped recipe with its world moved into tmp_path, 16 images, and batches of 4."""
    text = (ROOT / "configs" / "shapes_llava15.py").read_text()
    assert '"data/shapes"' in text, "configs/shapes_llava15.py no longer keeps its world in data/shapes"
    config = tmp_path / "config.py"
    config.write_text(text.replace('"data/shapes"', f'"{tmp_path / "world"}"')
                      + "\nworld = dict(world, num_train_images=16, num_eval_images=4)"
                      + "\nstages = [dict(stage, micro_batch_size=4, global_batch_size=4) for stage in stages]\n")
    bench.main(["data", "--config", str(config), "--num-workers", "0", "--loader-batches", "2", "--steps", "1"])
    table = capsys.readouterr().out.splitlines()
    assert table[-2].startswith("| training step") and table[-1].startswith("| DataLoader, 0 workers |")


def test_eval_on_a_few_samples(capsys):
    bench.main(["eval", "--samples", "4", "--new-tokens", "2", "--batch-size", "2", "--width", "32",
                "--threads", str(torch.get_num_threads()), "--floor", "0"])
    assert capsys.readouterr().out.splitlines()[-1].startswith("| 2 | ")


def test_loads_without_transformers():
    blocked = "import sys; sys.modules['transformers'] = None; import bench; bench.main(['data', '--help'])"
    result = subprocess.run([sys.executable, "-c", blocked], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_train_reports_throughput_mfu_and_memory(capsys):
    bench.main(["train", "--cpu", "--layers", "1", "--seq", "32", "--steps", "1", "--warmup", "0"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3].startswith("| tokens/s per device | model TFLOP/s per device | MFU |")
    tokens_per_second, flops, mfu, measured, estimated, kernel = (cell.strip() for cell in lines[-1].strip("|").split("|"))
    assert float(tokens_per_second) > 0 and float(flops) > 0 and 0 < float(mfu.rstrip("%")) < 100
    assert measured.endswith("iB") and estimated.endswith("iB")
    assert "flash_attention" in kernel  # the causal training path needs no mask: SDPA's fused kernel


def test_flops_per_token_is_six_per_matmul_weight_plus_attention():
    config = bench.TextConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                              num_key_value_heads=2, num_hidden_layers=3)
    model = bench.LanguageModel(config)
    per_layer = 4 * 16 * 16 + 3 * 16 * 32 + 2 * 16  # q k v o, gate up down, two norms
    weights = 3 * per_layer + 16 + 100 * 16  # + the final norm and the head (the embedding is a lookup)
    assert bench.flops_per_token(model, 50) == 6 * weights + 12 * 3 * 16 * 50


def test_decode_reports_the_fraction_of_the_roofline(capsys):
    bench.main(["decode", "--cpu", "--layers", "1", "--new-tokens", "4", "--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith("| nanoMLLM | ") and lines[-1].startswith("| transformers | ")
    assert all(line.rstrip(" |").endswith("%") for line in lines[-2:])


def test_memory_says_a_7b_stage_2_needs_sharding_on_80_gb(capsys):
    bench.main(["memory"])
    rows = {tuple(cell.strip() for cell in line.strip("|").split("|")[:2]): line.rstrip(" |").rsplit("|", 1)[-1].strip()
            for line in capsys.readouterr().out.splitlines() if line.startswith("| LLaVA")}
    assert rows[("LLaVA-1.5-7B, full", "ddp")] == "no" and rows[("LLaVA-1.5-7B, full", "fsdp")] == "yes"
    assert rows[("LLaVA-1.5-13B, full", "fsdp")] == "yes"
