"""probe_vision.py: the linear probe separates what is linearly there from what is not, and the
object features line up with the scenes' objects."""
import torch

import probe_vision
import shapes
from vision import VisionConfig, VisionTransformer


def test_linear_probe_reads_encoded_labels_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (600,), generator=generator)
    noise = torch.randn(600, 16, generator=generator)
    encoded = torch.cat([torch.nn.functional.one_hot(labels, 5).float(), noise], dim=1)
    accuracy, majority = probe_vision.linear_probe_accuracy(encoded, labels)
    assert accuracy > 0.95 and majority < 0.35
    accuracy, _ = probe_vision.linear_probe_accuracy(noise, labels)
    assert accuracy < 0.4


def test_object_features_follow_the_scenes_objects():
    tower = VisionTransformer(VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8))
    scenes = [shapes.sample_scene(0, "train", index, index + 1, 48) for index in range(3)]
    features, labels = probe_vision.object_features(tower, scenes, layer=-2, batch_size=2)
    objects = [obj for scene in scenes for obj in scene.objects]
    assert features.shape == (len(objects), 32) and torch.isfinite(features).all()
    assert [shapes.SHAPES[i] for i in labels["shape"]] == [obj.shape for obj in objects]
    assert [shapes.COLORS[i] for i in labels["color"]] == [obj.color for obj in objects]
