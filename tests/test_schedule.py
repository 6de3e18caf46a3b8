"""Schedules: PBA / Ray Tune PBT log import, JSON format, plots and the `schedule` CLI."""

from __future__ import annotations

import argparse
import ast
import json
import random
from pathlib import Path

import numpy as np
import pytest

from rolekd import schedule_cli
from rolekd.plots import op_curves, plot_schedule, plot_schedules_side_by_side
from rolekd.augment.schedule import PbtEvent, Schedule, write_pbt_log
from rolekd.augment.space import OPS, POLICY_LEN
from rolekd.errors import UserError

PBA_FILES = {"rcifar10_16_wrn.txt": 200, "rsvhn_16_wrn.txt": 160}
ROLEKD_FILES = [f"pbt_policy_{i}.txt" for i in range(16)] + ["pbt_global.txt"]


def fixture_cases(shared: Path) -> list[tuple[Path, int]]:
    cases = [(shared / "fixtures" / "pba" / n, e) for n, e in PBA_FILES.items()]
    cases += [(shared / "fixtures" / "role-kd" / n, 200) for n in ROLEKD_FILES]
    # every log in the fixture folders is covered (2 PBA + 16 per-trial role-kd + pbt_global)
    on_disk = sorted((shared / "fixtures").glob("*/*.txt"))
    assert sorted(p for p, _ in cases) == on_disk
    return cases


# ---- independent reference: PBA's parse_log + parse_log_schedule, transcribed ---------------

def read_records(path: Path) -> list:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                rows.append(ast.literal_eval(line))
    return rows


def hp(cfg):
    return list(cfg["hp_policy"]) if isinstance(cfg, dict) else list(cfg)


def reference_schedule(rows: list, epochs: int, multiplier: float = 1) -> list[list[int]]:
    """PBA's parser: cut at the last broken link (target_i != clone_{i+1}), then segments."""
    breaks = [i for i in range(len(rows) - 1) if rows[i][0] != rows[i + 1][1]]
    if breaks:
        rows = rows[breaks[-1] + 1:]
    policy = [[rows[0][3], hp(rows[0][4])]]
    for i in range(len(rows) - 1):
        policy.append([rows[i + 1][3] - rows[i][3], hp(rows[i][5])])
    policy.append([epochs - rows[-1][3], hp(rows[-1][5])])
    schedule = []
    for n, pol in policy:
        for _ in range(int(n * multiplier)):
            schedule.append(pol)
    for _ in range(int(epochs * multiplier) - len(schedule)):
        schedule.append(policy[-1][1])
    return schedule


def lookup_schedule(rows: list, epochs: int, multiplier: int = 1) -> list[list[int]]:
    """A second, per-epoch formulation (integer multipliers): training epoch t is search epoch
    t // multiplier, which runs the first kept line's old policy before its clone_iter and
    otherwise the new policy of the last kept line whose clone_iter <= that epoch."""
    keep = len(rows) - 1
    while keep > 0 and rows[keep - 1][0] == rows[keep][1]:
        keep -= 1
    rows = rows[keep:]
    out = []
    for t in range(epochs * multiplier):
        e = t // multiplier
        started = [r for r in rows if r[3] <= e]
        out.append(hp(started[-1][5]) if started else hp(rows[0][4]))
    return out


def rand_policy(rng: random.Random) -> list[int]:
    return [rng.randint(0, 10) if i % 2 == 0 else rng.randint(0, 9) for i in range(POLICY_LEN)]


# ---- fixtures: every file, fully ----------------------------------------------------------------

def test_all_fixture_files_match_pba_parser(shared_dir):
    cases = fixture_cases(shared_dir)
    assert len(cases) == 19
    for path, epochs in cases:
        rows = read_records(path)
        s = Schedule.load(path, epochs=epochs)
        assert len(s) == epochs, path.name
        expected = reference_schedule(rows, epochs)
        assert s.policies == expected, path.name
        assert s.policies == lookup_schedule(rows, epochs), path.name
        assert Schedule.from_pbt_lines(path.read_text().splitlines(), epochs) == s


def test_fixture_epochs_read_by_hand(shared_dir):
    fx = shared_dir / "fixtures"
    c = Schedule.load(fx / "pba" / "rcifar10_16_wrn.txt", epochs=200)
    # line 1: ['9', '8', 11, 12, zeros, [0, 3, 3, 7, 1, 9, 2, 0, ...]]
    assert c.vector_at(0) == [0] * POLICY_LEN
    assert c.vector_at(11) == [0] * POLICY_LEN
    assert c.vector_at(12)[:8] == [0, 3, 3, 7, 1, 9, 2, 0]
    # line 2: ['7', '9', 35, 34, ..., [3, 0, 3, 8, 3, 2, 0, 6, ...]]; line 3 clone_iter 54
    assert c.vector_at(33)[:8] == [0, 3, 3, 7, 1, 9, 2, 0]
    assert c.vector_at(34)[:8] == [3, 0, 3, 8, 3, 2, 0, 6]
    assert c.vector_at(53)[:8] == [3, 0, 3, 8, 3, 2, 0, 6]
    assert c.vector_at(54)[:8] == [2, 0, 2, 3, 3, 5, 0, 3]

    v = Schedule.load(fx / "pba" / "rsvhn_16_wrn.txt", epochs=160)
    assert v.vector_at(8) == [0] * POLICY_LEN  # line 1 clone_iter 9
    assert v.vector_at(9)[:8] == [0, 0, 1, 3, 1, 3, 0, 0]
    assert v.vector_at(158)[:8] == [0, 3, 9, 0, 0, 5, 10, 7]  # line 12 new, until line 13's 159
    assert v.vector_at(159)[:8] == [8, 2, 9, 0, 0, 0, 7, 4]  # last line's new policy to the end

    # role-kd pbt_policy_0: line 5's target '8' != line 6's clone '2' and line 6's target '8' !=
    # line 7's clone '2' break the chain; PBA cuts at the last break and keeps lines 7..10 only.
    r = Schedule.load(fx / "role-kd" / "pbt_policy_0.txt", epochs=200)
    assert r.meta["first_line_used"] == 7
    assert r.vector_at(0) == [0] * POLICY_LEN  # line 7 ['8', '2', 56, 57]: old policy all zeros
    assert r.vector_at(56) == [0] * POLICY_LEN
    assert r.vector_at(57)[:8] == [3, 2, 6, 2, 3, 1, 9, 3]
    assert r.vector_at(60)[:8] == [2, 7, 5, 0, 3, 0, 6, 8]  # line 8 ['3', '8', 62, 60]
    assert r.vector_at(171)[:8] == [2, 7, 6, 4, 4, 3, 8, 9]  # line 10, clone_iter 171
    assert r.vector_at(199) == r.vector_at(171)

    # pbt_global interleaves all trials: only its last line ['15', '1', 197, 198] survives
    g = Schedule.load(fx / "role-kd" / "pbt_global.txt", epochs=200)
    assert [stop - start for start, stop, _ in g.segments()] == [198, 2]
    assert g.vector_at(0)[:8] == [2, 5, 4, 1, 2, 0, 0, 5]
    assert g.vector_at(198)[:8] == [3, 2, 5, 2, 1, 2, 0, 9]


def test_log_requires_epochs(shared_dir):
    path = shared_dir / "fixtures" / "pba" / "rsvhn_16_wrn.txt"
    with pytest.raises(UserError, match="--epochs") as e:
        Schedule.load(path)
    assert str(path) in str(e.value)


# ---- multiplier ---------------------------------------------------------------------------------

def test_multiplier_repeats_each_policy(shared_dir):
    path = shared_dir / "fixtures" / "pba" / "rcifar10_16_wrn.txt"
    s1 = Schedule.load(path, epochs=200)
    s2 = Schedule.load(path, epochs=200, multiplier=2)
    assert len(s2) == 400
    for e in range(200):
        assert s2.vector_at(2 * e) == s2.vector_at(2 * e + 1) == s1.vector_at(e)
    assert s2.policies == lookup_schedule(read_records(path), 200, 2)
    # a rolekd JSON schedule stretches the same way
    assert s1.stretched(2) == s2


def test_fractional_multiplier_uses_pba_rounding(shared_dir):
    path = shared_dir / "fixtures" / "pba" / "rsvhn_16_wrn.txt"
    s = Schedule.load(path, epochs=160, multiplier=1.5)
    assert len(s) == 240
    assert s.policies == reference_schedule(read_records(path), 160, 1.5)
    # int(n * 1.5) per segment loses epochs; PBA pads with the last policy
    rows = read_records(path)
    lost = 240 - sum(int(n * 1.5) for n in [rows[0][3]] + [rows[i + 1][3] - rows[i][3] for i in range(12)]
                     + [160 - rows[-1][3]])
    assert lost > 0
    assert all(p == hp(rows[-1][5]) for p in s.policies[-lost - 1:])


# ---- JSON format, constant, vector_at -----------------------------------------------------------

def test_json_round_trip(tmp_path, shared_dir):
    s = Schedule.load(shared_dir / "fixtures" / "role-kd" / "pbt_policy_2.txt", epochs=200)
    out = tmp_path / "sched.json"
    s.save(out)
    raw = json.loads(out.read_text())
    assert raw["format"] == "rolekd-schedule" and raw["version"] == 1
    assert raw["ops"] == list(OPS)
    assert len(raw["policies"]) == 200 and all(len(p) == 60 for p in raw["policies"])
    back = Schedule.load(out)
    assert back == s
    assert back.meta == s.meta and back.source == s.source
    assert Schedule.load(out, epochs=200) == s
    with pytest.raises(UserError, match="holds 200 epochs"):
        Schedule.load(out, epochs=100)
    # a schedule differing in one epoch is not equal
    pols = s.policies
    pols[100][0] = (pols[100][0] + 1) % 11
    assert Schedule(pols) != s


def test_constant_and_vector_at():
    rng = random.Random(0)
    v = rand_policy(rng)
    s = Schedule.constant(v, 5)
    assert len(s) == 5 and s.policies == [v] * 5
    assert s == Schedule([v] * 5) and s != Schedule.constant(v, 6)
    w = rand_policy(rng)
    t = Schedule([v, v, w])
    assert t.vector_at(1) == v and t.vector_at(2) == w
    assert t.vector_at(3) == w and t.vector_at(10_000) == w  # past the end: last policy
    with pytest.raises(ValueError):
        t.vector_at(-1)
    assert t.segments() == [(0, 2, v), (2, 3, w)]
    got = t.vector_at(0)
    got[0] = 99  # callers get copies
    assert t.vector_at(0) == v
    with pytest.raises(ValueError):
        Schedule.constant(v[:59], 3)
    with pytest.raises(ValueError):
        Schedule([])


# ---- write_pbt_log ------------------------------------------------------------------------------

def test_write_pbt_log_round_trip(tmp_path):
    rng = random.Random(1)
    X, Y, A, B, C, D = (rand_policy(rng) for _ in range(6))
    events = [
        PbtEvent("5", "6", 1, 2, X, Y),  # broken link ('5' != next clone '0'): dropped, as PBA does
        PbtEvent("1", "0", 4, 5, {"hp_policy": A, "lr": 0.1}, {"hp_policy": B, "lr": 0.1}),
        PbtEvent("2", "1", 9, 10, B, C),
        ("0", "2", 15, 14, C, D),
    ]
    log = tmp_path / "logs" / "pbt_policy_0.txt"
    write_pbt_log(log, events[:2])
    write_pbt_log(log, events[2:], append=True)
    lines = log.read_text().splitlines()
    assert len(lines) == 4
    first = json.loads(lines[1])
    assert first[:4] == ["1", "0", 4, 5] and first[4]["lr"] == 0.1 and first[5]["hp_policy"] == B
    assert json.loads(lines[2])[4] == {"hp_policy": B}

    s = Schedule.load(log, epochs=20)
    assert s.policies == [A] * 5 + [B] * 5 + [C] * 4 + [D] * 6
    assert Schedule.load(log, epochs=20, multiplier=3).policies == [A] * 15 + [B] * 15 + [C] * 12 + [D] * 18
    assert Schedule.from_pbt_records(events, 20) == s

    with pytest.raises(ValueError):
        write_pbt_log(tmp_path / "bad.txt", [("1", "0", 4, 5, A, A[:10])])


# ---- bad files ----------------------------------------------------------------------------------

def pba_line(target="1", clone="0", t_iter=3, c_iter=4, old=None, new=None):
    old = [0] * 60 if old is None else old
    new = [1] * 60 if new is None else new
    return repr([target, clone, t_iter, c_iter, old, new])


def assert_user_error(path, line: int | None, *needles: str, **kw):
    with pytest.raises(UserError) as e:
        Schedule.load(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(path) in msg
    if line is not None:
        assert f"{path}:{line}:" in msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_bad_log_files(tmp_path):
    good1 = pba_line("1", "0", 3, 4)
    good2 = pba_line("2", "1", 7, 8)

    f = tmp_path / "garbage.txt"
    f.write_text(good1 + "\n" + good2 + "\n[1, 2, oops\n")
    assert_user_error(f, 3, "truncated", epochs=20)

    f = tmp_path / "cut.txt"
    f.write_text(good1 + "\n" + good2[: len(good2) // 2])
    assert_user_error(f, 2, "truncated", epochs=20)

    f = tmp_path / "fields.txt"
    f.write_text(good1 + "\n" + repr(["2", "1", 7, [0] * 60, [1] * 60]) + "\n")
    assert_user_error(f, 2, "6 fields", epochs=20)

    f = tmp_path / "short.txt"
    f.write_text(good1 + "\n" + pba_line("2", "1", 7, 8, new=[1] * 59) + "\n")
    assert_user_error(f, 2, "new_config", "60", epochs=20)

    bad = [1] * 60
    bad[6] = 11  # Invert probability 1.1
    f = tmp_path / "range.txt"
    f.write_text("\n" + pba_line(old=bad) + "\n")  # blank lines still count for numbering
    assert_user_error(f, 2, "old_config", "policy[6]", epochs=20)

    f = tmp_path / "nohp.txt"
    f.write_text(json.dumps(["1", "0", 3, 4, {"lr": 1}, {"hp_policy": [0] * 60}]) + "\n")
    assert_user_error(f, 1, "hp_policy", epochs=20)

    f = tmp_path / "order.txt"
    f.write_text(pba_line("1", "0", 9, 10) + "\n" + pba_line("2", "1", 5, 6) + "\n")
    assert_user_error(f, 2, "clone_iter 6", epochs=20)

    f = tmp_path / "toolong.txt"
    f.write_text(good1 + "\n" + pba_line("2", "1", 30, 31) + "\n")
    assert_user_error(f, 2, "--epochs", epochs=20)

    f = tmp_path / "iter.txt"
    f.write_text(pba_line(c_iter="4") + "\n")
    assert_user_error(f, 1, "clone_iter", epochs=20)


def test_empty_missing_and_unknown_files(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("")
    assert_user_error(f, 1, "empty", epochs=20)
    f.write_text("\n  \n")
    assert_user_error(f, 1, "empty", epochs=20)
    assert_user_error(tmp_path / "nope.json", None, "no such file")
    f = tmp_path / "weird.txt"
    f.write_text("\n\nhello\n")
    assert_user_error(f, 3, "unknown schedule format", epochs=20)


def test_bad_json_schedules(tmp_path):
    rng = random.Random(2)
    s = Schedule([rand_policy(rng) for _ in range(12)], source="x")
    good = tmp_path / "good.json"
    s.save(good)
    text = good.read_text()

    cut = tmp_path / "cut.json"
    cut.write_text(text[: len(text) // 2])
    expected_line = text[: len(text) // 2].rstrip().count("\n") + 1
    assert_user_error(cut, expected_line, "truncated")

    # break epoch 7's policy: the error names the line that holds it
    lines = text.splitlines()
    idx = next(i for i, ln in enumerate(lines) if ln.strip().rstrip(",") == json.dumps(s.policies[7]))
    broken = s.policies[7]
    broken[1] = 12  # Rotate magnitude 12
    lines[idx] = lines[idx].replace(json.dumps(s.policies[7]), json.dumps(broken))
    bad = tmp_path / "range.json"
    bad.write_text("\n".join(lines))
    assert_user_error(bad, idx + 1, "epoch 7", "policy[1]")

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "something", "policies": []}))
    assert_user_error(other, 1, "rolekd-schedule")
    newer = tmp_path / "v2.json"
    newer.write_text(json.dumps(dict(json.loads(text), version=2)))
    assert_user_error(newer, 1, "version 2")


# ---- plots --------------------------------------------------------------------------------------

def png_info(path: Path):
    from PIL import Image

    assert path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        px = np.asarray(im.convert("RGB")).reshape(-1, 3)
        return im.size, len(np.unique(px, axis=0))


def test_op_curves_values():
    p1 = [0] * 60
    p1[0], p1[30] = 4, 2  # Rotate p=.4 / .2 -> mean .3
    p1[1], p1[31] = 6, 3  # Rotate m=6 / 3 -> mean 4.5
    p1[26] = 1  # Cutout copy 1 p=.1 -> mean .05
    p2 = [2 * x if i % 2 == 0 else x for i, x in enumerate(p1)]  # probabilities doubled: sum .7
    prob, mag = op_curves(Schedule([p1, p2]))
    assert prob.shape == mag.shape == (2, 15)
    rot, cut = OPS.index("Rotate"), OPS.index("Cutout")
    assert prob[0, rot] == pytest.approx(0.3 / 0.7) and prob[1, rot] == pytest.approx(0.6 / 0.7)
    assert prob[0, cut] == pytest.approx(0.05 / 0.7)
    assert prob.sum(axis=1).max() == pytest.approx(1.0)
    assert mag[0, rot] == pytest.approx(4.5) and mag[1, rot] == pytest.approx(4.5)
    assert prob[:, OPS.index("Contrast")].tolist() == [0, 0]


def test_plot_writes_png(tmp_path, shared_dir):
    s = Schedule.load(shared_dir / "fixtures" / "pba" / "rsvhn_16_wrn.txt", epochs=160)
    out = tmp_path / "fig" / "sched.png"
    plot_schedule(s, out, title="SVHN", figsize=(6, 3), dpi=50)
    size, colors = png_info(out)
    assert size == (300, 150)
    assert colors > 10  # 15 coloured lines, not a blank canvas
    out2 = tmp_path / "list.png"
    plot_schedule(s.policies[:20], out2)
    assert png_info(out2)[0] == (1200, 450)
    both = tmp_path / "both.png"
    plot_schedules_side_by_side({"teacher": s, "student": Schedule.constant([1] * 60, 50)}, both, dpi=40)
    assert png_info(both)[0] == (int((5.5 * 2 + 2) * 40), 7 * 40)


# ---- CLI ----------------------------------------------------------------------------------------

def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rolekd")
    schedule_cli.register(ap.add_subparsers(dest="command"))
    return ap


def run_cli(*argv: str) -> int:
    args = make_parser().parse_args([str(a) for a in argv])
    return args.func(args)


def test_cli_import(tmp_path, shared_dir, capsys):
    log = shared_dir / "fixtures" / "role-kd" / "pbt_policy_5.txt"
    out = tmp_path / "student.json"
    assert run_cli("schedule", "import", log, "--epochs", "200", "--multiplier", "2", "-o", out) == 0
    assert str(out) in capsys.readouterr().out
    got = Schedule.load(out)
    assert len(got) == 400 and got == Schedule.load(log, epochs=200, multiplier=2)
    with pytest.raises(UserError, match="--force"):
        run_cli("schedule", "import", log, "--epochs", "200", "-o", out)
    assert len(Schedule.load(out)) == 400  # untouched
    assert run_cli("schedule", "import", log, "--epochs", "200", "-o", out, "--force") == 0
    assert Schedule.load(out) == Schedule.load(log, epochs=200)
    with pytest.raises(SystemExit):  # --epochs is required for import
        make_parser().parse_args(["schedule", "import", str(log), "-o", str(tmp_path / "x.json")])
    with pytest.raises(UserError, match="no such file"):
        run_cli("schedule", "import", tmp_path / "missing.txt", "--epochs", "200", "-o", tmp_path / "y.json")


def test_cli_show(tmp_path, capsys):
    a = [0] * 60
    a[0], a[1] = 3, 5  # copy 1: Rotate p=0.3 m=5
    a[30 + 26], a[30 + 27] = 10, 9  # copy 2: Cutout p=1.0 m=9
    a[3] = 7  # TranslateX magnitude without probability: not shown
    b = [0] * 60
    b[28], b[29] = 2, 1  # copy 1: Contrast p=0.2 m=1
    f = tmp_path / "s.json"
    Schedule([a] * 3 + [[0] * 60] * 2 + [b] * 5).save(f)
    assert run_cli("schedule", "show", f) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "10 epochs in 3 segments" in lines[0]
    assert lines[1:] == [
        "epochs 0-2 (3):",
        "  copy 1: Rotate p=0.3 m=5",
        "  copy 2: Cutout p=1.0 m=9",
        "epochs 3-4 (2): no augmentation",
        "epochs 5-9 (5):",
        "  copy 1: Contrast p=0.2 m=1",
        "  copy 2: -",
    ]
    assert run_cli("schedule", "show", f, "--multiplier", "2") == 0
    out = capsys.readouterr().out
    assert "epochs 0-5 (6):" in out and "epochs 10-19 (10):" in out


def test_cli_show_log_and_plot(tmp_path, shared_dir, capsys):
    log = shared_dir / "fixtures" / "role-kd" / "pbt_policy_0.txt"
    with pytest.raises(UserError, match="--epochs"):
        run_cli("schedule", "show", log)
    assert run_cli("schedule", "show", log, "--epochs", "200") == 0
    out = capsys.readouterr().out
    segs = Schedule.load(log, epochs=200).segments()
    ranges = [ln.split(" (")[0] for ln in out.splitlines() if ln.startswith("epoch")]
    assert ranges == [f"epochs {a}-{b - 1}" for a, b, _ in segs]
    assert "epochs 0-56 (57): no augmentation" in out
    assert "  copy 1: Rotate p=0.3 m=2, TranslateX p=0.6 m=2," in out  # line 7's new policy

    fig = tmp_path / "fig.png"
    assert run_cli("schedule", "plot", log, "--epochs", "200", "-o", fig) == 0
    assert png_info(fig)[0] == (1200, 450)


def test_fit_to_maps_a_search_onto_any_training_length():
    from rolekd.augment.schedule import Schedule as S

    pols = [[i] + [0] * 59 for i in range(6)]
    s = S(pols)
    # integer ratio: the same as PBA's multiplier
    assert s.fit_to(12) == s.stretched(2)
    # 6 searched epochs over 10: epoch e uses searched epoch floor(6 e / 10), every policy keeps its share
    assert [p[0] for p in s.fit_to(10).policies] == [(6 * e) // 10 for e in range(10)]
    assert [p[0] for p in s.fit_to(4).policies] == [0, 1, 3, 4]
