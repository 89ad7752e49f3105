"""How far `--time-budget`'s timing of a step falls from the run's mean step.

A budgeted run is planned on the mean of its first timed steps; when that
mean is low, the run runs out of time before its schedule's end. Each round
builds a model, times its steps as a budgeted run does (`size_to_budget`,
once per count in `--timed-steps`, each timing undone), then trains
`--steps` steps of it and prints each timing's error against their mean
step; and, as the budget timed before, the error of a timing on another
model of the same config (built fresh, as a throwaway).

    python benchmarks/budget_timing.py                       # shapes, 10 and 40 steps
    python benchmarks/budget_timing.py --views 2 --rounds 6  # the two-view form

Run it alone: another process on the cores changes both sides.
"""

import argparse
import math
import os
import statistics

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from simclic_tf import SimCLICConfig, sources  # noqa: E402
from simclic_tf.budget import TIMED_STEPS, StepTimer  # noqa: E402
from simclic_tf.training import build_model, pretrain_inputs, size_to_budget  # noqa: E402


def mean_step_seconds(model, config, train_set, steps, skipped=3):
    """The mean step of `steps` steps of `model`'s pretraining, after
    `skipped` (the input's warm-up), timed as the budget's timing times its
    steps (`StepTimer`, never stopping the fit early)."""
    config = config.replace(time_budget=None, epochs=1, steps_per_epoch=steps)
    model.fit_to_length(1, steps)
    _, dataset = pretrain_inputs(config, train_set)
    timer = StepTimer(steps, skipped, math.inf)
    model.fit(dataset, epochs=1, steps_per_epoch=steps, callbacks=[timer], verbose=0,
              shuffle=False)
    return statistics.fmean(timer.step_intervals())


def timed_step_seconds(config, train_set, model, count):
    return size_to_budget(config, train_set, model, timed_steps=count).step_seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=SimCLICConfig.dataset)
    parser.add_argument("--views", type=int, help="default: the config's derived form")
    parser.add_argument("--strength-ramp", type=float,
                        help="default: the config's derived form")
    parser.add_argument("--timed-steps", type=int, nargs="+", default=[10, 40])
    parser.add_argument("--steps", type=int, default=400, help="real steps a round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    config = SimCLICConfig(dataset=args.dataset, views=args.views,
                           strength_ramp=args.strength_ramp, time_budget="2m")
    keras.utils.set_random_seed(config.seed)
    train_set, _ = sources.load_train_and_eval(config)
    timings = [*args.timed_steps, "fresh"]
    errors = {timing: [] for timing in timings}
    print(f"{args.dataset}: each round's timings against {args.steps} real steps "
          f"(fresh: {TIMED_STEPS} steps timed on another model of the config)")
    print(f"{'round':<7}{'timed steps':>12}{'timed ms':>10}{'real ms':>10}{'error':>9}")
    for round_ in range(args.rounds):
        fresh = timed_step_seconds(config, train_set, build_model(config, train_set),
                                   TIMED_STEPS)
        model = build_model(config, train_set)
        timed = {count: timed_step_seconds(config, train_set, model, count)
                 for count in args.timed_steps}
        real = mean_step_seconds(model, config, train_set, args.steps)
        for timing, seconds in {**timed, "fresh": fresh}.items():
            errors[timing].append(seconds / real - 1)
            print(f"{round_:<7}{timing:>12}{1000 * seconds:>10.2f}{1000 * real:>10.2f}"
                  f"{100 * errors[timing][-1]:>8.1f}%")
    for timing, values in errors.items():
        what = f"{TIMED_STEPS} steps of a fresh model" if timing == "fresh" else f"{timing} steps"
        print(f"timed over {what}: error {100 * min(values):+.1f} % to "
              f"{100 * max(values):+.1f} % over {args.rounds} rounds")


if __name__ == "__main__":
    main()
