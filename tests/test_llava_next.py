"""High resolution: LLaVA-NeXT's AnyRes and LLaVA-1.5-HD (connectors.HighResolution,
vision.high_resolution_tiles, MLLM with image_sizes). Parity with transformers'
LlavaNextForConditionalGeneration (LLaMA with GQA, CLIP, five grid pinpoints) on a left-padded
batch of two images of opposite aspect ratios and a text-only sample, and with its image
processor; the checkpoint both ways; LLaVA-1.5-HD's merge; the errors of bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from PIL import Image
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from conftest import IMAGE_TOKEN, PAD_TOKEN, randomize, tiny_llama_config
from connectors import HighResolution
from model import MLLM, MLLMConfig, TextConfig
from vision import VisionConfig, high_resolution_tiles, select_best_resolution

TILE = 56  # 4 x 4 patches of 14 px per tile
PINPOINTS = [[56, 112], [112, 56], [112, 112], [56, 168], [168, 56]]  # 1x2, 2x1, 2x2, 1x3, 3x1 tiles
# (height, width): a wide image in 1 x 3 tiles whose map loses a row at top and bottom (42 tokens),
# a tall one in 2 x 1 tiles that loses a column at each side (40 tokens).
IMAGE_SIZES = [(30, 150), (100, 30)]


def tiny_hf_llava_next() -> transformers.LlavaNextForConditionalGeneration:
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=TILE, patch_size=14)
    config = transformers.LlavaNextConfig(vision_config=vision, text_config=tiny_llama_config(),
                                          image_token_index=IMAGE_TOKEN, pad_token_id=PAD_TOKEN,
                                          vision_feature_layer=-2, image_grid_pinpoints=PINPOINTS)
    model = randomize(transformers.LlavaNextForConditionalGeneration(config), seed=3)
    with torch.no_grad():  # sharper logits, and never an image or pad token from greedy decoding
        model.lm_head.weight.mul_(10)
        model.lm_head.weight[IMAGE_TOKEN:PAD_TOKEN + 1] = 0
    return model


def hf_processor() -> LlavaNextImageProcessorPil:
    return LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                      image_grid_pinpoints=PINPOINTS)


def random_images() -> list[Image.Image]:
    generator = np.random.default_rng(0)
    return [Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8))
            for height, width in IMAGE_SIZES]


@pytest.fixture(scope="module")
def next_pair(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llava_next")
    reference = tiny_hf_llava_next().eval()
    reference.save_pretrained(directory)
    return directory, reference, MLLM.from_pretrained(str(directory)).eval()


def left_padded_batch(counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Image sample, text-only sample, image sample; left padded."""
    rows = [[1, 5, *[IMAGE_TOKEN] * counts[0], 7, 9], [1, 17, 19, 23, 29], [1, 3, *[IMAGE_TOKEN] * counts[1], 5, 6]]
    width = max(map(len, rows))
    input_ids = torch.tensor([[PAD_TOKEN] * (width - len(row)) + row for row in rows])
    return input_ids, (input_ids != PAD_TOKEN).long()


def test_preprocessing_equals_llava_next_image_processor():
    images = random_images() + [Image.fromarray(np.full((60, 60, 3), 200, dtype=np.uint8))]
    expected = hf_processor()(images, return_tensors="pt")
    geometry = HighResolution(tuple(map(tuple, PINPOINTS)), TILE, TILE // 14)
    for index, image in enumerate(images):
        ours = high_resolution_tiles(image, TILE, PINPOINTS)
        assert ours.shape[0] == geometry.num_tiles((image.height, image.width))
        assert torch.equal(ours, expected["pixel_values"][index, :len(ours)])
        assert not expected["pixel_values"][index, len(ours):].any()  # the rest is the batch's zero padding
        assert tuple(expected["image_sizes"][index].tolist()) == (image.height, image.width)


@pytest.mark.parametrize("height,width", [(30, 150), (100, 30), (57, 57), (200, 90), (13, 400), (333, 100)])
def test_token_count_equals_the_processor_and_the_packed_features(next_pair, height, width):
    _, reference, ours = next_pair
    processor = object.__new__(transformers.LlavaNextProcessor)  # its token count needs no tokenizer
    processor.image_processor, processor.patch_size, processor.num_additional_image_tokens = hf_processor(), 14, 0
    expected = processor._get_number_of_features(height, width, TILE, TILE)
    assert ours.high_resolution.num_image_tokens((height, width)) == expected
    tiles = ours.high_resolution.num_tiles((height, width))
    features = torch.randn(tiles, 16, 32)
    packed, lengths = reference.model.pack_image_features([features], torch.tensor([[height, width]]), "default",
                                                          image_newline=reference.model.image_newline)
    assert int(lengths[0]) == expected
    assert torch.equal(ours.high_resolution.pack(features, (height, width), reference.model.image_newline), packed[0])


def test_logits_and_greedy_tokens_equal_transformers(next_pair):
    _, reference, ours = next_pair
    inputs = hf_processor()(random_images(), return_tensors="pt")
    counts = [ours.high_resolution.num_image_tokens(size) for size in IMAGE_SIZES]
    assert counts == [42, 40]
    input_ids, mask = left_padded_batch(counts)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)  # ours counts real tokens; give transformers the same
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=mask, pixel_values=inputs["pixel_values"],
                             image_sizes=inputs["image_sizes"], position_ids=position_ids).logits
        actual = ours(input_ids, inputs["pixel_values"], mask, image_sizes=inputs["image_sizes"])
    assert torch.allclose(actual[mask.bool()], expected[mask.bool()], atol=1e-5)
    with torch.no_grad():  # a text-only batch needs neither pixel_values nor image_sizes
        text_only = ours(input_ids[1:2], attention_mask=mask[1:2])
    assert torch.allclose(text_only[0, mask[1].bool()], actual[1, mask[1].bool()], atol=1e-5)
    generated = reference.generate(input_ids=input_ids, attention_mask=mask, pixel_values=inputs["pixel_values"],
                                   image_sizes=inputs["image_sizes"], max_new_tokens=8, do_sample=False,
                                   pad_token_id=PAD_TOKEN)[:, input_ids.shape[1]:]
    ours_generated = ours.generate(input_ids, inputs["pixel_values"], mask, image_sizes=inputs["image_sizes"],
                                   max_new_tokens=8)
    assert torch.equal(ours_generated, generated)


def test_save_here_load_in_transformers(next_pair, tmp_path):
    _, _, ours = next_pair
    ours.save_pretrained(str(tmp_path))
    keys = safetensors.torch.load_file(tmp_path / "model.safetensors").keys()
    assert "image_newline" in keys and any(key.startswith("vision_tower.vision_model.") for key in keys)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llava_next"
    reloaded = transformers.LlavaNextForConditionalGeneration.from_pretrained(tmp_path).eval()
    inputs = hf_processor()(random_images(), return_tensors="pt")
    input_ids, mask = left_padded_batch([42, 40])
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = ours(input_ids, inputs["pixel_values"], mask, image_sizes=inputs["image_sizes"])
        theirs = reloaded(input_ids=input_ids, attention_mask=mask, pixel_values=inputs["pixel_values"],
                          image_sizes=inputs["image_sizes"], position_ids=position_ids).logits
        again = MLLM.from_pretrained(str(tmp_path))(input_ids, inputs["pixel_values"], mask,
                                                    image_sizes=inputs["image_sizes"])
    assert torch.allclose(theirs[mask.bool()], expected[mask.bool()], atol=1e-5)
    assert torch.equal(again, expected)


def test_in_memory_layout_loads(next_pair, tmp_path):
    directory, reference, _ = next_pair
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    safetensors.torch.save_file(reference.state_dict(), tmp_path / "model.safetensors")
    ours = MLLM.from_pretrained(str(tmp_path))
    assert torch.equal(ours.image_newline, reference.model.image_newline)


def test_llava15_hd_merges_the_map_without_unpadding_or_newlines():
    """LLaVA-1.5-HD (dissertation, Figure 4.2): base tile first, then the tiles' features as one
    map of the whole padded canvas, row by row."""
    geometry = HighResolution(tuple(map(tuple, PINPOINTS)), TILE, 4, unpad=False)
    rows, columns = geometry.grid((30, 150))
    assert (rows, columns) == (1, 3) and geometry.num_image_tokens((30, 150)) == 16 + 4 * 12
    tiles = torch.arange(4 * 16, dtype=torch.float32).view(4, 16, 1)  # tile t, patch p -> 16 t + p
    packed = geometry.pack(tiles, (30, 150), None).flatten()
    assert packed[:16].tolist() == list(range(16))  # the base tile
    first_row = [16 * tile + column for tile in (1, 2, 3) for column in range(4)]  # row 0 of each tile, left to right
    assert packed[16:28].tolist() == first_row
    assert packed[28:40].tolist() == [value + 4 for value in first_row]
    config = MLLMConfig(vision_config=VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                   num_attention_heads=2, image_size=TILE, patch_size=14),
                        text_config=TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1),
                        image_token_index=62, pad_token_id=63, image_aspect_ratio="anyres",
                        image_grid_pinpoints=PINPOINTS, mm_patch_merge_type="spatial")
    model = MLLM(config)
    assert not hasattr(model, "image_newline")
    pixel_values = high_resolution_tiles(random_images()[0], TILE, PINPOINTS)[None]
    input_ids = torch.tensor([[1, *[62] * 64, 5]])
    assert model(input_ids, pixel_values, image_sizes=torch.tensor([[30, 150]])).shape == (1, 66, 64)


def test_best_resolution_prefers_kept_pixels_then_less_waste():
    assert select_best_resolution((30, 150), PINPOINTS) == (56, 168)
    assert select_best_resolution((100, 30), PINPOINTS) == (112, 56)
    assert select_best_resolution((200, 200), PINPOINTS) == (112, 112)
    assert select_best_resolution((10, 10), PINPOINTS) == (56, 112)  # all keep 100 pixels: the least waste


def test_bad_input_names_the_sample_and_both_counts(next_pair):
    _, _, ours = next_pair
    inputs = hf_processor()(random_images(), return_tensors="pt")
    pixel_values, image_sizes = inputs["pixel_values"], inputs["image_sizes"]
    input_ids, mask = left_padded_batch([42, 40])
    with pytest.raises(ValueError, match="sample 2: 40 image tokens .* fill 56"):
        ours(input_ids, pixel_values, mask, image_sizes=torch.tensor([[30, 150], [100, 45]]))
    with pytest.raises(ValueError, match=r"sample 2, image 1: image_sizes 100 x 30 .* yields 3 tiles, but pixel_values holds 4"):
        wrong_tiles = pixel_values.clone()
        wrong_tiles[1, 3] = 1.0  # a fourth tile where its size asks for three
        ours(input_ids, wrong_tiles, mask, image_sizes=image_sizes)
    with pytest.raises(ValueError, match="image_sizes"):
        ours(input_ids, pixel_values, mask)
    with pytest.raises(ValueError, match="not .*multiples of the tower's 56 px"):
        MLLMConfig(vision_config=ours.config.vision_config, text_config=ours.config.text_config,
                   image_aspect_ratio="anyres", image_grid_pinpoints=[[56, 100]])


def test_dataset_expands_each_image_to_its_own_tokens_and_collate_pads_tiles(tmp_path):
    """The data path: "<image>" becomes what each image's size yields, `lengths` count it (the
    modality-length sampler's unit), and a batch of different grids pads its tiles with zeros."""
    from data import InstructionDataset, collate, load_tokenizer
    from shapes import build_world
    world = build_world(tmp_path / "world", num_train_images=12, num_eval_images=2)
    tokenizer = load_tokenizer(str(world / "tokenizer.json"))
    image_token = tokenizer.token_to_id("<image>")
    geometry = HighResolution(((32, 64), (64, 32), (64, 64), (32, 96), (96, 32)), 32, 4)
    dataset = InstructionDataset(str(world / "train" / "instruct.json"), str(world / "images"), tokenizer,
                                 "vicuna_v1", image_token, 16, 32, False, 512, high_resolution=geometry)
    items = [dataset[index] for index in range(len(dataset)) if dataset.has_image[index]]
    sizes = {tuple(item["image_size"].tolist()) for item in items}
    assert len({geometry.num_image_tokens(size) for size in sizes}) > 1  # square and letterboxed images
    for index, item in enumerate(dataset[index] for index in range(len(dataset))):
        assert len(item["input_ids"]) == dataset.lengths[index]
        if item["pixel_values"] is not None:
            size = tuple(item["image_size"].tolist())
            assert int((item["input_ids"] == image_token).sum()) == geometry.num_image_tokens(size)
            assert item["pixel_values"].shape == (geometry.num_tiles(size), 3, 32, 32)
    batch = collate(items, pad_token_id=tokenizer.token_to_id("<pad>"))
    first = next(index for index in range(len(dataset)) if dataset.has_image[index])
    image_path = world / "images" / dataset.records[first]["image"]
    Image.open(image_path).resize((40, 90)).save(image_path)  # replaced after the dataset read its size
    assert "not the size its header gave" in dataset[first]["problem"][1]
    assert batch["pixel_values"].shape == (len(items), max(len(item["pixel_values"]) for item in items), 3, 32, 32)
    for row, item in enumerate(items):
        assert torch.equal(batch["image_sizes"][row], item["image_size"])
        assert not batch["pixel_values"][row, len(item["pixel_values"]):].any()


def test_original_llava_next_layout_with_clip_checkpoint(next_pair, tmp_path):
    """liuhaotian/llava-v1.6-*: a LlamaForCausalLM whose `model.` also holds the projector and
    `model.image_newline`, the tower from its CLIP checkpoint, pinpoints as (width, height)."""
    directory, reference, _ = next_pair
    state = safetensors.torch.load_file(directory / "model.safetensors")
    renames = {"language_model.model.": "model.", "language_model.lm_head.": "lm_head.",
               "multi_modal_projector.linear_1.": "model.mm_projector.0.",
               "multi_modal_projector.linear_2.": "model.mm_projector.2.", "image_newline": "model.image_newline"}
    original = {theirs + key[len(ours):]: value for key, value in state.items()
                for ours, theirs in renames.items() if key.startswith(ours)}
    (tmp_path / "llava").mkdir()
    safetensors.torch.save_file(original, tmp_path / "llava" / "model.safetensors")
    text = json.loads((directory / "config.json").read_text())["text_config"]
    (tmp_path / "llava" / "config.json").write_text(json.dumps({
        **text, "model_type": "llava_llama", "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad",
        "image_grid_pinpoints": [[width, height] for height, width in PINPOINTS]}))
    tower = transformers.CLIPVisionModel(reference.config.vision_config)
    tower.load_state_dict(reference.model.vision_tower.state_dict())
    tower.save_pretrained(tmp_path / "clip")
    ours = MLLM.from_pretrained(str(tmp_path / "llava"), vision_tower_path=str(tmp_path / "clip")).eval()
    assert ours.config.image_grid_pinpoints == PINPOINTS
    inputs = hf_processor()(random_images()[:1], return_tensors="pt")
    input_ids = torch.tensor([[1, 5, *[ours.config.image_token_index] * 42, 7]])
    with torch.no_grad():
        actual = ours(input_ids, inputs["pixel_values"], image_sizes=inputs["image_sizes"])
        expected = reference(input_ids=input_ids.masked_fill(input_ids == ours.config.image_token_index, IMAGE_TOKEN),
                             pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]).logits
    assert torch.allclose(actual[..., :128], expected, atol=1e-5)


def test_llava_next_config_loads_with_the_recipe_shapes():
    """configs/llava_next.py: stage 1 as LLaVA-1.5's, stage 2 AnyRes over the paper's grids with the
    tower trainable at a tenth of the rate; its pinpoints are whole 336 px tiles."""
    from pathlib import Path

    import train
    config, (pretrain, finetune) = train.load_config(str(Path(__file__).parents[1] / "configs" / "llava_next.py"), [])
    assert pretrain.trainable == [r"^multi_modal_projector\."] and finetune.image_aspect_ratio == "anyres"
    (tower_group,) = finetune.param_groups
    assert tower_group["pattern"] == r"^vision_tower\." and tower_group["learning_rate"] == pytest.approx(2e-6)
    assert finetune.learning_rate == 2e-5 and "^vision_tower\\." in finetune.trainable
    grids = {(height // 336, width // 336) for height, width in config.model["image_grid_pinpoints"]}
    assert grids == {(2, 2), (1, 2), (1, 3), (1, 4), (2, 1), (3, 1), (4, 1)}
    tower = VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         image_size=336, patch_size=14)
    MLLMConfig(vision_config=tower, **{**config.model, "image_aspect_ratio": "anyres"})  # no error
