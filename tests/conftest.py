"""Shared test helpers: the tiny LLaVA-1.5 that the training and probe tests start from."""
from tokenizers import Tokenizer

from model import MLLMConfig, TextConfig
from vision import VisionConfig


def tiny_mllm_config(tokenizer: Tokenizer) -> MLLMConfig:
    """A tiny LLaVA-1.5 (32 px, 16 image tokens, 2 + 2 layers) for the shapes world's tokenizer."""
    return MLLMConfig(
        vision_config=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, image_size=32, patch_size=8),
        text_config=TextConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        image_token_index=tokenizer.token_to_id("<image>"), pad_token_id=tokenizer.token_to_id("<pad>"))
