"""BLIP-2 stage 1: the three masks, the three losses on hand-computed cases, ITG's cached
queries against one joint pass, DDP's gathered contrastive loss, and parity of the matching and
contrastive scores with transformers' Blip2ForImageTextRetrieval in both directions."""
import pytest
import torch
import torch.nn.functional as F
import transformers

import pretraining
from conftest import randomize
from connectors import QFormerConfig, bidirectional_mask
from pretraining import (QFormerStage1, QFormerStage1Config, QueryKeysValues, causal_text_mask,
                         image_text_contrastive_loss, sample_hard_negatives)
from vision import EVAVisionConfig

VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=30,
              patch_size=6)
QFORMER = dict(vocab_size=50, hidden_size=24, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
               cross_attention_frequency=2, max_position_embeddings=40)


def tiny_stage1(seed: int = 0) -> QFormerStage1:
    config = QFormerStage1Config(vision_config=EVAVisionConfig(**VISION),
                                 qformer_config=QFormerConfig(**QFORMER, encoder_hidden_size=32,
                                                              use_qformer_text_input=True),
                                 num_query_tokens=4, image_text_hidden_size=16, decoder_bos_token_id=49)
    model = QFormerStage1(config)
    model.initialize_weights()
    return randomize(model, seed)


def captions() -> tuple[torch.Tensor, torch.Tensor]:
    """Three [CLS] ... [SEP] captions (ids 2 and 3), right-padded with 0."""
    ids = torch.tensor([[2, 11, 12, 13, 3], [2, 21, 22, 3, 0], [2, 31, 3, 0, 0]])
    return ids, (ids != 0).long()


def pixels(count: int = 3, seed: int = 5) -> torch.Tensor:
    return torch.randn(count, 3, 30, 30, generator=torch.Generator().manual_seed(seed))


def test_the_three_masks():
    padding = torch.tensor([[1, 1, 0]])
    # ITM / InstructBLIP: everyone sees every real token.
    assert bidirectional_mask(padding).tolist() == [[[[True, True, False]]]]
    # ITG: 2 queries then 3 text tokens; each text token sees both queries and the text up to itself.
    assert causal_text_mask(padding, 2).int().tolist() == [[[[1, 1, 1, 0, 0],
                                                             [1, 1, 1, 1, 0],
                                                             [1, 1, 1, 1, 0]]]]


def test_contrastive_loss_on_a_hand_computed_case():
    # Two images of two queries, two texts, in 2-d: the similarity is the best query's.
    image = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [-1.0, 0.0]]])
    text = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    loss, image_to_text, text_to_image = image_text_contrastive_loss(image, text, torch.tensor(0.5))
    # image 0 . text 0 = max(0, 1) = 1; image 0 . text 1 = max(1, 0) = 1; image 1: max(0.8, 0) = 0.8, max(0.6, -1) = 0.6
    expected = torch.tensor([[1.0, 1.0], [0.8, 0.6]]) / 0.5
    torch.testing.assert_close(image_to_text, expected)
    torch.testing.assert_close(text_to_image, expected.t())

    def smoothed(logits, target):  # label smoothing 0.1 over 2 classes by hand
        log_probs = logits.log_softmax(-1)
        return -(0.9 * log_probs[target] + 0.1 * log_probs.mean())
    by_hand = (sum(smoothed(expected[i], i) for i in range(2)) / 2 + sum(smoothed(expected.t()[i], i) for i in range(2)) / 2) / 2
    torch.testing.assert_close(loss, by_hand)


def test_hard_negatives_follow_the_softmax_and_never_the_positive():
    similarities = torch.tensor([[50.0, 1.0, 0.0], [0.0, 50.0, 0.0], [2.0, 2.0, 50.0]])
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_hard_negatives(similarities, generator) for _ in range(4000)])
    assert not (draws == torch.arange(3)).any()
    # Row 0: columns 1 and 2 with probabilities e / (e + 1) and 1 / (e + 1).
    share = (draws[:, 0] == 1).float().mean().item()
    assert abs(share - torch.e / (torch.e + 1)) < 0.03
    assert set(draws[:, 2].tolist()) == {0, 1}
    with pytest.raises(ValueError, match="at least 2"):
        sample_hard_negatives(torch.zeros(1, 1))


def test_generation_through_cached_queries_equals_one_joint_pass():
    """ITG's text pass over the query pass's cached keys/values is the joint pass of queries and
    text under the UniLM mask: queries see queries, text sees all queries and the text before it."""
    model = tiny_stage1()
    ids, mask = captions()
    image_embeds = model.image_embeds(pixels())
    caches = [QueryKeysValues() for _ in model.qformer.layers]
    model.query_outputs(image_embeds, caches)
    through_cache = model.qformer(input_ids=ids, attn_mask=causal_text_mask(mask, 4), caches=caches)
    queries = model.query_tokens.expand(3, -1, -1)
    text_rows = causal_text_mask(mask, 4)[:, 0]                                      # (B, T, Q + T)
    query_rows = torch.cat([torch.ones(3, 4, 4, dtype=torch.bool), torch.zeros(3, 4, 5, dtype=torch.bool)], 2)
    joint = model.qformer(queries, ids, attn_mask=torch.cat([query_rows, text_rows], 1)[:, None], image_embeds=image_embeds)
    real = mask.bool()
    torch.testing.assert_close(through_cache[real], joint[:, 4:][real], atol=1e-5, rtol=0)


def test_forward_sums_the_three_losses_and_generation_trains_the_queries():
    model = tiny_stage1()
    ids, mask = captions()
    torch.manual_seed(0)
    losses, total = model(pixels(), ids, mask)
    assert set(losses) == {"itc", "itm", "itg"} and all(torch.isfinite(value) for value in losses.values())
    torch.testing.assert_close(total, losses["itc"] + losses["itm"] + losses["itg"])
    # ITG alone reaches the queries (through the cache) and the ITG head; ITC the temperature.
    losses["itg"].backward(retain_graph=True)
    assert model.query_tokens.grad.abs().sum() > 0 and model.itg_head.dense.weight.grad.abs().sum() > 0
    assert model.temperature.grad is None
    losses["itc"].backward()
    assert model.temperature.grad.abs() > 0


def test_a_few_steps_lower_the_loss():
    model = tiny_stage1()
    ids, mask = captions()
    images = pixels()
    optimizer = torch.optim.AdamW([p for n, p in model.named_parameters() if not n.startswith("vision_tower.")], lr=3e-3)
    torch.manual_seed(0)
    first = model(images, ids, mask)[1].item()
    for _ in range(15):
        optimizer.zero_grad()
        model(images, ids, mask)[1].backward()
        optimizer.step()
    assert model(images, ids, mask)[1].item() < first - 0.5


def test_contrastive_loss_gathers_the_batch_across_processes(monkeypatch):
    """Two processes with two pairs each (torch.distributed stood in for by the halves each rank
    would receive): their mean loss is one process's with all four, every text competing with
    all four images, as LAVIS's concat_all_gather makes it."""
    generator = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(4, 3, 8, generator=generator), dim=-1)
    text = F.normalize(torch.randn(4, 8, generator=generator), dim=-1)
    halves = {tensor.dim(): tensor.split(2) for tensor in (image, text)}  # rank r holds half r

    def all_gather(outputs, tensor):
        for output, half in zip(outputs, halves[tensor.dim()]):
            output.copy_(half)

    monkeypatch.setattr(pretraining.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(pretraining.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(pretraining.dist, "all_gather", all_gather)
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setattr(pretraining.dist, "get_rank", lambda rank=rank: rank)
        part = slice(2 * rank, 2 * rank + 2)
        per_rank.append(image_text_contrastive_loss(image[part], text[part], torch.tensor(0.07))[0])
    monkeypatch.undo()
    alone, _, _ = image_text_contrastive_loss(image, text, torch.tensor(0.07))
    torch.testing.assert_close((per_rank[0] + per_rank[1]) / 2, alone)


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    config = transformers.Blip2Config(vision_config=VISION, qformer_config={**QFORMER, "use_qformer_text_input": True},
                                      num_query_tokens=4, image_text_hidden_size=16)
    reference = randomize(transformers.Blip2ForImageTextRetrieval(config), seed=1)
    directory = tmp_path_factory.mktemp("blip2_itm")
    reference.save_pretrained(directory)
    return reference, directory


def reference_scores(reference, ids, mask):
    with torch.no_grad():
        matching = reference(pixel_values=pixels(), input_ids=ids, attention_mask=mask,
                             use_image_text_matching_head=True).logits_per_image
        contrastive = reference(pixel_values=pixels(), input_ids=ids, attention_mask=mask,
                                use_image_text_matching_head=False).logits_per_image
    return matching, contrastive


def test_matching_and_contrastive_scores_match_transformers(retrieval, tmp_path, capsys):
    reference, directory = retrieval
    ours = QFormerStage1.from_pretrained(directory).eval()
    assert "initialized fresh" in capsys.readouterr().err  # the hub layout has no ITG head
    ids, mask = captions()
    matching, contrastive = reference_scores(reference, ids, mask)
    with torch.no_grad():
        torch.testing.assert_close(ours.match_logits(ours.image_embeds(pixels()), ids, mask), matching, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.similarity(pixels(), ids, mask), contrastive, atol=1e-5, rtol=0)

    ours.save_pretrained(tmp_path)  # and back: transformers reads ours (ignoring the ITG head and temperature)
    reloaded = transformers.Blip2ForImageTextRetrieval.from_pretrained(tmp_path).eval()
    for theirs, expected in zip(reference_scores(reloaded, ids, mask), (matching, contrastive)):
        torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=0)
    again = QFormerStage1.from_pretrained(tmp_path)
    assert torch.equal(again.itg_head.dense.weight, ours.itg_head.dense.weight)
    assert again.temperature.item() == ours.temperature.item()


def test_texts_pad_to_the_longest_process_before_they_are_gathered(monkeypatch):
    """Each process pads its captions to its own longest; ITM's negatives gather every process's,
    so they first pad to the longest of all (all_reduce MAX, here another process's 7)."""
    monkeypatch.setattr(pretraining.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(pretraining.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(pretraining.dist, "all_reduce", lambda tensor, op: tensor.fill_(7))
    padded = pretraining.pad_to_common_length(torch.ones(2, 5, dtype=torch.long), 1, 0)
    assert padded.shape == (2, 7) and padded[:, :5].eq(1).all() and padded[:, 5:].eq(0).all()
    objects = pretraining.pad_to_common_length(torch.ones(2, 3, 4), 1, 0)
    assert objects.shape == (2, 7, 4) and objects[:, 3:].eq(0).all()
