#!/usr/bin/env bash
# The one GPU check of the static decode step (issue 24), for a CUDA machine without internet (tested against
# torch 2.11 / transformers 5.17): every cuda-marked test, then the static-vs-eager-vs-generate benchmark, in
# under 8 minutes. Writes under assets/eval/gpu/ (or $GPU_CHECK_DIR):
#   gpu_check.json      GPU name, driver, versions, each part's exit status and time (through runinfo)
#   gpu_check_tests.xml the cuda tests' JUnit report
#   static_step.json    the benchmark (SmolLM2-135M and Llama-3.2-1B shapes, bf16, 1/4/16 rows)
# Exit status: 0 when the tests and the benchmark both succeeded.
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
timeout 240 python -m pytest -q -p no:cacheprovider -m cuda -rs "${FILES[@]}" --junitxml="$DIR/gpu_check_tests.xml"
tests_rc=$?
tests_s=$(( $(date +%s) - began ))

began=$(date +%s)
timeout 330 python -m benchmarks.gpu_decode --device cuda --shapes smollm2-135m llama-1b \
    --rows 1,4,16 --tokens 128 --warmup 8 --repeats 3 --cuda-graphs on \
    --note "the GPU check (scripts/gpu_check.sh); machine not shared" --output "$DIR/static_step.json"
bench_rc=$?
bench_s=$(( $(date +%s) - began ))

driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
python - "$DIR/gpu_check.json" "$tests_rc" "$tests_s" "$bench_rc" "$bench_s" "$driver" "${FILES[*]}" <<'PY'
import argparse
import sys

import torch

from benchmarks.runinfo import run_metadata, write_result

path, tests_rc, tests_s, bench_rc, bench_s, driver, files = sys.argv[1:]
args = argparse.Namespace(output=path, test_files=files.split())
payload = {
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "driver": driver or None,
    "cuda_runtime": torch.version.cuda,
    "cuda_tests": {"exit_status": int(tests_rc), "seconds": int(tests_s), "junit": "gpu_check_tests.xml"},
    "benchmark": {"exit_status": int(bench_rc), "seconds": int(bench_s), "result": "static_step.json"},
}
write_result(path, payload, run_metadata(args, [], "bash scripts/gpu_check.sh"))
print("wrote", path)
PY
echo "cuda tests: exit $tests_rc (${tests_s}s); benchmark: exit $bench_rc (${bench_s}s)"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
