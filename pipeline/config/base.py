"""What every configuration section shares: the base model, the project root, order checks."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, model_validator

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def project_path(path: str) -> Path:
    """``path`` as given when absolute, else relative to the project root (not the cwd)."""
    p = Path(path)
    return p if p.is_absolute() else (PROJECT_ROOT / p).resolve()


class Section(BaseModel):
    """A configuration section: unknown fields are errors, assignments are validated.

    ``ORDERED`` lists ``(low, high, strict)`` pairs of fields: ``low`` must be below ``high``
    when ``strict``, else not above it.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    ORDERED: ClassVar[tuple[tuple[str, str, bool], ...]] = ()

    @model_validator(mode="after")
    def _check_order(self) -> "Section":
        for low, high, strict in self.ORDERED:
            a, b = getattr(self, low), getattr(self, high)
            if strict and a >= b:
                raise ValueError(f"{low} ({a}) must be below {high} ({b})")
            if not strict and a > b:
                raise ValueError(f"{low} ({a}) > {high} ({b})")
        return self
