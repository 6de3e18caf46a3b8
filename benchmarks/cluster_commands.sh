#!/usr/bin/env bash
# docs/CLUSTER.md's commands, run as written on this one machine (issue 34): `ray start --head --num-cpus 0`,
# `ray start --address` for a worker node (a second raylet on the same machine; no GPUs here, so no --num-gpus),
# then `rolekd run ... pipeline.executor=ray search.ray_address=HEAD:6379` from a directory that is not where
# the nodes were started, with a micro config (the paper's configs take days on CPUs). Then `rolekd report`,
# and `ray stop`. Prints what each command printed last and where each stage ran.
#
#   bash benchmarks/cluster_commands.sh [WORKDIR]      (default: a fresh temporary directory)
#
# Leaves nothing running (ray stop on exit). Needs Ray's CLI (`pip install ".[ray]"`) and port 6379 free.
set -euo pipefail
REPO=$(git rev-parse --show-toplevel)
WORK=${1:-$(mktemp -d)}
mkdir -p "$WORK/nodes" "$WORK/shared"
trap 'ray stop --force > /dev/null 2>&1 || true' EXIT
HEAD_IP=$(python -c "import ray; print(ray.util.get_node_ip_address())")
export RAY_AUTH_MODE=token  # docs/CLUSTER.md: on every machine (the token: ~/.ray/auth_token, here one machine's)
[ -s ~/.ray/auth_token ] || ray get-auth-token --generate > /dev/null
cat > "$WORK/shared/micro.yaml" <<'EOF'
name: cluster-micro
data: {name: cifar10-sample, train_size: 128, val_size: 128, max_train: 384, max_test: 200}
train: {epochs: 2, batch_size: 64, eval_batch_size: 200, progress: false}
search: {population: 2, epochs: 2, perturb_interval: 1}
kd: {prepare_epochs: 1}
pipeline:
  seeds: 1
  teacher: {model: resnet_tiny}
  student: {model: resnet_tiny, w_bits: 4, a_bits: 4, method: iikd, train: {optimizer: adam, lr: 0.001}}
EOF
# the nodes start in their own directory (as on other machines), not in the run's
(cd "$WORK/nodes" && ray start --head --port 6379 --num-cpus 0 --disable-usage-stats 2>&1 | grep -m1 "Ray runtime started")
(cd "$WORK/nodes" && ray start --address "$HEAD_IP:6379" --num-cpus 2 2>&1 | grep -m1 "Ray runtime started")
ray status --address "$HEAD_IP:6379" 2>&1 | sed -n '/Active:/,/Pending:/p'
cd "$WORK/shared"
t0=$(date +%s)
rolekd run micro.yaml out=runs/micro pipeline.executor=ray search.ray_address="$HEAD_IP:6379" pipeline.workers=2 \
  train.threads=1 2>&1 | grep "== rolekd run: \(done\|start alpha\|report\)\|rolekd: error" | tail -4
echo "rolekd run exit: ${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s"
python - <<'EOF'
import json
r = json.load(open("runs/micro/results.json"))
print("stages:", len(r), "nodes:", sorted({v["ray_node"][:12] for v in r.values()}))
EOF
rolekd report runs/micro > /dev/null && echo "rolekd report exit: 0 ($(grep -c '^|' runs/micro/report.md) table rows)"
echo "under the nodes' directory: $(find "$WORK/nodes" -name '*.json' | wc -l) json files"
