"""Lyrics in miniature on the shapes world ("Lyrics: Boosting Fine-grained Language-Vision
Alignment via Semantic-aware Visual Objects"), beside BLIP-2's (configs/shapes_blip2.py):

    python train.py configs/shapes_llava15.py && python train.py configs/shapes_blip2.py --stage qformer
    python train.py configs/shapes_lyrics.py

The visual refiner is the world's oracle (refiner.write_oracle_refiner): every object's true
tag and box, its local features the main job's frozen CLIP pooled inside the box. Stage
"pretrain" is the MQ-Former's (sec. 3.2): BLIP-2's stage-1 Q-Former of configs/shapes_blip2.py
(16 visual queries) grown by 16 grounding queries reading the refiner's objects through a
Xavier-initialized cross-attention, trained with ITC + ITM + ICG + MSP (eq. 5) on the captions
with their spatial representations. Stage "instruct" is the instruction tuning (sec. 3.3): all
32 query outputs through a fresh linear projection into the main job's LLaMA, LoRA on its W_q
and W_v, the MQ-Former trained too. Eval scores what the main job's does, and the README row
repeats it with a blank refiner (--blank-refiner: Table 5's "w/o VR") and a blank image
(--blind: "w/o ViT").
"""
__file__ = __file__.replace("shapes_lyrics.py", "shapes_blip2.py")  # which shapes_blip2 reads in turn
exec(open(__file__).read())

out_dir = "out/shapes_lyrics"
_refiner = out_dir + "/refiner"
oracle_refiner = dict(world=_world, tower="out/shapes_llava15/clip", out=_refiner)
stages = [
    dict(name="pretrain", objective="lyrics", init="components", vision_path="out/shapes_blip2/qformer",
         refiner=_refiner, data=_world + "/train/pretrain.json",
         # Paper: 32 + 32 queries (the official code 32 + 64); ours match the BLIP-2 miniature's 16.
         # Six objects' spatial representations run to ~200 Q-Former tokens: positions grow to 256.
         architecture=dict(num_grounding_queries=16, qformer_config=dict(max_position_embeddings=256)),
         trainable=[r"^(query_tokens|qformer|vision_projection|text_projection|itm_head|itg_head|temperature)",
                    r"^vision_tower\.post_layernorm\."],
         # Sec. 4: AdamW (0.9, 0.98), weight decay 0.05, cosine decay, 15% warmup; peak 1e-4 there,
         # a tiny model's rate here, as the BLIP-2 miniature's.
         # Each step is 4 passes of ~260 tokens (ITM's over three times the batch): 32 x 150 fits
         # about 11 CPU minutes.
         learning_rate=1e-3, weight_decay=0.05, betas=(0.9, 0.98), warmup_ratio=0.15,
         global_batch_size=32, micro_batch_size=32, max_steps=150),
    # Sec. 3.3: the MQ-Former's query outputs -> a linear projection -> the LLM, LoRA on W_q and
    # W_v; the main job's instruction mixture, as every miniature here is tuned.
    dict(name="instruct", init="components", vision_path="pretrain", language_path="out/shapes_llava15/lm",
         refiner=_refiner, data=_world + "/train/instruct.json", template="vicuna_v1", max_seq_len=512,
         lora=dict(targets=[r"language_model\..*\.(q_proj|v_proj)$"], rank=16, alpha=32, dropout=0.05),
         trainable=[r"^multi_modal_projector\.", r"lora_"],
         learning_rate=1e-3, global_batch_size=32, micro_batch_size=16, max_steps=700),
]
