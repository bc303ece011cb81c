"""The original LLaVA 7B (Steerable Visual Intelligence, chapter 3; the official scripts): a linear
projection, 224 px CLIP ViT-L/14, the Vicuna-v0 "###" template (Table 3.2) in both stages.
  stage 1: CC3M-595K, projector only, lr 2e-3, batch 128, 1 epoch (section 3.4)
  stage 2: LLaVA-Instruct-158K, projector + LLM, lr 2e-5, batch 32, 3 epochs
"""
out_dir = "out/llava"
tokenizer = "checkpoints/vicuna-7b-v0"
model = dict(
    projector_type="linear",  # Eq. 3.1: H_v = W . Z_v
    vision_feature_layer=-2,  # section 3.5: features before the last layer are 0.96 points better
    vision_feature_select_strategy="default",
    image_aspect_ratio="square",  # CLIP's resize + center crop; padding came with LLaVA-1.5
)
max_seq_len = 2048
warmup_ratio = 0.03
weight_decay = 0.0
gradient_checkpointing = True
template = "vicuna_v0"

stages = [
    dict(name="pretrain", init="components",
         vision_path="checkpoints/clip-vit-large-patch14", language_path="checkpoints/vicuna-7b-v0",
         data="data/LLaVA-CC3M-Pretrain-595K/chat.json", image_folder="data/LLaVA-CC3M-Pretrain-595K/images",
         trainable=[r"^multi_modal_projector\."],
         learning_rate=2e-3, global_batch_size=128, micro_batch_size=16, epochs=1),
    dict(name="finetune", init="previous",
         data="data/LLaVA-Instruct-150K/llava_instruct_158k.json", image_folder="data/coco/train2017",
         trainable=[r"^multi_modal_projector\.", r"^language_model\."],
         learning_rate=2e-5, global_batch_size=32, micro_batch_size=4, epochs=3,
         parallel="fsdp"),  # LLaVA's finetune script: --fsdp "full_shard auto_wrap"
]
