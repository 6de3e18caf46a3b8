"""``report.md`` of a pipeline run directory (``rolekd report RUN_DIR`` rebuilds it).

Every number is read from the stages' ``result.json`` / ``search.json`` / ``metrics.jsonl`` files. The
report says what was trained (model, bits, epochs, data sizes, seeds); gives each stage's test accuracy
as mean ± std over its seeds; gives every comparison the paper makes as a paired difference (seed by
seed) with its spread, its 95% confidence interval and paired-t p-value, and whether it stands out from
the seed-to-seed noise; and checks what it reports: a learned schedule that applies no op, two stages
that trained identically, and a random-schedule control whose schedule is not matched to its learned
one are said in words. The paper's numbers (``paper.yaml``; sources in docs/PAPER_NUMBERS.md) appear
beside a cell only when the cell's setting matches the paper's.
"""

from __future__ import annotations

import csv
import json
import math
import platform
import statistics
from pathlib import Path

import numpy
import torch
import yaml

from .. import __version__
from ..augment.schedule import Schedule
from ..config import Config, validate_config
from ..errors import UserError
from ..experiment import RANDOM_SCHEDULE
from ..export.size import config_size, num_classes_of, size_cell
from ..files import atomic_write
from ..provenance import describe_code
from ..plots import plot_rewards, plot_schedules_side_by_side, plot_test_curves
from ..stage_config import stage_config
from ..stages import STAGES, Stage, schedule_path, stage, stage_dir
from ..train.metrics import read_rows

PAPER_FILE = Path(__file__).with_name("paper.yaml")


def _rows(role: str) -> list[Stage]:
    """The retraining stages of ``role``: baselines first, in table order, the role's main stage last."""
    trained = [st for st in STAGES if st.kind == "train" and st.role == role]
    return sorted(trained, key=lambda st: not st.baseline)


TEACHER_ROWS = [(st.name, st.label, st.paper_row) for st in _rows("teacher")]
STUDENT_ROWS = [(st.name, st.label, st.paper_row) for st in _rows("student")]
SEARCHES = [st.name for st in STAGES if st.kind == "search"]
SCHEDULES = {"alpha_search": "A_T (teacher)", "beta_search": "A_S (student)"}

# the comparisons the paper makes, as (label, stage, baseline): difference = stage - baseline, seed by seed
COMPARISONS = [
    ("stage α vs vanilla teacher (A_T vs base augmentation)", "teacher", "vanilla_teacher"),
    ("stage β vs only-KD (A_S vs base augmentation, both with KD)", "student", "only_kd"),
    ("student schedule vs teacher schedule (A_S vs A_T, both with KD)", "student", "student_teacher_schedule"),
    ("KD vs no KD (only-KD, from the teacher, vs the vanilla student, from scratch)", "only_kd", "vanilla_student"),
    ("student with A_T vs vanilla student (no KD, both from scratch)", "student_alpha", "vanilla_student"),
    ("A_T vs random (teacher)", "teacher", "teacher_random_schedule"),
    ("A_S vs random (both with KD)", "student", "student_random_schedule"),
]


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
    try:
        cfg = validate_config(yaml.safe_load(cfg_file.read_text()) or {}, str(cfg_file))
    except yaml.YAMLError:
        raise UserError(f"{cfg_file} is not valid YAML: rerun `rolekd run` with the pipeline's config") from None
    finished = _read_json(root / "results.json")  # the stages the pipeline finished (written after the last one)
    if isinstance(finished, dict):
        for d, res in finished.items():
            kinds = [st.kind for st in STAGES if d == st.name or d.startswith(st.name + "_seed")]
            f = root / d / ("search.json" if kinds[:1] == ["search"] else "result.json")
            if not f.is_file():
                node = res.get("ray_node") if isinstance(res, dict) else None
                raise UserError(f"{root}: stage {d} finished{f' on Ray node {node[:12]}' if node else ''} "
                                f"(results.json) but {f} is missing: its results were written elsewhere; the run "
                                f"directory must be on storage every node shares (docs/CLUSTER.md)")
    # stage -> results of seed 0, 1, ... (None where missing), each with its run directory's name (_dir) and
    # the rows of its metrics.jsonl (_rows); the first found also with its config.yaml (_config)
    runs: dict[str, list[dict]] = {}
    for st in STAGES:
        n = 1 if st.kind == "search" else cfg.pipeline.seeds
        found = []
        for k in range(n):
            d = root / stage_dir(st.name, k)
            res = _read_json(d / ("search.json" if st.kind == "search" else "result.json"))
            if res is not None:
                res = dict(res, _dir=d.name, _rows=read_rows(d / "metrics.jsonl", note=False, strict=False))
            found.append(res)
        first = _first(found)
        if first is not None:
            stage_cfg = root / first["_dir"] / "config.yaml"
            if stage_cfg.is_file():
                first["_config"] = yaml.safe_load(stage_cfg.read_text()) or {}
            runs[st.name] = found
    # the learned schedules (None where absent), by search
    schedules = {}
    for d in SCHEDULES:
        f = schedule_path(d, root, cfg.pipeline.teacher_schedule)
        schedules[d] = Schedule.load(f) if f.is_file() else None
    # the random schedules of the random-schedule controls, by stage, per seed run (None where absent)
    randoms = {}
    for st in STAGES:
        if st.random_schedule and st.name in runs:
            files = [root / stage_dir(st.name, k) / RANDOM_SCHEDULE for k in range(cfg.pipeline.seeds)]
            randoms[st.name] = [Schedule.load(f) if f.is_file() else None for f in files]
    return {"root": root, "config": cfg, "runs": runs, "schedules": schedules, "randoms": randoms}


# ---------------------------------------------------------------------------------------- numbers
def _accs(results: list[dict | None]) -> list[float | None]:
    return [None if r is None or r.get("test_acc") is None else 100 * float(r["test_acc"]) for r in results]


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _student_t():
    """scipy's Student t, imported when a report needs it (scipy.stats takes ~0.6 s to import, and every
    pipeline worker process imports this module's package)."""
    from scipy import stats

    return stats.t


def warm_up_report() -> None:
    """Import what :func:`build_report` needs beyond this module (scipy's t distribution, matplotlib's
    figure and Agg canvas: ~1.7 s), e.g. while the pipeline's last stage runs and a CPU is free."""
    _student_t()
    from matplotlib import colormaps  # noqa: F401
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    from matplotlib.figure import Figure  # noqa: F401
    from matplotlib.ticker import MaxNLocator  # noqa: F401


def t95(df: int) -> float:
    """The two-sided 95% quantile of Student's t with ``df`` degrees of freedom."""
    return float(_student_t().ppf(0.975, df))


def paired(a: list[float | None], b: list[float | None]) -> dict | None:
    """The seed-by-seed differences a - b: mean, std, n, paired t, the 95% confidence interval of the mean
    (mean ± t_{0.975, n-1} · sd / √n), the two-sided p-value of the paired t test and the verdict against
    seed noise. ``ci`` and ``p`` are None where the differences have no spread (one seed, or the same
    difference in every seed)."""
    # rounded: accuracies are multiples of 1/n_test, so a difference that is the same in every seed must
    # give a spread of exactly 0 (not 1e-15 and a paired t of 1e15)
    diffs = [round(x - y, 9) for x, y in zip(a, b) if x is not None and y is not None]
    if not diffs:
        return None
    n, mean = len(diffs), statistics.mean(diffs)
    if n == 1:
        return {"mean": mean, "std": None, "n": 1, "t": None, "ci": None, "p": None,
                "verdict": "one seed: the seed-to-seed noise is unknown (run with seeds=N, N >= 2)"}
    sd = statistics.stdev(diffs)
    crit = t95(n - 1)
    ci = p = None
    if sd == 0:
        t = math.inf if mean else 0.0
    else:
        t = mean / (sd / math.sqrt(n))
        half = crit * sd / math.sqrt(n)
        ci = (mean - half, mean + half)
        p = float(2 * _student_t().sf(abs(t), n - 1))
    if mean == 0 and sd == 0:
        verdict = "identical in every seed"
    elif sd == 0:
        verdict = (f"the same difference in all {n} seeds: no seed-to-seed spread seen (paired t undefined; "
                   f"more seeds would measure the noise)")
    elif abs(t) > crit:
        verdict = f"larger than the seed-to-seed noise (paired t = {t:.2f}, 95% needs abs(t) > {crit:.2f})"
    else:
        verdict = f"within the seed-to-seed noise (paired t = {t:.2f}, 95% needs abs(t) > {crit:.2f})"
    return {"mean": mean, "std": sd, "n": n, "t": t, "ci": ci, "p": p, "verdict": verdict}


def _paper_cells() -> tuple[list[dict], int | None]:
    if not PAPER_FILE.is_file():
        return [], None
    data = yaml.safe_load(PAPER_FILE.read_text()) or {}
    return list(data.get("cells") or []), data.get("epochs")


def cell_setting(cfg: Config, st: Stage, stage_cfg: Config) -> dict:
    """The setting of one report cell, in the keys paper.yaml uses, from the pipeline config ``cfg`` and the
    config the stage ran (or would run) with."""
    c = stage_cfg
    s = {"dataset": cfg.data.name, "model": c.model.name, "bits": c.quant.w_bits, "row": st.paper_row,
         "epochs": c.train.epochs}
    if st.role == "student":
        teacher = cfg.pipeline.teacher.model.name
        s["teacher"] = teacher
        init = st.init == "teacher" and teacher == c.model.name and c.kd.init_from_teacher
        s["init"] = "teacher" if init else "scratch"
        if st.kd:
            s["method"] = c.kd.method
            s["lam"] = c.kd.lam
    return s


def paper_number(cells: list[dict], epochs: int | None, setting: dict) -> str:
    """The paper's number for a cell of this setting ('' when no cell matches), with where it is."""
    if setting.get("dataset") not in ("cifar10", "cifar100") or (epochs is not None and setting["epochs"] != epochs):
        return ""
    for cell in cells:
        want = cell.get("setting") or {}
        if all(k in setting and (setting[k] == v or (isinstance(v, float) and isinstance(setting[k], (int, float))
                                                     and abs(setting[k] - v) < 1e-9)) for k, v in want.items()):
            return f"{float(cell['acc']):.2f} ({cell['table']}, {cell['where']})"
    return ""


# ---------------------------------------------------------------------------------------- checks
def schedule_activity(sched: Schedule) -> tuple[int, int]:
    """(epochs in which some op has probability > 0, epochs) of a schedule."""
    active = sum(1 for k in sched.active_slots() if k)
    return active, len(sched)


def random_schedule_checks(info: dict) -> list[str]:
    """One line per random-schedule control: whether each seed run's random schedule has its learned
    schedule's number of active slots in every epoch, and differs from it."""
    lines = []
    for name, randoms in info["randoms"].items():
        st = stage(name)
        learned = info["schedules"].get(st.schedule)
        found = [(k, r) for k, r in enumerate(randoms) if r is not None]
        if learned is None or not found:
            continue
        unmatched = [k for k, r in found if r.active_slots() != learned.active_slots()]
        same = [k for k, r in found if r == learned]
        what = SCHEDULES[st.schedule]
        problems = []
        if unmatched:
            problems.append(f"in seed run(s) {', '.join(map(str, unmatched))} it does not have {what}'s number of "
                            f"active slots in every epoch")
        if same:
            problems.append(f"in seed run(s) {', '.join(map(str, same))} it is {what} itself")
        if problems:
            lines.append(f"- **The random schedule of {st.label} is not a matched random schedule**: "
                         f"{'; '.join(problems)}.")
        else:
            seeds = ", ".join(str(r.meta.get("seed")) for _, r in found)
            lines.append(f"- The random schedules of {st.label} ({len(found)} seed run(s), seeds {seeds}, "
                         f"`{RANDOM_SCHEDULE}`) have {what}'s number of active slots in each of its {len(learned)} "
                         f"epochs ({sum(learned.active_slots())} in all) and differ from it.")
    return lines


def _trajectory(results: dict | None) -> list[tuple] | None:
    if results is None:
        return None
    keys = ("train_loss", "train_acc", "test_acc")
    return [tuple(r.get(k) for k in keys) for r in results["_rows"]] or None


def identical_pairs(info: dict) -> list[tuple[str, str, list[int]]]:
    """Compared stage pairs that trained identically (the same losses and accuracies in every epoch), with
    the seeds where they did."""
    runs = info["runs"]
    out = []
    for _, a, b in COMPARISONS:
        if a in runs and b in runs:
            same = [k for k, (ra, rb) in enumerate(zip(runs[a], runs[b]))
                    if (ta := _trajectory(ra)) is not None and ta == _trajectory(rb)]
            if same:
                out.append((a, b, same))
    return out


# ---------------------------------------------------------------------------------------- figures
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


def _figures(info: dict) -> list[str]:
    root, runs = info["root"], info["runs"]
    fig_dir = root / "figures"
    fig_dir.mkdir(exist_ok=True)
    lines = []
    scheds = {}
    for d, label in SCHEDULES.items():
        sched = info["schedules"][d]
        if sched is not None:
            active, epochs = schedule_activity(sched)
            scheds[f"{label}: ops in {active} of {epochs} epochs"] = sched
    for name, randoms in info["randoms"].items():
        first = next(((k, r) for k, r in enumerate(randoms) if r is not None), None)
        if first is not None:
            scheds[f"random, matched to {SCHEDULES[stage(name).schedule].split()[0]} (seed run {first[0]})"] = first[1]
    if scheds:
        plot_schedules_side_by_side(scheds, fig_dir / "schedules.png")
        lines.append("![schedules](figures/schedules.png)")
    rewards = {d: _read_csv(root / d / "rewards.csv") for d in SEARCHES}
    rewards = {k: v for k, v in rewards.items() if v}
    if rewards:
        best = {d: int(runs[d][0]["best_member"]) for d in rewards if runs.get(d) and runs[d][0]}
        exploits = {d: _read_exploits(root / d / "pbt_global.txt") for d in rewards}
        plot_rewards(rewards, fig_dir / "rewards.png", best=best, exploits=exploits)
        lines.append("![search rewards](figures/rewards.png)")
    curves = {}
    for st in STAGES:
        per_seed = []
        for res in runs.get(st.name, []):
            if res is None:
                continue
            pts = [(r["epoch"] + 1, 100 * r["test_acc"]) for r in res["_rows"] if "test_acc" in r]
            if pts:
                per_seed.append(pts)
        if per_seed:
            n = min(len(p) for p in per_seed)
            mean = [(per_seed[0][i][0], statistics.mean(p[i][1] for p in per_seed)) for i in range(n)]
            curves[st.name + (f" (mean of {len(per_seed)} seeds)" if len(per_seed) > 1 else "")] = mean
    if curves:
        plot_test_curves(curves, fig_dir / "test_curves.png")
        lines.append("![test curves](figures/test_curves.png)")
    return lines


# ---------------------------------------------------------------------------------------- the report
def _versions() -> list[str]:
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return [f"- rolekd {__version__}, Python {platform.python_version()}, torch {torch.__version__}, "
            f"numpy {numpy.__version__}, {platform.platform()}, device: {dev}"]


def _first(results: list[dict | None] | None) -> dict | None:
    return next((r for r in results or [] if r is not None), None)


def _what(info: dict, role: str) -> str:
    cfg, runs = info["config"], info["runs"]
    r = next((_first(runs.get(st.name)) for st in _rows(role) if _first(runs.get(st.name))), None)
    rc = cfg.pipeline.teacher if role == "teacher" else cfg.pipeline.student
    epochs = (r or {}).get("epochs", rc.train.get("epochs", cfg.train.epochs))
    n_train = (r or {}).get("train_images", "?")
    n_test = (r or {}).get("test_images", "?")
    bits = "32-bit (full precision)" if rc.quant.w_bits == 32 and rc.quant.a_bits == 32 else \
        f"{rc.quant.w_bits}-bit weights / {rc.quant.a_bits}-bit activations (DoReFa)"
    kd = f", KD: {rc.method} (λ = {cfg.kd.lam}) from the stage-α teacher" if role == "student" else ""
    return (f"{rc.model.name}, {bits}{kd}; {epochs} epochs on {n_train} training images of {cfg.data.name}, "
            f"tested on {n_test} images; {cfg.pipeline.seeds} seed(s) per stage")


def _table(info: dict, role: str, cells: list[dict], paper_epochs: int | None) -> list[str]:
    cfg, runs = info["config"], info["runs"]
    title = "Teacher" if role == "teacher" else "Student"
    student = role == "student"
    lines = [f"### {title}", "", _what(info, role) + ".", "",
             "| stage | test acc (%), mean ± std over seeds | seeds | paper (%) |" + (" size |" if student else ""),
             "|---|---:|---:|---|" + ("---:|" if student else "")]
    for st in _rows(role):
        if st.name not in runs and st.baseline:
            continue
        accs = [a for a in _accs(runs.get(st.name, [])) if a is not None]
        first = _first(runs.get(st.name))
        saved = (first or {}).get("_config")
        sc = validate_config(saved, "stage config") if saved else stage_config(cfg, st, info["root"])
        setting = cell_setting(cfg, st, sc)
        lines.append(f"| {st.label} | {_mean_std(accs)} | {len(accs)} | "
                     f"{paper_number(cells, paper_epochs, setting) or '—'} |"
                     + (f" {_size(sc, info['root'] / first['_dir'] if first else None)} |" if student else ""))
    if student:
        lines += ["", "Size: the weights at their true bit widths (low-bit weights packed, everything else float32) "
                      "and in float32 (`rolekd export` writes the model as ONNX)."]
    return lines + [""]


def _size(stage_cfg: Config, run_dir: Path | None) -> str:
    """The student's size at its bits, from its config and its number of classes (read from its weights)."""
    weights = run_dir / "model.safetensors" if run_dir is not None else None
    if weights is None or not weights.is_file():
        return "—"
    try:
        return size_cell(config_size(stage_cfg, num_classes_of(stage_cfg, weights)))
    except UserError:
        return "—"


def build_report(root: str | Path) -> Path:
    """Write ``report.md`` (and ``figures/``) in a pipeline run directory; returns its path."""
    info = collect(root)
    root, cfg, runs = info["root"], info["config"], info["runs"]
    cells, paper_epochs = _paper_cells()
    lines = [f"# rolekd report: {cfg.name}", "",
             f"Role-wise KD pipeline on {cfg.data.name}. Searches ran once on the reduced split "
             f"({cfg.data.train_size} training / {cfg.data.val_size} validation images, population "
             f"{cfg.search.population}, {cfg.search.epochs} epochs, perturbation every {cfg.search.perturb_interval}); "
             f"each retraining stage ran on the full training set with {cfg.pipeline.seeds} seed(s) "
             f"(train.seed, +1, ...; every stage the same seeds, so stages pair up). Test accuracy after the last "
             f"epoch. Paper numbers appear only where the setting matches the paper's (dataset, model, bits, "
             f"KD method, teacher, λ, initialisation, {paper_epochs or 200} epochs; docs/PAPER_NUMBERS.md).", ""]
    lines += ["## Checks", ""]
    for d, label in SCHEDULES.items():
        sched = info["schedules"][d]
        if sched is None:
            continue
        active, epochs = schedule_activity(sched)
        if active == 0:
            lines.append(f"- **The learned schedule {label} is empty**: no op has a probability above 0 in any "
                         f"of its {epochs} epochs (the search's best member was never perturbed), so the stages "
                         f"trained with it used base augmentation only.")
        else:
            lines.append(f"- The learned schedule {label} applies ops in {active} of its {epochs} epochs.")
    for a, b, seeds in identical_pairs(info):
        which = "every seed" if len(seeds) == len(runs[a]) else "seed(s) " + ", ".join(map(str, seeds))
        lines.append(f"- **{stage(a).label} and {stage(b).label} trained identically** (the same losses and "
                     f"accuracies in every epoch, {which}): their comparison compares a run with itself.")
    lines += random_schedule_checks(info)
    lines.append("")
    lines += ["## Results", ""]
    lines += _table(info, "teacher", cells, paper_epochs)
    lines += _table(info, "student", cells, paper_epochs)
    comps = []
    for label, a, b in COMPARISONS:
        if a in runs and b in runs:
            p = paired(_accs(runs[a]), _accs(runs[b]))
            if p is not None:
                spread = f" ± {p['std']:.2f}" if p["std"] is not None else ""
                ci = "—" if p["ci"] is None else f"[{p['ci'][0]:+.2f}, {p['ci'][1]:+.2f}]"
                pv = "—" if p["p"] is None else f"{p['p']:.3g}"
                comps.append(f"| {label} | {p['mean']:+.2f}{spread} | {p['n']} | {ci} | {pv} | {p['verdict']} |")
    if comps:
        lines += ["### Comparisons (paired by seed)", "",
                  "| comparison | difference (points), mean ± std | seeds | 95% CI of the mean (paired t) | "
                  "p (two-sided paired t) | verdict |", "|---|---:|---:|---:|---:|---|"]
        lines += comps + [""]
    searches = [(k, runs[k][0]) for k in SEARCHES if k in runs and runs[k][0]]
    if searches:
        lines += ["### Searches", "", "| search | best member | best val acc (%) | test acc of best (%) | exploits | "
                  "wall time (s) |", "|---|---:|---:|---:|---:|---:|"]
        for k, v in searches:
            best = v.get("best_val_acc")
            test = v.get("best_test_acc")
            lines.append(f"| {k} | {v.get('best_member', '—')} | {100 * best:.2f} | "
                         f"{'—' if test is None else f'{100 * test:.2f}'} | {v.get('exploits', '—')} | "
                         f"{v.get('wall_time_s', '—')} |" if best is not None else f"| {k} | — | — | — | — | — |")
        lines.append("")
    lines += ["## Figures", ""] + _figures(info) + [""]
    lines += ["## Config", "", "```yaml", (root / "config.yaml").read_text().rstrip(), "```", "", "## Versions", ""]
    lines += _versions() + describe_code(root) + [""]
    return atomic_write(root / "report.md", "\n".join(lines))
