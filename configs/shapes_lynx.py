"""Lynx in miniature on the shapes world ("What Matters in Training a GPT4-Style Language Model
with Multimodal Inputs?"): the main job's tiny CLIP and tiny LLaMA, joined by a Perceiver
resampler, with an adapter after every second LLaMA layer, through Lynx's three stages (sec. 2.2):
    python train.py configs/shapes_llava15.py --stage clip
    python train.py configs/shapes_llava15.py --stage lm
    python train.py configs/shapes_lynx.py
Stage "pretrain": the resampler and the adapters on image-caption pairs, at the tower's 64 px;
"resolution": the world's 96 px images, the tower's position grid interpolated 8x8 -> 12x12 and
the tower trained too, at a tenth of the rate, on the instruction mixture (Lynx moves 224 -> 420
px and adds its downstream tasks there); "instruct": the resampler and adapters again, on the
mixture. The LLaMA itself stays frozen throughout, as in Lynx. Every prompt uses the "lynx"
template (the image, BOS, "user: ...\\nbot: ...", lowercased). Stage lengths and learning rates
are the miniature's (a CPU budget and tiny models); configs/lynx.py has the paper's.
"""
__file__ = __file__.replace("shapes_lynx.py", "shapes_llava15.py")
exec(open(__file__).read())

out_dir = "out/shapes_lynx"
eval_blind = True
# The resampler at the tiny LLaMA's width (192 = 4 heads of 48; Lynx: 8 of 64 at 4096) and its 32
# latents; adapters after layers 0 and 2 of 4 (Lynx: 0, 2, ..., 30 of 32).
model = dict(projector_type="resampler", resampler_config=dict(num_latents=32, depth=3, num_attention_heads=4,
                                                                head_dim=48, ff_mult=4),
             output_adapter_every=2, image_aspect_ratio="pad")
_bridge = [r"^multi_modal_projector\.", r"\.output_adapter\."]
_lynx = dict(template="lynx", max_seq_len=512, schedule="linear", warmup_ratio=0.05, weight_decay=0.01)  # Table 8
stages = [
    dict(name="pretrain", init="components", vision_path="out/shapes_llava15/clip",
         language_path="out/shapes_llava15/lm", data=_world + "/train/pretrain.json", **_lynx,
         trainable=_bridge, learning_rate=1e-3, global_batch_size=32, micro_batch_size=32, max_steps=150),
    dict(name="resolution", data=_world + "/train/instruct.json", image_size=96, **_lynx,
         trainable=[*_bridge, r"^vision_tower\."], learning_rate=5e-4,
         param_groups=[dict(pattern=r"^vision_tower\.", learning_rate=5e-5)],
         global_batch_size=32, micro_batch_size=16, max_steps=150),
    dict(name="instruct", data=_world + "/train/instruct.json", **_lynx, trainable=_bridge,
         learning_rate=5e-4, global_batch_size=32, micro_batch_size=16, max_steps=300),
]
# The world's questions carry LLaVA-1.5's answer-format prompts, so eval asks them in those words,
# in Lynx's template.
eval_tasks = [dict(task, prompt_style="llava15", template="lynx") for task in eval_tasks]
