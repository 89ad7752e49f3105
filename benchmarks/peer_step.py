"""Our training step against the peer a PyTorch user would pick (SimSiam
with lightly 1.6 on PyTorch), in float32 and bfloat16, in one sitting, with
ratios.

    # once: the peer's own virtual environment (not simclic_tf's dependencies)
    python -m venv ~/peer-venv && ~/peer-venv/bin/pip install -r benchmarks/peer/requirements.txt
    # on an idle machine:
    python benchmarks/peer_step.py --peer-python ~/peer-venv/bin/python
    # smoke test (seconds, not a measurement):
    python benchmarks/peer_step.py --width 8 --batch-size 16 --proj-dim 256 \\
        --pred-hidden 64 --steps 2 --rounds 1 --warmup-steps 1

The model on both sides: CIFAR ResNet-18 (3x3 stride-1 stem, no max-pool)
with `--width` base channels, the projector of simclic_tf.heads
(`--proj-dim`, two layers, BN on both, the last without affine parameters),
the predictor `--proj-dim` -> `--pred-hidden` -> `--proj-dim`, two views of
`--batch-size` 32x32x3 images (one fixed random batch), SimSiam's symmetric
negative cosine loss with stop-gradient, SGD with momentum 0.9 and L2 weight
decay 5e-4.

Ours: each precision's model comes from `simclic_tf.training.build_model`
(`--precision float32` or `mixed_bfloat16`, perturbation none) and a step is
a call of its compiled Keras train function on the synthetic dataset
iterator of benchmarks/throughput.py, as `model.fit` runs it (it also
updates the loss, z_std and z_rank metrics, which the peer has not).
The peer: benchmarks/peer/torch_step.py run by `--peer-python` in a
subprocess (`--serve`), in float32 and under
`torch.autocast("cpu", dtype=torch.bfloat16)`; a step is forward, backward
and `optimizer.step()` (its docstring says how the model mirrors ours).

Both sides use `--threads` threads (default: the CPUs this process may run
on, TensorFlow's default intra-op count; torch.set_num_threads on the peer).
Once all are built (ours traced), after `--warmup-steps` untimed steps per
model, the four (side, precision) steps take turns for `--rounds` rounds of
`--steps` steps (the peer's process waits idle on its stdin while ours
runs), so that machine noise hits them alike; the median round is reported.
peer/ours > 1: ours is faster.
Run it on an idle machine: beside another busy job the peer's OpenMP
threads wait for each other at every op, and its steps slow down by up to
100x (ours by far less), so the ratios then mean nothing; a warning says
when the load average is above 0.5 at the start.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import throughput  # noqa: E402  (benchmarks/ is the script's directory)
from simclic_tf.config import SimCLICConfig  # noqa: E402
from simclic_tf.images import ImageSet  # noqa: E402
from simclic_tf.training import build_model  # noqa: E402

PEER_SCRIPT = Path(__file__).resolve().parent / "peer" / "torch_step.py"
# Our --precision: the peer's (torch.autocast dtype, or float32).
PRECISIONS = {"float32": "float32", "mixed_bfloat16": "bfloat16"}
DEFAULT_PEER_PYTHON = os.environ.get("PEER_PYTHON",
                                     os.path.expanduser("~/peer-venv/bin/python"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (the median is reported)")
    parser.add_argument("--warmup-steps", type=int, default=3,
                        help="untimed steps per model (after ours are traced)")
    parser.add_argument("--width", type=int, default=32, help="backbone base channels")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--proj-dim", type=int, default=2048)
    parser.add_argument("--pred-hidden", type=int, default=512)
    parser.add_argument("--precisions", type=throughput.csv_list(tuple(PRECISIONS)),
                        default=list(PRECISIONS))
    parser.add_argument("--jit", choices=("auto", "on", "off"), default="auto",
                        help="ours: model.compile(jit_compile=...) (auto: off on a CPU)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="intra-op threads of both sides (default: the CPUs "
                             "available, TensorFlow's default)")
    parser.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON,
                        help="the peer venv's interpreter (default: $PEER_PYTHON or "
                             "~/peer-venv/bin/python)")
    parser.add_argument("--peer-arg", action="append", default=[],
                        help="extra flag for torch_step.py, e.g. --peer-arg=--channels-last")
    parser.add_argument("--num-samples", type=int, default=50000,
                        help="dataset size our schedule and indices assume")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if min(args.steps, args.rounds, args.warmup_steps, args.threads) < 1:
        parser.error("--steps, --rounds, --warmup-steps and --threads must be at least 1")
    if not os.path.exists(args.peer_python):
        parser.error(f"--peer-python {args.peer_python} not found; create the peer's venv: "
                     "python -m venv ~/peer-venv && ~/peer-venv/bin/pip install -r "
                     "benchmarks/peer/requirements.txt")
    return args


class Ours:
    """Our compiled train function of one precision and its data iterator."""

    def __init__(self, precision, args, train_set):
        keras.mixed_precision.set_global_policy("float32")
        keras.utils.set_random_seed(0)
        config = SimCLICConfig(backbone="resnet18_cifar", width=args.width,
                               proj_dim=args.proj_dim, pred_hidden=args.pred_hidden,
                               perturbation="none", batch_size=args.batch_size,
                               precision=precision, strategy="default",
                               jit={"auto": None, "on": True, "off": False}[args.jit])
        self.model = build_model(config, train_set)  # Sets the precision policy.
        self.model.make_train_function()
        self.step = self.model.train_function
        self.iterator = iter(throughput.synthetic_dataset(
            args.batch_size, train_set.image_shape, len(train_set)))
        throughput.sync(self.step(self.iterator))  # Traces under this model's policy.
        keras.mixed_precision.set_global_policy("float32")

    def run(self, steps):
        """Seconds per step over `steps` steps (throughput.py's timing)."""
        return throughput.time_pair({"ours": self.step}, {"ours": self.iterator},
                                    argparse.Namespace(rounds=1, steps=steps))["ours"]


class Peer:
    """benchmarks/peer/torch_step.py --serve in the peer's interpreter."""

    def __init__(self, args):
        command = [args.peer_python, str(PEER_SCRIPT), "--serve",
                   "--width", str(args.width), "--batch-size", str(args.batch_size),
                   "--proj-dim", str(args.proj_dim), "--pred-hidden", str(args.pred_hidden),
                   "--threads", str(args.threads), "--warmup-steps", str(args.warmup_steps),
                   "--precisions", ",".join(PRECISIONS[p] for p in args.precisions),
                   *args.peer_arg]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)

    def _reply(self):
        for line in self.process.stdout:
            if line.startswith("{"):
                return json.loads(line)
        sys.exit(f"the peer ({PEER_SCRIPT.name}) ended with code {self.process.wait()}; "
                 "its error is above")

    def ready(self):
        return self._reply()

    def run(self, precision, steps):
        self.process.stdin.write(json.dumps({"precision": precision, "steps": steps}) + "\n")
        self.process.stdin.flush()
        return self._reply()["seconds_per_step"]

    def close(self):
        """Asks the peer to quit; ends it if it does not within a minute."""
        try:
            if self.process.poll() is None:
                self.process.stdin.write(json.dumps({"quit": True}) + "\n")
                self.process.stdin.close()
            self.process.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()


def print_table(medians, file=None):
    """The table of {our precision: (ours s/step, peer s/step)}."""
    file = file or sys.stdout
    header = (f"{'precision (ours / peer)':<34}{'ours s/step':>12}{'peer s/step':>13}"
              f"{'peer/ours':>11}")
    print(header, file=file)
    print("-" * len(header), file=file)
    for precision, (ours, peer) in medians.items():
        name = f"{precision} / {'autocast ' if PRECISIONS[precision] != 'float32' else ''}" \
               f"{PRECISIONS[precision]}"
        print(f"{name:<34}{ours:>12.4f}{peer:>13.4f}{peer / ours:>11.3f}", file=file)
    if {"float32", "mixed_bfloat16"} <= set(medians):
        (ours32, peer32), (ours16, peer16) = medians["float32"], medians["mixed_bfloat16"]
        print(f"bfloat16 speed-up over float32 (float32 s/step / bfloat16 s/step): "
              f"ours {ours32 / ours16:.3f}, peer {peer32 / peer16:.3f}", file=file)


def main(argv=None):
    args = parse_args(argv)
    began = time.perf_counter()
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.1f} before the run: another job shares the CPUs. "
              "The peer suffers most (torch's OpenMP threads wait for each other at every "
              "op: 100x slower steps were seen beside a 2-core job); time on an idle "
              "machine", file=sys.stderr, flush=True)
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    peer = Peer(args)  # Builds and warms up while ours does.
    try:
        train_set = ImageSet(np.zeros((args.num_samples, 32, 32, 3), np.uint8), None, [])
        ours = {p: Ours(p, args, train_set) for p in args.precisions}
        # Warm up once all are traced: tracing a model costs each model traced
        # before it a slow next step (about 1 s here, its function instantiated anew).
        for model in ours.values():
            model.run(args.warmup_steps)
        info = peer.ready()
        print(f"ours: TensorFlow {tf.__version__}, Keras {keras.__version__}, "
              f"{throughput.device_name()}, jit {args.jit}; peer: torch {info['torch']}, "
              f"lightly {info['lightly']}, CPU capability {info['cpu_capability']}"
              f"{', channels_last' if info['channels_last'] else ''}; "
              f"{args.threads} threads each")
        print(f"resnet18_cifar width {args.width}, projector {args.proj_dim}-{args.proj_dim}, "
              f"predictor {args.proj_dim}-{args.pred_hidden}-{args.proj_dim}, batch "
              f"{args.batch_size} x 2 views of 32x32x3; median of {args.rounds} rounds x "
              f"{args.steps} steps after {args.warmup_steps} warm-up steps, sides and "
              f"precisions taking turns ({time.perf_counter() - began:.0f} s to build)",
              flush=True)
        samples = {p: ([], []) for p in args.precisions}
        for _ in range(args.rounds):
            for precision in args.precisions:
                samples[precision][0].append(ours[precision].run(args.steps))
                samples[precision][1].append(peer.run(PRECISIONS[precision], args.steps))
    finally:
        peer.close()
    medians = {p: (statistics.median(o), statistics.median(q)) for p, (o, q) in samples.items()}
    print()
    print_table(medians)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "peer": info,
                       "rounds": samples,
                       "seconds_per_step": {p: {"ours": o, "peer": q}
                                            for p, (o, q) in medians.items()}}, f, indent=1)
    print(f"({time.perf_counter() - began:.0f} s in all)")


if __name__ == "__main__":
    main()
