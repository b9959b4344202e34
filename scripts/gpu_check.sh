#!/usr/bin/env bash
# The one GPU check of the static decode step (issue 24), for a CUDA machine without internet (tested against
# torch 2.11 / transformers 5.17): every cuda-marked test, then three benchmarks, in under 8 minutes (each part
# has its own timeout; they add up to 470 s). Writes under assets/eval/gpu/ (or $GPU_CHECK_DIR):
#   gpu_check.json      GPU name, driver, versions, each part's exit status and time (through runinfo)
#   gpu_check_tests.xml the cuda tests' JUnit report
#   static_step.json    static (graphs) vs static+overlap vs eager vs generate (SmolLM2-135M and Llama-3.2-1B
#                       shapes, bf16, 1/4/16 rows)
#   static_compile.json our CUDA graph capture vs torch.compile(mode="reduce-overhead") of the same step
#                       (SmolLM2-135M shape, 1 row, where launches weigh most; compilation is timed apart)
#   ttft_prefill.json   time to first token of 1/4/16 simultaneous arrivals, padded prefill on and off (the
#                       default model's weights; fails, recorded, where the machine lacks them)
# Exit status: 0 when every part succeeded.
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${GPU_CHECK_DIR:-assets/eval/gpu}
mkdir -p "$DIR"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device; nothing run" >&2
    exit 3
fi

# Only the files that hold cuda tests: collecting the whole suite would import what this machine may lack.
mapfile -t FILES < <(grep -l "pytest.mark.cuda" tests/test_*.py)
began=$(date +%s)
timeout 200 python -m pytest -q -p no:cacheprovider -m cuda -rs "${FILES[@]}" --junitxml="$DIR/gpu_check_tests.xml"
tests_rc=$?
tests_s=$(( $(date +%s) - began ))

began=$(date +%s)
timeout 100 python -m benchmarks.gpu_decode --device cuda --shapes smollm2-135m llama-1b \
    --rows 1,4,16 --tokens 128 --warmup 8 --repeats 3 --cuda-graphs on \
    --paths static static-overlap eager generate \
    --note "the GPU check (scripts/gpu_check.sh); machine not shared" --output "$DIR/static_step.json"
bench_rc=$?
bench_s=$(( $(date +%s) - began ))

began=$(date +%s)
timeout 120 python -m benchmarks.gpu_decode --device cuda --shapes smollm2-135m --rows 1 \
    --tokens 128 --warmup 4 --repeats 3 --cuda-graphs on --paths static static-compile --compile-mode reduce-overhead \
    --note "the GPU check (scripts/gpu_check.sh): CUDAGraph capture vs torch.compile reduce-overhead" \
    --output "$DIR/static_compile.json"
compile_rc=$?
compile_s=$(( $(date +%s) - began ))

began=$(date +%s)
timeout 50 python -m benchmarks.ttft --device cuda --arrivals 1,4,16 --repeats 3 --prompt-tokens 64 \
    --note "the GPU check (scripts/gpu_check.sh); machine not shared" --output "$DIR/ttft_prefill.json"
ttft_rc=$?
ttft_s=$(( $(date +%s) - began ))

driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
python - "$DIR/gpu_check.json" "$tests_rc" "$tests_s" "$bench_rc" "$bench_s" "$compile_rc" "$compile_s" "$ttft_rc" \
    "$ttft_s" "$driver" "${FILES[*]}" <<'PY'
import argparse
import sys

import torch

from benchmarks.runinfo import run_metadata, write_result

(path, tests_rc, tests_s, bench_rc, bench_s, compile_rc, compile_s, ttft_rc, ttft_s, driver,
 files) = sys.argv[1:]
args = argparse.Namespace(output=path, test_files=files.split())
payload = {
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "driver": driver or None,
    "cuda_runtime": torch.version.cuda,
    "cuda_tests": {"exit_status": int(tests_rc), "seconds": int(tests_s), "junit": "gpu_check_tests.xml"},
    "benchmark": {"exit_status": int(bench_rc), "seconds": int(bench_s), "result": "static_step.json"},
    "compile_benchmark": {"exit_status": int(compile_rc), "seconds": int(compile_s), "result": "static_compile.json"},
    "ttft_benchmark": {"exit_status": int(ttft_rc), "seconds": int(ttft_s), "result": "ttft_prefill.json"},
}
write_result(path, payload, run_metadata(args, [], "bash scripts/gpu_check.sh"))
print("wrote", path)
PY
echo "cuda tests: exit $tests_rc (${tests_s}s); benchmark: exit $bench_rc (${bench_s}s);" \
    "compile: exit $compile_rc (${compile_s}s); ttft: exit $ttft_rc (${ttft_s}s)"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$compile_rc" -eq 0 ] && [ "$ttft_rc" -eq 0 ]
