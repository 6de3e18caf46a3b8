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

import yaml

from ..errors import UserError

PAPER_FILE = Path(__file__).with_name("paper.yaml")

TEACHER_ROWS = [("vanilla_teacher", "vanilla (base augmentation)", "vanilla"),
                ("teacher", "stage α (teacher schedule A_T)", "stage_alpha")]
STUDENT_ROWS = [("vanilla_student", "vanilla low-bit (teacher init, no KD)", "vanilla"),
                ("only_kd", "only KD (no learned schedule)", "only_kd"),
                ("student_teacher_schedule", "KD + teacher's schedule A_T", "student_teacher_schedule"),
                ("student", "stage β (KD + student schedule A_S)", "stage_beta")]


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


def _read_rewards(path: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    if not path.is_file():
        return out
    with open(path) as f:
        for r in csv.DictReader(f):
            try:
                out.setdefault(str(r["member"]), []).append((int(r["epoch"]), float(r["val_acc"])))
            except (KeyError, ValueError):
                continue
    return out


def _figures(root: Path, stages: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir = root / "figures"
    fig_dir.mkdir(exist_ok=True)
    lines = []
    scheds = {}
    for role, d in (("teacher (A_T)", "alpha_search"), ("student (A_S)", "beta_search")):
        f = root / d / "schedule.json"
        if f.is_file():
            from ..augment.schedule import Schedule

            scheds[role] = Schedule.load(f)
    if scheds:
        from ..augment.plot import plot_schedules_side_by_side

        plot_schedules_side_by_side(scheds, fig_dir / "schedules.png")
        lines.append("![schedules](figures/schedules.png)")
    rewards = {d: _read_rewards(root / d / "rewards.csv") for d in ("alpha_search", "beta_search")}
    rewards = {k: v for k, v in rewards.items() if v}
    if rewards:
        fig, axes = plt.subplots(1, len(rewards), figsize=(6 * len(rewards), 4), squeeze=False)
        for ax, (d, members) in zip(axes[0], rewards.items()):
            for m, pts in sorted(members.items()):
                pts = sorted(pts)
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], lw=1, alpha=0.8, label=f"member {m}")
            ax.set_title(f"{d}: population rewards")
            ax.set_xlabel("epoch")
            ax.set_ylabel("validation accuracy (%)")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(fig_dir / "rewards.png", dpi=110)
        plt.close(fig)
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
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for d, pts in curves.items():
            ax.plot(*zip(*pts), marker=".", label=d)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("test accuracy per epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(fig_dir / "test_curves.png", dpi=110)
        plt.close(fig)
        lines.append("![test curves](figures/test_curves.png)")
    return lines


def _versions() -> list[str]:
    import numpy
    import torch

    from .. import __version__

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return [f"- rolekd {__version__}, Python {platform.python_version()}, torch {torch.__version__}, "
            f"numpy {numpy.__version__}, {platform.platform()}, device: {dev}"]


def build_report(root: str | Path) -> Path:
    """Write ``report.md`` (and ``figures/``) in a pipeline run directory; returns its path."""
    info = collect(root)
    root, cfg, stages = info["root"], info["config"], info["stages"]
    pipe = cfg.get("pipeline") or {}
    t, s = pipe.get("teacher") or {}, pipe.get("student") or {}
    dataset = (cfg.get("data") or {}).get("name", "?")
    paper = _paper_numbers()
    lines = [f"# rolekd report: {cfg.get('name', root.name)}", ""]
    lines += ["Test accuracy on the full test set after the last epoch of each stage. Searches ran on the "
              "reduced split; retraining on the full training set. Paper numbers are shown only where the "
              "setting matches (official CIFAR files, same model, bits and method; sources: "
              "docs/PAPER_NUMBERS.md).", ""]
    tb = 32
    lines += _table("Teacher", TEACHER_ROWS, stages, f"{t.get('model')} {tb}-bit {dataset}", t.get("model", ""),
                    dataset, tb, None, paper)
    sb = int(s.get("w_bits", 32))
    lines += _table(f"Student ({s.get('method')} from {t.get('model')})", STUDENT_ROWS, stages,
                    f"{s.get('model')} {s.get('w_bits')}/{s.get('a_bits')}-bit {dataset}", s.get("model", ""),
                    dataset, sb, s.get("method"), paper)
    beta, only, van = (stages.get(k, {}).get("test_acc") for k in ("student", "only_kd", "vanilla_student"))
    if beta is not None and only is not None:
        verdict = [f"Stage β vs only-KD: {100 * (beta - only):+.2f} points"]
        if van is not None:
            verdict.append(f"vs vanilla low-bit: {100 * (beta - van):+.2f} points")
        lines += ["**" + "; ".join(verdict) + ".**", ""]
    searches = [(k, v) for k, v in stages.items() if k.endswith("_search")]
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
    out = root / "report.md"
    out.write_text("\n".join(lines))
    return out
