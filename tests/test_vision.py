"""vision.py and connectors.py against transformers' CLIP, on tiny random models (fp32, CPU)."""
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from checkpoints import (CheckpointError, clip_tower_rules, load_safetensors, state_to_ours, state_to_theirs,
                         write_config_json)
from connectors import build_connector
from vision import CLIPConfig, CLIPModel, CLIPTextConfig, VisionConfig, VisionTransformer, contrastive_loss

VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
              image_size=30, patch_size=6)
TEXT = dict(vocab_size=99, hidden_size=24, intermediate_size=29, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=12, bos_token_id=97, eos_token_id=98, pad_token_id=0)


def randomize(model: torch.nn.Module) -> None:
    """Random values everywhere (LayerNorm weights and biases too), so no parameter can be
    silently ignored or misplaced without changing the outputs."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)


def text_batch(eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three right-padded texts of lengths 12, 7 and 4, each ending in EOS; padding is id 0."""
    torch.manual_seed(2)
    input_ids = torch.randint(3, 97, (3, 12))
    attention_mask = torch.ones(3, 12, dtype=torch.long)
    for row, length in enumerate((12, 7, 4)):
        input_ids[row, length - 1] = eos_token_id
        input_ids[row, length:] = 0
        attention_mask[row, length:] = 0
    return input_ids, attention_mask


def hf_clip(eos_token_id: int = 98) -> transformers.CLIPModel:
    config = transformers.CLIPConfig(text_config={**TEXT, "eos_token_id": eos_token_id}, vision_config=VISION,
                                     projection_dim=16)
    model = transformers.CLIPModel(config).eval()
    randomize(model)
    return model


def test_vision_hidden_states_match_transformers(tmp_path):
    reference = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)).eval()
    randomize(reference)
    reference.save_pretrained(tmp_path)
    ours = VisionTransformer.from_pretrained(tmp_path).eval()
    pixel_values = torch.randn(2, 3, 30, 30)
    with torch.no_grad():
        expected = reference(pixel_values, output_hidden_states=True)
        hidden_states = ours(pixel_values)
    assert len(hidden_states) == VISION["num_hidden_layers"] + 1
    for layer, (mine, theirs) in enumerate(zip(hidden_states, expected.hidden_states)):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5, msg=f"layer {layer}")
    torch.testing.assert_close(ours.pool(hidden_states[-1]), expected.pooler_output, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="36x36"):
        ours(torch.randn(1, 3, 36, 36))


def test_truncated_vision_tower_gives_the_same_states():
    """num_layers stops early (LLaVA-1.5 reads layer -2): the states it returns are the full run's."""
    torch.manual_seed(0)
    tower = VisionTransformer(VisionConfig(**VISION)).eval()
    pixel_values = torch.randn(2, 3, 30, 30)
    with torch.no_grad():
        full, truncated = tower(pixel_values), tower(pixel_values, num_layers=2)
    assert len(truncated) == 3
    for mine, theirs in zip(truncated, full):
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0)


def test_vision_loads_prefixed_keys_and_ignores_position_ids(tmp_path):
    """Hub CLIP checkpoints keep the vision keys under `vision_model.` and may carry the
    weightless position_ids buffer of older transformers."""
    torch.manual_seed(0)
    source = VisionTransformer(VisionConfig(**VISION))
    write_config_json(CLIPConfig(vision_config=VisionConfig(**VISION)).to_dict(), tmp_path)
    state = {f"vision_model.{key}": value for key, value in state_to_theirs(source.state_dict(), clip_tower_rules("", "")).items()}
    state["vision_model.embeddings.position_ids"] = torch.arange(26)[None]
    save_file(state, tmp_path / "model.safetensors")
    loaded = VisionTransformer.from_pretrained(tmp_path)
    pixel_values = torch.randn(1, 3, 30, 30)
    torch.testing.assert_close(loaded(pixel_values)[-1], source(pixel_values)[-1], atol=0, rtol=0)


def test_position_interpolation_matches_transformers():
    reference = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)).eval()
    randomize(reference)
    ours = VisionTransformer(VisionConfig(**VISION)).eval()
    ours.load_state_dict(state_to_ours(reference.state_dict(), clip_tower_rules("", "")))
    original = ours.embeddings.position_embedding.weight.clone()
    ours.interpolate_position_embedding(30)
    torch.testing.assert_close(ours.embeddings.position_embedding.weight, original, atol=1e-6, rtol=0)

    ours.interpolate_position_embedding(42)
    assert ours.embeddings.position_embedding.weight.shape == (1 + 7 * 7, 32)
    assert ours.config.image_size == 42 and ours.config.num_patches == 49
    torch.testing.assert_close(ours.embeddings.position_embedding.weight[0], original[0], atol=0, rtol=0)
    pixel_values = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        expected = reference(pixel_values, interpolate_pos_encoding=True, output_hidden_states=True)
        torch.testing.assert_close(ours(pixel_values)[-1], expected.hidden_states[-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("eos_token_id", [98, 2], ids=["first-eos", "legacy-argmax"])
def test_clip_model_loads_transformers_checkpoint(tmp_path, eos_token_id):
    reference = hf_clip(eos_token_id)
    reference.save_pretrained(tmp_path)
    ours = CLIPModel.from_pretrained(tmp_path).eval()
    pixel_values = torch.randn(3, 3, 30, 30)
    input_ids, attention_mask = text_batch(eos_token_id)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                             return_loss=True)
        logits_per_image, loss = ours(pixel_values, input_ids, attention_mask)
        text_embeds = ours.encode_text(input_ids, attention_mask)
        expected_text_embeds = reference.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    torch.testing.assert_close(logits_per_image, expected.logits_per_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, expected.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text_embeds, expected_text_embeds, atol=1e-5, rtol=1e-5)


def test_transformers_loads_our_clip_checkpoint(tmp_path):
    torch.manual_seed(0)
    ours = CLIPModel(CLIPConfig(vision_config=VisionConfig(**VISION), text_config=CLIPTextConfig(**TEXT),
                                projection_dim=16)).eval()
    randomize(ours)
    ours.save_pretrained(tmp_path)
    reference, info = transformers.CLIPModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    pixel_values = torch.randn(3, 3, 30, 30)
    input_ids, attention_mask = text_batch(98)
    with torch.no_grad():
        expected = reference.eval()(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                    return_loss=True)
        logits_per_image, loss = ours(pixel_values, input_ids, attention_mask)
        image_embeds = ours.encode_image(pixel_values)
    torch.testing.assert_close(logits_per_image, expected.logits_per_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, expected.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(image_embeds, reference.get_image_features(pixel_values).pooler_output,
                               atol=1e-5, rtol=1e-5)


def test_text_without_eos_is_refused():
    model = CLIPModel(CLIPConfig(vision_config=VisionConfig(**VISION), text_config=CLIPTextConfig(**TEXT)))
    input_ids, _ = text_batch(98)
    input_ids[1, 6] = 5
    with pytest.raises(ValueError, match=r"rows \[1\] hold no eos_token_id 98"):
        model.encode_text(input_ids)


def test_bad_checkpoint_names_every_bad_key(tmp_path):
    model = CLIPModel(CLIPConfig(vision_config=VisionConfig(**VISION), text_config=CLIPTextConfig(**TEXT)))
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["text_model.final_layer_norm.bias"]
    state["vision_model.encoder.layers.9.mlp.fc1.weight"] = torch.zeros(1)
    state["visual_projection.weight"] = torch.zeros(3, 3)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as error:
        CLIPModel.from_pretrained(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message
    assert "missing keys (1)" in message and "text_model.final_layer_norm.bias" in message
    assert "unexpected keys (1)" in message and "vision_model.encoder.layers.9.mlp.fc1.weight" in message
    assert "visual_projection.weight: checkpoint (3, 3), model (512, 32)" in message


def test_sharded_checkpoint_is_read_through_its_index(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": torch.zeros(3)}, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}')
    state = load_safetensors(tmp_path)
    assert sorted(state) == ["a", "b"] and state["b"].shape == (3,)


@pytest.mark.parametrize("projector_type, parameter_names", [
    ("linear", ["linear_1.bias", "linear_1.weight"]),
    ("mlp2x_gelu", ["linear_1.bias", "linear_1.weight", "linear_2.bias", "linear_2.weight"]),
])
def test_connectors(projector_type, parameter_names):
    connector = build_connector(projector_type, VisionConfig(**VISION), 48, -2, "default")
    assert sorted(connector.state_dict()) == parameter_names
    hidden_states = [torch.randn(2, 26, 32) for _ in range(4)]
    assert connector.num_image_tokens == 25 and connector.num_vision_layers_used == 2
    assert connector(hidden_states).shape == (2, 25, 48)


def test_connector_selects_its_layer_and_the_class_token():
    """The connector reads exactly one layer: changing any other leaves its output unchanged;
    "full" keeps CLS as the first token, "default" drops it."""
    torch.manual_seed(0)
    hidden_states = [torch.randn(2, 26, 32) for _ in range(4)]
    for layer in (-1, -2, 1):
        connector = build_connector("mlp2x_gelu", VisionConfig(**VISION), 48, layer, "full")
        assert connector.num_image_tokens == 26
        before = connector(hidden_states)
        for index in range(4):
            changed = [state + (index == layer % 4) for state in hidden_states]
            assert torch.equal(connector(changed), before) == (index != layer % 4)
        default = build_connector("mlp2x_gelu", VisionConfig(**VISION), 48, layer, "default")
        default.load_state_dict(connector.state_dict())
        torch.testing.assert_close(default(hidden_states), before[:, 1:])


def test_unknown_connector_options_are_refused():
    with pytest.raises(ValueError, match="unknown projector_type 'mlp3x'"):
        build_connector("mlp3x", VisionConfig(**VISION), 48, -2, "default")
    with pytest.raises(ValueError, match="vision_feature_layer 5 does not exist in a tower of 3 layers"):
        build_connector("linear", VisionConfig(**VISION), 48, 5, "default")
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        build_connector("linear", VisionConfig(**VISION), 48, -2, "patch")


def test_contrastive_loss_follows_react_eq_2_5_and_2_6():
    torch.manual_seed(0)
    logits = torch.randn(5, 4)
    phrase_of_region = [0, 1, 1, 2, 3]  # regions 1 and 2 share a phrase: both are its positives
    positives = torch.nn.functional.one_hot(torch.tensor(phrase_of_region), 4)
    log_rows, log_columns = logits.log_softmax(1), logits.log_softmax(0)
    query_to_key = [-sum(log_rows[i, k] for k in range(4) if positives[i, k]) / positives[i].sum() for i in range(5)]
    key_to_query = [-sum(log_columns[k, j] for k in range(5) if positives[k, j]) / positives[:, j].sum()
                     for j in range(4)]
    expected = (sum(query_to_key) / 5 + sum(key_to_query) / 4) / 2
    torch.testing.assert_close(contrastive_loss(logits, positives), expected)
    square = torch.randn(4, 4)
    torch.testing.assert_close(contrastive_loss(square, torch.eye(4)), contrastive_loss(square))
    assert not torch.allclose(contrastive_loss(logits, positives), contrastive_loss(logits[:4]))


def test_region_embeddings_pool_the_patches_under_each_box():
    model = CLIPModel(CLIPConfig(vision_config=VisionConfig(**VISION), text_config=CLIPTextConfig(**TEXT),
                                 projection_dim=16))
    randomize(model)
    hidden = torch.randn(2, 1 + 25, 32)  # image_size 30, patch 6: a 5 x 5 grid
    patches = hidden[:, 1:].unflatten(1, (5, 5))
    boxes = torch.tensor([[0.2, 0.4, 0.4, 0.6],     # exactly cell (row 2, column 1)
                          [0.0, 0.0, 0.4, 0.4],     # cells rows 0-1 x columns 0-1
                          [0.61, 0.81, 0.7, 0.9]])  # smaller than a patch, no cell center inside: its center cell
    regions = model.encode_regions(hidden, boxes, torch.tensor([1, 0, 1]))

    def project(feature: torch.Tensor) -> torch.Tensor:
        return model.visual_projection(model.vision_model.post_layernorm(feature))

    torch.testing.assert_close(regions[0], project(patches[1, 2, 1]))
    torch.testing.assert_close(regions[1], project(patches[0, :2, :2].mean((0, 1))))
    torch.testing.assert_close(regions[2], project(patches[1, 4, 3]))


def test_region_loss_is_added_only_when_regions_are_given():
    model = CLIPModel(CLIPConfig(vision_config=VisionConfig(**VISION), text_config=CLIPTextConfig(**TEXT),
                                 projection_dim=16))
    input_ids, attention_mask = text_batch(98)
    pixel_values = torch.randn(3, 3, 30, 30)
    regions = {"boxes": torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.1, 0.1, 0.3, 0.9]]),
               "image_index": torch.tensor([0, 0, 2]), "phrase_ids": input_ids[1:], "phrase_mask": attention_mask[1:],
               "phrase_index": torch.tensor([0, 1, 0])}
    logits, image_loss = model(pixel_values, input_ids, attention_mask)
    _, total_loss = model(pixel_values, input_ids, attention_mask, regions=regions)
    region_logits = model.logit_scale.exp() * torch.nn.functional.normalize(
        model.encode_regions(model.vision_model(pixel_values)[-1], regions["boxes"], regions["image_index"]), dim=-1) \
        @ torch.nn.functional.normalize(model.encode_text(input_ids[1:], attention_mask[1:]), dim=-1).t()
    expected = contrastive_loss(region_logits, torch.tensor([[1, 0], [0, 1], [1, 0]]))
    torch.testing.assert_close(total_loss - image_loss, expected, atol=1e-5, rtol=1e-5)


def test_image_token_count_follows_the_towers_resolution():
    """The connector reads the tower's own config: after Lynx-style position interpolation the
    MLLM expects as many image tokens as the tower now makes."""
    from model import MLLM, MLLMConfig, TextConfig
    model = MLLM(MLLMConfig(vision_config=VisionConfig(**VISION),
                            text_config=TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=1, num_attention_heads=4),
                            image_token_index=62, pad_token_id=63))
    assert model.num_image_tokens == 25
    model.vision_tower.interpolate_position_embedding(42)
    assert model.num_image_tokens == 49 == model.image_features(torch.randn(1, 3, 42, 42)).shape[1]
