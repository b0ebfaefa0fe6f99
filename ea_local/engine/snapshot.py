"""Session state copied out and put back: to a file (a conversation saved to disk and loaded
back, cache and all) or in memory (a checkpoint: one prefill serves every trial of the bench).

The KV cells come from llama.cpp's sequence state API (llama_state_seq_get_data /
set_data, flags 0). In the vendored llama.cpp (0.3.36) it writes every cell of the sequence
with its own position — so the holes eviction leaves survive — and on an iSWA model both the
global cache and the sliding-window cache (llama_kv_cache_iswa::state_write; masked sliding
cells are skipped, as the model no longer attends to them). What llama.cpp does not know is
ours: the position -> token map of the live cells, the next position, the statistics window
of Expected Attention, the stats and the caller's extra data (the chat history).

File layout (little-endian):
    magic b"EALSESS\\0" | u32 format version | u32 header length | header (UTF-8 JSON) | payload
The header names the model (file size + SHA-256 of its GGUF header, which holds every
metadata key and the tensor table), the session config, the stats, `extra`, and the payload's
sections (name, dtype, shape, offset) with the payload's SHA-256. A file is checked whole
before anything is restored, so a corrupt, truncated or foreign file is refused with one line
and the session keeps its state.

A checkpoint is the same state kept in memory, without the file's checks: kvpress' main protocol
compresses once after a full prefill, and on a 2-core CPU the prefill is the expensive part (an 8k
context takes about a minute), so the bench prefills each sample once and rewinds to its checkpoint
before each policy x budget trial.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..model.gguf_header import read_header
from ..policies import get_policy
from .archive import Archive
from .session import Eviction, Session, Stats
from .transcript import Transcript
from .windows import QueryWindow

MAGIC = b"EALSESS\x00"
VERSION = 1
_PRELUDE = struct.Struct("<8sII")
_MAX_HEADER = 64 * 2**20  # the chat history lives in the header; anything larger is not ours
# the SessionConfig fields that describe the saved cache (threads, GPU layers stay the loader's)
# the session's query windows as the file names them: queries in "<name>.<layer>", positions in WINDOW_POS[name]
WINDOW_POS = {"queries": "query_pos", "focus": "focus_pos", "before": "before_pos"}
CONFIG_FIELDS = ("budget", "policy", "n_sink", "recent", "step", "chunk", "stats_window", "max_score_layers",
                 "prefill_stats", "cache_type", "seed", "policy_options")


class SnapshotError(ValueError):
    """A session file that cannot be saved or loaded (one line)."""


@dataclass
class Snapshot:
    path: str
    model: dict
    config: dict
    next_pos: int
    stats: dict
    extra: dict
    live_pos: np.ndarray
    live_tok: np.ndarray
    state: bytes  # llama.cpp's sequence state
    # the session's query windows (engine/windows.py), in the file as "<name>_pos" and "<name>.<layer>"
    windows: dict[str, QueryWindow] = field(default_factory=dict)
    archive: dict[str, np.ndarray] = field(default_factory=dict)  # "archive.*" sections: evicted cells (recall)


@lru_cache(maxsize=8)
def _identity(path: str, size: int, mtime_ns: int) -> tuple[int, str]:
    end = read_header(path).data_offset
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = end
        while left:
            b = f.read(min(left, 1 << 20))
            if not b:
                break
            h.update(b)
            left -= len(b)
    return size, h.hexdigest()


def model_identity(path: str, info: Any = None) -> dict:
    """What makes a saved cache belong to a model: file size and a hash of its GGUF header."""
    st = os.stat(path)
    size, digest = _identity(os.path.realpath(path), st.st_size, st.st_mtime_ns)
    ident = {"file_size": size, "header_sha256": digest, "file_name": Path(path).name}
    if info is not None:
        ident["architecture"] = info.architecture
    return ident


# ---- writing ----

def save(s: Session, path: str | os.PathLike[str], extra: dict | None = None) -> int:
    """Write the session to `path` (atomically: a temporary file renamed). Returns the bytes written."""
    if s.policy.needs_queries and s._n_captured:
        # queries llama.cpp captured since the last pull: read (not cleared) and appended to the window,
        # which is where the next pull would have put them
        pending_pos = s.captured_queries(s.layers[0])[0]
        pending = {il: s.captured_queries(il)[1] for il in s.layers}
    else:
        pending_pos, pending = np.empty(0, dtype=np.int64), {}
    sections: list[tuple[str, np.ndarray]] = []
    live = sorted(s.live)
    sections.append(("live_pos", np.asarray(live, dtype=np.int64)))
    sections.append(("live_tok", np.asarray([s.live[p] for p in live], dtype=np.int32)))
    stats_window = s.queries.copy()
    stats_window.push(pending, pending_pos, len(s.queries) + len(pending_pos))
    for name, win in (("queries", stats_window), ("focus", s.focus), ("before", s.before)):
        sections.append((WINDOW_POS[name], np.asarray(win.pos, dtype=np.int64)))
        sections += [(f"{name}.{il}", np.ascontiguousarray(q, dtype=np.float32)) for il, q in win.q.items()]
    sections.append(("llama_state", np.frombuffer(s.rt.seq_state(0), dtype=np.uint8)))
    a = s.archive
    if a is not None and len(a):  # the archive of evicted cells (recall) belongs to the conversation
        sections += [("archive.pos", a.pos), ("archive.rotated_at", a.rotated_at), ("archive.tokens", a.tokens),
                     ("archive.recalls", a.recalls), ("archive.stamp", a.stamp)]
        sections += [(f"archive.k.{il}", a.k[il]) for il in a.layers] + [(f"archive.v.{il}", a.v[il]) for il in a.layers]
        sections += [(f"archive.digest.{il}", d) for il, d in a.digest.items()]

    table, chunks, off = [], [], 0
    h = hashlib.sha256()
    for name, arr in sections:
        b = np.ascontiguousarray(arr).tobytes()
        table.append({"name": name, "dtype": arr.dtype.str, "shape": list(arr.shape), "offset": off,
                      "nbytes": len(b)})
        chunks.append(b)
        h.update(b)
        off += len(b)
    cfg = {k: getattr(s.cfg, k) for k in CONFIG_FIELDS}
    header = {
        "model": model_identity(s.model_path, s.info),
        "config": cfg,
        "next_pos": s.next_pos,
        "stats": {"tokens_seen": s.stats.tokens_seen, "compactions": s.stats.compactions,
                  "archived": s.stats.archived, "recalls": s.stats.recalls, "recalled": s.stats.recalled,
                  "recall_s": s.stats.recall_s,
                  "evictions": [dataclasses.asdict(e) for e in s.stats.evictions]},
        "extra": extra or {},
        "sections": table,
        "payload_bytes": off,
        "payload_sha256": h.hexdigest(),
    }
    try:
        hb = json.dumps(header, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise SnapshotError(f"cannot save the session: {e}") from e
    dst = Path(path)
    if dst.is_dir():
        raise SnapshotError(f"{path}: is a directory")
    parent = dst.resolve().parent
    if not parent.is_dir():
        raise SnapshotError(f"{path}: directory {parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".ea-local-session-", suffix=".tmp", dir=str(parent))
    except OSError as e:
        raise SnapshotError(f"{path}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_PRELUDE.pack(MAGIC, VERSION, len(hb)))
            f.write(hb)
            for b in chunks:
                f.write(b)
        os.replace(tmp, dst)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise SnapshotError(f"{path}: {e.strerror or e}") from e
    return _PRELUDE.size + len(hb) + off


# ---- reading ----

def read(path: str | os.PathLike[str], model_path: str) -> Snapshot:
    """Parse and check a session file for the model at `model_path`; SnapshotError (one line) otherwise."""
    p = str(path)
    if not os.path.lexists(p):
        raise SnapshotError(f"{p}: no such file")
    if os.path.isdir(p):
        raise SnapshotError(f"{p}: is a directory, not a session file")
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            pre = f.read(_PRELUDE.size)
            if len(pre) < _PRELUDE.size or pre[:8] != MAGIC:
                raise SnapshotError(f"{p}: not an ea-local session file")
            _, version, hlen = _PRELUDE.unpack(pre)
            if version != VERSION:
                raise SnapshotError(f"{p}: session file format version {version}; this ea-local reads version "
                                    f"{VERSION}")
            if hlen > min(_MAX_HEADER, size - _PRELUDE.size):
                raise SnapshotError(f"{p}: truncated or corrupt session file (header of {hlen} bytes)")
            try:
                header = json.loads(f.read(hlen).decode("utf-8"))
                model, sections = header["model"], header["sections"]
                n_payload, digest = int(header["payload_bytes"]), str(header["payload_sha256"])
            except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
                raise SnapshotError(f"{p}: corrupt session file (unreadable header)") from e
            mine = model_identity(model_path)
            if (model.get("file_size"), model.get("header_sha256")) != (mine["file_size"], mine["header_sha256"]):
                raise SnapshotError(f"{p}: saved with another model ({model.get('file_name')}, "
                                    f"{model.get('architecture')}); this session runs {mine['file_name']}")
            if size - _PRELUDE.size - hlen != n_payload:
                raise SnapshotError(f"{p}: truncated or corrupt session file ({size} bytes, expected "
                                    f"{_PRELUDE.size + hlen + n_payload})")
            payload = f.read(n_payload)
    except OSError as e:
        raise SnapshotError(f"{p}: cannot read: {e.strerror or e}") from e
    if hashlib.sha256(payload).hexdigest() != digest:
        raise SnapshotError(f"{p}: corrupt session file (checksum mismatch)")
    try:
        arrays = {}
        for sec in sections:
            o, n = int(sec["offset"]), int(sec["nbytes"])
            arrays[sec["name"]] = np.frombuffer(payload[o:o + n], dtype=np.dtype(sec["dtype"])).reshape(sec["shape"])
        windows = {name: QueryWindow({int(k.split(".", 1)[1]): v for k, v in arrays.items() if k.startswith(name + ".")},
                                     arrays.get(pos_name, np.empty(0, dtype=np.int64)))
                   for name, pos_name in WINDOW_POS.items()}
        st = header["stats"]
        snap = Snapshot(path=p, model=model, config=dict(header["config"]), next_pos=int(header["next_pos"]),
                        stats=st, extra=header.get("extra") or {}, live_pos=arrays["live_pos"],
                        live_tok=arrays["live_tok"], state=arrays["llama_state"].tobytes(), windows=windows,
                        archive={k: v for k, v in arrays.items() if k.startswith("archive.")})
        if len(snap.live_pos) != len(snap.live_tok) or set(snap.config) != set(CONFIG_FIELDS):
            raise ValueError("inconsistent sections")
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise SnapshotError(f"{p}: corrupt session file ({e})") from e
    return snap


def fits(s: Session, snap: Snapshot) -> bool:
    """Whether `s`'s context can take the snapshot in place: same cache geometry, scored layers and policy
    (the policy sizes the context too: "none" has no chunk room, lookahead policies more)."""
    c = snap.config
    keys = ("budget", "chunk", "cache_type", "max_score_layers", "policy")
    return all(c[k] == getattr(s.cfg, k) for k in keys)


def session_config(snap: Snapshot, base: Any) -> Any:
    """The SessionConfig to build a session for `snap`: the saved cache settings, `base`'s threads and GPU."""
    return dataclasses.replace(base, **{k: snap.config[k] for k in CONFIG_FIELDS})


def load(s: Session, path: str | os.PathLike[str]) -> dict:
    """Restore a session file saved with this model and cache geometry into `s`; returns its `extra`."""
    snap = read(path, s.model_path)
    restore(s, snap)
    return snap.extra


def restore(s: Session, snap: Snapshot) -> None:
    """Put the snapshot's cells and bookkeeping into `s` (a session whose context has room for them).

    On failure the session's previous cells are put back and SnapshotError is raised."""
    cfg = snap.config
    if not fits(s, snap):
        raise SnapshotError(f"{snap.path}: saved with budget {cfg['budget']}, chunk {cfg['chunk']}, cache "
                            f"{cfg['cache_type']}; this session has {s.cfg.budget}, {s.cfg.chunk}, {s.cfg.cache_type}")
    try:
        policy = get_policy(cfg["policy"])
    except ValueError as e:
        raise SnapshotError(f"{snap.path}: {e}") from e
    backup = s.rt.seq_state(0)
    ok = s.rt.set_seq_state(snap.state, 0)
    if ok:
        pos, _, _ = s.rt.kv_read(s.info.global_layers[0], keys=False, values=False)
        ok = pos.tolist() == snap.live_pos.tolist()
    if not ok:
        s.rt.seq_rm(0)
        if not s.rt.set_seq_state(backup, 0):
            s.reset()  # llama.cpp refused its own state back: start clean rather than out of step
            raise SnapshotError(f"{snap.path}: llama.cpp could not restore the cache; the conversation was reset")
        raise SnapshotError(f"{snap.path}: llama.cpp could not restore the cache; the session is unchanged")
    for k in CONFIG_FIELDS:
        setattr(s.cfg, k, cfg[k])
    s.policy = policy
    s.set_capture()
    s.rt.capture_clear()
    s._n_captured = 0
    s.live = dict(zip(snap.live_pos.tolist(), snap.live_tok.tolist()))
    s.next_pos = snap.next_pos
    s.queries, s.focus, s.before = (snap.windows[name].copy(s.layers) for name in WINDOW_POS)
    # what the cache holds: the evicted tokens are not in the file
    s.transcript = Transcript(snap.live_tok.tolist(), snap.live_pos.tolist())
    st = snap.stats
    s.stats = Stats(tokens_seen=int(st["tokens_seen"]), compactions=int(st["compactions"]),
                    evictions=[Eviction(**e) for e in st["evictions"]], archived=int(st.get("archived", 0)),
                    recalls=int(st.get("recalls", 0)), recalled=int(st.get("recalled", 0)),
                    recall_s=float(st.get("recall_s", 0.0)))
    s.recalled_count = {}
    restore_archive(s, snap.archive)


def restore_archive(s: Session, sec: dict[str, np.ndarray]) -> None:
    """Fill the session's archive from a file's "archive.*" sections (empty when there are none)."""
    a = s.archive
    if a is None:
        return
    a.clear()
    if "archive.pos" not in sec or any(f"archive.k.{il}" not in sec for il in a.layers):
        return
    rows = {il: (sec[f"archive.k.{il}"].copy(), sec[f"archive.v.{il}"].copy()) for il in a.layers}
    digest = {il: sec[f"archive.digest.{il}"].copy() for il in s.layers if f"archive.digest.{il}" in sec}
    a.add(sec["archive.pos"].copy(), sec["archive.tokens"].copy(), rows, digest,
          rotated_at=sec["archive.rotated_at"].copy(), recalls=sec["archive.recalls"].copy())


# ---- in memory ----

@dataclass
class Checkpoint:
    state: bytes  # llama.cpp's sequence state
    live: dict[int, int]
    next_pos: int
    windows: tuple[QueryWindow, QueryWindow, QueryWindow]  # the statistics window, the focus, the baseline
    transcript: Transcript
    stats: Stats
    budget: int
    logits: np.ndarray  # of the last prefilled token: what a lookahead policy (laq) and the sampler read first
    archive: Archive | None = None  # the archive of evicted cells (recall), copied
    recalled_count: dict[int, int] = field(default_factory=dict)


def checkpoint(s: Session) -> Checkpoint:
    """Copy the session's cells and bookkeeping, including the queries captured but not yet pulled."""
    if s.policy.needs_queries and s._n_captured:
        s._pull_queries(keep=s.cfg.stats_window)  # the statistics window belongs to the checkpoint
    return Checkpoint(s.rt.seq_state(0), dict(s.live), s.next_pos,
                      (s.queries.copy(), s.focus.copy(), s.before.copy()), s.transcript.copy(),
                      copy.deepcopy(s.stats), s.cfg.budget, s.rt.logits(),
                      s.archive.copy() if s.archive is not None else None, dict(s.recalled_count))


def rewind(s: Session, cp: Checkpoint) -> None:
    """Put the session back to `cp` (same context; the policy and its options stay as they are now)."""
    s.rt.clear()
    s.rt.capture_clear()
    if not s.rt.set_seq_state(cp.state, 0):
        raise SnapshotError("llama.cpp could not restore the sequence")
    s.live = dict(cp.live)
    s.next_pos = cp.next_pos
    s.queries, s.focus, s.before = (w.copy() for w in cp.windows)
    s.transcript = cp.transcript.copy()
    s._n_captured = 0
    s.stats = copy.deepcopy(cp.stats)
    s.cfg.budget = cp.budget
    s.rt.set_logits(cp.logits)
    if cp.archive is not None and s.archive is not None:
        s.archive = cp.archive.copy()
        s.recalled_count = dict(cp.recalled_count)
