"""Model registry and the one factory, :func:`create` (timm style).

Two kinds of entries:

* exact names, registered with ``@register_model`` (or ``@register_model("name")``); the
  builder is called as ``fn(num_classes=..., **kwargs)``;
* name families, registered with ``@register_family(regex, pattern, examples)``: the builder is
  called as ``fn(match, num_classes=..., **kwargs)`` with the :class:`re.Match` of the
  normalised name, e.g. ``wrn_<depth>_<width>`` parses ``wrn_28_10``.

Names are normalised before lookup: stripped, lower-cased, ``-`` read as ``_`` (so ``WRN-28-10``
and ``ResNet18`` work). Unknown names, impossible depths and unknown keyword arguments raise
:class:`~rolekd.errors.UserError` (one line: what is wrong, how to fix it).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from rolekd.errors import UserError
from rolekd.registry import Registry

__all__ = ["create", "list_models", "register_model", "register_family", "normalise_name"]


@dataclass(frozen=True)
class _Family:
    regex: re.Pattern
    pattern: str  # human-readable, e.g. "wrn_<depth>_<width>"
    examples: tuple[str, ...]
    builder: Callable[..., nn.Module]


_MODELS: Registry[Callable[..., nn.Module]] = Registry("model", lambda n: normalise_name(n))
_FAMILIES: list[_Family] = []


def normalise_name(name: str) -> str:
    """``" WRN-28-10 "`` -> ``"wrn_28_10"``."""
    return name.strip().lower().replace("-", "_")


def register_model(fn_or_name=None):
    """Register an exact model name; usable as ``@register_model`` or ``@register_model("name")``.

    Without a name the function's ``__name__`` is used. Registering a name twice is an error.
    """

    def deco(fn, name=None):
        return _MODELS.add(normalise_name(name or fn.__name__), fn)

    if callable(fn_or_name):
        return deco(fn_or_name)
    return lambda fn: deco(fn, fn_or_name)


def register_family(regex: str, pattern: str, examples: tuple[str, ...] | list[str]):
    """Register a parsed family of names; ``regex`` must fully match the normalised name."""

    def deco(fn):
        _FAMILIES.append(_Family(re.compile(regex), pattern, tuple(examples), fn))
        return fn

    return deco


def list_models() -> list[str]:
    """Every exact name and every family's canonical examples (sorted), then the family patterns.

    e.g. ``[..., "resnet18", "wrn_28_10", ..., "preresnet<depth>", "wrn_<depth>_<width>"]``;
    any name a pattern parses (with a valid depth) can be passed to :func:`create`.
    """
    names = set(_MODELS)
    for fam in _FAMILIES:
        names.update(fam.examples)
    return sorted(names) + sorted(fam.pattern for fam in _FAMILIES)


def _check_kwargs(fn: Callable, name: str, kwargs: dict, skip: int) -> None:
    params = list(inspect.signature(fn).parameters.values())[skip:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    allowed = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        accepted = ", ".join(a for a in allowed if a != "num_classes") or "none"
        raise UserError(f"model {name!r} takes no option(s) {', '.join(unknown)}; "
                        f"accepted: {accepted}")


def create(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build a registered model by name, e.g. ``create("wrn_16_2", num_classes=100)``."""
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"model name must be a non-empty string, got {name!r}; "
                        "see rolekd.models.list_models()")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")
    key = normalise_name(name)
    fn = _MODELS.find(key)
    if fn is not None:
        _check_kwargs(fn, key, kwargs, skip=0)
        return fn(num_classes=num_classes, **kwargs)
    for fam in _FAMILIES:
        match = fam.regex.fullmatch(key)
        if match is not None:
            _check_kwargs(fam.builder, key, kwargs, skip=1)
            return fam.builder(match, num_classes=num_classes, **kwargs)
    close = difflib.get_close_matches(key, list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    patterns = ", ".join(sorted(fam.pattern for fam in _FAMILIES))
    raise UserError(f"unknown model {name!r}; {hint}exact names: {', '.join(sorted(_MODELS))}; "
                    f"patterns: {patterns}; see rolekd.models.list_models()")


class _NoMetaInit(TorchFunctionMode):
    """Random initialisers on meta tensors return them unchanged: a meta tensor has no values to fill, and
    the initialisers' meta kernels (torch._refs) import torch._dynamo on first use (~1.7 s at every
    ``rolekd`` command's first model check)."""

    _OPS = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.random_, torch.Tensor.exponential_,
            torch.Tensor.bernoulli_, torch.Tensor.log_normal_, torch.Tensor.geometric_, torch.Tensor.cauchy_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._OPS and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def on_meta():
    """Build modules on the meta device (shapes only: no memory, no weights), without running their random
    initialisers."""
    with torch.device("meta"), _NoMetaInit():
        yield
