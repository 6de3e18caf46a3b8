"""The random-schedule controls (`teacher_random_schedule`, `student_random_schedule`): a random schedule
matched to the learned one epoch by epoch, its stages, the pipeline running them, and the report's rows,
comparisons (with their 95% confidence intervals and p-values) and check of the drawn schedules."""

import json
import math
import shutil
import statistics

import numpy as np
import pytest
import yaml
from scipy import stats

from rolekd.augment.schedule import Schedule
from rolekd.cli import main
from rolekd.config import dump_config, load_config
from rolekd.errors import UserError
from rolekd.experiment import load_schedule
from rolekd.pipeline import run_pipeline, stage_configs
from rolekd.report import build_report
from rolekd.search import search_config

N_SLOTS = 30  # PBA's policy: 2 halves x 15 ops, each slot (probability 0..10, magnitude 0..9)


def counts(policies) -> list[int]:
    """Per epoch, the slots with a probability above 0 (probabilities at the even positions of the 60 ints)."""
    return [sum(1 for i in range(0, 60, 2) if p[i] > 0) for p in policies]


def learned(active: list[int], seed: int) -> Schedule:
    """A stand-in for a learned schedule with ``active[e]`` active slots in epoch ``e``: the first slots
    active, probabilities and magnitudes all 7 (so a random schedule is unlikely to equal it by chance),
    inactive slots with magnitude 5 (as explore leaves them)."""
    pols = []
    for k in active:
        p = [0, 5] * N_SLOTS
        for s in range(k):
            p[2 * s], p[2 * s + 1] = 7, 7
        pols.append(p)
    return Schedule(pols, source=f"learned-{seed}")


# ---------------------------------------------------------------------------------- the schedule itself
def test_matched_random_schedule_has_the_learned_active_slots_per_epoch_and_its_own_draws():
    active = [0, 1, 7, 30, 15, 0, 2]
    sched = learned(active, 0)
    rnd = sched.matched_random(3)
    pols = rnd.policies
    assert counts(pols) == active  # as many active slots in every epoch, an epoch without ops included
    for p in pols:
        assert all(1 <= p[i] <= 10 for i in range(0, 60, 2) if p[i] > 0)  # probability 1..10 where active
        assert all(0 <= p[i] <= 9 for i in range(1, 60, 2))  # magnitudes 0..9
        assert all(p[i + 1] == 0 for i in range(0, 60, 2) if p[i] == 0)  # an inactive slot is all zero
    assert rnd != sched
    assert rnd == sched.matched_random(3)  # seeded
    assert rnd != sched.matched_random(4)
    assert rnd.meta["seed"] == 3
    # the draws do not depend on which slots the learned schedule used, only on how many
    shuffled = [p[2 * 20:] + p[:2 * 20] for p in sched.policies]  # the same counts in other slots
    assert Schedule(shuffled, source=sched.source).matched_random(3) == rnd


def test_matched_random_draws_slots_probabilities_and_magnitudes_uniformly():
    """Slots without replacement and uniform over the 30; probabilities uniform over 1..10 (never 0),
    magnitudes over 0..9 (chi-square against the uniform; a fixed seed, so no flakiness), whatever slots
    the learned schedule used (here always the first five)."""
    k, epochs = 5, 3000
    rnd = learned([k] * epochs, 0).matched_random(11)
    slots = np.zeros(N_SLOTS)
    probs, mags = np.zeros(11), np.zeros(10)
    for p in rnd.policies:
        for s in range(N_SLOTS):
            if p[2 * s] > 0:
                slots[s] += 1
                probs[p[2 * s]] += 1
                mags[p[2 * s + 1]] += 1
    assert slots.sum() == k * epochs and probs[0] == 0
    for observed in (slots, probs[1:], mags):
        assert stats.chisquare(observed).pvalue > 1e-3, observed


def test_a_schedule_without_ops_is_matched_by_itself_and_a_seed_without_a_schedule_is_one_line(tmp_path, capsys):
    """A search may learn that no op is best (its best member never perturbed): the control of such a schedule
    applies no op either (a long pipeline does not stop for it), whatever the seed."""
    empty = Schedule([[0] * 60] * 3, source="empty.json")
    for seed in (0, 1, 7):
        assert empty.matched_random(seed).policies == [[0] * 60] * 3
    with pytest.raises(UserError, match=r"augment.*matched_random_seed is set but augment.schedule is not"):
        load_config(None, ["augment.matched_random_seed=1"])


# ---------------------------------------------------------------------------------- the stages
TINY = """
name: tiny
data: {name: cifar10-sample, train_size: 64, val_size: 64, max_train: 128, max_test: 100}
train: {epochs: 2, batch_size: 64, eval_batch_size: 100, progress: false}
augment: {cutout: 8}
search: {population: 2, epochs: 4, perturb_interval: 1}
pipeline:
  seeds: 2
  baselines: [teacher_random_schedule, student_random_schedule]
  teacher: {model: resnet_tiny}
  student: {model: resnet_tiny, w_bits: 4, a_bits: 4, method: soft,
            train: {optimizer: adam, lr: 0.001, weight_decay: 1.0e-5}}
"""
CONTROLS = {"teacher_random_schedule": ("teacher", "alpha_search"),
            "student_random_schedule": ("student", "beta_search")}


def _without(cfg: dict, *keys) -> dict:
    cfg = json.loads(json.dumps(cfg))
    for key in keys:
        sec, _, name = key.partition(".")
        if name:
            cfg[sec].pop(name)
        else:
            cfg.pop(sec)
    return cfg


def test_each_control_is_its_learned_stage_with_a_random_schedule_seeded_per_seed_run(tmp_path):
    """A control's config is its learned-schedule stage's (model, bits, KD method and teacher, init, base
    augmentation, the schedule file and its fitting), plus augment.matched_random_seed = the run's seed."""
    cfg = load_config(None, [], base=yaml.safe_load(TINY))
    configs = stage_configs(cfg, tmp_path)
    for control, (stage, _) in CONTROLS.items():
        for k in ("", "_seed1"):
            a = configs[f"{control}{k}"].model_dump(mode="json")
            b = configs[f"{stage}{k}"].model_dump(mode="json")
            assert a["augment"]["matched_random_seed"] == a["train"]["seed"] == b["train"]["seed"]
            assert b["augment"]["matched_random_seed"] is None
            assert _without(a, "name", "out", "augment.matched_random_seed") == \
                _without(b, "name", "out", "augment.matched_random_seed"), control
    # the default baselines are the paper's; the controls run when listed
    default = load_config(None).pipeline.baselines
    assert default and not set(default) & set(CONTROLS)
    # with A_T given (the α search skipped), the teacher's control is matched to the given schedule
    given = tmp_path / "a_t.json"
    learned([1, 2], 0).save(given)
    cfg = load_config(None, [f"pipeline.teacher_schedule={given}"], base=yaml.safe_load(TINY))
    configs = stage_configs(cfg, tmp_path)
    assert "alpha_search" not in configs
    assert configs["teacher_random_schedule"].augment.schedule == str(given)


def test_a_control_of_a_given_schedule_without_ops_trains_without_ops(tmp_path):
    given = tmp_path / "a_t.json"
    Schedule([[0] * 60] * 4).save(given)
    cfg = load_config(None, [f"pipeline.teacher_schedule={given}",
                             "pipeline.baselines=[teacher_random_schedule]"], base=yaml.safe_load(TINY))
    control = stage_configs(cfg, tmp_path / "run")["teacher_random_schedule"]
    assert load_schedule(control).policies == [[0] * 60] * 4


# ---------------------------------------------------------------------------------- the pipeline
A_T = [0, 3, 30, 2]  # per search epoch; 2 training epochs use search epochs 0 and 2 (fit_epochs)
A_S = [4, 0, 1, 6]


def _finished_search(cfg, root, name: str, schedule: Schedule) -> None:
    """A finished search's run directory, written by hand so that its learned schedule is known and applies
    ops (a micro search's best member may never be perturbed, leaving an empty schedule)."""
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(dump_config(search_config(stage_configs(cfg, root)[name])))
    schedule.save(d / "schedule.json")
    (d / "search.json").write_text(json.dumps({"status": "finished", "best_member": 0, "best_val_acc": 0.5,
                                               "best_test_acc": 0.5, "exploits": 0, "wall_time_s": 0.0}))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("control")
    cfg_file = d / "tiny.yaml"
    cfg_file.write_text(TINY)
    root = d / "run"
    cfg = load_config(cfg_file, [f"out={root}"])
    root.mkdir()
    (root / "config.yaml").write_text(dump_config(cfg))
    _finished_search(cfg, root, "alpha_search", learned(A_T, 1))
    _finished_search(cfg, root, "beta_search", learned(A_S, 2))
    run_pipeline(cfg)
    return cfg, root


def _policies(path) -> list[list[int]]:
    return json.loads(path.read_text())["policies"]


def _rows(path) -> list[tuple]:
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(r["train_loss"], r["train_acc"], r["test_loss"], r["test_acc"]) for r in rows]


def test_each_seed_run_trains_with_its_own_recorded_random_schedule_matched_to_the_learned_one(tiny, tmp_path):
    _, root = tiny
    for control, (stage, search) in CONTROLS.items():
        want = counts(_policies(root / search / "schedule.json"))  # the learned schedule, read independently
        drawn = []
        for k in ("", "_seed1"):
            run = root / f"{control}{k}"
            c = yaml.safe_load((run / "config.yaml").read_text())
            pols = _policies(run / "random_schedule.json")
            assert counts(pols) == want, (control, k)
            assert pols != _policies(root / search / "schedule.json"), (control, k)
            assert c["augment"]["matched_random_seed"] == c["train"]["seed"]  # recorded: the run's seed
            assert json.loads((run / "random_schedule.json").read_text())["meta"]["seed"] == c["train"]["seed"]
            drawn.append(pols)
            # it trained with it: its epochs equal the learned stage's (same seed, init, base augmentation)
            # while the two fitted schedules agree, and the run as a whole differs
            a, b = _rows(run), _rows(root / f"{stage}{k}")
            fitted = [e * len(want) // len(a) for e in range(len(a))]  # the search epoch of each training epoch
            for e, s in enumerate(fitted):
                if want[s] == 0:
                    assert a[e] == b[e], (control, k, e)
            assert a != b, (control, k)
        assert drawn[0] != drawn[1], control  # each seed run draws its own
        # rerunning the control's config draws the same schedule
        again = tmp_path / control
        command = "distill" if stage == "student" else "train"
        assert main([command, str(root / control / "config.yaml"), f"out={again}", "epochs=1"]) == 0
        assert _policies(again / "random_schedule.json") == drawn[0]
    # A_T's first fitted epoch has no op: the teacher's control trained exactly as the teacher there
    assert A_T[0] == 0 and _rows(root / "teacher_random_schedule")[0] == _rows(root / "teacher")[0]


def _accs(root, stage) -> list[float]:
    return [100 * json.loads((root / d / "result.json").read_text())["test_acc"] for d in (stage, f"{stage}_seed1")]


def test_report_has_the_controls_rows_comparisons_with_confidence_intervals_and_its_check(tiny):
    _, root = tiny
    report = (root / "report.md").read_text()
    for label, control in (("teacher with a random schedule matched to A_T", "teacher_random_schedule"),
                           ("KD + a random schedule matched to A_S", "student_random_schedule")):
        a = _accs(root, control)
        line = next(x for x in report.splitlines() if x.startswith(f"| {label} |"))
        assert f"| {statistics.mean(a):.2f} ± {statistics.stdev(a):.2f} | 2 |" in line
    t975 = stats.t.ppf(0.975, 1)
    assert abs(t975 - 12.706) < 1e-3  # Student's t, 1 degree of freedom, by hand
    for label, stage, control in (("A_T vs random (teacher)", "teacher", "teacher_random_schedule"),
                                  ("A_S vs random (both with KD)", "student", "student_random_schedule")):
        a, b = _accs(root, stage), _accs(root, control)
        d = np.array([round(x - y, 9) for x, y in zip(a, b)])
        line = next(x for x in report.splitlines() if x.startswith(f"| {label} |"))
        mean, sd = d.mean(), d.std(ddof=1)
        assert f"| {mean:+.2f} ± {sd:.2f} | 2 |" in line, line
        if sd > 0:
            half = t975 * sd / math.sqrt(2)
            assert f"| [{mean - half:+.2f}, {mean + half:+.2f}] | {stats.ttest_rel(a, b).pvalue:.3g} |" in line, line
        else:
            assert "| — | — |" in line, line
    assert "matched to A_T trained identically" not in report and "matched to A_S trained identically" not in report
    for what, active in (("A_T (teacher)", A_T), ("A_S (student)", A_S)):
        assert (f"have {what}'s number of active slots in each of its {len(active)} epochs ({sum(active)} in all) "
                f"and differ from it") in report


def test_report_says_when_a_control_schedule_is_not_matched(tiny, tmp_path):
    _, root = tiny
    copy = tmp_path / "run"
    shutil.copytree(root, copy)
    shutil.copy(copy / "alpha_search" / "schedule.json",
                copy / "teacher_random_schedule_seed1" / "random_schedule.json")
    learned([4, 0, 1, 5], 0).save(copy / "student_random_schedule" / "random_schedule.json")
    # the same 11 active slots in all as A_S = [4, 0, 1, 6], in other epochs: matched in total, not epoch by epoch
    learned([4, 1, 0, 6], 1).save(copy / "student_random_schedule_seed1" / "random_schedule.json")
    text = build_report(copy).read_text()
    assert ("**The random schedule of teacher with a random schedule matched to A_T is not a matched random "
            "schedule**: in seed run(s) 1 it is A_T (teacher) itself.") in text
    assert ("**The random schedule of KD + a random schedule matched to A_S is not a matched random schedule**: "
            "in seed run(s) 0, 1 it does not have A_S (student)'s number of active slots in every epoch.") in text
