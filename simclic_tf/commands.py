"""The `simclic` command: one entry for pretraining, transfer and the
ablation searches.

    simclic train                        # shapes, drawn on the fly
    simclic train --dataset cifar100     # via tensorflow-datasets
    simclic train --run-dir runs/a --resume
    simclic transfer --encoder runs/latest/encoder.keras --datasets paper
    simclic tune --ablation predictor --dataset digits --epochs 20

`simclic COMMAND --help` lists a command's flags by the config's sections.
"""

import argparse
import os
import signal
import sys

from simclic_tf import __version__, compat, transfer
from simclic_tf.cli import add_config_flags, config_from_args, knobs_given
from simclic_tf.config import ConfigError
from simclic_tf.sources import DataError
from simclic_tf.faults import Diverged, Interrupted, RunFinished
from simclic_tf.report import error_table, verdict
from simclic_tf.run import run
from simclic_tf.tuning import search

TRAIN_HELP = "pretrain an encoder, evaluate it and write a report (python train.py)"
TRAIN_DESCRIPTION = """Pretrain a SimCLIC encoder on --dataset, evaluate it (kNN, linear,
optionally fine-tuned) against the same encoder at random initialisation,
and write RUN_DIR/report.md, encoder.keras, history.csv and TensorBoard logs.

    simclic train                        # shapes, drawn on the fly
    simclic train --dataset cifar100     # via tensorflow-datasets
    simclic train --recipe cifar --dataset npz:cifar10_train.npz
    simclic train --run-dir runs/a --resume
"""


def add_train_arguments(parser):
    add_config_flags(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue the stopped run in --run-dir from its last checkpoint, "
                        "with its saved config (a flag that contradicts it is an error)")


def train_command(args, parser):
    """`simclic train`: the run's exit status (faults.py says which ending
    gives which), with the verdict as its last lines."""
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


# name: (one line, description, adds the flags to a parser, runs the parsed flags)
COMMANDS = {
    "train": (TRAIN_HELP, TRAIN_DESCRIPTION, add_train_arguments, train_command),
    "transfer": (transfer.SUMMARY, transfer.__doc__, transfer.add_arguments, transfer.command),
    "tune": (search.SUMMARY, search.__doc__, search.add_arguments, search.command),
}


def build_parser():
    parser = argparse.ArgumentParser(prog="simclic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version",
                        version=f"simclic-tf {__version__} ({compat.versions()})")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (summary, description, add_arguments, _) in COMMANDS.items():
        command = commands.add_parser(
            name, help=summary, description=description, usage="%(prog)s [flags]",
            formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(command)
        command.set_defaults(command_parser=command)  # Its errors name the sub-command.
    return parser


def main(argv=None):
    """`simclic COMMAND [flags]`; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return COMMANDS[args.command][-1](args, args.command_parser)


def command(name):
    """`simclic NAME` as a function of its flags (sys.argv's by default)."""
    def run_command(argv=None):
        return main([name, *(sys.argv[1:] if argv is None else argv)])

    return run_command


train = command("train")  # What `python train.py` runs.


if __name__ == "__main__":
    sys.exit(main())
