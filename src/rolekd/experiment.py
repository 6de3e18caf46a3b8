"""The one place where a :class:`~rolekd.config.Config` becomes objects.

Data, augmentation, schedule, model (quantized when the config asks), the frozen teacher, the KD
objective and the :class:`~rolekd.train.Trainer` are built here, and run directories are made here;
the packages below (``data``, ``augment``, ``models``, ``quant``, ``distill``, ``train``, ``search``)
never read a whole config's wiring and never import this module. The pipeline, the report and the CLI
sit on top.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl``/``metrics.csv``, ``tb/``
(TensorBoard), ``checkpoint/`` (last completed epoch), ``random_schedule.json`` (the schedule drawn for
``augment.matched_random_seed``) and, when finished, ``model.safetensors`` and ``result.json``. Rerunning
the same command resumes an interrupted run or reports a finished one; a different config for an existing
directory is refused so nothing written is lost (``out`` and the volatile keys below are not compared, so
a run directory may be moved). The whole config (data, model, KD method, teacher, schedule) is checked
before the directory is made, so a failed command leaves nothing behind that blocks its corrected
version; one process at a time works in a run directory (:class:`~rolekd.files.RunLock`, a second one is
refused with one line). A run whose loss or weights become non-finite stops with
:class:`~rolekd.train.NonFiniteLoss`; its ``result.json`` says ``"status": "diverged"`` and a rerun
reports that again.

What outlives one build (decoded datasets, loaded frozen teachers, a KD method's prepared parts such as
MHGD's attention network) lives in a :class:`Session`: one per command, or one per pipeline run shared
by its stages and by a search's members. Nothing is cached at module level.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
import yaml
from torch import nn

from .augment import BatchAugment, Schedule
from .config import Config, derive, dump_config
from .data import DataBundle, DeviceLoader, Split, load_dataset, reduced_split
from .distill import KDObjective, build_kd_objective, distiller_class
from .errors import UserError, out_of_memory
from .files import (LOCK_NAME, RunLock, atomic_write, check_weights, dump_json, load_weights, read_summary,
                    read_weights, save_weights)
from .models import create, on_meta
from .quant import quantize_model
from .runtime import freed_memory_kept
from .search import Search, finished_search, member_config, search_config
from .search.grouped import check_grouped
from .search.ray_executor import probe_address
from .search.run import executor_kind
from .train import NonFiniteLoss, Trainer, resolve_device

# keys that may differ between a run and its resumption (and ``out``: a run directory may be moved)
_VOLATILE = {("train", "progress"), ("train", "device"), ("train", "threads"), ("search", "ray_address"),
             ("search", "ray_ship_code"), ("pipeline", "workers"), ("pipeline", "executor"),
             ("pipeline", "ray_num_cpus"), ("pipeline", "ray_num_gpus")}
RANDOM_SCHEDULE = "random_schedule.json"  # a run's random schedule (augment.matched_random_seed), before fitting
_PREPARE_SEED = 7919  # RNG of a KD method's own preparation (batch shuffling, initialisation, dropout)


class Session:
    """What one command (or one pipeline run) reuses between builds: decoded datasets, frozen teachers
    (one per weights file, model and device, shared by every student, e.g. search members), and KD
    methods' prepared parts (computed once, copied into later objectives)."""

    def __init__(self) -> None:
        self.data: dict[tuple, DataBundle] = {}
        self.teachers: dict[tuple, nn.Module] = {}
        self.prepared: dict[tuple, dict] = {}

    def close(self) -> None:
        self.data.clear()
        self.teachers.clear()
        self.prepared.clear()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------- run dirs
def _stable(d: dict) -> dict:
    d = json.loads(json.dumps(d))
    d.pop("out", None)
    for sec, key in _VOLATILE:
        d.get(sec, {}).pop(key, None)
    return d


def _with_defaults(defaults: dict, written: dict) -> dict:
    """``written`` (a run's config.yaml) with the keys it lacks taken from ``defaults``: a key added to rolekd
    after the run was made did not exist then, so the run had its default."""
    out = dict(written)
    for k, v in defaults.items():
        if k not in out:
            out[k] = v
        elif isinstance(v, dict) and v and isinstance(out[k], dict):
            out[k] = _with_defaults(v, out[k])
    return out


def _first_difference(a, b, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if a.get(k, "<absent>") != b.get(k, "<absent>"):
                return _first_difference(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{where}.{k}" if where else k)
    return f"{where}: {a!r} there, {b!r} now"


def check_run_dir(cfg: Config, run_dir: Path) -> bool:
    """Read-only check of ``run_dir`` for ``cfg``: True when it holds this run (its ``config.yaml``
    matches), False when it does not exist or is empty; a UserError when it holds another config, an
    unreadable ``config.yaml``, or is not a rolekd run."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a run directory; choose another with out=DIR")
    cfg_file = run_dir / "config.yaml"
    if cfg_file.is_file():
        try:
            old = yaml.safe_load(cfg_file.read_text())
            if not isinstance(old, dict):
                raise ValueError("not a mapping")
        except (yaml.YAMLError, ValueError, UnicodeDecodeError) as e:
            raise UserError(f"run directory {run_dir}: its config.yaml is unreadable ({type(e).__name__}); restore "
                            f"it (it holds the run's resolved config), or choose another directory with out=DIR") \
                from None
        old = _with_defaults(Config().model_dump(mode="json"), old)  # keys added to rolekd since the run
        if _stable(old) != _stable(cfg.model_dump(mode="json")):
            diff = _first_difference(_stable(old), _stable(cfg.model_dump(mode="json")))
            raise UserError(f"run directory {run_dir} holds a run with a different config ({diff}); rerun with the "
                            f"same config to resume it, or choose another directory with out=DIR (or name=NAME)")
        return True
    if run_dir.is_dir() and any(p.name != LOCK_NAME for p in run_dir.iterdir()):
        raise UserError(f"run directory {run_dir} exists and is not a rolekd run; choose another with out=DIR")
    return False


def prepare_run_dir(cfg: Config, run_dir: Path | None = None) -> Path:
    """Create the run directory and write ``config.yaml``; refuse a directory of another config (see
    :func:`check_run_dir`). The caller holds the directory's :class:`~rolekd.files.RunLock`."""
    run_dir = Path(run_dir or cfg.run_dir())
    if not check_run_dir(cfg, run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "config.yaml", dump_config(cfg))
    return run_dir


# ---------------------------------------------------------------------------------------- parts
def build_data(cfg: Config, session: Session) -> DataBundle:
    key = (cfg.data.name, cfg.data.path, cfg.data.data_dir)
    if key not in session.data:
        session.data[key] = load_dataset(cfg.data.name, cfg.data.path, cfg.data.data_dir, cfg.data.download)
    bundle = session.data[key]
    if cfg.data.max_train or cfg.data.max_test:
        bundle = dataclasses.replace(
            bundle, train=bundle.train.subset(np.arange(min(cfg.data.max_train or len(bundle.train), len(bundle.train)))),
            test=bundle.test.subset(np.arange(min(cfg.data.max_test or len(bundle.test), len(bundle.test)))))
    return bundle


def data_splits(cfg: Config, bundle: DataBundle) -> tuple[Split, dict[str, Split]]:
    """Training split and evaluation splits: full = (train, {test}); reduced = (train, {val, test}). With
    ``data.full_train_size`` N, full trains on the first N images of the reduced split's permutation."""
    if cfg.data.split == "reduced":
        train, val = reduced_split(bundle.train, cfg.data.train_size, cfg.data.val_size, cfg.data.split_seed)
        return train, {"val": val, "test": bundle.test}
    if cfg.data.full_train_size:
        train, _ = reduced_split(bundle.train, cfg.data.full_train_size, 0, cfg.data.split_seed)
        return train, {"test": bundle.test}
    return bundle.train, {"test": bundle.test}


def build_augment(cfg: Config, bundle: DataBundle) -> BatchAugment:
    return BatchAugment(policy=None, pad=cfg.augment.pad, flip=cfg.augment.flip, cutout=cfg.augment.cutout,
                        fill=bundle.fill)


def load_schedule(cfg: Config) -> Schedule | None:
    """The schedule of ``augment.schedule`` before it is fitted to the training's epochs, or with
    ``augment.matched_random_seed`` its matched random schedule (None: base augmentation only)."""
    if not cfg.augment.schedule:
        return None
    sched = Schedule.load(cfg.augment.schedule, epochs=cfg.augment.schedule_epochs,
                          multiplier=cfg.augment.multiplier)
    if cfg.augment.matched_random_seed is not None:
        sched.source = str(cfg.augment.schedule)  # what it is matched to, as the config names it
        sched = sched.matched_random(cfg.augment.matched_random_seed)
    return sched


def build_schedule(cfg: Config, epochs: int) -> Callable[[int], Sequence[int]] | None:
    """The per-epoch policy function of ``augment.schedule`` (None: base augmentation only)."""
    sched = load_schedule(cfg)
    if sched is None:
        return None
    if cfg.augment.fit_epochs:
        sched = sched.fit_to(epochs)
    return sched.vector_at


def build_model(cfg: Config, num_classes: int, model_name: str | None = None, quantize: bool = True) -> nn.Module:
    model = create(model_name or cfg.model.name, num_classes=num_classes, **cfg.model.kwargs)
    if quantize and (cfg.quant.w_bits != 32 or cfg.quant.a_bits != 32):
        model = quantize_model(model, cfg.quant.w_bits, cfg.quant.a_bits)
    return model


def set_batchnorm(model: nn.Module, momentum: float | None = None, eps: float | None = None) -> int:
    """Set ``momentum`` and ``eps`` (None: keep the module's own) on every BatchNorm module of ``model``;
    returns how many there are. TensorFlow's BatchNorm ``decay`` d is PyTorch's ``momentum`` 1 - d."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if momentum is not None:
                m.momentum = float(momentum)
            if eps is not None:
                m.eps = float(eps)
            n += 1
    return n


def channels_last(cfg: Config, device: torch.device) -> bool:
    """``train.channels_last``; ``auto`` is on for CUDA and for CPU training with one torch thread (the
    thread count in force when the run is built: ``train.threads`` as the CLI, the pipeline's workers and Ray
    actors set it), where it was measured faster (benchmarks/RESULTS.md), and off for several CPU threads."""
    if cfg.train.channels_last != "auto":
        return cfg.train.channels_last == "on"
    return device.type == "cuda" or (device.type == "cpu" and torch.get_num_threads() == 1)


def make_loaders(cfg: Config, bundle: DataBundle, device: torch.device, augment=None
                 ) -> tuple[DeviceLoader, dict[str, DeviceLoader]]:
    train, evals = data_splits(cfg, bundle)
    cl = channels_last(cfg, device)
    train_loader = DeviceLoader(train, cfg.train.batch_size, bundle.mean, bundle.std, device, shuffle=True,
                                augment=augment, seed=cfg.train.seed, channels_last=cl)
    eval_loaders = {k: DeviceLoader(v, cfg.train.eval_batch_size, bundle.mean, bundle.std, device, shuffle=False,
                                    channels_last=cl) for k, v in evals.items()}
    return train_loader, eval_loaders


# ---------------------------------------------------------------------------------------- teacher and KD
class TeacherRef(NamedTuple):
    """What ``kd.teacher`` names: its weights file, its model, the BatchNorm epsilon it was trained with
    (None: the model's default)."""

    weights: Path
    model: str
    bn_eps: float | None


def teacher_ref(cfg: Config) -> TeacherRef:
    """The teacher of ``kd.teacher``, a run directory or a .safetensors file. The model is
    ``kd.teacher_model``, else the run's, else ``model.name``; the BatchNorm epsilon is ``train.bn_eps`` of
    the run's ``config.yaml`` (read once), or for a weights file this config's ``train.bn_eps``."""
    if not cfg.kd.teacher:
        raise UserError("no teacher given: pass teacher=RUN_DIR (a finished rolekd train run) or teacher=FILE.safetensors")
    p = Path(cfg.kd.teacher).expanduser()
    name, eps = cfg.kd.teacher_model, cfg.train.bn_eps
    if p.is_dir():
        weights = p / "model.safetensors"
        if not weights.is_file():
            raise UserError(f"teacher run {p} has no model.safetensors: finish its training first (rerun its command)")
        if (p / "config.yaml").is_file():
            run = yaml.safe_load((p / "config.yaml").read_text()) or {}
            name = name if name is not None else (run.get("model") or {}).get("name")
            eps = (run.get("train") or {}).get("bn_eps")
            eps = float(eps) if eps is not None else None
    else:
        weights = p
        if not p.is_file():
            raise UserError(f"teacher {p} not found: give a teacher run directory or its model.safetensors")
    return TeacherRef(weights, name or cfg.model.name, eps)


def load_teacher(cfg: Config, num_classes: int, device: torch.device, session: Session
                 ) -> tuple[nn.Module, Path, str]:
    """The frozen full-precision teacher of ``cfg.kd.teacher`` (one per session), its BatchNorm epsilon
    the one it was trained with (:func:`teacher_ref`)."""
    weights, name, eps = teacher_ref(cfg)
    st = weights.stat()
    key = (str(weights.resolve()), st.st_mtime_ns, name, num_classes, str(device), eps)
    if key not in session.teachers:
        teacher = build_model(cfg, num_classes, model_name=name, quantize=False)
        set_batchnorm(teacher, eps=eps)
        load_weights(teacher, weights, what="teacher checkpoint")
        teacher.to(device).eval().requires_grad_(False)
        session.teachers[key] = teacher
    return session.teachers[key], weights, name


def init_student_from_teacher(cfg: Config, student: nn.Module) -> bool:
    """The paper initialises the (low-bit) student from its teacher when they share an architecture."""
    weights, name, _ = teacher_ref(cfg)
    if name != cfg.model.name:
        return False
    load_weights(student, weights, what="teacher checkpoint")
    return True


class _Images:
    """Re-iterable image batches of a loader (for a KD method's preparation on the teacher)."""

    def __init__(self, loader: DeviceLoader):
        self.loader = loader

    def __iter__(self):
        return (x for x, _ in self.loader)


def build_objective(cfg: Config, bundle: DataBundle, train_loader: DeviceLoader, device: torch.device,
                    session: Session) -> KDObjective:
    """The KD objective of ``cfg.kd``: the frozen teacher, the method (reading its own options), KD
    gradient clipping as the method declares unless ``kd.clip`` says otherwise, a probe batch (two training
    images) from which the trainer's ``setup`` builds a channel adapter when the student's tap widths
    differ from the teacher's, and the method's preparation on the teacher (shared through the session)."""
    kd = cfg.kd
    cls = distiller_class(kd.method)
    teacher, weights, _ = load_teacher(cfg, bundle.num_classes, device, session)
    if cls.trains_teacher:
        teacher = copy.deepcopy(teacher)  # it trains its own copy of the teacher
        set_batchnorm(teacher, momentum=cfg.train.bn_momentum)  # with this run's BatchNorm momentum
    probe = train_loader.normalize(train_loader.images[:2]) if cls.needs_features else None
    objective = build_kd_objective(cls.from_config(kd), teacher, lam=kd.lam, lam_decay=kd.lam_decay,
                                   lam_decay_every=kd.lam_decay_every, lam_milestones=kd.lam_milestones,
                                   lam_gamma=kd.lam_gamma, clip=kd.clip, clip_e0=kd.clip_e0,
                                   clip_lam=kd.clip_lam, probe=probe, fold_teacher_bn=kd.fold_teacher_bn)
    if objective.needs_prepare:
        # it depends only on the teacher, the method and the data (its own fixed shuffling seed), so it is
        # prepared once per session and shared, e.g. by all search members
        pkey = (str(weights.resolve()), weights.stat().st_mtime_ns, kd.model_dump_json(),
                cfg.data.model_dump_json(), cfg.train.batch_size, str(device))
        if pkey in session.prepared:
            objective.distiller.load_state_dict(session.prepared[pkey])
        else:
            prep = DeviceLoader(Split(train_loader.images, train_loader.labels), cfg.train.batch_size, bundle.mean,
                                bundle.std, device, shuffle=True, seed=_PREPARE_SEED,
                                channels_last=train_loader.channels_last)
            # its own RNG too (attention initialisation, dropout): the same result whether it is prepared
            # here or reused from an earlier stage of the same session, e.g. after a resume
            cuda = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda, device_type="cuda"):
                torch.manual_seed(_PREPARE_SEED)
                objective.prepare(_Images(prep))
            session.prepared[pkey] = {k: v.detach().clone() for k, v in objective.distiller.state_dict().items()}
    return objective


# ---------------------------------------------------------------------------------------- the trainer
def build_trainer(cfg: Config, session: Session, run_dir: Path | None = None, policy_for_epoch=None,
                  log_name: str = "train", own_rng: bool = False) -> Trainer:
    """The trainer of ``cfg``: data on the device, augmentation, model (BatchNorm momentum / epsilon
    ``train.bn_momentum`` / ``train.bn_eps`` when set; from the teacher's weights when ``kd.teacher`` is set
    and the architectures match), objective (KD when ``kd.method`` is set) and the schedule's policy per
    epoch (or ``policy_for_epoch``)."""
    torch.manual_seed(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    bundle = build_data(cfg, session)
    augment = build_augment(cfg, bundle)
    train_loader, eval_loaders = make_loaders(cfg, bundle, device, augment)
    model = build_model(cfg, bundle.num_classes)
    set_batchnorm(model, cfg.train.bn_momentum, cfg.train.bn_eps)
    if cfg.kd.teacher and cfg.kd.init_from_teacher:
        init_student_from_teacher(cfg, model)
    objective = build_objective(cfg, bundle, train_loader, device, session) if cfg.kd.method else None
    return Trainer(model, train_loader, cfg.train, eval_loaders, objective=objective,
                   policy_for_epoch=policy_for_epoch or build_schedule(cfg, cfg.train.epochs),
                   run_dir=run_dir, log_name=log_name, own_rng=own_rng)


def search_member_augment(cfg: Config) -> Config:
    """A search member's config with its base Cutout side ``search.cutout`` (None: ``augment.cutout``
    unchanged). The authors' searches ran without Cutout (``no_cutout: true``), their retraining with it."""
    if cfg.search.cutout is None or cfg.search.cutout == cfg.augment.cutout:
        return cfg
    return derive(cfg, "search member", augment={"cutout": cfg.search.cutout})


class MemberFactory:
    """Builds a search member's trainer (own random streams) from its member config, sharing the
    session; in another process (a Ray actor) it starts a session of its own. A member's Cutout side is
    ``search.cutout`` when set (:func:`search_member_augment`)."""

    def __init__(self, session: Session | None = None):
        self.session = session

    def __call__(self, cfg: Config, index: int, policy_for_epoch) -> Trainer:
        if self.session is None:
            self.session = Session()
        return build_trainer(search_member_augment(cfg), self.session, policy_for_epoch=policy_for_epoch,
                             log_name=f"member{index}", own_rng=True)

    def __getstate__(self) -> dict:
        return {"session": None}


# ---------------------------------------------------------------------------------------- runs
def check_config(cfg: Config, session: Session | None = None, files: bool = True, search: bool = False) -> None:
    """Check what a run of ``cfg`` needs, before its run directory is made: the data (with a
    ``session``: loaded, and the split sizes), the model (built on the meta device), the KD method and
    its options, with ``search`` (the network is trained by a search) and ``search.fused_kernel=grouped``
    (and an executor that may fuse) that the grouped kernel can run the network, and with ``files`` the
    schedule file and the teacher's weights (they exist, fit the teacher's model, are finite). One
    UserError line for the first problem."""
    num_classes = 10
    if session is not None:
        bundle = build_data(cfg, session)
        data_splits(cfg, bundle)
        num_classes = bundle.num_classes
    with on_meta():
        build_model(cfg, num_classes)
        if cfg.kd.method:
            distiller_class(cfg.kd.method).from_config(cfg.kd)
        if files and cfg.kd.teacher and (cfg.kd.method or cfg.kd.init_from_teacher):
            weights, name, _ = teacher_ref(cfg)
            teacher = build_model(cfg, num_classes, model_name=name, quantize=False)
            check_weights(teacher, read_weights(weights), weights, what="teacher checkpoint")
    if search and cfg.search.fused_kernel == "grouped" and cfg.search.executor != "local":  # two copies, on CPU
        shape = tuple(bundle.test.images.shape[1:]) if session is not None else (3, 32, 32)
        check_grouped(build_model(cfg, num_classes), torch.randn(2, *shape))
    if files:
        build_schedule(cfg, cfg.train.epochs)


def _finished(run_dir: Path, verbose: bool = True) -> dict | None:
    """``result.json`` of a finished run (None when there is none); a run that diverged raises
    :class:`NonFiniteLoss` again."""
    result_file = run_dir / "result.json"
    result = read_summary(result_file, "delete it and rerun the command to finish the run again from its checkpoint")
    if result is None:
        return None
    if result.get("status") == "diverged":
        raise NonFiniteLoss(f"run {run_dir} diverged earlier ({result.get('reason')}); lower train.lr or check the "
                            f"teacher and use another out=DIR, or delete {result_file} to retry from the last "
                            f"finite checkpoint", epoch=result.get("diverged_epoch"))
    if verbose:
        acc = result.get("test_acc")
        print(f"{run_dir}: already finished (test acc {acc if acc is None else format(acc, '.4f')}); nothing to do")
    return result


def runtime_record(model: nn.Module) -> dict:
    """What a run's process trains with, read off the process and the model (``result.json``'s ``runtime``):
    torch's CPU threads, whether the model's convolution weights are channels-last, and whether freed memory
    is kept in the process (:mod:`rolekd.runtime`). Machine facts, not part of the config."""
    convs = [p for p in model.parameters() if p.dim() == 4]
    return {"threads": torch.get_num_threads(),
            "channels_last": bool(convs) and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs),
            "freed_memory_kept": freed_memory_kept()}


def train_from_config(cfg: Config, run_dir: Path | None = None, log_name: str = "train",
                      session: Session | None = None) -> dict:
    """Train (or resume, or report) the run described by ``cfg``; returns ``result.json``'s content.

    Everything the run needs is built (and so checked) before its directory is made; the directory
    is locked for this process while it trains (a second process gets a UserError). A diverging run
    raises :class:`NonFiniteLoss` after writing ``result.json`` with ``"status": "diverged"``."""
    run_dir = Path(run_dir or cfg.run_dir())
    lock = RunLock(run_dir)
    own = session is None
    session = session or Session()
    trainer = None
    try:
        if check_run_dir(cfg, run_dir):
            lock.acquire()  # an existing run: refuse a second process before any work
            done = _finished(run_dir)
            if done is not None:
                return done
        trainer = build_trainer(cfg, session, run_dir, log_name=log_name)
        lock.acquire()
        prepare_run_dir(cfg, run_dir)
        if cfg.augment.matched_random_seed is not None:  # the drawn schedule it trains with (before fitting)
            load_schedule(cfg).save(run_dir / RANDOM_SCHEDULE)
        done = _finished(run_dir)
        if done is not None:
            return done
        result_file = run_dir / "result.json"
        t0 = time.time()
        runtime = runtime_record(trainer.model)  # how this process trains: threads, layout, allocator
        try:
            history = trainer.fit()
        except torch.OutOfMemoryError as e:
            raise out_of_memory(e, f"run {run_dir} on {trainer.device}", [
                f"train.batch_size (now {cfg.train.batch_size})",
                f"train.eval_batch_size (now {cfg.train.eval_batch_size})"]) from None
        except NonFiniteLoss as e:
            finite = e.epoch if e.epoch is not None else trainer.epoch - 1  # epochs completed before it
            atomic_write(result_file, dump_json({
                "status": "diverged", "name": cfg.name, "model": cfg.model.name, "kd": cfg.kd.method,
                "epochs": cfg.train.epochs, "diverged_epoch": finite + 1, "reason": str(e),
                "last_finite_epoch": finite, "wall_time_s": round(time.time() - t0, 2)}, indent=2))
            raise NonFiniteLoss(f"run {run_dir} diverged: {e}; its checkpoint holds the last finite epoch "
                                f"({finite}); lower train.lr (now {cfg.train.lr:g}) or check the teacher, "
                                f"and use another out=DIR", row=e.row, epoch=e.epoch) from None
    finally:
        if trainer is not None:
            trainer.objective.close()
        if own:
            session.close()
        lock.release()
    save_weights(trainer.model, run_dir / "model.safetensors", metadata={"model": cfg.model.name})
    last = history[-1]
    result = {"status": "finished", "name": cfg.name, "model": cfg.model.name, "dataset": cfg.data.name,
              "epochs": cfg.train.epochs,
              "w_bits": cfg.quant.w_bits, "a_bits": cfg.quant.a_bits, "kd": cfg.kd.method,
              "schedule": cfg.augment.schedule, "train_images": trainer.train_loader.num_samples,
              "test_images": trainer.eval_loaders["test"].num_samples,
              "test_acc": last.get("test_acc"), "best_test_acc": max(r.get("test_acc", 0.0) for r in history),
              "wall_time_s": round(time.time() - t0, 2), "device": str(trainer.device), "runtime": runtime}
    atomic_write(result_file, dump_json(result, indent=2))
    print(f"{run_dir}: test acc {result['test_acc']:.4f} after {cfg.train.epochs} epochs")
    return result


def search_from_config(cfg: Config, run_dir: Path | None = None, executor=None, on_round=None,
                       verbose: bool = True, session: Session | None = None) -> dict:
    """Run (or resume, or report) the PBA search described by ``cfg``; returns ``search.json``'s content.

    ``executor`` replaces the one ``search.executor`` names (e.g. a shared or instrumented one);
    ``on_round(info)`` is called after every round, once its state is saved (``info``: ``search``,
    ``round``, ``epoch``).
    """
    cfg = search_config(cfg)
    run_dir = Path(run_dir or cfg.run_dir())
    lock = RunLock(run_dir)
    own = session is None
    session = session or Session()
    try:
        if check_run_dir(cfg, run_dir):
            lock.acquire()  # an existing search: refuse a second process before any work
            summary = finished_search(run_dir, verbose)
            if summary is not None:
                return summary
        check_config(member_config(cfg, 0), session, search=True)  # what every member is built from
        if executor is None and cfg.search.executor == "ray" and cfg.search.ray_address:
            probe_address(cfg.search.ray_address)  # an unreachable cluster: one line, before the run dir
        lock.acquire()
        prepare_run_dir(cfg, run_dir)
        summary = finished_search(run_dir, verbose)
        if summary is not None:
            return summary
        try:
            return Search(cfg, run_dir, MemberFactory(session), executor, on_round, verbose).run()
        except torch.OutOfMemoryError as e:
            s = cfg.search
            fused = executor_kind(cfg) == "fused" or (s.executor == "ray" and s.ray_group_size > 1)
            raise out_of_memory(e, f"search {run_dir}", [
                f"train.batch_size (now {cfg.train.batch_size})",
                f"train.eval_batch_size (now {cfg.train.eval_batch_size})"]
                + (["the members trained at once (search.executor=local, or a smaller search.ray_group_size)"]
                   if fused else [])) from None
    finally:
        if own:
            session.close()
        lock.release()
