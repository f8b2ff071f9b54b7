#!/usr/bin/env bash
# The main job: set up .venv if needed, then run the sampler benchmark (results in out/bench).
# Any arguments replace the default command, e.g. ./run.sh bench samplers --out /tmp/b
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh
if [ $# -eq 0 ]; then
  set -- bench samplers --out out/bench
fi
exec .venv/bin/latentforge "$@"
