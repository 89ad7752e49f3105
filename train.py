"""Pretrain a SimCLIC encoder, evaluate it and write a report.

    python train.py                       # shapes, drawn on the fly
    python train.py --dataset cifar100    # via tensorflow-datasets
    python train.py --run-dir runs/a --resume
"""

import argparse
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from simclic_tf.cli import add_config_flags, config_from_args, knobs_given  # noqa: E402
from simclic_tf.config import ConfigError  # noqa: E402
from simclic_tf.data import DataError  # noqa: E402
from simclic_tf.faults import Diverged, Interrupted, RunFinished  # noqa: E402
from simclic_tf.report import error_table, verdict  # noqa: E402
from simclic_tf.run import run  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue the stopped run in --run-dir from its last checkpoint, "
                        "with its saved config (a flag that contradicts it is an error)")
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        report = run(config, resume=args.resume, given=knobs_given(args, config))
    except (ConfigError, DataError) as error:
        parser.error(str(error))
    except RunFinished as finished:
        print(finished)
        return 0
    except Diverged as diverged:
        print(f"\n{diverged}", file=sys.stderr)
        return 1
    except Interrupted as interrupted:
        print(f"\n{interrupted}", file=sys.stderr)
        return 128 + interrupted.signum
    except KeyboardInterrupt:  # before run() took over SIGINT
        print(f"\n{Interrupted(signal.SIGINT)}", file=sys.stderr)
        return 128 + signal.SIGINT
    # The verdict first: the last lines a user sees say whether it learned.
    print("\n" + verdict(report), *error_table(report),
          f"Report: {os.path.join(report['config']['run_dir'], 'report.md')}", sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
