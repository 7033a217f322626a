#!/usr/bin/env bash
# The GPU check, in one command, for a one-GPU Linux machine whose Python has torch and transformers but not nnsight,
# pydantic and the rest of scripts/gpu_wheels.txt, and that may reach no package index:
#
#   1. installs those wheels from a local folder (filled beforehand with scripts/gpu_wheels.sh) into a private
#      folder put first on PYTHONPATH, offline (--no-index), touching nothing else;
#   2. runs the CUDA-marked tests;
#   3. runs the benchmark (benchmarks/gpu.py) on randomly initialised models of real shapes, built on the GPU: the
#      embedded model's shape, and a Llama-3.1-8B shape in bfloat16; writes benchmarks/results/cuda-<gpu>.json.
#
# Without a GPU it runs the same steps on the CPU with small stand-in models (the CUDA tests skip), so the script
# itself can be tried anywhere.
#
#     scripts/gpu_check.sh [--wheels FOLDER] [--out FOLDER]      (or: make gpu-check)
#
# --out also copies the JSON and the log there. PYTHON picks the interpreter (default python3). Each step has a time
# limit, so the whole check ends within 8 minutes: TESTS_LIMIT (default 120 s) and BENCH_LIMIT (default 330 s); the
# benchmark writes its JSON after each model, so a stopped run keeps what it measured ("complete": false).
set -uo pipefail
cd "$(dirname "$0")/.."
wheels=.gpu-wheels
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) wheels=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        *) echo "unknown option $1 (use --wheels FOLDER, --out FOLDER)" >&2; exit 2 ;;
    esac
done
python=${PYTHON:-python3}
tests_limit=${TESTS_LIMIT:-120}
bench_limit=${BENCH_LIMIT:-330}
started=$(date +%s)
log=$(mktemp -t nsteer-gpu-check.XXXXXX.log)
exec > >(tee "$log") 2>&1

step() { echo "[gpu-check $(( $(date +%s) - started )) s] $*"; }

# 1. the wheels
missing=()
while read -r requirement; do
    name=${requirement%%==*}
    pattern=$(echo "$name" | tr '-' '_')
    ls "$wheels"/"$pattern"-*.whl >/dev/null 2>&1 || ls "$wheels"/"$name"-*.whl >/dev/null 2>&1 || missing+=("$requirement")
done < <(grep -v '^\s*\(#\|$\)' scripts/gpu_wheels.txt)
if [ ${#missing[@]} -gt 0 ]; then
    echo "the wheel folder $wheels lacks: ${missing[*]}. Fill it where PyPI is reachable: scripts/gpu_wheels.sh $wheels" >&2
    exit 2
fi
site=$(mktemp -d -t nsteer-site.XXXXXX)
step "installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into $site (offline)"
"$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$site" "$wheels"/*.whl || { echo "installing the wheels failed" >&2; exit 1; }
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
"$python" - <<'PY' || exit 1
import torch, transformers, nnsight, pydantic, nsteer.generate
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU: the CPU fallback runs"
print(f"python ok: torch {torch.__version__}, transformers {transformers.__version__}, nnsight {nnsight.__version__}; {gpu}")
PY

# 2. the CUDA-marked tests (the files that hold them: the rest of the suite needs the IFEval checkers' packages)
files=$(grep -l "mark.cuda" tests/test_*.py | tr '\n' ' ')
step "CUDA-marked tests (at most $tests_limit s): $files"
timeout -k 10 "$tests_limit" "$python" -m pytest -q -p no:cacheprovider -m cuda $files
tests_status=$?

# 3. the benchmark
step "benchmark (at most $bench_limit s)"
timeout -k 10 "$bench_limit" "$python" benchmarks/gpu.py ${out:+--copy-to "$out"}
bench_status=$?

step "done: tests exit $tests_status, benchmark exit $bench_status"
if [ -n "$out" ]; then
    mkdir -p "$out" && cp "$log" "$out/gpu-check.log"
fi
[ $tests_status -eq 0 ] && [ $bench_status -eq 0 ]
