"""Shared test helpers: tiny transformers references for the parity tests, and the tiny
LLaVA-1.5 that the training and probe tests start from. Test modules import from here, never
from each other."""

import torch
import transformers
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


# Tiny transformers references. They have grouped-query attention, an untied head, rope_theta
# != 10000 and an RMSNorm eps that is neither LLaMA-1's nor LLaMA-2's default, so a wrong
# convention anywhere shows.

IMAGE_TOKEN = 120
PAD_TOKEN = 121
NUM_IMAGE_TOKENS = 4  # (28 / 14) ** 2 patches, CLS dropped


def tiny_llama_config(**overrides) -> transformers.LlamaConfig:
    values = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rope_theta=5000.0, rms_norm_eps=3e-5, tie_word_embeddings=False,
                  max_position_embeddings=256, pad_token_id=PAD_TOKEN)
    return transformers.LlamaConfig(**{**values, **overrides})


def tiny_clip_vision_config() -> transformers.CLIPVisionConfig:
    return transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, image_size=28, patch_size=14)


def tiny_hf_llava(seed: int = 0) -> transformers.LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    config = transformers.LlavaConfig(vision_config=tiny_clip_vision_config(), text_config=tiny_llama_config(),
                                      image_token_index=IMAGE_TOKEN, vision_feature_layer=-2, pad_token_id=PAD_TOKEN)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # transformers initializes norms to ones: make them matter
        for name, parameter in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                parameter.uniform_(0.5, 1.5)
    return model


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (transformers starts biases, query tokens and norms at 0 or 1,
    where a wrong wiring would not show), the k third of EVA's folded bias included."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1 + 0.2 * noise if "norm" in name.lower() and name.endswith("weight") else 0.2 * noise)
    return model.eval()


def text_with_images(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of 3: sample 0 has one image, sample 1 none, sample 2 two images; 2 + 1 images."""
    generator = torch.Generator().manual_seed(seed)
    image = [IMAGE_TOKEN] * NUM_IMAGE_TOKENS
    rows = [[1, 5, *image, 7, 9, 11, 13], [1, 17, 19, 23, 29, 31, 37, 41, 43, 47],
            [1, *image, 3, *image]]
    width = max(map(len, rows))
    input_ids = torch.tensor([row + [PAD_TOKEN] * (width - len(row)) for row in rows])
    pixel_values = torch.randn(3, 3, 28, 28, generator=generator)
    return input_ids, pixel_values


def hf_logits(model, input_ids, pixel_values=None, attention_mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask).logits


def our_logits(model, input_ids, pixel_values=None, attention_mask=None) -> torch.Tensor:
    """Logits of an MLLM (with images) or a LanguageModel (pixel_values None)."""
    with torch.no_grad():
        if pixel_values is None:
            return model(input_ids, attention_mask=attention_mask)
        return model(input_ids, pixel_values=pixel_values, attention_mask=attention_mask)


# Tiny BLIP-2 / InstructBLIP parts, shared by the LLaMA and the T5 variants' parity tests.

BLIP2_IMAGE_TOKEN = 125
NUM_QUERIES = 5


def tiny_blip2_configs() -> dict:
    """An EVA tower of 3 blocks, a Q-Former of 3 layers crossing the image in layers 0 and 2,
    5 queries, a LLaMA with GQA, an untied head and rope_theta 5000."""
    return dict(vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                                   image_size=30, patch_size=6),
                qformer_config=dict(vocab_size=99, hidden_size=24, num_hidden_layers=3, num_attention_heads=4,
                                    intermediate_size=37, cross_attention_frequency=2, max_position_embeddings=40),
                text_config=tiny_llama_config().to_dict(), num_query_tokens=NUM_QUERIES,
                image_token_index=BLIP2_IMAGE_TOKEN)


def instructions() -> tuple[torch.Tensor, torch.Tensor]:
    """Q-Former input ids (BERT-style [CLS] ... [SEP]), the second RIGHT-padded with id 0."""
    return torch.tensor([[2, 14, 15, 16, 3], [2, 21, 3, 0, 0]]), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])


def pixels(seed: int = 3) -> torch.Tensor:
    return torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(seed))
