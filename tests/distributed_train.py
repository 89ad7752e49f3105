"""Helper of tests/test_distribute.py: `train.py` on two logical CPU devices
(configured before TensorFlow initialises them), so that `--strategy
mirrored` has two replicas. SIMCLIC_TEST_CRASH_AT_EPOCH=K raises at the start
of epoch K (a crash for the resume test); SIMCLIC_TEST_STATE=FILE writes the
replica copies of the history buffer (as lists) at the end.

    python tests/distributed_train.py [train.py flags]
"""

import json
import os
import sys

import two_logical_cpus  # noqa: F401 (first: before TensorFlow starts)

from simclic_tf import callbacks, training  # noqa: E402
from simclic_tf.commands import train  # noqa: E402


class Crash(Exception):
    pass


def main():
    crash_at = os.environ.get("SIMCLIC_TEST_CRASH_AT_EPOCH")
    state_file = os.environ.get("SIMCLIC_TEST_STATE")
    original_build = training.build_model
    built = {}

    def build_model(*args, **kwargs):
        built["model"] = model = original_build(*args, **kwargs)
        return model

    training.build_model = build_model
    if crash_at is not None:
        def crash(self, epoch, logs=None):
            if epoch == int(crash_at):
                raise Crash(f"crash at epoch {epoch}")
        callbacks.CollapseMonitor.on_epoch_begin = crash
    try:
        code = train(sys.argv[1:])
    except Crash as error:
        print(error)
        return 3
    if state_file:
        model = built["model"]
        copies = [c.numpy() for c in model.distribute_strategy.experimental_local_results(
            model.perturbation.visits.value)]
        banks = [c.numpy() for c in model.distribute_strategy.experimental_local_results(
            model.perturbation.bank.value)]
        with open(state_file, "w") as f:
            json.dump({"replicas": model.distribute_strategy.num_replicas_in_sync,
                       "visits": [c.tolist() for c in copies],
                       "banks_equal": all((b == banks[0]).all() for b in banks),
                       "iterations": int(model.optimizer.iterations.numpy())}, f)
    return code


if __name__ == "__main__":
    sys.exit(main())
