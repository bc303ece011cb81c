"""LLaVA-1.5 7B (Steerable Visual Intelligence, section 4.3; hyperparameters of the official
scripts/v1_5/pretrain.sh and finetune.sh), on 8 GPUs:
    torchrun --nproc_per_node 8 train.py configs/llava15.py
Paths point at local copies of the public checkpoints and data (nothing is downloaded here):
  checkpoints/clip-vit-large-patch14-336   openai/clip-vit-large-patch14-336 (CLIPModel safetensors)
  checkpoints/vicuna-7b-v1.5               lmsys/vicuna-7b-v1.5 (LlamaForCausalLM safetensors + tokenizer.json
                                           with "<image>" and "<pad>" added as special tokens)
  data/LLaVA-Pretrain                      blip_laion_cc_sbu_558k.json + images/
  data/llava_v1_5_mix665k.json + data/     the 665K mixture and its image folders (coco, gqa, ocr_vqa, textvqa, vg)
Memory (python bench.py memory; train.py CONFIG --estimate_memory): under plain DDP a 7B stage 2
keeps fp32 weights, gradients and AdamW moments on every GPU, ~123 GiB with the activations, so
stage 2 shards them with FSDP2 (parallel="fsdp", ~35 GiB over 8 GPUs), PyTorch's counterpart of the
DeepSpeed ZeRO-3 LLaVA-1.5 used; stage 1 trains the projector alone and fits under DDP.
"""
out_dir = "out/llava15"
tokenizer = "checkpoints/vicuna-7b-v1.5"
model = dict(
    projector_type="mlp2x_gelu",  # section 4.3: a two-layer MLP instead of the linear projection
    vision_feature_layer=-2,  # mm_vision_select_layer -2
    vision_feature_select_strategy="default",  # mm_vision_select_feature "patch": CLS dropped
    image_aspect_ratio="pad",  # finetune.sh: image_aspect_ratio pad (the model's, so eval pads too)
)
max_seq_len = 2048  # model_max_length
warmup_ratio = 0.03
weight_decay = 0.0
gradient_checkpointing = True
micro_batch_size = 16

stages = [
    dict(name="pretrain", init="components",
         vision_path="checkpoints/clip-vit-large-patch14-336", language_path="checkpoints/vicuna-7b-v1.5",
         data="data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json", image_folder="data/LLaVA-Pretrain/images",
         template="plain",  # --version plain
         image_aspect_ratio="square",  # pretrain.sh sets no image_aspect_ratio: CLIP's resize + center crop
         trainable=[r"^multi_modal_projector\."],  # --tune_mm_mlp_adapter True
         learning_rate=1e-3, global_batch_size=256, micro_batch_size=32, epochs=1),
    dict(name="finetune", init="previous",
         data="data/llava_v1_5_mix665k.json", image_folder="data",
         template="vicuna_v1",  # --version v1
         trainable=[r"^multi_modal_projector\.", r"^language_model\."],  # vision tower frozen
         learning_rate=2e-5, global_batch_size=128, epochs=1,
         parallel="fsdp"),  # zero3.json
]
