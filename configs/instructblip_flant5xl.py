"""InstructBLIP (Dai et al. 2023) with Flan-T5-XL: the instruction-aware Q-Former (sec. 2.2)
starts from BLIP-2's stage-1 Q-Former, before a frozen Flan-T5-XL; the Q-Former and its
projection are tuned, the ViT and the LLM stay frozen. The queries and the prompt go into the T5
encoder, the answer comes out of its decoder (conversation.split_for_encoder_decoder).
    torchrun --nproc_per_node 8 train.py configs/instructblip_flant5xl.py
Hyperparameters: "Implementation Details" (batch 192 for the 3B model, at most 60K steps, AdamW
beta2 0.999, weight decay 0.05, 1,000 warmup steps to 1e-5, cosine decay to 0). Paths:
  checkpoints/blip2-itm-vit-g       Salesforce/blip2-itm-vit-g: EVA ViT-g + the stage-1 Q-Former
  checkpoints/bert-base-uncased-dec bert-base-uncased's tokenizer.json with "[DEC]" added
  checkpoints/flan-t5-xl            google/flan-t5-xl, its tokenizer.json with "<image>" added
                                    (an id past the 32100 the tokenizer uses; the 32128-row embedding
                                    holds it) and with BLIP-2's dense_act_fn "gelu" in config.json
  data/instructions.json            the instruction mixture in LLaVA's JSON
InstructBLIP feeds the T5 the bare instruction after the queries; train.py's conversations are
chat templates, so the instruction sits in vicuna_v1's chat here (as in instructblip_vicuna7b.py,
whose stage this is with the T5 and its batch).
"""
exec(open(__file__.replace("instructblip_flant5xl.py", "instructblip_vicuna7b.py")).read())

out_dir = "out/instructblip_flant5xl"
tokenizer = "checkpoints/flan-t5-xl"
stages = [dict(stages[0], language_path="checkpoints/flan-t5-xl", global_batch_size=192, micro_batch_size=24)]
