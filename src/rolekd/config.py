"""Experiment configuration: YAML files (safe loader) validated into typed pydantic models.

``load_config(path, overrides)`` reads a YAML file (or the defaults when ``path`` is None), applies
``key=value`` overrides (dotted keys such as ``train.lr=0.05``; a few short aliases such as
``teacher=...`` or ``w_bits=4``), validates everything and returns a :class:`Config`. Every problem
becomes one :class:`~rolekd.errors.UserError` line that names the key and what to do.

``derive(cfg, ...)`` is the only way a config is made from another (a pipeline stage, a search member):
it applies section changes and validates the result with the same one-line errors.
"""

from __future__ import annotations

import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .data.datasets import dataset_names
from .errors import UserError
from .stages import BASELINES, DEFAULT_BASELINES


def _scalar_kinds(annotation: Any) -> set[type]:
    """The scalar types among ``bool``, ``int`` and ``float`` that a field annotation admits."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set().union(*(_scalar_kinds(a) for a in typing.get_args(annotation)))
    return {annotation} & {bool, int, float}


Fraction = Annotated[float, Field(ge=0, le=1)]  # a point in a run, as a fraction of its epochs


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_int_mixups(cls, value: Any, info: ValidationInfo) -> Any:
        """Booleans are not numbers and numbers are not booleans (``epochs=true``, ``progress=1``)."""
        field = cls.model_fields.get(info.field_name or "")
        kinds = _scalar_kinds(field.annotation) if field is not None else set()
        if isinstance(value, bool) and kinds and bool not in kinds:
            raise PydanticCustomError("bool_not_number", "expected a number, not a boolean")
        if kinds == {bool} and value is not None and not isinstance(value, bool):
            raise PydanticCustomError("not_bool", "expected true or false")
        return value


class DataConfig(_Section):
    name: str = "cifar10-sample"  # cifar10-sample | cifar10-jpeg | cifar10 | cifar100 | a registered dataset
    path: str | None = None  # the .npz file for cifar10-jpeg
    data_dir: str | None = None  # torchvision root for cifar10/cifar100 (default ~/.cache/rolekd/data)
    download: bool = True
    split: Literal["full", "reduced"] = "full"  # reduced = PBA's search split (train / validation)
    train_size: int = Field(4000, gt=0)
    val_size: int = Field(46000, gt=0)
    split_seed: int = 0
    # split=full trains on the first N images of the split_seed permutation instead of the whole training set
    # (N = train_size: the reduced split's own training images, e.g. a small-data study's retraining stages)
    full_train_size: int | None = Field(None, gt=0)
    max_train: int | None = Field(None, gt=0)  # use only the first N training images (smoke runs, tests)
    max_test: int | None = Field(None, gt=0)  # use only the first N test images

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in dataset_names():
            raise ValueError(f"unknown dataset {name!r}: use one of {', '.join(dataset_names())} "
                             "(or register yours with rolekd.data.register_dataset)")
        return name


class ModelConfig(_Section):
    name: str = "resnet_tiny"
    kwargs: dict[str, Any] = Field(default_factory=dict)


class TrainConfig(_Section):
    epochs: int = Field(200, gt=0)
    batch_size: int = Field(128, gt=0)
    eval_batch_size: int = Field(1000, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    lr_step_frac: float = Field(0.3, gt=0, le=1)  # multiply lr by lr_gamma after every this fraction of epochs
    lr_gamma: float = Field(0.1, gt=0, le=1)
    # instead of every lr_step_frac: multiply lr by lr_gamma at these fractions of the epochs (the authors'
    # code: [0.3, 0.6, 0.8])
    lr_milestones: list[Fraction] | None = None
    adam_eps: float = Field(1e-8, gt=0)  # Adam's epsilon (PyTorch 1e-8; TensorFlow / the authors' code 1e-5)
    # weight decay on every parameter (PyTorch's optimizer) or on conv / linear weights only (the authors'
    # code adds an L2 term of the conv and FC kernels to the loss)
    weight_decay_on: Literal["all", "weights"] = "all"
    bn_momentum: float | None = Field(None, gt=0, lt=1)  # BatchNorm momentum (PyTorch 0.1; TF decay 0.99 = 0.01)
    bn_eps: float | None = Field(None, gt=0)  # BatchNorm epsilon (PyTorch 1e-5; TF 1e-3); None = the model's
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto = bf16 autocast on CUDA, off on CPU
    channels_last: Literal["auto", "on", "off"] = "auto"  # auto = on for CUDA and for one-thread CPU runs
    compile: bool = False
    progress: bool = True
    eval_every: int = Field(1, gt=0)
    # CPU threads of torch in this process (and in each Ray member actor); None = the CPUs this process
    # may run on (its affinity), capped by OMP_NUM_THREADS when that is set
    threads: int | None = Field(None, gt=0)

    @field_validator("channels_last", "amp", mode="before")
    @classmethod
    def _on_off(cls, value: Any) -> Any:
        """YAML reads ``on`` / ``off`` (``train.channels_last=on``, ``train.amp=off``) as booleans: back to words."""
        if isinstance(value, bool):
            return "on" if value else "off"
        return value

    def num_threads(self) -> int:
        """``threads``, or its default (see :func:`default_threads`)."""
        return int(self.threads) if self.threads else default_threads()


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity; ``os.cpu_count()`` where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads(cpus: float | None = None) -> int:
    """``cpus`` rounded down (at least 1; default: the CPUs this process may run on), capped by
    ``OMP_NUM_THREADS`` when it is set to a positive integer."""
    n = available_cpus() if cpus is None else max(1, int(math.floor(cpus)))
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        n = min(n, int(omp))
    return n


class AugmentConfig(_Section):
    pad: int = Field(4, ge=0)
    flip: bool = True
    cutout: int = Field(16, ge=0)  # side of the base Cutout square, 0 = off
    schedule: str | None = None  # a schedule file (rolekd JSON, PBA log, Ray PBT log)
    schedule_epochs: int | None = Field(None, gt=0)  # search epochs of a log-format schedule
    multiplier: float = Field(1.0, gt=0)  # PBA's stretch (segment lengths x multiplier, truncated)
    fit_epochs: bool = False  # instead map the schedule proportionally onto train.epochs (Schedule.fit_to)
    # train with a random schedule matched to augment.schedule epoch by epoch (as many active slots, ops,
    # probabilities and magnitudes drawn uniformly; Schedule.matched_random) drawn from this seed; None = the
    # schedule itself
    matched_random_seed: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _matched_needs_schedule(self):
        if self.matched_random_seed is not None and not self.schedule:
            raise ValueError("matched_random_seed is set but augment.schedule is not: give the learned schedule "
                             "the random one is matched to")
        return self


class QuantConfig(_Section):
    w_bits: int = 32
    a_bits: int = 32

    @model_validator(mode="after")
    def _bits(self):
        for key in ("w_bits", "a_bits"):
            b = getattr(self, key)
            if not (1 <= b <= 8 or b == 32):
                raise ValueError(f"{key}={b} is not supported: use 1..8 or 32 (full precision)")
        return self


class KDConfig(_Section):
    method: str | None = None  # soft | dml | rkd | kdsvd | mhgd | iikd; None = no KD
    teacher: str | None = None  # a teacher run directory or its model.safetensors
    teacher_model: str | None = None  # defaults to the teacher run's model, else model.name
    lam: float = Field(0.4, ge=0)
    T: float = Field(4.0, gt=0)
    lam_decay: float = Field(0.5, gt=0, le=1)
    lam_decay_every: int = Field(60, gt=0)
    # instead of ×lam_decay every lam_decay_every epochs: ×lam_gamma at these fractions of the run (the
    # authors' code: [0.3, 0.6, 0.8] and 0.6)
    lam_milestones: list[Fraction] | None = None
    lam_gamma: float = Field(0.6, gt=0, le=1)
    clip: bool | None = None  # clip the KD gradient to the task gradient's norm; None = the method's own
    # declaration (kdsvd, mhgd, iikd clip as their reference code does; soft, dml, rkd do not)
    clip_e0: float = 0.0
    clip_lam: Literal["paper", "authors"] = "paper"  # clipped gradient of λ·KD (paper) or of KD, λ unused (authors)
    prepare_epochs: int = Field(1, ge=0)  # MHGD: epochs to train its attention network on the teacher
    init_from_teacher: bool = True  # a same-architecture student starts from the teacher's weights
    # the frozen teacher's forward on a copy with its BatchNorm folded into the convolutions: the same outputs
    # up to float rounding, faster; false = the teacher as trained, bit for bit
    fold_teacher_bn: bool = True
    options: dict[str, Any] = Field(default_factory=dict)  # the method's own options, checked by the method


class SearchConfig(_Section):
    role: Literal["teacher", "student"] = "teacher"
    population: int = Field(16, ge=2)
    epochs: int = Field(200, gt=0)
    perturb_interval: int = Field(3, gt=0)
    quantile: float = Field(0.25, gt=0, le=0.5)
    resample_prob: float = Field(0.2, ge=0, le=1)
    seed: int = 0
    # local: members one after another in this process; fused: all members as one stacked model on one
    # device; ray: members (or fused groups of ray_group_size members) in Ray actors; auto: fused on CUDA,
    # local on CPU
    executor: Literal["auto", "local", "fused", "ray"] = "auto"
    ray_group_size: int = Field(1, ge=1)  # members per Ray actor, trained fused when > 1
    # how the fused executor runs its stacked members: vmap (torch.func.vmap of functional_call) or grouped
    # (HFTA-style grouped convolutions, members side by side along the channels)
    fused_kernel: Literal["vmap", "grouped"] = "vmap"
    ray_address: str | None = None
    # on a cluster (ray_address set): send this process's rolekd package to every node with the job (Ray's
    # runtime_env py_modules), so nodes run the driver's code; false: each node imports its own installed rolekd
    ray_ship_code: bool = True
    ray_num_cpus: float = Field(1.0, gt=0)
    ray_num_gpus: float = Field(0.0, ge=0)
    # evaluate members' validation split every N epochs; None: only where PBT reads the reward (the end of
    # each round and the last epoch), the cheapest choice, with the same schedules and exploit decisions
    eval_every: int | None = Field(None, gt=0)
    # side of the base Cutout square in search members; None = augment.cutout (the authors' searches ran
    # without Cutout: search.cutout=0)
    cutout: int | None = Field(None, ge=0)
    # settings for small budgets (issue 31, benchmarks/evidence/SEARCH.md; the defaults are PBA's): rank members
    # and pick the final one by the mean of their last reward_window round rewards (an exploited member
    # inherits its clone's); each member's first policy (zero: PBA's all-zero; random: each int uniform over
    # its range, seeded by search.seed); no exploit before burn_in epochs
    reward_window: int = Field(1, ge=1)
    init: Literal["zero", "random"] = "zero"
    burn_in: int = Field(0, ge=0)


class RoleConfig(_Section):
    """One role of the pipeline: its network (the model and quant sections), KD method and recipe overrides.

    The short form ``{model: NAME, model_kwargs: {...}, w_bits: B, a_bits: B}`` is accepted too."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    method: str | None = None  # KD method (student only)
    train: dict[str, Any] = Field(default_factory=dict)  # overrides of the train section for this role
    search_train: dict[str, Any] = Field(default_factory=dict)  # overrides for this role's search members

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if isinstance(data.get("model"), str) or "model_kwargs" in data:
            model = data.get("model")
            model = {"name": model} if isinstance(model, str) else dict(model or {})
            if "model_kwargs" in data:
                model["kwargs"] = data.pop("model_kwargs")
            data["model"] = model
        bits = {k: data.pop(k) for k in ("w_bits", "a_bits") if k in data}
        if bits:
            data["quant"] = {**dict(data.get("quant") or {}), **bits}
        return data


class PipelineConfig(_Section):
    teacher: RoleConfig = Field(default_factory=RoleConfig)
    student: RoleConfig = Field(default_factory=lambda: RoleConfig(quant=QuantConfig(w_bits=4, a_bits=4),
                                                                   method="iikd"))
    # the optional stages to run; default: the paper's baselines (the random-schedule controls
    # teacher_random_schedule and student_random_schedule run when listed)
    baselines: list[str] = Field(default_factory=lambda: list(DEFAULT_BASELINES))
    paper: str | None = None  # key of the paper table/setting this run reproduces (for the report)
    # every retraining stage runs with seeds train.seed, train.seed + 1, ... (searches run once); the same
    # seeds in every stage, so stages pair up seed by seed in the report
    seeds: int = Field(1, ge=1)
    # A_T from elsewhere instead of the stage-α search (the paper transfers CIFAR-10's A_T to CIFAR-100):
    # a rolekd schedule file or a finished search run directory (its schedule.json); alpha_search is skipped
    teacher_schedule: str | None = None
    # how many stages run at once, each an ordinary run in its own process: None (auto) = on CPU the CPUs this
    # process may use (each stage with train.threads = CPUs / workers, 1 by default), on CUDA the visible GPUs
    # (one each); 1 = one stage after another in this process
    workers: int | None = Field(None, ge=1)
    # local: worker processes on this machine; ray: each stage a Ray task (search.ray_address, or a local Ray)
    executor: Literal["local", "ray"] = "local"
    ray_num_cpus: float | None = Field(None, gt=0)  # per stage task; None = its train.threads
    ray_num_gpus: float | None = Field(None, ge=0)  # per stage task; None = 1 on CUDA, else 0

    @field_validator("baselines")
    @classmethod
    def _baselines(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in BASELINES]
        if unknown:
            raise ValueError(f"unknown baseline(s) {', '.join(unknown)}: choose from {', '.join(BASELINES)}")
        return names


_NAME_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]*")


class Config(_Section):
    name: str = "run"  # plain names, "/"-separated (a pipeline stage: <run>/<stage>); runs/<name> by default
    out: str | None = None  # run directory; default runs/<name>
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    kd: KDConfig = Field(default_factory=KDConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        parts = name.split("/")
        if not all(_NAME_PART.fullmatch(p) for p in parts):
            raise ValueError("name must be a plain name (letters, digits and _-.+= not starting with . or -; "
                             "NAME/NAME for a sub-run), the run directory being runs/<name>; use out=DIR for "
                             "another place")
        return name

    def run_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / self.name


ALIASES = {
    "seeds": "pipeline.seeds",
    "teacher": "kd.teacher",
    "method": "kd.method",
    "lam": "kd.lam",
    "w_bits": "quant.w_bits",
    "a_bits": "quant.a_bits",
    "role": "search.role",
    "epochs": "train.epochs",
    "lr": "train.lr",
    "batch_size": "train.batch_size",
    "device": "train.device",
    "seed": "train.seed",
    "model": "model.name",
    "dataset": "data.name",
    "schedule": "augment.schedule",
}


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} not found: give the path of a YAML file (see configs/)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"config file {p}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {p}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings (values parsed as YAML scalars/lists) to a nested dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"override {item!r} is not key=value (e.g. train.lr=0.05)")
        key = ALIASES.get(key, key)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise UserError(f"override {item!r}: {part} is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def _format_error(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
    if e["type"] == "extra_forbidden":
        section = Config
        for part in e["loc"][:-1]:
            field = section.model_fields.get(str(part))
            section = field.annotation if field is not None else None
            if section is None or not isinstance(section, type) or not issubclass(section, BaseModel):
                break
        known = ", ".join(section.model_fields) if isinstance(section, type) else ""
        msg = f"unknown key {loc}" + (f" (known here: {known})" if known else "")
    else:
        msg = f"{loc}: {e['msg']}"
        if "input" in e and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {msg}{more}"


def validate_config(data: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise UserError(_format_error(err, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> Config:
    """Read ``path`` (or start from ``base`` / defaults), apply overrides, validate."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = _merge(data, _read_with_bases(Path(path)))
    data = apply_overrides(data, list(overrides or []))
    return validate_config(data, str(path) if path is not None else "config")


def _read_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML file whose ``base: other.yaml`` (relative to it) is read first and overridden by it."""
    if path.resolve() in seen:
        raise UserError(f"config file {path}: its base chain loops back to itself")
    data = read_yaml(path)
    parent = data.pop("base", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise UserError(f"config file {path}: base must be the path of another YAML file")
    return _merge(_read_with_bases(path.parent / parent, seen + (path.resolve(),)), data)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def derive(cfg: Config, source: str = "derived config", **changes: Any) -> Config:
    """A new config from ``cfg``: each keyword names a top-level key (``name``, ``out``) or a section.
    A section given as a mapping updates that section's keys; given as a section object (e.g.
    ``kd=KDConfig()``) or ``None`` (its defaults) it replaces the section. Validated like a file,
    errors naming ``source``."""
    data = cfg.model_dump(mode="json")
    for key, value in changes.items():
        if key not in Config.model_fields:
            raise ValueError(f"derive: {key!r} is not a key of Config")
        if isinstance(value, BaseModel):
            data[key] = value.model_dump(mode="json")
        elif value is None and key not in ("out",):
            data[key] = {}
        elif isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return validate_config(data, source)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
