"""ctypes declarations of the patched C API (include/llama-ea.h in patches/); no logic.

Loads through llama-cpp-python's own `_lib`, so llama_cpp must be importable. The library
itself is already in the process: `ea_local/__init__.py` loads it before numpy (DESIGN.md).
"""
from __future__ import annotations

import ctypes

import llama_cpp
from llama_cpp import llama_cpp as _ll

API_VERSION = 2
SCOPE_ALL = 0
SCOPE_GLOBAL = 1

_lib = _ll._lib
_ctx = _ll.llama_context_p_ctypes
_i32 = ctypes.c_int32
_pos_p = ctypes.POINTER(ctypes.c_int32)
_f32_p = ctypes.POINTER(ctypes.c_float)
_i32_p = ctypes.POINTER(ctypes.c_int32)
_size_p = ctypes.POINTER(ctypes.c_size_t)
_void_pp = ctypes.POINTER(ctypes.c_void_p)


class PatchedBuildMissing(ImportError):
    pass


if not hasattr(_lib, "llama_ea_api_version"):
    raise PatchedBuildMissing(
        f"ea_local needs the patched llama.cpp build, but {getattr(_lib, '_name', 'libllama')} is stock "
        "llama-cpp-python: run `python scripts/build_llama.py --install` (or scripts/setup.sh)"
    )


def _decl(name: str, argtypes: list, restype) -> None:
    fn = getattr(_lib, name)
    fn.argtypes = argtypes
    fn.restype = restype


_decl("llama_ea_api_version", [], _i32)
_decl("llama_ea_kv_layer_info", [_ctx, _i32, _i32_p, _i32_p, _i32_p, _i32_p, _i32_p], _i32)
_decl("llama_ea_kv_count", [_ctx, _i32, _i32], _i32)
_decl("llama_ea_kv_read", [_ctx, _i32, _i32, _i32, _pos_p, _f32_p, _f32_p], _i32)
_decl("llama_ea_kv_vnorm", [_ctx, _i32, _i32, _i32, _pos_p, _f32_p], _i32)
_decl("llama_ea_seq_rm_positions", [_ctx, _i32, _pos_p, _i32, ctypes.c_int], _i32)
_decl("llama_ea_seq_remap", [_ctx, _i32, _pos_p, _pos_p, _i32], _i32)
_decl("llama_ea_kv_row_info", [_ctx, _i32, _size_p, _size_p, _i32_p, _i32_p], _i32)
_decl("llama_ea_kv_read_raw", [_ctx, _i32, _i32, _pos_p, _i32, ctypes.c_void_p, ctypes.c_void_p], _i32)
_decl("llama_ea_seq_restore", [_ctx, _i32, _i32, _pos_p, _pos_p, _i32_p, _i32_p, _i32, _void_pp, _void_pp, ctypes.c_int],
      _i32)
_decl("llama_ea_capture_layers", [_ctx, _i32_p, _i32], _i32)
_decl("llama_ea_capture_enable", [_ctx, ctypes.c_bool], None)
_decl("llama_ea_capture_clear", [_ctx], None)
_decl("llama_ea_capture_get", [_ctx, _i32, _i32, _pos_p, _f32_p], _i32)

if _lib.llama_ea_api_version() != API_VERSION:
    raise PatchedBuildMissing(
        f"the patched llama.cpp speaks hook API v{_lib.llama_ea_api_version()}, ea_local needs v{API_VERSION}: "
        "rebuild with `python scripts/build_llama.py --install`"
    )

api_version = _lib.llama_ea_api_version
kv_layer_info = _lib.llama_ea_kv_layer_info
kv_count = _lib.llama_ea_kv_count
kv_read = _lib.llama_ea_kv_read
kv_vnorm = _lib.llama_ea_kv_vnorm
seq_rm_positions = _lib.llama_ea_seq_rm_positions
seq_remap = _lib.llama_ea_seq_remap
kv_row_info = _lib.llama_ea_kv_row_info
kv_read_raw = _lib.llama_ea_kv_read_raw
seq_restore = _lib.llama_ea_seq_restore
capture_layers = _lib.llama_ea_capture_layers
capture_enable = _lib.llama_ea_capture_enable
capture_clear = _lib.llama_ea_capture_clear
capture_get = _lib.llama_ea_capture_get
lib_path = getattr(_lib, "_name", "")
llama_cpp_version = llama_cpp.__version__
