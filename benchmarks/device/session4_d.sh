#!/usr/bin/env bash
# Session 4, call 5 (nvidia-h200, carry .fa3bin .whl2): where a later-clip forward's time goes with FlashAttention-3
# (bf16, and FP8 linears + FA3 bf16 attention), each family's in-model TFLOP/s, with SM clock and power sampled.
set -o pipefail
export PYTHONPATH=$PWD/.fa3bin:/tmp/site:$PWD PYTHONUNBUFFERED=1
bash benchmarks/device/setup.sh || exit 3
R=$OUT/res; mkdir -p $R
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv -lms 250 > $OUT/clocks.csv &
SMI=$!
for V in torch-compile:fa3 torch-compile:fa3@fp8; do
  timeout 240 python3 -m benchmarks.profile_forward --variant $V --out $R > $OUT/profile_${V//[:@]/-}.log 2>&1
  head -9 $OUT/profile_${V//[:@]/-}.log | grep -v "^$"
done
kill $SMI
python3 - <<'PY'
import csv, os
rows = list(csv.reader(open(os.environ["OUT"] + "/clocks.csv")))[1:]
busy = [r for r in rows if float(r[3].split()[0]) > 300]
if busy:
    clk = sorted(float(r[1].split()[0]) for r in busy); pw = sorted(float(r[3].split()[0]) for r in busy)
    print(f"samples over 300 W: {len(busy)}; SM clock median {clk[len(clk)//2]:.0f} MHz (min {clk[0]:.0f}, max {rows[0][2]}), "
          f"power median {pw[len(pw)//2]:.0f} W (limit {rows[0][4]}), temp max {max(int(r[5]) for r in busy)} C")
PY
