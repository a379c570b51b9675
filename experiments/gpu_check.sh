#!/usr/bin/env bash
# Issue 31's GPU figures in one run of under 8 minutes on one GPU (an H100 here):
#   1. throughput of flax_cnn, resnet20, resnet50 and mobilenet_v2: cnn float32 and bfloat16 against
#      torch.compile + bf16 on CUDA (experiments/benchmark.py throughput);
#   2. cnn's step split into host dispatch and device compute (benchmark.py step_time, block_until_ready timing);
#   3. time to 99% test accuracy on MNIST from process start (python -m cnn.main --config=configs/mnist.py).
#
#   bash experiments/gpu_check.sh                 # on the GPU machine, from the repository's root
#   bash experiments/gpu_check.sh --cpu_dry_run   # tiny versions of each part on a CPU, to test the script
#
# Environment: PYTHON (default python3: on the lent GPU machines the one with PyTorch, JAX and Flax), TORCH_PYTHON
# (the one with PyTorch and torchvision, default PYTHON), OUT (where
# the log goes, default ./gpu_check_out), MNIST_DIR (MNIST's four IDX archives; default shared/datasets/mnist, then
# ../shared/datasets/mnist), WHEELS (a folder of wheels for what that Python lacks, default .whl; installed with
# --no-index, as nothing can be downloaded there). Without a CUDA JAX, or with cnn's dependencies missing, it says
# which and runs the parts it can. CNN_GPU_DRY_RUN=1 is --cpu_dry_run.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PY=${TORCH_PYTHON:-$PY}
OUT=${OUT:-gpu_check_out}
WHEELS=${WHEELS:-.whl}
DRY=${CNN_GPU_DRY_RUN:-0}
[[ "${1:-}" == "--cpu_dry_run" ]] && DRY=1
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$(date +%s)
section() { echo; echo "== $1 ($(( $(date +%s) - start ))s since start)"; }

section "machine"
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
"$PY" --version

section "packages"
if [[ -d "$WHEELS" ]] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then  # offline: only what was carried
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/cnn_site "$WHEELS"/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/cnn_site"
fi
"$PY" - <<'EOF'
import importlib
for name in ("jax", "flax", "optax"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except ImportError as e:
        print(f"{name}: missing ({e})")
EOF
JAX_BACKEND=$("$PY" -c "import jax; print(jax.default_backend())" 2>/dev/null || echo none)
echo "JAX backend: $JAX_BACKEND"
if [[ "$JAX_BACKEND" != "gpu" && "$DRY" != 1 ]]; then
  # pip install 'jax[cuda13]' needs the network, which the GPU machine lacks: carry its wheels in $WHEELS instead.
  echo "JAX has no GPU backend here (no jax-cuda plugin, and pip cannot download one offline): cnn's GPU figures" \
       "are skipped; carry jax_cuda13_plugin and jax_cuda13_pjrt wheels matching jaxlib in $WHEELS to get them"
fi
MISSING=$("$PY" -c "
import importlib
names = ['ml_collections', 'absl', 'flax', 'optax', 'orbax.checkpoint', 'tensorboardX', 'tqdm', 'PIL', 'sklearn',
         'tensorflow_datasets']
print(' '.join(n for n in names if importlib.util.find_spec(n.split('.')[0]) is None))")
[[ -n "$MISSING" ]] && echo "cnn needs these, missing here: $MISSING (carry their wheels in $WHEELS)"
CNN_OK=$([[ -z "$MISSING" && ( "$JAX_BACKEND" == "gpu" || "$DRY" == 1 ) ]] && echo 1 || echo 0)

if [[ "$DRY" == 1 ]]; then
  MODELS="flax_cnn resnet20"
  STEPS=(--steps 1 --blocks 1)
  VARIANTS_CNN=("cnn float32")
  VARIANTS_TORCH=("torch eager float32")
else
  MODELS="flax_cnn resnet20 resnet50 mobilenet_v2"
  STEPS=(--steps 20 --blocks 5)
  VARIANTS_CNN=("cnn float32" "cnn bfloat16")
  VARIANTS_TORCH=("torch.compile + bf16")
fi
VARIANTS=()
[[ "$CNN_OK" == 1 ]] && VARIANTS+=("${VARIANTS_CNN[@]}")
"$TORCH_PY" -c "import torch, torchvision" 2>/dev/null && VARIANTS+=("${VARIANTS_TORCH[@]}")

section "throughput"
if [[ ${#VARIANTS[@]} -gt 0 ]]; then
  for model in $MODELS; do
    timeout 150 "$PY" experiments/benchmark.py throughput --model "$model" "${STEPS[@]}" --no_record \
      --torch_python "$TORCH_PY" --variants "${VARIANTS[@]}" || echo "throughput --model $model failed or timed out"
  done
else
  echo "skipped: neither cnn nor PyTorch can run here"
fi

section "step time: host dispatch and device compute"
if [[ "$CNN_OK" == 1 ]]; then
  for model in $MODELS; do
    timeout 90 "$PY" experiments/benchmark.py step_time --model "$model" "${STEPS[@]}" --no_record \
      --dtypes $([[ "$DRY" == 1 ]] && echo float32 || echo float32 bfloat16) || echo "step_time --model $model failed"
  done
else
  echo "skipped: cnn cannot run here"
fi

section "time to 99% on MNIST from process start"
MNIST_DIR=${MNIST_DIR:-shared/datasets/mnist}
[[ -d "$MNIST_DIR" ]] || MNIST_DIR=../shared/datasets/mnist
if [[ "$CNN_OK" == 1 && -d "$MNIST_DIR" ]]; then
  extra=()
  [[ "$DRY" == 1 ]] && extra=(--config.data.train_split='train[:2%]' --config.data.test_split='test[:10%]'
                              --config.train.num_epochs=1)
  workdir="$OUT/mnist_run"
  rm -rf "$workdir"
  t0=$(date +%s)
  timeout 240 "$PY" -m cnn.main --config=configs/mnist.py --workdir="$workdir" \
    --config.data.manual_dir="$MNIST_DIR" "${extra[@]}" >"$OUT/mnist_run.log" 2>&1 || echo "the MNIST run failed"
  wall=$(( $(date +%s) - t0 ))
  "$PY" - "$workdir" "$wall" <<'EOF'
import json, os, sys
workdir, wall = sys.argv[1], float(sys.argv[2])
history = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
results = json.load(open(os.path.join(workdir, "results.json")))
reached = next((r for r in history if r["test_accuracy"] >= 0.99), None)
print(f"configs/mnist.py: " + (f"99.0% at {reached['elapsed_seconds']:.1f}s from process start (epoch "
      f"{reached['epoch']})" if reached else "never reached 99.0%") + f"; final {results['test_accuracy']:.2%} after "
      f"{results['epochs']} epochs; start-up {results['startup_seconds']:.1f}s; process {wall:.1f}s")
EOF
else
  echo "skipped: needs cnn and MNIST's archives in MNIST_DIR ($MNIST_DIR)"
fi

section "done"
echo "log: $LOG"
