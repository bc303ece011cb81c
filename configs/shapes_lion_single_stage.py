"""LION's Table 3 baseline in miniature: the single-stage instruction tuning that the stage-wise
recipe replaces. The same model, data, tags and trainable parts as configs/shapes_lion.py's last
stage, trained on every task at once for as many steps as its three stages together.
    python train.py configs/shapes_lion_single_stage.py   (after shapes_lion.py's prerequisites)
"""
__file__ = __file__.replace("shapes_lion_single_stage.py", "shapes_lion.py")
exec(open(__file__).read())

out_dir = "out/shapes_lion_single_stage"
stages = [dict(stages[-1], name="single", **_components, learning_rate=1e-3,
               max_steps=sum(stage["max_steps"] for stage in stages))]
