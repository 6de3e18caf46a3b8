"""The KD-loss interface and the registry of methods by name.

Every method is one small :class:`Distiller` module (in the spirit of mdistiller's one-class-per-method
layout): ``forward(student, teacher, labels)`` returns the scalar KD loss only (the objective adds the
task loss and the weight λ). Flags tell the objective what to record: ``needs_features`` (the models'
``kd_taps``), ``needs_embedding`` (the pre-logit input of ``kd_embedding``) and ``trains_teacher``
(DML, where the teacher learns too). Methods with their own trainable parts implement
``prepare(teacher_model, batches)``, called once before KD training.
"""

from __future__ import annotations

import importlib
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import UserError
from ..models.taps import Outputs

_REGISTRY: dict[str, type["Distiller"]] = {}
_BUILTIN_MODULES = ("soft", "dml", "rkd", "kdsvd", "mhgd", "iikd")


def as_float(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (low-precision autocast outputs are upcast; float64 is kept)."""
    return t if t.dtype == torch.float64 else t.float()


class Distiller(nn.Module):
    """Base class of KD losses. Subclasses set the flags and implement :meth:`forward`."""

    name: str = "base"
    needs_features: bool = False
    needs_embedding: bool = False
    trains_teacher: bool = False
    needs_prepare: bool = False

    def forward(self, student: Outputs, teacher: Outputs, labels: torch.Tensor) -> torch.Tensor:
        """The KD loss (a scalar, not including the task loss). Teacher tensors carry no gradient."""
        raise NotImplementedError

    def prepare(self, teacher_model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
        """Train the method's own parts on the frozen teacher before KD (a no-op by default)."""

    @property
    def is_prepared(self) -> bool:
        return True

    def terms(self) -> dict[str, torch.Tensor]:
        """Detached parts of the last loss, for logging (``{}`` when the loss has one part)."""
        return {}


def register(name: str) -> Callable[[type[Distiller]], type[Distiller]]:
    """Class decorator adding a :class:`Distiller` to the registry under ``name``."""

    def deco(cls: type[Distiller]) -> type[Distiller]:
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return deco


def _load_builtins() -> None:
    for mod in _BUILTIN_MODULES:
        importlib.import_module(f"{__package__}.{mod}")


def _key(name: str) -> str:
    return str(name).strip().lower().replace("-", "").replace("_", "")


def list_distillers() -> list[str]:
    """Registered method names, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def create_distiller(name: str, **kwargs) -> Distiller:
    """Build the KD loss ``name`` (``soft``, ``dml``, ``rkd``, ``kdsvd``, ``mhgd``, ``iikd``; case, ``-``
    and ``_`` are ignored, so ``KD-SVD`` works) with its keyword options; UserError if unknown."""
    _load_builtins()
    key = _key(name)
    cls = next((c for n, c in _REGISTRY.items() if _key(n) == key), None)
    if cls is None:
        raise UserError(f"unknown KD method {name!r}: choose one of {', '.join(sorted(_REGISTRY))}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise UserError(f"KD method {cls.name!r}: bad option ({e})") from None
