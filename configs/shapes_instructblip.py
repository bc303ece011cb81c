"""InstructBLIP in miniature on the shapes world: configs/shapes_blip2.py with the
instruction-aware Q-Former (Dai et al. 2023, sec. 2.2): each question enters the Q-Former beside
the queries, through the world's Q-Former tokenizer, so the queries can extract what it asks for.
    python train.py configs/shapes_llava15.py && python train.py configs/shapes_instructblip.py
"""
__file__ = __file__.replace("shapes_instructblip.py", "shapes_blip2.py")  # which shapes_blip2 reads in turn
exec(open(__file__).read())

out_dir = "out/shapes_instructblip"
model = dict(projector_type="qformer", qformer_config=dict(use_qformer_text_input=True), image_aspect_ratio="pad")
