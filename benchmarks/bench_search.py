"""PBA search cost: the controller's overhead, and a population's throughput against one member alone.

CPU (default): a small search on the bundled sample; reports where the wall time went -- training
and evaluation steps (members' own timers), set-up (data, building members), the PBT loop outside
the steps (ranking, exploit copies, snapshots, logs, state saving, per-member dispatch) and the
final outputs (test evaluation, plots) -- as fractions of the search's wall time.

    python benchmarks/bench_search.py --out cpu.json

CUDA: a 16-member search on PBA's reduced CIFAR-10 (4,000 train / 46,000 validation) with WRN-40-2
for a few epochs, and the same member config trained alone for as many epochs; reports wall times
and total training img/s.

    python benchmarks/bench_search.py --device cuda --data-path cifar10_jpeg.npz --out gpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def build_config(a, out: Path):
    from rolekd.config import load_config

    ov = [f"model.name={a.model}", f"data.train_size={a.train_size}", f"data.val_size={a.val_size}",
          f"train.batch_size={a.batch_size}", f"train.eval_batch_size={a.eval_batch_size}",
          f"search.population={a.population}", f"search.epochs={a.epochs}",
          f"search.perturb_interval={a.interval}", f"search.executor={a.executor}", "train.progress=false",
          f"train.device={a.device}", f"out={out}"]
    if a.eval_every:
        ov.append(f"search.eval_every={a.eval_every}")
    if a.data_path:
        ov += ["data.name=cifar10-jpeg", f"data.path={a.data_path}"]
    else:
        ov += ["data.name=cifar10-sample"]
    if a.executor == "ray":
        ov += [f"search.ray_num_cpus={a.ray_num_cpus}", f"search.ray_num_gpus={a.ray_num_gpus}"]
    return load_config(None, ov)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_search(a, root: Path, session) -> dict:
    from rolekd.experiment import build_data, search_from_config

    cfg = build_config(a, root / "search")
    build_data(cfg, session)  # decode the dataset once, outside both timings (shared by search and single run)
    sync(a.device)
    t0 = time.perf_counter()
    s = search_from_config(cfg, verbose=not a.quiet, session=session)
    sync(a.device)
    wall = time.perf_counter() - t0
    steps = s["train_s"] + s["eval_s"]
    loop = wall - s["setup_s"] - s["final_s"] - steps
    imgs = a.population * a.epochs * a.train_size
    return {
        "wall_s": round(wall, 3), "train_s": s["train_s"], "eval_s": s["eval_s"], "setup_s": s["setup_s"],
        "final_s": s["final_s"], "controller_s": s["controller_s"], "state_save_s": s["state_save_s"],
        "loop_overhead_s": round(loop, 3),
        # the PBT loop outside training/evaluation steps (controller, dispatch, snapshots, state saving)
        "controller_overhead_frac": round(loop / wall, 5),
        # everything that is not a training/evaluation step, set-up and final outputs included
        "non_step_frac": round((wall - steps) / wall, 5),
        "exploits": s["exploits"], "best_val_acc": s["best_val_acc"], "best_test_acc": s["best_test_acc"],
        "train_images": imgs, "train_img_per_s_wall": round(imgs / wall, 1),
        "train_img_per_s_train_steps": round(imgs / max(s["train_s"], 1e-9), 1),
    }


def run_single(a, root: Path, session) -> dict:
    """One member of the same search trained alone (same config, same epochs, zero policy)."""
    from rolekd.experiment import MemberFactory
    from rolekd.search import Member, member_config, search_config

    cfg = search_config(build_config(a, root / "single"))
    t0 = time.perf_counter()
    m = Member(MemberFactory(session), member_config(cfg, 0), 0)
    sync(a.device)
    t1 = time.perf_counter()
    out = m.train(a.epochs, [0] * 60)
    sync(a.device)
    t2 = time.perf_counter()
    imgs = a.epochs * a.train_size
    return {"build_s": round(t1 - t0, 3), "wall_s": round(t2 - t1, 3), "train_s": round(out.train_s, 3),
            "eval_s": round(out.eval_s, 3), "val_acc": out.reward, "train_images": imgs,
            "train_img_per_s_wall": round(imgs / (t2 - t1), 1),
            "train_img_per_s_train_steps": round(imgs / max(out.train_s, 1e-9), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-path", default=None, help="CIFAR-10 JPEG .npz (data.name=cifar10-jpeg); default: sample")
    p.add_argument("--model", default=None)
    p.add_argument("--population", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--interval", type=int, default=None)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--val-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=None,
                   help="search.eval_every (default: evaluate only at the end of each round)")
    p.add_argument("--executor", default="local", choices=["local", "ray"])
    p.add_argument("--ray-num-cpus", type=float, default=1.0)
    p.add_argument("--ray-num-gpus", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-single", action="store_true", help="skip the one-member-alone run")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args()
    gpu = a.device.startswith("cuda")
    a.model = a.model or ("wrn_40_2" if gpu else "resnet_tiny")
    a.population = a.population or (16 if gpu else 4)
    a.epochs = a.epochs or (4 if gpu else 6)
    a.interval = a.interval or 2
    a.train_size = a.train_size or (4000 if gpu else 500)
    a.val_size = a.val_size or (46000 if gpu else 500)
    if gpu and not a.data_path:
        p.error("--device cuda needs --data-path (the CIFAR-10 JPEG .npz) for PBA's reduced CIFAR-10")
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="bench_search_") as tmp:
        root = Path(tmp)
        res = {"config": {k: v for k, v in vars(a).items() if k not in ("out", "quiet")},
               "torch": torch.__version__, "threads": torch.get_num_threads(), "host": platform.node(),
               "device_name": torch.cuda.get_device_name() if gpu else platform.processor() or "cpu"}
        from rolekd.experiment import Session

        session = Session()
        res["search"] = run_search(a, root, session)
        if not a.no_single:
            res["single"] = run_single(a, root, session)
            s, one = res["search"], res["single"]
            res["search_vs_single"] = {
                "wall_ratio": round(s["wall_s"] / one["wall_s"], 3),
                "wall_ratio_per_member": round(s["wall_s"] / (a.population * one["wall_s"]), 3),
                "img_per_s_ratio_wall": round(s["train_img_per_s_wall"] / one["train_img_per_s_wall"], 3),
            }
    print(json.dumps(res, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
