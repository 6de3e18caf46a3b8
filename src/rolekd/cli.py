"""The ``rolekd`` command line.

    rolekd train   CONFIG [key=value ...]    train a model (plain or with an augmentation schedule)
    rolekd distill CONFIG teacher=RUN method=iikd w_bits=4 a_bits=4 [key=value ...]
    rolekd search  CONFIG role=teacher|student [teacher=RUN] [key=value ...]
    rolekd run     [CONFIG] [key=value ...]  the two-stage role-wise pipeline (default: quickstart)
    rolekd report  RUN_DIR                   rebuild a pipeline run's report.md
    rolekd schedule import|show|plot ...     PBA / Ray PBT schedules
    rolekd models                            list the model names

Bad input (config, files, names) prints one ``rolekd: error: ...`` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .config import load_config
from .errors import UserError
from .experiment import search_from_config, train_from_config
from .models import list_models
from .pipeline import run_pipeline
from .report import build_report
from .schedule_cli import register as register_schedule_commands


def _config(args, extra: list[str] | None = None):
    return load_config(args.config, list(extra or []) + list(args.overrides))


def cmd_train(args) -> int:
    cfg = _config(args)
    if cfg.kd.method:
        raise UserError("this config sets kd.method: use `rolekd distill` for KD training")
    train_from_config(cfg)
    return 0


def cmd_distill(args) -> int:
    cfg = _config(args)
    if not cfg.kd.method:
        raise UserError("rolekd distill needs a KD method: add method=soft|dml|rkd|kdsvd|mhgd|iikd")
    if not cfg.kd.teacher:
        raise UserError("rolekd distill needs teacher=RUN_DIR (a finished teacher run) or teacher=FILE.safetensors")
    train_from_config(cfg, log_name="distill")
    return 0


def cmd_search(args) -> int:
    search_from_config(_config(args))
    return 0


def cmd_run(args) -> int:
    run_pipeline(args.config, list(args.overrides))
    return 0


def cmd_report(args) -> int:
    path = build_report(args.run_dir)
    print(path)
    return 0


def cmd_models(args) -> int:
    print("\n".join(list_models()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rolekd", description="Role-wise data augmentation for knowledge distillation")
    parser.add_argument("--version", action="version", version=f"rolekd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def with_config(name, help_, func, optional=False):
        p = sub.add_parser(name, help=help_)
        p.add_argument("config", nargs="?" if optional else None, default=None,
                       help="YAML experiment file (configs/*.yaml)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=0.05")
        p.set_defaults(func=func)
        return p

    with_config("train", "train a model", cmd_train)
    with_config("distill", "train a student with knowledge distillation from a teacher", cmd_distill)
    with_config("search", "PBA search of an augmentation schedule for the teacher or the student", cmd_search)
    with_config("run", "the full two-stage pipeline (stage alpha + stage beta + baselines + report)", cmd_run,
                optional=True)
    p = sub.add_parser("report", help="rebuild report.md of a pipeline run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("models", help="list model names")
    p.set_defaults(func=cmd_models)
    register_schedule_commands(sub)
    return parser


def _split_config_arg(args) -> None:
    """``rolekd run key=value`` (no config): the first positional is an override, not a file."""
    cfg = getattr(args, "config", None)
    if cfg is not None and "=" in cfg and not cfg.endswith((".yaml", ".yml")):
        args.overrides = [cfg] + list(args.overrides)
        args.config = None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _split_config_arg(args)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"rolekd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rolekd: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
