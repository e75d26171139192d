"""Field checks derived from annotations and metadata, and the package's imports."""

from __future__ import annotations

import ast
import dataclasses
import math
import sys
import typing
from pathlib import Path
from typing import Any, Literal

import pytest

from lora_flwr.config import ExperimentConfig
from lora_flwr.config.fields import Bounds, field_types

CONFIG_DIR = Path(__file__).resolve().parents[2] / "lora_flwr" / "config"


def _fields() -> list[tuple[str, dataclasses.Field[Any], Any]]:
    """(dotted key, field, annotation) for every leaf field of the schema."""
    out = []
    for section in dataclasses.fields(ExperimentConfig):
        hint = field_types(ExperimentConfig)[section.name]
        if not dataclasses.is_dataclass(hint):
            out.append((section.name, section, hint))
            continue
        hints = field_types(typing.cast(type, hint))
        for f in dataclasses.fields(hint):
            out.append((f"{section.name}.{f.name}", f, hints[f.name]))
    return out


LITERALS = [(k, h) for k, _, h in _fields() if typing.get_origin(h) is Literal]
BOUNDED = [
    (k, f.metadata["bounds"], h) for k, f, h in _fields() if "bounds" in f.metadata
]


def test_the_schema_has_literal_and_bounded_fields() -> None:
    # Prepare / Execute / Assert: the parametrised tests below are not empty
    assert len(LITERALS) >= 15
    assert len(BOUNDED) >= 50


@pytest.mark.parametrize(("key", "hint"), LITERALS, ids=[k for k, _ in LITERALS])
def test_every_literal_field_refuses_a_bad_value_listing_the_allowed(
    key: str, hint: Any
) -> None:
    # Prepare
    allowed = typing.get_args(hint)

    # Execute
    with pytest.raises(ValueError) as info:
        ExperimentConfig.from_flat({key: "no-such-choice"})

    # Assert
    message = str(info.value)
    assert message.startswith(f"`{key}` should be one of ")
    assert "'no-such-choice'" in message
    for name in allowed:
        assert repr(name) in message, name


@pytest.mark.parametrize(("key", "hint"), LITERALS, ids=[k for k, _ in LITERALS])
def test_every_literal_field_accepts_its_default(key: str, hint: Any) -> None:
    # Prepare / Execute
    value = ExperimentConfig().to_flat()[key]

    # Assert
    assert value in typing.get_args(hint)


def _outside(bounds: Bounds, hint: Any) -> list[float]:
    """Values just outside the interval (a sibling end read at its default)."""
    step = 1 if hint is int or typing.get_args(hint) == (int, ...) else 0.5
    ends = {"num_clients": ExperimentConfig().fed.num_clients}
    lo = ends.get(str(bounds.lo), bounds.lo)
    hi = ends.get(str(bounds.hi), bounds.hi)
    assert isinstance(lo, int | float) and isinstance(hi, int | float)
    values = [lo if bounds.lo_open else lo - step]
    if math.isfinite(hi):
        values.append(hi if bounds.hi_open else hi + step)
    kind = int if step == 1 else float
    return [kind(v) for v in values if v != bounds.off]


@pytest.mark.parametrize(
    ("key", "bounds", "hint"), BOUNDED, ids=[k for k, _, _ in BOUNDED]
)
def test_every_bounded_field_refuses_a_value_outside_its_interval(
    key: str, bounds: Bounds, hint: Any
) -> None:
    for value in _outside(bounds, hint):
        # Prepare
        raw: Any = str(int(value)) if typing.get_origin(hint) is tuple else value

        # Execute
        with pytest.raises(ValueError) as info:
            ExperimentConfig.from_flat({key: raw})

        # Assert: the key, the value and the interval are named
        message = str(info.value)
        assert message.startswith(f"`{key}` should be "), message
        assert repr(value) in message or repr((int(value),)) in message, message


@pytest.mark.parametrize(
    ("text", "inside", "outside", "said"),
    [
        ("[0, 1)", [0.0, 0.999], [-0.1, 1.0], "in [0, 1)"),
        ("(0, 1]", [1e-9, 1.0], [0.0, 1.1], "in (0, 1]"),
        ("[1, inf)", [1, 1e9], [0.5], ">= 1"),
        ("(0, inf)", [1e-9], [0.0, -1.0], "> 0"),
    ],
)
def test_an_interval_holds_what_it_says(
    text: str, inside: list[float], outside: list[float], said: str
) -> None:
    # Prepare / Execute
    bounds = Bounds.parse(text)

    # Assert
    assert all(bounds.holds(v) for v in inside)
    assert not any(bounds.holds(v) for v in outside)
    assert bounds.describe() == said


def test_an_interval_can_have_an_off_value() -> None:
    # Prepare
    cap = Bounds.parse("[1, inf)", off=0.0, why="a multiple")

    # Execute / Assert
    assert cap.holds(0.0) and cap.holds(1.0) and not cap.holds(0.5)
    assert cap.describe() == "0 (off) or >= 1 (a multiple)"


@pytest.mark.parametrize(
    "text", ["0, 1", "[0; 1]", "[a-b, 1]", "[0, 1", "[1, num_clients]"]
)
def test_a_malformed_interval_is_refused(text: str) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match="bad interval"):
        Bounds.parse(text)


@pytest.mark.parametrize(
    ("key", "value", "said"),
    [
        ("train.lr", float("nan"), "a finite number"),
        ("server_opt.lr", float("inf"), "a finite number"),
        ("lora.r", 2.5, "an integer"),
        ("secagg.enabled", "yes", "true or false"),
        ("fed.rank_tiers", "4,x", "a list of integers"),
        ("lora.modules_to_save", ["a", 3], "a list of non-empty strings"),
        ("compute.device", "tpu", "one of 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'"),
        ("name", "../up", "one folder name"),
        ("data.name", "", "a non-empty string"),
    ],
)
def test_a_value_of_the_wrong_kind_is_refused_by_name(
    key: str, value: object, said: str
) -> None:
    # Prepare / Execute
    with pytest.raises(ValueError) as info:
        ExperimentConfig.from_flat({key: value})  # type: ignore[dict-item]

    # Assert
    message = str(info.value)
    assert message.startswith(f"`{key}` should be {said}")
    assert f" but the value passed is {value!r}" in message


@pytest.mark.parametrize(
    ("key", "value", "kept"),
    [
        ("lora.r", 4.0, 4),
        ("lora.lora_alpha", 16, 16.0),
        ("fed.rank_tiers", 8, (8,)),
        ("fed.rank_tiers", [4, 8], (4, 8)),
        ("lora.target_modules", "re:.*q", ".*q"),
        ("compute.device", "cuda:1", "cuda:1"),
    ],
)
def test_a_lossless_conversion_is_made_when_loading(
    key: str, value: object, kept: object
) -> None:
    # Prepare / Execute
    cfg = ExperimentConfig.from_flat({key: value})  # type: ignore[dict-item]
    section, name = key.split(".")

    # Assert
    got = getattr(getattr(cfg, section), name)
    assert got == kept and type(got) is type(kept)


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import"
            names.append(node.module or "")
    return names


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.py")), ids=lambda p: p.name)
def test_the_config_package_imports_only_the_standard_library(path: Path) -> None:
    # Prepare / Execute
    names = _imports(path)

    # Assert: the schema sits below everything else in lora_flwr
    for name in names:
        top = name.split(".")[0]
        assert (
            top in sys.stdlib_module_names
            or top == "__future__"
            or (name == "lora_flwr.config" or name.startswith("lora_flwr.config."))
        ), f"{path.name} imports {name}"
