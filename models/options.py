"""The base of every solver's options model: frozen groups, unknown names refused, validated copies."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self

from pydantic import BaseModel, ConfigDict


class SolverOptions(BaseModel):
    """Frozen, with unknown names refused; the base of every option group and solver's options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def replace(self, **changes: Any) -> Self:
        """A validated copy with some values changed: a group by a mapping of its fields to change (the
        others kept), any other field or a whole group by value.

        ``options.replace(optimisation={"max_iterations": 100}, execution={"seed": 3})``
        """
        data = self.model_dump()
        for name, value in changes.items():
            if isinstance(value, Mapping) and isinstance(data.get(name), dict):
                data[name] = {**data[name], **value}
            else:
                data[name] = value
        return type(self).model_validate(data)
