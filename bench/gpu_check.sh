#!/usr/bin/env bash
# The GPU check in one command (README: "GPU check"). On the GPU machine, from the
# repository root, with the wheels from bench/gpu_check_fetch.sh carried in .whl:
#
#     bash bench/gpu_check.sh "$OUT"
#
# Everything lands flat in the folder given (default runs/gpu-check/<time>); the stages, their
# time limits and the budget are in polycom_megatron/bench/gpu_check.py. Extra arguments
# go to it (e.g. --cpu-rehearsal, --budget 300). Exit status 0 only when every stage passed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/gpu-check/$(date -u +%Y%m%d-%H%M%S)}"
[ $# -gt 0 ] && shift
# The repository's .venv where there is one (a developer's machine, CI), else python3 (the
# GPU machine's Python with torch); PYTHON overrides. The source tree is importable before
# any install, so the driver itself needs nothing but torch.
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  [ -x .venv/bin/python ] && PYTHON=.venv/bin/python
fi
PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
  exec "$PYTHON" -m polycom_megatron.bench.gpu_check --out "$out" "$@"
