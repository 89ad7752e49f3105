"""Helper of tests/test_history_bank.py, run as a subprocess (it configures two
logical CPU devices, which must happen before TensorFlow initialises them):

    python tests/bank_layouts.py OUT.npz

Under a MirroredStrategy over the two devices, builds a replicated and a
sharded history bank (`history_bank.create`) and gives both, through their
public interface only, the same steps of `exchange` (`strategy.run`), then a
`read`; writes, per layout, each step's old rows and `seen` over the global
batch (replica 0's positions, then replica 1's), the read, the logical state
`save_own_variables` stores, the shape of the bank variable, and the state
each layout's store loads into a fresh bank of the other layout.
"""

import sys

import two_logical_cpus  # noqa: F401 (first: before TensorFlow starts)
import tensorflow as tf  # noqa: E402

import numpy as np  # noqa: E402

from simclic_tf import history_bank, kernels  # noqa: E402

# N odd: the second shard has one owned row fewer. Each step: three
# positions per replica, an index on both replicas and one twice on one.
N, DIM, MOMENTUM = 11, 4, 0.5
STEPS = [[0, 1, 2, 3, 4, 5], [4, 9, 9, 4, 10, 1], [1, 2, 3, 4, 5, 6]]
READ = [10, 9, 7, 1, 0, 6]


def per_replica(strategy, values):
    """`values` split in halves: replica r gets half r."""
    half = len(values) // 2
    return strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(values[context.replica_id_in_sync_group * half:][:half]))


def global_batch(strategy, results):
    """The replicas' results concatenated in replica order, as numpy."""
    return [np.concatenate([part.numpy() for part in strategy.experimental_local_results(r)])
            for r in results]


def run(strategy, layout):
    with strategy.scope():
        bank = history_bank.create(layout, N, DIM, "float32")
    exchange = tf.function(lambda i, z: strategy.run(
        lambda i, z: bank.exchange(kernels.history_exchange, i, z, MOMENTUM), args=(i, z)),
        autograph=False)
    read = tf.function(lambda i: strategy.run(bank.read, args=(i,)), autograph=False)
    rng = np.random.default_rng(0)
    result = {"kind": type(bank).__name__, "shape": np.array(bank.bank.shape)}
    for step, indices in enumerate(STEPS):
        new_rows = rng.normal(size=(len(indices), DIM)).astype("float32")
        result[f"new_rows{step}"] = new_rows
        result[f"old_rows{step}"], result[f"seen{step}"] = global_batch(strategy, exchange(
            per_replica(strategy, np.array(indices, "int32")), per_replica(strategy, new_rows)))
    result["read_rows"], result["read_seen"] = global_batch(
        strategy, read(per_replica(strategy, np.array(READ, "int32"))))
    store = {}
    bank.save_own_variables(store)
    result["saved_bank"], result["saved_visits"] = store["bank"], store["visits"]
    return store, result


def load_into(strategy, layout, store):
    """(rows, visit counts) of a fresh `layout` bank after loading `store`."""
    with strategy.scope():
        bank = history_bank.create(layout, N, DIM, "float32")
    bank.load_own_variables(store)
    return bank.rows(), bank.visit_counts()


def main():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out, stores = {}, {}
    for layout in ("replicated", "sharded"):
        stores[layout], result = run(strategy, layout)
        out.update({f"{layout}_{key}": value for key, value in result.items()})
    for layout, other in (("replicated", "sharded"), ("sharded", "replicated")):
        out[f"{layout}_in_{other}_bank"], out[f"{layout}_in_{other}_visits"] = load_into(
            strategy, other, stores[layout])
    np.savez(sys.argv[1], steps=np.array(STEPS), read=np.array(READ), num_rows=N,
             momentum=MOMENTUM, **out)


if __name__ == "__main__":
    main()
