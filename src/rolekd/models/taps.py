"""Named feature taps for knowledge distillation, recorded with forward hooks.

Every registry model declares, as class attributes,

* ``kd_taps``: an ordered ``{tap_name: submodule_path}``; the tap is that submodule's *output*
  (shallow to deep), e.g. ``{"stage1": "layer1", ...}``;
* ``kd_embedding``: the path of the final classifier module; its *input* is the pre-logit embedding.

``forward`` keeps its plain signature (images in, logits out); :class:`FeatureTaps` hooks the
declared modules, so quantized copies (which keep module names) are tapped the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Outputs:
    """What a KD loss sees of one network on one batch."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    embedding: torch.Tensor | None = None


class FeatureTaps:
    """Hooks a model's declared taps; ``taps(x)`` runs the model and returns :class:`Outputs`.

    Hooks record only inside ``__call__``, so plain ``model(x)`` calls stay free of overhead.
    Call :meth:`remove` (or use as a context manager) to detach the hooks.
    """

    def __init__(self, model: nn.Module, features: bool = True, embedding: bool = True):
        self.model = model
        self._recording = False
        self._features: dict[str, torch.Tensor] = {}
        self._embedding: torch.Tensor | None = None
        self._handles = []
        modules = dict(model.named_modules())
        taps = getattr(model, "kd_taps", {}) if features else {}
        for name, path in taps.items():
            if path not in modules:
                raise KeyError(f"{type(model).__name__}: tap {name!r} names no submodule {path!r}")
            self._handles.append(modules[path].register_forward_hook(self._feature_hook(name)))
        emb_path = getattr(model, "kd_embedding", None) if embedding else None
        if emb_path is not None:
            if emb_path not in modules:
                raise KeyError(f"{type(model).__name__}: embedding module {emb_path!r} not found")
            self._handles.append(modules[emb_path].register_forward_pre_hook(self._embedding_hook))

    def _feature_hook(self, name):
        def hook(_module, _inputs, output):
            if self._recording:
                self._features[name] = output

        return hook

    def _embedding_hook(self, _module, inputs):
        if self._recording:
            self._embedding = inputs[0]

    def __call__(self, x: torch.Tensor) -> Outputs:
        self._features, self._embedding = {}, None
        self._recording = True
        try:
            logits = self.model(x)
        finally:
            self._recording = False
        out = Outputs(logits, dict(self._features), self._embedding)
        self._features, self._embedding = {}, None
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "FeatureTaps":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class TappedNet(nn.Module):
    """``net`` with the taps a KD loss reads, as one module returning a dict: ``logits``, ``feature:<tap>``
    (one per declared tap, with ``features``) and ``embedding`` (with ``embedding``); ``tapped=False``
    returns the logits only. Used where a network runs functionally (``torch.func.functional_call``;
    parameter names ``net.*``)."""

    def __init__(self, net: nn.Module, features: bool = False, embedding: bool = False):
        super().__init__()
        self.net = net
        self.taps = FeatureTaps(net, features=features, embedding=embedding) if features or embedding else None

    def forward(self, x: torch.Tensor, tapped: bool = True) -> dict[str, torch.Tensor]:
        if self.taps is None or not tapped:
            return {"logits": self.net(x)}
        out = self.taps(x)
        res = {"logits": out.logits, **{"feature:" + k: v for k, v in out.features.items()}}
        if out.embedding is not None:
            res["embedding"] = out.embedding
        return res
