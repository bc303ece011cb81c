"""Lynx's Table 5 "w/o high-resolution" in miniature: configs/shapes_lynx.py with its
resolution stage kept at the tower's 64 px (same data, steps and trainable parts), from the same
pretrained stage:
    python train.py configs/shapes_lynx_low_resolution.py   (after configs/shapes_lynx.py)
"""
__file__ = __file__.replace("shapes_lynx_low_resolution.py", "shapes_lynx.py")
exec(open(__file__).read())

out_dir = "out/shapes_lynx_low_resolution"
eval_blind = False
stages = [dict(stages[1], init="out/shapes_lynx/pretrain", image_size=0), stages[2]]
