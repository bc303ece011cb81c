"""LION in miniature on the shapes world ("LION: Empowering MLLM with Dual-Level Visual Knowledge"):
configs/shapes_instructblip_flant5.py's tiny CLIP, stage-1 Q-Former and tiny T5 (LION's LLM family),
with LION's vision aggregator beside the Q-Former, two adapters and their router beside every
feed-forward of the frozen T5, and the stage-wise recipe (sec. 3.1.2, Fig. 4):
    python train.py configs/shapes_llava15.py --stage clip
    python train.py configs/shapes_instructblip_flant5.py --stage t5
    python train.py configs/shapes_instructblip_flant5.py --stage qformer
    python train.py configs/shapes_lion.py
Stage "image": the Q-Former and the image-level adapter on the image-level tasks (VQA, captions,
conversations, multiple choice); "region": the aggregator, its MLP and the region-level adapter
on REC / REG ("task_level": "region" in the world's data); "all": every task, both branches, both
adapters and the router, with the world's true tags (tags.json, RAM's role) in a tag sentence
whose hint is a learned soft prompt. The T5 stays frozen but for its adapters, as in LION.
Stage lengths and learning rates are the miniature's (a CPU budget and tiny models from
scratch), not the paper's; configs/lion_flant5xl.py has the paper's.
"""
__file__ = __file__.replace("shapes_lion.py", "shapes_instructblip_flant5.py")
exec(open(__file__).read())

out_dir = "out/shapes_lion"
_components = dict(init="components", vision_path="out/shapes_instructblip_flant5/qformer",
                   language_path="out/shapes_instructblip_flant5/t5")
# The aggregator taps the tiny tower's blocks (3, 2, 1): the paper's (L-1, 2L/3, L/3) for L = 4.
model = dict(projector_type="lion", qformer_config=dict(use_qformer_text_input=True), image_aspect_ratio="pad",
             aggregator_config=dict(num_attention_heads=4, intermediate_size=512), num_adapters=2,
             adapter_bottleneck=64)
_qformer = r"^multi_modal_projector\.(query_tokens|qformer\.|language_projection\.)"
_aggregator = r"^multi_modal_projector\.(vision_aggregator|aggregator_projector)\."
_ln_vision = r"^vision_tower\.post_layernorm\."  # InstructBLIP's ln_vision trains with the Q-Former
_instruct = dict(data=_world + "/train/instruct.json", template="vicuna_v1", max_seq_len=512,
                 weight_decay=0.05, global_batch_size=32, micro_batch_size=16)  # LION: AdamW, weight decay 0.05
stages = [
    dict(name="image", **_components, **_instruct, visual_input="QFORMER", task_levels=["image"],
         trainable=[_qformer, _ln_vision, r"\.parallel_adapter\.adapters\.1\."],
         learning_rate=1e-3, max_steps=200),
    dict(name="region", **_instruct, visual_input="AGGREGATOR", task_levels=["region"],
         trainable=[_aggregator, r"\.parallel_adapter\.adapters\.0\."],
         # LION keeps the aggregator's blocks at a constant, lower rate (1e-5 beside 5e-4).
         param_groups=[dict(pattern=r"^multi_modal_projector\.vision_aggregator\.blocks\.", learning_rate=2e-4,
                            schedule="constant")],
         learning_rate=1e-3, max_steps=200),
    dict(name="all", **_instruct, visual_input="ALL", tags=_world + "/tags.json", soft_prompt="<extra_id_0>",
         trainable=[_qformer, _ln_vision, _aggregator, r"\.parallel_adapter\.", r"^soft_prompt_hint$"],
         learning_rate=5e-4, max_steps=200),
]
