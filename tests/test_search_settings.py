"""The search settings for small budgets (issue 31): each one against a hand-computed expectation, PBA's
behaviour one setting away (the defaults), and end to end from ``key=value`` to what the members train with
and what the search writes."""

import csv
import io
import json
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch
from torch import nn

from rolekd.augment.space import MAX_LEVEL, MAX_PROB, POLICY_LEN
from rolekd.config import load_config
from rolekd.experiment import search_from_config
from rolekd.models import register_model
from rolekd.pipeline.run import pipeline_config, stage_runs, stretch_warnings
from rolekd.search import PBTController
from rolekd.search.pbt import MIN_ROUNDS, ZERO_POLICY, perturbation_rounds, too_short

from conftest import register_noise_dataset


def _controller(rounds, **kw) -> PBTController:
    """A controller fed ``rounds`` (a list of per-member reward lists), perturbing after every round but
    the last, with 3 epochs per round."""
    c = PBTController(len(rounds[0]), 0.25, 0.2, seed=kw.pop("seed", 0), **kw)
    for k, rewards in enumerate(rounds):
        for i, r in enumerate(rewards):
            c.record(i, 3, r)
        if k < len(rounds) - 1:
            c.perturb(3 * (k + 1))
    return c


# ---------------------------------------------------------------------------------------- reward window
def test_window_1_ranks_by_the_latest_reward_as_pba():
    c = _controller([[0.9, 0.1, 0.5, 0.6], [0.1, 0.9, 0.5, 0.6]], reward_window=1)
    assert c.scores() == c.rewards == [0.1, 0.9, 0.5, 0.6]
    assert c.best() == 1


def test_window_3_ranks_and_picks_by_the_mean_of_the_last_three_round_rewards():
    # 8 members, 4 rounds, rewards chosen so that no exploit happens in rounds 1-3 (the bottom two are the
    # same low members, 6 and 7, who copy members that keep their own histories) -- computed by hand below
    rounds = [[0.50, 0.40, 0.45, 0.44, 0.43, 0.42, 0.10, 0.11],
              [0.30, 0.41, 0.46, 0.44, 0.43, 0.42, 0.12, 0.10],
              [0.31, 0.42, 0.47, 0.44, 0.43, 0.42, 0.11, 0.12],
              [0.60, 0.43, 0.48, 0.44, 0.43, 0.42, 0.13, 0.14]]
    c = PBTController(8, 0.25, 0.2, seed=0, reward_window=3)
    for i in range(8):
        c.record(i, 3, rounds[0][i])
    for k in (1, 2, 3):
        steps = c.perturb(3 * k)
        assert sorted(s.target for s in steps) == [6, 7]
        for i in range(8):
            c.record(i, 3, rounds[k][i])
    # members 0..5 were never exploited: their own last three rewards
    want = [np.mean([rounds[k][i] for k in (1, 2, 3)]) for i in range(6)]
    assert c.scores()[:6] == pytest.approx(want, abs=1e-15)
    # member 0's latest reward is the best (0.60) but its 3-round mean (0.403) is below member 2's (0.47)
    assert c.rewards[0] == max(c.rewards)
    assert c.best() == 2
    bottom, top = c.quantiles()
    assert set(top) == {2, 3}  # 0.47, 0.44 -- not member 0 (0.403), which the latest reward would rank first
    assert PBTController.scores(c) != c.rewards


def test_an_exploited_member_inherits_its_clones_reward_history():
    c = PBTController(4, 0.25, 0.2, seed=3, reward_window=3)
    hist = {0: [0.3, 0.35], 1: [0.8, 0.9], 2: [0.2, 0.1], 3: [0.5, 0.5]}
    for k in range(2):
        for i in range(4):
            c.record(i, 3, hist[i][k])
        if k == 0:
            assert c.perturb(3)[0].target == 2  # the worst copies the best (4 members: quantile 1)
            hist[2] = [0.8, 0.1]  # member 2 now has member 1's first reward, then its own second
    assert c.reward_history[2] == [0.8, 0.1] and c.scores()[2] == pytest.approx(0.45)
    (step,) = c.perturb(6)  # 3-round means: 0.325, 0.85, 0.45, 0.5 -> member 0 copies member 1
    assert (step.target, step.clone) == (0, 1)
    assert c.reward_history[0] == [0.8, 0.9] and c.reward_history[0] is not c.reward_history[1]
    assert c.scores()[0] == pytest.approx(0.85)


def test_the_window_survives_a_saved_state():
    c = _controller([[0.5, 0.4, 0.3, 0.2], [0.1, 0.6, 0.2, 0.3], [0.2, 0.5, 0.4, 0.1]], reward_window=2)
    d = PBTController(4, 0.25, 0.2, seed=0, reward_window=2)
    d.load_state_dict(json.loads(json.dumps(c.state_dict())))
    assert d.scores() == c.scores() and d.reward_history == c.reward_history
    with pytest.raises(ValueError, match="reward_window"):
        PBTController(4, 0.25, 0.2, seed=0).load_state_dict(c.state_dict())


# ---------------------------------------------------------------------------------------- random start
def test_random_start_is_uniform_seeded_and_leaves_the_explore_stream_as_with_zero():
    n = 400
    a = PBTController(n, 0.25, 0.2, seed=7, init="random")
    b = PBTController(n, 0.25, 0.2, seed=7, init="random")
    other = PBTController(n, 0.25, 0.2, seed=8, init="random")
    assert a.policies == b.policies  # seeded
    assert a.policies != other.policies
    assert len({tuple(p) for p in a.policies}) == n  # each member its own policy
    vals = np.array(a.policies)
    assert vals.shape == (n, POLICY_LEN)
    # uniform over each int's range (probabilities 0..10 at even positions, magnitudes 0..9 at odd ones):
    # chi-square over all members and positions of one parity, 0.999 quantiles (df 10: 29.59, df 9: 27.88)
    for parity, hi, crit in ((0, MAX_PROB, 29.59), (1, MAX_LEVEL, 27.88)):
        x = vals[:, parity::2].ravel()
        counts = np.bincount(x, minlength=hi + 1)
        assert len(counts) == hi + 1
        expect = len(x) / (hi + 1)
        assert ((counts - expect) ** 2 / expect).sum() < crit, counts
    # the explore stream is the search seed's, as with the all-zero start: the same targets, clones, steps
    z = PBTController(8, 0.25, 0.2, seed=7)
    r = PBTController(8, 0.25, 0.2, seed=7, init="random")
    for c in (z, r):
        for i in range(8):
            c.record(i, 3, i / 10)
    sz, sr = z.perturb(3), r.perturb(3)
    assert [(s.target, s.clone) for s in sz] == [(s.target, s.clone) for s in sr]
    assert z.rng.bit_generator.state == r.rng.bit_generator.state
    assert all(p == list(ZERO_POLICY) for p in PBTController(4, seed=7).policies)


# ---------------------------------------------------------------------------------------- burn-in
def test_no_exploit_before_the_burn_in_but_failed_members_are_still_replaced():
    c = PBTController(8, 0.25, 0.2, seed=0, burn_in=6)
    for i in range(8):
        c.record(i, 3, i / 10)
    assert c.perturb(3) == []
    steps = c.perturb(3, failed=[2])
    assert [(s.target, s.reason) for s in steps] == [(2, "replace")]
    for i in range(8):
        c.record(i, 3, i / 10)
    assert [s.target for s in c.perturb(6)] == [0, 1]  # from epoch 6 on, PBA's exploits


def test_rounds_and_the_too_short_line():
    assert perturbation_rounds(120, 3) == 39  # ends after 3, 6, ..., 117 (none after the last epoch)
    assert perturbation_rounds(30, 3) == 9
    assert perturbation_rounds(12, 1) == 11
    assert perturbation_rounds(120, 3, burn_in=12) == 36  # 12, 15, ..., 117
    assert perturbation_rounds(10, 3) == 3 and perturbation_rounds(9, 3) == 2
    assert "only 9 time(s)" in too_short(30, 3)  # the first evidence study's searches
    assert too_short(3 * (MIN_ROUNDS + 1), 3) is None
    assert too_short(3 * (MIN_ROUNDS + 1), 3, burn_in=6) is not None  # 9 rounds after the burn-in


def test_the_pipeline_says_when_a_schedule_is_stretched(tmp_path):
    cfg = pipeline_config("configs/evidence.yaml", [f"out={tmp_path / 'e'}"])
    lines = stretch_warnings(stage_runs(cfg))
    assert len(lines) == 2 and all("stretched x4" in x and "search.epochs=120" in x for x in lines)
    assert lines[0].startswith("alpha_search searches 30 epochs") and lines[1].startswith("beta_search")
    cfg = pipeline_config("configs/evidence.yaml", [f"out={tmp_path / 'e'}", "search.epochs=120"])
    assert stretch_warnings(stage_runs(cfg)) == []


# ---------------------------------------------------------------------------------------- end to end
@register_model("settings_net")
class _Net(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


DATA = register_noise_dataset("settings_noise", 96, 32, seed=5)


def _search(tmp_path, name, *extra):
    cfg = load_config(None, [f"data.name={DATA}", "model.name=settings_net", "data.train_size=48", "data.val_size=48",
                             "train.batch_size=16", "train.eval_batch_size=48", "augment.cutout=0",
                             "train.progress=false", "train.device=cpu", "search.population=4",
                             "search.perturb_interval=1", f"out={tmp_path / name}", *extra])
    buf = io.StringIO()
    with redirect_stdout(buf):
        summary = search_from_config(cfg)
    with open(tmp_path / name / "rewards.csv") as f:
        rows = list(csv.DictReader(f))
    return summary, rows, buf.getvalue(), tmp_path / name


def test_settings_reach_the_members_and_the_search_says_what_it_did(tmp_path):
    from rolekd.search.pbt import init_generator, policy_string, random_policy

    s, rows, out, rd = _search(tmp_path, "rand", "search.epochs=4", "search.init=random", "search.seed=3",
                               "search.burn_in=2", "search.reward_window=2")
    # init=random: every member's first epoch trained with its own policy drawn from the search seed
    g = init_generator(3)
    want = [policy_string(random_policy(g)) for _ in range(4)]
    first = {int(r["member"]): r["policy"] for r in rows if r["epoch"] == "1"}
    assert [first[i] for i in range(4)] == want
    # burn_in=2: no exploit in the global log before 2 epochs; then one per round (4 members: quantile 1)
    glog = [json.loads(x) for x in (rd / "pbt_global.txt").read_text().splitlines()]
    assert [x[2] for x in glog] == [2, 3]
    # reward_window=2: the final pick is the best mean of the last two round rewards (from rewards.csv; an
    # exploited member's earlier rewards are its clone's)
    hist: dict[int, list[float]] = {i: [] for i in range(4)}
    for epoch in range(1, 5):
        for r in rows:
            if int(r["epoch"]) == epoch:
                hist[int(r["member"])].append(float(r["val_acc"]))
        for target, clone, at, *_ in glog:
            if at == epoch:
                hist[int(target)] = list(hist[int(clone)])
    score = {i: sum(h[-2:]) / len(h[-2:]) for i, h in hist.items()}
    assert s["best_member"] == max(range(4), key=lambda i: (score[i], i))
    assert s["best_score"] == pytest.approx(score[s["best_member"]], abs=1e-12)
    assert s["reward_window"] == 2 and s["init"] == "random" and s["burn_in"] == 2
    assert s["rounds"] == 4 and s["perturbation_rounds"] == 2
    assert "warning: this search perturbs its policies only 2 time(s)" in out
    # the schedule's active epochs, in search.json and the last line
    sched = json.loads((rd / "schedule.json").read_text())
    active = sum(1 for p in sched["policies"] if any(p[i] > 0 for i in range(0, len(p), 2)))
    assert s["schedule_active_epochs"] == active > 0 and s["schedule_empty"] is False
    assert f"its schedule applies ops in {active} of 4 epochs" in out and "4 rounds" in out

    s0, _, out0, _ = _search(tmp_path, "zero", "search.epochs=2")
    assert s0["schedule_empty"] is True and s0["schedule_active_epochs"] == 0
    assert "its schedule is EMPTY" in out0
