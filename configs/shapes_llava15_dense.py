"""A measured variant of the main job (docs/shapes-world.md): every training image gets a fourth
stage-2 sample of 8 existence questions ("Is there a red circle in the image?" -> yes / no, present
half the time), and stage 2 runs 1000 steps: about 60,000 existence questions, against ~4,500 in
the recipe. Its own world and outputs, so the main job's stay as they are.

    python train.py configs/shapes_llava15_dense.py
"""
exec(open(__file__.replace("shapes_llava15_dense.py", "shapes_llava15.py")).read()
     .replace('_world = "data/shapes"', '_world = "data/shapes_dense"'))
world = dict(world, existence_turns=8)
out_dir = "out/shapes_llava15_dense"
oracle_results = ""  # the oracle rung belongs to the main job's recipe
stages[-1] = dict(stages[-1], max_steps=1000)
