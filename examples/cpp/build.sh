#!/usr/bin/env bash
# Builds run_aoti against the torch wheel's own headers and libraries (no separate libtorch).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-../../.venv/bin/python}
T=$("$PY" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
ABI=$("$PY" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
g++ -std=c++20 -O2 -D_GLIBCXX_USE_CXX11_ABI="$ABI" run_aoti.cpp -o "${OUT:-run_aoti}" \
  -I"$T/include" -I"$T/include/torch/csrc/api/include" -L"$T/lib" -Wl,-rpath,"$T/lib" \
  -Wl,--no-as-needed -ltorch -ltorch_cpu -lc10 -Wl,--as-needed
echo "built ${OUT:-run_aoti}"
