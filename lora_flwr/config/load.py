"""Reading and writing the schema: nested mappings, flat run configs, TOML text.

These helpers work on any tree of schema dataclasses; the schema's builders and
exporters (``ExperimentConfig.from_dict``, ``to_flat``, ...) call them. Flower
run-config values may only be bool/int/float/str, so in the flat form a tuple is
a comma-separated string and a ``tuple | str`` field's regex keeps its ``re:``
prefix.
"""

from __future__ import annotations

import ast
import dataclasses
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lora_flwr.config.choices import REGEX_PREFIX
from lora_flwr.config.fields import convert, field_types, is_pattern_field
from lora_flwr.config.renames import unknown_key_error

FlatValue = bool | int | float | str


def build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build schema class ``cls`` from a nested mapping (a parsed TOML file).

    Raises
    ------
    ValueError
        On an unknown key, a section that is not a table, or (from the schema's
        checks) a value of the wrong type or range, naming the key.
    """
    if not isinstance(data, Mapping):
        raise ValueError(
            f"Config section `{prefix.rstrip('.') or '<root>'}` should be a table "
            f"but the value passed is {data!r}"
        )
    hints = field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise unknown_key_error(full)
        hint = hints[key]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            kwargs[key] = build(hint, value, prefix=full + ".")
        else:
            kwargs[key] = convert(hint, value)
    return cls(**kwargs)


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML experiment file.

    Raises
    ------
    FileNotFoundError
        If ``path`` is not a file.
    ValueError
        If it is not valid TOML.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Config file not found: {path}. Pass an existing TOML file, e.g. "
            "configs/default.toml."
        )
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"Config file {path} is not valid TOML: {exc}") from exc


def to_plain(obj: object) -> Any:
    """Nested plain-Python form: dicts for sections, lists for tuples."""
    out: dict[str, Any] = {}
    hints = field_types(type(obj))
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = to_plain(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        elif isinstance(value, str) and is_pattern_field(hints[f.name]):
            # A regex keeps its prefix so that the builders read it back as one.
            out[f.name] = REGEX_PREFIX + value
        else:
            out[f.name] = value
    return out


def to_flat(obj: object) -> dict[str, FlatValue]:
    """Flat run-config form: dotted keys, lists as comma-separated strings."""
    return dict(_flat_items(to_plain(obj), ""))


def _flat_items(plain: Mapping[str, Any], prefix: str) -> list[tuple[str, FlatValue]]:
    items: list[tuple[str, FlatValue]] = []
    for key, value in plain.items():
        if isinstance(value, Mapping):
            items.extend(_flat_items(value, f"{prefix}{key}."))
        elif isinstance(value, list):
            items.append((prefix + key, ",".join(str(v) for v in value)))
        else:
            items.append((prefix + key, value))
    return items


def toml_value(value: object) -> str:
    """One TOML value: a bool, number, string or list of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def to_toml(obj: object) -> str:
    """TOML text with the top-level keys first, then one table per section."""
    plain = to_plain(obj)
    lines = [f"{k} = {toml_value(v)}" for k, v in plain.items() if not _is_table(v)]
    for name, table in plain.items():
        if _is_table(table):
            lines.append(f"\n[{name}]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def _is_table(value: object) -> bool:
    return isinstance(value, Mapping)


def parse_value(raw: str) -> FlatValue:
    """Parse a command-line value: a Python literal if it is one, else the string."""
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return raw


def unflatten(flat: Mapping[str, FlatValue]) -> dict[str, Any]:
    """Turn ``{"lora.r": 8}`` into ``{"lora": {"r": 8}}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"Config key {key!r} clashes with a value at {part!r}")
            node = child
        node[parts[-1]] = value
    return out


def apply_overrides(
    flat: Mapping[str, FlatValue], overrides: Sequence[str]
) -> dict[str, FlatValue]:
    """``flat`` with ``section.key=value`` overrides applied (values parsed).

    Raises
    ------
    ValueError
        On an override without ``=`` or with a key ``flat`` does not have.
    """
    out = dict(flat)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"Override {item!r} should look like section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in out:
            raise unknown_key_error(key)
        out[key] = parse_value(raw.strip())
    return out
