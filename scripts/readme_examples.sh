#!/usr/bin/env bash
# Regenerates the README's "Generating" pictures (docs/examples/) with the shipped default model.
set -euo pipefail
cd "$(dirname "$0")/.."
D=docs/examples
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
g() { latentforge generate --quiet "$@"; }
pick() { mv "$(ls -t "$1"/*.png | head -1)" "$D/$2.png"; }
g "a big red circle in the upper left corner on a black background" --seed 1 --out "$T/1" && pick "$T/1" txt2img
g "a big (red:1.4) circle in the upper left corner on a black background" --seed 1 --out "$T/2" && pick "$T/2" weighted
g "a big blue circle in the upper left corner on a black background" --init-image "$D/txt2img.png" \
  --strength 0.7 --seed 1 --out "$T/3" && pick "$T/3" img2img
python - "$D/mask.png" <<'PY'
import sys
from PIL import Image, ImageDraw
m = Image.new("L", (64, 64), 0)
ImageDraw.Draw(m).rectangle([32, 32, 63, 63], fill=255)
m.save(sys.argv[1])
PY
g "a small yellow square in the lower right corner on a black background" --init-image "$D/txt2img.png" \
  --mask "$D/mask.png" --strength 1 --seed 2 --out "$T/4" && pick "$T/4" inpaint
g "a big red circle on a black background" --init-image "$D/txt2img.png" --outpaint 32,0,0,0 \
  --strength 1 --seed 3 --out "$T/5" && pick "$T/5" outpaint
g "a big red circle in the upper left corner on a black background" --seed 1 --hires-scale 2 \
  --hires-denoise 0.5 --out "$T/6" && pick "$T/6" hires
g "a big red circle in the upper left corner on a black background" --seed 1 --subseed 7 \
  --subseed-strength 0.3 --out "$T/7" && pick "$T/7" variation
g --from-image "$D/variation.png" --out "$T/8" && cmp <(python -c "
import sys; from PIL import Image; print(list(Image.open(sys.argv[1]).getdata()))" "$D/variation.png") <(python -c "
import sys, glob; from PIL import Image; print(list(Image.open(glob.glob(sys.argv[1] + '/*.png')[0]).getdata()))" "$T/8") \
  && echo "replayed $D/variation.png: identical pixels"
ls -l "$D"
