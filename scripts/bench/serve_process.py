"""`ea-local serve` in a child process for the server benchmarks, started as the tests start it:
tests/serve_helpers.py is not installed, so it is loaded from its file."""
from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("serve_helpers", Path(__file__).resolve().parents[2] / "tests" / "serve_helpers.py")
_serve_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_serve_helpers)
ServerProcess = _serve_helpers.ServerProcess
