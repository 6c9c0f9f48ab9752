#!/usr/bin/env bash
# On the lent GPU machine: install the carried wheels (cuDNN frontend, FlashAttention-4 + CuTe DSL, diffusers for
# the official model) into /tmp/site. The CuTe DSL's 88 MiB wheel arrives in two parts (64 MiB per call).
set -e
if [ -d .whl1 ]; then cp .whl1/cu13.part.* /tmp/; fi
if [ -f .whl/cu13.part.ab ] && [ -f /tmp/cu13.part.aa ]; then
  cat /tmp/cu13.part.aa .whl/cu13.part.ab > /tmp/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    $(ls /tmp/nvidia_cutlass_dsl_libs_cu13-*.whl 2>/dev/null) 2>&1 | grep -v "^WARNING: Target directory" || true
fi
