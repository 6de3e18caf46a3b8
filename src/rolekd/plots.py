"""Every figure rolekd draws: schedules (the paper's Fig. 3/4), search rewards, test curves.

All figures use matplotlib's Agg canvas directly (no global backend switch, no display needed) and are
written atomically (:func:`save_figure`).

Schedules: two panels per schedule, over epochs, one line per op (15, with a legend):

* probability: each op's probability averaged over its two copies in the policy, divided by the
  largest per-epoch sum of these probabilities (so the busiest epoch sums to 1);
* magnitude: each op's magnitude (0..9) averaged over its two copies.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np

from rolekd.augment.schedule import Schedule
from rolekd.augment.space import MAX_PROB, NUM_OPS, OPS, POLICY_LEN, validate_policy
from rolekd.files import write_file

ScheduleLike = Union[Schedule, Sequence[Sequence[int]]]

DEFAULT_FIGSIZE = (12.0, 4.5)
PROB_LABEL = "share of augmentation\n(op probability / busiest epoch's total)"
MAG_LABEL = "magnitude (0 = weakest, 9 = strongest)"
DEFAULT_DPI = 100


def _policies(s: ScheduleLike) -> np.ndarray:
    if isinstance(s, Schedule):
        pols = s.policies
    else:
        pols = [validate_policy(p) for p in s]
    if not pols:
        raise ValueError("cannot plot an empty schedule")
    return np.asarray(pols, dtype=np.float64).reshape(len(pols), POLICY_LEN)


def op_curves(s: ScheduleLike) -> tuple[np.ndarray, np.ndarray]:
    """``(probability, magnitude)``, each ``(epochs, 15)``: the plotted values, per op in ``OPS`` order.

    Probability is the two copies' mean ``v/10``, divided by the largest per-epoch sum over ops
    (left as is when the schedule never augments); magnitude is the two copies' mean level.
    """
    v = _policies(s)
    prob = (v[:, 0:2 * NUM_OPS:2] + v[:, 2 * NUM_OPS::2]) / 2.0 / MAX_PROB
    mag = (v[:, 1:2 * NUM_OPS:2] + v[:, 2 * NUM_OPS + 1::2]) / 2.0
    peak = prob.sum(axis=1).max()
    if peak > 0:
        prob = prob / peak
    return prob, mag


def _colors(n: int = NUM_OPS) -> list:
    """The first ``n`` colours of tab20 (ops: one each; search members: ``n = 20``, reused beyond)."""
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return [cmap(i) for i in range(n)]


def _style(k: int) -> str:
    """tab20 gives ops 2j and 2j + 1 a dark and a light shade of one hue: solid vs dashed tells them apart."""
    return "-" if k % 2 == 0 else "--"


def _draw(ax_p, ax_m, s: ScheduleLike, colors: list, label: str | None) -> list:
    from matplotlib.ticker import MaxNLocator

    prob, mag = op_curves(s)
    n = prob.shape[0]
    x = np.arange(n + 1)  # epoch e covers [e, e + 1): draw as steps, repeating the last value
    prob = np.vstack([prob, prob[-1:]])
    mag = np.vstack([mag, mag[-1:]])
    handles = []
    for k, op in enumerate(OPS):
        kw = dict(color=colors[k], lw=1.4, ls=_style(k), label=op, drawstyle="steps-post")
        (h,) = ax_p.plot(x, prob[:, k], **kw)
        ax_m.plot(x, mag[:, k], **kw)
        handles.append(h)
    prefix = f"{label}\n" if label else ""
    ax_p.set_title(prefix + "how often each op is applied")
    ax_m.set_title(prefix + "how strongly (magnitude)")
    for ax in (ax_p, ax_m):
        ax.set_xlabel("epoch")
        ax.set_xlim(0, n)
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_p.set_ylim(bottom=0)
    ax_m.set_ylim(0, 9.5)
    return handles


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG at ``path`` (atomically); an OS error is one UserError line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    return write_file(path, lambda p: fig.savefig(p, format="png"))


def plot_schedule(schedule_or_list: ScheduleLike, path: str | os.PathLike, title: str | None = None, *,
                  figsize: tuple[float, float] = DEFAULT_FIGSIZE, dpi: int = DEFAULT_DPI) -> Path:
    """Write a PNG of one schedule: probability and magnitude panels, 15 op lines, a legend.

    The image is ``figsize * dpi`` pixels. Returns ``path``.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    ax_p, ax_m = fig.subplots(1, 2)
    handles = _draw(ax_p, ax_m, schedule_or_list, _colors(), None)
    ax_p.set_ylabel(PROB_LABEL)
    ax_m.set_ylabel(MAG_LABEL)
    fig.legend(handles, list(OPS), loc="center right", fontsize="small", frameon=False)
    if title:
        fig.suptitle(title)
    fig.subplots_adjust(left=0.06, right=0.85, bottom=0.12, top=0.84 if title else 0.9, wspace=0.22)
    save_figure(fig, path)
    return Path(path)


def plot_schedules_side_by_side(schedules: Mapping[str, ScheduleLike], path: str | os.PathLike,
                                title: str | None = None, *, dpi: int = DEFAULT_DPI,
                                figsize: tuple[float, float] | None = None) -> Path:
    """Write a PNG with one column per named schedule (e.g. teacher, student): probability on
    top, magnitude below, one shared legend. Default size: ``(5.5 * n + 2, 7)`` inches."""
    from matplotlib.figure import Figure

    if not schedules:
        raise ValueError("no schedules to plot")
    n = len(schedules)
    fig = Figure(figsize=figsize or (5.5 * n + 2.0, 7.0), dpi=dpi)
    axes = np.asarray(fig.subplots(2, n, squeeze=False))
    colors = _colors()
    handles: list = []
    for j, (name, s) in enumerate(schedules.items()):
        handles = _draw(axes[0, j], axes[1, j], s, colors, name)
    axes[0, 0].set_ylabel(PROB_LABEL)
    axes[1, 0].set_ylabel(MAG_LABEL)
    fig.legend(handles, list(OPS), loc="center right", fontsize="small", frameon=False)
    if title:
        fig.suptitle(title)
    fig.subplots_adjust(left=0.06, right=1 - 1.9 / fig.get_figwidth(), bottom=0.08, top=0.9 if title else 0.94,
                        wspace=0.2, hspace=0.32)
    save_figure(fig, path)
    return Path(path)


# ------------------------------------------------------------------------------------------ searches
def _num(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def plot_rewards(searches: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike, *,
                 best: Mapping[str, int] | None = None, exploits: Mapping[str, Iterable[Any]] | None = None,
                 title: str | None = None, dpi: int = DEFAULT_DPI) -> Path:
    """One panel per search: every member's validation accuracy (%) over epochs, one labelled line per
    member (the best member thick), exploits marked where the copied member continues.

    ``searches``: name -> reward rows (``epoch`` 1-based, ``member``, ``val_acc``; empty where not
    evaluated), as in ``rewards.csv``. ``exploits``: name -> steps with ``epoch``, ``target``,
    ``clone`` (attributes or keys; the search's exploits or the lines of ``pbt_global.txt``)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not searches:
        raise ValueError("no search rewards to plot")
    n = len(searches)
    fig = Figure(figsize=(6.5 * n + 1.5, 4.5), dpi=dpi)
    axes = np.asarray(fig.subplots(1, n, squeeze=False))[0]
    colors = _colors(20)
    for ax, (name, rows) in zip(axes, searches.items()):
        curves: dict[int, list[tuple[int, float]]] = {}
        for r in rows:
            acc = _num(r.get("val_acc"))
            if acc is not None:
                curves.setdefault(int(r["member"]), []).append((int(r["epoch"]), 100 * acc))
        top = (best or {}).get(name)
        for m, pts in sorted(curves.items()):
            pts.sort()
            xs, ys = zip(*pts)
            lead = m == top
            ax.plot(xs, ys, color=colors[m % len(colors)], lw=2.4 if lead else 1.1, marker="o",
                    ms=3.5 if lead else 2.5, zorder=3 if lead else 2, label=f"member {m}" + (" (best)" if lead else ""))
        first_marker = True
        for e in (exploits or {}).get(name, []) or []:
            get = (lambda k: e[k]) if isinstance(e, Mapping) else (lambda k: getattr(e, k))
            epoch, target = int(get("epoch")), int(get("target"))
            pts = dict(curves.get(int(get("clone")), []))
            if epoch in pts:
                ax.scatter([epoch], [pts[epoch]], marker="v", s=46, color=colors[target % len(colors)],
                           edgecolors="black", linewidths=0.6, zorder=4,
                           label="exploit (colour: the member that copied)" if first_marker else None)
                first_marker = False
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch (epochs trained)")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title(f"{name}: population rewards")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small", ncol=2 if len(curves) > 8 else 1, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_test_curves(curves: Mapping[str, Sequence[tuple[int, float]]], path: str | os.PathLike, *,
                     title: str = "test accuracy per epoch", dpi: int = DEFAULT_DPI) -> Path:
    """Test accuracy (%) per epoch of each named run. Runs whose curves are identical are drawn once and
    labelled together ("a = b"), so none hides under another unseen."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    groups: list[tuple[list[str], list[tuple[int, float]]]] = []
    for name, pts in curves.items():
        pts = [(int(x), float(y)) for x, y in pts]
        for names, other in groups:
            if other == pts:
                names.append(name)
                break
        else:
            groups.append(([name], pts))
    fig = Figure(figsize=(8, 4.8), dpi=dpi)
    ax = fig.subplots()
    for names, pts in groups:
        label = " = ".join(names) + (" (identical)" if len(names) > 1 else "")
        ax.plot(*zip(*pts), marker=".", label=label, lw=2.2 if len(names) > 1 else 1.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
