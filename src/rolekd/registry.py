"""One small registry helper for everything looked up by name: models, KD methods, datasets.

A :class:`Registry` maps normalised names to objects (builders, classes, loaders). Looking up an
unknown name is one :class:`~rolekd.errors.UserError` line that lists the known names and the
closest matches (timm's ``_registry.py`` is the model for this).
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from .errors import UserError

T = TypeVar("T")


def _plain(name: str) -> str:
    return str(name).strip()


class Registry(Generic[T]):
    """Names -> objects of one ``kind`` (e.g. "model", "KD method", "dataset")."""

    def __init__(self, kind: str, normalise: Callable[[str], str] = _plain, *, replace: bool = False,
                 hint: str = ""):
        self.kind = kind
        self.normalise = normalise
        self.replace = replace  # registering a taken name again replaces it (else ValueError)
        self.hint = hint  # appended to the unknown-name error, e.g. how to register one
        self._items: dict[str, T] = {}
        self._names: dict[str, str] = {}  # normalised -> name as registered

    def add(self, name: str, obj: T) -> T:
        key = self.normalise(name)
        if key in self._items and not self.replace:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[key] = obj
        self._names[key] = str(name).strip()
        return obj

    def remove(self, name: str) -> T | None:
        """Forget ``name`` (returns what it named, or None)."""
        key = self.normalise(name)
        self._names.pop(key, None)
        return self._items.pop(key, None)

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator: ``@reg.register("name")`` (or ``@reg.register()``: the object's ``__name__``)."""

        def deco(obj: T) -> T:
            return self.add(name or getattr(obj, "__name__"), obj)

        return deco

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.normalise(name) in self._items

    def find(self, name: str) -> T | None:
        return self._items.get(self.normalise(name))

    def canonical(self, name: str) -> str:
        """The name as registered of ``name`` (e.g. ``KD-SVD`` -> ``kdsvd``); UserError if unknown."""
        self.get(name)
        return self._names[self.normalise(name)]

    def get(self, name: str) -> T:
        obj = self.find(name) if isinstance(name, str) else None
        if obj is None:
            raise UserError(self.unknown_message(name))
        return obj

    def unknown_message(self, name: object) -> str:
        known = sorted(self._names.values())
        close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        more = f" {self.hint}" if self.hint else ""
        return f"unknown {self.kind} {name!r}: {hint}choose one of {', '.join(known)}{more}"

    def names(self) -> list[str]:
        """Registered names as given, in registration order."""
        return list(self._names.values())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
