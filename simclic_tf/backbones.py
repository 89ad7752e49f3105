"""Encoder backbones: functional Keras models from images in [0, 1] to a
pooled feature vector. They are built from stock Keras layers only, so an
exported backbone loads anywhere without this library."""

import keras
from keras import layers

from simclic_tf.registry import BACKBONES


def _conv_bn_relu(x, filters, stride, name, bn_momentum, relu=True, zero_gamma=False):
    x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                      name=f"{name}_conv")(x)
    x = layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_bn",
                                  gamma_initializer="zeros" if zero_gamma else "ones")(x)
    return layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _basic_block(x, filters, stride, name, bn_momentum, zero_init_residual=False):
    """ResNet basic block (two 3x3 convolutions) with a projection shortcut
    when the shape changes; with `zero_init_residual` its last BatchNorm
    starts at 0, so that the block starts as the identity (Goyal et al. 2017)."""
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False,
                                 name=f"{name}_shortcut_conv")(x)
        shortcut = layers.BatchNormalization(momentum=bn_momentum,
                                             name=f"{name}_shortcut_bn")(shortcut)
    x = _conv_bn_relu(x, filters, stride, f"{name}_1", bn_momentum)
    x = _conv_bn_relu(x, filters, 1, f"{name}_2", bn_momentum, relu=False,
                      zero_gamma=zero_init_residual)
    x = layers.Add(name=f"{name}_add")([x, shortcut])
    return layers.ReLU(name=f"{name}_out")(x)


@BACKBONES.register("resnet18_cifar")
def resnet18_cifar(input_shape, width=64, bn_momentum=0.9, zero_init_residual=False):
    """ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool).
    `width` is the first stage's channel count (64 in the paper; 16 or 32 for
    CPU runs); the four stages use width x (1, 2, 4, 8)."""
    inputs = keras.Input(input_shape, name="images")
    x = _conv_bn_relu(inputs, width, 1, "stem", bn_momentum)
    for stage, multiplier in enumerate((1, 2, 4, 8)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            x = _basic_block(x, width * multiplier, stride,
                             f"stage{stage + 1}_block{block + 1}", bn_momentum,
                             zero_init_residual)
    features = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, features, name="resnet18_cifar")


@BACKBONES.register("resnet50")
def resnet50(input_shape, width=64, bn_momentum=0.99, zero_init_residual=False):
    """ResNet-50 from keras.applications (random init), for ImageNet-sized
    images. Its width, BatchNorm momentum and initialisation are fixed; those
    knobs are accepted and ignored."""
    del width, bn_momentum, zero_init_residual
    return keras.applications.ResNet50(
        include_top=False, weights=None, input_shape=input_shape, pooling="avg"
    )


@BACKBONES.register("tiny_convnet")
def tiny_convnet(input_shape, width=16, bn_momentum=0.9, zero_init_residual=False):
    """Three conv-BN-ReLU layers: fast enough for unit tests on a CPU. It has
    no residual blocks, so `zero_init_residual` does nothing."""
    inputs = keras.Input(input_shape, name="images")
    x = inputs
    for i, multiplier in enumerate((1, 2, 4)):
        x = _conv_bn_relu(x, width * multiplier, 1 if i == 0 else 2, f"conv{i + 1}",
                          bn_momentum)
    features = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, features, name="tiny_convnet")


def build_backbone(name, input_shape, width, bn_momentum=0.9, zero_init_residual=False):
    return BACKBONES.get(name)(tuple(input_shape), width=width, bn_momentum=bn_momentum,
                               zero_init_residual=zero_init_residual)
