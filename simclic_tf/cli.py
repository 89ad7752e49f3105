"""Command-line flags derived from SimCLICConfig's fields, so that a knob is
declared once (in config.py) and `train.py`, `tuning.search` and the saved
`config.json` all agree on it."""

import argparse
import dataclasses
import typing

from simclic_tf.config import SimCLICConfig, flag


def _value_type(field):
    """int for `int` and `Optional[int]`, and so on."""
    if typing.get_origin(field.type) is typing.Union:
        return next(t for t in typing.get_args(field.type) if t is not type(None))
    return field.type


def add_config_flags(parser):
    """One flag per config field: `--batch-size`, `--stop-gradient/--no-stop-gradient`, ...
    Defaults are None so that only the flags given on the command line
    override a `--config` file."""
    for field in dataclasses.fields(SimCLICConfig):
        kind = _value_type(field)
        default_text = f" (default: {field.default})"
        choices = field.metadata["choices"]
        if kind is bool:
            parser.add_argument(flag(field.name), action=argparse.BooleanOptionalAction,
                                default=None, help=field.metadata["help"] + default_text)
        else:
            parser.add_argument(
                flag(field.name), type=kind, default=None, metavar=field.name.upper(),
                help=field.metadata["help"] + default_text
                + (f"; one of: {', '.join(map(str, _names(choices)))}" if choices else ""))
    parser.add_argument("--config", help="JSON config file; flags given override it")
    return parser


def _names(choices):
    return choices.names() if hasattr(choices, "names") else choices


def config_from_args(args):
    """The config a parsed command line asks for: defaults, then `--config`,
    then the flags given explicitly."""
    config = SimCLICConfig.load(args.config) if args.config else SimCLICConfig()
    given = {field.name: getattr(args, field.name) for field in dataclasses.fields(SimCLICConfig)
             if getattr(args, field.name) is not None}
    return config.replace(**given)
