#!/usr/bin/env bash
# On the GPU machine, from the repo root, with .fa3src carried (made here by native/fa3/assemble.sh):
# build the forward-only SM90 FlashAttention-3 extension (head_dim 128, bf16 + e4m3 in, bf16 out) against the
# machine's own torch into /tmp/fa3 and check it against SDPA. Afterwards: export PYTHONPATH=/tmp/fa3:$PYTHONPATH.
# Env: MAX_JOBS (default 16), FA3_OUT (default /tmp/fa3), FA3_SPLIT=0 to compile the library's two instantiation
# files instead of one TU per kernel, FA3_CHECK=0 to skip the check.
set -euo pipefail
OUT_DIR=${FA3_OUT:-/tmp/fa3}
[ -d .fa3src/hopper ] && [ -d .fa3src/csrc/cutlass/include/cute ] \
  || { echo "build_fa3: .fa3src missing or incomplete: carry it (make it with native/fa3/assemble.sh)"; exit 2; }
python3 -c "import torch; assert torch.version.cuda, 'torch without CUDA'" \
  || { echo "build_fa3: python3 has no CUDA torch"; exit 2; }
[ -f .fa3src/SOURCES ] && cat .fa3src/SOURCES
split=(); [ "${FA3_SPLIT:-1}" = 0 ] && split=(--no-split)
start=$(date +%s)
python3 native/fa3/build.py --src .fa3src --out "$OUT_DIR" --jobs "${MAX_JOBS:-16}" "${split[@]}"
echo "build_fa3: build time $(( $(date +%s) - start )) s -> $OUT_DIR (export PYTHONPATH=$OUT_DIR:\$PYTHONPATH)"
if [ "${FA3_CHECK:-1}" != 0 ]; then
  PYTHONPATH="$OUT_DIR:$PWD:${PYTHONPATH:-}" python3 native/fa3/build.py --out "$OUT_DIR" --check
fi
