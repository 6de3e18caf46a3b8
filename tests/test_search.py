"""PBA search: the PBT rules, logs <-> schedules, determinism, resume, faults, the Ray executor."""

import ast
import csv
import json
from collections import Counter

import numpy as np
import pytest
import torch

from rolekd.augment.schedule import Schedule
from rolekd.config import load_config
from rolekd.errors import UserError
from rolekd.experiment import search_from_config
from rolekd.search import (PBTController, explore, member_config, member_seed, quantile_size, rank,
                           search_config)
from rolekd.search import members as members_mod
from rolekd.search.pbt import ZERO_POLICY, parse_policy_string, policy_string

# 0.999 quantiles of the chi-square distribution (df -> value)
CHI2_999 = {2: 13.82, 3: 16.27, 4: 18.47, 6: 22.46, 9: 27.88, 10: 29.59, 15: 37.70}


def chi2_stat(counts, probs, n):
    return sum((counts.get(k, 0) - n * p) ** 2 / (n * p) for k, p in probs.items() if p > 0)


# ---------------------------------------------------------------------------------------- ranking
@pytest.mark.parametrize("n,q,want", [(16, 0.25, 4), (4, 0.25, 1), (5, 0.25, 2), (8, 0.25, 2), (10, 0.25, 3),
                                      (3, 0.5, 1), (2, 0.25, 1), (1, 0.25, 0), (0, 0.25, 0), (7, 0.3, 3),
                                      (16, 0.5, 8), (6, 0.5, 3)])
def test_quantile_size_ceil_capped_at_half(n, q, want):
    # Ray Tune: ceil(n * q), lowered to floor(n / 2) when above n / 2; nothing below 2 members
    assert quantile_size(n, q) == want


def test_rank_sorts_stably_and_skips_members_without_reward():
    rewards = [0.5, 0.1, 0.9, 0.1, None, 0.7, 0.9, 0.3]
    bottom, top = rank(rewards, 0.25)  # 7 ranked -> ceil(1.75) = 2
    assert bottom == [1, 3]  # tie at 0.1: member order kept
    assert top == [2, 6]  # tie at 0.9: the later member is the very best
    assert rank([None, 0.3, None], 0.25) == ([], [])
    assert rank({3: 0.2, 5: 0.1}, 0.25) == ([5], [3])


def test_perturb_exploits_bottom_quantile_from_top_quantile_uniformly():
    n, trials = 16, 3000
    rewards = [0.1 * ((7 * i) % 16) for i in range(n)]  # a permutation of 0.0 .. 1.5
    order = sorted(range(n), key=lambda i: rewards[i])
    want_bottom, want_top = sorted(order[:4]), set(order[-4:])
    chosen = Counter()
    for seed in range(trials // 4):
        c = PBTController(n, 0.25, 0.2, seed=seed)
        for i in range(n):
            c.record(i, 3, rewards[i])
        steps = c.perturb(3)
        assert [s.target for s in steps] == want_bottom
        for s in steps:
            assert s.clone in want_top
            chosen[s.clone] += 1
            assert s.old_policy == list(ZERO_POLICY)
    total = sum(chosen.values())
    stat = chi2_stat(chosen, {k: 0.25 for k in want_top}, total)
    assert stat < CHI2_999[3], (chosen, stat)


def test_perturb_copies_lineage_policy_and_log():
    c = PBTController(4, 0.25, 0.2, seed=3)
    for i, r in enumerate([0.3, 0.9, 0.1, 0.5]):
        c.record(i, 2, r)
    (step,) = c.perturb(2)
    assert (step.target, step.clone) == (2, 1)  # 4 members -> quantile 1: worst copies best
    assert c.policies[2] == step.new_policy and c.policies[1] == list(ZERO_POLICY)
    assert c.history[2] == c.history[1] and c.history[2] is not c.history[1]
    line = json.loads(c.member_logs[2][-1])
    assert line == ["2", "1", 2, 2, {"hp_policy": list(ZERO_POLICY)}, {"hp_policy": step.new_policy}]
    assert c.global_log == c.member_logs[2]
    # the next exploit of member 3 from member 2 copies member 2's log, then appends
    for i, r in enumerate([0.3, 0.2, 0.9, 0.1]):
        c.record(i, 2, r)
    (step2,) = c.perturb(4)
    assert (step2.target, step2.clone) == (3, 2)
    assert c.member_logs[3][:-1] == c.member_logs[2]
    assert json.loads(c.member_logs[3][-1])[4] == {"hp_policy": c.policies[2]}
    assert len(c.global_log) == 2


def test_failed_members_are_replaced_even_outside_the_bottom():
    c = PBTController(8, 0.25, 0.2, seed=0)
    for i in range(8):
        c.record(i, 1, i / 10)
    steps = c.perturb(1, failed=[6])  # 6 leaves the ranking: 7 ranked -> quantile 2, top = {5, 7}
    assert [(s.target, s.reason) for s in steps] == [(0, "exploit"), (1, "exploit"), (6, "replace")]
    assert all(s.clone in (5, 7) for s in steps)
    assert c.rewards[6] == c.rewards[steps[-1].clone]


def test_failed_member_clone_comes_from_top_of_remaining():
    clones = Counter()
    for seed in range(400):
        c = PBTController(8, 0.25, 0.2, seed=seed)
        for i in range(8):
            c.record(i, 1, i / 10)
        steps = c.perturb(1, failed=[7])  # the best member failed: ranked are 0..6, top = {5, 6}
        assert [s.target for s in steps] == [0, 1, 7]
        clones.update(s.clone for s in steps)
    assert set(clones) == {5, 6}
    assert chi2_stat(clones, {5: 0.5, 6: 0.5}, sum(clones.values())) < CHI2_999[2]


# ---------------------------------------------------------------------------------------- explore
def expected_explore(v, hi, p):
    """P(new value) under PBA's rule: resample uniform on 0..hi w.p. p, else v -/+ U{0..3}, clipped."""
    probs = {x: p / (hi + 1) for x in range(hi + 1)}
    for step in range(4):
        for sign in (-1, 1):
            probs[min(hi, max(0, v + sign * step))] += (1 - p) * 0.25 * 0.5
    return probs


@pytest.mark.parametrize("value,p", [(5, 0.2), (0, 0.2), (1, 0.2), (9, 0.2), (10, 0.2), (4, 0.0), (3, 1.0)])
def test_explore_distribution_matches_the_rule(value, p):
    rng = np.random.Generator(np.random.PCG64(1234 + value))
    n = 4000
    policy = [min(value, 10), min(value, 9)] * 30
    even, odd = Counter(), Counter()
    for _ in range(n // 30):
        new = explore(policy, rng, p)
        assert all(0 <= x <= 10 for x in new[0::2]) and all(0 <= x <= 9 for x in new[1::2])
        even.update(new[0::2])
        odd.update(new[1::2])
    for counts, v, hi in ((even, min(value, 10), 10), (odd, min(value, 9), 9)):
        probs = expected_explore(v, hi, p)
        total = sum(counts.values())
        assert set(counts) <= {k for k, q in probs.items() if q > 0}, (counts, probs)  # impossible values never
        support = [k for k, q in probs.items() if q > 0]
        stat = chi2_stat(counts, probs, total)
        df = len(support) - 1
        assert stat < CHI2_999[df], (v, hi, p, counts, stat)


def test_explore_is_reproducible_and_changes_the_policy():
    a = explore(ZERO_POLICY, np.random.Generator(np.random.PCG64(7)))
    b = explore(ZERO_POLICY, np.random.Generator(np.random.PCG64(7)))
    c = explore(ZERO_POLICY, np.random.Generator(np.random.PCG64(8)))
    assert a == b and a != c and any(a)


class ScriptedRng:
    """Returns scripted draws and records the integer ranges asked for."""

    def __init__(self, uniforms, ints):
        self.u, self.i, self.ranges = list(uniforms), list(ints), []

    def random(self):
        return self.u.pop(0)

    def integers(self, lo, hi):
        self.ranges.append((lo, hi))
        return self.i.pop(0)


def test_explore_draw_order_and_clipping():
    # int 0 (prob 10): not resampled, step 3 up -> clipped at 10; int 1 (level 0): resampled to 9;
    # int 2 (prob 2): step 3 down -> clipped at 0; the rest: step 0
    policy = [10, 0, 2] + [5] * 57
    uniforms = [0.5, 0.9, 0.1, 0.5, 0.2] + [0.9, 0.9] * 57
    ints = [3, 9, 3] + [0] * 57
    rng = ScriptedRng(uniforms, ints)
    new = explore(policy, rng, resample_prob=0.2)
    assert new[:3] == [10, 9, 0] and new[3:] == [5] * 57
    assert rng.ranges[:3] == [(0, 4), (0, 10), (0, 4)]  # magnitudes resample on 0..9 (exclusive 10)
    assert not rng.u and not rng.i
    assert explore([0] * 60, ScriptedRng([0.1] * 60, [10, 9] * 30), 0.2) == [10, 9] * 30  # all resampled


def test_policy_string_round_trip():
    pol = [10, 9, 0, 1] * 15
    assert len(policy_string(pol)) == 60
    assert parse_policy_string(policy_string(pol)) == pol


# ---------------------------------------------------------------------------------------- logs
def pba_parse_log(path, epochs):
    """An independent reading of PBA's parse_log / parse_log_schedule (multiplier 1)."""
    # PBA reads the lines with ast.literal_eval (Python 2 era: bytes lines were str); text mode here
    rows = [ast.literal_eval(line) for line in open(path).readlines()]
    for r in rows:
        for k in (4, 5):
            if isinstance(r[k], list):
                r[k] = {"hp_policy": r[k]}
    cut = None
    for i in range(len(rows) - 1):
        if rows[i][0] != rows[i + 1][1]:
            cut = i
    if cut is not None:
        rows = rows[cut + 1:]
    segs = [(rows[0][3], rows[0][4]["hp_policy"])]
    for i in range(len(rows) - 1):
        assert rows[i][0] == rows[i + 1][1]
        segs.append((rows[i + 1][3] - rows[i][3], rows[i][5]["hp_policy"]))
    segs.append((epochs - rows[-1][3], rows[-1][5]["hp_policy"]))
    assert sum(n for n, _ in segs) == epochs
    return [list(p) for n, p in segs for _ in range(n)]


def write_logs(ctrl, d):
    for i, lines in enumerate(ctrl.member_logs):
        (d / f"pbt_policy_{i}.txt").write_text("".join(l + "\n" for l in lines))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_member_logs_read_back_into_lineages(tmp_path, seed):
    """A simulated search (random rewards): every exploited member's log gives back its lineage,
    through Schedule.load and PBA's parser, including lineages with several exploits."""
    rs = np.random.RandomState(100 + seed)
    pop, interval, epochs = 8, 3, 20
    c = PBTController(pop, 0.25, 0.2, seed=seed)
    e = 0
    while e < epochs:
        k = min(interval, epochs - e)
        for i in range(pop):
            c.record(i, k, float(rs.rand()))
        e += k
        if e < epochs:
            c.perturb(e)
    write_logs(c, tmp_path)
    multi = 0
    for i in range(pop):
        assert len(c.history[i]) == epochs
        path = tmp_path / f"pbt_policy_{i}.txt"
        if not c.member_logs[i]:
            assert c.history[i] == [list(ZERO_POLICY)] * epochs
            continue
        lineage = Schedule(c.history[i])
        assert Schedule.load(path, epochs=epochs) == lineage
        assert pba_parse_log(path, epochs) == c.history[i]
        distinct = len(lineage.segments())
        multi += distinct >= 3
    assert multi >= 1, "the simulation should produce a lineage with several exploits"


# ---------------------------------------------------------------------------------------- searches
BASE = ["model.name=resnet_tiny", "data.name=cifar10-sample", "data.train_size=256", "data.val_size=256",
        "train.batch_size=128", "train.eval_batch_size=256", "search.population=4", "search.epochs=6",
        "search.perturb_interval=2", "train.progress=false", "train.device=cpu"]


def config(out, *extra):
    return load_config(None, BASE + [f"out={out}"] + list(extra))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread per module, as Ray workers


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    summary = search_from_config(config(out), verbose=False)
    return out, summary


def outputs(d):
    out = {name: (d / name).read_text() for name in
           ["rewards.csv", "pbt_global.txt"] + [f"pbt_policy_{i}.txt" for i in range(4)]}
    out["schedule"] = Schedule.load(d / "schedule.json").policies
    return out


def test_search_writes_consistent_outputs(reference):
    out, s = reference
    for name in ["schedule.json", "rewards.csv", "events.jsonl", "search.json", "rewards.png", "schedule.png",
                 "pbt_global.txt", "config.yaml", "best_model.safetensors"] + [f"pbt_policy_{i}.txt" for i in range(4)]:
        assert (out / name).is_file(), name
    assert not (out / "search_state").exists()
    best = s["best_member"]
    rows = list(csv.DictReader(open(out / "rewards.csv")))
    assert len(rows) == 4 * 6
    final = {int(r["member"]): float(r["val_acc"]) for r in rows if r["epoch"] == "6"}
    assert final[best] == max(final.values()) == s["best_val_acc"]
    assert s["exploits"] == 2 and s["replacements"] == 0  # 4 members: one exploit at epochs 2 and 4
    assert len((out / "pbt_global.txt").read_text().splitlines()) == 2
    sched = Schedule.load(out / "schedule.json")
    assert len(sched) == 6
    # every epoch's policy in rewards.csv is the policy of that member's lineage at that time; for the
    # best member the last two epochs' policy is the schedule's
    last = [parse_policy_string(r["policy"]) for r in rows if int(r["member"]) == best and int(r["epoch"]) > 4]
    assert last == sched.policies[4:]
    log = out / f"pbt_policy_{best}.txt"
    if log.read_text():
        assert Schedule.load(log, epochs=6) == sched
        assert pba_parse_log(log, 6) == sched.policies
    else:  # never exploited: it kept the initial policy
        assert sched.policies == [list(ZERO_POLICY)] * 6
    for i in range(4):  # every exploited member's log reads back into that member's lineage
        p = out / f"pbt_policy_{i}.txt"
        if p.read_text():
            assert len(Schedule.load(p, epochs=6)) == 6
    assert 0 <= s["best_test_acc"] <= 1
    assert s["wall_time_s"] >= s["train_s"] + s["eval_s"] > 0
    # a second call reports the finished search
    again = search_from_config(config(out), verbose=False)
    assert again == s


def test_same_seed_same_search_other_seed_other_search(reference, tmp_path):
    out, s = reference
    # a fault-free rerun must reproduce the reference bit for bit
    b = search_from_config(config(tmp_path / "b"), verbose=False)
    assert outputs(tmp_path / "b") == outputs(out)
    assert b["final_val_acc"] == s["final_val_acc"]
    # another seed: other members' seeds from the first epoch on (2 of the 6 epochs suffice to see it)
    search_from_config(config(tmp_path / "c", "search.seed=1", "search.epochs=2"), verbose=False)
    first = [r for r in (tmp_path / "c" / "rewards.csv").read_text().splitlines()[1:] if r.startswith("1,")]
    ref_first = [r for r in (out / "rewards.csv").read_text().splitlines()[1:] if r.startswith("1,")]
    assert len(first) == len(ref_first) == 4
    assert all(a != b for a, b in zip(first, ref_first))  # every member trained differently
    # within a search every member has its own seed: from the same all-zero policy, four different first epochs
    assert len({r.split(",", 2)[2] for r in ref_first}) == 4


def test_member_seeds_and_configs():
    cfg = config("/tmp/unused", "search.role=teacher", "kd.method=soft")
    seeds = {member_seed(0, i) for i in range(16)}
    assert len(seeds) == 16 and member_seed(0, 3) == member_seed(0, 3) != member_seed(1, 3)
    m = member_config(search_config(cfg), 2)
    assert m.data.split == "reduced" and m.train.epochs == 6 and m.train.seed == member_seed(0, 2)
    assert m.kd.method is None  # role teacher trains plainly


def test_student_role_needs_teacher_and_method(tmp_path):
    with pytest.raises(UserError, match="teacher="):
        search_from_config(config(tmp_path / "s", "search.role=student", "kd.method=soft"), verbose=False)
    with pytest.raises(UserError, match="method="):
        search_from_config(config(tmp_path / "s", "search.role=student", f"kd.teacher={tmp_path}"), verbose=False)


class Stop(Exception):
    pass


def test_resume_after_interruption_equals_uninterrupted(reference, tmp_path):
    out, s = reference
    d = tmp_path / "r"

    def stop_after_first_round(info):
        if info["round"] == 1:
            raise Stop

    with pytest.raises(Stop):
        search_from_config(config(d), on_round=stop_after_first_round, verbose=False)
    assert (d / "search_state" / "LATEST").is_file() and not (d / "search.json").exists()
    saved = d / "search_state" / (d / "search_state" / "LATEST").read_text()
    state = torch.load(saved / "member_0.pt", weights_only=True)
    assert state["epoch"] == 2
    # junk written after the saved perturbation (as if the process died mid-round) is dropped
    with open(d / "pbt_global.txt", "a") as f:
        f.write('["9", "9", 9, 9, [], []]\n')
    torch.manual_seed(999)  # the resumed search must not depend on the global RNG at start
    r = search_from_config(config(d), verbose=False)
    assert outputs(d) == outputs(out)
    assert r["final_val_acc"] == s["final_val_acc"] and r["best_member"] == s["best_member"]
    events = [json.loads(l)["event"] for l in (d / "events.jsonl").read_text().splitlines()]
    assert events == ["resumed"]


def patch_member_train(monkeypatch, member, rounds, mode):
    """Make ``member`` fail in the given rounds (1-based, per call: a retry is another call)."""
    real = members_mod.Member.train
    calls = Counter()

    def train(self, epochs, policy):
        if self.index == member:
            calls[self.index] += 1
            if calls[self.index] in rounds:
                if mode == "raise":
                    raise RuntimeError("injected fault")
                orig = self.trainer.train_epoch

                def nan_epoch(progress=None):  # what the trainer reports when the loss is NaN
                    row = orig(progress)
                    row["train_loss"], row["nonfinite"] = float("nan"), True
                    return row

                self.trainer.train_epoch = nan_epoch
                try:
                    return real(self, epochs, policy)
                finally:
                    del self.trainer.train_epoch
        return real(self, epochs, policy)

    monkeypatch.setattr(members_mod.Member, "train", train)
    return calls


def test_member_error_is_retried_from_last_good_state(reference, tmp_path, monkeypatch):
    out, s = reference
    calls = patch_member_train(monkeypatch, 1, {2}, "raise")  # round 2 fails once, its retry succeeds
    r = search_from_config(config(tmp_path / "f"), verbose=False)
    assert calls[1] == 4
    # the retry started from the round's saved state, random streams included: nothing changed
    assert outputs(tmp_path / "f") == outputs(out)
    assert r["final_val_acc"] == s["final_val_acc"]
    events = [json.loads(l) for l in (tmp_path / "f" / "events.jsonl").read_text().splitlines()]
    assert [(e["event"], e.get("member")) for e in events] == [("member_error", 1), ("member_retry_ok", 1)]
    assert "injected fault" in events[0]["error"] and events[0]["epoch"] == 2


@pytest.mark.parametrize("mode", ["raise", "nan"])
def test_member_failing_twice_is_replaced_by_a_top_member(tmp_path, monkeypatch, mode):
    calls = patch_member_train(monkeypatch, 2, {1, 2}, mode)  # round 1 and its retry fail
    r = search_from_config(config(tmp_path / "f"), verbose=False)
    assert calls[2] == 4  # round 1 + retry, rounds 2 and 3
    events = [json.loads(l) for l in (tmp_path / "f" / "events.jsonl").read_text().splitlines()]
    assert [(e["event"], e.get("member")) for e in events] == [
        ("member_error", 2), ("member_failed", 2), ("member_replaced", 2)]
    assert ("NonFiniteLoss" if mode == "nan" else "injected fault") in events[0]["error"]
    assert r["replacements"] == 1 and r["exploits"] == 2
    rows = list(csv.DictReader(open(tmp_path / "f" / "rewards.csv")))
    assert not [x for x in rows if x["member"] == "2" and int(x["epoch"]) <= 2]  # no reward for the failed round
    assert len([x for x in rows if x["member"] == "2"]) == 4
    glob = [json.loads(l) for l in (tmp_path / "f" / "pbt_global.txt").read_text().splitlines()]
    first = [g for g in glob if g[2] == 2]
    assert len(first) == 2 and {g[0] for g in first} >= {"2"}  # the bottom member and the failed one
    repl = next(g for g in first if g[0] == "2")
    assert repl[1] != "2"
    log2 = tmp_path / "f" / "pbt_policy_2.txt"
    lineage = pba_parse_log(log2, 6)
    assert Schedule.load(log2, epochs=6).policies == lineage
    assert lineage[:2] == [list(ZERO_POLICY)] * 2  # the clone's lineage before the replacement
    if not any(g[0] == "2" and g[2] == 4 for g in glob):  # not exploited again at epoch 4
        own = sorted((int(x["epoch"]), parse_policy_string(x["policy"])) for x in rows if x["member"] == "2")
        assert lineage[2:4] == [repl[5]["hp_policy"]] * 2
        assert lineage[2:] == [p for _, p in own]


def test_ray_executor_gives_the_same_search(reference, tmp_path, local_ray):
    out, s = reference
    # every member is a live actor: 4 members x 1 CPU do not fit 2 CPUs -> a clear error first
    with pytest.raises(UserError, match="ray_num_cpus"):
        search_from_config(config(tmp_path / "x", "search.executor=ray"), verbose=False)
    r = search_from_config(config(tmp_path / "ray", "search.executor=ray", "search.ray_num_cpus=0.5"),
                           verbose=False)
    assert local_ray.is_initialized()  # the search left the shared instance running
    assert r["executor"] == "ray"
    assert outputs(tmp_path / "ray") == outputs(out)
    assert r["final_val_acc"] == s["final_val_acc"] and r["best_test_acc"] == s["best_test_acc"]


# The student-role search (KD from a frozen teacher) is tested in test_search_behaviour.py
# (test_student_role_search_distills_from_the_frozen_teacher).


def test_evaluating_only_where_pbt_reads_the_reward_gives_the_same_search(reference, tmp_path):
    """By default members evaluate the validation split only at the end of each round (where the controller
    reads the reward); per-epoch evaluation (search.eval_every=1) must not change any decision: the same
    exploits, logs, schedule and rewards, and more evaluated rows."""
    out, s = reference
    every = search_from_config(config(tmp_path / "e", "search.eval_every=1"), verbose=False)
    a, b = outputs(out), outputs(tmp_path / "e")
    assert a.pop("rewards.csv") != b.pop("rewards.csv") and a == b
    assert every["final_val_acc"] == s["final_val_acc"] and every["best_test_acc"] == s["best_test_acc"]
    ref_rows = list(csv.DictReader(open(out / "rewards.csv")))
    all_rows = list(csv.DictReader(open(tmp_path / "e" / "rewards.csv")))
    assert all(r["val_acc"] for r in all_rows)  # every epoch evaluated
    evaluated = [(r["epoch"], r["member"]) for r in ref_rows if r["val_acc"]]
    assert evaluated == [(r["epoch"], r["member"]) for r in all_rows if int(r["epoch"]) % 2 == 0]  # round ends
    for r, q in zip(ref_rows, all_rows):
        if r["val_acc"]:
            assert (r["val_acc"], r["val_loss"]) == (q["val_acc"], q["val_loss"])
        assert (r["train_loss"], r["policy"]) == (q["train_loss"], q["policy"])


# ---------------------------------------------------------------------------------------- wiring of the search
@pytest.mark.parametrize("q", [0.25, 0.5])
def test_search_quantile_and_explore_reach_the_members(tmp_path, q):
    """End to end, 8 members perturbed after every epoch: ``search.quantile`` sets how many members each
    perturbation replaces (8 members: 2 at 0.25, 4 at 0.5; at 4 members a rule that floors instead of
    ceiling or that ignores the fraction can hide), every exploit's new policy differs from the policy it
    cloned (explore ran), the clone's policy is what the cloned member trained with, and the target trains
    its next epoch with the explored policy (rewards.csv, one row per member and epoch)."""
    out = tmp_path / "s"
    search_from_config(config(out, "search.population=8", "search.epochs=3", "search.perturb_interval=1",
                              f"search.quantile={q}", "data.train_size=128", "data.val_size=128",
                              "train.batch_size=64"), verbose=False)
    lines = [ast.literal_eval(line) for line in (out / "pbt_global.txt").read_text().splitlines()]
    rows = {(int(r["member"]), int(r["epoch"])): parse_policy_string(r["policy"])
            for r in csv.DictReader(open(out / "rewards.csv"))}
    per_round = {}
    for target, clone, it, _, old, new in lines:
        per_round[it] = per_round.get(it, 0) + 1
        assert new["hp_policy"] != old["hp_policy"], "an exploit without explore"
        assert old["hp_policy"] == rows[(int(clone), it)], "the old policy is not the clone's"
        assert new["hp_policy"] == rows[(int(target), it + 1)], "the target did not train with its new policy"
    assert per_round == {1: {0.25: 2, 0.5: 4}[q], 2: {0.25: 2, 0.5: 4}[q]}


def test_student_search_members_quantize_weights_and_activations_as_configured(tmp_path):
    """A student-role search member's network is the student's: the activations entering a block's second
    conv take only the levels k / 7 in [0, 1] of ``a_bits=3``, and the conv computes with the 2-bit DoReFa
    weights of ``w_bits=2`` (its output = a plain convolution of its input with ``quantize_weight(w, 2)``,
    whose values are the levels (2k - 3) / 3). A member built without the student's bits fails both."""
    import torch.nn.functional as F

    from rolekd.experiment import MemberFactory, train_from_config
    from rolekd.quant import quantize_weight
    from rolekd.search import member_config
    from rolekd.search.run import search_config

    teacher = tmp_path / "t"
    train_from_config(config(teacher, "train.epochs=1", "data.max_train=256"))
    cfg = search_config(config(tmp_path / "s", "search.role=student", f"kd.teacher={teacher}", "kd.method=soft",
                               "quant.w_bits=2", "quant.a_bits=3"))
    member = MemberFactory()(member_config(cfg, 1), 1, lambda e: None)
    conv2 = member.model.layer2[0].conv2
    seen = {}
    conv2.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach(), y=out.detach()))
    member.model.eval()
    with torch.no_grad():
        x, _ = next(iter(member.eval_loaders["val"]))
        member.model(x)
    a = seen["x"] * 7
    assert seen["x"].min() >= 0 and seen["x"].max() <= 1
    assert torch.allclose(a, a.round(), atol=1e-4) and len(torch.unique(a.round())) <= 8
    wq = quantize_weight(conv2.weight.detach(), 2)
    assert set(torch.unique((wq * 3).round()).tolist()) <= {-3.0, -1.0, 1.0, 3.0}
    want = F.conv2d(seen["x"], wq, stride=conv2.stride, padding=conv2.padding)
    scale = want.abs().max()
    assert torch.allclose(seen["y"], want, atol=1e-4 * scale)
    assert not torch.allclose(seen["y"], F.conv2d(seen["x"], conv2.weight, stride=conv2.stride,
                                                  padding=conv2.padding), atol=1e-2 * scale)
