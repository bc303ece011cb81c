"""The main job in miniature: both shapes-world recipes, every stage for two steps on a small
world, then the eval with and without the image, through train.py's real entry point."""
import json
from pathlib import Path

import pytest
import torch

import train
from model import MLLM, LanguageModel, T5LanguageModel
from vision import CLIPModel

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ["--max_steps=2", "--micro_batch_size=8", "--global_batch_size=8", "--num_workers=0"]
HEADLINE = ("vqa_accuracy", "rec_accuracy", "pope_f1", "cider")


def smoke_config(name: str, world: Path, out: Path, tmp_path: Path) -> Path:
    """The shipped config with its world and output folders moved into tmp_path, a small world,
    and the eval cut to 3 samples per task."""
    text = (ROOT / "configs" / name).read_text()
    moves = {"shapes_llava15.py": {'"data/shapes"': f'"{world}"', '"out/shapes_llava15"': f'"{out}"'},
             # shapes_llava.py execs smoke_shapes_llava15.py beside it, then starts from its towers.
             "shapes_llava.py": {'"out/shapes_llava"': f'"{out.with_name("llava")}"',
                                 '"out/shapes_llava15/': f'"{out}/'},
             # The Q-Former recipes start from the main job's towers too; instructblip execs blip2.
             "shapes_blip2.py": {'"out/shapes_blip2"': f'"{out.with_name("blip2")}"',
                                 '"out/shapes_llava15/': f'"{out}/'},
             "shapes_instructblip.py": {'"out/shapes_instructblip"': f'"{out.with_name("instructblip")}"'},
             "shapes_instructblip_flant5.py": {'"out/shapes_instructblip_flant5"': f'"{out.with_name("flant5")}"'},
             # LION starts from the Flan-T5 recipe's T5 and stage-1 Q-Former.
             "shapes_lion.py": {'"out/shapes_lion"': f'"{out.with_name("lion")}"',
                                '"out/shapes_instructblip_flant5/': f'"{out.with_name("flant5")}/'},
             # Lynx starts from the main job's towers.
             "shapes_lynx.py": {'"out/shapes_lynx"': f'"{out.with_name("lynx")}"',
                                '"out/shapes_llava15/': f'"{out}/'},
             # LLaVA-NeXT: its own 192 px world, the main job's towers and tokenizer.
             "shapes_llava_next.py": {'"out/shapes_llava_next"': f'"{out.with_name("llava_next")}"',
                                      '"out/shapes_llava15/': f'"{out}/', '"data/shapes_192"': f'"{world}_192"',
                                      '"data/shapes/tokenizer.json"': f'"{world}/tokenizer.json"'},
             # Lyrics execs smoke_shapes_blip2.py beside it, then starts from its stage 1 and the main job's parts.
             "shapes_lyrics.py": {'"out/shapes_lyrics"': f'"{out.with_name("lyrics")}"',
                                  '"out/shapes_blip2/': f'"{out.with_name("blip2")}/', '"out/shapes_llava15/': f'"{out}/'},
             # REACT starts from the main job's CLIP.
             "shapes_react.py": {'"out/shapes_react"': f'"{out.with_name("react")}"',
                                 '"out/shapes_llava15/': f'"{out}/'},
             # LLaVA-1.5-HD execs smoke_shapes_llava_next.py beside it, then starts from its stage 1.
             "shapes_llava15_hd.py": {'"out/shapes_llava15_hd"': f'"{out.with_name("llava15_hd")}"',
                                      '"out/shapes_llava_next/': f'"{out.with_name("llava_next")}/'}}[name]
    for original, moved in moves.items():
        assert original in text, f"configs/{name} no longer holds {original}"
        text = text.replace(original, moved)
    text += ("\nworld = dict(world, num_train_images=40, num_eval_images=12)"
             "\neval_tasks = [dict(task, limit=3) for task in eval_tasks]\n")
    path = tmp_path / f"smoke_{name}"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("recipe")
    out = tmp_path / "llava15"
    train.main([str(smoke_config("shapes_llava15.py", tmp_path / "world", out, tmp_path)), *SMOKE])
    return tmp_path


def check_results(results: dict) -> None:
    for metrics in (results, results["blind"]):
        for key in HEADLINE:
            assert 0.0 <= metrics[key] <= (10.0 if key == "cider" else 1.0), (key, metrics[key])


def test_llava15_recipe_runs_every_stage_and_writes_results(recipe):
    out = recipe / "llava15"
    results = json.loads((out / "results.json").read_text())
    check_results(results)
    assert results["wall_seconds"] > 0
    assert results["tasks"]["vqa"]["samples"] == 3
    # Each stage's output loads in the public layout it claims.
    CLIPModel.from_pretrained(str(out / "clip"))
    LanguageModel.from_pretrained(str(out / "lm"))
    model = MLLM.from_pretrained(str(out / "finetune"))
    assert model.config.projector_type == "mlp2x_gelu" and model.config.vision_feature_layer == -2
    for stage in ("clip", "lm", "pretrain", "finetune"):
        assert (out / "logs" / f"{stage}_loss.png").is_file()
        assert len((out / "logs" / f"{stage}.jsonl").read_text().splitlines()) == 2
    assert (out / "eval" / "blind_vqa").is_dir()


def test_llava_recipe_reuses_the_pretrained_towers(recipe):
    config = smoke_config("shapes_llava.py", recipe / "world", recipe / "llava15", recipe)
    train.main([str(config), *SMOKE])
    results = json.loads((recipe / "llava" / "results.json").read_text())
    check_results(results)
    model = MLLM.from_pretrained(str(recipe / "llava" / "finetune"))
    assert model.config.projector_type == "linear" and model.config.vision_feature_layer == -1


@pytest.mark.parametrize("name", ["blip2", "instructblip"])
def test_qformer_recipes_reuse_the_towers(recipe, name):
    """BLIP-2's stage 1 (ITC + ITM + ITG, logged apart) on the main job's tiny CLIP, then the
    Q-Former before its frozen LLaMA; both write results with the blind baseline."""
    smoke_config("shapes_blip2.py", recipe / "world", recipe / "llava15", recipe)
    config = smoke_config(f"shapes_{name}.py", recipe / "world", recipe / "llava15", recipe)
    train.main([str(config), *SMOKE])
    out = recipe / name
    check_results(json.loads((out / "results.json").read_text()))
    first_step = json.loads((out / "logs" / "qformer.jsonl").read_text().splitlines()[0])
    assert first_step["loss"] == pytest.approx(first_step["itc"] + first_step["itm"] + first_step["itg"], rel=1e-5)
    model = MLLM.from_pretrained(str(out / "finetune"))
    assert model.config.projector_type == "qformer"
    assert model.multi_modal_projector.takes_instruction is (name == "instructblip")
    assert (out / "finetune" / "qformer_tokenizer.json").is_file()
    pretrained = LanguageModel.from_pretrained(str(recipe / "llava15" / "lm")).state_dict()
    assert all(torch.equal(value, pretrained[key]) for key, value in model.language_model.state_dict().items())


def test_flan_t5_recipe_trains_a_t5_and_puts_it_behind_the_qformer(recipe):
    """A T5 from scratch as a prefix LM, BLIP-2's stage 1, then InstructBLIP before the frozen T5;
    eval asks the encoder-decoder the same questions, with and without the image."""
    for name in ("shapes_blip2.py", "shapes_instructblip.py"):
        smoke_config(name, recipe / "world", recipe / "llava15", recipe)
    config = smoke_config("shapes_instructblip_flant5.py", recipe / "world", recipe / "llava15", recipe)
    train.main([str(config), *SMOKE])
    out = recipe / "flant5"
    check_results(json.loads((out / "results.json").read_text()))
    t5 = T5LanguageModel.from_pretrained(str(out / "t5"))
    model = MLLM.from_pretrained(str(out / "finetune"))
    assert isinstance(model.language_model, T5LanguageModel) and model.multi_modal_projector.takes_instruction
    pretrained = t5.state_dict()
    assert all(torch.equal(value, pretrained[key]) for key, value in model.language_model.state_dict().items())
    assert len((out / "logs" / "finetune.jsonl").read_text().splitlines()) == 2


def test_lion_recipe_trains_each_stage_its_own_parts(recipe):
    """LION's three stages on the Flan-T5 recipe's T5 and Q-Former (LION, Fig. 4): stage "image"
    trains the Q-Former and the image-level adapter only, "region" the aggregator, its MLP and
    the region-level adapter only, "all" both branches, the router and the soft prompt; the T5
    itself never changes, and eval runs with the tags."""
    for name in ("shapes_blip2.py", "shapes_instructblip.py", "shapes_instructblip_flant5.py"):
        flant5 = smoke_config(name, recipe / "world", recipe / "llava15", recipe)
    if not (recipe / "flant5" / "qformer").is_dir():
        for stage in ("t5", "qformer"):
            train.main([str(flant5), "--stage", stage, *SMOKE])
    config = smoke_config("shapes_lion.py", recipe / "world", recipe / "llava15", recipe)
    train.main([str(config), *SMOKE])
    out = recipe / "lion"
    check_results(json.loads((out / "results.json").read_text()))
    image, region, final = (MLLM.from_pretrained(str(out / stage)) for stage in ("image", "region", "all"))
    assert (image.config.visual_input, region.config.visual_input, final.config.visual_input) == \
        ("QFORMER", "AGGREGATOR", "ALL")
    assert image.config.hint_token_index is None and final.config.hint_token_index is not None
    states = [model.state_dict() for model in (image, region, final)]
    t5 = T5LanguageModel.from_pretrained(str(recipe / "flant5" / "t5")).state_dict()
    for state in states:  # the LLM is frozen but for its adapters
        assert all(torch.equal(state[f"language_model.{key}"], value) for key, value in t5.items())

    def trained(state: dict, group: str) -> bool:  # an adapter's up projection starts at zero
        return any(bool(value.any()) for key, value in state.items() if f"{group}.up_proj.weight" in key)

    assert trained(states[0], "adapters.1") and not trained(states[0], "adapters.0")

    def changed(before: dict, after: dict) -> set[str]:
        groups = ("adapters.0.", "adapters.1.", "router_gates", ".qformer.", "query_tokens", "vision_aggregator.",
                  "aggregator_projector.", "vision_tower.")
        return {group for group in groups for key in after
                if group in key and key in before and not torch.equal(before[key], after[key])}

    assert changed(states[0], states[1]) == {"adapters.0.", "vision_aggregator.", "aggregator_projector."}
    assert changed(states[1], states[2]) >= {"router_gates", ".qformer.", "vision_aggregator.", "adapters.0.",
                                             "adapters.1."}
    assert "soft_prompt_hint" in states[2] and "soft_prompt_hint" not in states[1]


def test_lynx_recipe_raises_the_resolution_and_trains_only_the_bridge(recipe):
    """Lynx's three stages on the main job's CLIP and LLaMA (Lynx, sec. 2.2): the resolution
    stage moves the tower to the world's 96 px and trains it, the others leave it; the resampler
    gives 32 tokens at any resolution; the LLaMA never changes but for its adapters."""
    config = smoke_config("shapes_lynx.py", recipe / "world", recipe / "llava15", recipe)
    train.main([str(config), *SMOKE])
    out = recipe / "lynx"
    check_results(json.loads((out / "results.json").read_text()))
    models = [MLLM.from_pretrained(str(out / stage)) for stage in ("pretrain", "resolution", "instruct")]
    assert [model.config.vision_config.image_size for model in models] == [64, 96, 96]
    assert all(model.num_image_tokens == 32 for model in models)
    states = [model.state_dict() for model in models]
    llama = LanguageModel.from_pretrained(str(recipe / "llava15" / "lm")).state_dict()
    for state in states:
        assert all(torch.equal(state[f"language_model.{key}"], value) for key, value in llama.items())

    def changed(before: dict, after: dict) -> set[str]:
        return {key.split(".")[0] + (".output_adapter" if "output_adapter" in key else "") for key in after
                if before[key].shape == after[key].shape and not torch.equal(before[key], after[key])}

    assert changed(states[0], states[1]) == {"multi_modal_projector", "language_model.output_adapter", "vision_tower"}
    assert changed(states[1], states[2]) == {"multi_modal_projector", "language_model.output_adapter"}


def test_llava_next_and_hd_recipes_tile_the_finetune_stage(recipe):
    """LLaVA-NeXT in miniature: stage 1 at one tile, stage 2 with AnyRes, which adds the
    image_newline and trains it with the projector, the LLM and the tower (LLaVA-NeXT); LLaVA-1.5-HD
    from the same stage 1, with its own grid and merge from the config file and no newline."""
    config = smoke_config("shapes_llava_next.py", recipe / "world", recipe / "llava15", recipe)
    train.main([str(config), *SMOKE, "--eval_blind=True"])  # blind: a uniform image, its tiles not padding
    out = recipe / "llava_next"
    check_results(json.loads((out / "results.json").read_text()))
    pretrain, finetune = (MLLM.from_pretrained(str(out / stage)) for stage in ("pretrain", "finetune"))
    assert pretrain.high_resolution is None and not hasattr(pretrain, "image_newline")
    assert finetune.config.image_aspect_ratio == "anyres" and finetune.high_resolution.grid((192, 192)) == (2, 2)
    before, after = pretrain.state_dict(), finetune.state_dict()
    changed = {key.split(".")[0] for key in before if not torch.equal(before[key], after[key])}
    assert changed == {"multi_modal_projector", "language_model", "vision_tower"} and "image_newline" in after
    hd_config = smoke_config("shapes_llava15_hd.py", recipe / "world", recipe / "llava15", recipe)
    train.main([str(hd_config), *SMOKE])
    hd = MLLM.from_pretrained(str(recipe / "llava15_hd" / "finetune"))
    assert hd.config.mm_patch_merge_type == "spatial" and hd.config.image_grid_pinpoints == [[128, 128]]
    assert not hasattr(hd, "image_newline") and hd.high_resolution.num_image_tokens((100, 190)) == 64 + 16 * 16


def test_react_recipe_retrieves_and_trains_only_the_gated_blocks(recipe):
    """REACT in miniature on the main job's CLIP: text-to-text retrieval writes the pool's chosen
    records, the stage adds gated blocks and trains nothing else (the text tower and the original
    image blocks stay bit-identical), and both classification tasks are scored zero-shot."""
    config = smoke_config("shapes_react.py", recipe / "world", recipe / "llava15", recipe)
    train.main([str(config), *SMOKE])
    out = recipe / "react"
    results = json.loads((out / "results.json").read_text())
    for name in ("small_accuracy", "large_accuracy"):
        assert 0.0 <= results[name] <= 1.0
    assert results["tasks"]["classification_small"]["chance"] == pytest.approx(0.2)
    retrieved = json.loads((out / "retrieved" / "react.json").read_text())
    pool = json.loads((recipe / "world" / "train" / "pretrain.json").read_text())
    assert 0 < len(retrieved) <= len(pool) and all(record in pool for record in retrieved)
    assert len({record["id"] for record in retrieved}) == len(retrieved)
    generic = CLIPModel.from_pretrained(str(recipe / "llava15" / "clip")).state_dict()
    customized = CLIPModel.from_pretrained(str(out / "react"))
    assert customized.config.vision_config.num_gated_layers == 2
    state = customized.state_dict()
    assert all(torch.equal(state[key], value) for key, value in generic.items())
    assert any(not torch.equal(value, torch.zeros(())) for key, value in state.items() if key.endswith("alpha_attn"))


def test_lyrics_recipe_grows_blip2_into_the_mqformer_and_tunes_it_with_lora(recipe):
    """Lyrics in miniature: the oracle refiner written from tags.json, the MQ-Former's four losses
    (logged apart) from BLIP-2's stage 1, then instruction tuning through LoRA, where the LLM's own
    weights stay as they were and eval reads the refiner."""
    blip2 = smoke_config("shapes_blip2.py", recipe / "world", recipe / "llava15", recipe)
    if not (recipe / "blip2" / "qformer").is_dir():
        train.main([str(blip2), "--stage", "qformer", *SMOKE])
    config = smoke_config("shapes_lyrics.py", recipe / "world", recipe / "llava15", recipe)
    train.main([str(config), *SMOKE])
    out = recipe / "lyrics"
    check_results(json.loads((out / "results.json").read_text()))
    first_step = json.loads((out / "logs" / "pretrain.jsonl").read_text().splitlines()[0])
    assert first_step["loss"] == pytest.approx(sum(first_step[k] for k in ("itc", "itm", "icg", "msp")), rel=1e-5)
    assert (out / "refiner" / "refiner.json").is_file()
    model = MLLM.from_pretrained(str(out / "instruct"))
    assert model.config.num_grounding_queries == 16 and model.num_image_tokens == 32
    llama = LanguageModel.from_pretrained(str(recipe / "llava15" / "lm")).state_dict()
    state = model.language_model.state_dict()
    changed = [key for key, value in llama.items() if not torch.equal(state[key], value)]
    assert changed and all(key.endswith(("q_proj.weight", "v_proj.weight")) for key in changed)  # LoRA, merged
    # The spatial prompt (sec. 3.3's option): the LLM grows by Lyrics' tokens, the config says so, eval asks so.
    train.main([str(config), "--stage", "instruct", *SMOKE, f"--out_dir={recipe / 'lyrics_spatial'}",
                f"--instruct.vision_path={out / 'pretrain'}", "--instruct.spatial_prompt=True"])
    spatial = MLLM.from_pretrained(str(recipe / "lyrics_spatial" / "instruct"))
    assert spatial.config.spatial_prompt and spatial.config.text_config.vocab_size > model.config.text_config.vocab_size
    check_results(json.loads((recipe / "lyrics_spatial" / "results.json").read_text()))
