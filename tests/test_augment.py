import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclic_tf import SimCLICConfig
from simclic_tf.augment import (
    ParallelSafeSeedGenerator, RandomApply, RandomResizedCrop, build_augmentation)
from simclic_tf.images import ImageSet
from simclic_tf.training import pretrain_inputs


def random_images(n, size=32, channels=3, seed=0):
    return np.random.default_rng(seed).random((n, size, size, channels), dtype="float32")


def horizontal_ramp(n, size=33):
    """Images whose value is the column's position in [0, 1]."""
    ramp = np.linspace(0.0, 1.0, size, dtype="float32")
    return np.broadcast_to(ramp[None, None, :, None], (n, size, size, 1)).copy()


@pytest.mark.parametrize("size, channels", [(32, 3), (8, 1), (96, 3)])
def test_recipe_keeps_shape_dtype_and_range(size, channels):
    augment = build_augmentation(size, channels)
    out = augment(random_images(4, size, channels)).numpy()
    assert out.shape == (4, size, size, channels)
    assert out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_recipe_layers_follow_resolution_and_channels():
    names = lambda model: [type(layer).__name__ for layer in model.layers]
    assert names(build_augmentation(32, 3)) == [
        "RandomResizedCrop", "RandomFlip", "RandomApply", "RandomGrayscale"]
    assert names(build_augmentation(96, 3))[-1] == "RandomGaussianBlur"
    assert names(build_augmentation(32, 3, blur=True))[-1] == "RandomGaussianBlur"
    grey = build_augmentation(8, 1)
    assert names(grey) == ["RandomResizedCrop", "RandomFlip", "RandomApply"]
    jitter = grey.layers[2].layer
    assert jitter.saturation_factor is None and jitter.hue_factor is None
    assert jitter.brightness_factor and jitter.contrast_factor
    assert tuple(jitter.value_range) == (0, 1)


def test_jitter_factors_match_torchvision_ranges():
    # torchvision ColorJitter(0.4, 0.4, ...): contrast factor in [0.6, 1.4].
    jitter = build_augmentation(8, 1, seed=0).layers[2].layer
    images = np.random.default_rng(0).uniform(0.3, 0.7, (1000, 8, 8, 1)).astype("float32")
    out = jitter(images).numpy()
    brightness = (out.mean(axis=(1, 2, 3)) - images.mean(axis=(1, 2, 3)))
    contrast = out.std(axis=(1, 2, 3)) / images.std(axis=(1, 2, 3))
    assert brightness.min() < -0.15 and brightness.max() > 0.15
    assert np.abs(brightness).max() <= 0.2 + 1e-5
    assert contrast.min() < 0.65 and contrast.max() > 1.35
    assert 0.6 - 1e-3 <= contrast.min() and contrast.max() <= 1.4 + 1e-3


def test_recipe_output_size_differs_from_input():
    out = build_augmentation((16, 24), 3)(random_images(2, 40))
    assert out.shape == (2, 16, 24, 3)


def test_each_image_and_each_call_gets_its_own_draw():
    augment = build_augmentation(32, 3)
    same = np.repeat(random_images(1), 16, axis=0)  # one image, 16 times
    first, second = augment(same).numpy(), augment(same).numpy()
    per_image = [np.abs(first[i] - first[0]).mean() for i in range(1, 16)]
    assert min(per_image) > 1e-3
    assert np.abs(first - second).mean(axis=(1, 2, 3)).min() > 1e-3


def test_crop_of_whole_image_is_identity():
    images = random_images(3, 16)
    crop = RandomResizedCrop(16, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_allclose(crop(images).numpy(), images, atol=1e-5)


def test_crop_covers_the_asked_area_and_differs_per_image():
    # Area 1/4 at aspect 1 is half of each side: the ramp spans 0.5 in every crop.
    crop = RandomResizedCrop(9, 9, scale=(0.25, 0.25), ratio=(1.0, 1.0), seed=3)
    out = crop(horizontal_ramp(32)).numpy()[..., 0]
    np.testing.assert_allclose(out[:, :, -1] - out[:, :, 0], 0.5, atol=1e-5)
    assert len(np.unique(out[:, 0, 0].round(4))) > 20  # left edges differ


def test_crop_aspect_ratio_is_clipped_to_the_image():
    crop = RandomResizedCrop(9, 9, scale=(1.0, 1.0), ratio=(2.0, 2.0))
    out = crop(horizontal_ramp(8)).numpy()[..., 0]
    # Width would be sqrt(2) of the image: clipped to the full width.
    np.testing.assert_allclose(out[:, :, -1] - out[:, :, 0], 1.0, atol=1e-5)


def test_crop_min_scale_knob_sets_the_pretraining_crop():
    ramps = horizontal_ramp(64)
    train_set = ImageSet((ramps * 255).astype("uint8"), None, [])
    spans = {}
    for min_scale in (0.2, 1.0):
        config = SimCLICConfig(crop_min_scale=min_scale, batch_size=8)
        augmentation, _ = pretrain_inputs(config, train_set)
        out = augmentation.layers[0](ramps).numpy()[..., 0]
        spans[min_scale] = out[:, :, -1] - out[:, :, 0]
    # Whole area: at most the 3/4 aspect ratio takes sqrt(3/4) of the width.
    assert spans[1.0].min() >= np.sqrt(3 / 4) - 1e-3
    assert spans[0.2].min() < 0.5


def test_random_apply_probability():
    images = np.ones((2000, 2, 2, 1), "float32")
    halve = keras.layers.Rescaling(0.5)
    np.testing.assert_array_equal(RandomApply(halve, p=0.0)(images), images)
    np.testing.assert_array_equal(RandomApply(halve, p=1.0)(images), images / 2)
    out = RandomApply(halve, p=0.3, seed=1)(images).numpy()
    assert set(np.unique(out)) == {0.5, 1.0}
    assert abs(np.mean(out[:, 0, 0, 0] == 0.5) - 0.3) < 0.04
    with pytest.raises(ValueError, match="p=1.5"):
        RandomApply(halve, p=1.5)


def test_configs_round_trip():
    crop = RandomResizedCrop(12, 10, scale=(0.3, 0.9), ratio=(0.5, 2.0), seed=4)
    assert RandomResizedCrop.from_config(crop.get_config()).get_config() == crop.get_config()
    jitter = keras.layers.RandomColorJitter(value_range=(0, 1), contrast_factor=0.4)
    wrapped = RandomApply(jitter, p=0.8, seed=2)
    config = keras.saving.serialize_keras_object(wrapped)
    restored = keras.saving.deserialize_keras_object(config)
    assert isinstance(restored, RandomApply) and restored.p == 0.8 and restored.seed == 2
    assert isinstance(restored.layer, keras.layers.RandomColorJitter)
    assert restored.layer.get_config() == jitter.get_config()


def test_recipe_saves_and_loads_in_safe_mode(tmp_path):
    augment = build_augmentation(32, 3, seed=7)
    augment.save(tmp_path / "augment.keras")
    restored = keras.saving.load_model(tmp_path / "augment.keras", safe_mode=True)
    assert [type(layer) for layer in restored.layers] == [type(layer) for layer in augment.layers]
    as_json = lambda layer: json.loads(json.dumps(layer.get_config()))
    assert as_json(restored.layers[2].layer) == as_json(augment.layers[2].layer)
    assert restored(random_images(2)).shape == (2, 32, 32, 3)


def test_runs_batched_in_tf_data_with_fresh_draws_per_view_and_epoch():
    augment = build_augmentation(32, 3)
    batch = random_images(8)
    dataset = (tf.data.Dataset.from_tensors(batch).repeat(2)
               .map(lambda x: (augment(x), augment(x)), num_parallel_calls=tf.data.AUTOTUNE))
    (a1, b1), (a2, _) = [(a.numpy(), b.numpy()) for a, b in dataset]
    assert a1.shape == (8, 32, 32, 3) and a1.dtype == np.float32
    assert 0.0 <= a1.min() and a1.max() <= 1.0
    assert np.abs(a1 - b1).mean(axis=(1, 2, 3)).min() > 1e-3  # two views
    assert np.abs(a1 - a2).mean(axis=(1, 2, 3)).min() > 1e-3  # two epochs


def test_stays_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        augment = build_augmentation(16, 3)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert augment(random_images(2, 16)).dtype == tf.float32


def test_seeds_stay_distinct_under_a_parallel_map():
    # Keras's SeedGenerator reads then writes its state, so concurrent map calls
    # can draw the same seed; this one must not, however the calls interleave.
    generator = ParallelSafeSeedGenerator(seed=1)
    draws = (tf.data.Dataset.range(2000)
             .map(lambda _: keras.random.uniform((), seed=generator),
                  num_parallel_calls=tf.data.AUTOTUNE))
    assert len({float(x) for x in draws}) == 2000
