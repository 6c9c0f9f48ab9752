#!/usr/bin/env bash
# On a lent GPU machine, before a long run: the GPU-only tests of what that run exercises, on the tiny model (about
# a minute). A CUDA-only bug then costs a minute of device time, not the session. Exit status is pytest's, so
#   bash benchmarks/device/detached.sh start 'bash benchmarks/device/preflight.sh cache && python3 -m benchmarks.step_cache ...'
# starts the long run only when the checks pass.
#   bash benchmarks/device/preflight.sh cache|offload|serve|all
set -u
cd "$(dirname "$0")/../.."
graph="tests/test_backends.py::test_graph_replay_equals_eager tests/test_backends.py::test_graph_backend_pipeline_end_to_end_on_gpu"
case "${1:?cache, offload, serve or all}" in
  cache)   tests="$graph tests/test_cache.py::test_graph_backend_caches_like_the_eager_backend_on_gpu tests/test_cache.py::test_graph_backend_calibrates_like_the_eager_backend_on_gpu";;
  offload) tests="tests/test_offload.py";;
  serve)   tests="$graph";;
  all)     tests="$graph tests/test_cache.py tests/test_offload.py";;
  *) echo "preflight: unknown target '$1' (cache, offload, serve or all)"; exit 2;;
esac
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 4)" \
  || { echo "preflight: no CUDA device here (these checks would all skip)"; exit 4; }
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
# -rs: a test skipped on the GPU machine names its reason (a check that did not run is not a pass)
# shellcheck disable=SC2086
python3 -m pytest -q -x -rs -p no:cacheprovider -o addopts="" --timeout 600 $tests
