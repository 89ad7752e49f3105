"""Command-line flags derived from SimCLICConfig's fields, so that a knob is
declared once (in config.py) and `simclic train`, `simclic tune` and the
saved `config.json` all agree on it."""

import argparse
import dataclasses

from simclic_tf.config import (RECIPE_DIR, SECTIONS, SimCLICConfig, choice_names, flag,
                               read_values, recipe_names, value_type)


_FIELDS = {field.name: field for field in dataclasses.fields(SimCLICConfig)}


def flag_help(field):
    """A config field's help, then its choices or range and its default, once."""
    text = field.metadata["help"]
    choices, bounds = field.metadata["choices"], field.metadata["range"]
    notes = []
    if choices:
        notes.append(f"one of: {', '.join(map(str, choice_names(choices)))}")
    elif bounds:
        notes.append(f"from {bounds[0]:g} to {bounds[1]:g}")
    if field.default is not None and "default:" not in text:
        default = str(field.default).lower() if isinstance(field.default, bool) else field.default
        notes.append(f"default: {default}")
    # argparse formats help with %: a literal one must be doubled.
    return (text + (f" ({'; '.join(notes)})" if notes else "")).replace("%", "%%")


def add_config_flag(parser, name, default=None):
    """The flag of config field `name` (`--batch-size`, `--stop-gradient/
    --no-stop-gradient`, ...), with the field's help, type, choices or range."""
    field = _FIELDS[name]
    kind = value_type(field)
    if kind is bool:
        parser.add_argument(flag(name), action=argparse.BooleanOptionalAction,
                            default=default, help=flag_help(field))
    else:
        parser.add_argument(flag(name), type=kind, default=default, metavar=name.upper(),
                            help=flag_help(field))


def add_config_flags(parser):
    """`--recipe`, `--config`, then one flag per config field, grouped by the
    config's sections. Defaults are None so that only the flags given on the
    command line override a preset or a `--config` file."""
    sources = parser.add_argument_group("config sources (flags given override them)")
    sources.add_argument(
        "--recipe", choices=recipe_names(), metavar="NAME",
        help=f"start from a shipped preset, one of: {', '.join(recipe_names())} (the "
        f"JSON files in {RECIPE_DIR}: copy one, edit it, pass it as --config)")
    sources.add_argument("--config", metavar="FILE",
                         help="JSON config file (all knobs or some) over the preset")
    starts = {first: title for title, first in SECTIONS}
    group = None
    for name in _FIELDS:
        group = parser.add_argument_group(starts[name]) if name in starts else group
        add_config_flag(group, name)
    return parser


def base_config(args):
    """The defaults, then `--recipe`, then `--config`: what the flags override."""
    config = SimCLICConfig.recipe(args.recipe) if args.recipe else SimCLICConfig()
    return SimCLICConfig.load(args.config, config) if args.config else config


def flags_given(args):
    """{knob: value} of the flags given explicitly on the command line."""
    return {name: getattr(args, name) for name in _FIELDS if getattr(args, name) is not None}


def config_from_args(args):
    """The config a parsed command line asks for: `base_config`, then the
    flags given explicitly."""
    return base_config(args).replace(**flags_given(args))


def knobs_given(args, config):
    """{knob: its value in `config`} for every knob the command line sets,
    by `--recipe`, `--config` or a flag: what `--resume` checks against the
    saved run."""
    names = set(flags_given(args))
    if args.recipe:
        names |= set(read_values(RECIPE_DIR / f"{args.recipe}.json"))
    if args.config:
        names |= set(read_values(args.config))
    return {name: getattr(config, name) for name in names}
