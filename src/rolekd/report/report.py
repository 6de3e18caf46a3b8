"""``report.md`` of a pipeline run directory (``rolekd report RUN_DIR`` rebuilds it).

Every number in the tables is read from the stages' ``result.json`` / ``search.json`` files; the
paper's numbers (``paper.yaml``, sources in docs/PAPER_NUMBERS.md) are printed beside a cell only when
the setting matches (same model, dataset, bits and KD method).
"""

from __future__ import annotations

import csv
import json
import platform
from pathlib import Path

import numpy
import torch
import yaml

from .. import __version__
from ..augment.schedule import Schedule
from ..config import RoleConfig
from ..errors import UserError
from ..files import atomic_write
from ..plots import plot_rewards, plot_schedules_side_by_side, plot_test_curves
from ..stages import STAGES

PAPER_FILE = Path(__file__).with_name("paper.yaml")


def _rows(role: str) -> list[tuple[str, str, str | None]]:
    """(stage, label, paper row) of the trained stages of ``role``: baselines first, in table order."""
    trained = [st for st in STAGES if st.kind == "train" and st.role == role]
    return [(st.name, st.label, st.paper_row) for st in sorted(trained, key=lambda st: not st.baseline)]


TEACHER_ROWS = _rows("teacher")
STUDENT_ROWS = _rows("student")
SEARCHES = [st.name for st in STAGES if st.kind == "search"]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def collect(root: str | Path) -> dict:
    """Everything the report shows, read from the run directory."""
    root = Path(root)
    cfg_file = root / "config.yaml"
    if not cfg_file.is_file():
        raise UserError(f"{root} is not a rolekd run directory (no config.yaml): give the folder `rolekd run` wrote")
    cfg = yaml.safe_load(cfg_file.read_text()) or {}
    stages = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        res = _read_json(d / "result.json") or _read_json(d / "search.json")
        if res is not None:
            stages[d.name] = res
    return {"root": root, "config": cfg, "stages": stages}


def _paper_numbers() -> list[dict]:
    if not PAPER_FILE.is_file():
        return []
    data = yaml.safe_load(PAPER_FILE.read_text()) or {}
    rows = []
    for table, t in (data.get("tables") or {}).items():
        for r in t.get("rows", []) or []:
            rows.append(dict(r, table=table))
    return rows


def _paper_cell(rows: list[dict], model: str, dataset: str, bits: int, row: str, method: str | None) -> str:
    if dataset not in ("cifar10", "cifar100"):
        return ""
    for r in rows:
        if (r.get("model") == model and r.get("dataset") == dataset and int(r.get("bits", -1)) == bits
                and r.get("row") == row and r.get("method", method) in (method, None)):
            return f"{float(r['acc']):.2f} ({r['table']})"
    return ""


def _acc(res: dict | None) -> str:
    if not res or res.get("test_acc") is None:
        return "—"
    return f"{100 * float(res['test_acc']):.2f}"


def _table(title: str, rows, stages: dict, setting: str, model: str, dataset: str, bits: int,
           method: str | None, paper: list[dict]) -> list[str]:
    lines = [f"### {title}", "", f"| method / stage | {setting}: test acc (%) | paper (%) |", "|---|---:|---:|"]
    for key, label, paper_row in rows:
        if key not in stages and key not in ("teacher", "student"):
            continue
        lines.append(f"| {label} | {_acc(stages.get(key))} | "
                     f"{_paper_cell(paper, model, dataset, bits, paper_row, method) or '—'} |")
    return lines + [""]


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def _read_exploits(path: Path) -> list[dict]:
    """The exploits of ``pbt_global.txt``: epoch, target, clone."""
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                target, clone, epoch = json.loads(line)[:3]
                out.append({"epoch": int(epoch), "target": int(target), "clone": int(clone)})
            except (ValueError, TypeError):
                continue
    return out


def _figures(root: Path, stages: dict) -> list[str]:
    fig_dir = root / "figures"
    fig_dir.mkdir(exist_ok=True)
    lines = []
    scheds = {}
    for role, d in (("teacher (A_T)", "alpha_search"), ("student (A_S)", "beta_search")):
        f = root / d / "schedule.json"
        if f.is_file():
            scheds[role] = Schedule.load(f)
    if scheds:
        plot_schedules_side_by_side(scheds, fig_dir / "schedules.png")
        lines.append("![schedules](figures/schedules.png)")
    rewards = {d: _read_csv(root / d / "rewards.csv") for d in SEARCHES}
    rewards = {k: v for k, v in rewards.items() if v}
    if rewards:
        best = {d: int(stages[d]["best_member"]) for d in rewards if "best_member" in stages.get(d, {})}
        exploits = {d: _read_exploits(root / d / "pbt_global.txt") for d in rewards}
        plot_rewards(rewards, fig_dir / "rewards.png", best=best, exploits=exploits)
        lines.append("![search rewards](figures/rewards.png)")
    curves = {}
    for d in stages:
        m = root / d / "metrics.jsonl"
        if m.is_file():
            rows = [json.loads(x) for x in m.read_text().splitlines() if x.strip()]
            pts = [(r["epoch"] + 1, 100 * r["test_acc"]) for r in rows if "test_acc" in r]
            if pts:
                curves[d] = pts
    if curves:
        plot_test_curves(curves, fig_dir / "test_curves.png")
        lines.append("![test curves](figures/test_curves.png)")
    return lines


def _versions() -> list[str]:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return [f"- rolekd {__version__}, Python {platform.python_version()}, torch {torch.__version__}, "
            f"numpy {numpy.__version__}, {platform.platform()}, device: {dev}"]


def build_report(root: str | Path) -> Path:
    """Write ``report.md`` (and ``figures/``) in a pipeline run directory; returns its path."""
    info = collect(root)
    root, cfg, stages = info["root"], info["config"], info["stages"]
    pipe = cfg.get("pipeline") or {}
    t, s = (RoleConfig.model_validate(pipe.get(r) or {}) for r in ("teacher", "student"))
    dataset = (cfg.get("data") or {}).get("name", "?")
    paper = _paper_numbers()
    lines = [f"# rolekd report: {cfg.get('name', root.name)}", ""]
    lines += ["Test accuracy on the full test set after the last epoch of each stage. Searches ran on the "
              "reduced split; retraining on the full training set. Paper numbers are shown only where the "
              "setting matches (official CIFAR files, same model, bits and method; sources: "
              "docs/PAPER_NUMBERS.md).", ""]
    tb = 32
    lines += _table("Teacher", TEACHER_ROWS, stages, f"{t.model.name} {tb}-bit {dataset}", t.model.name,
                    dataset, tb, None, paper)
    sb = s.quant.w_bits
    lines += _table(f"Student ({s.method} from {t.model.name})", STUDENT_ROWS, stages,
                    f"{s.model.name} {s.quant.w_bits}/{s.quant.a_bits}-bit {dataset}", s.model.name,
                    dataset, sb, s.method, paper)
    beta, only, van = (stages.get(k, {}).get("test_acc") for k in ("student", "only_kd", "vanilla_student"))
    if beta is not None and only is not None:
        verdict = [f"Stage β vs only-KD: {100 * (beta - only):+.2f} points"]
        if van is not None:
            verdict.append(f"vs vanilla low-bit: {100 * (beta - van):+.2f} points")
        lines += ["**" + "; ".join(verdict) + ".**", ""]
    searches = [(k, stages[k]) for k in SEARCHES if k in stages]
    if searches:
        lines += ["### Searches", "", "| search | best member | best val acc (%) | exploits | wall time (s) |",
                  "|---|---:|---:|---:|---:|"]
        for k, v in searches:
            best = v.get("best_val_acc")
            lines.append(f"| {k} | {v.get('best_member', '—')} | {100 * best:.2f} | {v.get('exploits', '—')} | "
                         f"{v.get('wall_time_s', '—')} |" if best is not None else f"| {k} | — | — | — | — |")
        lines.append("")
    lines += ["## Figures", ""] + _figures(root, stages) + [""]
    lines += ["## Config", "", "```yaml", (root / "config.yaml").read_text().rstrip(), "```", "", "## Versions", ""]
    lines += _versions() + [""]
    return atomic_write(root / "report.md", "\n".join(lines))
