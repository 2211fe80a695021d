#!/usr/bin/env bash
# One prepared device check, for a machine with an NVIDIA GPU and torch + Triton installed (no network needed).
#
#   bash benchmarks/gpu_check.sh OUT_DIR               # runs everything, at most ~8 minutes
#   bash benchmarks/gpu_check.sh --dry-run OUT_DIR     # prints what it would run, runs nothing
#   bash benchmarks/gpu_check.sh --wheels .whl OUT_DIR # first installs carried wheels (default: .whl if present)
#
# Steps, in order of importance, each under its own timeout and all under one budget (--budget, default 470 s):
# the Triton kernel tests compiled on CUDA; the kernels' ahead-of-time report for this GPU's architecture; the
# kernel benchmarks against their references at real sizes; `corrclip bench` (vit_b, random weights) at 8x8 and
# 32x32 SAM prompts in bf16 and fp32; the harness against the research-style path. A step that times out or fails
# is recorded and the next one runs. Writes OUT_DIR/gpu_check.md and OUT_DIR/gpu_check.json (every step's command,
# exit code, seconds and log tail; the bench and harness JSON).
#
# Packages a bare GPU machine lacks (open_clip_torch and its ftfy/wcwidth, segment-anything) travel as wheels,
# built here with the ordinary pip client (pure Python, or abi3 for wcwidth):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip wheel --no-deps -w .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 segment-anything==1.0
# (about 2.4 MB). With the device tool: run(command="bash benchmarks/gpu_check.sh $OUT", carry=[".whl"]).
set -uo pipefail

usage() {
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
    echo "options: --dry-run, --wheels DIR, --budget SECONDS (default 470), -h/--help"
}

dry=0
wheels=""
budget=470
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry=1 ;;
        --wheels) wheels="${2:?--wheels needs a folder}"; shift ;;
        --budget) budget="${2:?--budget needs seconds}"; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
        *) out="$1" ;;
    esac
    shift
done
if [ -z "$out" ]; then
    echo "gpu_check.sh: give an output folder, e.g. bash benchmarks/gpu_check.sh --dry-run /tmp/check" >&2
    exit 2
fi

repo="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
[ -z "$wheels" ] && [ -d "$repo/.whl" ] && wheels="$repo/.whl"

bench() {  # corrclip bench at one SAM grid and precision
    echo "$py -m corrclip.cli bench --backbone vit_b --weights random --synthetic 1 --size 500x375 --preset voc21" \
         "--points-per-side $1 --precision $2 --warmup 2 --runs 5 --no-flops --json $work/bench_${1}x${1}_$2.json"
}

# name | seconds at most | command (run from the repository root)
steps=(
    "environment|30|nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; $py -c \"import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())\""
    "kernel_tests_compiled|150|$py -m pytest -q -p no:cacheprovider -rs tests/test_kernels_dispatch.py tests/test_kernels_correlation.py tests/test_kernels_merging.py tests/test_kernels_stitch_vote.py tests/test_kernels_sam_post.py tests/test_kernels_aot.py"
    "aot_report|60|$py -m corrclip.kernels.aot --arch 90"
    "kernels_correlation|90|$py benchmarks/kernels_correlation.py --warmup 5 --runs 20"
    "kernels_post|75|$py benchmarks/kernels_post.py --skip-library --repeats 10"
    "bench_8x8_bf16|60|$(bench 8 bf16)"
    "bench_8x8_fp32|60|$(bench 8 fp32)"
    "bench_32x32_bf16|75|$(bench 32 bf16)"
    "bench_32x32_fp32|75|$(bench 32 fp32)"
    "harness|150|$py benchmarks/harness.py --backbone vit_b --weights random --workloads voc --points 32,8 --runs 3 --warmup 1 --device cuda --name gpu_check --out $work"
)
if [ -n "$wheels" ]; then
    steps=("wheels|60|$py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $work/site $wheels/*.whl" "${steps[@]}")
fi

if [ "$dry" = 1 ]; then
    echo "gpu_check.sh --dry-run: would run, from $repo, with PYTHONPATH=$repo${wheels:+:$work/site}," \
         "TRITON_INTERPRET unset, within $budget s:"
    for step in "${steps[@]}"; do
        IFS='|' read -r name limit cmd <<< "$step"
        echo "[$name] timeout ${limit}s: $cmd"
    done
    echo "then: $py benchmarks/gpu_report.py $work $out  (writes $out/gpu_check.md and $out/gpu_check.json)"
    rm -rf "$work"
    exit 0
fi

mkdir -p "$out"
cd "$repo" || exit 1
unset TRITON_INTERPRET
export PYTHONPATH="$repo${wheels:+:$work/site}${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
deadline=$(( $(date +%s) + budget ))
: > "$work/steps.tsv"
gpu=1
for step in "${steps[@]}"; do
    IFS='|' read -r name limit cmd <<< "$step"
    left=$(( deadline - $(date +%s) ))
    if [ "$gpu" = 0 ] || [ "$left" -lt 15 ]; then
        printf '%s\t%s\t%s\t0\t%s\n' "$name" "$limit" "$([ "$gpu" = 0 ] && echo nogpu || echo skipped)" "$cmd" \
            >> "$work/steps.tsv"
        continue
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (at most ${limit}s)"
    start=$(date +%s)
    timeout --kill-after=10 "$limit" bash -c "$cmd" > "$work/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$limit" "$rc" "$(( $(date +%s) - start ))" "$cmd" >> "$work/steps.tsv"
    tail -n 3 "$work/$name.log"
    echo "== $name: exit $rc"
    [ "$name" = environment ] && [ "$rc" != 0 ] && gpu=0  # no usable GPU: the rest would measure nothing
done
"$py" benchmarks/gpu_report.py "$work" "$out"
