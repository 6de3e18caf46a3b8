"""Writing files so that an interrupted write never leaves a broken one, the checkpoint formats, and
the lock that keeps one process per run directory.

:func:`atomic_write` is the one writer of the package: it writes to a uniquely named temporary file
beside the target (so two writers never share a temporary name), flushes it to disk, and publishes it
with one ``os.replace`` (then flushes the directory entry), so a reader sees the old file or the new
one, never a part. A writer that fails for any reason (disk full, file size limit, read-only
directory) raises an :class:`OSError` naming the file.

Checkpoints load without executing code: model weights are safetensors files; optimizer, RNG and
other training state is ``torch.save`` output read back with ``torch.load(weights_only=True)``.
A training checkpoint is one unit (:func:`write_checkpoint` / :func:`read_checkpoint`): a directory of
parts plus a ``manifest.json`` naming each part and its size, written completely under a unique
temporary name and swapped in for the previous one, so a kill at any instant leaves the old
checkpoint or the new one; a checkpoint that lacks a part is an error, never a fresh start.

:class:`RunLock` is an exclusive ``flock`` on ``<run dir>/.rolekd.lock``, held while a command runs in
that directory (the kernel drops it when the process ends, however it ends).
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Union

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .errors import UserError

Content = Union[str, bytes, Callable[[Path], None]]


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (a rename, a new file) to disk; best effort (not every file system
    can)."""
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
        _write_part(tmp, content, p, fsync)
        os.replace(tmp, p)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    if fsync:
        fsync_dir(p.parent)
    return p


def write_file(path: str | os.PathLike, content: Content) -> Path:
    """:func:`atomic_write` for a user's output file: an OS error is one UserError line ("cannot write PATH:
    reason")."""
    try:
        return atomic_write(path, content)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def _write_part(tmp: Path, content: Content, target: Path, fsync: bool = True) -> None:
    """Write ``content`` to ``tmp`` (and flush it to disk); any failure of a writer function (torch,
    safetensors and numpy report a full disk in their own exception types) becomes an OSError."""
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
    except OSError as e:
        if e.filename is None:  # a write through a file object: name the file being written
            raise OSError(e.errno, e.strerror or str(e), str(target)) from e
        raise
    except Exception as e:
        raise OSError(errno.EIO, f"could not write {target} ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''})") from e


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) replaced by None, so ``json.dumps`` writes valid
    JSON (it would write a bare ``NaN`` otherwise)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dump_json(obj: Any, **kw) -> str:
    """Valid JSON of ``obj`` (non-finite floats as null)."""
    return json.dumps(json_safe(obj), allow_nan=False, **kw)


def read_summary(path: Path, fix: str) -> dict | None:
    """The JSON object of a finished run's summary file (``result.json``, ``search.json``); None when the
    file does not exist; a file that is not a readable JSON object is one UserError line ending in ``fix``."""
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
        if not isinstance(summary, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is unreadable: {fix}") from None
    return summary


# ------------------------------------------------------------------------------------------ run lock
LOCK_NAME = ".rolekd.lock"


class RunLock:
    """One process per run directory: an exclusive ``flock`` of ``<run_dir>/.rolekd.lock``.

    :meth:`acquire` creates the directory and takes the lock, or raises a one-line UserError when
    another process holds it (nothing is written then). The lock is released by :meth:`release` or
    when the process ends. Use as a context manager or call acquire/release; acquire is idempotent."""

    def __init__(self, run_dir: str | os.PathLike):
        self.dir = Path(run_dir)
        self.path = self.dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        if fcntl is None:  # pragma: no cover
            raise UserError("run directory locks need a POSIX system (Linux, macOS)")
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            try:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            except OSError:
                holder = ""
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f" (pid {holder})" if holder.isdigit() else ""
                raise UserError(f"run directory {self.dir} is in use by another rolekd process{who}: wait for it "
                                f"to finish or stop it, or choose another directory with out=DIR") from None
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the pid is informative only
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------------------------------------ weights
def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of a model's state (unwrapping ``torch.compile``)."""
    model = getattr(model, "_orig_mod", model)
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def tensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors file of ``tensors`` (made contiguous) as bytes (written by Python's own file
    objects, so a full disk or a size limit is an OSError with its errno)."""
    return safetensors_bytes({k: v.detach().contiguous() for k, v in tensors.items()}, metadata=metadata)


def state_bytes(state: dict) -> bytes:
    """``torch.save`` of ``state`` as bytes (loadable with ``weights_only=True``)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                 metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file of ``tensors`` (made contiguous), written atomically."""
    return atomic_write(path, tensors_bytes(tensors, metadata))


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


def nonfinite_keys(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf (one device synchronisation when all are on
    one device)."""
    names = [k for k, v in tensors.items() if v.is_floating_point()]
    flags = [torch.isfinite(tensors[k]).all() for k in names]
    if len({f.device for f in flags}) == 1:
        flags = torch.stack(flags).tolist()
    return [k for k, ok in zip(names, flags) if not bool(ok)]


def check_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike,
                  what: str = "checkpoint") -> None:
    """UserError unless ``state`` has exactly ``model``'s keys and shapes and only finite values (a model
    may be on the meta device: shapes only)."""
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
    bad = nonfinite_keys(state)
    if bad:
        raise UserError(f"{what} {path} holds non-finite values (NaN or inf) in {len(bad)} of {len(state)} tensors "
                        f"(e.g. {bad[0]}): it comes from a diverged run; retrain it")


def load_weights(model: nn.Module, path: str | os.PathLike, what: str = "checkpoint") -> None:
    """Load safetensors weights into ``model`` strictly; a mismatch or a non-finite value is one clear
    UserError."""
    state = read_weights(path)
    check_weights(model, state, path, what)
    getattr(model, "_orig_mod", model).load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------- training state
def save_state(state: dict, path: str | os.PathLike) -> Path:
    """Training state (tensors, numbers, strings, nested dicts/lists) as a weights-only-loadable file."""
    return atomic_write(path, state_bytes(state))


def load_state(path: str | os.PathLike) -> dict:
    p = Path(path)
    try:
        return torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign or code-carrying pickle
        raise UserError(f"training state {p} cannot be read safely ({type(e).__name__}); "
                        "delete that checkpoint folder to start the run again") from None


# ------------------------------------------------------------------------------------- checkpoints
CHECKPOINT_FORMAT = "rolekd-checkpoint"
CHECKPOINT_VERSION = 1
MANIFEST = "manifest.json"

# Called with the name of each step of :func:`write_checkpoint` as it is reached (tests inject a kill
# there); None in normal use.
checkpoint_hook: Callable[[str], None] | None = None


def _step(name: str) -> None:
    if checkpoint_hook is not None:
        checkpoint_hook(name)


def _siblings(directory: Path, kind: str) -> list[Path]:
    """Temporary checkpoint directories beside ``directory``: ``new`` (being written) or ``old``
    (moved aside), oldest name first."""
    return sorted(directory.parent.glob(f".{directory.name}.*.{kind}"))


def _manifest_ok(directory: Path) -> bool:
    try:
        _verified_manifest(directory)
        return True
    except UserError:
        return False


def recover_checkpoint(directory: str | os.PathLike) -> None:
    """Finish or undo a checkpoint swap that a kill interrupted: when ``directory`` is missing but a
    complete previous checkpoint was moved aside, put it back; then delete temporary leftovers. Call
    it only while holding the run's lock (or in a single-process setting)."""
    d = Path(directory)
    if not d.exists():
        olds = [o for o in _siblings(d, "old") if _manifest_ok(o)]
        if olds:
            os.rename(olds[-1], d)
            fsync_dir(d.parent)
    for leftover in _siblings(d, "new") + _siblings(d, "old"):
        shutil.rmtree(leftover, ignore_errors=True)


def write_checkpoint(directory: str | os.PathLike, parts: dict[str, Content], meta: dict[str, Any]) -> Path:
    """Publish a checkpoint directory as one unit.

    Each ``parts[name]`` is one file's content (text, bytes, or a function writing the file at the
    path it is given); they go into a uniquely named temporary directory
    beside ``directory`` with ``manifest.json`` (``meta`` plus each part's size), all flushed to disk.
    Then the previous checkpoint is moved aside, the new one renamed into place, and the old one
    deleted. A kill between the two renames leaves no ``directory`` but the complete old one beside it,
    which :func:`read_checkpoint` puts back; at every other instant ``directory`` is a complete
    checkpoint, old or new."""
    d = Path(directory)
    d.parent.mkdir(parents=True, exist_ok=True)
    recover_checkpoint(d)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    new = d.parent / f".{d.name}.{tag}.new"
    new.mkdir()
    _step("tmp_dir_created")
    files = {}
    for name, content in parts.items():
        _write_part(new / name, content, d / name)
        files[name] = {"size": (new / name).stat().st_size}
        _step(f"part_written:{name}")
    manifest = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **json_safe(meta), "files": files}
    _write_part(new / MANIFEST, dump_json(manifest, indent=1), d / MANIFEST)
    fsync_dir(new)
    _step("manifest_written")
    if d.exists():
        old = d.parent / f".{d.name}.{tag}.old"
        os.rename(d, old)
        _step("old_moved_aside")
    else:
        old = None
    os.rename(new, d)
    fsync_dir(d.parent)
    _step("new_published")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        _step("old_removed")
    return d


def _verified_manifest(d: Path) -> dict:
    mf = d / MANIFEST
    if not mf.is_file():
        missing = "it is empty" if not any(d.iterdir()) else "it has no manifest.json"
        raise UserError(f"checkpoint {d} is incomplete ({missing}); it was not written by this rolekd version or "
                        f"was damaged: delete {d} (and metrics.jsonl) to start the run again")
    try:
        manifest = json.loads(mf.read_text())
        files = manifest["files"]
        ok = manifest.get("format") == CHECKPOINT_FORMAT and isinstance(files, dict)
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise UserError(f"checkpoint {d}: manifest.json is unreadable; delete {d} to start the run again")
    if manifest.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"checkpoint {d} was written by another rolekd version (format {manifest.get('version')}); "
                        f"finish it with that version or delete {d} to start again")
    for name, info in files.items():
        f = d / name
        if not f.is_file():
            raise UserError(f"checkpoint {d} is missing its part {name}: restore it or delete {d} to start the "
                            f"run again")
        size = f.stat().st_size
        if size != info.get("size"):
            raise UserError(f"checkpoint {d}: {name} has {size} bytes, its manifest says {info.get('size')} "
                            f"(truncated or replaced): restore it or delete {d} to start the run again")
    return manifest


def read_checkpoint(directory: str | os.PathLike) -> dict | None:
    """The manifest of the checkpoint in ``directory`` (after :func:`recover_checkpoint`), None when
    there is none; a UserError when it is incomplete (a missing or truncated part)."""
    d = Path(directory)
    recover_checkpoint(d)
    if not d.exists():
        return None
    if not d.is_dir():
        raise UserError(f"checkpoint {d} is not a directory: delete it to start the run again")
    return _verified_manifest(d)
