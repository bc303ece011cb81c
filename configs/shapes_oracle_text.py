"""The top rung of the main job's ladder: the same LLM recipe with perfect vision, as text.

    python train.py configs/shapes_llava15.py            # first: its CLIP and LLaMA, the image and blind rungs
    python train.py configs/shapes_oracle_text.py        # this rung: stage 2 and the evals
    python train.py configs/shapes_llava15.py --resume   # every stage is done: evaluates again, and
                                                         # results.json's "ladder" has all three rungs

Stage 2 of configs/shapes_llava15.py, with every image replaced by its scene written out
("Objects: large cyan star [0.490,0.208,0.802,0.521]; small purple circle [...]." from the
world's tags.json, boxes as the REC answers write them), in training and in eval. What the
4 x 192 LLaMA reaches here is what it can do with what an image holds; the gap between this rung
and the image rung is the part the image tokens do not deliver. Stage 1 is left out: it trains
only the projector, which reads no image here. The model keeps the main job's tower, unread.
"""
exec(open(__file__.replace("shapes_oracle_text.py", "shapes_llava15.py")).read())
out_dir = "out/shapes_oracle_text"
eval_blind = False  # no image to blank
oracle_results = ""
curve_every = 0  # the main job draws the curve; this rung's final numbers are what the ladder needs
stages = [dict(stages[-1], init="components", vision_path="out/shapes_llava15/clip",
               language_path="out/shapes_llava15/lm", oracle_text=_world + "/tags.json")]
