"""InstructBLIP-FlanT5 in miniature on the shapes world: configs/shapes_instructblip.py with a
tiny T5 in place of the tiny LLaMA, the LLM family of BLIP-2-FlanT5, InstructBLIP-FlanT5 and LION.
    python train.py configs/shapes_llava15.py && python train.py configs/shapes_instructblip_flant5.py
Stage "t5" pretrains the T5 from scratch on the world's text as a prefix LM (Raffel et al. 2020,
sec. 3.3.2: a random prefix in the encoder, the rest from the decoder), which is how it is asked
afterwards: the queries and the chat prompt into the encoder, the answer out of the decoder
(conversation.split_for_encoder_decoder). The Q-Former's stage 1 and the instruction tuning before the
frozen T5 are shapes_instructblip.py's.
"""
__file__ = __file__.replace("shapes_instructblip_flant5.py", "shapes_instructblip.py")  # which reads shapes_blip2.py
exec(open(__file__).read())

out_dir = "out/shapes_instructblip_flant5"
stages = [
    # T5 v1.1's layout at the main job's LLaMA's width: 2 encoder + 2 decoder layers of 192, 6 heads of 32.
    dict(name="t5", objective="lm", init="scratch", data=_world + "/train/text.jsonl", max_seq_len=256,
         architecture=dict(model_type="t5", d_model=192, d_kv=32, d_ff=512, num_layers=2, num_decoder_layers=2,
                           num_heads=6),
         trainable=[r"."], learning_rate=2e-3, weight_decay=0.1, warmup_ratio=0.05,
         global_batch_size=32, micro_batch_size=32, max_steps=120),
    *stages[:-1],
    dict(stages[-1], language_path="t5"),
]
