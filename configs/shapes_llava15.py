"""The main job: the LLaVA-1.5 recipe in miniature on the shapes world, on a CPU in minutes.

    python train.py configs/shapes_llava15.py

The same code path as configs/llava15.py (plain-template stage 1 on captions, projector only;
vicuna_v1 stage 2 on the instruction mixture, projector + LLM; mlp2x_gelu connector, layer -2
features, pad-to-square), with tiny dims. The public checkpoints it starts from are made here
first, in the same formats: stage "clip" pretrains a tiny CLIP (CLIPModel layout) on the world's
captions, stage "lm" pretrains a tiny LLaMA (LlamaForCausalLM layout) on the world's text, and
stage "pretrain" joins them through a fresh projector exactly as LLaVA-1.5 joins CLIP ViT-L/14-336
and Vicuna. Then eval.py scores the held-out split, with and without the image.
"""
_world = "data/shapes"  # names starting with "_" are the config's own helpers, not settings
out_dir = "out/shapes_llava15"
# box_style: the box text of the REC / REG samples (shapes.build_world): "lion", LION's 3-decimal
# "[0.525,0.000,0.675,0.394]"; LLaVA-1.5's public data writes "llava15", "[0.53, 0.0, 0.68, 0.39]".
world = dict(out_dir=_world, seed=0, box_style="lion")
tokenizer = _world + "/tokenizer.json"
image_folder = _world + "/images"
# Both LLaVA stages pad to square here, where LLaVA-1.5's stage 1 center-crops (configs/llava15.py):
# a crop of the world's non-square images would cut off objects that the captions name.
model = dict(projector_type="mlp2x_gelu", vision_feature_layer=-2,
             vision_feature_select_strategy="default", image_aspect_ratio="pad")
warmup_ratio = 0.03  # LLaVA-1.5
weight_decay = 0.0  # LLaVA-1.5
num_workers = 2
log_every = 50
eval_blind = True
# The ladder in results.json: blind, image, and the oracle-text rung of configs/shapes_oracle_text.py.
oracle_results = "out/shapes_oracle_text/results.json"
# Stage 2's held-out curve: every eval task on its first 16 samples, every 100 steps (logs/finetune_held_out.png).
curve_every = 100
curve_samples = 16

_vision = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
           image_size=64, patch_size=8)  # 64 patches: the 576 of ViT-L/14-336 in miniature

# Stage lengths are set by the 20-minute CPU budget of the main job (README), not by epochs.
stages = [
    dict(name="clip", objective="clip", init="scratch", data=_world + "/train/pretrain.json",
         architecture=dict(vision_config=_vision, projection_dim=128,
                           text_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                                            num_attention_heads=4, max_position_embeddings=64)),
         # Captions never need an object's shape; "small red circle" vs "small red star" does. Shape
         # read by a linear probe (probe.py vision): 0.49 without this loss, 0.73 with it at 300 steps
         # and lr 3e-3, 0.99 at 1000 steps (README, the main job).
         region_loss=True,
         trainable=[r"."], learning_rate=3e-3, weight_decay=0.1, warmup_ratio=0.05,
         global_batch_size=128, micro_batch_size=128, max_steps=300),
    dict(name="lm", objective="lm", init="scratch", data=_world + "/train/text.jsonl", max_seq_len=256,
         architecture=dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                           num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5),
         trainable=[r"."], learning_rate=2e-3, weight_decay=0.1, warmup_ratio=0.05,
         global_batch_size=32, micro_batch_size=32, max_steps=120),
    dict(name="pretrain", init="components", vision_path="clip", language_path="lm",
         data=_world + "/train/pretrain.json", template="plain", max_seq_len=256,
         trainable=[r"^multi_modal_projector\."], learning_rate=1e-3,  # LLaVA-1.5 stage 1
         global_batch_size=32, micro_batch_size=32, max_steps=100),
    dict(name="finetune", init="previous", data=_world + "/train/instruct.json", template="vicuna_v1",
         max_seq_len=512, trainable=[r"^multi_modal_projector\.", r"^language_model\."],
         learning_rate=1e-3,  # 2e-5 in LLaVA-1.5 for a 7B model; a tiny model from scratch wants more
         global_batch_size=32, micro_batch_size=16, max_steps=700),
]

# eval.py's defaults follow the shapes-world layout: annotations in <world>/eval/<task>/, images in <world>/images/.
# max_new_tokens: the world's answers are short (a box ~30 tokens), so caps far below the official
# ones (eval.DEFAULT_MAX_NEW_TOKENS) keep a tiny model's babble from costing minutes.
eval_tasks = [
    dict(task="vqa", data_dir=_world, image_template="{image_id:012d}.png", max_new_tokens=16,
         report=dict(vqa_accuracy="accuracy")),
    dict(task="refcoco", data_dir=_world, split="val", max_new_tokens=48, report=dict(rec_accuracy="accuracy")),
    dict(task="pope", data_dir=_world, max_new_tokens=8, report=dict(pope_f1="f1")),
    dict(task="captions", data_dir=_world, max_new_tokens=40, report=dict(cider="cider")),
]
