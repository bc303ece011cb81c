"""A measured variant of the main job (docs/shapes-world.md): the world's grid layout, where every
object is centred in a cell of a 4 x 4 grid and the tower's patch is the cell, so that an object
is exactly one image token (16 image tokens instead of 64); and a fourth stage-2 sample per image
of 12 existence questions (about 63,000 in stage 2's 22,400 samples). Its own world and
outputs.

    python train.py configs/shapes_llava15_grid.py
"""
exec(open(__file__.replace("shapes_llava15_grid.py", "shapes_llava15.py")).read()
     .replace('_world = "data/shapes"', '_world = "data/shapes_grid"')
     # A 96 px cell of 24 px is 16 px in the 64 px tower: one patch of 16.
     .replace("patch_size=8", "patch_size=16"))
world = dict(world, layout="grid", existence_turns=12)
out_dir = "out/shapes_llava15_grid"
oracle_results = ""  # the oracle rung belongs to the main job's recipe
eval_blind = False  # as measured
curve_every = 70
curve_samples = 48
