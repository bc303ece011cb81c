"""BLIP-2 in miniature on the shapes world, beside the main job (configs/shapes_llava15.py):
the same world, tiny CLIP tower and LLaMA, the Q-Former in place of the MLP connector.
    python train.py configs/shapes_llava15.py && python train.py configs/shapes_blip2.py
It starts from the main job's pretrained tiny CLIP and LLaMA (run that first), so only the
connector and its recipe differ. Stages: "qformer", BLIP-2's stage 1 (ITC + ITM + ITG on the
captions, the tower frozen but for its post_layernorm, BLIP-2 sec. 3.2); "finetune", the
Q-Former before the frozen LLM (sec. 3.3), on the main job's instruction mixture, so that eval
asks it what it asks LLaVA-1.5. Side by side they test in miniature the dissertation's claim that
a simple MLP connector is at least as data-efficient as a resampler (Steerable Visual
Intelligence, sec. 4.3 and its Limitations); note that LLaVA-1.5 trains its LLM in stage 2 and
BLIP-2 keeps it frozen.
"""
exec(open(__file__.replace("shapes_blip2.py", "shapes_llava15.py")).read())

out_dir = "out/shapes_blip2"
qformer_tokenizer = _world + "/qformer_tokenizer.json"
# The queries read the normalized last layer with its class token (BLIP-2's ln_vision).
model = dict(projector_type="qformer", image_aspect_ratio="pad")
stages = [
    dict(name="qformer", objective="qformer", init="components", vision_path="out/shapes_llava15/clip",
         data=_world + "/train/pretrain.json",
         # BERT-base in miniature: 4 layers crossing the image every other one; 16 queries for the
         # tower's 65 tokens (BLIP-2: 32 for 257).
         architecture=dict(qformer_config=dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                               intermediate_size=256, cross_attention_frequency=2,
                                               max_position_embeddings=64),
                           num_query_tokens=16, image_text_hidden_size=64),
         trainable=[r"^(query_tokens|qformer|vision_projection|text_projection|itm_head|itg_head|temperature)",
                    r"^vision_tower\.post_layernorm\."],
         learning_rate=1e-3, weight_decay=0.05, betas=(0.9, 0.98),  # BLIP-2 sec. 3.4, at a tiny model's rate
         global_batch_size=64, micro_batch_size=64, max_steps=200),
    dict(name="finetune", init="components", vision_path="qformer", language_path="out/shapes_llava15/lm",
         data=_world + "/train/instruct.json", template="vicuna_v1", max_seq_len=512,
         trainable=[r"^multi_modal_projector\.", r"^vision_tower\.post_layernorm\."],  # the LLM stays frozen
         learning_rate=1e-3, global_batch_size=32, micro_batch_size=16, max_steps=700),
]
