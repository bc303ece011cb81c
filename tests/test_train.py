"""train.py: config checking, the schedule, exact resume, NaN stop, and 2 processes = 1 process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import shapes
import train
from conftest import tiny_mllm_config
from model import MLLM

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return shapes.build_world(tmp_path_factory.mktemp("world"), seed=0, num_train_images=48, num_eval_images=8)


@pytest.fixture(scope="module")
def tiny_checkpoint(world, tmp_path_factory) -> Path:
    """A tiny random LLaVA-1.5 in the llava-hf layout, the starting point of the stages below."""
    tokenizer = data.load_tokenizer(str(world / "tokenizer.json"))
    torch.manual_seed(0)
    config = tiny_mllm_config(tokenizer)
    path = tmp_path_factory.mktemp("tiny") / "llava"
    MLLM(config).save_pretrained(str(path))
    return path


def write_config(path: Path, world: Path, checkpoint: Path, out_dir: Path, **stage) -> Path:
    stage = dict(dict(name="finetune", init=str(checkpoint), data=str(world / "train" / "instruct.json"),
                      image_folder=str(world / "images"), template="vicuna_v1", max_seq_len=256,
                      learning_rate=1e-3, warmup_steps=2, global_batch_size=8, micro_batch_size=4,
                      max_steps=6), **stage)
    # The CPU, also on a GPU machine: bit-exact resume and 1 process = 2 are CPU properties (CUDA's
    # atomic-add kernels, as in the embedding's backward, are not bitwise reproducible).
    path.write_text(f"out_dir = {str(out_dir)!r}\ntokenizer = {str(world / 'tokenizer.json')!r}\ndevice = 'cpu'\n"
                    f"num_workers = 0\nsave_every = 3\nstages = [{stage!r}]\n")
    return path


def losses(out_dir: Path, stage: str = "finetune") -> list[float]:
    return [json.loads(line)["loss"] for line in (out_dir / "logs" / f"{stage}.jsonl").read_text().splitlines()]


def test_config_errors_name_the_key(tmp_path):
    config = tmp_path / "config.py"
    config.write_text("out_dir = 'x'\nlerning_rate = 1.0\nstages = [dict(name='a')]\n")
    with pytest.raises(KeyError, match="lerning_rate"):
        train.load_config(str(config), [])
    config.write_text("out_dir = 'x'\nstages = [dict(name='a', epochs='two')]\n")
    with pytest.raises(TypeError, match="a.epochs"):
        train.load_config(str(config), [])
    config.write_text("out_dir = 'x'\nlearning_rate = 1e-3\nstages = [dict(name='a'), dict(name='b', learning_rate=5.0)]\n")
    with pytest.raises(KeyError, match="nope"):
        train.load_config(str(config), ["--nope=1"])
    with pytest.raises(TypeError, match="save_every"):
        train.load_config(str(config), ["--save_every=often"])
    with pytest.raises(KeyError, match="no stage named 'c'"):
        train.load_config(str(config), ["--c.learning_rate=1"])
    for bad, message in ((["--model={'image_aspect_ratio': 'Pad'}"], "image_aspect_ratio"),
                         (["--a.template=vicuna"], "a.template"), (["--stages=[]"], "--stages"),
                         (["--a.param_groups=[{'lr': 1.0}]"], "param_groups"), (["--a.trainable=['(']"], "bad regex"),
                         (["--on_data_error=ignore"], "on_data_error"),
                         (["--a.region_loss=True"], "region_loss belongs to the clip objective"),
                         (["--a.objective=clip", "--a.image_aspect_ratio=anyres"], "'anyres' tiles an MLLM's")):
        with pytest.raises((KeyError, ValueError), match=message):
            train.load_config(str(config), bad)
    # Precedence: file top-level < stage dict < --key=value < --stage.key=value.
    _, stages = train.load_config(str(config), [])
    assert [s.learning_rate for s in stages] == [1e-3, 5.0]
    _, stages = train.load_config(str(config), ["--learning_rate=0.5", "--b.learning_rate=0.25"])
    assert [s.learning_rate for s in stages] == [0.5, 0.25]


def test_schedule_warmup_then_cosine_to_floor():
    factors = [train.learning_rate_factor(step, 10, 2, 0.1) for step in range(10)]
    assert factors[:2] == [0.5, 1.0]
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))
    assert train.learning_rate_factor(10, 10, 2, 0.1) == pytest.approx(0.1)


def test_optimizer_groups_no_decay_on_vectors_and_own_lr():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    stage = train.StageConfig(name="s", weight_decay=0.1, learning_rate=1e-3,
                              param_groups=[dict(pattern=r"^2\.", learning_rate=5e-5, schedule="constant")])
    groups = train.build_optimizer(model, stage).param_groups
    by_key = {(g["lr"], g["weight_decay"], g["schedule"]): len(g["params"]) for g in groups}
    assert by_key == {(1e-3, 0.1, "cosine"): 1, (1e-3, 0.0, "cosine"): 3,
                      (5e-5, 0.1, "constant"): 1, (5e-5, 0.0, "constant"): 1}


def test_split_batch_keeps_images_with_their_rows():
    batch = {"input_ids": torch.tensor([[7, 9, 9, 0], [5, 5, 0, 0], [9, 9, 1, 2]]),
             "labels": torch.zeros(3, 4, dtype=torch.long),
             "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]]),
             "pixel_values": torch.tensor([[1.0], [2.0]])}
    first, second = train.split_batch(batch, 2, image_token_index=9)
    assert first["input_ids"].shape == (2, 4) and first["pixel_values"].tolist() == [[1.0]]
    assert second["pixel_values"].tolist() == [[2.0]]


def test_split_batch_cuts_an_encoder_decoders_labels_to_their_own_length():
    """T5's labels are the decoder's: as long as the longest answer of the chunk, not the prompt."""
    batch = {"input_ids": torch.tensor([[7, 9, 9, 4, 4], [5, 5, 0, 0, 0], [9, 9, 1, 2, 0], [3, 0, 0, 0, 0]]),
             "labels": torch.tensor([[4, 1, -100], [6, 6, 1], [8, 1, -100], [1, -100, -100]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]]),
             "pixel_values": torch.tensor([[1.0], [2.0]])}
    first, second = train.split_batch(batch, 2, image_token_index=9, encoder_decoder=True)
    assert first["input_ids"].shape == (2, 5) and first["labels"].tolist() == [[4, 1, -100], [6, 6, 1]]
    assert second["input_ids"].shape == (2, 4) and second["labels"].tolist() == [[8, 1], [1, -100]]
    assert second["pixel_values"].tolist() == [[2.0]]


def test_resume_continues_exactly(world, tiny_checkpoint, tmp_path):
    straight = tmp_path / "straight"
    train.main([str(write_config(tmp_path / "a.py", world, tiny_checkpoint, straight))])
    interrupted = tmp_path / "interrupted"
    config = write_config(tmp_path / "b.py", world, tiny_checkpoint, interrupted)
    with pytest.raises(SystemExit, match="stop_after_steps"):
        train.main([str(config), "--stop_after_steps=4"])
    assert not (interrupted / "finetune").exists()
    train.main([str(config), "--resume"])
    assert len(losses(straight)) == 6
    assert losses(interrupted) == losses(straight)
    final = MLLM.from_pretrained(str(interrupted / "finetune"))
    reference = MLLM.from_pretrained(str(straight / "finetune"))
    for (name, a), b in zip(final.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    assert (interrupted / "logs" / "finetune_loss.png").is_file()
    # A finished stage is never replaced by a plain rerun: --resume skips it, --overwrite=True retrains it.
    with pytest.raises(SystemExit, match=f"{interrupted / 'finetune'}.*--resume.*--overwrite=True"):
        train.main([str(config), "--stage", "finetune", "--max_steps=2"])
    train.main([str(config), "--stage", "finetune", "--resume", "--max_steps=2"])
    assert losses(interrupted) == losses(straight)
    train.main([str(config), "--overwrite=True", "--max_steps=2"])
    assert len(losses(interrupted)) == 2


def test_nan_loss_stops_and_keeps_last_good_checkpoint(world, tiny_checkpoint, tmp_path, monkeypatch):
    out_dir = tmp_path / "out"
    calls = {"count": 0}
    original = MLLM.forward

    def forward_with_nan_at_step_five(self, *args, **kwargs):
        logits, loss = original(self, *args, **kwargs)
        calls["count"] += 1
        return logits, loss * float("nan") if calls["count"] > 8 else loss  # 2 micro-batches a step

    monkeypatch.setattr(MLLM, "forward", forward_with_nan_at_step_five)
    with pytest.raises(FloatingPointError, match="at step 5"):
        train.main([str(write_config(tmp_path / "c.py", world, tiny_checkpoint, out_dir))])
    state = torch.load(out_dir / "checkpoints" / "finetune" / "train_state.pt", weights_only=False)
    assert state["step"] == 3
    MLLM.from_pretrained(str(out_dir / "checkpoints" / "finetune"))


def test_two_processes_match_one(world, tiny_checkpoint, tmp_path):
    """gloo on CPU: 2 processes x 1 micro-batch = 1 process x 2 micro-batches, same global batch."""
    runs = {}
    for processes in (1, 2):
        out_dir = tmp_path / f"world{processes}"
        config = write_config(tmp_path / f"d{processes}.py", world, tiny_checkpoint, out_dir, max_steps=3)
        result = torchrun(processes, config)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[processes] = losses(out_dir)
    assert len(runs[1]) == 3
    assert runs[2] == pytest.approx(runs[1], rel=1e-5, abs=1e-6)


def torchrun(processes: int, config: Path, *options: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--standalone",
               str(ROOT / "train.py"), str(config), *options]
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)


def test_fsdp_matches_one_process_and_resumes_on_another_number(world, tiny_checkpoint, tmp_path):
    """FSDP2 over 2 gloo processes: the losses of 1 process; its DCP checkpoint, written by 2
    processes at step 3, resumes in 1 process exactly, and one written by 1 process in 2; the
    gathered weights load in transformers."""
    import transformers
    runs = {}
    for name, first, then in (("one", 1, None), ("fsdp", 2, None), ("two_then_one", 2, 1), ("one_then_two", 1, 2)):
        out_dir = tmp_path / name
        config = write_config(tmp_path / f"{name}.py", world, tiny_checkpoint, out_dir, max_steps=5, parallel="fsdp")
        result = torchrun(first, config, *(["--stop_after_steps=3"] if then else []))
        if then:
            assert result.returncode != 0 and "continue with --resume" in result.stderr, result.stderr[-3000:]
            assert (out_dir / "checkpoints" / "finetune" / "sharded").is_dir()
            result = torchrun(then, config, "--resume")  # the shards of `first` processes, read by `then`
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = losses(out_dir)
    assert len(runs["one"]) == 5
    for name in ("fsdp", "two_then_one", "one_then_two"):
        assert runs[name] == pytest.approx(runs["one"], rel=1e-5, abs=1e-6), name
    one = MLLM.from_pretrained(str(tmp_path / "one" / "finetune"))
    for name in ("fsdp", "two_then_one", "one_then_two"):
        sharded = MLLM.from_pretrained(str(tmp_path / name / "finetune"))
        for (key, a), b in zip(sharded.state_dict().items(), one.state_dict().values()):
            assert torch.allclose(a, b, atol=1e-5), (name, key)
    reference = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "fsdp" / "finetune").eval()
    input_ids = torch.tensor([[1, 5, 9, 14, 30, 2]])
    with torch.no_grad():
        assert torch.allclose(reference(input_ids=input_ids).logits, sharded.eval()(input_ids), atol=1e-5)


def test_lora_under_fsdp_matches_one_process(world, tiny_checkpoint, tmp_path):
    """LoRA's factors are sharded and trained like any parameter, and the gathered save merges them."""
    runs = {}
    for processes in (1, 2):
        out_dir = tmp_path / f"lora{processes}"
        config = write_config(tmp_path / f"l{processes}.py", world, tiny_checkpoint, out_dir, max_steps=3,
                              parallel="fsdp", lora=dict(targets=[r"language_model.*_proj$"], rank=4, alpha=8),
                              trainable=[r"lora_", r"^multi_modal_projector\."], gradient_checkpointing=True)
        result = torchrun(processes, config)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[processes] = (losses(out_dir), MLLM.from_pretrained(str(out_dir / "finetune")).state_dict())
    assert runs[2][0] == pytest.approx(runs[1][0], rel=1e-5, abs=1e-6)
    start = MLLM.from_pretrained(str(tiny_checkpoint)).state_dict()
    key = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(runs[2][1][key], start[key])  # merged: the saved weight moved
    for name, value in runs[2][1].items():
        assert torch.allclose(value, runs[1][1][name], atol=1e-5), name


def test_compiled_blocks_train_as_eager_ones(world, tiny_checkpoint, tmp_path):
    """compile="on" (the default on CUDA): each block compiled by inductor, the same losses."""
    runs = {}
    for compile_setting in ("off", "on"):
        out_dir = tmp_path / compile_setting
        train.main([str(write_config(tmp_path / f"{compile_setting}.py", world, tiny_checkpoint, out_dir, max_steps=2,
                                     global_batch_size=4)), f"--compile={compile_setting}"])
        runs[compile_setting] = losses(out_dir)
    assert runs["on"] == pytest.approx(runs["off"], rel=1e-4)


def test_held_out_curve_and_loss_per_modality(world, tiny_checkpoint, tmp_path):
    """The last stage's held-out metrics every `curve_every` steps (and before the first), and the
    loss of image and text-only steps apart, each drawn to a PNG."""
    out_dir = tmp_path / "curve"
    config = write_config(tmp_path / "curve.py", world, tiny_checkpoint, out_dir, max_steps=5)
    config.write_text(config.read_text() + f"curve_every = 2\ncurve_samples = 4\neval_tasks = [dict(task='pope', "
                      f"data_dir={str(world)!r}, max_new_tokens=2, report=dict(pope_f1='f1', pope_yes_ratio='yes_ratio'))]\n")
    train.main([str(config)])
    points = [json.loads(line) for line in (out_dir / "logs" / "finetune_held_out.jsonl").read_text().splitlines()]
    assert [point["step"] for point in points] == [0, 2, 4, 5]
    assert all(set(point) == {"step", "pope_f1", "pope_yes_ratio"} for point in points)
    records = [json.loads(line) for line in (out_dir / "logs" / "finetune.jsonl").read_text().splitlines()]
    assert {record["modality"] for record in records} <= {"image", "text"} and len(records) == 5
    for name in ("finetune_held_out.png", "finetune_loss.png"):  # F1 and yes-ratio are rates: no _scores.png
        assert (out_dir / "logs" / name).stat().st_size > 0
    assert not (out_dir / "logs" / "finetune_held_out_scores.png").exists()
    final = json.loads((out_dir / "results.json").read_text())
    assert set(final) >= {"pope_f1", "pope_yes_ratio"}


def test_packed_stage_trains_as_the_unpacked_one(world, tiny_checkpoint, tmp_path):
    """Packing changes the rows, not what is learned: each micro-batch's loss is the mean over the
    same supervised tokens, so the whole run's losses agree."""
    runs = {}
    for pack in (False, True):
        out_dir = tmp_path / f"pack{pack}"
        train.main([str(write_config(tmp_path / f"p{pack}.py", world, tiny_checkpoint, out_dir, pack=pack,
                                     max_steps=4))])
        runs[pack] = losses(out_dir)
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)


def test_image_aspect_ratio_is_a_stage_setting(world, tiny_checkpoint, tmp_path):
    """LLaVA-1.5 center-crops in stage 1 and pads in stage 2: a stage's setting wins over the
    model's, and a bad value is refused naming the key."""
    tokenizer = data.load_tokenizer(str(world / "tokenizer.json"))
    model = MLLM.from_pretrained(str(tiny_checkpoint))
    for stage_setting, expected in (("", True), ("square", False), ("pad", True)):
        config, stages = train.load_config(str(write_config(tmp_path / "c.py", world, tiny_checkpoint, tmp_path,
                                                            image_aspect_ratio=stage_setting)), [])
        assert train.build_dataset(stages[0], config, model, tokenizer).pad_to_square is expected
    with pytest.raises(ValueError, match="finetune.image_aspect_ratio"):
        train.load_config(str(write_config(tmp_path / "c.py", world, tiny_checkpoint, tmp_path,
                                           image_aspect_ratio="crop")), [])
    # As LLaVA's train.py: the stage's choice is written into the model it saves.
    out_dir = tmp_path / "square"
    train.main([str(write_config(tmp_path / "s.py", world, tiny_checkpoint, out_dir, image_aspect_ratio="square",
                                 max_steps=1)), "--save_every=1"])
    assert MLLM.from_pretrained(str(out_dir / "finetune")).config.image_aspect_ratio == "square"


def test_text_only_batches_before_a_frozen_llm_teach_nothing_and_do_not_fail(world, tiny_checkpoint, tmp_path, capsys):
    """BLIP-2 keeps its LLM frozen: a text-only batch then reaches no trainable parameter. The
    step runs (and is counted, and reported), and changes nothing."""
    records = json.loads((world / "train" / "instruct.json").read_text())
    with_image = [r for r in records if "image" in r][:4]
    text_only = [r for r in records if "image" not in r][:1]
    assert text_only, "the world's mixture has text-only samples"
    (tmp_path / "mixed.json").write_text(json.dumps(with_image + text_only))
    out_dir = tmp_path / "frozen"
    train.main([str(write_config(tmp_path / "f.py", world, tiny_checkpoint, out_dir, data=str(tmp_path / "mixed.json"),
                                 trainable=[r"^multi_modal_projector\."], global_batch_size=4, micro_batch_size=4,
                                 max_steps=2, warmup_steps=0))])
    assert "micro-batches reached no trainable parameter" in capsys.readouterr().out
    assert len(losses(out_dir)) == 2
    before, after = MLLM.from_pretrained(str(tiny_checkpoint)), MLLM.from_pretrained(str(out_dir / "finetune"))
    assert all(torch.equal(value, before.language_model.state_dict()[key])
               for key, value in after.language_model.state_dict().items())
    assert not torch.equal(after.multi_modal_projector.linear_1.weight, before.multi_modal_projector.linear_1.weight)


@pytest.mark.parametrize("name", sorted(path.name for path in (ROOT / "configs").glob("*.py")))
def test_every_shipped_config_loads(name, monkeypatch):
    """Every config in configs/ executes and passes load_config's key and type checks, so a typo in
    a recipe that no test trains fails here, not an hour into a run."""
    monkeypatch.chdir(ROOT)
    config, stages = train.load_config(f"configs/{name}", [])
    assert stages and config.out_dir
