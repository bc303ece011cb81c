"""LLaVA-NeXT's AnyRes in miniature (the dissertation, section 4.5), against the same recipe at the
base resolution (configs/shapes_llava_next_base.py):
    python train.py configs/shapes_llava15.py --stage clip
    python train.py configs/shapes_llava15.py --stage lm
    python train.py configs/shapes_llava_next.py
    python train.py configs/shapes_llava_next_base.py
The world: 192 px images whose objects have the pixel sizes of the main world's 96 px ones
(object_scale 0.5): the same objects on a canvas twice as wide. The main job's tiny CLIP (64 px,
8 px patches) and tiny LLaMA, with the main world's tokenizer they were trained with, are joined
by a projector at one 64 px tile (stage "pretrain", LLaVA-1.5's stage 1; LLaVA-NeXT reuses it).
Stage "finetune" tiles each image into 2 x 2 tiles of 64 px (the best pinpoint for every image
of this world) after the downsized whole: the tiles show the objects at the scale the CLIP was
trained on, the base tile alone at a third of it, where a small object is a patch or less.
Projector, `image_newline` and LLM train, and the tower at a tenth of the rate (LLaVA-NeXT).
"""
__file__ = __file__.replace("shapes_llava_next.py", "shapes_llava15.py")
exec(open(__file__).read())

_world = "data/shapes_192"
world = dict(out_dir=_world, seed=0, box_style="lion", image_size=192, object_scale=0.5)
tokenizer = "data/shapes/tokenizer.json"
image_folder = _world + "/images"
out_dir = "out/shapes_llava_next"
eval_blind = False
# The grids of configs/llava_next.py in 64 px tiles.
model = dict(model, image_grid_pinpoints=[[64, 128], [64, 192], [64, 256], [128, 64], [192, 64], [256, 64],
                                          [128, 128]], mm_patch_merge_type="spatial_unpad")
stages = [
    dict(stages[2], vision_path="out/shapes_llava15/clip", language_path="out/shapes_llava15/lm",
         data=_world + "/train/pretrain.json"),
    dict(stages[3], data=_world + "/train/instruct.json", image_aspect_ratio="anyres",
         max_seq_len=768,  # a 2 x 2 image is 336 tokens here (64 + 16 rows of 16 + newline)
         trainable=[r"^multi_modal_projector\.", r"^image_newline$", r"^language_model\.", r"^vision_tower\."],
         param_groups=[dict(pattern=r"^vision_tower\.", learning_rate=1e-4)]),
]
eval_tasks = [dict(task, data_dir=_world) for task in eval_tasks]
