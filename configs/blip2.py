"""BLIP-2 (Li et al. 2023, "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image
Encoders and Large Language Models") with EVA ViT-g and a LLaMA-family LLM, both stages:
    torchrun --nproc_per_node 8 train.py configs/blip2.py
Stage 1 (sec. 3.2) trains the Q-Former alone on the frozen ViT with ITC + ITM + ITG; stage 2
(sec. 3.3) puts it before the frozen LLM and trains the Q-Former and its projection on captions.
Hyperparameters: sec. 3.4 ("Pre-training settings"). Paths point at local copies (nothing is
downloaded here):
  checkpoints/blip2-itm-vit-g       Salesforce/blip2-itm-vit-g (its vision_model.* is EVA ViT-g, 39 blocks)
  checkpoints/bert-base-uncased-dec bert-base-uncased's tokenizer.json with "[DEC]" added (LAVIS's bos token)
  checkpoints/vicuna-7b-v1.1        lmsys/vicuna-7b-v1.1 (LlamaForCausalLM safetensors + tokenizer.json with
                                    "<image>" and "<pad>" added)
  data/captions.json                image-caption pairs in LLaVA's JSON (one human turn with <image>, one gpt
                                    caption), e.g. LLaVA's LCS-558K, whose captions BLIP wrote
The Q-Former starts from BERT's initialization here; BLIP-2 starts it from bert-base-uncased.
"""
out_dir = "out/blip2"
tokenizer = "checkpoints/vicuna-7b-v1.1"
qformer_tokenizer = "checkpoints/bert-base-uncased-dec/tokenizer.json"
model = dict(projector_type="qformer", image_aspect_ratio="square")
weight_decay = 0.05          # sec. 3.4: AdamW, beta2 0.98, weight decay 0.05
betas = (0.9, 0.98)
warmup_steps = 2000          # linear warmup of 2k steps, then cosine decay from 1e-4
learning_rate = 1e-4

stages = [
    dict(name="stage1", objective="qformer", init="components", vision_path="checkpoints/blip2-itm-vit-g",
         architecture=dict(qformer_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                               intermediate_size=3072, cross_attention_frequency=2),
                           num_query_tokens=32, image_text_hidden_size=256),  # sec. 3.1: 32 queries of 768
         data="data/captions.json", image_folder="data/images",
         # The ViT is frozen; its ln_vision (post_layernorm) is trained with the Q-Former, as in LAVIS.
         trainable=[r"^(query_tokens|qformer|vision_projection|text_projection|itm_head|itg_head|temperature)",
                    r"^vision_tower\.post_layernorm\."],
         global_batch_size=1680, micro_batch_size=210, max_steps=250_000),  # ViT-g: batch 1680, 250k steps
    dict(name="stage2", init="components", vision_path="stage1", language_path="checkpoints/vicuna-7b-v1.1",
         data="data/captions.json", image_folder="data/images", template="plain", max_seq_len=128,
         trainable=[r"^multi_modal_projector\.", r"^vision_tower\.post_layernorm\."],  # the LLM stays frozen
         min_lr_ratio=0.5,  # "the minimum learning rate at the second stage is 5e-5"
         global_batch_size=1520, micro_batch_size=190, max_steps=80_000),  # 80k steps; 1520 for the larger LLM
]
