"""PBA search cost: the executors side by side (local, fused, and on CUDA Ray with fractional GPUs).

For each executor the same search runs once (same config and seeds) and the table gives its wall time,
training img/s (per wall second of the whole search, and per second inside training steps),
evaluation img/s (validation at the end of each round + the best member's test evaluation, per second
of evaluation) and the share of the wall time spent outside training steps (set-up, evaluation, the
controller, state saving, outputs). ``projected_s`` extrapolates the search to ``--project-epochs``
epochs (set-up and final outputs once, the rest per epoch).

CPU (default): 4 resnet_tiny members x 6 epochs on a 500 / 500 reduced split of the bundled sample:

    python benchmarks/bench_search.py --out cpu.json

CUDA: 16 WRN-40-2 members x 9 epochs (3 rounds) on PBA's reduced CIFAR-10 (4,000 / 46,000):

    python benchmarks/bench_search.py --device cuda --data-path cifar10_jpeg.npz --out gpu.json
    python benchmarks/bench_search.py --device cuda --data-path cifar10_jpeg.npz --executors fused \
        --model resnet18 --student iikd --w-bits 4 --epochs 3 --interval 3   # 16 4-bit ResNet18 II-KD students

``--executors`` picks which to run (default: local fused, plus ray on CUDA); ``fused+compile`` is the
fused executor with ``train.compile=true`` (its vmapped forward/backward compiled); ``fused-grouped`` (and
``fused-grouped+compile``) runs the fused executor with ``search.fused_kernel=grouped`` (HFTA-style grouped
convolutions instead of vmap). On CUDA, ray
gives every member ``1/population`` of the GPU (``--ray-num-gpus`` to change) in its own actor;
``ray-groups`` runs fused groups of ``--ray-group-size`` members per actor. ``--student METHOD`` makes a
student-role search (the teacher: ``--teacher FILE.safetensors``, default an untrained network of
``--teacher-model``; MHGD's / II-KD's attention preparation shortened to ``--prepare-epochs``, a
one-time cost outside the rounds).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

EXECUTORS = ("local", "fused", "fused+compile", "fused-grouped", "fused-grouped+compile", "ray", "ray-groups")


def build_config(a, out: Path, executor: str):
    from rolekd.config import load_config

    kind = "fused" if executor.startswith("fused") else "ray" if executor.startswith("ray") else executor
    ov = [f"model.name={a.model}", f"data.train_size={a.train_size}", f"data.val_size={a.val_size}",
          f"train.batch_size={a.batch_size}", f"train.eval_batch_size={a.eval_batch_size}",
          f"search.population={a.population}", f"search.epochs={a.epochs}",
          f"search.perturb_interval={a.interval}", f"search.executor={kind}", "train.progress=false",
          f"train.device={a.device}", f"out={out}"]
    if executor.endswith("+compile"):
        ov.append("train.compile=true")
    if executor.startswith("fused-grouped"):
        ov.append("search.fused_kernel=grouped")
    if a.eval_every:
        ov.append(f"search.eval_every={a.eval_every}")
    ov += ["data.name=cifar10-jpeg", f"data.path={a.data_path}"] if a.data_path else ["data.name=cifar10-sample"]
    if kind == "ray":
        gpus = a.ray_num_gpus if a.ray_num_gpus is not None else (1.0 / a.population if a.device.startswith("cuda")
                                                                  else 0.0)
        ov += [f"search.ray_num_cpus={a.ray_num_cpus}", f"search.ray_num_gpus={gpus}"]
        if executor == "ray-groups":
            ov.append(f"search.ray_group_size={a.ray_group_size}")
    if a.student:
        ov += ["search.role=student", f"kd.method={a.student}", f"kd.teacher={a.teacher}",
               f"kd.teacher_model={a.teacher_model}", f"quant.w_bits={a.w_bits}", f"quant.a_bits={a.a_bits}",
               f"kd.prepare_epochs={a.prepare_epochs}"]
    return load_config(None, ov)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def evaluated_rows(run_dir: Path) -> int:
    with open(run_dir / "rewards.csv") as f:
        return sum(1 for r in csv.DictReader(f) if r["val_acc"] != "")


def run_search(a, root: Path, session, executor: str) -> dict:
    from rolekd.experiment import build_data, search_from_config

    out = root / executor
    cfg = build_config(a, out, executor)
    bundle = build_data(cfg, session)  # decode the dataset once, outside the timings (shared by the runs)
    sync(a.device)
    t0 = time.perf_counter()
    s = search_from_config(cfg, verbose=not a.quiet, session=session)
    sync(a.device)
    wall = time.perf_counter() - t0
    imgs = a.population * a.epochs * a.train_size
    eval_imgs = evaluated_rows(out) * a.val_size + len(bundle.test.labels)
    train_s, eval_s = s["train_s"], s["eval_s"]
    if s["executor"] == "ray":  # members train concurrently: their summed times are not wall time
        share = train_s / max(train_s + eval_s, 1e-9)
        train_s, eval_s = s["round_wall_s"] * share, s["round_wall_s"] * (1 - share)
    per_epoch = (wall - s["setup_s"] - s["final_s"]) / a.epochs
    return {
        "executor": s["executor"], "wall_s": round(wall, 3), "setup_s": s["setup_s"], "train_s": round(train_s, 3),
        "eval_s": round(eval_s, 3), "final_s": s["final_s"], "controller_s": s["controller_s"],
        "state_save_s": s["state_save_s"],
        "train_img_per_s_wall": round(imgs / wall, 1),
        "train_img_per_s_in_steps": round(imgs / max(train_s, 1e-9), 1),
        "eval_img_per_s": round(eval_imgs / max(eval_s, 1e-9), 1),
        # everything that is not a training step: set-up, evaluation, controller, state saving, outputs
        "outside_train_frac": round(1 - train_s / wall, 4),
        f"projected_{a.project_epochs}_epochs_s": round(s["setup_s"] + s["final_s"] + per_epoch * a.project_epochs, 1),
        "exploits": s["exploits"], "best_val_acc": s["best_val_acc"], "best_test_acc": s["best_test_acc"],
    }


def random_teacher(a, root: Path) -> str:
    """An untrained ``--teacher-model`` network's weights (only the cost of distilling is measured)."""
    from rolekd.files import save_weights
    from rolekd.models import create

    path = root / "teacher.safetensors"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = create(a.teacher_model, num_classes=10)
    return str(save_weights(net, path))


def table(results: dict, project: int) -> str:
    cols = [("wall s", "wall_s"), ("train img/s (wall)", "train_img_per_s_wall"),
            ("train img/s (in steps)", "train_img_per_s_in_steps"), ("eval img/s", "eval_img_per_s"),
            ("outside training steps", "outside_train_frac"), (f"projected {project} epochs s",
                                                               f"projected_{project}_epochs_s")]
    lines = ["| executor | " + " | ".join(c for c, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, r in results.items():
        cells = [f"{100 * r[k]:.1f}%" if k == "outside_train_frac" else f"{r[k]:,}" for _, k in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-path", default=None, help="CIFAR-10 JPEG .npz (data.name=cifar10-jpeg); default: sample")
    p.add_argument("--executors", nargs="+", choices=EXECUTORS, default=None,
                   help="default: local fused, and ray on CUDA")
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
    p.add_argument("--project-epochs", type=int, default=200, help="extrapolate the search to this many epochs")
    p.add_argument("--ray-num-cpus", type=float, default=1.0)
    p.add_argument("--ray-num-gpus", type=float, default=None, help="per member; default 1/population on CUDA")
    p.add_argument("--ray-group-size", type=int, default=4, help="members per actor for ray-groups")
    p.add_argument("--student", default=None, help="KD method: a student-role search")
    p.add_argument("--teacher", default=None, help="teacher weights (.safetensors); default: an untrained network")
    p.add_argument("--teacher-model", default=None, help="default: --model")
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--a-bits", type=int, default=4)
    p.add_argument("--prepare-epochs", type=int, default=2, help="MHGD / II-KD attention preparation epochs")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args()
    gpu = a.device.startswith("cuda")
    a.model = a.model or ("wrn_40_2" if gpu else "resnet_tiny")
    a.teacher_model = a.teacher_model or a.model
    a.population = a.population or (16 if gpu else 4)
    a.epochs = a.epochs or (9 if gpu else 6)
    a.interval = a.interval or (3 if gpu else 2)
    a.train_size = a.train_size or (4000 if gpu else 500)
    a.val_size = a.val_size or (46000 if gpu else 500)
    a.executors = a.executors or (["local", "fused", "ray"] if gpu else ["local", "fused"])
    if gpu and not a.data_path:
        p.error("--device cuda needs --data-path (the CIFAR-10 JPEG .npz) for PBA's reduced CIFAR-10")
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="bench_search_") as tmp:
        root = Path(tmp)
        if a.student and not a.teacher:
            a.teacher = random_teacher(a, root)
        res = {"config": {k: v for k, v in vars(a).items() if k not in ("out", "quiet")},
               "torch": torch.__version__, "threads": torch.get_num_threads(), "host": platform.node(),
               "device_name": torch.cuda.get_device_name() if gpu else platform.processor() or "cpu",
               "results": {}}
        from rolekd.experiment import Session

        session = Session()
        for ex in a.executors:
            try:
                res["results"][ex] = run_search(a, root, session, ex)
            except Exception as e:  # one executor failing (e.g. Ray absent) must not lose the others' numbers
                res.setdefault("errors", {})[ex] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                print(f"[bench_search] {ex}: {res['errors'][ex]}", flush=True)
            if a.out:  # partial results survive a time limit
                Path(a.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    print(table(res["results"], a.project_epochs))


if __name__ == "__main__":
    main()
