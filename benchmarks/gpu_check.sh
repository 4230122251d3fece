#!/usr/bin/env bash
# The GPU check (issue 23), in one go: every CUDA path sdtool has, then the GPU benchmark. Prepared on a CPU
# machine; run it on a machine with an NVIDIA GPU from the repository root:
#
#     bash benchmarks/gpu_check.sh            # results under $OUT (default ./gpu-check), about 12 minutes
#     QUICK=1 bash benchmarks/gpu_check.sh    # the benchmark with --quick, about 8 minutes
#     ONLY="demo-cuda bench-unet" bash benchmarks/gpu_check.sh   # rerun only the steps named
#
# Python packages: torch with CUDA must be there. Anything else missing is installed from ./.whl/*.whl when that
# folder exists (for a machine without network: see docs/benchmarks.md, "Running the GPU check"), else with pip.
# Each step has its own time limit and writes its log under $OUT; a failed step is recorded and the next one
# runs. The summary (summary.txt) lists each step with its exit code; the script exits 1 if any step failed.
set -u
OUT="${OUT:-$PWD/gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
failed=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, record the exit code
    local name=$1 limit=$2
    shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY install " != *" $name "* ]]; then
        return 0
    fi
    local start=$SECONDS
    echo "== $name: $*" | tee -a "$SUMMARY"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "   exit $rc after $((SECONDS - start)) s" | tee -a "$SUMMARY"
    tail -n 5 "$OUT/$name.log" | sed 's/^/   | /' | tee -a "$SUMMARY" >/dev/null
    [ $rc -eq 0 ] || failed=1
}

# 1. The machine and what is installed.
{
    nvidia-smi || true
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available()); print(torch.cuda.get_device_name(0))'
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt" | tee -a "$SUMMARY"
if ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    echo "no CUDA: this check needs an NVIDIA GPU" | tee -a "$SUMMARY"
    exit 2
fi

# 2. Missing packages: carried wheels first (no network there), else pip.
if [ -d .whl ]; then
    step install 240 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
elif ! "$PY" -c 'import diffusers, transformers, accelerate, bitsandbytes, pydantic, typer, onnxruntime, pytest' 2>/dev/null; then
    step install 300 "$PY" -m pip install -q -e '.[dev]'
fi
"$PY" -c 'import diffusers, transformers, accelerate, bitsandbytes; print("diffusers", diffusers.__version__, "transformers", transformers.__version__, "accelerate", accelerate.__version__, "bitsandbytes", bitsandbytes.__version__)' 2>&1 | tee -a "$SUMMARY"

# 3. The gpu-marked tests (skipped everywhere else).
step pytest-gpu 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider -o addopts=""

# 4. doctor's probes on this machine.
step doctor 60 bash -c "\"$PY\" -m sdtool doctor --json >\"$OUT/doctor.json\""

# 5. The demo end to end on CUDA, both families.
step demo-cuda 180 "$PY" -m sdtool demo --device cuda --dir /tmp/sdtool-demo-cuda --overwrite
step demo-cuda-sdxl 180 "$PY" -m sdtool demo --device cuda --sdxl --dir /tmp/sdtool-demo-cuda-sdxl --overwrite

# 6. Short fp16 / bf16 trainings with SDPA and (when installed) xformers, on the tiny SD1 and SDXL models.
step train-precisions 240 "$PY" benchmarks/gpu_train_check.py --out "$OUT/gpu-train.json"

# 7. The GPU benchmark: SD1.5 U-Net 512² (batch 1 and 8, fp16 and bf16, AdamW8bit + checkpointing) and the SDXL
#    U-Net 1024² (batch 1 and 4, bf16, fused-backward Adafactor and AdamW8bit): step time, images/s, MFU, peak VRAM.
quick=()
[ "${QUICK:-0}" = 1 ] && quick=(--quick)
step bench-unet 480 bash -c "\"$PY\" benchmarks/bench_unet_gpu.py ${quick[*]:-} --json >\"$OUT/bench_unet_gpu.jsonl\""

echo "results in $OUT; summary:" && cat "$SUMMARY"
exit $failed
