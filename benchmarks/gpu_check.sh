#!/usr/bin/env bash
# The GPU check (issue 14, point 5; issue 21, point 6): every CUDA test, the device stage under
# torch.cuda.set_sync_debug_mode("error") and in a CUDA graph, then the GPU figures, printed as markdown rows for
# benchmarks/RESULTS.md. Made for one H100/H200 with torch, Triton and numba (timm when present), no DALI or
# FFCV, no network; at most ~10 minutes (each step has its own time limit and a step that fails or runs out of
# time is reported and the next one runs). Without a CUDA device it says so and exits 0. Usage, from anywhere:
#
#   bash benchmarks/gpu_check.sh            # PYTHON=/path/to/python to choose the interpreter
#
# Nothing is installed: regpipe is imported from a copy of this checkout laid out as `pip install .` lays it out
# (kernels/ and loaders/ inside regpipe/), in a temporary folder removed on exit.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$(command -v python3 || command -v python || true)}"
STARTED=$(date +%s)
FAILED=()

die() { echo "gpu_check: $*" >&2; exit 2; }
section() { printf '\n### %s (t=%ss)\n\n' "$1" "$(( $(date +%s) - STARTED ))"; }
# step NAME SECONDS CMD...: run with a time limit; a failure or timeout is recorded, not fatal.
step() {
  local name="$1" limit="$2"; shift 2
  section "$name"
  local rc=0
  timeout --signal=TERM --kill-after=10 "$limit" "$@" || rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "gpu_check: '$name' ran past its ${limit}s limit"; FAILED+=("$name (timeout)")
  elif [ "$rc" -ne 0 ]; then
    echo "gpu_check: '$name' failed (exit $rc)"; FAILED+=("$name (exit $rc)")
  fi
}

[ -n "$PY" ] || die "no python3 on PATH (set PYTHON=/path/to/python)"
command -v timeout >/dev/null || die "the 'timeout' command (coreutils) is missing"
"$PY" -c "import torch" 2>/dev/null || die "$PY cannot import torch"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: skipped: torch ($PY) sees no CUDA device; run it on a machine with a GPU"
  exit 0
fi

TREE="$(mktemp -d "${TMPDIR:-/tmp}/regpipe-gpu-check.XXXXXX")"
trap 'rm -rf "$TREE"' EXIT
mkdir -p "$TREE/src"
cp -r "$ROOT/regpipe" "$TREE/src/regpipe"
cp -r "$ROOT/kernels" "$ROOT/loaders" "$TREE/src/regpipe/"
export PYTHONPATH="$TREE/src:$ROOT/tests:$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET  # the Triton kernels run on the GPU, not in the interpreter

section "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
"$PY" - <<'EOF'
import importlib, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"device {torch.cuda.get_device_name()}")
for name in ("triton", "numba", "timm", "torchvision", "PIL", "pytest", "nvidia.dali", "ffcv"):
    try:
        module = importlib.import_module(name)
        print(f"  {name} {getattr(module, '__version__', '?')}")
    except Exception as err:  # missing, or built for another torch
        print(f"  {name}: not importable ({type(err).__name__})")
EOF

# 1. Every CUDA test: the kernel suite runs its Triton cases on the GPU when TRITON_INTERPRET is unset.
if "$PY" -c "import pytest, hypothesis" 2>/dev/null; then
  step "CUDA tests" 150 "$PY" -m pytest -q -rs -p no:cacheprovider -m "slow or not slow" \
    "$ROOT/tests/test_kernels.py" "$ROOT/tests/test_op_contract.py" -k "not dali and not ffcv"
else
  section "CUDA tests"; echo "gpu_check: pytest/hypothesis not installed: CUDA tests skipped"; FAILED+=("CUDA tests (no pytest)")
fi

# 2. The device stage (BatchBuilder.apply: fused normalise + mix, plain and after loader-side copies) never
#    synchronises with the host (sync debug mode "error") and is captured and replayed in a CUDA graph.
step "device stage: no host sync, CUDA graph" 120 "$PY" "$ROOT/benchmarks/gpu_stage_check.py" --device cuda

# 3. Fused kernel vs a device copy; the device stage's share of a ResNet-50 bf16 step at batch 256.
step "kernel bandwidth and device-stage share" 120 "$PY" "$ROOT/benchmarks/gpu_figures.py" --device cuda

# 4. The methods' per-step costs on the GPU (the benchmarks' own tables; ratio = x the plain step).
step "Sum Augmentation (bench_sum_mix)" 45 "$PY" "$ROOT/benchmarks/bench_sum_mix.py" --device cuda --repeats 10
step "SIGN (bench_sign)" 45 "$PY" "$ROOT/benchmarks/bench_sign.py" --device cuda --repeats 5
step "invariance and saliency (bench_consistency)" 50 "$PY" "$ROOT/benchmarks/bench_consistency.py" --device cuda --repeats 5
step "loss-delta K=4, 8 (bench_sampler)" 45 "$PY" "$ROOT/benchmarks/bench_sampler.py" --device cuda --repeats 3

# 5. regpipe train end to end on the GPU: an image folder streamed by torch workers, bf16 and fp16, resumable.
if "$PY" -c "import PIL" 2>/dev/null; then
  DATA="$TREE/imagefolder"
  "$PY" -c "import sys; from pathlib import Path; from imagefolder import write_image_folder; \
write_image_folder(Path(sys.argv[1]), train_per_class=128, val_per_class=16)" "$DATA"
  for amp in bf16 fp16; do
    step "regpipe train imagefolder --amp $amp" 45 "$PY" -m regpipe train --data "imagefolder:$DATA" --device cuda \
      --recipe gradual --model preact-resnet18 --epochs 2 --batch-size 64 --image-size 112 --val-resize 128 \
      --amp "$amp" --channels-last --workers 8 --checkpoint-every 4 --no-progress --out "$TREE/run-$amp"
  done
else
  section "regpipe train"; echo "gpu_check: Pillow not installed: the image-folder run is skipped"; FAILED+=("train (no Pillow)")
fi

section "summary"
echo "total $(( $(date +%s) - STARTED )) s"
if [ "${#FAILED[@]}" -gt 0 ]; then
  printf 'not completed: %s\n' "${FAILED[@]}"
  exit 1
fi
echo "all steps completed"
