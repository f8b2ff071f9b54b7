#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv (sourced by run.sh and test.sh).
# Reinstalls only when pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.latentforge-stamp
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # CPU torch 2.13.0 is on disk on our machines; elsewhere take the platform's normal torch.
    .venv/bin/python -m pip install -q torch==2.13.0 2>/dev/null || .venv/bin/python -m pip install -q "torch>=2.4"
  fi
  .venv/bin/python -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
fi
# k-diffusion 0.1.1 is the reference of tests/test_samplers_comfy.py, which loads only its sampling.py:
# install it without its dependencies (torchvision, clip-anytorch). Offline, those tests skip.
if ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('k_diffusion') is None)"; then
  .venv/bin/python -m pip install -q --no-deps k-diffusion==0.1.1 >/dev/null 2>&1 || true
fi
