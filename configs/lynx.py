"""Lynx ("What Matters in Training a GPT4-Style Language Model with Multimodal Inputs?"): EVA ViT-g
at 420 px, a Perceiver resampler of 32 latents, Vicuna-7B v1.1 frozen with an adapter after every
second layer (sec. 2.1, Fig. 3; the official configs/LYNX.yaml), on 8 GPUs:
    torchrun --nproc_per_node 8 train.py configs/lynx.py
The three stages (sec. 2.2; appendix Table 8: AdamW (0.9, 0.999), eps 1e-8, weight decay 0.01,
5% warmup, linear decay):
  pretrain    100K steps of 1536, lr 1e-4, 224 px: the resampler and the adapters, on image-text
              pairs ("Describe the image briefly.") and captioning / VQA / classification tasks;
  resolution  10K steps of 448, lr 1e-5, 420 px (the position grid interpolated 16x16 -> 30x30):
              the vision encoder too, without the noisy pairs, with OCR / table tasks;
  instruct    20K steps of 480, lr 2e-5: the resampler and the adapters, on the instruction mixture
              (appendix Table 13), text-only instructions included.
Table 8's "warmup lr end" (1e-5, 1e-6, 2e-6: a tenth of each stage's rate) is read as the rate
the linear decay ends at (min_lr_ratio 0.1). Paths point at local copies (nothing is downloaded):
  checkpoints/blip2-itm-vit-g   a BLIP-2 checkpoint whose EVA ViT-g (39 blocks) is Lynx's eva_vit_1b
  checkpoints/vicuna-7b-v1.1    lmsys/vicuna-7b-v1.1 (LlamaForCausalLM safetensors + tokenizer.json
                                with "<pad>" (Lynx's [PAD], id 32000) and "<image>" added)
  data/lynx_{pretrain,resolution,instruct}.json   the stages' mixtures in LLaVA's JSON
The published weights (finetune_lynx.pt, a pickle) load after one conversion; what the file lacks
(the frozen LLM, and the tower if it holds none) comes from the components, and its stored
position grid sets the tower's resolution:
    python checkpoints.py convert finetune_lynx.pt checkpoints/lynx
    MLLM.from_pretrained("checkpoints/lynx", components=("checkpoints/blip2-itm-vit-g",
                         "checkpoints/vicuna-7b-v1.1"), **model, pad_token_id=32000, image_token_index=32001)
then `python eval.py --prompt-style lynx --decoding-preset lynx [--describe-first] ...` asks as Lynx
does (the image, BOS, "user: {question}\\nbot:" lowercased; beam sampling of LYNX.yaml).
"""
out_dir = "out/lynx"
tokenizer = "checkpoints/vicuna-7b-v1.1"
model = dict(projector_type="resampler",
             resampler_config=dict(num_latents=32, depth=3, num_attention_heads=8, head_dim=64, ff_mult=4),
             output_adapter_every=2,  # adapter_freq: 2
             image_aspect_ratio="square")  # Resize(420, bicubic) + CenterCrop(420)
gradient_checkpointing = True
_bridge = [r"^multi_modal_projector\.", r"\.output_adapter\."]
_lynx = dict(template="lynx", max_seq_len=512, schedule="linear", warmup_ratio=0.05, min_lr_ratio=0.1,
             weight_decay=0.01, betas=(0.9, 0.999), image_folder="data/images")
stages = [
    dict(name="pretrain", init="components", vision_path="checkpoints/blip2-itm-vit-g",
         language_path="checkpoints/vicuna-7b-v1.1", data="data/lynx_pretrain.json", **_lynx,
         trainable=_bridge, learning_rate=1e-4, global_batch_size=1536, micro_batch_size=16, max_steps=100_000),
    dict(name="resolution", data="data/lynx_resolution.json", image_size=420, **_lynx,
         trainable=[*_bridge, r"^vision_tower\."], learning_rate=1e-5,
         global_batch_size=448, micro_batch_size=14, max_steps=10_000,
         parallel="fsdp"),  # the 1B tower trains beside the frozen 7B LLM: shard both
    dict(name="instruct", data="data/lynx_instruct.json", **_lynx, trainable=_bridge, learning_rate=2e-5,
         global_batch_size=480, micro_batch_size=15, max_steps=20_000),
]
eval_tasks = []
