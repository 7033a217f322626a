"""What a check is and what it says, as plain data: light to import (the checkers themselves load NLTK and IFEval's
registry, see :mod:`nsteer.evaluate.checkers`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from nsteer.evaluate.custom_checks import CustomCheck


@dataclass(frozen=True)
class CheckSpec:
    """One instruction to check: an IFEval id (e.g. ``change_case:english_lowercase``) and its kwargs, or a recipe's
    own check (``custom``, whose name is then the id)."""

    instruction_id: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    custom: CustomCheck | None = None

    def __post_init__(self) -> None:
        # A read-only copy, so a caller mutating its dict later cannot change a spec already in use.
        object.__setattr__(self, "kwargs", MappingProxyType(dict(self.kwargs)))


@dataclass(frozen=True)
class CheckResult:
    """Whether a response follows one instruction, under IFEval's strict and loose scoring."""

    strict: bool
    loose: bool
