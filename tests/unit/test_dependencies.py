"""Every third-party module the code imports is a dependency it declares itself.

A package that arrives only through another one (psutil through peft and
accelerate) leaves with that package's next release, so pyproject.toml names each
one. Imports are mapped to distributions with ``packages_distributions()``; names
are compared in their normalised form. Packages of opt-in features are extras
(``dp``), imported only inside the functions that need them, and the ``dev`` extra
(what ``make install`` installs) includes every extra.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from test_import_rules import PACKAGE, ROOT, Import, package_imports, parse_imports

DEV_TREES = ("tests", "benchmarks", "scripts")
DEV_FILES = ("run_simulation.py",)
TOOL_EXTRAS = frozenset({"test", "bench", "dev"})  # for developers, not features


def normalise(name: str) -> str:
    """A distribution name in its canonical form (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement(spec: str) -> tuple[str, frozenset[str]]:
    """The normalised name and extras of a requirement string."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", spec)
    if match is None:
        raise ValueError(f"Unknown requirement: {spec!r}")
    extras = (normalise(e.strip()) for e in (match[2] or "").split(",") if e.strip())
    return normalise(match[1]), frozenset(extras)


@functools.cache
def project() -> dict[str, Any]:
    """The ``[project]`` table of pyproject.toml."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        table: dict[str, Any] = tomllib.load(f)["project"]
    return table


def declared(table: Mapping[str, Any], extras: Iterable[str] = ()) -> set[str]:
    """Distributions the base install declares, plus those of ``extras``.

    A self-reference (``lora_flwr[test]`` inside ``dev``) is followed.
    """
    own = normalise(table["name"])
    optional = {
        normalise(k): list(v) for k, v in table.get("optional-dependencies", {}).items()
    }
    queue = list(table.get("dependencies", []))
    pending = [normalise(e) for e in extras]
    seen: set[str] = set()
    names: set[str] = set()
    while queue or pending:
        if not queue:
            extra = pending.pop()
            if extra not in seen:
                seen.add(extra)
                queue += optional[extra]
            continue
        name, wanted = requirement(queue.pop())
        if name == own:
            pending += wanted
        else:
            names.add(name)
    return names


def feature_extras(table: Mapping[str, Any]) -> list[str]:
    """Extras that switch a feature on (the tool extras left out)."""
    extras = table.get("optional-dependencies", {})
    return sorted(normalise(e) for e in extras if normalise(e) not in TOOL_EXTRAS)


def third_party(
    imports: Iterable[Import], local: Iterable[str] = ()
) -> dict[str, list[Import]]:
    """Top-level third-party module -> its imports (stdlib and ours left out)."""
    skip = {PACKAGE, "__future__", *local}
    found: dict[str, list[Import]] = {}
    for imp in imports:
        top = imp.target.partition(".")[0]
        if top not in sys.stdlib_module_names and top not in skip:
            found.setdefault(top, []).append(imp)
    return found


def undeclared(
    found: Mapping[str, Sequence[Import]],
    names: set[str],
    providers: Mapping[str, Sequence[str]],
) -> list[str]:
    """One line per module whose distribution is not among ``names``."""
    lines = []
    for top, imports in sorted(found.items()):
        dists = sorted({normalise(d) for d in providers.get(top, ())})
        if set(dists) & names:
            continue
        more = f" (and {len(imports) - 1} more)" if len(imports) > 1 else ""
        source = f"distribution {', '.join(dists)}" if dists else "nothing installed"
        lines.append(f"{imports[0]}{more}: {source}, not declared in pyproject.toml")
    return lines


@functools.cache
def dev_imports() -> tuple[tuple[Import, ...], frozenset[str]]:
    """Imports of the tests, benchmarks, scripts and run_simulation.py.

    Also returns their own module names (imported through ``sys.path``).
    """
    paths = [p for d in DEV_TREES for p in sorted((ROOT / d).rglob("*.py"))]
    paths += [ROOT / f for f in DEV_FILES]
    found: list[Import] = []
    for path in paths:
        rel = path.relative_to(ROOT).as_posix()
        source = path.read_text(encoding="utf-8")
        found += parse_imports(source, file=rel, module=rel[:-3].replace("/", "."))
    return tuple(found), frozenset({p.stem for p in paths} | set(DEV_TREES))


@functools.cache
def _providers() -> Mapping[str, Sequence[str]]:
    return importlib.metadata.packages_distributions()


def test_every_third_party_import_of_the_package_is_declared() -> None:
    # Prepare
    table = project()
    names = declared(table, feature_extras(table))

    # Execute
    missing = undeclared(third_party(package_imports()), names, _providers())

    # Assert
    assert not missing, "\n".join(missing)


def test_every_import_of_tests_benchmarks_and_scripts_is_installed_by_dev() -> None:
    # Prepare
    imports, local = dev_imports()

    # Execute
    found = third_party(imports, local)
    missing = undeclared(found, declared(project(), ["dev"]), _providers())

    # Assert
    assert len(found) > 5
    assert not missing, "\n".join(missing)


def test_dev_installs_every_extra() -> None:
    # Prepare
    table = project()
    dev = declared(table, ["dev"])

    # Execute
    left_out = {
        extra: sorted(declared(table, [extra]) - dev)
        for extra in table["optional-dependencies"]
    }

    # Assert
    assert {k: v for k, v in left_out.items() if v} == {}


def test_dp_accounting_is_the_dp_extra() -> None:
    # Prepare
    table = project()

    # Assert
    assert "dp-accounting" not in declared(table)
    assert "dp-accounting" in declared(table, ["dp"])
    assert "dp" in feature_extras(table)


def test_the_packages_of_extras_are_imported_only_inside_functions() -> None:
    # Prepare: the top-level modules each feature extra adds to the base install
    table = project()
    base = declared(table)
    modules = {
        top: extra
        for extra in feature_extras(table)
        for top, dists in _providers().items()
        if {normalise(d) for d in dists} & (declared(table, [extra]) - base)
    }

    # Execute
    eager = [
        f"{imp}: at import time, so lora_flwr fails to import without the "
        f"`{modules[top]}` extra"
        for top, imports in third_party(package_imports()).items()
        if top in modules
        for imp in imports
        if not (imp.in_function or imp.typing_only)
    ]

    # Assert
    assert "dp_accounting" in modules
    assert not eager, "\n".join(eager)


# ------------------------------------------------------------- the checks themselves
def test_requirement_names_are_normalised_with_their_extras() -> None:
    # Execute / Assert
    assert requirement("flwr[simulation]>=1.42") == ("flwr", frozenset({"simulation"}))
    assert requirement("lora_flwr[test, dp]") == (
        "lora-flwr",
        frozenset({"test", "dp"}),
    )
    assert requirement("Huggingface_Hub>=0.34 ; python_version>'3'") == (
        "huggingface-hub",
        frozenset(),
    )


def test_declared_follows_the_project_s_own_extras() -> None:
    # Prepare
    table = {
        "name": "lora-flwr",
        "dependencies": ["numpy>=1"],
        "optional-dependencies": {
            "dp": ["dp-accounting"],
            "test": ["pytest"],
            "dev": ["lora_flwr[test,dp]", "ruff"],
        },
    }

    # Execute / Assert
    assert declared(table) == {"numpy"}
    assert declared(table, ["dev"]) == {"numpy", "dp-accounting", "pytest", "ruff"}
    assert feature_extras(table) == ["dp"]


def test_a_module_that_arrives_through_another_package_is_reported() -> None:
    # Prepare: psutil is installed (through accelerate) but not declared
    found = parse_imports(
        "import numpy\nimport psutil\n\ndef f():\n    import psutil.tests\n",
        file="lora_flwr/x.py",
        module="lora_flwr.x",
    )
    providers = {"numpy": ["numpy"], "psutil": ["psutil"]}

    # Execute
    missing = undeclared(third_party(found), {"numpy"}, providers)

    # Assert
    assert missing == [
        "lora_flwr/x.py:2: imports psutil (and 1 more): distribution psutil, "
        "not declared in pyproject.toml"
    ]
