#!/usr/bin/env bash
# Run the whole test suite (sets up first; a cached setup takes seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --no-demo
exec .venv/bin/python -m pytest -q "$@"
