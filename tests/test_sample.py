"""sample.py: the streamed answer is the answer eval.py generates for the same prompt, a dialogue
continues with its history, and beam search prints its answer at the end."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import sample
import shapes
from conftest import tiny_mllm_config
from eval import Sample, build_evaluator
from model import MLLM

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random LLaVA-1.5 saved with the world's tokenizer, and one world image."""
    world = shapes.build_world(tmp_path_factory.mktemp("world"), seed=0, num_train_images=4, num_eval_images=2)
    tokenizer = data.load_tokenizer(str(world / "tokenizer.json"))
    torch.manual_seed(0)
    model = MLLM(tiny_mllm_config(tokenizer))
    with torch.no_grad():  # a sharper head, so that greedy answers vary from token to token
        model.language_model.lm_head.weight.mul_(20)
    directory = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(str(directory))
    (directory / "tokenizer.json").write_text((world / "tokenizer.json").read_text())
    return directory, sorted((world / "images").iterdir())[0]


def test_streamed_answer_is_evals_answer(checkpoint, capsys):
    directory, image = checkpoint
    answers = sample.main(["--ckpt", str(directory), "--image", str(image), "--prompt", "What color is the circle?",
                           "--max-new-tokens", "12", "--device", "cpu"])
    printed = capsys.readouterr().out
    model = MLLM.from_pretrained(str(directory)).eval()
    evaluator = build_evaluator(model, data.load_tokenizer(str(directory / "tokenizer.json")))
    expected = evaluator.generate([Sample("0", image, "", None)], [[("What color is the circle?", None)]],
                                  max_new_tokens=12)[0]
    assert answers == [expected] and expected
    assert printed == expected + "\n"


def test_interactive_dialogue_and_beam_search(checkpoint):
    directory, image = checkpoint
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--ckpt", str(directory), "--image", str(image),
                             "--max-new-tokens", "6", "--num-beams", "2", "--device", "cpu"],
                            input="How many objects are there?\nAnd their colors?\n\n", capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    # Three prompts (two questions, then the empty line that ends), each answer ending its line; a
    # random tiny model may print any character, line breaks included, so count no more than that.
    assert result.stderr.count("> ") == 3 and result.stdout.endswith("\n") and result.stdout.count("\n") >= 2


def test_missing_image_is_named(checkpoint):
    directory, _ = checkpoint
    with pytest.raises(SystemExit, match="image not found: nowhere.png"):
        sample.main(["--ckpt", str(directory), "--image", "nowhere.png", "--prompt", "hi"])
