"""Command-line flags derived from SimCLICConfig's fields, so that a knob is
declared once (in config.py) and `train.py`, `tuning.search` and the saved
`config.json` all agree on it."""

import argparse
import dataclasses
import typing

from simclic_tf.config import RECIPE_DIR, SimCLICConfig, flag, recipe_names


_FIELDS = {field.name: field for field in dataclasses.fields(SimCLICConfig)}


def value_type(field):
    """The flag's value type: int for `int` and `Optional[int]`, and so on."""
    if typing.get_origin(field.type) is typing.Union:
        return next(t for t in typing.get_args(field.type) if t is not type(None))
    return field.type


def add_config_flag(parser, name, default=None):
    """The flag of config field `name` (`--batch-size`, `--stop-gradient/
    --no-stop-gradient`, ...), with the field's help, type and choices."""
    field = _FIELDS[name]
    kind = value_type(field)
    default_text = f" (default: {field.default})"
    choices = field.metadata["choices"]
    if kind is bool:
        parser.add_argument(flag(name), action=argparse.BooleanOptionalAction,
                            default=default, help=field.metadata["help"] + default_text)
    else:
        parser.add_argument(
            flag(name), type=kind, default=default, metavar=name.upper(),
            help=field.metadata["help"] + default_text
            + (f"; one of: {', '.join(map(str, choice_names(choices)))}" if choices else ""))


def add_config_flags(parser):
    """One flag per config field, `--recipe` and `--config`. Defaults are None
    so that only the flags given on the command line override a preset or a
    `--config` file."""
    for name in _FIELDS:
        add_config_flag(parser, name)
    parser.add_argument(
        "--recipe", choices=recipe_names(), metavar="NAME",
        help=f"start from a shipped preset, one of: {', '.join(recipe_names())} (the "
        f"JSON files in {RECIPE_DIR}: copy one, edit it, pass it as --config)")
    parser.add_argument("--config", help="JSON config file (all knobs or some) over the "
                        "preset; flags given override both")
    return parser


def choice_names(choices):
    """The accepted values of a field's `choices`: a tuple, or a Registry's names."""
    return choices.names() if hasattr(choices, "names") else choices


def base_config(args):
    """The defaults, then `--recipe`, then `--config`: what the flags override."""
    config = SimCLICConfig.recipe(args.recipe) if args.recipe else SimCLICConfig()
    return SimCLICConfig.load(args.config, config) if args.config else config


def config_from_args(args):
    """The config a parsed command line asks for: `base_config`, then the
    flags given explicitly."""
    config = base_config(args)
    given = {field.name: getattr(args, field.name) for field in dataclasses.fields(SimCLICConfig)
             if getattr(args, field.name) is not None}
    return config.replace(**given)
