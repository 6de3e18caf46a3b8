"""``rolekd schedule ...``: import, show and plot augmentation schedules.

``register(subparsers)`` adds the ``schedule`` command group; every leaf parser sets
``func=handler(args) -> int``. Handlers raise :class:`~rolekd.errors.UserError` for bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from rolekd.augment.schedule import Schedule
from rolekd.augment.space import MAX_PROB, NUM_OPS, OPS
from rolekd.errors import UserError
from rolekd.plots import plot_schedule


def _multiplier(text: str) -> float | int:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return int(v) if v.is_integer() else v


def _epochs(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return v


def _add_load_args(p: argparse.ArgumentParser, epochs_required: bool) -> None:
    p.add_argument("--epochs", type=_epochs, required=epochs_required, metavar="N",
                   help="epochs the search ran for, before --multiplier (PBT logs: e.g. 200 for CIFAR, 160 for SVHN)"
                   + ("" if epochs_required else "; needed for PBT logs"))
    p.add_argument("--multiplier", type=_multiplier, default=1, metavar="M",
                   help="stretch the schedule: training epochs / search epochs (default 1)")


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``schedule`` command group to an argparse ``subparsers`` object; returns its parser."""
    p = subparsers.add_parser("schedule", help="import, show and plot augmentation schedules",
                              description="Augmentation schedules: one PBA policy (60 ints) per epoch.")
    sub = p.add_subparsers(dest="schedule_command", metavar="COMMAND", required=True)

    imp = sub.add_parser("import", help="convert a PBA / Ray Tune PBT log into a rolekd schedule JSON",
                         description="Convert a PBT log (PBA's Python-literal schedules or Ray Tune's JSON lines) "
                                     "into a per-epoch rolekd-schedule JSON file, as PBA's parse_log_schedule does.")
    imp.add_argument("log", metavar="LOG", help="PBT log file")
    _add_load_args(imp, epochs_required=True)
    imp.add_argument("-o", "--output", required=True, metavar="OUT.json", help="schedule file to write")
    imp.add_argument("--force", action="store_true", help="overwrite OUT.json if it exists")
    imp.set_defaults(func=cmd_import)

    show = sub.add_parser("show", help="print a per-segment summary of a schedule",
                          description="Print each run of identical epochs with its non-zero ops, for both copies.")
    show.add_argument("file", metavar="FILE", help="schedule JSON or PBT log")
    _add_load_args(show, epochs_required=False)
    show.set_defaults(func=cmd_show)

    plot = sub.add_parser("plot", help="plot a schedule (op probability and magnitude over epochs) to PNG")
    plot.add_argument("file", metavar="FILE", help="schedule JSON or PBT log")
    plot.add_argument("-o", "--output", required=True, metavar="FIG.png", help="PNG file to write")
    _add_load_args(plot, epochs_required=False)
    plot.add_argument("--title", default=None, help="figure title (default: the file name)")
    plot.set_defaults(func=cmd_plot)
    return p


# ---- handlers ------------------------------------------------------------------------------

def cmd_import(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    dest = Path(args.output)
    if dest.exists() and not args.force:
        raise UserError(f"{dest} already exists; pass --force to overwrite it or choose another -o")
    if dest.is_dir():
        raise UserError(f"{dest} is a directory; give a file name with -o")
    s = Schedule.load(args.log, epochs=args.epochs, multiplier=args.multiplier)
    s.save(dest)
    used = s.meta.get("first_line_used")
    extra = f" (log lines from line {used} on used, as PBA does)" if used else ""
    print(f"wrote {dest}: {len(s)} epochs in {len(s.segments())} segments from {args.log}{extra}", file=out)
    return 0


def _fmt_copy(policy: list[int], half: int) -> str:
    base = 2 * NUM_OPS * half
    items = []
    for k, op in enumerate(OPS):
        p, m = policy[base + 2 * k], policy[base + 2 * k + 1]
        if p > 0:
            items.append(f"{op} p={p / MAX_PROB:.1f} m={m}")
    return ", ".join(items) if items else "-"


def format_schedule(s: Schedule, name: str | None = None) -> str:
    """The text ``rolekd schedule show`` prints: one block per run of identical epochs (0-based,
    inclusive ranges), listing the ops with non-zero probability of each copy as ``Name p=0.3 m=5``."""
    segs = s.segments()
    head = f"{name or s.source or 'schedule'}: {len(s)} epochs in {len(segs)} segments"
    info = [f"{k}={s.meta[k]}" for k in ("from", "epochs", "multiplier") if k in s.meta]
    lines = [head + (f" ({', '.join(info)})" if info else "")]
    for start, stop, pol in segs:
        n = stop - start
        rng = f"epoch {start}" if n == 1 else f"epochs {start}-{stop - 1}"
        c1, c2 = _fmt_copy(pol, 0), _fmt_copy(pol, 1)
        if c1 == "-" and c2 == "-":
            lines.append(f"{rng} ({n}): no augmentation")
        else:
            lines.append(f"{rng} ({n}):")
            lines.append(f"  copy 1: {c1}")
            lines.append(f"  copy 2: {c2}")
    return "\n".join(lines)


def cmd_show(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    s = Schedule.load(args.file, epochs=args.epochs, multiplier=args.multiplier)
    print(format_schedule(s, name=args.file), file=out)
    return 0


def cmd_plot(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    s = Schedule.load(args.file, epochs=args.epochs, multiplier=args.multiplier)
    dest = Path(args.output)
    if dest.is_dir():
        raise UserError(f"{dest} is a directory; give a file name with -o")
    plot_schedule(s, dest, title=args.title if args.title is not None else Path(args.file).name)
    print(f"wrote {dest}", file=out)
    return 0
