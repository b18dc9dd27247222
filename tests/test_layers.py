"""The import layers of docs/architecture.md, checked on every import statement in the source tree.

A module imports only its own layer or lower ones; stages and simulators sit side by side and do not import
each other; simulators never use the runtime. Imports inside functions and under ``TYPE_CHECKING`` count
the same as module-level ones, so no cycle hides in a function body. There is no list of exceptions.
"""

from __future__ import annotations

import ast
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


def layer_of(module: str) -> str | None:
    best = None
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            inside = module == prefix or module.startswith(prefix + ".")
            if inside and (best is None or len(prefix) > len(best[1])):
                best = (name, prefix)
    return best[0] if best else None


def source_modules() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGE_FOLDERS.items():
        for path in folder.rglob("*.py"):
            relative = path.relative_to(folder).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            name = ".".join([package, *parts])
            # A folder mapped to its own package belongs to that package, not to the parent's folder walk.
            if not any(
                name.startswith(other + ".") or name == other
                for other in PACKAGE_FOLDERS
                if other != package and other.startswith(package + ".")
            ):
                modules[name] = path
    return modules


def imported_names(path: Path, module: str) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # ``from phasestream.runtime import metrics`` imports the submodule, not just the package.
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
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
