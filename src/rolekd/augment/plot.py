"""Plots of augmentation schedules, as in the paper's Fig. 3/4.

Two panels per schedule, over epochs, one line per op (15, with a legend):

* probability: each op's probability averaged over its two copies in the policy, divided by the
  largest per-epoch sum of these probabilities (so the busiest epoch sums to 1);
* magnitude: each op's magnitude (0..9) averaged over its two copies.

Uses matplotlib's Agg canvas directly (no global backend switch, no display needed).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np

from rolekd.augment.schedule import Schedule
from rolekd.augment.space import MAX_PROB, NUM_OPS, OPS, POLICY_LEN, validate_policy
from rolekd.errors import UserError

ScheduleLike = Union[Schedule, Sequence[Sequence[int]]]

DEFAULT_FIGSIZE = (12.0, 4.5)
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


def _colors() -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return [cmap(i) for i in range(NUM_OPS)]


def _draw(ax_p, ax_m, s: ScheduleLike, colors: list, label: str | None) -> list:
    prob, mag = op_curves(s)
    n = prob.shape[0]
    x = np.arange(n + 1)  # epoch e covers [e, e + 1): draw as steps, repeating the last value
    prob = np.vstack([prob, prob[-1:]])
    mag = np.vstack([mag, mag[-1:]])
    handles = []
    for k, op in enumerate(OPS):
        (h,) = ax_p.plot(x, prob[:, k], color=colors[k], lw=1.3, label=op, drawstyle="steps-post")
        ax_m.plot(x, mag[:, k], color=colors[k], lw=1.3, label=op, drawstyle="steps-post")
        handles.append(h)
    prefix = f"{label}: " if label else ""
    ax_p.set_title(prefix + "probability (normalised)")
    ax_m.set_title(prefix + "magnitude")
    for ax in (ax_p, ax_m):
        ax.set_xlabel("epoch")
        ax.set_xlim(0, n)
        ax.grid(True, alpha=0.3)
    ax_p.set_ylim(bottom=0)
    ax_m.set_ylim(0, 9.5)
    return handles


def _save(fig, path: str | os.PathLike) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, format="png")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def plot_schedule(schedule_or_list: ScheduleLike, path: str | os.PathLike, title: str | None = None, *,
                  figsize: tuple[float, float] = DEFAULT_FIGSIZE, dpi: int = DEFAULT_DPI) -> Path:
    """Write a PNG of one schedule: probability and magnitude panels, 15 op lines, a legend.

    The image is ``figsize * dpi`` pixels. Returns ``path``.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    ax_p, ax_m = fig.subplots(1, 2)
    handles = _draw(ax_p, ax_m, schedule_or_list, _colors(), None)
    ax_p.set_ylabel("probability / max per-epoch sum")
    ax_m.set_ylabel("magnitude (0-9)")
    fig.legend(handles, list(OPS), loc="center right", fontsize="small", frameon=False)
    if title:
        fig.suptitle(title)
    fig.subplots_adjust(left=0.06, right=0.85, bottom=0.12, top=0.84 if title else 0.9, wspace=0.22)
    _save(fig, path)
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
    axes[0, 0].set_ylabel("probability / max per-epoch sum")
    axes[1, 0].set_ylabel("magnitude (0-9)")
    fig.legend(handles, list(OPS), loc="center right", fontsize="small", frameon=False)
    if title:
        fig.suptitle(title)
    fig.subplots_adjust(left=0.06, right=1 - 1.9 / fig.get_figwidth(), bottom=0.08, top=0.9 if title else 0.94,
                        wspace=0.2, hspace=0.32)
    _save(fig, path)
    return Path(path)
