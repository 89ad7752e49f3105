"""How far `--time-budget`'s timing of a step falls from the run's mean step.

A budgeted run is planned on the mean of its first timed steps; when that
mean is low, the run runs out of time before its schedule's end. Each round
times the steps as a budgeted run does (`size_to_budget`, once per count in
`--timed-steps`), then trains `--steps` steps of the real pretraining and
prints each timing's error against their mean step.

    python benchmarks/budget_timing.py                       # shapes, 10 and 40 steps
    python benchmarks/budget_timing.py --views 1 --strength-ramp 0.5 --rounds 6

Run it alone: another process on the cores changes both sides.
"""

import argparse
import math
import os
import statistics

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from simclic_tf import SimCLICConfig, sources  # noqa: E402
from simclic_tf.budget import StepTimer  # noqa: E402
from simclic_tf.training import build_pretraining, size_to_budget  # noqa: E402


def mean_step_seconds(config, train_set, steps, skipped=3):
    """The mean step of `steps` steps of `config`'s pretraining, after
    `skipped` (the trace and the input's warm-up), timed as the budget's
    timing times its steps (`StepTimer`, never stopping the fit early)."""
    pretraining = build_pretraining(config.replace(time_budget=None, epochs=1,
                                                   steps_per_epoch=steps), train_set)
    timer = StepTimer(steps, skipped, math.inf)
    pretraining.fit([timer], verbose=0)
    return statistics.fmean(timer.step_intervals())


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=SimCLICConfig.dataset)
    parser.add_argument("--views", type=int, default=SimCLICConfig.views)
    parser.add_argument("--strength-ramp", type=float, default=SimCLICConfig.strength_ramp)
    parser.add_argument("--timed-steps", type=int, nargs="+", default=[10, 40])
    parser.add_argument("--steps", type=int, default=400, help="real steps a round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    config = SimCLICConfig(dataset=args.dataset, views=args.views,
                           strength_ramp=args.strength_ramp, time_budget="2m")
    keras.utils.set_random_seed(config.seed)
    train_set, _ = sources.load_train_and_eval(config)
    errors = {count: [] for count in args.timed_steps}
    print(f"{args.dataset}: each round's timings against {args.steps} real steps")
    print(f"{'round':<7}{'timed steps':>12}{'timed ms':>10}{'real ms':>10}{'error':>9}")
    for round_ in range(args.rounds):
        timed = {count: size_to_budget(config, train_set, None, timed_steps=count).step_seconds
                 for count in args.timed_steps}
        real = mean_step_seconds(config, train_set, args.steps)
        for count, seconds in timed.items():
            errors[count].append(seconds / real - 1)
            print(f"{round_:<7}{count:>12}{1000 * seconds:>10.2f}{1000 * real:>10.2f}"
                  f"{100 * errors[count][-1]:>8.1f}%")
    for count, values in errors.items():
        print(f"timed over {count} steps: error {100 * min(values):+.1f} % to "
              f"{100 * max(values):+.1f} % over {args.rounds} rounds")


if __name__ == "__main__":
    main()
