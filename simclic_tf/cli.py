"""Command-line flags derived from the fields of a knobs dataclass
(SimCLICConfig, the search's and the transfer's settings), so that a knob is
declared once (knobs.py) and `simclic train`, `tune` and `transfer`, and the
saved `config.json`, all agree on it."""

import argparse
import dataclasses

from simclic_tf.config import (RECIPE_DIR, SECTIONS, ConfigError, SimCLICConfig, read_values,
                               recipe_names)
from simclic_tf.knobs import choice_names, flag, item_type, knob_fields, value_type


def flag_help(field):
    """A knob's help, then its choices or range and its default, once."""
    text = field.metadata["help"]
    choices, bounds = field.metadata["choices"], field.metadata["range"]
    notes = []
    if choices:
        notes.append(f"one of: {', '.join(map(str, choice_names(choices)))}")
    elif bounds:
        notes.append(f"from {bounds[0]:g} to {bounds[1]:g}")
    if field.default not in (None, (), dataclasses.MISSING) and "default:" not in text:
        default = str(field.default).lower() if isinstance(field.default, bool) else field.default
        notes.append(f"default: {default}")
    # argparse formats help with %: a literal one must be doubled.
    return (text + (f" ({'; '.join(notes)})" if notes else "")).replace("%", "%%")


def add_knob_flag(parser, field):
    """The flag of the knob `field` (`--batch-size`, `--stop-gradient/
    --no-stop-gradient`, `--tune A B`), with its help and type, required
    where the field has no default. Its default is None and its value is
    left to the dataclass to check, so that a flag, a file and code get the
    same error."""
    kind, name = value_type(field), field.name
    options = dict(help=flag_help(field), required=field.default is dataclasses.MISSING)
    if kind is bool:
        parser.add_argument(flag(name), action=argparse.BooleanOptionalAction, **options)
    elif kind is tuple:
        parser.add_argument(flag(name), type=item_type(field), nargs="+",
                            metavar=name.upper(), **options)
    else:
        parser.add_argument(flag(name), type=kind, metavar=name.upper(), **options)


def add_knob_flags(parser, knobs, sections=()):
    """One flag per knob of the dataclass `knobs`, in field order; `sections`
    ((title, first field) pairs) puts them in argument groups from that field on."""
    starts = {first: title for title, first in sections}
    group = parser
    for field in knob_fields(knobs):
        group = parser.add_argument_group(starts[field.name]) if field.name in starts else group
        add_knob_flag(group, field)
    return parser


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
    return add_knob_flags(parser, SimCLICConfig, SECTIONS)


def base_config(args):
    """The defaults, then `--recipe`, then `--config`: what the flags override."""
    config = SimCLICConfig.recipe(args.recipe) if args.recipe else SimCLICConfig()
    return SimCLICConfig.load(args.config, config) if args.config else config


def flags_given(args, knobs=SimCLICConfig):
    """{knob: value} of the flags of the dataclass `knobs` given explicitly
    on the command line."""
    return {field.name: getattr(args, field.name) for field in knob_fields(knobs)
            if getattr(args, field.name) is not None}


def config_flags_given(args):
    """`flags_given` of the config's knobs, refusing `--epochs` beside
    `--time-budget`, which sizes the epochs itself."""
    given = flags_given(args)
    if "time_budget" in given and "epochs" in given:
        raise ConfigError(f"{flag('epochs')} and {flag('time_budget')} both set how long "
                          "pretraining runs; give one of them")
    return given


def config_from_args(args):
    """The config a parsed command line asks for: `base_config`, then
    `--method`'s knobs (`SimCLICConfig.for_method`), then the flags given
    explicitly."""
    return SimCLICConfig.from_dict(config_flags_given(args), base_config(args))


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
