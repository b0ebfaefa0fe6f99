"""Test-only: read intermediate graph tensors through llama.cpp's cb_eval (slow, splits the graph).

Used to check that what the hooks return equals what the model computed.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

from ea_local import kvhooks
import llama_cpp.llama_cpp as ll
import numpy as np

_lib_dir = Path(kvhooks.lib_path).parent
_ggml = ctypes.CDLL(str(next(p for p in sorted(_lib_dir.glob("libggml-base.*")) if p.suffix in (".so", ".dylib") or ".so" in p.name)))
for name, res, args in [
    ("ggml_get_name", ctypes.c_char_p, [ctypes.c_void_p]),
    ("ggml_op_desc", ctypes.c_char_p, [ctypes.c_void_p]),
    ("ggml_nbytes", ctypes.c_size_t, [ctypes.c_void_p]),
    ("ggml_nelements", ctypes.c_int64, [ctypes.c_void_p]),
    ("ggml_backend_tensor_get", None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]),
]:
    getattr(_ggml, name).restype = res
    getattr(_ggml, name).argtypes = args


class Probe:
    """cb_eval that copies out f32 tensors whose name is in `names` and whose op is `op` (a dict
    names -> op chooses the op per name: several graph nodes carry the same name)."""

    def __init__(self, names: set[str] | dict[str, str], op: str = "ROPE"):
        self.want = dict(names) if isinstance(names, dict) else {n: op for n in names}
        self.got: dict[str, list[np.ndarray]] = {}

        @ll.ggml_backend_sched_eval_callback
        def cb(t, ask, user):  # noqa: ANN001
            name = _ggml.ggml_get_name(t).decode()
            if self.want.get(name) != _ggml.ggml_op_desc(t).decode():
                return not ask  # ask: "do you want this one?" no; otherwise keep computing
            if ask:
                return True
            n = _ggml.ggml_nelements(t)
            buf = np.empty(n, dtype=np.float32)
            assert _ggml.ggml_nbytes(t) == 4 * n, "probe expects f32 tensors"
            _ggml.ggml_backend_tensor_get(t, buf.ctypes.data, 0, 4 * n)
            self.got.setdefault(name, []).append(buf)
            return True

        self.cb = cb
