"""The original LLaVA's choices on the shapes world, beside configs/shapes_llava15.py: the
miniature of the dissertation's Table 4.2 (what LLaVA-1.5 changed and what each change buys).

Three differences from shapes_llava15, everything else equal (same world, dims, steps, template):
  - a linear connector instead of mlp2x_gelu (Eq. 3.1 vs section 4.3),
  - last-layer ViT features instead of layer -2,
  - no response-format prompts, in training data and eval prompts (section 4.3, Table 4.1).
    python train.py configs/shapes_llava.py
"""
exec(open(__file__.replace("shapes_llava.py", "shapes_llava15.py")).read())

out_dir = "out/shapes_llava"
model = dict(model, projector_type="linear", vision_feature_layer=-1)
stages[2]["vision_path"] = "out/shapes_llava15/clip"  # the same pretrained tiny CLIP and LLaMA:
stages[2]["language_path"] = "out/shapes_llava15/lm"  # only the LLaVA choices differ
stages = stages[2:]
stages[1] = dict(stages[1], data=_world + "/train/instruct_no_format_prompts.json")
eval_tasks = [dict(task, prompt_style="llava") for task in eval_tasks]
oracle_results = ""  # the oracle rung is the LLaVA-1.5 recipe's (configs/shapes_oracle_text.py), not this one's
