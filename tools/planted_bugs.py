"""Plant each bug of tests/planted_bugs.yaml in a copy of the checkout and check that its tests fail.

    python tools/planted_bugs.py                 # every bug; a table, exit 1 if any bug survives
    python tools/planted_bugs.py --only ID ...   # some of them
    python tools/planted_bugs.py --list

Each entry names a file, an exact text that occurs once in it, its replacement (the bug) and the tests that
must catch it. The checkout (tracked and untracked files, not ignored ones) is copied once to a temporary
directory beside a link to ``../shared``; for each bug the file is changed there, the named tests run with
``python -m pytest -x -q -n 0`` on the copy's ``src`` (first on ``PYTHONPATH``, ahead of an installed rolekd), and
the file is restored. First the named tests run once without any bug: they must pass. A bug is *caught* when
its tests fail (pytest exit status 1; an entry with ``slow: true`` runs its tests although they are marked
slow); an error before any test ran (collection, exit 2-4) is reported as
such, not counted as caught. Slow by design (minutes): run by hand before cutting or reshaping tests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LIST = ROOT / "tests" / "planted_bugs.yaml"


def load() -> list[dict]:
    bugs = yaml.safe_load(LIST.read_text())
    seen = set()
    for b in bugs:
        missing = {"id", "file", "find", "replace", "tests", "why"} - set(b)
        if missing:
            raise SystemExit(f"{LIST}: entry {b.get('id')} lacks {sorted(missing)}")
        if b["id"] in seen:
            raise SystemExit(f"{LIST}: duplicate id {b['id']}")
        seen.add(b["id"])
        text = (ROOT / b["file"]).read_text()
        if text.count(b["find"]) != 1:
            raise SystemExit(f"{LIST}: {b['id']}: the text to replace occurs {text.count(b['find'])} times in "
                             f"{b['file']} (must be once)")
    return bugs


def copy_checkout(dst: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    main = dst / "main"
    for f in files:
        if f and (ROOT / f).is_file():
            (main / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, main / f)
    shared = ROOT.parent / "shared"
    if shared.is_dir():
        (dst / "shared").symlink_to(shared)
    return main


def pytest(main: Path, tests: list[str], slow: bool = False) -> tuple[int, float, str]:
    env = dict(os.environ, PYTHONPATH=str(main / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    marks = ["-m", ""] if slow else []  # named tests marked slow run too (the suite's addopts deselect them)
    done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-n", "0", "-p", "no:cacheprovider",
                           *marks, *tests],
                          cwd=main, env=env, capture_output=True, text=True)
    tail = [x for x in (done.stdout + done.stderr).strip().splitlines() if x.strip()]
    failed = [x for x in tail if x.startswith(("FAILED ", "ERROR "))]  # -rfE: which test failed
    return done.returncode, time.time() - t0, "; ".join(failed[:1] + tail[-1:]) if tail else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="ids to run")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--no-clean", action="store_true", help="skip the run without bugs")
    a = ap.parse_args()
    bugs = load()
    if a.only:
        unknown = set(a.only) - {b["id"] for b in bugs}
        if unknown:
            raise SystemExit(f"unknown ids {sorted(unknown)}")
        bugs = [b for b in bugs if b["id"] in a.only]
    if a.list:
        for b in bugs:
            print(f"{b['id']}: {b['file']} -- {b['why']}")
        return 0
    with tempfile.TemporaryDirectory(prefix="rolekd-planted-") as tmp:
        main_dir = copy_checkout(Path(tmp))
        if not a.no_clean:
            for slow in (False, True):  # as the bugs run them: a slow entry's tests with -m "", the others without
                tests = sorted({t for b in bugs if bool(b.get("slow")) == slow for t in b["tests"]})
                if not tests:
                    continue
                rc, secs, last = pytest(main_dir, tests, slow)
                label = "without bugs (slow entries)" if slow else "without bugs"
                print(f"{label}: exit {rc} in {secs:.0f} s ({last})", flush=True)
                if rc != 0:
                    print("the tests fail without any bug: fix them first")
                    return 1
        rows, survived = [], []
        for b in bugs:
            path = main_dir / b["file"]
            original = path.read_text()
            path.write_text(original.replace(b["find"], b["replace"], 1))
            try:
                rc, secs, last = pytest(main_dir, b["tests"], bool(b.get("slow")))
            finally:
                path.write_text(original)
            verdict = "caught" if rc == 1 else ("SURVIVED" if rc == 0 else f"error (exit {rc})")
            if rc != 1:
                survived.append(b["id"])
            rows.append(f"| {b['id']} | {b['file']} | {verdict} | {secs:.0f} s | {last[:90]} |")
            print(rows[-1], flush=True)
    print("\n| bug | file | result | time | pytest's last line |\n|---|---|---|---:|---|")
    print("\n".join(rows))
    print(f"\n{len(rows) - len(survived)} of {len(rows)} caught" + (f"; not caught: {survived}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
