"""configs/shapes_llava_next.py at the base resolution: its finetune stage (same data, steps,
learning rates and trainable parts, the tower included) with every image one padded 64 px square,
LLaVA-1.5's input, from the same pretrained stage:
    python train.py configs/shapes_llava_next_base.py   (after configs/shapes_llava_next.py)
"""
__file__ = __file__.replace("shapes_llava_next_base.py", "shapes_llava_next.py")
exec(open(__file__).read())

out_dir = "out/shapes_llava_next_base"
stages = [dict(stages[1], init="out/shapes_llava_next/pretrain", image_aspect_ratio="pad", max_seq_len=512,
               trainable=[r"^multi_modal_projector\.", r"^language_model\.", r"^vision_tower\."])]
