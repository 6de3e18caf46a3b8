"""Per-epoch metrics to JSONL, CSV and TensorBoard.

``metrics.jsonl`` is valid JSON Lines at every instant: each write replaces the whole file atomically
(a run has at most a few hundred rows), and a non-finite number (a diverged epoch) is written as
``null``. A torn last line left by an older writer or an external copy is dropped when the log is
read again, with a note on stderr.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

from ..errors import UserError
from ..files import atomic_write, dump_json, json_safe


def read_rows(path: str | Path, note: bool = True, strict: bool = True) -> list[dict]:
    """The rows of a metrics.jsonl file ([] when absent). An unparsable *last* line (a torn write) is
    dropped (with a note on stderr when ``note``); an unparsable line before it is a UserError, or
    with ``strict=False`` dropped too (with a note)."""
    p = Path(path)
    if not p.is_file():
        return []
    lines = [(i, line) for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if line.strip()]
    rows = []
    for k, (i, line) in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError:
            if k == len(lines) - 1 or not strict:
                if note:
                    what = "its torn last line" if k == len(lines) - 1 else "unreadable line"
                    print(f"rolekd: note: {p}: dropped {what} {i} (an interrupted write)",
                          file=sys.stderr, flush=True)
                continue
            raise UserError(f"{p} line {i} is not valid JSON: repair or delete that file") from None
        rows.append(row)
    return rows


class MetricsLog:
    """The metrics of one run: ``metrics.jsonl`` (all keys), ``metrics.csv``, TensorBoard.

    The rows are kept in memory and both files are rewritten atomically on every :meth:`log`."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.dir / "metrics.jsonl"
        self.csv = self.dir / "metrics.csv"
        self._rows: list[dict] | None = None
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.dir / "tb"))
            except Exception:  # tensorboard not installed: files only
                self._tb = None

    def rows(self) -> list[dict]:
        if self._rows is None:
            self._rows = read_rows(self.jsonl)
        return list(self._rows)

    def reset(self, rows: list[dict]) -> None:
        """Make the log hold exactly ``rows`` (a resumed run: the rows its checkpoint holds)."""
        self._rows = [json_safe(dict(r)) for r in rows]
        self._write()

    def _write(self) -> None:
        rows = self._rows or []
        atomic_write(self.jsonl, "".join(dump_json(r) + "\n" for r in rows))
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
        atomic_write(self.csv, buf.getvalue(), fsync=False)

    def log(self, row: dict) -> None:
        rows = self.rows()
        rows.append(json_safe(dict(row)))
        self._rows = rows
        self._write()
        if self._tb is not None:
            step = int(row.get("epoch", 0))
            for k, v in self._rows[-1].items():
                if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
