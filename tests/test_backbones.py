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


@pytest.mark.parametrize("shape, affine", [((8, 6, 6, 4), True), ((16, 8), False)])
def test_bfloat16_batch_norm_runs_fused_and_agrees_with_keras(shape, affine):
    """Under mixed_bfloat16 our BatchNormalization runs TensorFlow's fused
    kernel; it stays the stock class (saved backbones load anywhere) and
    agrees with Keras's own call: outputs to about a bfloat16 bit, moving
    statistics and gradients closely. Under float32 it is the stock layer."""
    import tensorflow as tf

    from simclic_tf.backbones import batch_normalization

    assert "call" not in batch_normalization().__dict__  # float32: untouched
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        fused = batch_normalization(momentum=0.9, center=affine, scale=affine)
        stock = keras.layers.BatchNormalization(momentum=0.9, center=affine, scale=affine)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert type(fused) is keras.layers.BatchNormalization and "call" in fused.__dict__
    rng = np.random.default_rng(0)
    x = tf.cast(rng.normal(2.0, 3.0, shape), "bfloat16")
    gamma = rng.uniform(0.5, 1.5, shape[-1]).astype("float32")
    weights = rng.normal(size=shape).astype("float32")
    grads = []
    for layer in (fused, stock):
        layer.build(shape)
        if affine:
            layer.gamma.assign(gamma)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.cast(y, "float32") * weights)
        grads.append(tape.gradient(loss, [x] + layer.trainable_weights))
        assert y.dtype == tf.bfloat16
    graph = tf.function(lambda v: fused(v, training=True)).get_concrete_function(
        tf.TensorSpec(shape, "bfloat16")).graph
    assert "FusedBatchNormV3" in {op.type for op in graph.get_operations()}
    outputs = [np.asarray(tf.cast(layer(x, training=True), "float32")) for layer in (fused, stock)]
    np.testing.assert_allclose(outputs[0], outputs[1], atol=0.02)
    for a, b in zip(*grads):
        a, b = np.asarray(tf.cast(a, "float32")), np.asarray(tf.cast(b, "float32"))
        np.testing.assert_allclose(a, b, atol=0.03 * np.abs(b).max() + 1e-6)
    for name in ("moving_mean", "moving_variance"):
        np.testing.assert_allclose(np.asarray(getattr(fused, name)),
                                   np.asarray(getattr(stock, name)), rtol=1e-4, atol=1e-5)
    inference = [np.asarray(tf.cast(layer(x, training=False), "float32"))
                 for layer in (fused, stock)]
    np.testing.assert_allclose(inference[0], inference[1], atol=0.02)


def test_a_copy_keeps_the_weights_and_the_fused_batch_norm():
    """BYOL's target encoder and fine-tuning train on a copy: under
    mixed_bfloat16 its BatchNorms must run fused as the original's do
    (clone_model alone rebuilt stock ones), with the same weights."""
    from simclic_tf.backbones import copy_model

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    backbone = build_backbone("resnet18_cifar", (8, 8, 3), 4)
    copy = copy_model(backbone)
    norms = [layer for layer in copy.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and all("call" in layer.__dict__ for layer in norms)
    for original, copied in zip(backbone.weights, copy.weights):
        assert original is not copied
        np.testing.assert_array_equal(np.asarray(original), np.asarray(copied))
    x = np.random.default_rng(0).random((4, 8, 8, 3), "float32")
    np.testing.assert_array_equal(np.asarray(backbone(x, training=False)),
                                  np.asarray(copy(x, training=False)))
