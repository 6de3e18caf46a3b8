"""The stages of the role-wise pipeline, as one table that the config, the pipeline and the report read.

Stage α searches the teacher's schedule A_T and retrains the teacher with it; stage β searches the
student's schedule A_S with KD from the stage-α teacher and retrains the student with KD and A_S. The
baselines are the comparisons the paper makes (Tables 1-4) and two controls, the teacher and the student
(with KD) retrained with a random schedule matched to A_T resp. A_S epoch by epoch (in every epoch as many
op slots with a probability above 0, the ops, probabilities and magnitudes drawn uniformly).

Augmentation (paper §5.1 and PBA): stages without a learned schedule (the baselines ``vanilla_*`` and
``only_kd``) use random crop and horizontal flip only; stages with a learned schedule, and the searches,
use PBA's pipeline: crop, flip, the policy's ops, then ``augment.cutout`` (PBA: 16; 0 turns it off).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class Stage:
    name: str  # the stage's sub-directory of a pipeline run
    kind: Literal["search", "train"]
    role: Literal["teacher", "student"]  # whose network (pipeline.teacher / pipeline.student) it trains
    kd: bool  # trained with KD from the stage-α teacher
    schedule: str | None  # the search stage whose schedule.json it trains with; None: base augmentation only
    init: Literal["scratch", "teacher"]  # a student stage may start from the stage-α teacher's weights
    # (when the two networks share an architecture)
    label: str  # the report's row label
    baseline: bool  # optional: listed in pipeline.baselines
    paper_row: str | None = None  # the row key of the paper's tables (report/paper.yaml)
    # a control: trained with a random schedule matched epoch by epoch to ``schedule``'s (as many active
    # slots, ops and their probabilities and magnitudes drawn at random from the run's seed)
    random_schedule: bool = False

    @property
    def base_only(self) -> bool:
        """Random crop and flip only (no learned policy, no cutout): the paper's baselines."""
        return self.kind == "train" and self.schedule is None


TEACHER_STAGE = "teacher"  # the stage whose model is the frozen KD teacher of every KD stage

STAGES: tuple[Stage, ...] = (
    Stage("alpha_search", "search", "teacher", kd=False, schedule=None, init="scratch",
          label="stage α search (teacher schedule A_T)", baseline=False),
    Stage("teacher", "train", "teacher", kd=False, schedule="alpha_search", init="scratch",
          label="stage α (teacher schedule A_T)", baseline=False, paper_row="stage_alpha"),
    Stage("vanilla_teacher", "train", "teacher", kd=False, schedule=None, init="scratch",
          label="vanilla (base augmentation)", baseline=True, paper_row="vanilla"),
    Stage("beta_search", "search", "student", kd=True, schedule=None, init="teacher",
          label="stage β search (student schedule A_S)", baseline=False),
    Stage("student", "train", "student", kd=True, schedule="beta_search", init="teacher",
          label="stage β (KD + student schedule A_S)", baseline=False, paper_row="stage_beta"),
    Stage("vanilla_student", "train", "student", kd=False, schedule=None, init="scratch",
          label="vanilla student (from scratch, no KD)", baseline=True, paper_row="vanilla"),
    Stage("student_alpha", "train", "student", kd=False, schedule="alpha_search", init="scratch",
          label="student with A_T (stage α, from scratch, no KD)", baseline=True, paper_row="stage_alpha"),
    Stage("only_kd", "train", "student", kd=True, schedule=None, init="teacher",
          label="only KD (no learned schedule)", baseline=True, paper_row="only_kd"),
    Stage("student_teacher_schedule", "train", "student", kd=True, schedule="alpha_search", init="teacher",
          label="KD + teacher's schedule A_T", baseline=True, paper_row="student_teacher_schedule"),
    Stage("teacher_random_schedule", "train", "teacher", kd=False, schedule="alpha_search", init="scratch",
          label="teacher with a random schedule matched to A_T", baseline=True, random_schedule=True),
    Stage("student_random_schedule", "train", "student", kd=True, schedule="beta_search", init="teacher",
          label="KD + a random schedule matched to A_S", baseline=True, random_schedule=True),
)

STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
BASELINES: tuple[str, ...] = tuple(s.name for s in STAGES if s.baseline)
# pipeline.baselines by default: the paper's comparisons; the random-schedule controls are asked for by name
DEFAULT_BASELINES: tuple[str, ...] = tuple(s.name for s in STAGES if s.baseline and not s.random_schedule)


def schedule_path(search: str, root: Path, teacher_schedule: str | None = None) -> Path:
    """The schedule that stages naming ``search`` train with: ``<root>/<search>/schedule.json``, or for A_T
    the file or search run directory ``pipeline.teacher_schedule`` names."""
    if search == "alpha_search" and teacher_schedule:
        p = Path(teacher_schedule).expanduser()
        return p / "schedule.json" if p.is_dir() else p
    return Path(root) / search / "schedule.json"


def stage_dir(name: str, k: int = 0) -> str:
    """The run directory (under the pipeline's) of seed run ``k`` of stage ``name``."""
    return name if k == 0 else f"{name}_seed{k}"


def stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(name)
