#!/usr/bin/env bash
# On the lent GPU machine: install the carried wheels into /tmp/site (PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages).
# Two calls, one right after the other (the machine stays warm ~30 s), because a call carries at most 64 MiB:
#   1. carry .whl1: the first part of the CuTe DSL's 88 MiB cu13 wheel (kept in /tmp), cuDNN frontend, diffusers;
#   2. carry .whl:  its second part, the rest of the CuTe DSL, FlashAttention-4 and its helpers.
# Without FlashAttention-4: carry .whl2 (cuDNN frontend, diffusers) in one call.
set -e
CU13=/tmp/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
CU13_SHA=50191a381d8cc1393373ae0bc879b0aefa9a256c23c22d4fa1c2fe3dfe57bc90
install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@" 2>&1 \
  | grep -v "^WARNING: Target directory" || true; }
if [ -d .whl2 ]; then
  install .whl2/*.whl
fi
if [ -d .whl3 ]; then  # the media stack (PyAV, soxr, ftfy) for the pipeline tests and runtime.generate
  install .whl3/*.whl
fi
if [ -d .whl1 ]; then
  cp .whl1/cu13.part.* /tmp/
  install .whl1/*.whl
fi
if [ -f .whl/cu13.part.ab ]; then
  [ -f /tmp/cu13.part.aa ] || { echo "setup: /tmp/cu13.part.aa missing: run the .whl1 call first, on the same warm machine"; exit 3; }
  cat /tmp/cu13.part.aa .whl/cu13.part.ab > $CU13
  echo "$CU13_SHA  $CU13" | sha256sum -c --quiet
  install .whl/*.whl $CU13
fi
