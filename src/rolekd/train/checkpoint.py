"""Checkpoints that load without executing code.

Model weights go to ``model.safetensors``; optimizer / scheduler / RNG / objective state to
``state.pt`` written by ``torch.save`` and read with ``torch.load(weights_only=True)``. Files are
written to a temporary name and renamed, so an interrupted save never leaves a broken checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import UserError


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of a model's state (unwrapping ``torch.compile``)."""
    model = getattr(model, "_orig_mod", model)
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    state = model_state(model)
    _atomic(Path(path), lambda p: save_file(state, str(p), metadata=metadata))


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"checkpoint {p} not found: give a run directory or its model.safetensors")
    try:
        return load_file(str(p))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise UserError(f"checkpoint {p} is not a readable safetensors file ({e}); "
                        "re-create it with rolekd train") from None


def load_weights(model: nn.Module, path: str | Path, what: str = "checkpoint") -> None:
    """Load safetensors weights into ``model`` strictly; a mismatch is one clear UserError."""
    state = read_weights(path)
    target = getattr(model, "_orig_mod", model)
    own = target.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        detail = (f"{len(missing)} missing keys (e.g. {missing[:2]})" if missing else
                  f"{len(unexpected)} unexpected keys (e.g. {unexpected[:2]})" if unexpected else
                  f"shape mismatch at {wrong[0]}: file {tuple(state[wrong[0]].shape)} vs model "
                  f"{tuple(own[wrong[0]].shape)}")
        raise UserError(f"{what} {path} does not fit model {type(target).__name__}: {detail}; "
                        "check the model name (and num_classes) it was trained with")
    target.load_state_dict(state, strict=True)


def save_state(state: dict, path: str | Path) -> None:
    _atomic(Path(path), lambda p: torch.save(state, str(p)))


def load_state(path: str | Path) -> dict:
    p = Path(path)
    try:
        return torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign or code-carrying pickle
        raise UserError(f"training state {p} cannot be read safely ({type(e).__name__}); "
                        "delete that checkpoint folder to start the run again") from None
