"""LION's Fig. 6 in miniature: stage 2 alone (REC / REG, the aggregator, its MLP and the
region-level adapter) from the stage-1 Q-Former and the T5, scored on REC, with the vision
aggregator, and without it (its MLP then reads the tower's last layer directly):
    python train.py configs/shapes_lion_region.py
    python train.py configs/shapes_lion_region.py --out_dir=out/shapes_lion_region_no_aggregator \\
        --model.aggregator_config="{'num_blocks': 0}"
"""
__file__ = __file__.replace("shapes_lion_region.py", "shapes_lion.py")
exec(open(__file__).read())

out_dir = "out/shapes_lion_region"
stages = [dict(stages[1], **_components)]
eval_tasks = [task for task in eval_tasks if task["task"] == "refcoco"]
