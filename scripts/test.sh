#!/usr/bin/env bash
# Sets up .venv if needed, then lint + the whole test suite (CPU, two pytest workers: about 12 minutes on 2 cores, most of it the tiny bundle export).
# PYTEST_WORKERS=0 runs it in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check corrclip tests benchmarks
workers=${PYTEST_WORKERS:-2}
dist=()
[ "$workers" != 0 ] && dist=(-n "$workers" --dist loadfile)
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "${dist[@]}" "$@"
