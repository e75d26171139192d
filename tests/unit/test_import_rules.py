"""The architecture's import rules, checked on the source of ``lora_flwr/``.

docs/ARCHITECTURE.md draws the arrows; every ``.py`` file of the package is parsed
with :mod:`ast` and each rule below is one test case. An import counts wherever it
stands: at module level, inside a function, under ``if TYPE_CHECKING:`` (it still
ties the two modules together for the type checker) and as
``importlib.import_module("<literal>")``. Relative imports are resolved, and
``from pkg import name`` counts as importing ``pkg.name`` when that is a module.

The "call path" rules follow lora_flwr's own modules transitively (imports that run,
so not those under ``TYPE_CHECKING``) and stop at third-party packages.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "lora_flwr"
STDLIB = "<stdlib>"  # in an allow list: any module of the standard library
ENTRY_DIRS = ("scripts", "benchmarks", "tests")


@dataclass(frozen=True)
class Import:
    """One imported module, where it is imported and whether that import runs."""

    file: str  # path relative to the repository root
    line: int
    importer: str  # dotted name of the importing module
    target: str  # dotted name of the imported module, relative imports resolved
    typing_only: bool = False  # under ``if TYPE_CHECKING:``: never executed
    in_function: bool = False  # runs only when the function is called

    def __str__(self) -> str:
        where = " (under TYPE_CHECKING)" if self.typing_only else ""
        return f"{self.file}:{self.line}: imports {self.target}{where}"


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _literal_import(node: ast.Call) -> str | None:
    """The module of ``importlib.import_module("x")`` / ``__import__("x")``."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    if name not in ("import_module", "__import__") or not node.args:
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value if not arg.value.startswith(".") else None
    return None


class _Collector(ast.NodeVisitor):
    def __init__(
        self, file: str, module: str, is_package: bool, known: frozenset[str]
    ) -> None:
        self.file, self.module, self.known = file, module, known
        self.package = module if is_package else module.rpartition(".")[0]
        self.typing_depth = self.function_depth = 0
        self.found: list[Import] = []

    def _add(self, node: ast.stmt | ast.expr, target: str) -> None:
        imp = Import(
            self.file,
            node.lineno,
            self.module,
            target,
            typing_only=self.typing_depth > 0,
            in_function=self.function_depth > 0,
        )
        if imp not in self.found:  # ``from m import a, b``: m once
            self.found.append(imp)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.function_depth += 1
        self.generic_visit(node)
        self.function_depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.typing_depth += 1
        for stmt in node.body:
            self.visit(stmt)
        self.typing_depth -= 1
        for stmt in node.orelse:
            self.visit(stmt)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module == "__future__":
            return
        base = node.module or ""
        if node.level:
            parts = self.package.split(".")
            if node.level - 1 >= len(parts):
                raise ValueError(f"{self.file}:{node.lineno}: relative import too deep")
            kept = parts[: len(parts) - (node.level - 1)]
            base = ".".join([*kept, node.module] if node.module else kept)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(node, sub if sub in self.known else base)

    def visit_Call(self, node: ast.Call) -> None:
        target = _literal_import(node)
        if target is not None:
            self._add(node, target)
        self.generic_visit(node)


def parse_imports(
    source: str,
    *,
    file: str,
    module: str,
    is_package: bool = False,
    known: Iterable[str] = (),
) -> list[Import]:
    """Every import in ``source``, read as the module ``module`` of file ``file``."""
    collector = _Collector(file, module, is_package, frozenset(known))
    collector.visit(ast.parse(source, filename=file))
    return collector.found


def package_files(root: Path = ROOT) -> dict[Path, str]:
    """File -> dotted module name, for every ``.py`` file under ``lora_flwr/``.

    Keyed by file: ``x.py`` and ``x/__init__.py`` side by side are both read.
    """
    files = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[path] = ".".join(parts)
    return files


@functools.cache
def package_imports() -> tuple[Import, ...]:
    """Every import of every module of the package (parsed once per session)."""
    files = package_files()
    found: list[Import] = []
    for path, module in files.items():
        found += parse_imports(
            path.read_text(encoding="utf-8"),
            file=path.relative_to(ROOT).as_posix(),
            module=module,
            is_package=path.name == "__init__.py",
            known=files.values(),
        )
    return tuple(found)


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _is_stdlib(name: str) -> bool:
    return name.partition(".")[0] in sys.stdlib_module_names


@dataclass(frozen=True)
class Rule:
    """One import rule: which modules it covers and which targets break it."""

    id: str
    text: str  # the rule in words, as a failure prints it
    scope: tuple[str, ...]  # these modules and everything under them
    allow: tuple[str, ...] | None = None  # if set: only these (and STDLIB)
    deny: tuple[str, ...] = ()  # never these ...
    unless: tuple[str, ...] = ()  # ... except these
    exempt: tuple[str, ...] = ()  # parts of the scope the rule does not cover
    call_path: bool = False  # also third-party imports run through our modules
    optional: bool = False  # the scope may not exist yet

    def covers(self, module: str) -> bool:
        """Whether the rule applies to ``module``."""
        return _under(module, self.scope) and not _under(module, self.exempt)

    def breaks(self, target: str) -> bool:
        """Whether importing ``target`` breaks the rule."""
        if self.allow is not None:
            allowed = _under(target, self.allow) or (
                STDLIB in self.allow and _is_stdlib(target)
            )
            if not allowed:
                return True
        return _under(target, self.deny) and not _under(target, self.unless)


def _runtime_graph(imports: Iterable[Import]) -> dict[str, set[str]]:
    """Module -> the package modules its executed imports run (parents included)."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.importer, set())
        if imp.typing_only or not _under(imp.target, (PACKAGE,)):
            continue
        parts = imp.target.split(".")
        graph[imp.importer].update(
            ".".join(parts[:i]) for i in range(1, len(parts) + 1)
        )
    return graph


def _path_to(graph: Mapping[str, set[str]], start: str, goal: str) -> list[str]:
    """Shortest import chain from ``start`` to ``goal`` (breadth first)."""
    parent: dict[str, str] = {start: start}
    queue = [start]
    for node in queue:
        if node == goal:
            break
        for nxt in sorted(graph.get(node, ())):
            if nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    chain = [goal]
    while chain[-1] != start:
        chain.append(parent[chain[-1]])
    return chain[::-1]


def check(rule: Rule, imports: Sequence[Import]) -> list[str]:
    """One line per import that breaks ``rule``: file, line, import and chain."""
    lines = [
        f"{imp} -- breaks: {rule.text}"
        for imp in imports
        if rule.covers(imp.importer) and rule.breaks(imp.target)
    ]
    if not rule.call_path:
        return lines
    graph = _runtime_graph(imports)
    by_module: dict[str, list[Import]] = {}
    for imp in imports:
        if not imp.typing_only:
            by_module.setdefault(imp.importer, []).append(imp)
    chains: dict[Import, str] = {}  # each offending import once, first chain found
    for start in sorted(m for m in graph if rule.covers(m)):
        # Modules the rule covers were checked above, import by import.
        for module in sorted(_reachable(graph, start)):
            for imp in by_module.get(module, ()) if not rule.covers(module) else ():
                if not _under(imp.target, (PACKAGE,)) and rule.breaks(imp.target):
                    chain = " -> ".join(_path_to(graph, start, module))
                    chains.setdefault(imp, chain)
    return lines + [
        f"{imp} -- reached by {chain} -- breaks: {rule.text}"
        for imp, chain in chains.items()
    ]


def _reachable(graph: Mapping[str, set[str]], start: str) -> set[str]:
    seen = {start}
    stack = [start]
    while stack:
        for nxt in graph.get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _local_script_names() -> tuple[str, ...]:
    """Module names of scripts, benchmarks and tests (importable through sys.path)."""
    installed = set(importlib.metadata.packages_distributions())
    stems = {
        p.stem
        for d in ENTRY_DIRS
        for p in (ROOT / d).rglob("*.py")
        if p.stem not in sys.stdlib_module_names and p.stem not in installed
    }
    return ("run_simulation", *ENTRY_DIRS, *sorted(stems - {"__init__"}))


def _leaf(name: str, text: str, *third_party: str) -> Rule:
    return Rule(
        id=f"leaf-{name}",
        text=f"{name}.py is a leaf: {text}, nothing from lora_flwr",
        scope=(f"{PACKAGE}.{name}",),
        allow=(STDLIB, *third_party),
    )


P = PACKAGE
RULES = (
    Rule(
        id="lora-pure-torch",
        text="lora/ imports only stdlib, torch, safetensors, numpy, lora_flwr.lora "
        "and the leaves config, validation, atomic, dropout",
        scope=(f"{P}.lora",),
        allow=(STDLIB, "torch", "safetensors", "numpy", f"{P}.lora")
        + tuple(f"{P}.{m}" for m in ("config", "validation", "atomic", "dropout")),
    ),
    Rule(
        id="aggregation-pure-numpy",
        text="aggregation/ imports only stdlib, numpy, lora_flwr.aggregation, "
        "protocol, validation and config",
        scope=(f"{P}.aggregation",),
        allow=(STDLIB, "numpy", f"{P}.aggregation")
        + tuple(f"{P}.{m}" for m in ("protocol", "validation", "config")),
    ),
    Rule(
        id="flwr-only-in-fl",
        text="only lora_flwr/fl/ imports flwr",
        scope=(P,),
        exempt=(f"{P}.fl",),
        deny=("flwr",),
    ),
    Rule(
        id="config-imports-nothing-above",
        text="config imports nothing from lora_flwr outside itself",
        scope=(f"{P}.config",),
        deny=(P,),
        unless=(f"{P}.config",),
    ),
    Rule(
        id="server-without-flower-or-torch",
        text="server/ imports no flwr, no torch and nothing from lora_flwr.fl",
        scope=(f"{P}.server",),
        deny=("flwr", "torch", f"{P}.fl"),
    ),
    Rule(
        id="deploy-drives-the-cli",
        text="deploy/ imports no flwr module (it drives Flower's CLI)",
        scope=(f"{P}.deploy",),
        deny=("flwr",),
    ),
    Rule(
        id="training-below-fl",
        text="training/ imports neither lora_flwr.fl nor flwr",
        scope=(f"{P}.training",),
        deny=("flwr", f"{P}.fl"),
    ),
    Rule(
        id="evaluation-below-models",
        text="evaluation/ imports only stdlib, torch, datasets, lora_flwr.evaluation "
        "and assets (the benchmark takes a model; it loads none)",
        scope=(f"{P}.evaluation",),
        allow=(STDLIB, "torch", "datasets", f"{P}.evaluation", f"{P}.assets"),
    ),
    Rule(
        id="no-entry-points",
        text="lora_flwr imports no run_simulation, scripts, benchmarks or tests",
        scope=(P,),
        deny=_local_script_names(),
    ),
    Rule(
        id="no-flower-in-call-path",
        text="lora/, aggregation/, server/, training/, config/, deploy/, the leaves "
        "and fl's runner work with no Flower in the call path",
        scope=tuple(
            f"{P}.{m}"
            for m in (
                "lora",
                "aggregation",
                "server",
                "training",
                "config",
                "protocol",
                "validation",
                "compression",
                "deploy",
                "lifecycle",
                "results",
                "evaluation",
                "fl.runner",
            )
        ),
        deny=("flwr",),
        call_path=True,
    ),
    Rule(
        id="no-torch-in-call-path",
        text="aggregation/, server/ and fl/strategy.py run without torch or "
        "transformers",
        scope=(f"{P}.aggregation", f"{P}.server", f"{P}.fl.strategy"),
        deny=("torch", "transformers"),
        call_path=True,
    ),
    _leaf("protocol", "standard library only"),
    _leaf("validation", "numpy only", "numpy"),
    _leaf("compression", "numpy and zlib only", "numpy"),
    _leaf("profiling", "standard library only"),
    _leaf("atomic", "standard library only"),
    _leaf("machine", "standard library only"),
    _leaf("dropout", "torch only", "torch"),
    _leaf("heap", "ctypes only"),
)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.id)
def test_import_rule(rule: Rule) -> None:
    # Execute
    broken = check(rule, package_imports())

    # Assert
    assert not broken, f"{len(broken)} import(s) break {rule.id}:\n" + "\n".join(broken)


def _unit(module: str) -> str:
    """The top-level subpackage or module of lora_flwr that ``module`` is in."""
    return ".".join(module.split(".")[:2])


def unit_cycles(imports: Iterable[Import]) -> list[str]:
    """The shortest import cycle through each edge between lora_flwr's top units.

    One line per distinct cycle: ``a -> b (file:line) -> a (file:line)``.
    """
    edges: dict[tuple[str, str], Import] = {}
    for imp in imports:
        src, dst = _unit(imp.importer), _unit(imp.target)
        if _under(imp.target, (PACKAGE,)) and src != dst and dst != PACKAGE:
            edges.setdefault((src, dst), imp)
    graph: dict[str, set[str]] = {}
    for src, dst in edges:
        graph.setdefault(src, set()).add(dst)
    cycles: dict[frozenset[tuple[str, str]], str] = {}
    for src, dst in sorted(edges):
        if src not in _reachable(graph, dst):
            continue
        nodes = [src, *_path_to(graph, dst, src)]
        pairs = list(zip(nodes, nodes[1:], strict=False))
        text = nodes[0] + "".join(
            f" -> {b} ({edges[a, b].file}:{edges[a, b].line})" for a, b in pairs
        )
        cycles.setdefault(frozenset(pairs), text)
    return sorted(cycles.values(), key=lambda t: (t.count(" -> "), t))


def test_no_import_cycles_between_top_level_units() -> None:
    # Execute
    cycles = unit_cycles(package_imports())

    # Assert
    assert not cycles, "import cycles between lora_flwr's subpackages:\n" + "\n".join(
        cycles
    )


# ------------------------------------------------------------- the checker itself
SYNTHETIC = """\
from typing import TYPE_CHECKING
import numpy as np
from . import layers
from ..fl.strategy import FedLoRA
from lora_flwr import protocol
if TYPE_CHECKING:
    import flwr.common
def f():
    import importlib
    from flwr.server import ServerApp
    return importlib.import_module("transformers")
"""
KNOWN = ("lora_flwr.lora.layers", "lora_flwr.fl.strategy", "lora_flwr.protocol")


def test_parse_imports_sees_every_kind_of_import() -> None:
    # Execute
    found = parse_imports(
        SYNTHETIC, file="x/fake.py", module="lora_flwr.lora.fake", known=KNOWN
    )

    # Assert
    assert [(i.line, i.target, i.typing_only, i.in_function) for i in found] == [
        (1, "typing", False, False),
        (2, "numpy", False, False),
        (3, "lora_flwr.lora.layers", False, False),
        (4, "lora_flwr.fl.strategy", False, False),
        (5, "lora_flwr.protocol", False, False),
        (7, "flwr.common", True, False),
        (9, "importlib", False, True),
        (10, "flwr.server", False, True),
        (11, "transformers", False, True),
    ]


def test_a_broken_rule_is_reported_with_file_line_and_import() -> None:
    # Prepare
    found = parse_imports(
        SYNTHETIC, file="x/fake.py", module="lora_flwr.lora.fake", known=KNOWN
    )
    rules = {r.id: r for r in RULES}

    # Execute
    lora = check(rules["lora-pure-torch"], found)
    flwr = check(rules["flwr-only-in-fl"], found)

    # Assert
    assert [line.split(" -- ")[0] for line in lora] == [
        "x/fake.py:4: imports lora_flwr.fl.strategy",
        "x/fake.py:5: imports lora_flwr.protocol",
        "x/fake.py:7: imports flwr.common (under TYPE_CHECKING)",
        "x/fake.py:10: imports flwr.server",
        "x/fake.py:11: imports transformers",
    ]
    assert [line.split(" -- ")[0] for line in flwr] == [
        "x/fake.py:7: imports flwr.common (under TYPE_CHECKING)",
        "x/fake.py:10: imports flwr.server",
    ]
    assert all(line.endswith("only lora_flwr/fl/ imports flwr") for line in flwr)


def test_the_call_path_rule_follows_our_modules_but_not_typing_imports() -> None:
    # Prepare: x -> config -> fl.owners -> flwr, each import executed; then x
    # reaching fl.owners only under TYPE_CHECKING.
    known = ("lora_flwr.config", "lora_flwr.fl", "lora_flwr.fl.owners")
    found = [
        *parse_imports("import lora_flwr.config\n", file="x.py", module="lora_flwr.x"),
        *parse_imports(
            "def f():\n    from lora_flwr.fl import owners\n",
            file="c.py",
            module="lora_flwr.config",
            known=known,
        ),
        *parse_imports("import flwr\n", file="o.py", module="lora_flwr.fl.owners"),
    ]
    rule = Rule(id="t", text="no flwr", scope=("lora_flwr.x",), deny=("flwr",))
    typing_only = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\n"
    hidden = parse_imports(
        typing_only.replace("import a", "from lora_flwr.fl import owners"),
        file="y.py",
        module="lora_flwr.x",
        known=known,
    )

    # Execute
    direct = check(rule, found)
    reached = check(replace(rule, call_path=True), found)
    not_run = check(replace(rule, call_path=True), hidden + found[2:])

    # Assert
    assert direct == []
    assert reached == [
        "o.py:1: imports flwr -- reached by lora_flwr.x -> lora_flwr.config -> "
        "lora_flwr.fl.owners -- breaks: no flwr"
    ]
    assert not_run == []


def test_cycles_between_units_are_found_and_named() -> None:
    # Prepare
    found = [
        *parse_imports("import lora_flwr.b.x\n", file="a.py", module="lora_flwr.a"),
        *parse_imports("import lora_flwr.a\n", file="b/x.py", module="lora_flwr.b.x"),
        *parse_imports("import lora_flwr.a\n", file="c.py", module="lora_flwr.c"),
    ]

    # Execute
    cycles = unit_cycles(found)

    # Assert
    assert cycles == ["lora_flwr.a -> lora_flwr.b (a.py:1) -> lora_flwr.a (b/x.py:1)"]


def test_the_scan_sees_the_whole_package() -> None:
    # Prepare
    files = package_files()
    importers = {i.importer for i in package_imports()}

    # Assert: non-empty, the known modules, and every required scope has files
    assert len(files) > 50
    assert {"lora_flwr.config", "lora_flwr.fl.strategy", "lora_flwr.lora"} <= set(
        files.values()
    )
    for rule in RULES:
        if not rule.optional:
            assert any(rule.covers(m) for m in importers), rule.id
