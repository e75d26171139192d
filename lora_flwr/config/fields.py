"""Field checks derived from a section's annotations and field metadata.

A schema field states what it accepts once, where it is declared:

* its annotation gives the type (``int``, ``float``, ``bool``, ``str``, a tuple of
  them, or a ``Literal`` alias whose values are the allowed ones);
* :func:`bounded` adds an interval, written as in maths (``"[0, 1)"``);
* :func:`nonempty` and :func:`pattern` constrain strings.

:func:`check_fields` checks every field of a section from those alone, and
:func:`convert` turns a value parsed from TOML or a run config into the annotated
type where that loses nothing (``4.0`` for an int, ``"a,b"`` for a tuple).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from lora_flwr.config.choices import REGEX_PREFIX
from lora_flwr.config.refusals import check_refusals

T = TypeVar("T")

# The intervals most fields use.
AT_LEAST_0 = "[0, inf)"
AT_LEAST_1 = "[1, inf)"
ABOVE_0 = "(0, inf)"

_HINTS: dict[type, dict[str, Any]] = {}
_BOUNDS = "bounds"
_NONEMPTY = "nonempty"
_PATTERN = "pattern"

_INTERVAL = re.compile(r"([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])")
# What a tuple's items must be, by item type.
_ITEMS: dict[type, str] = {str: "non-empty strings", int: "integers"}


@dataclass(frozen=True)
class Bounds:
    """An interval a number (or each item of a tuple of numbers) must lie in."""

    lo: float
    hi: float
    lo_open: bool
    hi_open: bool
    off: float | None = None  # one value outside the interval that means "off"
    why: str = ""  # shown after the interval in an error
    said: str = ""  # says the interval in words instead (PEFT's own wording)

    @classmethod
    def parse(
        cls, text: str, off: float | None = None, why: str = "", said: str = ""
    ) -> Bounds:
        """Read ``"[lo, hi)"``; an end is a number or ``inf``."""
        match = _INTERVAL.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"bad interval {text!r}; write e.g. '[0, 1)'")
        left, lo, hi, right = match.groups()
        try:
            ends = float(lo), float(hi)
        except ValueError:
            raise ValueError(f"bad interval {text!r}: its ends are numbers") from None
        return cls(*ends, left == "(", right == ")", off, why, said)

    def holds(self, value: float) -> bool:
        """Whether ``value`` lies in the interval (or is the ``off`` value)."""
        if self.off is not None and value == self.off:
            return True
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def describe(self) -> str:
        """Say the interval as an error does: ``>= 0``, ``in [0, 1)``."""
        if self.said:
            return self.said
        if self.hi == math.inf:
            text = f"{'>' if self.lo_open else '>='} {self.lo:g}"
        else:
            left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
            text = f"in {left}{self.lo:g}, {self.hi:g}{right}"
        if self.off is not None:
            text = f"{self.off:g} (off) or {text}"
        return f"{text} ({self.why})" if self.why else text


def bounded(
    default: T,
    interval: str,
    *,
    off: float | None = None,
    why: str = "",
    said: str = "",
) -> T:
    """Declare a field whose value (each item of a tuple) lies in ``interval``.

    Parameters
    ----------
    default
        The field's default.
    interval
        ``"[lo, hi]"`` with ``(`` / ``)`` for open ends; ``inf`` for no upper
        bound.
    off
        A value outside the interval that is accepted too (it switches the
        feature off), e.g. ``0`` for a cap that must otherwise be ``>= 1``.
    why
        A few words shown after the interval in an error.
    said
        Words that say the interval instead, where a message must keep a
        wording users know (PEFT's "a positive integer value" for ``r``).
    """
    bounds = Bounds.parse(interval, off, why, said)
    return dataclasses.field(default=default, metadata={_BOUNDS: bounds})


def nonempty(default: str) -> str:
    """Declare a string field that must not be empty."""
    return dataclasses.field(default=default, metadata={_NONEMPTY: True})


def pattern(default: str, regex: str, what: str) -> str:
    """Declare a string field that fully matches ``regex`` (``what``: in words)."""
    return dataclasses.field(
        default=default, metadata={_PATTERN: (re.compile(regex), what)}
    )


def field_types(cls: type) -> dict[str, Any]:
    """Return the resolved annotations of a schema class (cached per class)."""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def check_fields(section: object, prefix: str) -> None:
    """Check every field of ``section`` against its annotation and metadata.

    Parameters
    ----------
    section
        A schema dataclass instance.
    prefix
        How its keys are written, e.g. ``"fed."`` (``""`` at the top level).

    Raises
    ------
    ValueError
        For the first field whose value does not fit, naming the key and value.
    """
    hints = field_types(type(section))
    for f in dataclasses.fields(section):  # type: ignore[arg-type]
        value = getattr(section, f.name)
        wanted = type_problem(hints[f.name], value) or _meta_problem(f.metadata, value)
        if wanted:
            raise ValueError(
                f"`{prefix}{f.name}` should be {wanted} but the value passed is "
                f"{value!r}"
            )


def type_problem(hint: Any, value: object) -> str:
    """Say what ``value`` should be to fit the annotation ``hint``; "" if it fits."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        return "" if value in allowed else "one of " + ", ".join(map(repr, allowed))
    if origin in (types.UnionType, typing.Union):
        problems = [type_problem(arm, value) for arm in typing.get_args(hint)]
        return "" if "" in problems else " or ".join(problems)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        fits = isinstance(value, tuple) and all(
            not type_problem(item, v) and v != "" for v in value
        )
        return "" if fits else f"a list of {_ITEMS[item]}"
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return "" if isinstance(value, hint) else f"a [{hint.__name__}] table"
    if hint is bool:
        return "" if isinstance(value, bool) else "true or false"
    if hint is int:
        return "" if _is_int(value) else "an integer"
    if hint is float:
        if not _is_real(value):
            return "a number"
        return "" if math.isfinite(value) else "a finite number"  # type: ignore[arg-type]
    if hint is str:
        return "" if isinstance(value, str) else "a string"
    raise TypeError(f"the schema has an unsupported annotation {hint!r}")


def _meta_problem(meta: Mapping[str, Any], value: Any) -> str:
    """Say what the field's metadata asks that ``value`` misses; "" if nothing."""
    bounds: Bounds | None = meta.get(_BOUNDS)
    if bounds is not None:
        items = value if isinstance(value, tuple) else (value,)
        if not all(bounds.holds(v) for v in items):
            what = bounds.describe()
            return (
                f"a list of numbers each {what}" if isinstance(value, tuple) else what
            )
    if meta.get(_NONEMPTY) and not value:
        return "a non-empty string"
    if _PATTERN in meta:
        regex, what = meta[_PATTERN]
        if regex.fullmatch(value) is None:
            return str(what)
    return ""


def convert(hint: Any, value: Any) -> Any:
    """``value`` as the annotated type where nothing is lost, else unchanged.

    An integral float becomes an int, an int a float, a list or a comma-separated
    string a tuple. A ``tuple | str`` field (``lora.target_modules``) reads a
    string that starts with ``re:`` as its regex. What cannot be converted is
    returned as it is, for :func:`check_fields` to refuse by name.
    """
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        if isinstance(value, str) and value.startswith(REGEX_PREFIX):
            return value[len(REGEX_PREFIX) :]
        arm = next(a for a in typing.get_args(hint) if typing.get_origin(a) is tuple)
        return convert(arm, value)
    if origin is tuple:
        return _convert_tuple(typing.get_args(hint)[0], value)
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if hint is float and _is_int(value):
        return float(value)
    return value


def _convert_tuple(item: type, value: Any) -> Any:
    if isinstance(value, str):
        parts: list[Any] = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, list | tuple):
        parts = list(value)
    elif item is int and _is_int(value):
        parts = [value]
    else:
        return value
    if item is int:
        parts = [
            int(p) if isinstance(p, str) and p.lstrip("-").isdigit() else p
            for p in parts
        ]
    converted = tuple(parts)
    # Refused as written, so that the error shows what the user typed.
    return value if type_problem(tuple[item, ...], converted) else converted  # type: ignore[valid-type]


def is_pattern_field(hint: Any) -> bool:
    """Whether a field holds either a list or a regex (written with ``re:``)."""
    return typing.get_origin(hint) in (types.UnionType, typing.Union)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_section(section: object, name: str) -> None:
    """Check a section's fields, then the refusals that read only that section.

    Raises
    ------
    ValueError
        For the first field or refusal that does not pass, naming the key.
    """
    check_fields(section, name + ".")
    check_refusals(section, name)
