"""ggml's backend registry through ctypes (libggml is already loaded by libllama).

The functions are looked up through libllama's own handle: dlsym searches libllama's dependencies,
so these are the libggml/libggml-base copies libllama uses. Opening libggml.so by path instead would
load a second copy (the wheel holds libggml.so and libggml.so.0 as separate files) with its own,
empty registry.
"""
from __future__ import annotations

import ctypes
import functools

from . import kvhooks  # loads libllama (and with it libggml*) first

_SIGS = {
    "ggml_backend_reg_count": ([], ctypes.c_size_t),
    "ggml_backend_reg_get": ([ctypes.c_size_t], ctypes.c_void_p),
    "ggml_backend_reg_by_name": ([ctypes.c_char_p], ctypes.c_void_p),
    "ggml_backend_reg_get_proc_address": ([ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p),
    "ggml_backend_reg_dev_count": ([ctypes.c_void_p], ctypes.c_size_t),
    "ggml_backend_reg_dev_get": ([ctypes.c_void_p, ctypes.c_size_t], ctypes.c_void_p),
    "ggml_backend_reg_name": ([ctypes.c_void_p], ctypes.c_char_p),
    "ggml_backend_dev_count": ([], ctypes.c_size_t),
    "ggml_backend_dev_get": ([ctypes.c_size_t], ctypes.c_void_p),
    "ggml_backend_dev_name": ([ctypes.c_void_p], ctypes.c_char_p),
    "ggml_backend_dev_description": ([ctypes.c_void_p], ctypes.c_char_p),
    "ggml_backend_dev_type": ([ctypes.c_void_p], ctypes.c_int),
    "ggml_backend_dev_backend_reg": ([ctypes.c_void_p], ctypes.c_void_p),
}

# enum ggml_backend_dev_type (ggml-backend.h)
DEV_CPU, DEV_GPU, DEV_IGPU, DEV_ACCEL = 0, 1, 2, 3


@functools.lru_cache(maxsize=None)
def fn(name: str):
    """The registry function `name`, a private function object (no argtypes shared with other callers)."""
    args, res = _SIGS[name]
    return ctypes.CFUNCTYPE(res, *args)((name, kvhooks._lib))
