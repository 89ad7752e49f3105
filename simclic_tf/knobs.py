"""Settings as frozen dataclasses of knobs: a field declared with `knob`
carries its help, choices and range, from which the CLI flags (`cli.py`),
the tuner's search space (`tuning/`) and the checks below are derived, so
that a setting is declared once. `Knobs` is the base of SimCLICConfig and of
the search's, transfer's and fine-tuning's settings.
"""

import dataclasses
import numbers
import typing


class ConfigError(ValueError):
    """A knob has a value that is out of range or makes no sense with another."""


def knob(default, help, choices=None, range=None):
    """A field of a `Knobs` dataclass with the metadata its checks, the CLI and
    the tuner read; `default` dataclasses.MISSING makes its flag required."""
    return dataclasses.field(
        default=default, metadata={"help": help, "choices": choices, "range": range}
    )


def flag(name):
    """The CLI spelling of a config field, used in every error message."""
    return "--" + name.replace("_", "-")


def value_type(field):
    """A field's value type: int for `int` and `Optional[int]`, tuple for
    `Tuple[str, ...]`, and so on."""
    kind = field.type
    if is_optional(field):
        kind = next(t for t in typing.get_args(kind) if t is not type(None))
    return typing.get_origin(kind) or kind


def is_optional(field):
    """Whether a field may be None (unset): its type is `Optional[...]`."""
    return (typing.get_origin(field.type) is typing.Union
            and type(None) in typing.get_args(field.type))


def item_type(field):
    """The type of a tuple field's items: str for `Tuple[str, ...]`."""
    return typing.get_args(field.type)[0]


def choice_names(choices):
    """The accepted values of a field's `choices`: a tuple, or a Registry's names."""
    return choices.names() if hasattr(choices, "names") else choices


TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
              tuple: "a list"}


NUMBER_TYPES = {int: numbers.Integral, float: numbers.Real}


def has_type(value, kind):
    """Whether `value` is a `kind` as a config file must spell it: bool is not
    a number (JSON's true is not 1), an integer is a float, and numpy's
    scalars count as Python's."""
    if kind in NUMBER_TYPES:
        return isinstance(value, NUMBER_TYPES[kind]) and not isinstance(value, bool)
    if kind is tuple:  # a JSON array or nargs="+" flag is a list
        return isinstance(value, (tuple, list))
    return isinstance(value, kind)


def accepted(field):
    """The range or choices of a field, for an error message."""
    bounds, choices = field.metadata["range"], field.metadata["choices"]
    if bounds is not None:
        return f" from {bounds[0]} to {bounds[1]}"
    if choices is not None:
        return f", one of: {', '.join(map(str, choice_names(choices)))}"
    return ""


def checked(field, value, kind=None):
    """`value` as the knob `field` holds it (Python's own number type, a
    tuple for a list), or a ConfigError that names the flag and what it
    accepts: its type, then its choices or range (each item's, for a tuple).
    None passes only where the field is Optional. `kind`: the type to check,
    the field's by default (its items', within a tuple)."""
    if value is None and kind is None and is_optional(field):
        return None
    kind = kind or value_type(field)
    if not has_type(value, kind):
        raise ConfigError(f"{flag(field.name)} {value!r} is not accepted; expected "
                          f"{TYPE_NAMES[kind]}{accepted(field)}")
    if kind is tuple:
        return tuple(checked(field, item, item_type(field)) for item in value)
    if kind in NUMBER_TYPES:  # Python's own, for config.json and the tuner
        value = kind(value)
    choices = field.metadata["choices"]
    if choices is not None and value not in choice_names(choices):
        raise ConfigError(f"{flag(field.name)} {value!r} is not accepted; "
                          f"choose one of: {', '.join(map(str, choice_names(choices)))}")
    bounds = field.metadata["range"]
    if bounds is not None and not bounds[0] <= value <= bounds[1]:
        raise ConfigError(f"{flag(field.name)} {value} is out of range; "
                          f"accepted: {bounds[0]} to {bounds[1]}")
    return value


def knob_fields(knobs):
    """The fields of a Knobs dataclass (or instance) declared with `knob`;
    it may hold others, as a search holds the SimCLICConfig it starts from."""
    return [field for field in dataclasses.fields(knobs) if "help" in field.metadata]


class Knobs:
    """Base of the frozen dataclasses of settings (SimCLICConfig, and the
    search's, transfer's and fine-tuning's): every knob is checked on
    creation against its type, choices and range, so a bad value fails where
    it is given, naming its flag, whether from the CLI, a file or code."""

    def __post_init__(self):
        for field in knob_fields(self):
            object.__setattr__(self, field.name, checked(field, getattr(self, field.name)))
        self._fill_defaults()
        self._check_combinations()

    def _fill_defaults(self):
        """Fills the knobs whose default depends on other knobs (none here)."""

    def _check_combinations(self):
        """Checks that span several knobs (none here)."""

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self):
        return dataclasses.asdict(self)
