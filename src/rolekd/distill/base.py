"""The KD-loss interface and the registry of methods by name.

Every method is one small :class:`Distiller` module (in the spirit of mdistiller's one-class-per-method
layout): ``forward(student, teacher, labels)`` returns the scalar KD loss only (the objective adds the
task loss and the weight λ). Flags tell the objective what to record: ``needs_features`` (the models'
``kd_taps``), ``needs_embedding`` (the pre-logit input of ``kd_embedding``) and ``trains_teacher``
(DML, where the teacher learns too); ``clip_kd_grad`` declares whether the method's reference code clips
its KD gradient to the task gradient's norm (KD-SVD, MHGD, II-KD) or adds it as it is (soft labels, DML,
RKD); the objective follows the declaration unless told otherwise (``kd.clip``). Methods with their own
trainable parts implement ``prepare(teacher_model, batches)``, called once before KD training, and
methods that compare feature maps channel by channel implement :meth:`Distiller.build_adapters`, called
with one probe batch's outputs when the student's and the teacher's tap widths may differ.

Each method reads its own options from the ``kd`` config section (:meth:`Distiller.options_from`:
``kd.options``, plus the documented shortcuts a method uses, e.g. ``kd.T`` for soft labels); its
constructor checks them. Nothing outside a method switches on its name.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..config import KDConfig
from ..errors import UserError
from ..models.taps import Outputs
from ..registry import Registry


def _key(name: str) -> str:
    return str(name).strip().lower().replace("-", "").replace("_", "")


DISTILLERS: Registry[type["Distiller"]] = Registry("KD method", _key)


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
    clip_kd_grad: bool = False  # the reference code clips this method's KD gradient (see KDObjective)

    def forward(self, student: Outputs, teacher: Outputs, labels: torch.Tensor) -> torch.Tensor:
        """The KD loss (a scalar, not including the task loss). Teacher tensors carry no gradient."""
        raise NotImplementedError

    def prepare(self, teacher_model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
        """Train the method's own parts on the frozen teacher before KD (a no-op by default)."""

    @property
    def is_prepared(self) -> bool:
        return True

    def build_adapters(self, student: Outputs, teacher: Outputs) -> bool:
        """Create any trainable parts that depend on the two networks' shapes (e.g. a channel adapter
        for taps of different widths) from one probe batch's outputs; True if parameters were added.
        The default builds the distiller's ``adapter`` (a :class:`~rolekd.distill.adapter.ChannelAdapter`),
        if it has one, from the two networks' feature taps."""
        adapter = getattr(self, "adapter", None)
        return adapter.build(student.features, teacher.features) if adapter is not None else False

    def terms(self) -> dict[str, torch.Tensor]:
        """Detached parts of the last loss, for logging (``{}`` when the loss has one part)."""
        return {}

    @classmethod
    def options_from(cls, kd: KDConfig) -> dict[str, Any]:
        """The constructor options this method reads from the ``kd`` config section: ``kd.options``, and
        for a method that trains a part before KD (``needs_prepare``) ``kd.prepare_epochs`` (a documented
        shortcut, overridden by ``kd.options``)."""
        return {"prepare_epochs": kd.prepare_epochs, **kd.options} if cls.needs_prepare else dict(kd.options)

    @classmethod
    def from_config(cls, kd: KDConfig) -> "Distiller":
        return _construct(cls, cls.options_from(kd))


def _construct(cls: type[Distiller], kwargs: dict[str, Any]) -> Distiller:
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params) - {"self"})
        if unknown:
            accepted = ", ".join(n for n in params if n != "self") or "none"
            raise UserError(f"KD method {cls.name!r} takes no option(s) {', '.join(unknown)} "
                            f"(kd.options); accepted: {accepted}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise UserError(f"KD method {cls.name!r}: bad option ({e})") from None


def register(name: str) -> Callable[[type[Distiller]], type[Distiller]]:
    """Class decorator adding a :class:`Distiller` to the registry under ``name``."""

    def deco(cls: type[Distiller]) -> type[Distiller]:
        cls.name = name
        return DISTILLERS.add(name, cls)

    return deco


def list_distillers() -> list[str]:
    """Registered method names, sorted."""
    return sorted(DISTILLERS.names())


def distiller_class(name: str) -> type[Distiller]:
    """The method class of ``name`` (case, ``-`` and ``_`` ignored, so ``KD-SVD`` works); UserError if
    unknown."""
    return DISTILLERS.get(name)


def create_distiller(name: str, **kwargs) -> Distiller:
    """Build the KD loss ``name`` (``soft``, ``dml``, ``rkd``, ``kdsvd``, ``mhgd``, ``iikd``; case, ``-``
    and ``_`` are ignored, so ``KD-SVD`` works) with its keyword options; UserError if unknown."""
    return _construct(distiller_class(name), kwargs)
