"""A PBA search in a run directory: the rounds, the logs, resume, the outputs (``rolekd search``).

:class:`Search` is given the member factory that builds each member's trainer (the experiment
layer's :class:`~rolekd.experiment.MemberFactory`); :func:`rolekd.experiment.search_from_config`
wires it from a config.

The run directory (``cfg.run_dir()``) holds, when the search has finished:

* ``schedule.json`` -- the best member's lineage as a :class:`~rolekd.augment.schedule.Schedule`
  over ``search.epochs`` epochs (``rolekd train ... schedule=RUN/schedule.json`` trains with it);
* ``pbt_policy_<member>.txt`` (one per member; empty when never exploited) and ``pbt_global.txt`` --
  Ray Tune PBT logs, which PBA's ``parse_log_schedule`` and ``Schedule.load(file, epochs=...)`` read;
  the best member's file gives back ``schedule.json``;
* ``rewards.csv`` -- ``epoch`` (epochs trained, 1-based), ``member``, ``val_acc`` (empty in epochs
  not evaluated), ``val_loss``, ``train_loss``, ``train_acc``, ``train_kd_loss`` (the epoch's mean
  unweighted KD loss of a ``role=student`` member; empty without KD), ``policy`` (the epoch's policy
  as 60 characters, ``a`` = 10);
* ``events.jsonl`` -- exploits, member failures, retries, replacements, resumptions;
* ``search.json`` -- the summary (best member and reward, its test accuracy, exploit count, timings);
* ``rewards.png`` and ``schedule.png``; ``best_model.safetensors`` (the best member's weights);
* ``config.yaml``.

While it runs, ``search_state/`` holds the state at the last perturbation (controller JSON incl. its
random generator, and every member's full trainer state as weights-only-loadable ``torch.save``
files); rerunning the same command resumes from there and ends with the same result as an
uninterrupted run. It is deleted when the search has finished. A state is published by one atomic
write of ``search_state/LATEST`` after its directory is complete and flushed to disk, so a kill at any
instant leaves the previous state or the new one; a state that lacks a part is an error, never a
fresh start.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable, Mapping

from ..augment.schedule import Schedule
from ..config import Config, derive
from ..errors import UserError
from ..files import atomic_write, fsync_dir, load_state, read_summary, save_state, save_tensors
from ..plots import plot_rewards, plot_schedule
from ..train import resolve_device
from .fused import FusedExecutor, fused_unsupported
from .members import LocalExecutor, MemberFactory, Outcome, member_config
from .pbt import PBTController, perturbation_rounds, policy_string, too_short
from .ray_executor import RayExecutor

STATE_DIR = "search_state"
STATE_VERSION = 1
REWARD_FIELDS = ["epoch", "member", "val_acc", "val_loss", "train_loss", "train_acc", "train_kd_loss", "policy"]

RoundHook = Callable[[dict], None]


def executor_kind(cfg: Config) -> str:
    """The executor ``search.executor`` names: ``auto`` is ``fused`` on CUDA, ``local`` on CPU."""
    kind = cfg.search.executor
    if kind == "auto":
        return "fused" if resolve_device(cfg.train.device).type == "cuda" else "local"
    return kind


def make_executor(cfg: Config, factory: MemberFactory, verbose: bool = True):
    kind = executor_kind(cfg)
    if kind == "ray":
        return RayExecutor.from_config(cfg, factory)
    if kind == "fused":
        # auto: members that cannot be fused train one after another (a note), never an error
        return FusedExecutor(factory, fallback=cfg.search.executor == "auto", verbose=verbose)
    return LocalExecutor(factory)


def search_config(cfg: Config) -> Config:
    """The config a search runs with: ``data.split=reduced``; role ``student`` checked, and that an
    explicitly fused search (``search.executor=fused``, or Ray groups of ``search.ray_group_size`` > 1)
    can be fused."""
    if cfg.search.role == "student":
        if not cfg.kd.teacher:
            raise UserError("search role=student needs the frozen teacher: pass teacher=RUN_DIR (a finished "
                            "teacher run) or teacher=FILE.safetensors")
        if not cfg.kd.method:
            raise UserError("search role=student needs a KD method: pass method=soft|dml|rkd|kdsvd|mhgd|iikd")
    s = cfg.search
    if s.executor == "fused" or (s.executor == "ray" and s.ray_group_size > 1):
        why = fused_unsupported(cfg)
        if why:
            how = "search.executor=local" if s.executor == "fused" else "search.ray_group_size=1"
            raise UserError(f"search.executor={s.executor}{'' if s.executor == 'fused' else ' with fused groups'}: "
                            f"{why}; use {how}")
    return derive(cfg, "search config", data={"split": "reduced"})


def finished_search(run_dir: Path, verbose: bool = True) -> dict | None:
    """``search.json`` of a finished search in ``run_dir`` (None when it has not finished)."""
    summary = read_summary(Path(run_dir) / "search.json", "delete it (the search will be finished again from its "
                           "last saved state, or from the start)")
    if summary is None:
        return None
    if verbose:
        print(f"{run_dir}: search already finished (best member {summary.get('best_member')}, val acc "
              f"{summary.get('best_val_acc', float('nan')):.4f}); nothing to do", flush=True)
    return summary


class Search:
    """One PBA search in ``run_dir`` (see :func:`search_from_config`)."""

    def __init__(self, cfg: Config, run_dir: Path, member_factory: MemberFactory, executor=None,
                 on_round: RoundHook | None = None, verbose: bool = True):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.member_factory = member_factory
        self.executor = executor
        self.on_round = on_round
        self.verbose = verbose
        s = cfg.search
        self.ctrl = PBTController(s.population, s.quantile, s.resample_prob, s.seed, init=s.init,
                                  reward_window=s.reward_window, burn_in=s.burn_in)
        self.epoch = 0
        self.round = 0
        self.reward_rows: list[dict] = []
        self.events: list[dict] = []
        self.times = {"setup_s": 0.0, "train_s": 0.0, "eval_s": 0.0, "round_wall_s": 0.0, "controller_s": 0.0,
                      "save_s": 0.0, "final_s": 0.0, "wall_s": 0.0}
        self._t0 = time.perf_counter()
        self._wall_base = 0.0  # wall time of earlier (interrupted) runs of this search

    # ------------------------------------------------------------------------------ logging
    def _event(self, event: str, **kw) -> None:
        e = {"event": event, "epoch": self.epoch, "round": self.round, **kw}
        self.events.append(e)
        with open(self.run_dir / "events.jsonl", "a") as f:
            f.write(json.dumps(e) + "\n")

    def _say(self, msg: str) -> None:
        if self.verbose:
            print(msg, flush=True)

    def write_logs(self) -> None:
        """(Re)write every log from the in-memory state (so a resumed search drops later lines)."""
        rd = self.run_dir
        for i, lines in enumerate(self.ctrl.member_logs):
            atomic_write(rd / f"pbt_policy_{i}.txt", "".join(l + "\n" for l in lines))
        atomic_write(rd / "pbt_global.txt", "".join(l + "\n" for l in self.ctrl.global_log))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=REWARD_FIELDS, lineterminator="\n")
        w.writeheader()
        w.writerows(self.reward_rows)
        atomic_write(rd / "rewards.csv", buf.getvalue())
        atomic_write(rd / "events.jsonl", "".join(json.dumps(e) + "\n" for e in self.events))

    # ------------------------------------------------------------------------------ state
    def save_state(self) -> None:
        t0 = time.perf_counter()
        root = self.run_dir / STATE_DIR
        name = f"epoch_{self.epoch:05d}"
        d = root / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        for i, st in self.executor.saved_states().items():
            save_state(st, d / f"member_{i}.pt")
        meta = {"version": STATE_VERSION, "epoch": self.epoch, "round": self.round,
                "controller": self.ctrl.state_dict(), "rewards": self.reward_rows, "events": self.events,
                "times": self.times}
        atomic_write(d / "controller.json", json.dumps(meta))
        fsync_dir(root)  # the new state's directory entry is on disk before LATEST names it
        atomic_write(root / "LATEST", name)
        for old in root.iterdir():
            if old.is_dir() and old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        self.times["save_s"] += time.perf_counter() - t0

    def load_saved(self) -> dict | None:
        """The saved state's metadata and member states, or None when there is nothing to resume."""
        root = self.run_dir / STATE_DIR
        latest = root / "LATEST"
        if not latest.is_file():
            return None
        d = root / latest.read_text().strip()
        try:
            meta = json.loads((d / "controller.json").read_text())
        except (OSError, ValueError):
            raise UserError(f"search state {d} is unreadable; delete {root} to start the search again") from None
        if meta.get("version") != STATE_VERSION:
            raise UserError(f"search state {d} was written by another rolekd version; delete {root} to restart")
        missing = [f"member_{i}.pt" for i in range(self.cfg.search.population) if not (d / f"member_{i}.pt").is_file()]
        if missing:
            raise UserError(f"search state {d} is missing {', '.join(missing)}; restore it or delete {root} to start "
                            f"the search again")
        states = {i: load_state(d / f"member_{i}.pt") for i in range(self.cfg.search.population)}
        return {"meta": meta, "states": states}

    # ------------------------------------------------------------------------------ the loop
    def run(self) -> dict:
        t_start = self._t0 = time.perf_counter()
        cfg, s = self.cfg, self.cfg.search
        own_executor = self.executor is None
        if own_executor:
            self.executor = make_executor(cfg, self.member_factory, verbose=self.verbose)
        ex = self.executor
        try:
            saved = self.load_saved()
            self.executor.start({i: member_config(cfg, i) for i in range(s.population)})
            if saved is not None:
                meta = saved["meta"]
                self.ctrl.load_state_dict(meta["controller"])
                self.epoch, self.round = int(meta["epoch"]), int(meta["round"])
                self.reward_rows, self.events = list(meta["rewards"]), list(meta["events"])
                self.times.update(meta["times"])
                self._wall_base = self.times["wall_s"]
                ex.load_states(saved["states"])
                self.write_logs()
                self._event("resumed")
                self._say(f"[search] {self.run_dir}: resumed after epoch {self.epoch}/{s.epochs}")
            else:
                short = too_short(s.epochs, s.perturb_interval, s.burn_in)
                if short:
                    self._say(f"[search] {self.run_dir}: warning: {short}")
                ex.snapshot()
                self.write_logs()
            self.times["setup_s"] += time.perf_counter() - t_start
            while self.epoch < s.epochs:
                self._round()
            summary = self._finish()
        finally:
            if own_executor:
                ex.close()
        return summary

    def _train(self, policies: Mapping[int, list[int]], k: int) -> dict[int, Outcome]:
        t0 = time.perf_counter()
        out = self.executor.train(policies, k)
        self.times["round_wall_s"] += time.perf_counter() - t0
        for o in out.values():
            self.times["train_s"] += o.train_s
            self.times["eval_s"] += o.eval_s
        return out

    def _round(self) -> None:
        s = self.cfg.search
        ctrl, ex = self.ctrl, self.executor
        t_round = time.perf_counter()
        k = min(s.perturb_interval, s.epochs - self.epoch)
        outcomes = self._train({i: list(ctrl.policies[i]) for i in range(s.population)}, k)
        t_ctl = time.perf_counter()
        retry = sorted(i for i, o in outcomes.items() if not o.ok)
        for i in retry:
            self._event("member_error", member=i, error=outcomes[i].error, action="restore and retry")
            ex.restore(i)
        failed = []
        if retry:
            self.times["controller_s"] += time.perf_counter() - t_ctl
            again = self._train({i: list(ctrl.policies[i]) for i in retry}, k)
            t_ctl = time.perf_counter()
            for i in retry:
                if again[i].ok:
                    outcomes[i] = again[i]
                    self._event("member_retry_ok", member=i)
                else:
                    failed.append(i)
                    self._event("member_failed", member=i, error=again[i].error,
                                action="replace by a top member" if self.epoch + k < s.epochs else "excluded")
                    ex.restore(i)
        for i in sorted(outcomes):
            o = outcomes[i]
            if not o.ok:
                continue
            pol = policy_string(ctrl.policies[i])
            for row in o.rows:
                self.reward_rows.append({
                    "epoch": int(row["epoch"]) + 1, "member": i, "val_acc": row.get("val_acc", ""),
                    "val_loss": row.get("val_loss", ""), "train_loss": row.get("train_loss", ""),
                    "train_acc": row.get("train_acc", ""), "train_kd_loss": row.get("train_kd_loss", ""),
                    "policy": pol})
            ctrl.record(i, k, o.reward)
        for i in failed:
            ctrl.invalidate(i)
        self.epoch += k
        self.round += 1
        valid = [r for r in ctrl.rewards if r is not None]
        if not valid:
            self.write_logs()
            raise RuntimeError(f"every member of the population failed in the round ending at epoch {self.epoch}; "
                               f"see {self.run_dir / 'events.jsonl'}")
        best, median = max(valid), statistics.median(valid)
        if self.epoch < s.epochs:
            steps = ctrl.perturb(self.epoch, failed)
            ex.exploit([(st.clone, st.target) for st in steps])
            for st in steps:
                if st.reason == "replace":
                    self._event("member_replaced", member=st.target, clone=st.clone)
            ex.snapshot()
            self.write_logs()
            self.times["controller_s"] += time.perf_counter() - t_ctl
            self.times["wall_s"] = self._wall()
            self.save_state()
        else:
            self.write_logs()
            self.times["controller_s"] += time.perf_counter() - t_ctl
        n_exploits = sum(1 for e in ctrl.exploits if e.reason == "exploit")
        self._say(f"[search] epoch {self.epoch}/{s.epochs}  best {best:.4f}  median {median:.4f}  "
                  f"exploits {n_exploits}  ({time.perf_counter() - t_round:.1f}s)")
        if self.on_round is not None:
            self.on_round({"search": self, "round": self.round, "epoch": self.epoch})

    def _wall(self) -> float:
        return self._wall_base + time.perf_counter() - self._t0

    def _finish(self) -> dict:
        t_final = time.perf_counter()
        cfg, s, ctrl = self.cfg, self.cfg.search, self.ctrl
        best = ctrl.best()
        rd = self.run_dir
        sched = Schedule(ctrl.history[best], source=str(rd / f"pbt_policy_{best}.txt"),
                         meta={"from": "rolekd-search", "role": s.role, "member": best, "epochs": s.epochs,
                               "population": s.population, "seed": s.seed})
        slots = sched.active_slots()
        active_epochs = sum(1 for k in slots if k)
        sched.save(rd / "schedule.json")
        t_test = time.perf_counter()
        test = self.executor.evaluate(best, "test")
        t_test = time.perf_counter() - t_test
        self.times["eval_s"] += t_test  # an evaluation step, not output overhead
        self.executor.snapshot([best])
        best_state = self.executor.saved_states([best])[best]
        save_tensors(best_state["model"], rd / "best_model.safetensors",
                     metadata={"model": cfg.model.name, "member": str(best)})
        self._plots(best, sched)
        t = self.times
        t["final_s"] += time.perf_counter() - t_final - t_test
        t["wall_s"] = self._wall()
        wall = max(t["wall_s"], 1e-9)
        summary = {
            "name": cfg.name, "role": s.role, "model": cfg.model.name, "dataset": cfg.data.name,
            "population": s.population, "epochs": s.epochs, "perturb_interval": s.perturb_interval,
            "seed": s.seed, "executor": getattr(self.executor, "name", type(self.executor).__name__),
            "device": self.executor.device,
            "reward_window": s.reward_window, "init": s.init, "burn_in": s.burn_in,
            "rounds": self.round, "perturbation_rounds": perturbation_rounds(s.epochs, s.perturb_interval, s.burn_in),
            "best_member": best, "best_val_acc": ctrl.rewards[best], "best_score": ctrl.scores()[best],
            "best_test_acc": test["acc"],
            # the schedule: epochs with at least one op slot of probability > 0, and their most slots
            "schedule_active_epochs": active_epochs, "schedule_max_active_slots": max(slots, default=0),
            "schedule_empty": active_epochs == 0,
            "final_val_acc": {str(i): r for i, r in enumerate(ctrl.rewards)},
            "exploits": sum(1 for e in ctrl.exploits if e.reason == "exploit"),
            "replacements": sum(1 for e in ctrl.exploits if e.reason == "replace"),
            "member_errors": sum(1 for e in self.events if e["event"] == "member_error"),
            "schedule": "schedule.json", "best_log": f"pbt_policy_{best}.txt",
            "wall_time_s": round(wall, 3), "setup_s": round(t["setup_s"], 3),
            "train_s": round(t["train_s"], 3), "eval_s": round(t["eval_s"], 3),
            "round_wall_s": round(t["round_wall_s"], 3), "controller_s": round(t["controller_s"], 3),
            "state_save_s": round(t["save_s"], 3), "final_s": round(t["final_s"], 3),
            # time outside the training rounds (setup, controller, state saving, final outputs)
            "overhead_frac": round((wall - t["round_wall_s"]) / wall, 5),
            # the PBT controller alone: ranking, exploit copies, snapshots, logs, state saving
            "controller_frac": round((t["controller_s"] + t["save_s"]) / wall, 5),
        }
        atomic_write(rd / "search.json", json.dumps(summary, indent=2))
        shutil.rmtree(rd / STATE_DIR, ignore_errors=True)
        what = (f"its schedule applies ops in {active_epochs} of {len(slots)} epochs (at most {max(slots)} active "
                f"slots)" if active_epochs else "its schedule is EMPTY (no op in any epoch: retraining with it adds "
                "no augmentation)")
        self._say(f"[search] {rd}: best member {best} val acc {summary['best_val_acc']:.4f} test acc "
                  f"{test['acc']:.4f}; {self.round} rounds, {summary['exploits']} exploits; {what}; {wall:.1f}s "
                  f"(outside training {100 * summary['overhead_frac']:.1f}%, controller {100 * summary['controller_frac']:.1f}%)")
        return summary

    def _plots(self, best: int, sched) -> None:
        plot_rewards({self.cfg.search.role: self.reward_rows}, self.run_dir / "rewards.png", best={
            self.cfg.search.role: best}, exploits={self.cfg.search.role: self.ctrl.exploits},
            title=f"{self.cfg.name}: PBA search ({self.cfg.search.role})")
        plot_schedule(sched, self.run_dir / "schedule.png",
                      title=f"{self.cfg.name}: searched schedule ({self.cfg.search.role}, member {best})")
