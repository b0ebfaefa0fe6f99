"""llama.cpp's log, routed: quiet unless EA_LOCAL_LLAMA_LOG=1, its error lines kept for a one-line
LlamaError, and while a model loads, its lines about where layers and buffers went (apps/placement.py).

llama.cpp calls the log callback from inside the model load, where a KeyboardInterrupt raised in the
callback is printed and dropped by ctypes; the SIGINT handler installed here delivers Ctrl-C again
once the callback has returned.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

import llama_cpp.llama_cpp as ll

_log_silenced = False
_last_error: list[str] = []  # llama.cpp's recent error-level log lines


def load_error() -> str:
    """': <why llama.cpp refused the model>' from its error lines (consumed), or ''."""
    msg = next((m for m in _last_error if "error loading model: " in m), _last_error[-1] if _last_error else "")
    _last_error.clear()
    return f": {msg.split('error loading model: ', 1)[-1]}" if msg else ""


# while a Runtime loads, llama.cpp's own lines about where layers and buffers went (placement.py)
_log_sink: list[str] | None = None
_PLACEMENT_PREFIXES = (b"load_tensors:", b"llama_kv_cache:", b"llama_kv_cache_iswa:")


def install() -> None:
    """llama.cpp logs to stderr by default; keep it quiet unless EA_LOCAL_LLAMA_LOG=1 (then it is passed
    through). The placement lines are kept either way while a Runtime loads."""
    global _log_silenced, _log_cb
    if _log_silenced:
        return
    echo = os.environ.get("EA_LOCAL_LLAMA_LOG") == "1"

    def _cb_py(level, text, user_data):  # noqa: ANN001
        if level == 4 and text:  # GGML_LOG_LEVEL_ERROR (ggml.h): why a load failed, for LlamaError's one line
            _last_error[:] = _last_error[-7:] + [text.decode("utf-8", errors="replace").strip()]
        if _log_sink is not None and text and text.startswith(_PLACEMENT_PREFIXES):
            _log_sink.append(text.decode("utf-8", errors="replace"))
        if echo and text:
            sys.stderr.write(text.decode("utf-8", errors="replace"))
        return None

    def _sigint(signum, frame):  # noqa: ANN001
        # Ctrl-C while llama.cpp is inside this log callback (model load): a KeyboardInterrupt raised there is
        # printed and dropped by ctypes ("Exception ignored") and the load goes on. Deliver it again shortly.
        if frame is not None and frame.f_code is _cb_code:
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
            return
        raise KeyboardInterrupt

    _cb = ll.llama_log_callback(_cb_py)
    _cb_code = _cb_py.__code__
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _sigint)

    _log_cb = _cb  # keep a reference: ctypes callbacks must outlive their use
    ll.llama_log_set(_log_cb, ctypes.c_void_p())
    _log_silenced = True


@contextmanager
def placement_lines() -> Iterator[list[str]]:
    """The placement lines llama.cpp logs inside this block."""
    global _log_sink
    install()
    _log_sink = lines = []
    try:
        yield lines
    finally:
        _log_sink = None
