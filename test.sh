#!/usr/bin/env bash
# The whole test suite: set up .venv if needed, lint and format-check with ruff, then pytest.
# Extra arguments go to pytest (e.g. ./test.sh -m slow).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q -m "not slow" "$@"
