"""The one owner of llama.cpp state: model, context, batch, sequence state and the KV-cell hooks.

Thin and mechanical, in the spirit of llama-cpp-python's low-level bindings: every method
maps to a few C calls. Policy, budget and bookkeeping live in `session.py`.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field

import llama_cpp.llama_cpp as ll
import numpy as np

from .. import build_info, kvhooks
from . import llama_log

CACHE_TYPES = {"f32": ll.GGML_TYPE_F32, "f16": ll.GGML_TYPE_F16, "q8_0": ll.GGML_TYPE_Q8_0, "q4_0": ll.GGML_TYPE_Q4_0}


class LlamaError(RuntimeError):
    pass




@dataclass(frozen=True)
class ContextConfig:
    n_ctx: int
    n_batch: int = 512
    cache_type: str = "f16"
    flash_attn: bool | None = None  # None: on when the V cache is quantized
    swa_full: bool = True
    n_threads: int | None = None
    # layers offloaded to the GPU (and RPC) devices; EA_LOCAL_N_GPU_LAYERS sets the default (like OLLAMA's
    # num_gpu); None: every layer on a build with a GPU device or with RPC servers (llama.cpp's own default,
    # -1), 0 on a CPU build (build_info.default_gpu_layers)
    n_gpu_layers: int | None = field(default_factory=lambda: _env_int("EA_LOCAL_N_GPU_LAYERS"))
    seed: int = 0
    # CPU weight repacking (llama.cpp's extra buffer types, faster CPU matmuls). An RPC server's CPU device
    # never repacks, so a local run matches a remote one bit for bit only with this off (EA_LOCAL_REPACK=0)
    repack: bool = field(default_factory=lambda: _repack_default())
    # llama.cpp RPC servers ("HOST:PORT"; ea_local/rpc.py), in front of the local GPUs; EA_LOCAL_RPC sets the default
    rpc: tuple[str, ...] = field(default_factory=lambda: tuple(filter(None, os.environ.get("EA_LOCAL_RPC", "").split(","))))


def _repack_default() -> bool:
    return os.environ.get("EA_LOCAL_REPACK", "1") != "0"


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v else None


class SharedModel:
    """One loaded llama_model that several contexts use (the server's slots): the weights load once.

    llama.cpp allows many contexts on one model; each context has its own KV cache and state."""

    def __init__(self, model_path: str, n_gpu_layers: int | None = None, rpc: tuple[str, ...] = (),
                 repack: bool | None = None):
        llama_log.install()
        ll.llama_backend_init()
        mp = ll.llama_model_default_params()
        ngl = _env_int("EA_LOCAL_N_GPU_LAYERS") if n_gpu_layers is None else n_gpu_layers
        mp.n_gpu_layers = ngl if ngl is not None else build_info.default_gpu_layers(bool(rpc))
        mp.use_extra_bufts = _repack_default() if repack is None else repack
        self.path = model_path
        self.rpc: tuple[str, ...] = ()
        self._devices = None
        if rpc:
            from .. import rpc as _rpc  # RpcError (a ValueError) for a bad or unreachable endpoint

            endpoints = _rpc.parse_endpoints(rpc)
            self._devices = _rpc.model_devices(endpoints)  # kept alive: llama.cpp reads it at load
            mp.devices = ctypes.cast(self._devices, ctypes.c_void_p)
            self.rpc = endpoints
            _rpc.acquire(endpoints)
        self.ptr = ll.llama_model_load_from_file(model_path.encode(), mp)
        if not self.ptr:
            self.close()
            raise LlamaError(f"llama.cpp could not load {model_path}{llama_log.load_error()}")

    @property
    def rpc_devices(self) -> list[int]:
        """The ggml devices (RPC servers first, then local GPUs) the model was loaded onto; [] without RPC."""
        return [d for d in self._devices if d] if self._devices is not None else []

    def close(self) -> None:
        if getattr(self, "ptr", None):
            ll.llama_model_free(self.ptr)
            self.ptr = None
        if getattr(self, "rpc", ()):
            from .. import rpc as _rpc

            _rpc.release(self.rpc)
            self.rpc = ()

    def __del__(self) -> None:
        self.close()


class Runtime:
    """One llama.cpp context: its model (loaded here or shared), batches, the KV hooks, the sequence state."""
    def __init__(self, model_path: str, cfg: ContextConfig, cb_eval=None, shared: SharedModel | None = None):
        llama_log.install()
        ll.llama_backend_init()
        with llama_log.placement_lines() as self.load_log:  # where this load put layers (placement.py reads them)
            self._load(model_path, cfg, cb_eval, shared)

    def _load(self, model_path: str, cfg: ContextConfig, cb_eval, shared: SharedModel | None = None) -> None:
        if cfg.cache_type not in CACHE_TYPES:
            raise ValueError(f"unknown cache type {cfg.cache_type!r}; choose from {', '.join(CACHE_TYPES)}")
        # the context's own model unless one is shared (the server's slots): freed by its owner
        self._own = SharedModel(model_path, cfg.n_gpu_layers, cfg.rpc, cfg.repack) if shared is None else None
        self.loaded = shared or self._own
        self.model = self.loaded.ptr
        self.vocab = ll.llama_model_get_vocab(self.model)
        cp = ll.llama_context_default_params()
        cp.n_ctx = cfg.n_ctx
        cp.n_batch = cfg.n_batch
        cp.n_ubatch = cfg.n_batch
        cp.n_seq_max = 2  # seq 1 is used for masked references and question-aware copies
        cp.kv_unified = True
        # EA_LOCAL_THREADS: on a shared or oversubscribed machine, ggml's spinning worker threads
        # slow every process down; 1 thread per process is then faster
        threads = cfg.n_threads or int(os.environ.get("EA_LOCAL_THREADS", "0")) or max(1, (os.cpu_count() or 2))
        cp.n_threads = threads
        cp.n_threads_batch = threads
        cp.type_k = CACHE_TYPES[cfg.cache_type]
        cp.type_v = CACHE_TYPES[cfg.cache_type]
        fa = cfg.flash_attn if cfg.flash_attn is not None else cfg.cache_type not in ("f16", "f32")
        cp.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if fa else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.swa_full = cfg.swa_full
        if cb_eval is not None:  # tests only: it splits the graph
            cp.cb_eval = cb_eval
        self.ctx = ll.llama_init_from_model(self.model, cp)
        if not self.ctx:
            self.model = None
            if self._own is not None:
                self._own.close()
            raise LlamaError(f"llama.cpp could not create a context (n_ctx={cfg.n_ctx}, cache {cfg.cache_type})")
        self.cfg = cfg
        self.flash_attn = fa
        self.mem = ll.llama_get_memory(self.ctx)
        self.n_ctx = ll.llama_n_ctx(self.ctx)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        self.n_layer = ll.llama_model_n_layer(self.model)
        self.n_ctx_train = ll.llama_model_n_ctx_train(self.model)
        self._batch = ll.llama_batch_init(cfg.n_batch, 0, 1)

    # ---- sequence state (snapshots) ----
    def seq_state(self, seq: int = 0) -> bytes:
        """llama.cpp's state of one sequence: its cells' K/V and positions (llama_state_seq_get_data)."""
        n = ll.llama_state_seq_get_size(self.ctx, seq)
        buf = (ctypes.c_uint8 * n)()
        got = ll.llama_state_seq_get_data(self.ctx, buf, n, seq)
        if got != n:
            raise LlamaError(f"llama.cpp wrote {got} bytes of sequence state, expected {n}")
        return bytes(buf)

    def set_seq_state(self, data: bytes, seq: int = 0) -> bool:
        """Put a sequence back as seq_state returned it; False when llama.cpp refuses."""
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        return ll.llama_state_seq_set_data(self.ctx, buf, len(data), seq) != 0

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            ll.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "ctx", None):
            ll.llama_free(self.ctx)
            self.ctx = None
        self.model = None
        if getattr(self, "_own", None) is not None:
            self._own.close()

    def __del__(self) -> None:
        self.close()

    # ---- text ----
    def tokenize(self, text: str, add_bos: bool = False, special: bool = True) -> list[int]:
        data = text.encode("utf-8", errors="replace")
        n = len(data) + 16
        buf = (ll.llama_token * n)()
        got = ll.llama_tokenize(self.vocab, data, len(data), buf, n, add_bos, special)
        if got < 0:
            buf = (ll.llama_token * -got)()
            got = ll.llama_tokenize(self.vocab, data, len(data), buf, -got, add_bos, special)
        return list(buf[:got])

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = ll.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = ll.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(ll.llama_vocab_is_eog(self.vocab, token))

    def count(self, text: str) -> int:
        """Tokens of a piece of prompt text (special tokens parsed, no BOS)."""
        return len(self.tokenize(text, add_bos=False, special=True))

    def prompt_tokens(self, text: str) -> list[int]:
        """A prompt's tokens as llama.cpp's server reads a chat prompt: special tokens parsed, and one BOS
        at its head when the model wants one, whether or not the template already wrote it (a completion
        prompt that starts with the BOS text gets one too, where llama.cpp would read two)."""
        toks = self.tokenize(text, add_bos=False, special=True)
        if self.add_bos() and (not toks or toks[0] != self.bos()):
            toks = [self.bos()] + toks
        return toks

    def bos(self) -> int:
        return ll.llama_vocab_bos(self.vocab)

    def add_bos(self) -> bool:
        return bool(ll.llama_vocab_get_add_bos(self.vocab))

    def chat_template(self) -> str | None:
        t = ll.llama_model_chat_template(self.model, None)
        return t.decode("utf-8", errors="replace") if t else None

    # ---- decoding ----
    def decode(self, tokens: list[int], positions: list[int], seq: int = 0, logits_last: bool = True,
               logits_all: bool = False) -> None:
        """Decode tokens at the given positions on one sequence, in n_batch pieces.

        logits_all: every token's logits are kept (one n_batch piece at most; read with all_logits)."""
        if logits_all and len(tokens) > self.cfg.n_batch:
            raise ValueError("logits_all needs len(tokens) <= n_batch")
        nb = self.cfg.n_batch
        for s in range(0, len(tokens), nb):
            part = tokens[s:s + nb]
            b = self._batch
            b.n_tokens = len(part)
            for i, t in enumerate(part):
                b.token[i] = t
                b.pos[i] = positions[s + i]
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = int(logits_all)
            if logits_last and s + nb >= len(tokens):
                b.logits[len(part) - 1] = 1
            rc = ll.llama_decode(self.ctx, b)
            if rc != 0:
                raise LlamaError(f"llama_decode failed ({rc}): the KV cache has no room (n_ctx={self.n_ctx})"
                                    if rc == 1 else f"llama_decode failed ({rc})")

    def all_logits(self, n: int) -> np.ndarray:
        """(n, vocab) logits of the last decode call made with logits_all."""
        p = ll.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(p, shape=(n, self.n_vocab)).copy()

    def logits(self) -> np.ndarray:
        """Logits of the last token that asked for them."""
        p = ll.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(p, shape=(self.n_vocab,)).copy()

    def set_logits(self, logits: np.ndarray) -> None:
        """Overwrite the logits `logits()` returns (llama.cpp's host output buffer), e.g. after a
        decode that must not count (the sampler reads this buffer)."""
        p = ll.llama_get_logits_ith(self.ctx, -1)
        np.ctypeslib.as_array(p, shape=(self.n_vocab,))[:] = np.asarray(logits, dtype=np.float32)

    # ---- memory ----
    def seq_pos_range(self, seq: int = 0) -> tuple[int, int]:
        return ll.llama_memory_seq_pos_min(self.mem, seq), ll.llama_memory_seq_pos_max(self.mem, seq)

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        ll.llama_memory_seq_cp(self.mem, src, dst, p0, p1)

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        ll.llama_memory_seq_rm(self.mem, seq, p0, p1)

    def clear(self) -> None:
        ll.llama_memory_clear(self.mem, True)

    # ---- hooks ----
    def layer_info(self, il: int) -> dict | None:
        v = [ctypes.c_int32() for _ in range(5)]
        if kvhooks.kv_layer_info(self.ctx, il, *[ctypes.byref(x) for x in v]) != 0:
            return None
        return dict(zip(["n_head_kv", "head_dim_k", "head_dim_v", "is_swa", "k_rotated"], [x.value for x in v]))

    def kv_count(self, il: int, seq: int = 0) -> int:
        return kvhooks.kv_count(self.ctx, il, seq)

    def kv_read(self, il: int, seq: int = 0, keys: bool = True, values: bool = True):
        """(positions (n,), K (n, n_head_kv, d_k) or None, V (n, n_head_kv, d_v) or None), position order."""
        info = self.layer_info(il)
        if info is None:
            raise LlamaError(f"layer {il} has no KV cache")
        n = self.kv_count(il, seq)
        pos = np.empty(n, dtype=np.int32)
        h, dk, dv = info["n_head_kv"], info["head_dim_k"], info["head_dim_v"]
        k = np.empty((n, h, dk), dtype=np.float32) if keys else None
        v = np.empty((n, h, dv), dtype=np.float32) if values else None
        got = kvhooks.kv_read(self.ctx, il, seq, n, _p32(pos), _pf(k), _pf(v))
        if got != n:
            raise LlamaError(f"kv_read(layer {il}) returned {got}, expected {n}")
        return pos.astype(np.int64), k, v

    def kv_vnorm(self, il: int, seq: int = 0):
        info = self.layer_info(il)
        n = self.kv_count(il, seq)
        pos = np.empty(n, dtype=np.int32)
        out = np.empty((n, info["n_head_kv"]), dtype=np.float32)
        got = kvhooks.kv_vnorm(self.ctx, il, seq, n, _p32(pos), _pf(out))
        if got != n:
            raise LlamaError(f"kv_vnorm(layer {il}) returned {got}, expected {n}")
        return pos.astype(np.int64), out

    def rm_positions(self, positions, seq: int = 0, global_only: bool = False) -> int:
        arr = np.ascontiguousarray(positions, dtype=np.int32)
        got = kvhooks.seq_rm_positions(self.ctx, seq, _p32(arr), len(arr),
                                       kvhooks.SCOPE_GLOBAL if global_only else kvhooks.SCOPE_ALL)
        if got < 0:
            raise LlamaError(f"seq_rm_positions failed ({got})")
        return got

    def remap(self, old, new, seq: int = 0) -> int:
        o = np.ascontiguousarray(old, dtype=np.int32)
        n = np.ascontiguousarray(new, dtype=np.int32)
        got = kvhooks.seq_remap(self.ctx, seq, _p32(o), _p32(n), len(o))
        if got < 0:
            raise LlamaError(f"seq_remap failed ({got}): unlisted cell, bad mapping or a model that cannot shift")
        return got

    def row_info(self, il: int) -> tuple[int, int, int, int] | None:
        """(K row bytes, V row bytes, K ggml type, V ggml type) of one cell of layer il, in the cache's own type."""
        kb, vb = ctypes.c_size_t(), ctypes.c_size_t()
        kt, vt = ctypes.c_int32(), ctypes.c_int32()
        if kvhooks.kv_row_info(self.ctx, il, ctypes.byref(kb), ctypes.byref(vb), ctypes.byref(kt), ctypes.byref(vt)) != 0:
            return None
        return kb.value, vb.value, kt.value, vt.value

    def kv_read_raw(self, il: int, positions, seq: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Raw K and V rows (uint8, (n, row bytes)) of the cells at `positions`, in the cache's own type
        (quantized K keeps llama.cpp's Walsh-Hadamard rotation; V rows gathered when stored transposed)."""
        ri = self.row_info(il)
        if ri is None:
            raise LlamaError(f"layer {il} has no KV cache")
        pos = np.ascontiguousarray(positions, dtype=np.int32)
        k = np.empty((len(pos), ri[0]), dtype=np.uint8)
        v = np.empty((len(pos), ri[1]), dtype=np.uint8)
        got = kvhooks.kv_read_raw(self.ctx, il, seq, _p32(pos), len(pos), _pv(k), _pv(v))
        if got != len(pos):
            raise LlamaError(f"kv_read_raw(layer {il}) returned {got}: a position has no cell")
        return k, v

    def kv_restore(self, positions, rows: dict[int, tuple[np.ndarray, np.ndarray]], tokens=None, rotated_at=None,
                   seq: int = 0, global_only: bool = False) -> int:
        """Write raw rows back into free cells of `seq` at `positions` (every layer of the caches in scope
        must be in `rows`). rotated_at: the positions the K rows were rotated for, if not `positions`
        (llama.cpp's K-shift re-rotates them at the next decode)."""
        pos = np.ascontiguousarray(positions, dtype=np.int32)
        n = len(pos)
        pk = None if rotated_at is None else np.ascontiguousarray(rotated_at, dtype=np.int32)
        tok = None if tokens is None else np.ascontiguousarray(tokens, dtype=np.int32)
        layers = sorted(rows)
        ks = [np.ascontiguousarray(rows[il][0], dtype=np.uint8) for il in layers]
        vs = [np.ascontiguousarray(rows[il][1], dtype=np.uint8) for il in layers]
        for il, k, v in zip(layers, ks, vs):
            if len(k) != n or len(v) != n:
                raise ValueError(f"layer {il}: {len(k)} K / {len(v)} V rows for {n} positions")
        kp = (ctypes.c_void_p * len(layers))(*[k.ctypes.data for k in ks])
        vp = (ctypes.c_void_p * len(layers))(*[v.ctypes.data for v in vs])
        la = np.ascontiguousarray(layers, dtype=np.int32)
        got = kvhooks.seq_restore(self.ctx, seq, n, _p32(pos), _p32(pk), _p32(tok), _p32(la), len(layers), kp, vp,
                                  kvhooks.SCOPE_GLOBAL if global_only else kvhooks.SCOPE_ALL)
        if got != n:
            raise LlamaError(f"seq_restore failed ({got}): a layer missing, too few free cells or a model that cannot shift")
        return got

    def capture_layers(self, layers) -> None:
        arr = (ctypes.c_int32 * len(layers))(*layers)
        kvhooks.capture_layers(self.ctx, arr, len(layers))

    def capture(self, on: bool) -> None:
        kvhooks.capture_enable(self.ctx, on)

    def capture_clear(self) -> None:
        kvhooks.capture_clear(self.ctx)

    def captured(self, il: int, row: int):
        """(positions (m,), pre-RoPE queries (m, row)) captured for layer il."""
        m = kvhooks.capture_get(self.ctx, il, 0, None, None)
        if m < 0:
            raise LlamaError(f"layer {il} is not captured")
        pos = np.empty(m, dtype=np.int32)
        q = np.empty((m, row), dtype=np.float32)
        kvhooks.capture_get(self.ctx, il, m, _p32(pos), _pf(q))
        return pos.astype(np.int64), q


def _p32(a):
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)) if a is not None and a.size else None


def _pv(a):
    return ctypes.c_void_p(a.ctypes.data) if a is not None and a.size else None


def _pf(a):
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_float)) if a is not None and a.size else None
