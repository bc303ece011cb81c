"""Ask a trained model about one image and watch the answer arrive, token by token.

    python sample.py --ckpt out/shapes_llava15/finetune --image data/shapes/images/000000006001.png \
        --prompt "What color is the circle?"
    python sample.py --ckpt out/shapes_llava15/finetune --image data/shapes/images/000000006001.png
        (no --prompt: an interactive loop, one question per line; an empty line or Ctrl-D ends it,
        and each question continues the dialogue, the image staying in the first turn)

The prompt is exactly what eval.py sends (its prompt styles and chat templates, the model
config's by default), and the decoding flags are eval.py's (`--num-beams`, `--do-sample`,
`--temperature`, ...). Greedy and sampled answers stream as they are generated; a beam search
answer is printed when the search ends, since the best beam is known only then.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from conversation import TEMPLATES
from data import load_tokenizer
from eval import PROMPT_STYLES, Evaluator, Sample, add_decoding_arguments, build_evaluator, decoding_options
from model import MLLM


def answer(evaluator: Evaluator, image: Path, dialogue: list[tuple[str, str | None]], options: dict,
           write: Callable[[str], object]) -> str:
    """The answer to the dialogue's last question, written out as it grows (streamed unless beam
    search). `write` receives only new text; the answer is returned whole."""
    generated: list[int] = []
    shown = ""

    def stream(tokens: torch.Tensor) -> None:
        nonlocal shown
        generated.append(int(tokens[0]))
        # Decode everything so far: a BPE piece can change how the text before it decodes
        # (spaces, multi-byte characters), so only a text that extends what is shown is written.
        text = evaluator.decode(generated)
        if text.startswith(shown) and text != shown:
            write(text[len(shown):])
            shown = text

    streams = options.get("num_beams", 1) == 1
    sample = Sample(sample_id=str(image), image=image, text=dialogue[-1][0], target=None)
    result = evaluator.generate([sample], [dialogue], **options, **({"streamer": stream} if streams else {}))[0]
    write(result[len(shown):] if result.startswith(shown) else "\n" + result)
    write("\n")
    return result


def questions_from_terminal() -> Iterator[str]:
    """Questions typed one per line. The prompt goes to stderr, so stdout holds only answers."""
    print("Ask about the image, one question per line; an empty line ends.", file=sys.stderr)
    while True:
        sys.stderr.write("> ")
        sys.stderr.flush()
        question = sys.stdin.readline().strip()
        if not question:
            return
        yield question


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description="Ask a trained model about one image, streaming the answer.")
    parser.add_argument("--ckpt", required=True, help="checkpoint directory (MLLM.from_pretrained)")
    parser.add_argument("--image", required=True, help="the image file")
    parser.add_argument("--prompt", help="the question; without it, an interactive loop")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's)")
    parser.add_argument("--prompt-style", choices=list(PROMPT_STYLES), help="default: the model config's, else llava15")
    parser.add_argument("--template", choices=list(TEMPLATES), help="default: the model config's, else the style's")
    parser.add_argument("--seed", type=int, default=1337, help="for --do-sample")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_decoding_arguments(parser)
    args = parser.parse_args(argv)
    image = Path(args.image)
    if not image.is_file():
        raise SystemExit(f"image not found: {image}")

    torch.manual_seed(args.seed)
    model = MLLM.from_pretrained(args.ckpt).to(args.device).eval()
    tokenizer = load_tokenizer(args.tokenizer or str(Path(args.ckpt) / "tokenizer.json"))
    evaluator = build_evaluator(model, tokenizer, args.prompt_style, args.template, stop_strings=args.stop)
    options = {"max_new_tokens": 256, **decoding_options(args)}

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    history: list[tuple[str, str | None]] = []
    for question in [args.prompt] if args.prompt is not None else questions_from_terminal():
        history.append((question, answer(evaluator, image, history + [(question, None)], options, write)))
    return [reply for _, reply in history]


if __name__ == "__main__":
    main()
