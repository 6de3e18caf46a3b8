"""Per-epoch metrics to JSONL, CSV and TensorBoard."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..files import atomic_write


class MetricsLog:
    """Append-only metrics of one run: ``metrics.jsonl`` (all keys), ``metrics.csv``, TensorBoard."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.dir / "metrics.jsonl"
        self.csv = self.dir / "metrics.csv"
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.dir / "tb"))
            except Exception:  # tensorboard not installed: files only
                self._tb = None

    def rows(self) -> list[dict]:
        if not self.jsonl.is_file():
            return []
        return [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]

    def truncate_after(self, epoch: int) -> None:
        """Drop rows of epochs > ``epoch`` (written by a run interrupted before its checkpoint)."""
        rows = [r for r in self.rows() if r.get("epoch", -1) <= epoch]
        atomic_write(self.jsonl, "".join(json.dumps(r) + "\n" for r in rows))
        self._rewrite_csv(rows)

    def _rewrite_csv(self, rows: list[dict]) -> None:
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
        atomic_write(self.csv, buf.getvalue(), fsync=False)

    def log(self, row: dict) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        self._rewrite_csv(self.rows())
        if self._tb is not None:
            step = int(row.get("epoch", 0))
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
