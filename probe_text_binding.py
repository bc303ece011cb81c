"""Can the tiny LLaMA answer "Is there a blue square?" from a description it has just read?

POPE's question compares the question with its context: half the answers are yes, so neither
the question alone nor the context alone predicts the answer, and a model gains nothing until
it compares the two. This probe asks whether the language model learns that comparison at all
when the objects are given as TEXT, with the vision tower out of the picture. `write` makes
language-model documents: a scene's caption, then existence questions with POPE's negatives
(shapes.existence_probe: half present, the absent ones half random, half sharing a color or a
shape with a present object), each answered. train.py's lm stage trains on them. `score`
measures the teacher-forced yes / no accuracy on held-out scenes: the first question after each
caption, where chance is 0.5.

    python probe_text_binding.py write data/text_binding
    python train.py configs/shapes_llava15.py --stage lm --out_dir=out/text_binding \
        --lm.data=data/text_binding/train.jsonl --lm.max_steps=2000 --stop_after_steps=250
    python probe_text_binding.py score out/text_binding/checkpoints/lm --data data/text_binding
    (again with --resume for the next 250 steps, and so on: README, the main job)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

import data
import shapes
from model import LanguageModel

ANSWERS = (" yes", " no")


def binding_document(scene: shapes.Scene, rng: np.random.Generator,
                     num_questions: int) -> tuple[str, list[tuple[str, str]]]:
    """(caption, [(question, answer)]): POPE's question about the scene, asked num_questions times."""
    caption = shapes.capitalize(shapes.pick(rng, shapes.caption_variants(scene)))
    questions = []
    for _ in range(num_questions):
        category, present = shapes.existence_probe(rng, scene)
        questions.append((f"Is there {shapes.with_article(category)} in the image?", ANSWERS[0 if present else 1]))
    return caption, questions


def write_documents(out_dir: str | Path, seed: int = 0, num_train: int = 20000, num_heldout: int = 500,
                    num_questions: int = 8) -> None:
    """train.jsonl ({"text"}, for the lm stage) from the world's training scenes and heldout.jsonl
    ({"context", "answer"}: a caption and one question) from its eval scenes. Only the scenes are
    drawn, no images: the text is all this probe needs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, count, name in (("train", num_train, "train.jsonl"), ("eval", num_heldout, "heldout.jsonl")):
        rows = []
        for index in range(count):
            scene = shapes.sample_scene(seed, split, index, index + 1, shapes.DEFAULT_IMAGE_SIZE)
            rng = np.random.default_rng([seed, shapes.SPLITS.index(split), index])
            caption, questions = binding_document(scene, rng, num_questions)
            if split == "train":
                rows.append({"text": caption + "".join(f" {q}{a}." for q, a in questions)})
            else:
                rows.append({"context": f"{caption} {questions[0][0]}", "answer": questions[0][1]})
        shapes.write_jsonl(out_dir / name, rows)


def answer_token_ids(tokenizer: Tokenizer) -> list[int]:
    ids = [tokenizer.encode(answer, add_special_tokens=False).ids for answer in ANSWERS]
    if any(len(token_ids) != 1 for token_ids in ids):
        raise ValueError(f"the tokenizer splits the answers {ANSWERS} into {ids}; the probe needs one token each")
    return [token_ids[0] for token_ids in ids]


@torch.no_grad()
def yes_no_accuracy(model: LanguageModel, tokenizer: Tokenizer, rows: list[dict], batch_size: int = 64) -> float:
    """Share of rows whose " yes" vs " no" next-token logit after the context picks the answer."""
    model.eval()
    yes_id, no_id = answer_token_ids(tokenizer)
    bos_id = data.require_token_id(tokenizer, data.BOS_TOKEN)
    correct = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        encodings = tokenizer.encode_batch([row["context"] for row in chunk], add_special_tokens=False)
        encoded = [[bos_id] + encoding.ids for encoding in encodings]
        batch = data.collate([{"input_ids": torch.tensor(ids), "pixel_values": None} for ids in encoded],
                             model.config.pad_token_id)
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        last = logits[torch.arange(len(chunk)), batch["attention_mask"].sum(1) - 1]
        says_yes = (last[:, yes_id] > last[:, no_id]).tolist()
        correct += sum(yes == (row["answer"] == ANSWERS[0]) for yes, row in zip(says_yes, chunk))
    return correct / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="write train.jsonl and heldout.jsonl")
    write.add_argument("out_dir")
    write.add_argument("--seed", type=int, default=0)
    write.add_argument("--num-train", type=int, default=20000)
    write.add_argument("--questions", type=int, default=8, help="questions per training document")
    score = commands.add_parser("score", help="yes / no accuracy of a language model on heldout.jsonl")
    score.add_argument("checkpoint", help="a LlamaForCausalLM directory (train.py's lm stage)")
    score.add_argument("--data", default="data/text_binding")
    score.add_argument("--tokenizer", default="data/shapes/tokenizer.json")
    args = parser.parse_args()
    if args.command == "write":
        write_documents(args.out_dir, args.seed, args.num_train, num_questions=args.questions)
        return
    lines = (Path(args.data) / "heldout.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    model = LanguageModel.from_pretrained(args.checkpoint)
    accuracy = yes_no_accuracy(model, data.load_tokenizer(args.tokenizer), rows)
    yes_share = sum(row["answer"] == ANSWERS[0] for row in rows) / len(rows)
    print(f"{args.checkpoint}: yes / no accuracy {accuracy:.3f} on {len(rows)} held-out questions "
          f"(chance 0.5; yes is the answer of {yes_share:.3f})")


if __name__ == "__main__":
    main()
