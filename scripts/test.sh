#!/usr/bin/env bash
# Sets up .venv if needed, then lint + the whole test suite (CPU; about 10 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check corrclip tests benchmarks
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
