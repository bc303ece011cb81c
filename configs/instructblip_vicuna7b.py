"""InstructBLIP (Dai et al. 2023, "InstructBLIP: Towards General-purpose Vision-Language Models
with Instruction Tuning") with Vicuna-7B: the instruction-aware Q-Former (sec. 2.2) starts from
BLIP-2's stage-1 Q-Former, before a frozen Vicuna; the Q-Former and its projection are tuned on
the instruction data, the ViT and the LLM stay frozen.
    torchrun --nproc_per_node 8 train.py configs/instructblip_vicuna7b.py
Hyperparameters: "Implementation Details" (batch 128 for the 7B model, at most 60K steps,
AdamW beta2 0.999, weight decay 0.05, 1,000 warmup steps to 1e-5, cosine decay to 0). Paths:
  checkpoints/blip2-itm-vit-g       Salesforce/blip2-itm-vit-g: EVA ViT-g + the stage-1 Q-Former (its ITG
                                    head is not published; this stage does not need it)
  checkpoints/bert-base-uncased-dec bert-base-uncased's tokenizer.json with "[DEC]" added
  checkpoints/vicuna-7b-v1.1        lmsys/vicuna-7b-v1.1 with "<image>" and "<pad>" added
  data/instructions.json            the instruction mixture in LLaVA's JSON
InstructBLIP feeds the LLM the bare instruction after the queries; train.py's conversations are
chat templates, so the instruction sits in vicuna_v1's chat here: the recipe's prompts differ in
wording from the published checkpoint's.
"""
out_dir = "out/instructblip_vicuna7b"
tokenizer = "checkpoints/vicuna-7b-v1.1"
qformer_tokenizer = "checkpoints/bert-base-uncased-dec/tokenizer.json"
model = dict(projector_type="qformer", qformer_config=dict(use_qformer_text_input=True), image_aspect_ratio="square")

stages = [
    dict(name="instruct", init="components", vision_path="checkpoints/blip2-itm-vit-g",
         language_path="checkpoints/vicuna-7b-v1.1", data="data/instructions.json", image_folder="data/images",
         template="vicuna_v1", max_seq_len=512,  # LAVIS: max_txt_len 128 + max_output_txt_len 256
         trainable=[r"^multi_modal_projector\.", r"^vision_tower\.post_layernorm\."],
         learning_rate=1e-5, warmup_steps=1000, weight_decay=0.05, betas=(0.9, 0.999),
         global_batch_size=128, micro_batch_size=16, max_steps=60_000),
]
