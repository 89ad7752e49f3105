"""Imported first by the test scripts that run as subprocesses under a
MirroredStrategy: splits the CPU into two logical devices, which must happen
before TensorFlow initialises them, and puts the checkout on sys.path."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
