"""Lyrics ("Lyrics: Boosting Fine-grained Language-Vision Alignment via Semantic-aware Visual
Objects"): the MQ-Former's grounding queries, the four pretraining masks against hand-drawn
matrices, what each objective may and may not see, and the start from a BLIP-2 stage-1 model."""
import pytest
import torch

from connectors import QFormer, QFormerConfig, QFormerConnector
from pretraining import (CAPTION, GROUNDING, SPATIAL, VISUAL, LyricsStage1, LyricsStage1Config, QFormerStage1,
                         QFormerStage1Config, lyrics_attention_mask)
from vision import VisionConfig

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16,
              patch_size=8)
QFORMER = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=40, encoder_hidden_size=32, use_qformer_text_input=True)
OBJECT_WIDTH = 12  # a refiner feature of 8 + its box


def test_masks_match_the_hand_drawn_matrices():
    segments = torch.tensor([[VISUAL, GROUNDING, SPATIAL, SPATIAL, CAPTION, CAPTION, CAPTION]])
    padding = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])  # the last caption position is padding
    drawn = {  # rows: V G S S C C pad; columns likewise; a padded row sees only what its segment may, and itself
        "itc": ["1100000", "1100000", "0011000", "0011000", "0000110", "0000110", "0000111"],
        "itm": ["1000110", "0111000", "0111000", "0111000", "1000110", "1000110", "1000111"],
        "icg": ["1100000", "1100000", "0011000", "0011000", "1100100", "1100110", "1100111"],
        "msp": ["1111000", "1111000", "1111000", "1111000", "0000110", "0000110", "0000111"],
    }
    for objective, rows in drawn.items():
        expected = torch.tensor([[int(c) for c in row] for row in rows], dtype=torch.bool)
        assert torch.equal(lyrics_attention_mask(objective, segments, padding)[0, 0], expected), objective


def qformer_config(detection: int = 0) -> QFormerConfig:
    return QFormerConfig(**QFORMER, detection_encoder_hidden_size=detection)


def test_mqformer_without_grounding_queries_is_the_qformer_path():
    torch.manual_seed(0)
    plain, mq = QFormer(qformer_config()), QFormer(qformer_config(OBJECT_WIDTH))
    missing, unexpected = mq.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all("grounding_cross_attn" in key for key in missing)
    queries, image = torch.randn(2, 4, 32), torch.randn(2, 5, 32)
    ids = torch.randint(0, 60, (2, 6))
    objects, present = torch.randn(2, 3, OBJECT_WIDTH), torch.ones(2, 3, dtype=torch.bool)
    expected = plain(queries, ids, image_embeds=image)
    assert torch.equal(mq(queries, ids, image_embeds=image), expected)
    assert torch.equal(mq(queries, ids, image_embeds=image, object_features=objects, object_mask=present), expected)
    # The connector: no grounding queries is BLIP-2's connector, weights and outputs alike.
    vision = VisionConfig(**VISION)
    torch.manual_seed(1)
    blip2 = QFormerConnector(vision, 24, qformer_config(), num_query_tokens=4)
    torch.manual_seed(1)
    lyrics = QFormerConnector(vision, 24, qformer_config(OBJECT_WIDTH), num_query_tokens=4)
    lyrics.load_state_dict(blip2.state_dict(), strict=False)
    hidden = [torch.randn(2, 5, 32)] * 3
    assert torch.equal(lyrics(hidden), blip2(hidden))


def test_grounding_queries_read_only_the_present_objects():
    torch.manual_seed(0)
    connector = QFormerConnector(VisionConfig(**VISION), 24, qformer_config(OBJECT_WIDTH), num_query_tokens=3,
                                 num_grounding_queries=2)
    assert connector.num_image_tokens == 5
    hidden = [torch.randn(2, 5, 32)] * 3
    objects = torch.randn(2, 4, OBJECT_WIDTH)
    present = torch.tensor([[True, True, False, False], [False, False, False, False]])  # image 1: no object
    out = connector(hidden, object_features=objects, object_mask=present)
    assert torch.isfinite(out).all()
    changed = objects.clone()
    changed[0, 2:] = 100.0   # absent objects of image 0
    changed[1] = -7.0        # every slot of image 1, which has none
    assert torch.equal(connector(hidden, object_features=changed, object_mask=present), out)
    changed[0, 0] = 3.0      # a present object
    moved = connector(hidden, object_features=changed, object_mask=present)
    assert not torch.allclose(moved[0], out[0]) and torch.equal(moved[1], out[1])
    with pytest.raises(ValueError, match="object_features and object_mask"):
        connector(hidden)
    with pytest.raises(ValueError, match="detection_encoder_hidden_size"):
        QFormerConnector(VisionConfig(**VISION), 24, qformer_config(), num_query_tokens=3, num_grounding_queries=2)


# ---------------------------------------------------------------------------------------------
# Pretraining

def tiny_lyrics(msp_probability: float = 0.15, seed: int = 0) -> LyricsStage1:
    torch.manual_seed(seed)
    config = LyricsStage1Config(vision_config=VisionConfig(**VISION), qformer_config=qformer_config(OBJECT_WIDTH),
                                num_query_tokens=3, num_grounding_queries=2, image_text_hidden_size=16,
                                decoder_bos_token_id=57, spatial_bos_token_id=58, mlm_token_id=59,
                                mask_token_id=56, msp_probability=msp_probability)
    model = LyricsStage1(config)
    model.initialize_weights()
    return model.eval()


def lyrics_batch(seed: int = 0) -> dict:
    """Three images; text "[BOS] obj0 obj0 obj1 obj1 [CLS] w w [SEP]" (row 2 with one object and padding)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 50, (3, 9), generator=generator)
    input_ids[:, 0], input_ids[:, 5], input_ids[:, 8] = 58, 2, 3
    segments = torch.tensor([[SPATIAL] * 5 + [CAPTION] * 4] * 3)
    spans = torch.tensor([[-1, 0, 0, 1, 1, -1, -1, -1, -1]] * 3)
    attention_mask = torch.ones(3, 9, dtype=torch.long)
    spans[2, 3:5] = -1
    segments[2] = torch.tensor([SPATIAL] * 3 + [CAPTION] * 6)
    input_ids[2, 3], input_ids[2, 6:] = 2, 0
    attention_mask[2, 7:] = 0
    input_ids[2, 6] = 3
    return dict(pixel_values=torch.randn(3, 3, 16, 16, generator=generator), input_ids=input_ids,
                attention_mask=attention_mask, text_segments=segments, object_spans=spans,
                object_features=torch.randn(3, 2, OBJECT_WIDTH, generator=generator),
                object_mask=torch.tensor([[True, True], [True, True], [True, False]]))


def losses_of(model: LyricsStage1, batch: dict, seed: int = 0) -> dict:
    torch.manual_seed(seed)  # the same hard negatives and masked objects
    losses, total = model(**batch)
    assert total.item() == pytest.approx(sum(loss.item() for loss in losses.values()), rel=1e-6)
    return {name: loss.item() for name, loss in losses.items()}


def test_each_objective_sees_only_what_its_mask_allows():
    model = tiny_lyrics(msp_probability=0.5)
    batch = lyrics_batch()
    base = losses_of(model, batch)
    assert set(base) == {"itc", "itm", "icg", "msp"} and all(value > 0 for value in base.values())

    other_caption = dict(batch, input_ids=batch["input_ids"].clone())
    other_caption["input_ids"][:2, 6:8] = 7  # caption words of rows 0 and 1
    changed = losses_of(model, other_caption)
    assert changed["msp"] == pytest.approx(base["msp"], rel=1e-6)  # "image caption are entirely masked"
    assert changed["icg"] != pytest.approx(base["icg"], rel=1e-4)

    other_spatial = dict(batch, input_ids=batch["input_ids"].clone())
    other_spatial["input_ids"][:2, 1:5] = 9  # the objects' words
    changed = losses_of(model, other_spatial)
    assert changed["icg"] == pytest.approx(base["icg"], rel=1e-6)  # "with spatial information being masked"
    assert changed["msp"] != pytest.approx(base["msp"], rel=1e-4)

    other_objects = dict(batch, object_features=batch["object_features"] + 1.0)
    changed = losses_of(model, other_objects)
    assert changed["icg"] != pytest.approx(base["icg"], rel=1e-6)  # the caption reads the grounding queries too


def test_msp_masks_whole_objects_and_restores_them():
    model = tiny_lyrics(msp_probability=1.0)  # every object masked: the loss is over all its tokens
    batch = lyrics_batch()
    losses = losses_of(model, batch)
    mlm_ids = batch["input_ids"].masked_fill(batch["object_spans"] >= 0, 56)
    mlm_ids[:, 0] = 59
    num_queries = 5
    segments = torch.cat([torch.tensor([[VISUAL] * 3 + [GROUNDING] * 2] * 3), batch["text_segments"]], 1)
    padding = torch.cat([torch.ones(3, num_queries, dtype=torch.long), batch["attention_mask"]], 1)
    with torch.no_grad():
        states = model.qformer(model.query_tokens.expand(3, -1, -1), mlm_ids,
                               attn_mask=lyrics_attention_mask("msp", segments, padding),
                               image_embeds=model.image_embeds(batch["pixel_values"]), num_grounding_queries=2,
                               object_features=batch["object_features"], object_mask=batch["object_mask"])
        logits = model.itg_head(states[:, num_queries:], model.qformer.word_embeddings.weight)
    masked = batch["object_spans"] >= 0
    expected = torch.nn.functional.cross_entropy(logits[masked], batch["input_ids"][masked])
    assert losses["msp"] == pytest.approx(expected.item(), rel=1e-5)
    nothing = tiny_lyrics(msp_probability=0.0)
    assert losses_of(nothing, batch)["msp"] == 0.0


def test_the_mqformer_starts_from_a_blip2_stage1_model():
    torch.manual_seed(3)
    blip2_config = QFormerStage1Config(vision_config=VisionConfig(**VISION),
                                       qformer_config=QFormerConfig(**dict(QFORMER, vocab_size=57,
                                                                           max_position_embeddings=20)),
                                       num_query_tokens=3, image_text_hidden_size=16, decoder_bos_token_id=56)
    blip2 = QFormerStage1(blip2_config)
    blip2.initialize_weights()
    lyrics_config = LyricsStage1Config(vision_config=VisionConfig(**VISION), qformer_config=qformer_config(OBJECT_WIDTH),
                                       num_query_tokens=3, num_grounding_queries=2, image_text_hidden_size=16,
                                       decoder_bos_token_id=56, spatial_bos_token_id=58, mlm_token_id=59)
    model = LyricsStage1.from_blip2(blip2, lyrics_config)
    old, new = blip2.state_dict(), model.state_dict()
    for key, value in old.items():
        assert torch.equal(new[key][tuple(slice(0, size) for size in value.shape)], value), key
    assert new["query_tokens"].shape == (1, 5, 32) and new["qformer.word_embeddings.weight"].shape == (60, 32)
    assert new["qformer.position_embeddings.weight"].shape == (40, 32)
    grounding = model.qformer.layers[0].grounding_cross_attn.k_proj.weight  # Xavier: uniform within its bound
    bound = (6 / sum(grounding.shape)) ** 0.5
    assert grounding.abs().max() <= bound and grounding.abs().max() > 0.5 * bound
    with pytest.raises(ValueError, match="num_query_tokens must be its 3"):
        LyricsStage1.from_blip2(blip2, LyricsStage1Config(**{**lyrics_config.__dict__, "num_query_tokens": 2}))
    narrow = qformer_config(OBJECT_WIDTH)
    narrow.max_position_embeddings = 10
    with pytest.raises(ValueError, match="does not fit"):
        LyricsStage1.from_blip2(blip2, LyricsStage1Config(**{**lyrics_config.__dict__, "qformer_config": narrow}))
