#!/usr/bin/env bash
# The main job: set up .venv if needed, then the default model's demo (latentforge demo): a grid of images
# from a dozen prompts in out/demo/grid.png and the adherence table on 100 held-out prompts.
# Any arguments replace the default command, e.g. ./run.sh bench samplers (the sampler benchmark, out/bench).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh
if [ $# -eq 0 ]; then
  set -- demo --out out/demo
fi
exec .venv/bin/latentforge "$@"
