"""Which code ran: the git commit of the rolekd checkout (and whether its tracked files had uncommitted
changes), recorded by ``rolekd run`` each time it starts or resumes, and named by the report."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from . import __version__

CODE_LOG = "code.jsonl"  # one line per start of a pipeline run: the code that ran it


def code_version() -> dict:
    """``{"rolekd": version, "commit": sha or None, "dirty": bool or None}`` of the package's git checkout
    (None where the package is not in one, e.g. installed from a wheel)."""
    root = Path(__file__).resolve().parents[2]
    out = {"rolekd": __version__, "commit": None, "dirty": None}
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=20)
        if sha.returncode == 0 and (root / "src" / "rolekd").is_dir():
            out["commit"] = sha.stdout.strip()
            st = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=20)
            out["dirty"] = bool(st.stdout.strip()) if st.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def record_code(run_dir: Path) -> dict:
    """Append this process's :func:`code_version` (and the time) to ``<run_dir>/code.jsonl``."""
    v = {**code_version(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with open(Path(run_dir) / CODE_LOG, "a") as f:
        f.write(json.dumps(v) + "\n")
    return v


def describe_code(run_dir: Path) -> list[str]:
    """The report's lines on the code that ran ``run_dir`` (every start and resume)."""
    p = Path(run_dir) / CODE_LOG
    rows = []
    if p.is_file():
        for line in p.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    if not rows:
        return ["- code: not recorded (a run made before rolekd recorded its commit)"]
    seen = []
    for r in rows:
        what = (f"git {r['commit']}" + (" with uncommitted changes" if r.get("dirty") else "")
                if r.get("commit") else f"rolekd {r.get('rolekd')} (not a git checkout)")
        if not seen or seen[-1][0] != what:
            seen.append((what, r.get("started")))
    if len(seen) == 1:
        return [f"- code: {seen[0][0]} (every start of this run)"]
    return ["- code: this run was started or resumed with different code:"] + \
        [f"  - {w}, from {t}" for w, t in seen]
