"""LLaVA-1.5 7B with LoRA in stage 2 (official scripts/v1_5/finetune_lora.sh): LoRA r 128, alpha 256 on every linear layer of the LLM at lr 2e-4, the projector
fully trained at 2e-5 (--mm_projector_lr). Stage 1 is LLaVA-1.5's, unchanged."""
from adapters import LLAVA15_LORA_TARGETS as _LORA_TARGETS  # every linear layer of the LLM

exec(open(__file__.replace("llava15_lora.py", "llava15.py")).read())

out_dir = "out/llava15_lora"
stages[1] = dict(
    stages[1],
    lora=dict(targets=_LORA_TARGETS, rank=128, alpha=256, dropout=0.05),
    trainable=[r"lora_", r"^multi_modal_projector\."],
    learning_rate=2e-4,
    param_groups=[dict(pattern=r"^multi_modal_projector\.", learning_rate=2e-5)],
)
