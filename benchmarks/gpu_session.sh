#!/usr/bin/env bash
# One prepared GPU session (device tool): carries .gpu/ (cifar10_jpeg.npz, a PBA schedule) and .whl/
# (pydantic wheels, absent from the GPU image). Results go to $OUT; each step has its own time limit.
# Setup (once, in the checkout): mkdir -p .gpu .whl; cp ../shared/data/cifar10_jpeg.npz ../shared/fixtures/pba/rcifar10_16_wrn.txt .gpu/;
#   pip download pydantic, pydantic_core, annotated_types, typing_inspection wheels for cp312 manylinux into .whl/
#   (see the device README); then run it with carry [".gpu", ".whl"] and timeout_s 600.
# Modes: (none) or `search` = what the open issues still need (issue 14's search throughput, within one 600 s
#   call); `early` = the earlier issues' checks: the KD step bench (issue 4), the batch-512 augmentation share
#   (issue 3), the gpu-mini pipeline (issue 6, its report as a tarball); `bench` = loader / augment / train
#   smoke / compile / KD benches; `mini` = the pipeline only;
#   `search` = issue 14's search throughput: the fused kernels' step (bench_fused_step: sequential / vmap / grouped,
#   16 WRN-40-2 at batch 128), then 16 WRN-40-2 members x 9 epochs (3 rounds) on the reduced 4,000 / 46,000 split with
#   the fused executor (vmap and grouped kernels) and the local one, then 16 4-bit ResNet18 II-KD students fused
#   (one round, both kernels);
#   `search-more` = the kernels compiled (bench_fused_step --compile, WRN-40-2 and 4-bit ResNet18), the WRN search
#   fused with torch.compile (both kernels), Ray with 1/16 GPU per member, Ray fused groups of 4
#   (Ray is not in the GPU image; without a Ray wheel in .whl those rows come back as errors in search_ray.json).
# `kd` = issue 32's KD step on the card: fp32, 4-bit and 4-bit II-KD (clipped) steps of ResNet18 at batch 256
#   (bench_kd.py), the issue's base and this checkout alternating (two rounds), after the CPU tests' bit-identity
#   claims checked on the card (check_device_numerics.py) and the eigen-solvers' row (bench_eigen_solvers.py:
#   batched eigh vs the subspace iteration by size; a step's problems padded together vs one call per size); needs
#   the base's code in .gpu/base:
#   mkdir -p .gpu/base && git archive 0b57263 src | tar -x -C .gpu/base
# `pipeline [T1 T2]` = the multi-GPU-ready row: the gpu-mini pipeline with its stages on pipeline.workers = the visible
#   GPUs (one stage per GPU at a time; on one GPU the stages run one after another), time limit T1 s; on a single GPU
#   then the same with pipeline.workers=2 sharing it (T2 s). GPU utilisation every 2 s in util.csv.
# `dry` = on CPU, no GPU needed (tests/test_gpu_session.py runs it): every command of every mode is parsed by its
#   own argument parser and its rolekd config validated (benchmarks/dry_check.py), nothing trained; then the
#   `pipeline` row runs for real at micro size on CPU with 2 workers. Exits 1 when any command fails.
set -u
export PYTHONUNBUFFERED=1
DRY=0
FAILED=0
if [ "${1:-}" = dry ]; then
  DRY=1; OUT=${OUT:-$(mktemp -d)}; export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}; DRY_LIST=$OUT/dry_commands.txt
  : > "$DRY_LIST"
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD/src
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/gpu.txt
  python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" >> $OUT/gpu.txt
fi
step() {  # step SECONDS NAME COMMAND...: run it (its log in $OUT), or in dry mode parse it only
  local t=$1; shift; local name=$1; shift
  if [ $DRY = 1 ]; then  # collected, then checked in one process (benchmarks/dry_check.py --batch)
    [ "$1" = python3 ] && shift
    printf '%q ' "$name" "$@" >> "$DRY_LIST"; echo >> "$DRY_LIST"
    return 0
  fi
  echo "== $name"; local t0=$SECONDS rc; timeout "$t" "$@" > "$OUT/$name.log" 2>&1; rc=$?
  echo "rc=$rc wall_s=$((SECONDS - t0))" >> "$OUT/$name.log"; tail -n 12 "$OUT/$name.log"
}
pack() {  # pack NAME DIR: /tmp/DIR's run (no weights, checkpoints or search state) as $OUT/NAME.tar.gz
  [ $DRY = 1 ] || tar czf "$OUT/$1.tar.gz" --exclude=checkpoint --exclude='*.safetensors' --exclude=search_state -C /tmp "$2"
}
WRN_SEARCH="--device cuda --data-path .gpu/cifar10_jpeg.npz --model wrn_40_2 --population 16 --epochs 9 --interval 3"
mode_mini() {
  step "${1:-560}" gpu_mini python3 -m rolekd.cli run configs/gpu-mini.yaml data.path=.gpu/cifar10_jpeg.npz out=/tmp/gm
  pack gpu_mini gm
}
mode_pipeline() {  # the row, then (one GPU visible) the same pipeline with 2 workers sharing that GPU
  local gpus; gpus=$(nvidia-smi -L 2>/dev/null | wc -l); [ "$gpus" -ge 1 ] || gpus=1
  local mon=
  [ $DRY = 1 ] || { nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 2 > $OUT/util.csv & mon=$!; }
  step "${1:-560}" pipeline_workers python3 -m rolekd.cli run configs/gpu-mini.yaml data.path=.gpu/cifar10_jpeg.npz \
    pipeline.workers=$gpus out=/tmp/gmw
  pack pipeline_workers gmw
  if [ "$gpus" = 1 ]; then
    step "${2:-240}" pipeline_shared python3 -m rolekd.cli run configs/gpu-mini.yaml data.path=.gpu/cifar10_jpeg.npz \
      pipeline.workers=2 out=/tmp/gms
    pack pipeline_shared gms
  fi
  [ -z "$mon" ] || kill "$mon"
}
mode_search() {
  step 60 kernels_wrn python3 benchmarks/bench_fused_step.py --device cuda --model wrn_40_2 --members 16 --batch 128 \
    --eval-batch 1000 --rounds 5 --bf16 --channels-last --out $OUT/kernels_wrn.json
  step 330 search_wrn python3 benchmarks/bench_search.py $WRN_SEARCH --executors fused fused-grouped local --quiet \
    --out $OUT/search_wrn.json
  step 180 search_iikd python3 benchmarks/bench_search.py --device cuda --data-path .gpu/cifar10_jpeg.npz --model resnet18 \
    --population 16 --epochs 3 --interval 3 --student iikd --w-bits 4 --a-bits 4 --prepare-epochs 10 \
    --executors fused fused-grouped --quiet --out $OUT/search_iikd.json
}
mode_search_more() {
  step 120 kernels_compile python3 benchmarks/bench_fused_step.py --device cuda --model wrn_40_2 --members 16 \
    --batch 128 --eval-batch 1000 --rounds 5 --bf16 --channels-last --compile --out $OUT/kernels_compile.json
  step 60 kernels_r18q4 python3 benchmarks/bench_fused_step.py --device cuda --model resnet18 --bits 4 --members 16 \
    --batch 128 --eval-batch 1000 --rounds 5 --bf16 --channels-last --out $OUT/kernels_r18q4.json
  step 200 search_compile python3 benchmarks/bench_search.py $WRN_SEARCH --executors fused+compile \
    fused-grouped+compile --quiet --out $OUT/search_compile.json
  step 200 search_ray python3 benchmarks/bench_search.py $WRN_SEARCH --executors ray ray-groups --ray-group-size 4 \
    --ray-num-cpus 0.9 --quiet --out $OUT/search_ray.json
}
mode_kd() {  # issue 32: the KD step at the issue's base (.gpu/base/src) and now, same card, alternating
  local kd="benchmarks/bench_kd.py --device cuda --model resnet18 --batch 256 --bits 4 --methods iikd --steps 30"
  # the bit-identity claims of the CPU tests, on the card (activation quantizer, fused ReLU, MHGD fold)
  step 120 numerics python3 benchmarks/check_device_numerics.py --device cuda --out $OUT/numerics.json
  # whether cuSOLVER's batched eigh now beats the subspace iteration above 32 rows (CUDA's solver choice), and whether
  # a step's problems padded into one call beat one call per size (ResNet18's taps at batch 256)
  step 100 eigen python3 benchmarks/bench_eigen_solvers.py --device cuda --rows 512 --repeats 3 --skip-iterations \
    --groups 256 --out $OUT/eigen.json
  step 120 kd_base_1 python3 $kd --src .gpu/base/src --out $OUT/kd_base_1.json
  step 120 kd_new_1 python3 $kd --out $OUT/kd_new_1.json
  step 120 kd_new_2 python3 $kd --out $OUT/kd_new_2.json
  step 120 kd_base_2 python3 $kd --src .gpu/base/src --out $OUT/kd_base_2.json
}
mode_early() {
  step 100 kd python3 benchmarks/bench_kd.py --device cuda --model resnet18 --batch 128 --bits 4 --unclipped iikd --out $OUT/kd.json
  step 60 augment python3 benchmarks/bench_augment.py --device cuda --batch 4096 --train-step --out $OUT/augment.json
  mode_mini 400
}
mode_bench() {
  step 120 loader python3 benchmarks/bench_loader.py --device cuda --workers 8 --data-path .gpu/cifar10_jpeg.npz \
    --gpu-models resnet18 wrn_40_2 --batches 128 512 --steps 40 --out $OUT/loader.json
  step 100 augment python3 benchmarks/bench_augment.py --device cuda --batch 4096 --train-step --out $OUT/augment.json
  step 120 train_smoke python3 -m rolekd.cli train model=resnet18 dataset=cifar10-jpeg data.path=.gpu/cifar10_jpeg.npz \
    epochs=2 out=/tmp/r18 train.progress=false augment.schedule=.gpu/rcifar10_16_wrn.txt augment.schedule_epochs=200
  step 120 compile python3 benchmarks/bench_loader.py --device cuda --data-path .gpu/cifar10_jpeg.npz \
    --gpu-models resnet18 --batches 512 --steps 40 --compile --out $OUT/compile.json
  step 120 kd python3 benchmarks/bench_kd.py --device cuda --model resnet18 --batch 128 --bits 4 --out $OUT/kd.json
}
if [ $DRY = 1 ]; then
  for mode in search search_more kd early bench mini pipeline; do "mode_$mode"; done
  echo "== dry: $(wc -l < "$DRY_LIST") commands of modes search, search-more, kd, early, bench, mini, pipeline"
  python3 benchmarks/dry_check.py --batch "$DRY_LIST" || FAILED=1
  echo "== dry: the pipeline row on CPU, 2 workers, micro size"
  python3 -m rolekd.cli run configs/gpu-mini.yaml train.device=cpu data.name=cifar10-sample data.train_size=128 \
    data.val_size=128 data.max_train=384 data.max_test=200 train.epochs=1 train.batch_size=64 train.eval_batch_size=200 \
    search.population=2 search.epochs=1 search.perturb_interval=1 kd.prepare_epochs=1 pipeline.workers=2 \
    pipeline.teacher.model=resnet_tiny pipeline.student.model=resnet_tiny pipeline.student.train.epochs=1 \
    out="$OUT/dry_pipeline" > "$OUT/dry_pipeline.log" 2>&1 \
    && [ -f "$OUT/dry_pipeline/report.md" ] || { echo "dry: FAILED the pipeline row" >&2; tail -n 5 "$OUT/dry_pipeline.log" >&2; FAILED=1; }
  echo "dry: done (failed=$FAILED)"
  exit $FAILED
fi
case "${1:-search}" in
  search) mode_search ;;
  search-more) mode_search_more ;;
  kd) mode_kd ;;
  early) mode_early ;;
  bench) mode_bench ;;
  mini) mode_mini 560 ;;
  pipeline) mode_pipeline "${2:-560}" "${3:-240}" ;;
  *) echo "unknown mode ${1:-}: use search, search-more, kd, early, bench, mini, pipeline or dry" >&2; exit 2 ;;
esac
