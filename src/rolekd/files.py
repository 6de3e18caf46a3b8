"""Writing files so that an interrupted write never leaves a broken one, and the checkpoint formats.

:func:`atomic_write` is the one writer of the package: it writes to a uniquely named temporary file
beside the target (so two writers never share a temporary name), flushes it to disk, and publishes it
with one ``os.replace`` (then flushes the directory entry), so a reader sees the old file or the new
one, never a part.

Checkpoints load without executing code: model weights are safetensors files; optimizer, RNG and
other training state is ``torch.save`` output read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import UserError

Content = Union[str, bytes, Callable[[Path], None]]


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, content: Content, *, fsync: bool = True) -> Path:
    """Write ``content`` (text, bytes, or a function that writes the file at the path it is given)
    to ``path`` atomically. The temporary name keeps ``path``'s suffix (writers that pick a format by
    extension still work). Returns ``path``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp{p.suffix}")
    try:
        if callable(content):
            content(tmp)
        else:
            with open(tmp, "w" if isinstance(content, str) else "wb",
                      **({"encoding": "utf-8"} if isinstance(content, str) else {})) as f:
                f.write(content)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    if fsync:
        _fsync_dir(p.parent)
    return p


# ------------------------------------------------------------------------------------------ weights
def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of a model's state (unwrapping ``torch.compile``)."""
    model = getattr(model, "_orig_mod", model)
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                 metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file of ``tensors`` (made contiguous), written atomically."""
    state = {k: v.detach().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda p: save_file(state, str(p), metadata=metadata))


def save_weights(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    return save_tensors(model_state(model), path, metadata)


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"checkpoint {p} not found: give a run directory or its model.safetensors")
    try:
        return load_file(str(p))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise UserError(f"checkpoint {p} is not a readable safetensors file ({e}); "
                        "re-create it with rolekd train") from None


def load_weights(model: nn.Module, path: str | os.PathLike, what: str = "checkpoint") -> None:
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


# ------------------------------------------------------------------------------------- training state
def save_state(state: dict, path: str | os.PathLike) -> Path:
    """Training state (tensors, numbers, strings, nested dicts/lists) as a weights-only-loadable file."""
    return atomic_write(path, lambda p: torch.save(state, str(p)))


def load_state(path: str | os.PathLike) -> dict:
    p = Path(path)
    try:
        return torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign or code-carrying pickle
        raise UserError(f"training state {p} cannot be read safely ({type(e).__name__}); "
                        "delete that checkpoint folder to start the run again") from None
