"""LLaVA-NeXT 7B (the dissertation, section 4.5, "Dynamic High Resolution"): LLaVA-1.5 with
AnyRes, on 8 GPUs:
    torchrun --nproc_per_node 8 train.py configs/llava_next.py
Stage 1 is LLaVA-1.5's (LLaVA-NeXT "re-uses the pre-trained connector of LLaVA-1.5"): the
projector alone on the 558K captions at one 336 px tile. Stage 2 tiles every image into the best of
the grid pinpoints {2x2, 1x{2,3,4}, {2,3,4}x1} of 336 px tiles, after its downsized whole (the base
tile), unpads the merged feature map to the image's aspect ratio and ends each of its rows with the
learned `image_newline`; projector, newline and LLM train, and so does the vision tower, at a tenth
of the rate (LLaVA-NeXT's released recipe: 2e-5 and 2e-6, global batch 128, one epoch, 4096
tokens; a 2x2 image alone is 2,928 tokens).
Paths as configs/llava15.py, plus the LLaVA-NeXT instruction mixture (760K samples in the
dissertation's Table of LLaVA-NeXT results) at data/llava_next_mix760k.json.
Memory: the 7B stage 2 with a trainable tower is sharded (parallel="fsdp"); see configs/llava15.py.
"""
out_dir = "out/llava_next"
tokenizer = "checkpoints/vicuna-7b-v1.5"
model = dict(
    projector_type="mlp2x_gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
    image_aspect_ratio="pad",  # stage 1 as LLaVA-1.5; stage 2 switches to "anyres"
    # (height, width) in pixels, the paper's grids; the released llava-v1.6 configs list five of
    # them, without 1x4 and 4x1 (336 x 1344, 1344 x 336).
    image_grid_pinpoints=[[336, 672], [336, 1008], [336, 1344], [672, 336], [1008, 336], [1344, 336], [672, 672]],
    mm_patch_merge_type="spatial_unpad",  # LLaVA-NeXT; "spatial" is LLaVA-1.5-HD (section 4.3): no unpadding, no newline
)
warmup_ratio = 0.03
weight_decay = 0.0
gradient_checkpointing = True
micro_batch_size = 4

stages = [
    dict(name="pretrain", init="components",
         vision_path="checkpoints/clip-vit-large-patch14-336", language_path="checkpoints/vicuna-7b-v1.5",
         data="data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json", image_folder="data/LLaVA-Pretrain/images",
         template="plain", image_aspect_ratio="square", max_seq_len=2048,
         trainable=[r"^multi_modal_projector\."],
         learning_rate=1e-3, global_batch_size=256, micro_batch_size=32, epochs=1),
    dict(name="finetune", init="previous",
         data="data/llava_next_mix760k.json", image_folder="data",
         template="vicuna_v1", image_aspect_ratio="anyres", max_seq_len=4096,
         trainable=[r"^multi_modal_projector\.", r"^image_newline$", r"^language_model\.", r"^vision_tower\."],
         learning_rate=2e-5, param_groups=[dict(pattern=r"^vision_tower\.", learning_rate=2e-6)],
         global_batch_size=128, epochs=1, parallel="fsdp"),
]
