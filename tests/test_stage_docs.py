"""Each stage's page in docs/stages/ holds the table of its options, rendered from its config model.

The table between a page's ``<!-- options: ... -->`` and ``<!-- end of options -->`` lines is generated from
the stage's pydantic ``Config`` (names, types with their bounds, defaults, field descriptions), so a page
cannot drift from the code: after a config model changes, this test fails until

    python -m tests.test_stage_docs

(run from the repository root) rewrites the tables in place. The prose around the tables is written by hand.
"""

from __future__ import annotations

import enum
import re
import sys
import types
import typing
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import annotated_types
import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from phasestream.errors import ConfigError
from phasestream.runtime.registry import STAGES, resolve_stage

REPO = Path(__file__).resolve().parents[1]
STAGES_DOCS = REPO / "docs" / "stages"
BEGIN_PREFIX = "<!-- options:"
END = "<!-- end of options -->"
HEADER = "| option | type | default | description |\n|---|---|---|---|"
# Where the shipped network weights are installed: defaults that point there are shown by file name.
WEIGHTS_DIR = Path(str(resources.files("phasestream.models").joinpath("weights")))
_BOUNDS = (
    (annotated_types.Ge, "ge", "≥"),
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Le, "le", "≤"),
    (annotated_types.Lt, "lt", "<"),
)
_PLAIN_TYPES = {bool: "bool", int: "int", float: "float", str: "string", Path: "path", Any: "any"}


def page_path(stage: str) -> Path:
    return STAGES_DOCS / f"{stage}.md"


def shown_value(value: object) -> str:
    """A default as it would be written in a topology YAML."""
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, enum.Enum):
        return shown_value(value.value)
    if isinstance(value, Path):
        if value.is_absolute() and value.is_relative_to(WEIGHTS_DIR):
            # An install-specific absolute path: say which shipped file it is instead.
            return f"the shipped `models/weights/{value.relative_to(WEIGHTS_DIR)}`"
        return f"`{value}`"
    if isinstance(value, float):
        return f"`{value:.6g}`"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    if isinstance(value, tuple | list):
        return "`[" + ", ".join(shown_value(v).strip("`") for v in value) + "]`"
    return f"`{value}`"


def shown_type(annotation: Any) -> str:
    """A type in words a topology author reads: choices spelled out, nested models as mappings."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return shown_type(args[0])
    if origin in (typing.Union, types.UnionType):
        parts = [shown_type(arg) for arg in args if arg is not type(None)]
        if type(None) in args:
            parts.append("`null`")
        return " or ".join(parts)
    if origin is typing.Literal:
        return " or ".join(shown_value(arg) for arg in args)
    if origin in (tuple, list):
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            return f"list of {shown_type(args[0])}"
        return "[" + ", ".join(shown_type(arg) for arg in args) + "]"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " or ".join(shown_value(member) for member in annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping of " + ", ".join(f"`{name}`" for name in annotation.model_fields)
    return _PLAIN_TYPES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def shown_bounds(info: FieldInfo) -> str:
    """The field's numeric bounds and pattern, as a reader checks a value against them."""
    bounds = []
    for constraint in info.metadata:
        for kind, attribute, sign in _BOUNDS:
            if isinstance(constraint, kind):
                bounds.append(f"{sign} {shown_value(getattr(constraint, attribute)).strip('`')}")
        pattern = getattr(constraint, "pattern", None)
        if pattern is not None:
            bounds.append(f"matching `{pattern}`".replace("|", "\\|"))  # a table cell: escape its pipes
    return ", ".join(bounds)


def default_of(info: FieldInfo) -> object:
    return info.get_default(call_default_factory=True, validated_data={})


def nested_model(info: FieldInfo) -> type[BaseModel] | None:
    """The model of a field that holds exactly one (its options become dotted rows), else None."""
    annotation = info.annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def option_rows(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    for name, info in model.model_fields.items():
        inner = nested_model(info)
        kind = "mapping" if inner is not None else shown_type(info.annotation)
        bounds = shown_bounds(info)
        kind = f"{kind}, {bounds}" if bounds else kind
        if info.is_required():
            default = "required"
        elif inner is not None:
            default = "see below"
        else:
            default = shown_value(default_of(info))
        description = " ".join((info.description or "—").split()).replace("|", "\\|")
        yield f"| `{prefix}{name}` | {kind} | {default} | {description} |"
        if inner is not None:
            yield from option_rows(inner, f"{prefix}{name}.")


def options_table(stage: str) -> str:
    """The generated block of a stage's page: markers, header and one row per option."""
    model = resolve_stage(stage).Config
    begin = f"{BEGIN_PREFIX} generated from {model.__name__} by `python -m tests.test_stage_docs` -->"
    return "\n".join([begin, HEADER, *option_rows(model), END])


def table_in_page(text: str) -> str | None:
    match = re.search(rf"^{re.escape(BEGIN_PREFIX)}.*?^{re.escape(END)}$", text, re.M | re.S)
    return match[0] if match else None


def rewrite_page(stage: str) -> bool:
    """Put the current table into the stage's page; True if the page changed."""
    path = page_path(stage)
    text = path.read_text()
    old = table_in_page(text)
    if old is None:
        raise SystemExit(f"{path} has no '{BEGIN_PREFIX} ... {END}' block: add the two marker lines")
    new_text = text.replace(old, options_table(stage))
    if new_text != text:
        path.write_text(new_text)
    return new_text != text


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_the_page_holds_the_options_of_the_config_model(stage: str) -> None:
    assert page_path(stage).is_file(), f"no page for stage {stage!r}: write {page_path(stage)}"
    in_page = table_in_page(page_path(stage).read_text())
    assert in_page == options_table(stage), (
        f"{page_path(stage)} does not hold {stage}'s current options: run python -m tests.test_stage_docs"
    )


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_option_has_a_row(stage: str) -> None:
    """The rows cover every field, nested ones included, so no option goes undocumented."""
    model = resolve_stage(stage).Config
    table = options_table(stage)
    for name, info in model.model_fields.items():
        assert f"| `{name}` |" in table
        inner = nested_model(info)
        for nested in inner.model_fields if inner is not None else ():
            assert f"| `{name}.{nested}` |" in table


def test_every_page_is_a_stage_and_every_stage_is_linked() -> None:
    pages = {path.stem for path in STAGES_DOCS.glob("*.md")} - {"README"}
    assert pages == set(STAGES), "docs/stages/ must hold one page per registered stage, and no other"
    index = (STAGES_DOCS / "README.md").read_text()
    readme = (REPO / "README.md").read_text()
    for stage in STAGES:
        assert f"]({stage}.md)" in index, f"docs/stages/README.md does not link {stage}.md"
        assert f"](docs/stages/{stage}.md)" in readme, f"README.md's stage table does not link {stage}'s page"


def main() -> int:
    """Rewrite every page's table; a stage whose module does not import is reported and left as it is."""
    failed = []
    for stage in STAGES:
        try:
            changed = rewrite_page(stage)
        except ConfigError as error:
            failed.append(f"{stage}: not rewritten: {error}")
            continue
        print(f"{page_path(stage).relative_to(REPO)}: {'rewritten' if changed else 'up to date'}")
    if failed:
        print("\n".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
