#!/usr/bin/env bash
# Create .venv and install lmlab into it. PyTorch is pinned and installed first (a CPU wheel on
# the lab machines); pyproject keeps torch>=2.4 so GPU users can bring their own build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0" 2>&1 | grep -v '^WARNING: Location' || true
python -m pip install -q -e ".[${LMLAB_EXTRAS:-test}]" 2>&1 | grep -v '^WARNING: Location' || true
python -c "import torch, lmlab; print(f'lmlab {lmlab.__version__} with torch {torch.__version__} ready in .venv')"
