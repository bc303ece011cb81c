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


# ---------------------------------------------------------------------------------------------
# The official release's names (Ziya-Visual-Lyrics-14B's .bin shards), on a synthetic state dict

def tiny_lyrics_mllm(seed: int = 0):
    from conftest import randomize, tiny_llama_config
    from model import MLLM, MLLMConfig, TextConfig
    from vision import EVAVisionConfig
    torch.manual_seed(seed)
    config = MLLMConfig(vision_config=EVAVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                      num_attention_heads=4, image_size=28, patch_size=7),
                        text_config=TextConfig.from_dict(tiny_llama_config(vocab_size=60, pad_token_id=0).to_dict()),
                        projector_type="qformer", qformer_config=QFormerConfig(
                            **dict(QFORMER, encoder_hidden_size=32), detection_encoder_hidden_size=OBJECT_WIDTH),
                        num_query_tokens=3, num_grounding_queries=2, image_token_index=59, pad_token_id=0,
                        vision_feature_layer=-1, vision_feature_select_strategy="full")
    return randomize(MLLM(config), seed)


def lyrics_inputs(seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 59, (2, 9), generator=generator)
    input_ids[:, :5] = 59  # the 5 query outputs, then the text
    return dict(input_ids=input_ids, pixel_values=torch.randn(2, 3, 28, 28, generator=generator),
                qformer_input_ids=torch.randint(1, 60, (2, 4), generator=generator),
                qformer_attention_mask=torch.ones(2, 4, dtype=torch.long),
                object_features=torch.randn(2, 3, OBJECT_WIDTH, generator=generator),
                object_mask=torch.tensor([[True, True, False], [True, False, False]]))


def test_the_official_layout_loads_and_leaves_the_refiner_models_out(tmp_path, capsys):
    import json

    import checkpoints
    from model import MLLM
    model = tiny_lyrics_mllm()
    model.save_pretrained(tmp_path / "ours")
    state = checkpoints.load_safetensors(tmp_path / "ours")
    # The names the official code gives the MQ-Former (LyricsQFormerModel, transformers' BLIP-2 names).
    for key, shape in {"query_tokens": (1, 5, 32),
                       "qformer.embeddings.LayerNorm.weight": (32,),
                       "qformer.embeddings.word_embeddings.weight": (60, 32),
                       "qformer.encoder.layer.0.crossattention.attention.key.weight": (32, 32),
                       "qformer.encoder.layer.0.detection_crossattention.attention.key.weight": (32, OBJECT_WIDTH),
                       "qformer.encoder.layer.0.detection_crossattention.output.LayerNorm.bias": (32,),
                       "qformer.encoder.layer.1.intermediate_query.dense.weight": (64, 32),
                       "language_projection.weight": (model.config.text_config.hidden_size, 32),
                       "vision_model.encoder.layers.0.self_attn.qkv.weight": (96, 32)}.items():
        assert tuple(state[key].shape) == shape, key
    assert not any("detection_crossattention" in key for key in state if ".layer.1." in key)  # frequency 2
    # The release: .bin shards holding the refiner's models too, converted; the official split of
    # the queries in its config.json.
    release = {**state, "ram.tagging_head.weight": torch.randn(4, 4), "grounding_dino.bbox_embed.0.weight": torch.randn(4)}
    keys = sorted(release)
    shards = [tmp_path / f"pytorch_model-0000{k}-of-00002.bin" for k in (1, 2)]
    for shard, part in zip(shards, (keys[:len(keys) // 2], keys[len(keys) // 2:])):
        torch.save({key: release[key] for key in part}, shard)
    checkpoints.main(["convert", *map(str, shards), str(tmp_path / "release")])
    values = json.loads((tmp_path / "ours" / "config.json").read_text())
    del values["num_grounding_queries"]
    values["qformer_config"].update(num_vit_query_tokens=3, num_dino_query_tokens=2)
    (tmp_path / "release" / "config.json").write_text(json.dumps(values))
    loaded = MLLM.from_pretrained(str(tmp_path / "release"))
    assert "ram.* (1 tensors), grounding_dino.* (1 tensors)" in capsys.readouterr().err
    assert loaded.config.num_grounding_queries == 2 and loaded.config.num_query_tokens == 3
    inputs = lyrics_inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs), model(**inputs), atol=1e-5, rtol=1e-5)
        # The grounding queries read the objects: other objects, other logits.
        moved = model(**{**inputs, "object_features": inputs["object_features"] + 1})
    assert not torch.allclose(moved, model(**inputs))
    with pytest.raises(ValueError, match="object_features and object_mask"):
        model(**{key: value for key, value in inputs.items() if not key.startswith("object")})


# ---------------------------------------------------------------------------------------------
# The visual refiner as data

def write_tiny_refiner(directory, objects: dict, width: int = 8):
    import refiner
    return refiner.write_refiner(directory, objects, {image: torch.randn(len(rows), width)
                                                      for image, rows in objects.items()}, source="test")


def test_the_refiner_reader_checks_counts_and_pads_with_masked_slots(tmp_path):
    import json

    import refiner
    objects = {"a.png": [{"tag": "red circle", "box": [0.1, 0.2, 0.3, 0.6]}, {"tag": "star", "box": [0.5, 0.5, 1, 1]}],
               "b.png": []}
    write_tiny_refiner(tmp_path / "ok", objects)
    reader = refiner.Refiner(tmp_path / "ok")
    assert (reader.max_objects, reader.object_width) == (2, 12)
    features, present = reader.mqformer_input("a.png", slots=3)
    assert present.tolist() == [True, True, False] and torch.equal(features[2], torch.zeros(12))
    torch.testing.assert_close(features[0, 8:], torch.tensor([0.2, 0.4, 0.2, 0.4]))  # cx, cy, w, h
    _, none = reader.mqformer_input("b.png")
    assert not none.any()
    assert reader.spatial_text("a.png")[0] == "<br><T>red circle</T><Bbox>(0.10, 0.20), (0.30, 0.60)</Box></br>"
    with pytest.raises(refiner.DataError, match="no entry for image c.png"):
        reader.objects("c.png")
    # A file whose boxes and features disagree in count is refused, naming the image.
    write_tiny_refiner(tmp_path / "bad", objects)
    values = json.loads((tmp_path / "bad" / "refiner.json").read_text())
    values["images"]["a.png"].append({"tag": "square", "box": [0, 0, 0.1, 0.1]})
    (tmp_path / "bad" / "refiner.json").write_text(json.dumps(values))
    with pytest.raises(refiner.DataError, match=r"image a.png has 3 boxes but features of shape \(2, 8\)"):
        refiner.Refiner(tmp_path / "bad")


@pytest.fixture(scope="module")
def world_and_tower(tmp_path_factory):
    import shapes
    from vision import VisionTransformer
    world = shapes.build_world(tmp_path_factory.mktemp("world"), seed=0, num_train_images=10, num_eval_images=4)
    torch.manual_seed(0)
    tower_dir = tmp_path_factory.mktemp("tower")
    from checkpoints import CLIP_LAYOUT, state_to_theirs, write_checkpoint
    tower = VisionTransformer(VisionConfig(**dict(VISION, image_size=32)))
    write_checkpoint(tower_dir, {"model_type": "clip_vision_model", **tower.config.to_dict()},
                     state_to_theirs({f"vision_model.{k}": v for k, v in tower.state_dict().items()}, CLIP_LAYOUT))
    return world, tower_dir


def test_the_oracle_refiner_pools_the_tower_inside_the_true_boxes(world_and_tower, tmp_path):
    import json

    import refiner
    from data import load_image
    from vision import VisionTransformer, box_in_view, pool_regions, preprocess_image
    world, tower_dir = world_and_tower
    reader = refiner.Refiner(refiner.write_oracle_refiner(world, tower_dir, tmp_path / "oracle", batch_size=4))
    tags = json.loads((world / "tags.json").read_text())
    assert set(reader.images) == set(tags)
    name = sorted(tags)[3]
    image = load_image(str(world / "images" / name))
    boxes = [box_in_view(entry["box"], image.size, True) for entry in tags[name]["objects"]]
    assert [row["tag"] for row in reader.objects(name)] == [entry["name"] for entry in tags[name]["objects"]]
    tower = VisionTransformer.from_pretrained(tower_dir).eval()
    with torch.no_grad():
        hidden = tower(preprocess_image(image, 32, True)[None])[-1]
        expected = pool_regions(hidden, torch.tensor(boxes), torch.zeros(len(boxes), dtype=torch.long))
    features, present = reader.mqformer_input(name)
    torch.testing.assert_close(features[:len(boxes), :32], expected, atol=1e-4, rtol=1e-4)
    assert int(present.sum()) == len(boxes)


def test_grounding_dino_dumps_become_a_refiner_in_the_towers_frame(world_and_tower, tmp_path):
    import safetensors.torch

    import refiner
    from data import load_image
    world, _ = world_and_tower
    name = next(path.name for path in sorted((world / "images").iterdir())
                if load_image(str(path)).size[0] != load_image(str(path)).size[1])
    width, height = load_image(str(world / "images" / name)).size
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    boxes = torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.25, 0.25, 0.5, 0.5]])  # cx, cy, w, h of the original image
    safetensors.torch.save_file({"hidden_states": torch.randn(2, 6), "boxes": boxes}, dumps / f"{name}.safetensors",
                                metadata={"tags": '["background", "red circle"]'})
    reader = refiner.Refiner(refiner.import_grounding_dino(dumps, world / "images", tmp_path / "dino"))
    whole, quarter = (row["box"] for row in reader.objects(name))
    side = max(width, height)  # the padded square: the image's long side
    assert whole[2] - whole[0] == pytest.approx(width / side, abs=1e-3)
    assert whole[3] - whole[1] == pytest.approx(height / side, abs=1e-3)
    assert quarter[2] - quarter[0] == pytest.approx(width / side / 2, abs=1e-3)
    assert [row["tag"] for row in reader.objects(name)] == ["background", "red circle"]
    safetensors.torch.save_file({"hidden_states": torch.randn(3, 6), "boxes": boxes}, dumps / f"{name}.safetensors",
                                metadata={"tags": '["a", "b"]'})
    with pytest.raises(refiner.DataError, match="3 states, 2 boxes and 2 tags"):
        refiner.import_grounding_dino(dumps, world / "images", tmp_path / "dino2")


def test_the_pretraining_text_is_spatial_then_caption_and_loses_whole_objects(world_and_tower, tmp_path):
    import json

    import conversation
    import data
    import refiner
    world, tower_dir = world_and_tower
    reader = refiner.Refiner(refiner.write_oracle_refiner(world, tower_dir, tmp_path / "oracle"))
    tokenizer = conversation.with_lyrics_tokens(data.load_qformer_tokenizer(str(world / "qformer_tokenizer.json")))
    records = json.loads((world / "train" / "pretrain.json").read_text())
    records.append({**records[0], "id": "x", "image": "not-in-the-refiner.png"})
    (world / "images" / "not-in-the-refiner.png").write_bytes((world / "images" / records[0]["image"]).read_bytes())
    (tmp_path / "pairs.json").write_text(json.dumps(records))
    dataset = refiner.LyricsCaptionDataset(str(tmp_path / "pairs.json"), str(world / "images"), tokenizer, 32, reader,
                                           pad_to_square=True, max_text_len=256)
    assert len(dataset) == len(records) - 1 and "not-in-the-refiner.png" in dataset.problems.summary()
    item = dataset[0]
    tokens = [tokenizer.id_to_token(i) for i in item["input_ids"].tolist()]
    objects = reader.objects(records[0]["image"])
    assert tokens[0] == "[BOS]" and tokens.count("<br>") == len(objects) and tokens[-1] == "[SEP]"
    caption_start = tokens.index("[CLS]")
    assert item["text_segments"].tolist() == [SPATIAL] * caption_start + [CAPTION] * (len(tokens) - caption_start)
    spans = item["object_spans"].tolist()
    assert spans[0] == -1 and set(spans[1:caption_start]) == set(range(len(objects)))
    assert all(tokens[i] == "<br>" for i in range(1, caption_start) if spans[i] != spans[i - 1])
    short = refiner.LyricsCaptionDataset(str(tmp_path / "pairs.json"), str(world / "images"), tokenizer, 32, reader,
                                         pad_to_square=True, max_text_len=60)
    cut = [tokenizer.id_to_token(i) for i in short[0]["input_ids"].tolist()]
    assert len(cut) <= 60 and cut.count("<br>") == cut.count("</br>") < len(objects) and cut[-1] == "[SEP]"
    batch = data.collate([dataset[0], dataset[1]], 0)
    assert batch["text_segments"].shape == batch["input_ids"].shape == batch["object_spans"].shape
    assert batch["object_features"].shape == (2, reader.max_objects, reader.object_width)


def test_itc_itm_and_icg_are_their_equations_on_a_toy_batch():
    """ITC (eq. 1), ICG (eq. 3) and ITM (eq. 2) recomputed from one pass under each hand-drawn
    mask: ITC is BLIP-2's loss of the visual queries against [CLS] averaged with the grounding
    queries' against [BOS]; ICG predicts each caption token from the one before it, [DEC] in
    [CLS]'s place, and never from a spatial position; ITM is the two heads' mean loss. (MSP:
    test_msp_masks_whole_objects_and_restores_them.)"""
    from pretraining import image_text_contrastive_loss
    model = tiny_lyrics(msp_probability=0.0)
    batch = lyrics_batch()
    losses = losses_of(model, batch)
    segments = torch.cat([torch.tensor([[VISUAL] * 3 + [GROUNDING] * 2] * 3), batch["text_segments"]], 1)
    padding = torch.cat([torch.ones(3, 5, dtype=torch.long), batch["attention_mask"]], 1)

    def states(objective: str, ids: torch.Tensor) -> torch.Tensor:
        return model.qformer(model.query_tokens.expand(3, -1, -1), ids,
                             attn_mask=lyrics_attention_mask(objective, segments, padding),
                             image_embeds=model.image_embeds(batch["pixel_values"]), num_grounding_queries=2,
                             object_features=batch["object_features"], object_mask=batch["object_mask"])

    with torch.no_grad():
        itc_states = states("itc", batch["input_ids"])
        queries = torch.nn.functional.normalize(model.vision_projection(itc_states[:, :5]), dim=-1)
        cls_position = torch.tensor([5, 5, 3])  # where each row's caption starts ([CLS])
        caption = torch.nn.functional.normalize(model.text_projection(itc_states[torch.arange(3), 5 + cls_position]), dim=-1)
        spatial = torch.nn.functional.normalize(model.text_projection(itc_states[:, 5]), dim=-1)
        expected_itc = (image_text_contrastive_loss(queries[:, :3], caption, model.temperature)[0]
                        + image_text_contrastive_loss(queries[:, 3:], spatial, model.temperature)[0]) / 2
        decoder_ids = batch["input_ids"].clone()
        decoder_ids[torch.arange(3), cls_position] = 57
        logits = model.itg_head(states("icg", decoder_ids)[:, 5:], model.qformer.word_embeddings.weight)
        pairs = [(row, position) for row in range(3) for position in range(int(cls_position[row]), 8)
                 if batch["attention_mask"][row, position + 1]]
        expected_icg = torch.nn.functional.cross_entropy(
            torch.stack([logits[row, position] for row, position in pairs]),
            torch.stack([batch["input_ids"][row, position + 1] for row, position in pairs]), label_smoothing=0.1)
    assert len(pairs) == 3 + 3 + 3  # rows 0, 1: [CLS] w w -> w w [SEP]; row 2: [CLS] w w -> w w [SEP]
    assert losses["itc"] == pytest.approx(expected_itc.item(), rel=1e-5)
    assert losses["icg"] == pytest.approx(expected_icg.item(), rel=1e-5)

    # ITM (eq. 2): the same hard negatives (the same draws from the same similarities), the rows
    # [own image + own text, negative image + own text, own image + negative text] under the
    # regionalized mask; the visual head's loss on the visual queries, the grounding one's on theirs.
    from pretraining import sample_hard_negatives
    with torch.no_grad():
        _, visual_to_caption, caption_to_visual = image_text_contrastive_loss(queries[:, :3], caption, model.temperature)
        _, grounding_to_spatial, spatial_to_grounding = image_text_contrastive_loss(queries[:, 3:], spatial,
                                                                                    model.temperature)
        torch.manual_seed(0)
        negative_images = sample_hard_negatives(caption_to_visual + spatial_to_grounding)
        negative_texts = sample_hard_negatives(visual_to_caption + grounding_to_spatial)
        own, image_rows = torch.arange(3), torch.cat([torch.arange(3), negative_images, torch.arange(3)])
        text_rows = torch.cat([own, own, negative_texts])
        match_segments = torch.cat([segments[:1, :5].expand(9, 5), batch["text_segments"][text_rows]], 1)
        match_padding = torch.cat([torch.ones(9, 5, dtype=torch.long), batch["attention_mask"][text_rows]], 1)
        match = model.qformer(model.query_tokens.expand(9, -1, -1), batch["input_ids"][text_rows],
                              attn_mask=lyrics_attention_mask("itm", match_segments, match_padding),
                              image_embeds=model.image_embeds(batch["pixel_values"])[image_rows],
                              num_grounding_queries=2, object_features=batch["object_features"][image_rows],
                              object_mask=batch["object_mask"][image_rows])
        labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0])
        expected_itm = (torch.nn.functional.cross_entropy(model.itm_head(match[:, :3]).mean(1), labels)
                        + torch.nn.functional.cross_entropy(model.itm_head(match[:, 3:5]).mean(1), labels)) / 2
    assert losses["itm"] == pytest.approx(expected_itm.item(), rel=1e-5)


def test_the_spatial_prompt_puts_the_objects_before_the_first_question(world_and_tower, tmp_path):
    import json

    import conversation
    import data
    import eval as evaluation
    import refiner
    world, tower_dir = world_and_tower
    reader = refiner.Refiner(refiner.write_oracle_refiner(world, tower_dir, tmp_path / "oracle"))
    tokenizer = conversation.with_lyrics_tokens(data.load_tokenizer(str(world / "tokenizer.json")))
    records = [record for record in json.loads((world / "train" / "instruct.json").read_text()) if "image" in record]
    (tmp_path / "mix.json").write_text(json.dumps(records[:4]))

    def first_item(spatial_prompt: bool) -> list[str]:
        dataset = data.InstructionDataset(str(tmp_path / "mix.json"), str(world / "images"), tokenizer, "vicuna_v1",
                                          tokenizer.token_to_id("<image>"), 4, 32, True, 512, objects=reader,
                                          spatial_prompt=spatial_prompt)
        item = dataset[0]
        assert item["object_features"].shape == (reader.max_objects, reader.object_width)
        return [tokenizer.id_to_token(i) for i in item["input_ids"].tolist()]

    plain, spatial = first_item(False), first_item(True)
    objects = reader.objects(records[0]["image"])
    assert "<br>" not in plain and spatial.count("<br>") == spatial.count("</br>") == len(objects)
    assert spatial.index("<image>") < spatial.index("<br>")  # after the image, before the question
    # Eval asks the same way, from the same refiner; a blank refiner asks the bare question.
    model = tiny_lyrics_mllm()
    model.config.spatial_prompt = True
    image = world / "images" / records[0]["image"]
    sample = evaluation.Sample("q", image, "What is there?", None)
    for blank, expected in ((False, conversation.spatial_question_prefix(reader.spatial_text(image.name))), (True, "")):
        evaluator = evaluation.Evaluator(model, tokenizer, evaluation.PROMPT_STYLES["llava15"], objects=reader,
                                         blank_objects=blank, qformer_tokenizer=tokenizer)
        assert evaluator.tagged([("What is there?", None)], sample) == [(expected + "What is there?", None)]
    with pytest.raises(ValueError, match="visual refiner's objects"):
        evaluation.Evaluator(model, tokenizer, evaluation.PROMPT_STYLES["llava15"], qformer_tokenizer=tokenizer)
