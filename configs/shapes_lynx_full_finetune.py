"""Adapters vs the whole LLM in Lynx's instruction stage, in miniature: configs/shapes_lynx.py's
last stage from the same resolution-enhanced model, with every LLaMA weight trained too (Lynx
keeps the LLM frozen to keep its language ability; docs/lynx.md measures the held-out text loss):
    python train.py configs/shapes_lynx_full_finetune.py   (after configs/shapes_lynx.py)
"""
__file__ = __file__.replace("shapes_lynx_full_finetune.py", "shapes_lynx.py")
exec(open(__file__).read())

out_dir = "out/shapes_lynx_full_finetune"
eval_blind = False
stages = [dict(stages[2], init="out/shapes_lynx/resolution", trainable=[*_bridge, r"^language_model\."])]
