"""The import layers of docs/architecture.md, checked on every import statement in the source tree.

A module imports only its own layer or lower ones; stages and simulators sit side by side and do not import
each other; simulators never use the runtime. Imports inside functions and under ``TYPE_CHECKING`` count
the same as module-level ones, so no cycle hides in a function body. There is no list of exceptions.

An import inside a function is there only to keep a heavy package (``HEAVY``) out of a lighter import path:
one whose target pulls in, through module-level imports, none that the importing module does not already
pull in belongs at module level. The benchmarks (phasestream_bench) are checked for this too.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = {
    "phasestream": REPO / "stream",
    "phasestream.stages": REPO / "stages",
    "phasestream.models": REPO / "models",
    "phasestream.simulators": REPO / "simulators",
}
# Bottom up; a layer may import itself and everything listed before it.
LAYERS = [
    ("errors", ("phasestream.errors",)),
    ("formats", ("phasestream.formats",)),
    ("models", ("phasestream.models",)),
    ("runtime", ("phasestream.runtime",)),
    ("stages", ("phasestream.stages",)),
    ("simulators", ("phasestream.simulators",)),
    ("apps", ("phasestream.apps", "phasestream.__main__", "phasestream")),
]
# Side-by-side layers that must not import each other although their ranks would allow one direction.
SIBLINGS = {("stages", "simulators"), ("simulators", "stages")}
# Third-party packages a layer must not need: an ingest host runs formats and runtime without torch.
FORBIDDEN_EXTERNAL = {
    "errors": {"torch", "zmq", "h5py", "tiled", "bluesky", "matplotlib"},
    "formats": {"torch", "zmq", "tiled", "bluesky", "matplotlib", "pydantic"},
    "models": {"zmq", "h5py", "tiled", "bluesky", "matplotlib"},
    "runtime": {"torch", "bluesky", "matplotlib", "ophyd"},
    "simulators": {"tiled", "matplotlib"},
}
RANK = {name: rank for rank, (name, _) in enumerate(LAYERS)}
# Packages whose import costs a second or more, or that only an optional extra installs: `phasestream --help`,
# an ingest host and the runtime must not load them unless they use them.
HEAVY = frozenset({"torch", "matplotlib", "bluesky", "ophyd", "event_model", "tiled"})
# Every module a function-level import may sit in: the runtime packages and the benchmarks.
SCANNED_FOLDERS = {**PACKAGE_FOLDERS, "phasestream_bench": REPO / "benchmarks"}
OWN_PACKAGES = ("phasestream", "phasestream_bench")


def layer_of(module: str) -> str | None:
    best = None
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            inside = module == prefix or module.startswith(prefix + ".")
            if inside and (best is None or len(prefix) > len(best[1])):
                best = (name, prefix)
    return best[0] if best else None


def source_modules(folders: dict[str, Path] = PACKAGE_FOLDERS) -> dict[str, Path]:
    modules = {}
    for package, folder in folders.items():
        for path in folder.rglob("*.py"):
            relative = path.relative_to(folder).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            name = ".".join([package, *parts])
            # A folder mapped to its own package belongs to that package, not to the parent's folder walk.
            if not any(
                name.startswith(other + ".") or name == other
                for other in folders
                if other != package and other.startswith(package + ".")
            ):
                modules[name] = path
    return modules


def import_targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The modules (or module attributes) one import statement in ``module`` names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module.split(".")
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    # ``from phasestream.runtime import metrics`` imports the submodule, not just the package.
    return [target, *(f"{target}.{alias.name}" for alias in node.names)]


@cache
def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def imported_names(path: Path, module: str) -> list[tuple[int, str]]:
    tree = parsed(path)
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            found += [(node.lineno, target) for target in import_targets(node, module, is_package)]
    return found


def violations() -> list[str]:
    modules = source_modules()
    problems = []
    for module, path in sorted(modules.items()):
        own = layer_of(module)
        for line, target in imported_names(path, module):
            where = f"{path.relative_to(REPO)}:{line} ({own}) imports {target}"
            top = target.split(".")[0]
            if top == "phasestream":
                if target not in modules and not any(m.startswith(target + ".") for m in modules):
                    continue  # ``from pkg import name`` where name is an attribute, judged by pkg
                theirs = layer_of(target)
                if theirs is None or own is None:
                    problems.append(f"{where}: module outside every layer")
                elif RANK[theirs] > RANK[own] or (own, theirs) in SIBLINGS:
                    problems.append(f"{where}: {theirs} is not below {own}")
            elif top == "phasestream_bench":
                problems.append(f"{where}: the runtime packages never import the benchmarks")
            elif own and top in FORBIDDEN_EXTERNAL.get(own, set()):
                problems.append(f"{where}: the {own} layer must not need {top}")
    return problems


def test_every_module_belongs_to_a_layer() -> None:
    unplaced = [m for m in source_modules() if layer_of(m) is None]
    assert not unplaced


def test_imports_go_only_downwards() -> None:
    problems = violations()
    assert not problems, "\n".join(problems)


@dataclass(frozen=True)
class Imported:
    """One import statement: where it is, as written, and the modules (or attributes) it names."""

    line: int
    statement: str
    targets: list[str]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST, in_function: bool) -> Iterator[tuple[bool, ast.Import | ast.ImportFrom]]:
    """Every import statement under ``node``, with whether it runs inside a function; the body of
    ``if TYPE_CHECKING:`` never runs, its ``else:`` runs on import. Only statements can hold one."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield in_function, child
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for statement in child.orelse:
                yield from _imports(ast.Module(body=[statement], type_ignores=[]), in_function)
        elif isinstance(child, ast.stmt | ast.excepthandler | ast.match_case):
            inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            yield from _imports(child, inside)


@cache
def import_statements() -> dict[str, tuple[list[Imported], list[Imported]]]:
    """For each module of the runtime packages and the benchmarks: the imports that run when it is
    imported, and those inside its functions."""
    found = {}
    for module, path in source_modules(SCANNED_FOLDERS).items():
        is_package = path.name == "__init__.py"
        at_import: list[Imported] = []
        in_functions: list[Imported] = []
        for in_function, node in _imports(parsed(path), False):
            imported = Imported(node.lineno, ast.unparse(node), import_targets(node, module, is_package))
            (in_functions if in_function else at_import).append(imported)
        found[module] = (at_import, in_functions)
    return found


def _own_modules_imported(target: str) -> list[str]:
    """The modules of ours that importing ``target`` runs: each package on its path, then the module."""
    parts = target.split(".")
    prefixes = (".".join(parts[:end]) for end in range(1, len(parts) + 1))
    return [name for name in prefixes if name in import_statements()]


@cache
def third_party_imported(module: str) -> frozenset[str]:
    """Top-level names of the packages (third-party or standard library) that importing ``module`` loads
    through module-level imports, following our own modules transitively."""
    seen, queue, packages = set(), _own_modules_imported(module), set()
    while queue:
        current = queue.pop()
        if current in seen:
            continue
        seen.add(current)
        for imported in import_statements()[current][0]:
            for target in imported.targets:
                top = target.split(".")[0]
                if top in OWN_PACKAGES:
                    queue += _own_modules_imported(target)
                elif top and top != "__future__":
                    packages.add(top)
    return frozenset(packages)


@cache
def _distributions() -> dict[str, list[str]]:
    return packages_distributions()


@cache
def _required_distributions(distribution: str) -> tuple[str, ...]:
    """The distributions an installed one requires (not those only its extras need); none if absent."""
    try:
        requirements = requires(distribution) or []
    except PackageNotFoundError:
        return ()
    names = (re.match(r"[A-Za-z0-9._-]+", r).group() for r in requirements if "extra ==" not in r)
    return tuple(re.sub(r"[-_.]+", "_", name).lower() for name in names)


@cache
def heavy_behind(package: str) -> frozenset[str]:
    """The heavy packages that importing the third-party ``package`` loads: itself if heavy, and those its
    installed distribution requires, transitively (a heavy distribution's name is its import name)."""
    seen: set[str] = set()
    queue = [re.sub(r"[-_.]+", "_", name).lower() for name in _distributions().get(package, [])]
    while queue:
        distribution = queue.pop()
        if distribution not in seen:
            seen.add(distribution)
            queue += _required_distributions(distribution)
    return frozenset(({package} | seen) & HEAVY)


def heavy_pulled(target: str) -> frozenset[str]:
    """The heavy packages that importing ``target`` (a module of ours or a third-party one) loads."""
    if target.split(".")[0] in OWN_PACKAGES:
        packages = third_party_imported(target)
    else:
        packages = {target.split(".")[0]}
    return frozenset().union(*(heavy_behind(package) for package in packages if package))


def needless_function_imports() -> list[str]:
    problems = []
    modules = source_modules(SCANNED_FOLDERS)
    for module, (_, in_functions) in sorted(import_statements().items()):
        own_heavy = heavy_pulled(module)
        for imported in in_functions:
            kept_out = frozenset().union(*map(heavy_pulled, imported.targets)) - own_heavy
            if not kept_out:
                problems.append(
                    f"{modules[module].relative_to(REPO)}:{imported.line} `{imported.statement}` inside a "
                    f"function keeps none of {', '.join(sorted(HEAVY))} out of {module}: "
                    "import it at module level"
                )
    return problems


def test_imports_inside_functions_keep_a_heavy_package_out() -> None:
    problems = needless_function_imports()
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "module",
    [
        "phasestream.apps.cli.main",  # `phasestream --help` and every stage worker start here
        "phasestream_bench.cli",  # loaded for `phasestream --help` through the entry points
        "phasestream_bench.training.cli",
        "phasestream.runtime.registry",
        "phasestream.stages.ingest",
    ],
)
def test_light_import_paths_load_no_heavy_package(module: str) -> None:
    assert module in import_statements()
    assert not heavy_pulled(module), f"{module} loads {sorted(heavy_pulled(module))} on import"


def test_the_heavy_package_analysis_itself() -> None:
    assert "torch" in heavy_pulled("phasestream.models.ptycho.epie")
    assert "numpy" in third_party_imported("phasestream.formats.stream_v2.decode")
    assert not heavy_pulled("phasestream.formats.stream_v2.decode")
    assert heavy_behind("tiled") == {"tiled"}
    assert not heavy_behind("json")


def test_a_third_party_package_brings_the_heavy_ones_its_distribution_requires() -> None:
    if "bluesky_tiled_plugins" not in _distributions():
        pytest.skip("needs the bluesky extra: pip install -e '.[bluesky]'")
    assert {"tiled", "event_model"} <= heavy_behind("bluesky_tiled_plugins")


@pytest.mark.parametrize(
    ("module", "target", "allowed"),
    [
        ("phasestream.stages.refine.stage", "phasestream.models.ptycho.epie", True),
        ("phasestream.models.physics", "phasestream.runtime.stage", False),
        ("phasestream.stages.record", "phasestream.simulators.selun", False),
        ("phasestream.simulators.selun", "phasestream.formats.stream_v2.encode", True),
    ],
)
def test_the_rule_itself(module: str, target: str, allowed: bool) -> None:
    own, theirs = layer_of(module), layer_of(target)
    assert (RANK[theirs] <= RANK[own] and (own, theirs) not in SIBLINGS) is allowed
