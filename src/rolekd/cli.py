"""The ``rolekd`` command line.

    rolekd train   CONFIG [key=value ...]    train a model (plain or with an augmentation schedule)
    rolekd distill CONFIG teacher=RUN method=iikd w_bits=4 a_bits=4 [key=value ...]
    rolekd search  CONFIG role=teacher|student [teacher=RUN] [key=value ...]
    rolekd run     [CONFIG] [key=value ...]  the two-stage role-wise pipeline (default: quickstart)
    rolekd report  RUN_DIR                   rebuild a pipeline run's report.md
    rolekd export  RUN_DIR [-o OUT.onnx]     a finished run's model as ONNX at its real bit widths
    rolekd schedule import|show|plot ...     PBA / Ray PBT schedules
    rolekd models                            list the model names

Bad input (config, files, names, a run directory in use by another process) prints one
``rolekd: error: ...`` line and exits with status 2. A run that diverges (non-finite loss or weights),
an operating-system error (permission, disk full, read-only file system, file size limit) and the
like print one such line too and exit with status 1; an interrupt exits with 130. ``train``,
``distill``, ``search`` and ``run`` run torch with ``train.threads`` CPU threads (default: the CPUs the
process may use, capped by ``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import sys

import torch

from . import __version__
from .config import Config, load_config
from .errors import RunFailed, UserError, out_of_memory
from .experiment import search_from_config, train_from_config
from .export import describe, export_run
from .models import list_models
from .pipeline import run_pipeline
from .pipeline.run import pipeline_config
from .train import NonFiniteLoss
from .report import build_report
from .runtime import keep_freed_memory
from .schedule_cli import register as register_schedule_commands


def _config(args, extra: list[str] | None = None):
    return load_config(args.config, list(extra or []) + list(args.overrides))


@contextlib.contextmanager
def _threads(cfg: Config):
    """torch's CPU threads = ``train.threads`` (or its default) while a command runs."""
    keep_freed_memory()
    old = torch.get_num_threads()
    torch.set_num_threads(cfg.train.num_threads())
    try:
        yield
    finally:
        torch.set_num_threads(old)


def cmd_train(args) -> int:
    cfg = _config(args)
    if cfg.kd.method:
        raise UserError("this config sets kd.method: use `rolekd distill` for KD training")
    with _threads(cfg):
        train_from_config(cfg)
    return 0


def cmd_distill(args) -> int:
    cfg = _config(args)
    if not cfg.kd.method:
        raise UserError("rolekd distill needs a KD method: add method=soft|dml|rkd|kdsvd|mhgd|iikd")
    if not cfg.kd.teacher:
        raise UserError("rolekd distill needs teacher=RUN_DIR (a finished teacher run) or teacher=FILE.safetensors")
    with _threads(cfg):
        train_from_config(cfg, log_name="distill")
    return 0


def cmd_search(args) -> int:
    cfg = _config(args)
    with _threads(cfg):
        search_from_config(cfg)
    return 0


def cmd_run(args) -> int:
    cfg = pipeline_config(args.config, list(args.overrides))
    with _threads(cfg):
        run_pipeline(cfg)
    return 0


def cmd_report(args) -> int:
    path = build_report(args.run_dir)
    print(path)
    return 0


def cmd_export(args) -> int:
    if args.check < 0:
        raise UserError(f"--check {args.check}: give a number of test images >= 0 (0: no check)")
    old = torch.get_num_threads()
    torch.set_num_threads(1 if args.threads is None else max(1, args.threads))
    try:
        print(describe(export_run(args.run_dir, args.output, check=args.check)))
    finally:
        torch.set_num_threads(old)
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
    p = sub.add_parser("export", help="a finished train/distill run's model as ONNX at its real bit widths")
    p.add_argument("run_dir", help="a finished train/distill run (or a pipeline's stage directory)")
    p.add_argument("-o", "--output", default=None, help="the ONNX file to write (default RUN_DIR/model.onnx); "
                                                        "its sizes go to OUT.size.json beside it")
    p.add_argument("--check", type=int, default=200, metavar="N",
                   help="compare onnxruntime with PyTorch on the first N test images (default 200; 0: skip)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for the check (default 1)")
    p.set_defaults(func=cmd_export)
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


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _os_error(e: OSError) -> str:
    """One line for an operating-system error: what failed, on which file, and a hint."""
    what = e.strerror or _one_line(e) or type(e).__name__
    where = f": {e.filename}" if e.filename else ""
    hints = {"EACCES": "check the permissions of the output directory (out=DIR)",
             "EROFS": "the file system is read-only: choose another out=DIR",
             "ENOSPC": "the disk is full: free space, then rerun the same command to resume",
             "EDQUOT": "the disk quota is exhausted: free space, then rerun the same command to resume",
             "EFBIG": "a file size limit (ulimit -f) was hit: raise it, then rerun the same command to resume"}
    hint = hints.get(errno.errorcode.get(e.errno or 0, ""), "rerun the same command to resume once it is fixed")
    return f"{what}{where} ({hint})"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _split_config_arg(args)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"rolekd: error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteLoss, RunFailed) as e:
        print(f"rolekd: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError as e:  # where no run named what to lower (rolekd export, report)
        print(f"rolekd: error: {out_of_memory(e, 'rolekd ' + args.command, ['the batch size'])}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"rolekd: error: {_os_error(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rolekd: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
