#!/usr/bin/env bash
# Creates .venv with corrclip and everything it needs (about 2 minutes and 6 GB on a fresh machine).
# Re-running is cheap: it reinstalls only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.corrclip-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch comes from the package registry (its CUDA build also runs on the CPU; the CPU-only wheel
# has no matching torchvision, which open_clip and segment_anything import).
# serve: PyTriton (Triton Inference Server), which pins numpy<2 and with it OpenCV 4.11 (pyproject.toml).
.venv/bin/python -m pip install -q -e ".[dev,openvino,ray,serve]"
echo "$want" > "$stamp"
