import keras
import numpy as np
import pytest

from simclic_tf.backbones import build_backbone
from simclic_tf.registry import BACKBONES


@pytest.mark.parametrize("name, shape, width, features", [
    ("tiny_convnet", (8, 8, 1), 4, 16),
    ("resnet18_cifar", (32, 32, 3), 4, 32),
    ("resnet50", (32, 32, 3), 64, 2048),
])
def test_each_backbone_maps_images_to_pooled_features(name, shape, width, features):
    backbone = build_backbone(name, shape, width)
    out = backbone(np.random.default_rng(0).random((2,) + shape, "float32"), training=False)
    assert tuple(out.shape) == (2, features)
    assert set(BACKBONES.names()) == {"tiny_convnet", "resnet18_cifar", "resnet50"}


def test_resnet18_cifar_has_the_cifar_stem_and_eight_blocks():
    backbone = build_backbone("resnet18_cifar", (32, 32, 3), 8)
    stem = backbone.get_layer("stem_conv")
    assert stem.kernel_size == (3, 3) and stem.strides == (1, 1)
    assert not any(isinstance(layer, keras.layers.MaxPooling2D) for layer in backbone.layers)
    assert len([layer for layer in backbone.layers if layer.name.endswith("_add")]) == 8
    # Four stages at widths 8, 16, 32, 64, spatial 32 -> 4.
    assert backbone.get_layer("stage4_block2_out").output.shape[1:] == (4, 4, 64)


def test_bn_momentum_reaches_every_batchnorm():
    backbone = build_backbone("resnet18_cifar", (32, 32, 3), 4, bn_momentum=0.8)
    norms = [layer for layer in backbone.layers
             if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 20 and {layer.momentum for layer in norms} == {0.8}

def test_zero_init_residual_starts_each_block_as_the_identity():
    backbone = build_backbone("resnet18_cifar", (16, 16, 3), 4, zero_init_residual=True)
    images = np.random.default_rng(0).random((2, 16, 16, 3), "float32")
    outputs = keras.Model(backbone.input, [backbone.get_layer("stem_relu").output,
                                           backbone.get_layer("stage1_block2_out").output])
    stem, after_two_blocks = outputs(images, training=True)
    np.testing.assert_array_equal(np.asarray(after_two_blocks), np.asarray(stem))
    # Off by default: the residual branch then changes the features.
    plain = build_backbone("resnet18_cifar", (16, 16, 3), 4)
    assert float(np.asarray(plain.get_layer("stage1_block2_2_bn").gamma).min()) == 1.0
