"""Decoding (decoding.py): the same tokens as transformers' generate for greedy, beam
search (beams, length penalty, no-repeat n-gram), sampling and repetition penalty; batched ==
unbatched under left padding; cached == uncached; one beam == greedy; stop rules."""
from __future__ import annotations

import pytest
import torch
import transformers

from conftest import IMAGE_TOKEN, NUM_IMAGE_TOKENS, PAD_TOKEN, text_with_images, tiny_hf_llava, tiny_llama_config
from decoding import DecodingOptions, beam_search, start_decoding
from model import MLLM, LanguageModel


def sharpen_and_silence_special_tokens(model) -> None:
    """A sharper next-token distribution than random init's near-uniform one (beam scores then
    differ clearly), and zero logits for the image and pad tokens, so that a pad in the output
    always means "after the end"."""
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
        model.lm_head.weight[IMAGE_TOKEN:PAD_TOKEN + 1] = 0


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    """A tiny random LlamaForCausalLM and our LanguageModel loaded from its checkpoint."""
    directory = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(tiny_llama_config()).eval()
    sharpen_and_silence_special_tokens(reference)
    reference.save_pretrained(directory)
    return reference, LanguageModel.from_pretrained(str(directory)).eval()


@pytest.fixture(scope="module")
def llava_pair(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llava")
    reference = tiny_hf_llava()
    sharpen_and_silence_special_tokens(reference)
    reference.save_pretrained(directory)
    return reference, MLLM.from_pretrained(str(directory)).eval()


def hf_new_tokens(model, input_ids, attention_mask=None, **options) -> torch.Tensor:
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, pad_token_id=PAD_TOKEN, **options)
    return output[:, input_ids.shape[1]:]


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    input_ids = torch.tensor([[PAD_TOKEN] * (width - len(row)) + row for row in rows])
    return input_ids, (input_ids != PAD_TOKEN).long()


PROMPTS = [[1, 5, 9, 14, 3, 77], [1, 40, 41], [1, 90, 12, 33, 60]]


def frequent_token(llama: LanguageModel, prompt: list[int]) -> int:
    """A token greedy decoding emits a few steps in: used as EOS so that hypotheses do end."""
    return int(llama.generate(torch.tensor([prompt]), max_new_tokens=6, eos_token_id=[])[0, 3])


def test_greedy_matches_transformers_on_llava_batch(llava_pair):
    reference, ours = llava_pair
    image = [IMAGE_TOKEN] * NUM_IMAGE_TOKENS
    input_ids, mask = left_pad([[1, *image, 7, 9], [1, 17, 19, 23], [1, 3, *image, 5, 6, 8]])
    pixel_values = text_with_images()[1][:2]
    expected = reference.generate(input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values,
                                  max_new_tokens=12, do_sample=False, pad_token_id=PAD_TOKEN)[:, input_ids.shape[1]:]
    actual = ours.generate(input_ids, pixel_values, mask, max_new_tokens=12)
    assert torch.equal(actual, expected)


def test_batched_equals_unbatched_and_cached_equals_uncached(llama_pair):
    _, ours = llama_pair
    input_ids, mask = left_pad(PROMPTS)
    for options in (dict(num_beams=3, no_repeat_ngram_size=2, length_penalty=0.5), dict()):
        batched = ours.generate(input_ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[], **options)
        for index, prompt in enumerate(PROMPTS):
            alone = ours.generate(torch.tensor([prompt]), max_new_tokens=10, eos_token_id=[], **options)
            assert torch.equal(batched[index], alone[0]), (options, index)
    sequence = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        for _ in range(10):  # no cache: the whole sequence again at every step
            sequence = torch.cat([sequence, ours(sequence)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(batched[0], sequence[0, len(PROMPTS[0]):])


@pytest.mark.parametrize("length_penalty", [1.0, 0.6, -2.0])
def test_beam_search_matches_transformers(llama_pair, length_penalty):
    reference, ours = llama_pair
    eos = frequent_token(ours, PROMPTS[0])
    input_ids, mask = left_pad(PROMPTS)
    options = dict(num_beams=3, length_penalty=length_penalty, no_repeat_ngram_size=2, max_new_tokens=10,
                   eos_token_id=eos)
    expected = hf_new_tokens(reference, input_ids, mask, do_sample=False, **options)
    actual = ours.generate(input_ids, attention_mask=mask, pad_token_id=PAD_TOKEN, **options)
    assert torch.equal(actual, expected)
    assert (actual == eos).any()  # some hypothesis ended, so the finishing rules were exercised


def test_one_beam_equals_greedy(llama_pair):
    _, ours = llama_pair
    input_ids, mask = left_pad(PROMPTS)
    eos = frequent_token(ours, PROMPTS[1])
    greedy = ours.generate(input_ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos)
    # beam_search itself (generate sends num_beams=1 to greedy). Length penalty 0: with
    # normalization a beam search may prefer a longer hypothesis, greedy never does.
    with torch.inference_mode():
        options = DecodingOptions(max_new_tokens=8, eos_token_id=eos, num_beams=1, length_penalty=0.0)
        one_beam = beam_search(start_decoding(ours, input_ids, None, mask, options))
    assert (greedy == eos).any()
    assert torch.equal(one_beam, greedy)


def test_sampling_and_repetition_penalty_match_transformers(llama_pair):
    reference, ours = llama_pair
    input_ids, mask = left_pad(PROMPTS)
    for options in (dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9), dict(repetition_penalty=1.5)):
        torch.manual_seed(3)
        expected = hf_new_tokens(reference, input_ids, mask, max_new_tokens=10, eos_token_id=[], **options)
        torch.manual_seed(3)
        actual = ours.generate(input_ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[], **options)
        assert torch.equal(actual, expected), options


def test_stop_rules_and_padding_after_the_end(llama_pair):
    _, ours = llama_pair
    input_ids, mask = left_pad(PROMPTS)
    free = ours.generate(input_ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    eos = int(free[0, 2])
    stopped = ours.generate(input_ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=PAD_TOKEN)
    first_end = int((stopped[0] == eos).nonzero()[0])
    assert torch.equal(stopped[0, :first_end + 1], free[0, :first_end + 1])
    assert (stopped[0, first_end + 1:] == PAD_TOKEN).all()
    later = ours.generate(input_ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos, min_new_tokens=4)
    assert not (later[:, :4] == eos).any()
    sequence = free[1, 1:3].tolist()
    by_sequence = ours.generate(input_ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[],
                                stop_token_sequences=[sequence], pad_token_id=PAD_TOKEN)
    assert by_sequence[1, :3].tolist() == free[1, :3].tolist() and (by_sequence[1, 3:] == PAD_TOKEN).all()


def test_decoding_options_are_checked_before_decoding(llama_pair):
    _, ours = llama_pair
    input_ids, mask = left_pad(PROMPTS)
    with pytest.raises(TypeError, match=r"unknown decoding option\(s\) \['num_beam'\]"):
        ours.generate(input_ids, attention_mask=mask, num_beam=2)
    for options, message in ((dict(num_beams=0), "num_beams 0 < 1"), (dict(max_new_tokens=0), "max_new_tokens 0"),
                             (dict(do_sample=True, temperature=0.0), "temperature 0.0 <= 0"),
                             (dict(stop_token_sequences=[[]]), "empty stop token sequence"),
                             (dict(num_beams=2, streamer=print), "streaming needs greedy")):
        with pytest.raises(ValueError, match=message):
            ours.generate(input_ids, attention_mask=mask, **options)
    # No EOS at all: rows run to max_new_tokens, padding comes from the config.
    assert ours.generate(input_ids, attention_mask=mask, eos_token_id=[], min_new_tokens=2,
                         max_new_tokens=3).shape == (3, 3)
