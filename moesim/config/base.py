"""The frozen, strictly validated base every scenario type derives from."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Frozen(BaseModel):
    """An immutable config record: unknown keys are errors, values never change after load."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        strict=False,
        validate_default=True,
        use_attribute_docstrings=True,
    )
