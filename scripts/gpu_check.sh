#!/usr/bin/env bash
# The one GPU check of the static decode step (issue 24), for a CUDA machine without internet (tested against
# torch 2.11 / transformers 5.17): every cuda-marked test, then the benchmark in parts, in under 8 minutes (each
# part has its own timeout; they add up to 470 s, and a part stopped by its timeout keeps the shapes it finished:
# benchmarks/gpu_decode.py writes its JSON after each). Writes under assets/eval/gpu/ (or $GPU_CHECK_DIR):
#   gpu_check.json        GPU name, driver, versions, each part's exit status and time (through runinfo), and
#                         the issue's targets with what was measured (benchmarks/gpu_targets.py; also printed)
#   gpu_check_tests.xml   the cuda tests' JUnit report
#   static_single.json    (a)+(d) one conversation, 512 timed tokens x 3 rounds, static step with graphs and with
#                         overlap, the SmolLM2-135M, Llama-3.2-1B and Llama-3.1-8B shapes in bf16, with roofline
#   static_rows.json      (b) 1..64 conversations, graphs vs eager, p50/p95 inter-token latency (SmolLM2-135M)
#   static_peers.json     (c) our step vs plain generate vs transformers' static cache + its own torch.compile
#                         (Llama-3.1-8B first, then SmolLM2-135M shapes; 1 row, 256 timed tokens)
#   static_compile.json   our CUDA graph capture vs torch.compile(mode="reduce-overhead") of the same step
#                         (SmolLM2-135M shape, 1 row, where launches weigh most; compilation is timed apart)
#   ttft_prefill.json     time to first token of 1/4/16 simultaneous arrivals, padded prefill on and off (the
#                         default model's weights; fails, recorded, where the machine lacks them)
# Exit status: 0 when every part succeeded.
#
# GPU_CHECK_REHEARSE=1 runs the same parts on the CPU at toy sizes (tiny shape, a few tokens; the cuda tests skip),
# so that the script itself is tested before its one GPU run (tests/test_gpu_check.py does this in `make test`).
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${GPU_CHECK_DIR:-assets/eval/gpu}
mkdir -p "$DIR"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False

REHEARSE=${GPU_CHECK_REHEARSE:-0}
DEVICE=cuda
SCALE=1   # timeouts are multiplied by it: a rehearsal on a shared 2-core CPU may be slower than the GPU
SMALL=()  # appended last to every benchmark's options: argparse keeps an option's last value
if [ "$REHEARSE" = 1 ]; then
    DEVICE=cpu
    SCALE=4
    SMALL=(--device cpu --cuda-graphs auto --threads 1 --shapes tiny --rows 1,2 --tokens 3 --warmup 1 --repeats 1
           --prompt 10 --recent-size 12)
elif ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device; nothing run" >&2
    exit 3
fi

# Only the files that hold cuda tests: collecting the whole suite would import what this machine may lack.
mapfile -t FILES < <(grep -l "pytest.mark.cuda" tests/test_*.py)
began=$(date +%s)
timeout $(( 100 * SCALE )) python -m pytest -q -p no:cacheprovider -m cuda -rs "${FILES[@]}" --junitxml="$DIR/gpu_check_tests.xml"
tests_rc=$?
tests_s=$(( $(date +%s) - began ))

PARTS=()
# part NAME TIMEOUT COMMAND...: run it, note its exit status and seconds for gpu_check.json.
part() {
    local name=$1 limit=$2
    shift 2
    local began
    began=$(date +%s)
    timeout "$(( limit * SCALE ))" "$@"
    local rc=$?
    PARTS+=("$name" "$rc" "$(( $(date +%s) - began ))")
    echo "gpu_check: $name exit $rc"
}
NOTE="the GPU check (scripts/gpu_check.sh); machine not shared"
[ "$REHEARSE" = 1 ] && NOTE="a rehearsal of the GPU check on the CPU (GPU_CHECK_REHEARSE=1): toy sizes, no figures"
GD=(python -m benchmarks.gpu_decode --device "$DEVICE" --cuda-graphs on --warmup 8 --repeats 3)

part single 80 "${GD[@]}" --shapes smollm2-135m llama-1b llama-8b --rows 1 --tokens 512 \
    --paths static static-overlap --note "$NOTE" --output "$DIR/static_single.json" "${SMALL[@]}"
part rows 90 "${GD[@]}" --shapes smollm2-135m --rows 1,2,4,8,16,32,64 --tokens 64 \
    --paths static eager --note "$NOTE" --output "$DIR/static_rows.json" "${SMALL[@]}"
part peers 120 "${GD[@]}" --shapes llama-8b smollm2-135m --rows 1 --tokens 256 \
    --paths static generate hf-static --note "$NOTE: transformers compiles hf-static itself" \
    --output "$DIR/static_peers.json" "${SMALL[@]}"
COMPILE=(--paths static static-compile --compile-mode reduce-overhead)
[ "$REHEARSE" = 1 ] && COMPILE=(--paths static)  # inductor takes minutes on a CPU; the tests trace this step
part compile 50 "${GD[@]}" --shapes smollm2-135m --rows 1 --tokens 128 "${COMPILE[@]}" \
    --note "$NOTE: CUDAGraph capture vs torch.compile reduce-overhead" --output "$DIR/static_compile.json" "${SMALL[@]}"
TTFT=(--arrivals 1,4,16 --repeats 3 --prompt-tokens 64)
[ "$REHEARSE" = 1 ] && TTFT=(--arrivals 1,2 --repeats 1 --prompt-tokens 8 --threads 1)
part ttft 30 python -m benchmarks.ttft --device "$DEVICE" "${TTFT[@]}" --note "$NOTE" --output "$DIR/ttft_prefill.json"

driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
python - "$DIR/gpu_check.json" "$REHEARSE" "$tests_rc" "$tests_s" "$driver" "${FILES[*]}" "${PARTS[@]}" <<'PY'
import argparse
import sys
from pathlib import Path

import torch

from benchmarks.gpu_targets import check, report
from benchmarks.runinfo import run_metadata, write_result

path, rehearse, tests_rc, tests_s, driver, files, *parts = sys.argv[1:]
args = argparse.Namespace(output=path, test_files=files.split())
results = {"single": "static_single.json", "rows": "static_rows.json", "peers": "static_peers.json",
           "compile": "static_compile.json", "ttft": "ttft_prefill.json"}
payload = {
    "rehearsal": rehearse == "1",  # toy sizes on the CPU: a test of this script, not a measurement
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "driver": driver or None,
    "cuda_runtime": torch.version.cuda,
    "cuda_tests": {"exit_status": int(tests_rc), "seconds": int(tests_s), "junit": "gpu_check_tests.xml"},
    "parts": {name: {"exit_status": int(rc), "seconds": int(seconds), "result": results[name]}
              for name, rc, seconds in zip(parts[::3], parts[1::3], parts[2::3])},
    # The issue's targets (stated for an H200) against what the parts measured (benchmarks/gpu_targets.py).
    "targets": check(Path(path).parent),
}
write_result(path, payload, run_metadata(args, [], "bash scripts/gpu_check.sh"))
print("wrote", path)
print(report(payload["targets"]))
PY
failed=$(( tests_rc != 0 ))
for (( k = 1; k < ${#PARTS[@]}; k += 3 )); do
    [ "${PARTS[$k]}" -eq 0 ] || failed=1
done
echo "cuda tests: exit $tests_rc (${tests_s}s); parts (name, exit, seconds): ${PARTS[*]}"
[ "$failed" -eq 0 ]
