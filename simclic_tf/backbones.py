"""Encoder backbones: functional Keras models from images in [0, 1] to a
pooled feature vector. They are built from stock Keras layers only, so an
exported backbone loads anywhere without this library."""

import types

import keras
import tensorflow as tf
from keras import layers

from simclic_tf.registry import BACKBONES


def batch_normalization(**kwargs):
    """A stock `layers.BatchNormalization(**kwargs)`; built under the
    mixed_bfloat16 policy, its call runs TensorFlow's fused kernel.

    Keras 3's BatchNormalization casts its bfloat16 input to float32 and
    normalises with a chain of element-wise float32 ops (moments, then
    x * rsqrt(var + eps) * gamma + ...), and its gradient is as many again:
    at width 32 that was half of a bfloat16 training step's op time on a CPU.
    FusedBatchNormV3 reads and writes bfloat16 and keeps its statistics,
    scale and offset in float32 (oneDNN's kernel on x86). The output agrees
    to the last bfloat16 bit or so; the moving statistics are the same
    (the batch variance is un-corrected back to Keras's biased one). Under
    float32 (and float16) the layer is untouched. The class stays the stock
    one, so a saved backbone loads anywhere (as Keras's unfused layer)."""
    layer = layers.BatchNormalization(**kwargs)
    if layer.compute_dtype == "bfloat16" and keras.backend.backend() == "tensorflow":
        layer.call = types.MethodType(_fused_batch_norm_call, layer)
    return layer


def copy_model(model, input_shape=None):
    """A copy of a Keras model with its own variables and the same weights
    (BatchNorm statistics included), on an input of `input_shape` (height,
    width, channels) when given. Its BatchNormalizations are built by
    `batch_normalization`, so fused under mixed_bfloat16: clone_model alone
    rebuilds stock ones, which made BYOL's target encoder's forward pass
    as slow as a training step."""
    inputs = None
    if input_shape is not None:
        inputs = keras.Input(tuple(input_shape), dtype=model.inputs[0].dtype,
                             name=model.layers[0].name)
        inputs = [inputs] if isinstance(model.input, list) else inputs  # the same structure
    copy = keras.models.clone_model(model, input_tensors=inputs, clone_function=_clone_layer)
    copy.set_weights(model.get_weights())
    return copy


def _clone_layer(layer):
    if type(layer) is layers.BatchNormalization:
        return batch_normalization(**layer.get_config())
    return layer.__class__.from_config(layer.get_config())


def _fused_batch_norm_call(self, inputs, training=None, mask=None):
    """BatchNormalization.call through FusedBatchNormV3 (NHWC, or (B, C) as
    (B, 1, 1, C)); Keras's own call where the fused op does not apply."""
    rank = len(inputs.shape)
    if (mask is not None or self.synchronized or getattr(self, "renorm", False)
            or rank not in (2, 4) or self.axis % rank != rank - 1):
        return layers.BatchNormalization.call(self, inputs, training=training, mask=mask)
    x = tf.cast(inputs, self.compute_dtype)
    shape = tf.shape(x)
    channels = x.shape[-1]
    if rank == 2:
        x = tf.reshape(x, [-1, 1, 1, channels])
    scale = tf.cast(self.gamma, "float32") if self.scale else tf.ones([channels], "float32")
    offset = tf.cast(self.beta, "float32") if self.center else tf.zeros([channels], "float32")
    if training and self.trainable:
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            x, scale, offset, epsilon=self.epsilon, is_training=True)
        count = tf.cast(tf.size(x, out_type=tf.int64) // channels, "float32")
        variance = variance * (count - 1.0) / tf.maximum(count, 1.0)  # The op's is unbiased.
        momentum = self.momentum
        self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
        self.moving_variance.assign(
            self.moving_variance * momentum + variance * (1.0 - momentum))
    else:
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(
            x, scale, offset, mean=tf.cast(self.moving_mean, "float32"),
            variance=tf.cast(self.moving_variance, "float32"), epsilon=self.epsilon,
            is_training=False)
    return tf.reshape(y, shape) if rank == 2 else y


def _conv_bn_relu(x, filters, stride, name, bn_momentum, relu=True, zero_gamma=False):
    x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                      name=f"{name}_conv")(x)
    x = batch_normalization(momentum=bn_momentum, name=f"{name}_bn",
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
        shortcut = batch_normalization(momentum=bn_momentum,
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
    """The registered backbone `name`. Under a mixed policy its features come
    out in float32 (Keras's advice for a model's outputs): tf.distribute
    gathers predictions across workers, which it cannot do in bfloat16 on CPUs."""
    backbone = BACKBONES.get(name)(tuple(input_shape), width=width, bn_momentum=bn_momentum,
                                   zero_init_residual=zero_init_residual)
    if backbone.output.dtype == "float32":
        return backbone
    features = layers.Activation("linear", dtype="float32", name="features")(backbone.output)
    return keras.Model(backbone.inputs, features, name=backbone.name)
