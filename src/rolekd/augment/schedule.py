"""Augmentation schedules: one PBA policy (60 ints) per training epoch.

Three on-disk formats are read, detected from the file's first non-blank character:

* ``{`` -- the project's own versioned JSON (``Schedule.save``)::

      {"format": "rolekd-schedule", "version": 1, "ops": [...15 names...],
       "source": "...", "meta": {...}, "policies": [[60 ints], ...]}

* ``[`` -- a population-based-training log, one exploit step per line,
  ``[target_trial, clone_trial, target_iter, clone_iter, old, new]``: either PBA's published
  schedules (Python-literal lines, ``old``/``new`` bare 60-int lists) or Ray Tune's PBT policy
  logs (JSON lines, ``old``/``new`` config dicts holding ``hp_policy``).

Logs are turned into per-epoch schedules exactly as PBA's ``parse_log`` /
``parse_log_schedule`` (arcelien/pba, ``pba/utils.py``) do:

1. every line up to and including the LAST line ``i`` whose target trial differs from line
   ``i + 1``'s cloned trial is dropped (so what is left is one unbroken chain of exploits);
2. the first line's *old* policy runs for ``clone_iter[0]`` epochs;
3. line ``i``'s *new* policy runs for ``clone_iter[i+1] - clone_iter[i]`` epochs;
4. the last line's *new* policy runs for ``epochs - clone_iter[-1]`` epochs;
5. each segment of ``n`` epochs becomes ``int(n * multiplier)`` training epochs and the result
   is padded with the last policy up to ``int(epochs * multiplier)``.

Lines are parsed as JSON first and as Python literals (``ast.literal_eval``, never ``eval``)
second. Anything wrong with a file raises :class:`~rolekd.errors.UserError` with one line
``FILE:LINE: what is wrong; how to fix it``.
"""

from __future__ import annotations

import ast
import json
import math
import numbers
import os
import re
from collections import namedtuple
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from rolekd.augment.space import MAX_LEVEL, MAX_PROB, NUM_SLOTS, OPS, POLICY_LEN, active_slots, validate_policy
from rolekd.errors import UserError
from rolekd.files import write_file

FORMAT_NAME = "rolekd-schedule"
FORMAT_VERSION = 1
NUM_PBT_FIELDS = 6
PBT_FIELDS = "[target, clone, target_iter, clone_iter, old_config, new_config]"

PbtEvent = namedtuple("PbtEvent", ["target", "clone", "target_iter", "clone_iter", "old_config", "new_config"])
PbtEvent.__doc__ = """One PBT exploit step: trial ``target`` (at ``target_iter``) copied trial ``clone``
(at ``clone_iter``) and changed its config from ``old_config`` to ``new_config``. Configs are dicts
holding ``hp_policy`` or bare 60-int policies."""


def _short(obj: Any, n: int = 60) -> str:
    """A one-line, length-limited repr for error messages."""
    r = repr(obj).replace("\n", " ")
    return r if len(r) <= n else r[: n - 3] + "..."


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _check_epochs(epochs: Any, where: str) -> int:
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
        raise UserError(f"{where}: epochs must be a positive integer (the number of search epochs), "
                        f"got {_short(epochs)}")
    return int(epochs)


def _check_multiplier(multiplier: Any, where: str) -> float | int:
    if isinstance(multiplier, bool) or not isinstance(multiplier, numbers.Real) \
            or not math.isfinite(multiplier) or multiplier <= 0:
        raise UserError(f"{where}: multiplier must be a positive number (training epochs / search epochs), "
                        f"got {_short(multiplier)}")
    return multiplier


def _stretch(segments: Sequence[tuple[int, list[int]]], epochs: int, multiplier: float) -> list[list[int]]:
    """PBA's ``parse_log_schedule``: each (n, policy) -> int(n * multiplier) epochs, pad to epochs * multiplier."""
    out: list[list[int]] = []
    for n, pol in segments:
        out.extend([pol] * int(n * multiplier))
    total = int(epochs * multiplier)
    if total > len(out):
        out.extend([segments[-1][1]] * (total - len(out)))
    return [list(p) for p in out]


class Schedule:
    """One policy (a list of 60 ints, see :mod:`rolekd.augment.space`) per epoch.

    Equality compares the per-epoch policies only, not ``source`` / ``meta``.
    """

    __hash__ = None  # mutable-ish value object

    def __init__(self, policies: Iterable[Sequence[int]], source: str | None = None,
                 meta: Mapping[str, Any] | None = None):
        pols = []
        for i, p in enumerate(policies):
            try:
                pols.append(validate_policy(p))
            except ValueError as e:
                raise ValueError(f"epoch {i}: {e}") from None
        if not pols:
            raise ValueError("a schedule needs at least one epoch")
        self._policies: list[tuple[int, ...]] = [tuple(p) for p in pols]
        self.source = source
        self.meta: dict[str, Any] = dict(meta or {})

    # ---- basic protocol -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._policies)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Schedule):
            return NotImplemented
        return self._policies == other._policies

    def __repr__(self) -> str:
        return f"Schedule({len(self)} epochs, {len(self.segments())} segments, source={self.source!r})"

    @property
    def policies(self) -> list[list[int]]:
        """The per-epoch policies, a fresh list of lists of 60 ints."""
        return [list(p) for p in self._policies]

    def vector_at(self, epoch: int) -> list[int]:
        """The policy for ``epoch`` (0-based); epochs past the end use the last policy."""
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise TypeError(f"epoch must be an int, got {type(epoch).__name__}")
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return list(self._policies[min(epoch, len(self._policies) - 1)])

    def segments(self) -> list[tuple[int, int, list[int]]]:
        """Runs of identical consecutive epochs as ``(start, stop, policy)``, ``stop`` exclusive."""
        out: list[tuple[int, int, list[int]]] = []
        start = 0
        for e in range(1, len(self._policies) + 1):
            if e == len(self._policies) or self._policies[e] != self._policies[start]:
                out.append((start, e, list(self._policies[start])))
                start = e
        return out

    def stretched(self, multiplier: float) -> "Schedule":
        """Stretch every run of identical epochs by ``multiplier`` with PBA's rounding."""
        _check_multiplier(multiplier, "stretched")
        segs = [(stop - start, pol) for start, stop, pol in self.segments()]
        meta = dict(self.meta)
        meta["multiplier"] = meta.get("multiplier", 1) * multiplier
        return Schedule(_stretch(segs, len(self), multiplier), source=self.source, meta=meta)

    def fit_to(self, epochs: int) -> "Schedule":
        """Map the schedule proportionally onto ``epochs`` training epochs: training epoch ``e`` uses
        the policy of epoch ``floor(e * len(self) / epochs)``. For an integer ratio this equals
        :meth:`stretched`; unlike PBA's per-segment truncation it keeps every segment's share for
        any ratio (e.g. a 6-epoch search over 10 or 4 training epochs)."""
        epochs = _check_epochs(epochs, "fit_to")
        n = len(self._policies)
        meta = dict(self.meta)
        meta["fitted_to"] = epochs
        return Schedule([self._policies[e * n // epochs] for e in range(epochs)], source=self.source, meta=meta)

    def active_slots(self) -> list[int]:
        """Per epoch, the number of slots whose probability is above 0."""
        return [active_slots(p) for p in self._policies]

    def matched_random(self, seed: int) -> "Schedule":
        """A random schedule matched to this one epoch by epoch: in each epoch as many active slots as
        this schedule's, chosen uniformly without replacement among the 30 slots, each with a probability
        drawn uniformly from 1..10 and a magnitude from 0..9 (the ranges of PBA's explore, the probability
        kept above 0); the other slots are all 0. Drawn from ``numpy.random.default_rng(seed)``, epoch
        after epoch. A schedule with no active slot in any epoch is matched by itself (no op in any epoch):
        a search may learn that no augmentation is best, and its control then trains exactly as it does."""
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        counts = self.active_slots()
        rng = np.random.default_rng(int(seed))
        pols = []
        for k in counts:
            p = [0] * POLICY_LEN
            slots = rng.choice(NUM_SLOTS, size=k, replace=False)
            probs = rng.integers(1, MAX_PROB + 1, size=k)
            levels = rng.integers(0, MAX_LEVEL + 1, size=k)
            for s, pr, lv in zip(slots, probs, levels):
                p[2 * int(s)], p[2 * int(s) + 1] = int(pr), int(lv)
            pols.append(p)
        meta = {"kind": "matched-random", "seed": int(seed), "matched_to": self.source, "active_slots": counts}
        return Schedule(pols, source=f"random, matched to {self.source or 'a schedule'}", meta=meta)

    # ---- constructors ---------------------------------------------------------------------
    @classmethod
    def constant(cls, vector: Sequence[int], epochs: int) -> "Schedule":
        """The same policy for ``epochs`` epochs."""
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {epochs!r}")
        v = validate_policy(vector)
        return cls([v] * epochs, meta={"kind": "constant"})

    @classmethod
    def from_pbt_records(cls, records: Sequence[Sequence[Any]], epochs: int, multiplier: float = 1, *,
                         name: str = "<records>", line_numbers: Sequence[int] | None = None,
                         source: str | None = None) -> "Schedule":
        """Build a schedule from parsed PBT log records (6-field sequences or :class:`PbtEvent`).

        ``epochs`` is the number of search epochs (before ``multiplier``). ``name`` and
        ``line_numbers`` only label error messages.
        """
        epochs = _check_epochs(epochs, name)
        _check_multiplier(multiplier, name)
        lines = list(line_numbers) if line_numbers is not None else list(range(1, len(records) + 1))
        if not records:
            raise UserError(f"{name}: no PBT records; a PBT log holds lines {PBT_FIELDS}")
        rows = [_check_record(r, name, ln) for r, ln in zip(records, lines)]

        # PBA: drop everything up to and including the last broken link of the chain.
        first = 0
        for i in range(len(rows) - 1):
            if rows[i][0] != rows[i + 1][1]:
                first = i + 1
        rows, lines = rows[first:], lines[first:]

        segments: list[tuple[int, list[int]]] = [(rows[0][3], rows[0][4])]
        for i in range(len(rows) - 1):
            n = rows[i + 1][3] - rows[i][3]
            if n < 0:
                raise UserError(f"{name}:{lines[i + 1]}: clone_iter {rows[i + 1][3]} is smaller than the previous "
                                f"line's {rows[i][3]}; PBT log lines must be in the order they happened")
            segments.append((n, rows[i][5]))
        if rows[-1][3] > epochs:
            raise UserError(f"{name}:{lines[-1]}: clone_iter {rows[-1][3]} is past the {epochs} search epochs; "
                            f"pass the number of epochs the search ran for (--epochs)")
        segments.append((epochs - rows[-1][3], rows[-1][5]))

        kinds = {"dict" if isinstance(r[4], Mapping) else "list" for r in records}
        meta = {"from": "ray-pbt-log" if kinds == {"dict"} else "pba-log", "epochs": epochs,
                "multiplier": multiplier, "log_lines": len(records), "first_line_used": lines[0]}
        return cls(_stretch(segments, epochs, multiplier), source=source, meta=meta)

    @classmethod
    def from_pbt_lines(cls, lines: Iterable[str], epochs: int, multiplier: float = 1, *,
                       name: str = "<lines>", source: str | None = None) -> "Schedule":
        """Parse the text lines of a PBA / Ray Tune PBT log (blank lines are skipped)."""
        records, numbers = [], []
        for ln, text in enumerate(lines, start=1):
            if isinstance(text, bytes):
                text = text.decode("utf-8")
            if not text.strip():
                continue
            records.append(_parse_line(text, name, ln))
            numbers.append(ln)
        if not records:
            raise UserError(f"{name}: empty PBT log; expected one line per exploit step {PBT_FIELDS}")
        return cls.from_pbt_records(records, epochs, multiplier, name=name, line_numbers=numbers, source=source)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, name: str = "<dict>",
                  policy_lines: Sequence[int] | None = None) -> "Schedule":
        """Build from the project's JSON object (see module docstring)."""
        if not isinstance(data, Mapping):
            raise UserError(f"{name}:1: expected a JSON object with \"format\": \"{FORMAT_NAME}\"")
        if data.get("format") != FORMAT_NAME:
            raise UserError(f"{name}:1: not a {FORMAT_NAME} file (\"format\" is {_short(data.get('format'))}); "
                            f"write it with `rolekd schedule import` or Schedule.save")
        if data.get("version") != FORMAT_VERSION:
            raise UserError(f"{name}:1: {FORMAT_NAME} version {_short(data.get('version'))} is not supported "
                            f"(this rolekd reads version {FORMAT_VERSION}); re-create the file with this rolekd")
        ops = data.get("ops", list(OPS))
        if list(ops) != list(OPS):
            raise UserError(f"{name}:1: \"ops\" lists another op order than rolekd's {list(OPS)}; "
                            f"re-create the file with this rolekd")
        pols = data.get("policies")
        if not isinstance(pols, list) or not pols:
            raise UserError(f"{name}:1: \"policies\" must be a non-empty list of {POLICY_LEN}-int lists, one per epoch")
        checked = []
        for i, p in enumerate(pols):
            ln = policy_lines[i] if policy_lines is not None and i < len(policy_lines) else 1
            try:
                checked.append(validate_policy(p))
            except ValueError as e:
                raise UserError(f"{name}:{ln}: policy of epoch {i}: {_one_line(e)}; "
                                f"fix or re-create the file") from None
        meta = data.get("meta") or {}
        if not isinstance(meta, Mapping):
            raise UserError(f"{name}:1: \"meta\" must be a JSON object")
        source = data.get("source")
        return cls(checked, source=None if source is None else str(source), meta=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, epochs: int | None = None, multiplier: float = 1) -> "Schedule":
        """Read a schedule file of any supported format (see module docstring).

        ``epochs`` (search epochs, before ``multiplier``) is required for PBT logs; for a
        ``rolekd-schedule`` file it is optional and must match the stored length.
        """
        name = str(path)
        text = _read_text(path)
        stripped = text.lstrip()
        if not stripped:
            raise UserError(f"{name}:1: file is empty; expected a {FORMAT_NAME} JSON file or a PBT log")
        _check_multiplier(multiplier, name)
        if stripped[0] == "{":
            s = _load_json(text, name)
            if epochs is not None:
                _check_epochs(epochs, name)
                if epochs != len(s):
                    raise UserError(f"{name}: holds {len(s)} epochs but --epochs {epochs} was given; "
                                    f"omit --epochs for {FORMAT_NAME} files")
            if multiplier != 1:
                s = s.stretched(multiplier)
            if s.source is None:
                s.source = name
            return s
        if stripped[0] == "[":
            if epochs is None:
                raise UserError(f"{name}: is a PBT log, which does not record how long the search ran; "
                                f"pass --epochs N (the search epochs, e.g. 200 for CIFAR, 160 for SVHN)")
            return cls.from_pbt_lines(text.splitlines(), epochs, multiplier, name=name, source=name)
        ln = text[: len(text) - len(stripped)].count("\n") + 1
        raise UserError(f"{name}:{ln}: unknown schedule format (starts with {_short(stripped[:20])}); expected a "
                        f"{FORMAT_NAME} JSON object or PBT log lines {PBT_FIELDS}")

    # ---- writing --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "ops": list(OPS)}
        if self.source is not None:
            d["source"] = self.source
        if self.meta:
            d["meta"] = dict(self.meta)
        d["policies"] = self.policies
        return d

    def save(self, path: str | os.PathLike) -> None:
        """Write the versioned JSON format, one policy per line (atomically)."""
        d = self.to_dict()
        pols = d.pop("policies")
        head = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in d.items())
        body = ",\n".join("    " + json.dumps(p) for p in pols)
        write_file(path, "{\n" + head + ',\n  "policies": [\n' + body + "\n  ]\n}\n")


# ---- PBT log lines ---------------------------------------------------------------------------

def _parse_line(text: str, name: str, ln: int) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text.strip())
    except SyntaxError as e:
        why = f" ({_one_line(e.msg)})" if e.msg else ""
    except (ValueError, TypeError, MemoryError, RecursionError):
        why = ""
    hint = " - the line looks cut off: is the file truncated?" if not text.rstrip().endswith("]") else ""
    raise UserError(f"{name}:{ln}: not a JSON or Python-literal PBT record{why}{hint}; "
                    f"each line must be {PBT_FIELDS}") from None


def _policy_of(cfg: Any, name: str, ln: int, field: str) -> list[int]:
    if isinstance(cfg, Mapping):
        if "hp_policy" not in cfg:
            raise UserError(f"{name}:{ln}: {field} has no \"hp_policy\"; PBT configs must hold the 60-int policy "
                            f"as hp_policy")
        pol = cfg["hp_policy"]
    elif isinstance(cfg, (list, tuple)):  # PBA's "depreciated" bare-list configs
        pol = cfg
    else:
        raise UserError(f"{name}:{ln}: {field} must be a config dict with \"hp_policy\" or a {POLICY_LEN}-int list, "
                        f"got {type(cfg).__name__}")
    try:
        return validate_policy(pol)
    except ValueError as e:
        raise UserError(f"{name}:{ln}: {field} policy: {_one_line(e)}; fix the line or re-run the search") from None


def _check_record(r: Any, name: str, ln: int) -> tuple[Any, Any, int, int, list[int], list[int]]:
    if not isinstance(r, (list, tuple)):
        raise UserError(f"{name}:{ln}: expected a list {PBT_FIELDS}, got {type(r).__name__}")
    if len(r) != NUM_PBT_FIELDS:
        raise UserError(f"{name}:{ln}: expected {NUM_PBT_FIELDS} fields {PBT_FIELDS}, got {len(r)}; "
                        f"fix or delete the line")
    target, clone, t_iter, c_iter, old, new = r
    for fname, v in (("target_iter", t_iter), ("clone_iter", c_iter)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise UserError(f"{name}:{ln}: {fname} must be a non-negative integer epoch, got {_short(v)}")
    for fname, v in (("target", target), ("clone", clone)):
        if not isinstance(v, (str, int)) or isinstance(v, bool):
            raise UserError(f"{name}:{ln}: {fname} must be a trial name (string or int), got {_short(v)}")
    return (target, clone, t_iter, c_iter, _policy_of(old, name, ln, "old_config"),
            _policy_of(new, name, ln, "new_config"))


def format_pbt_line(event: Sequence[Any]) -> str:
    """One Ray Tune PBT log line (JSON) for ``event``; bare policies are wrapped as ``{"hp_policy": ...}``."""
    if len(event) != NUM_PBT_FIELDS:
        raise ValueError(f"a PBT event has {NUM_PBT_FIELDS} fields {PBT_FIELDS}, got {len(event)}")
    target, clone, t_iter, c_iter, old, new = event
    cfgs = []
    for cfg in (old, new):
        if isinstance(cfg, Mapping):
            if "hp_policy" not in cfg:
                raise ValueError("a PBT config dict must hold 'hp_policy'")
            cfg = dict(cfg)
            cfg["hp_policy"] = validate_policy(cfg["hp_policy"])
        else:
            cfg = {"hp_policy": validate_policy(cfg)}
        cfgs.append(cfg)
    for v in (t_iter, c_iter):
        if isinstance(v, bool) or int(v) != v or v < 0:
            raise ValueError(f"iterations must be non-negative ints, got {v!r}")
    return json.dumps([str(target), str(clone), int(t_iter), int(c_iter), cfgs[0], cfgs[1]])


def write_pbt_log(path: str | os.PathLike, events: Iterable[Sequence[Any]], append: bool = False) -> None:
    """Write (or append) Ray Tune PBT log lines ``[target, clone, target_iter, clone_iter, old, new]``.

    Each event is a 6-sequence (e.g. :class:`PbtEvent`) whose configs are dicts holding
    ``hp_policy`` or bare 60-int policies. Trial names are written as strings, as Ray Tune does.
    """
    lines = [format_pbt_line(e) + "\n" for e in events]
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "a" if append else "w", encoding="utf-8") as f:
            f.writelines(lines)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


# ---- file helpers ----------------------------------------------------------------------------

def _read_text(path: str | os.PathLike) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; check the path") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory; give a schedule file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        ln = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{ln}: not UTF-8 text; expected a {FORMAT_NAME} JSON file or a PBT log") from None


_POLICIES_KEY = re.compile(r'"policies"\s*:\s*\[')


def _policy_line_numbers(text: str, policies: list[Any]) -> list[int] | None:
    """Line number of each element of the top-level "policies" array (for error messages)."""
    dec = json.JSONDecoder()
    ws = re.compile(r"[ \t\r\n]*")
    for m in _POLICIES_KEY.finditer(text):
        pos = m.end()
        lines: list[int] = []
        try:
            pos = ws.match(text, pos).end()
            while pos < len(text) and text[pos] != "]":
                lines.append(text.count("\n", 0, pos) + 1)
                _, pos = dec.raw_decode(text, pos)
                pos = ws.match(text, pos).end()
                if pos < len(text) and text[pos] == ",":
                    pos = ws.match(text, pos + 1).end()
        except ValueError:
            continue
        if len(lines) == len(policies):
            return lines
    return None


def _load_json(text: str, name: str) -> Schedule:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        cut = " (the file looks truncated)" if e.pos >= len(text.rstrip()) else ""
        raise UserError(f"{name}:{e.lineno}: invalid JSON: {e.msg} at column {e.colno}{cut}; "
                        f"fix the file or re-create it") from None
    pols = data.get("policies") if isinstance(data, dict) else None
    lines = _policy_line_numbers(text, pols) if isinstance(pols, list) else None
    return Schedule.from_dict(data, name=name, policy_lines=lines)
