"""Projector f's MLP head and the predictor variants h of the ablations
(the paper's Table 4): none, a fixed random MLP, one layer, two layers."""

import keras
from keras import layers

from simclic_tf.backbones import batch_normalization
from simclic_tf.registry import PREDICTORS


def build_projector(feature_dim, dim, bn_momentum=0.9):
    """SimSiam's CIFAR projector: two linear layers with BN, BN on the output
    without affine parameters (its bias would be a free collapse direction)."""
    return keras.Sequential([
        keras.Input((feature_dim,)),
        layers.Dense(dim, use_bias=False),
        batch_normalization(momentum=bn_momentum),
        layers.ReLU(),
        layers.Dense(dim, use_bias=False),
        batch_normalization(momentum=bn_momentum, center=False, scale=False),
    ], name="projector")


def _bottleneck_mlp(dim, hidden, name, trainable=True):
    return keras.Sequential([
        keras.Input((dim,)),
        layers.Dense(hidden, use_bias=False, trainable=trainable),
        batch_normalization(center=trainable, scale=trainable),
        layers.ReLU(),
        layers.Dense(dim, trainable=trainable),
    ], name=name)


@PREDICTORS.register("mlp2")
def mlp2(dim, hidden):
    """SimSiam's predictor: dim -> hidden (BN, ReLU) -> dim."""
    return _bottleneck_mlp(dim, hidden, "predictor")


@PREDICTORS.register("mlp1")
def mlp1(dim, hidden):
    """A single linear layer dim -> dim."""
    del hidden
    return keras.Sequential([keras.Input((dim,)), layers.Dense(dim)], name="predictor")


@PREDICTORS.register("fixed_random")
def fixed_random(dim, hidden):
    """The two-layer predictor frozen at its random initialisation. Its BN has
    no parameters, so it still normalises with batch statistics in training."""
    return _bottleneck_mlp(dim, hidden, "predictor", trainable=False)


@PREDICTORS.register("none")
def no_predictor(dim, hidden):
    """p = z."""
    del hidden
    return keras.Sequential([keras.Input((dim,)), layers.Identity()], name="predictor")
