"""LION-FlanT5-XL ("LION: Empowering MLLM with Dual-Level Visual Knowledge", CVPR 2024): InstructBLIP-
FlanT5-XL (configs/instructblip_flant5xl.py) plus the vision aggregator on EVA ViT-g's blocks 38,
28 and 18 (sec. 3.1.3; the official code's taps), two adapters and their router beside every T5
feed-forward (sec. 3.1.2, eqs. 1-3), and RAM's tags with a soft prompt (sec. 3.2).
    torchrun --nproc_per_node 8 train.py configs/lion_flant5xl.py
The stage-wise instruction tuning (Fig. 4; appendix A, "Training Details"): AdamW (0.9, 0.999),
weight decay 0.05, 1,000 warmup steps at the start of each stage (ours rises linearly from
lr / 1000, which is the paper's 1e-8 for the 1e-5 stages), cosine decay:
  image   batch 64, 30K steps, 1e-5 -> 0: the Q-Former and the image-level adapter, image-level tasks;
  region  batch 256, 60K steps, 5e-4 -> 1e-6, the aggregator at a constant 1e-5: the aggregator,
          its MLP and the region-level adapter, on REC / REG;
  all     batch 64, 60K steps, 1e-5 -> 0: both branches, both adapters and the router, every task,
          with the RAM tags.
Paths (besides instructblip_flant5xl.py's checkpoints):
  data/lion_instructions.json   the instruction mixture (Table 7) in LLaVA's JSON; REC / REG records
                                carry "task_level": "region"
  data/ram_tags.json            RAM-14M's tags per image file name ({"name.jpg": {"tags": [...]}})
The published weights (LION-FlanT5-XL.pth, a pickle) load after one conversion; the file holds what
LION trained, so the tower and the T5 come from their own checkpoints:
    python checkpoints.py convert LION-FlanT5-XL.pth checkpoints/lion-flant5-xl
    MLLM.from_pretrained("checkpoints/lion-flant5-xl", components=("checkpoints/blip2-itm-vit-g",
                         "checkpoints/flan-t5-xl"), **model, hint_token_index=32099)
(32099 is Flan-T5's "<extra_id_0>"); save_pretrained then writes a directory eval.py reads.
"""
__file__ = __file__.replace("lion_flant5xl.py", "instructblip_flant5xl.py")  # which reads instructblip_vicuna7b.py
exec(open(__file__).read())

out_dir = "out/lion_flant5xl"
model = dict(projector_type="lion", qformer_config=dict(use_qformer_text_input=True), image_aspect_ratio="square",
             aggregator_config=dict(tapped_layers=[38, 28, 18]), num_adapters=2, adapter_bottleneck=64)
_components = dict(init="components", vision_path="checkpoints/blip2-itm-vit-g",
                   language_path="checkpoints/flan-t5-xl")
_qformer = r"^multi_modal_projector\.(query_tokens|qformer\.|language_projection\.)"
_aggregator = r"^multi_modal_projector\.(vision_aggregator|aggregator_projector)\."
_ln_vision = r"^vision_tower\.post_layernorm\."
_instruct = dict(data="data/lion_instructions.json", image_folder="data/images", template="vicuna_v1",
                 max_seq_len=512, weight_decay=0.05, betas=(0.9, 0.999), warmup_steps=1000)
stages = [
    dict(name="image", **_components, **_instruct, visual_input="QFORMER", task_levels=["image"],
         trainable=[_qformer, _ln_vision, r"\.parallel_adapter\.adapters\.1\."],
         learning_rate=1e-5, global_batch_size=64, micro_batch_size=8, max_steps=30_000),
    dict(name="region", **_instruct, visual_input="AGGREGATOR", task_levels=["region"],
         trainable=[_aggregator, r"\.parallel_adapter\.adapters\.0\."],
         param_groups=[dict(pattern=r"^multi_modal_projector\.vision_aggregator\.blocks\.", learning_rate=1e-5,
                            schedule="constant")],
         learning_rate=5e-4, min_lr_ratio=1e-6 / 5e-4, global_batch_size=256, micro_batch_size=16, max_steps=60_000),
    dict(name="all", **_instruct, visual_input="ALL", tags="data/ram_tags.json", soft_prompt="<extra_id_0>",
         trainable=[_qformer, _ln_vision, _aggregator, r"\.parallel_adapter\.", r"^soft_prompt_hint$"],
         learning_rate=1e-5, global_batch_size=64, micro_batch_size=8, max_steps=60_000),
]
eval_tasks = []
