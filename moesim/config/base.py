"""The frozen, strictly validated base every scenario type derives from."""

from __future__ import annotations

import math
import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


class Frozen(BaseModel):
    """An immutable config record: unknown keys are errors, values never change after load.

    Numbers are finite (``.inf`` and ``.nan`` are errors wherever a number is meant) and a
    boolean is not a number (``tokens: true`` is an error, not 1)."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        strict=False,
        validate_default=True,
        use_attribute_docstrings=True,
        allow_inf_nan=False,
    )

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        problems = []
        for name, ann in _numeric_fields(cls).items():
            value = data.get(name)
            if _has_bool(ann, value):
                problems.append(f"{name}: expected a number, got a boolean ({str(value).lower()})")
            elif isinstance(value, float) and value == 0.0 and math.copysign(1.0, value) < 0:
                data = {**data, name: 0.0}  # -0.0 is 0 (numpy rejects a -0.0 sigma)
        if problems:
            raise ValueError("\n".join(problems))
        return data


_NUMERIC: dict[type, dict[str, Any]] = {}


def _numeric_fields(cls: type[BaseModel]) -> dict[str, Any]:
    """The fields of ``cls`` that hold numbers (or containers of numbers), by name."""
    if cls not in _NUMERIC:
        _NUMERIC[cls] = {
            name: f.annotation
            for name, f in cls.model_fields.items()
            if _numeric(f.annotation) or _numeric(_element(f.annotation))
        }
    return _NUMERIC[cls]


def _numeric(ann: Any) -> bool:
    """Whether ``ann`` admits numbers (int, float) and nothing else but None."""
    origin = typing.get_origin(ann)
    if origin is typing.Annotated:
        return _numeric(typing.get_args(ann)[0])
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(ann) if a is not type(None)]
        return bool(members) and all(_numeric(a) for a in members)
    return ann in (int, float)


def _element(ann: Any) -> Any:
    """The element annotation of a list, tuple or dict annotation (None otherwise)."""
    origin = typing.get_origin(ann)
    if origin is typing.Annotated:
        return _element(typing.get_args(ann)[0])
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(ann) if a is not type(None)]
        return _element(inner[0]) if len(inner) == 1 else None
    args = typing.get_args(ann)
    if origin in (list, tuple) and args:
        return args[0]
    if origin is dict and len(args) == 2:
        return args[1]
    return None


def _has_bool(ann: Any, value: Any) -> bool:
    if isinstance(value, bool):
        return _numeric(ann)
    if isinstance(value, list | tuple):
        return _numeric(_element(ann)) and any(isinstance(v, bool) for v in value)
    if isinstance(value, dict):
        return _numeric(_element(ann)) and any(isinstance(v, bool) for v in value.values())
    return False
