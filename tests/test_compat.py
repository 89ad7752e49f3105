"""simclic_tf.compat, the one seam to private TensorFlow / Keras API: each
wrapper works on the installed versions (so an upgrade that changes one
fails here, by name), and a missing attribute is a CompatError that names
it and the versions, not an AttributeError deep in a training step."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from simclic_tf import compat
from simclic_tf.compat import CompatError


def nested_model():
    inner = keras.Sequential([keras.layers.Dense(3), keras.layers.BatchNormalization()],
                             name="inner")
    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(2)(inner(inputs)), name="outer")


def test_prebuilt_model_hook_is_what_fit_calls():
    compat.check_prebuilt_model()

    class Counted(compat.PrebuiltModel, keras.Model):
        calls = 0

        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)
            self.dense.build((None, 2))
            self.built = True

        def call(self, x):
            return self.dense(x)

        def _maybe_symbolic_build(self, iterator=None, data_batch=None):
            Counted.calls += 1
            super()._maybe_symbolic_build(iterator, data_batch)

    model = Counted()
    model.compile(optimizer="sgd", loss="mse")
    model.fit(np.ones((4, 2), "float32"), np.ones((4, 1), "float32"), verbose=0)
    assert Counted.calls == 1 and model.optimizer.built


def test_all_layers_reaches_nested_layers():
    model = nested_model()
    names = [layer.name for layer in compat.all_layers(model)]
    assert names[0] == "outer" and "inner" in names
    assert sum(isinstance(layer, keras.layers.BatchNormalization)
               for layer in compat.all_layers(model)) == 1
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)


def test_tf_variable_is_the_storage_behind_a_keras_variable():
    variable = keras.Variable(np.zeros(3, "float32"))
    inner = compat.tf_variable(variable)
    assert isinstance(inner, tf.Variable)
    inner.assign([1.0, 2.0, 3.0])  # What the kernels do in place.
    np.testing.assert_array_equal(variable.numpy(), [1.0, 2.0, 3.0])


def test_on_this_replica_is_the_replica_copy_of_an_on_read_variable():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        variable = tf.Variable(np.zeros(2, "float32"),
                               synchronization=tf.VariableSynchronization.ON_READ,
                               aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    assert isinstance(variable, tf.distribute.DistributedValues)

    def step():
        local = compat.on_this_replica(variable)
        assert not isinstance(local, tf.distribute.DistributedValues)
        local.assign([4.0, 5.0])

    strategy.run(tf.function(step))
    np.testing.assert_array_equal(variable.numpy(), [4.0, 5.0])


def test_in_multi_worker_mode_on_one_worker():
    """In a subprocess: a MultiWorkerMirroredStrategy fixes this process's
    collective setup, which the other tests must not inherit."""
    code = ("import os; os.environ.pop('TF_CONFIG', None)\n"
            "import tensorflow as tf\nfrom simclic_tf import compat\n"
            "print(compat.in_multi_worker_mode(tf.distribute.MultiWorkerMirroredStrategy()))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_xla_and_stateless_scope_probes():
    seen = []

    @tf.function(jit_compile=True)
    def compiled():
        seen.append(compat.in_xla_context())
        return tf.constant(0)

    @tf.function
    def traced():
        seen.append(compat.in_xla_context())
        return tf.constant(0)

    compiled(), traced()
    assert seen == [True, False]
    assert not compat.in_stateless_scope()
    with keras.StatelessScope():
        assert compat.in_stateless_scope()


def test_variable_index_finds_the_variable_update_step_is_given():
    variables = [keras.Variable(np.zeros(2, "float32")), keras.Variable(np.zeros(3, "float32"))]
    optimizer = keras.optimizers.SGD()
    optimizer.build(variables)
    # update_step gets the backend's variable (`.value` here), not the Keras one.
    assert [compat.variable_index(optimizer, v.value) for v in variables] == [0, 1]
    assert compat.variable_index(optimizer, variables[1]) == 1


class CountingSeedGenerator(keras.random.SeedGenerator):
    """A SeedGenerator that counts the seeds it gives."""
    calls = 0

    def next(self, ordered=True):
        CountingSeedGenerator.calls += 1
        return super().next(ordered)


def test_use_seed_generator_makes_a_preprocessing_layer_draw_from_it():
    layer = keras.layers.RandomFlip("horizontal", seed=3)
    generator = CountingSeedGenerator(3)
    assert compat.use_seed_generator(layer, generator) is layer
    layer(np.zeros((2, 4, 4, 1), "float32"), training=True)
    assert CountingSeedGenerator.calls >= 1


def test_started_and_running_trials_of_an_oracle(tmp_path):
    import keras_tuner

    hp = keras_tuner.HyperParameters()
    hp.Choice("x", [1, 2, 3])
    oracle = keras_tuner.RandomSearch(
        hypermodel=lambda hp: None, objective=keras_tuner.Objective("score", "max"),
        max_trials=3, hyperparameters=hp, directory=tmp_path).oracle
    assert compat.started_trials(oracle) == [] and not compat.has_running_trials(oracle)
    first, second = oracle.create_trial("a"), oracle.create_trial("b")
    assert compat.started_trials(oracle) == [first, second]
    for trial in (first, second):
        oracle.update_trial(trial.trial_id, {"score": 1.0})
        trial.status = keras_tuner.engine.trial.TrialStatus.COMPLETED
        assert compat.has_running_trials(oracle)
        oracle.end_trial(trial)
    assert not compat.has_running_trials(oracle)
    del oracle.start_order
    with pytest.raises(CompatError, match=r"start_order \(private API\).*keras-tuner "
                       rf"{keras_tuner.__version__}"):
        compat.started_trials(oracle)


@pytest.mark.parametrize("owner, name, call", [
    (keras.Model, "_maybe_symbolic_build", compat.check_prebuilt_model),
    (keras.layers.Layer, "_flatten_layers", lambda: compat.all_layers(nested_model())),
    (keras.optimizers.SGD, "_get_variable_index",
     lambda: compat.variable_index(keras.optimizers.SGD(), None)),
    (keras.layers.RandomFlip, "_get_seed_generator",
     lambda: compat.use_seed_generator(keras.layers.RandomFlip(), None)),
])
def test_a_private_api_gone_is_a_compat_error_naming_it(monkeypatch, owner, name, call):
    owner = next(cls for cls in owner.__mro__ if name in vars(cls))  # where it is defined
    monkeypatch.delattr(owner, name)
    with pytest.raises(CompatError, match=rf"{name} \(private API\).*tensorflow {tf.__version__}, "
                       rf"keras {keras.__version__}"):
        call()


def test_a_private_module_gone_is_a_compat_error_naming_it():
    with pytest.raises(CompatError, match=r"imports tensorflow\.python\.no_such \(private API\)"):
        compat.private_module("tensorflow.python.no_such", "for this test")


def test_tensorflow_start_up_lines_are_filtered_and_the_rest_kept():
    """`import simclic_tf` in a fresh process: none of TensorFlow's start-up
    lines (which ignore TF_CPP_MIN_LOG_LEVEL), yet a line written to file
    descriptor 2 during the import that is not one of them comes through."""
    code = ("import os, sys\nfrom simclic_tf import compat\n"
            "with compat.filtered_stderr(compat.STARTUP_NOISE):\n"
            "    os.write(2, b'W0000 cudart_stub.cc:31] Could not find cuda drivers\\n')\n"
            "    os.write(2, b'a real warning\\n')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "a real warning\n"


def test_a_cpu_run_does_not_print_tensorflows_failed_cuinit_line():
    """TensorFlow logs an E-level 'failed call to cuInit' the first time it
    looks for a GPU on a machine with none: every command (it imports
    simclic_tf) runs ops without that line reaching the terminal."""
    code = ("import simclic_tf, tensorflow as tf\n"
            "print(float(tf.reduce_sum(tf.ones(3))), tf.config.list_logical_devices('CPU'))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("3.0") and "cuInit" not in result.stderr, result.stderr
