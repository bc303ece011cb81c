"""LLaVA-1.5-HD in miniature (the dissertation, section 4.3, Figure 4.2): configs/shapes_llava_next.py's
finetune stage with LLaVA-1.5-HD's merge, from the same pretrained stage. The image is resized into
2 x 2 tiles (LLaVA-1.5-HD: 448 px as 2 x 2 tiles of a 224 px encoder; here 128 px as 2 x 2 of 64),
the tiles' features form one map of the whole padded canvas, without unpadding or row ends, after
the downsized whole image's (the global context):
    python train.py configs/shapes_llava15_hd.py   (after configs/shapes_llava_next.py)
"""
__file__ = __file__.replace("shapes_llava15_hd.py", "shapes_llava_next.py")
exec(open(__file__).read())

out_dir = "out/shapes_llava15_hd"
model = dict(model, image_grid_pinpoints=[[128, 128]], mm_patch_merge_type="spatial")
stages = [dict(stages[1], init="out/shapes_llava_next/pretrain",
               trainable=[r"^multi_modal_projector\.", r"^language_model\.", r"^vision_tower\."])]
