"""Load llama.cpp's shared library before anything imports numpy.

On the CUDA build, numpy imported before libllama made `llama_model_load_from_file` segfault
(DESIGN.md). Every entry point (the CLI, the server, the bench, tests, scripts) imports the
`ea_local` package first, so loading the library from its `__init__` orders it once for all.

This dlopens the file `llama_cpp.llama_cpp` loads when it is imported (`LLAMA_CPP_LIB_PATH`, or the
package's `lib/` directory: llama_cpp/_ctypes_extensions.py `load_shared_library`) with the same
flags, so that import later gets the library already in the process. ctypes rather than
`import llama_cpp` because the llama_cpp package also imports numpy, jinja2 and its chat
formats (~0.6 s), which `ea-local --help` does not need.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from pathlib import Path

_NAMES = {"linux": ("libllama.so",), "freebsd": ("libllama.so",), "darwin": ("libllama.so", "libllama.dylib")}


def lib_file() -> Path | None:
    """The libllama llama_cpp will load, or None where it cannot be found without importing it."""
    names = next((n for p, n in _NAMES.items() if sys.platform.startswith(p)), ())
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    if override:
        base = Path(override)
    else:
        spec = importlib.util.find_spec("llama_cpp")  # finds the package without running its __init__
        if spec is None or not spec.submodule_search_locations:
            return None
        base = Path(next(iter(spec.submodule_search_locations))) / "lib"
    return next((base / n for n in names if (base / n).exists()), None)


def preload() -> str | None:
    """dlopen libllama (and with it libggml*); its path, or None where it was not loaded here.

    Never raises: without llama_cpp, or with a library that does not load, the engine's own
    import (`ea_local.kvhooks`) says what is wrong and how to fix it.
    """
    path = lib_file()
    if path is None:
        return None
    try:
        ctypes.CDLL(str(path))  # llama_cpp passes no mode either: same handle when it loads it again
    except OSError:
        return None
    return str(path)
