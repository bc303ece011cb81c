"""T5 v1.1 / Flan-T5 by hand against transformers' T5ForConditionalGeneration, and BLIP-2 /
InstructBLIP with a T5 LLM against Blip2ForConditionalGeneration /
InstructBlipForConditionalGeneration: logits, greedy and beam-search tokens, checkpoints in both
directions, cached against uncached decoding and batched against one prompt at a time."""
import json

import pytest
import safetensors.torch
import torch
import transformers

from conftest import NUM_QUERIES, instructions, pixels, randomize, tiny_blip2_configs
from checkpoints import blip2_config_fields
from layers import relative_position_buckets
from model import MLLM, T5Config, T5LanguageModel

VOCAB = 60
EOS = 1


def tiny_t5_config(**overrides) -> transformers.T5Config:
    """Gated GELU, a head width (6) that is not d_model / num_heads, 2 encoder and 3 decoder
    layers, 8 buckets up to distance 20 (so prompts of 30 reach the logarithmic buckets)."""
    values = dict(vocab_size=VOCAB, d_model=16, d_kv=6, d_ff=24, num_layers=2, num_decoder_layers=3, num_heads=3,
                  relative_attention_num_buckets=8, relative_attention_max_distance=20,
                  feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
                  pad_token_id=0, eos_token_id=EOS, dropout_rate=0.0)
    return transformers.T5Config(**{**values, **overrides})


def tiny_hf_t5(seed: int = 0, untied: bool = True, **overrides) -> transformers.T5ForConditionalGeneration:
    """transformers 5 ties every T5 head to the embedding when built from a config; a Flan-T5
    checkpoint has its own, so the untied model gets a head of its own, as the hub files do."""
    model = randomize(transformers.T5ForConditionalGeneration(tiny_t5_config(**overrides)), seed)
    if untied:
        model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 16, generator=torch.Generator().manual_seed(seed)))
        model.config.tie_word_embeddings = False
    return model.eval()


def encoder_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two encoder inputs of 30 tokens, the second right-padded after 21 (as T5's tokenizer pads)."""
    input_ids = torch.randint(2, VOCAB, (2, 30), generator=torch.Generator().manual_seed(5))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 21:] = 0
    return input_ids.masked_fill(attention_mask == 0, 0), attention_mask


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    reference = tiny_hf_t5()
    directory = tmp_path_factory.mktemp("t5")
    reference.save_pretrained(directory)
    return reference, directory


def test_relative_position_buckets_follow_the_t5_rule():
    """Hand-computed buckets with 8 buckets, max distance 20. Bidirectional: 4 per direction,
    offsets 0 and 1 exact, then log buckets 2..3; keys after the query add 4. Causal: 8 buckets
    for offsets <= 0, 0..3 exact, 4 + floor(log(d/4) / log(5) * 4) up to 7."""
    offsets = torch.tensor([-25, -20, -9, -4, -3, -1, 0, 1, 2, 3, 9, 30])
    assert relative_position_buckets(offsets, True, 8, 20).tolist() == [3, 3, 3, 2, 2, 1, 0, 5, 6, 6, 7, 7]
    assert relative_position_buckets(offsets, False, 8, 20).tolist() == [7, 7, 6, 4, 3, 1, 0, 0, 0, 0, 0, 0]


def test_logits_and_loss_match_transformers(saved):
    reference, directory = saved
    ours = T5LanguageModel.from_pretrained(str(directory)).eval()
    assert not ours.config.tie_word_embeddings and not ours.config.scale_decoder_outputs
    input_ids, attention_mask = encoder_prompts()
    labels = torch.tensor([[5, 9, 13, 17, EOS, -100, -100], [21, 23, 29, 31, 37, 41, EOS]])
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        logits, loss = ours(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    torch.testing.assert_close(logits, expected.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, expected.loss, atol=1e-5, rtol=0)


def test_greedy_beam_search_and_sampling_match_transformers(saved):
    """transformers' own cache breaks when the decoder is deeper than the encoder (it sizes the
    cache by the encoder), so its side runs uncached; ours runs with its cache. Sampling draws
    from the same seed."""
    reference, directory = saved
    ours = T5LanguageModel.from_pretrained(str(directory)).eval()
    input_ids, attention_mask = encoder_prompts()
    for options in (dict(do_sample=False), dict(do_sample=False, num_beams=3, length_penalty=0.7),
                    dict(do_sample=False, num_beams=2, no_repeat_ngram_size=2, repetition_penalty=1.3),
                    dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.2)):
        torch.manual_seed(3)
        with torch.no_grad():
            theirs = reference.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=12,
                                        use_cache=False, **options)
        torch.manual_seed(3)
        mine = ours.generate(input_ids, attention_mask=attention_mask, max_new_tokens=12, **options)
        assert torch.equal(mine, theirs[:, 1:]), options  # theirs starts with the decoder start token


def test_cached_decoding_equals_uncached_and_batched_equals_one_by_one(saved):
    reference, directory = saved
    ours = T5LanguageModel.from_pretrained(str(directory)).eval()
    input_ids, attention_mask = encoder_prompts()
    batched = ours.generate(input_ids, attention_mask=attention_mask, max_new_tokens=10, eos_token_id=[])
    for row in range(2):
        real = attention_mask[row].bool()
        alone = ours.generate(input_ids[row:row + 1, real], max_new_tokens=10, eos_token_id=[])
        assert torch.equal(alone[0], batched[row])
        decoder_input_ids = torch.zeros(1, 1, dtype=torch.long)  # the start token, then argmax each step
        with torch.no_grad():
            for _ in range(10):
                logits = ours(input_ids=input_ids[row:row + 1, real], decoder_input_ids=decoder_input_ids)
                decoder_input_ids = torch.cat([decoder_input_ids, logits[:, -1:].argmax(-1)], 1)
        assert torch.equal(decoder_input_ids[0, 1:], batched[row])


def test_saved_here_loads_there(saved, tmp_path):
    reference, directory = saved
    T5LanguageModel.from_pretrained(str(directory)).save_pretrained(str(tmp_path))
    state = safetensors.torch.load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" in state and "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in state
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    input_ids, attention_mask = encoder_prompts()
    decoder_input_ids = torch.tensor([[0, 5, 9, 13], [0, 21, 23, 29]])
    with torch.no_grad():
        for model in (reloaded, reference):
            model.eval()
        torch.testing.assert_close(reloaded(input_ids=input_ids, attention_mask=attention_mask,
                                            decoder_input_ids=decoder_input_ids).logits,
                                   reference(input_ids=input_ids, attention_mask=attention_mask,
                                             decoder_input_ids=decoder_input_ids).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["tied head, rescaled (original T5)", "exact gelu (BLIP-2 / LION)"])
def test_variants_match_transformers(variant, tmp_path):
    if variant.startswith("tied"):
        reference = tiny_hf_t5(seed=1, untied=False, tie_word_embeddings=True)
    else:
        reference = tiny_hf_t5(seed=2, dense_act_fn="gelu")
    reference.save_pretrained(tmp_path)
    ours = T5LanguageModel.from_pretrained(str(tmp_path)).eval()
    if variant.startswith("tied"):
        assert ours.config.tie_word_embeddings and ours.config.scale_decoder_outputs
        assert ours.lm_head.weight is ours.shared.weight
    else:
        assert ours.config.dense_act_fn == "gelu"
    input_ids, attention_mask = encoder_prompts()
    decoder_input_ids = torch.tensor([[0, 5, 9, 13], [0, 21, 23, 29]])
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)
        got = ours(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)
    torch.testing.assert_close(got, expected.logits, atol=1e-5, rtol=0)


def test_unsupported_configs_and_inputs_are_refused(saved):
    with pytest.raises(ValueError, match="feed_forward_proj='relu'"):
        T5Config.from_dict({"feed_forward_proj": "relu"})
    with pytest.raises(ValueError, match="unknown hidden_act"):
        T5Config(dense_act_fn="swish-ish")
    ours = T5LanguageModel.from_pretrained(str(saved[1]))
    with pytest.raises(ValueError, match="decoder_input_ids or labels"):
        ours(input_ids=torch.tensor([[5, 6]]))
    with pytest.raises(ValueError, match="'opt'.*OPT does not"):
        blip2_config_fields({"text_config": {"model_type": "opt"}, "image_token_index": 5}, {})


# ----------------------------------------------------------------------------------------------
# BLIP-2 / InstructBLIP with Flan-T5

IMAGE_TOKEN = VOCAB - 1


def tiny_hf_blip2_t5(instruct: bool, seed: int = 0):
    configs = {**tiny_blip2_configs(), "text_config": {**tiny_t5_config(dense_act_fn="gelu").to_dict(),
                                                      "tie_word_embeddings": False},
               "image_token_index": IMAGE_TOKEN}
    if instruct:
        model = transformers.InstructBlipForConditionalGeneration(transformers.InstructBlipConfig(**configs))
    else:
        model = transformers.Blip2ForConditionalGeneration(transformers.Blip2Config(**configs))
    model = randomize(model, seed)
    head = model.language_model.lm_head
    head.weight = torch.nn.Parameter(torch.randn(VOCAB, 16, generator=torch.Generator().manual_seed(seed + 7)))
    return model.eval()


def blip2_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """The query placeholders, then the prompt (the encoder's input); the second right-padded."""
    image = [IMAGE_TOKEN] * NUM_QUERIES
    rows = [image + [5, 7, 9, 11, 13, EOS], image + [17, 19, EOS, 0, 0, 0]]
    input_ids = torch.tensor(rows)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0
    return input_ids, attention_mask


@pytest.mark.parametrize("instruct", [False, True], ids=["blip2-flant5", "instructblip-flant5"])
def test_blip2_and_instructblip_with_flan_t5_match_transformers(instruct, tmp_path):
    reference = tiny_hf_blip2_t5(instruct)
    reference.save_pretrained(tmp_path)
    ours = MLLM.from_pretrained(str(tmp_path)).eval()
    assert isinstance(ours.language_model, T5LanguageModel) and not ours.language_model.config.tie_word_embeddings
    assert ours.language_model.config.dense_act_fn == "gelu"
    input_ids, attention_mask = blip2_prompts()
    extra = dict(zip(("qformer_input_ids", "qformer_attention_mask"), instructions())) if instruct else {}
    labels = torch.tensor([[5, 9, EOS, -100], [21, 23, 29, EOS]])
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels(),
                             labels=labels, **extra)
        logits, loss = ours(input_ids, pixels(), attention_mask, labels=labels, **extra)
        theirs = reference.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels(),
                                    max_new_tokens=6, do_sample=False, use_cache=False, **extra)
    torch.testing.assert_close(logits, expected.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, expected.loss, atol=1e-5, rtol=0)
    mine = ours.generate(input_ids, pixels(), attention_mask, max_new_tokens=6, **extra)
    assert torch.equal(mine, theirs[:, 1:])

    ours.save_pretrained(str(tmp_path / "ours"))
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["text_config"]["model_type"] == "t5" and not config["use_decoder_only_language_model"]
    model_class = type(reference)
    reloaded = model_class.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        again = reloaded(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels(), labels=labels,
                         **extra)
    torch.testing.assert_close(again.logits, expected.logits, atol=1e-5, rtol=0)
