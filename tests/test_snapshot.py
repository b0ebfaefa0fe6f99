"""Session files (engine/snapshot.py): save after evictions, load elsewhere, same next tokens."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from ea_local.engine import snapshot
from ea_local.engine.sampling import SamplingParams
from ea_local.engine.session import Session, SessionConfig

from .conftest import GEMMA, gpl_tokens

CFG = dict(budget=512, chunk=128, step=64, recent=64, n_sink=4)
CONT = [236764, 578, 1551, 3588]  # a few gemma3 tokens fed after the restore point


def _session(path: str = GEMMA, **kw) -> Session:
    return Session(path, SessionConfig(**{**CFG, **kw}))


def _evicted_session(n: int = 1000) -> Session:
    s = _session()
    s.prefill(gpl_tokens(n))
    assert s.stats.evictions and s.n_cells <= s.cfg.budget
    return s


def _next_logits(s: Session, toks: list[int]) -> np.ndarray:
    """Feed toks one by one (as decoding does) and stack the logits after each."""
    out = []
    for t in toks:
        s._decode([t])
        out.append(s.rt.logits())
    return np.stack(out)


def _greedy(s: Session, n: int = 12) -> list[int]:
    text = "".join(s.generate([CONT[0]], SamplingParams(ignore_eos=True), max_tokens=n))
    return s.rt.tokenize(text)


def _assert_same_logits(got: np.ndarray, ref: np.ndarray) -> None:
    """The first next-token logits are the original's bit for bit (the same cells, read in the same order).

    Later rows may differ by float rounding: the restored cells sit contiguously where the original's were
    scattered (holes, the sliding cache's ring), so once a new cell lands elsewhere attention sums in
    another order; an f16 K/V ulp then grows over the last layers (seen: up to ~0.4 on logits of range ~40).
    The argmax must not move."""
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_allclose(got, ref, rtol=0, atol=1.0)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A gemma3 (iSWA) session with evictions and position holes, saved; plus what it does next."""
    d = tmp_path_factory.mktemp("snap")
    s = _evicted_session()
    path = d / "s.ea"
    n = snapshot.save(s, str(path), extra={"note": "hello"})
    assert n == path.stat().st_size
    before = dict(live=dict(s.live), next_pos=s.next_pos, seen=s.stats.tokens_seen, ev=len(s.stats.evictions))
    logits = _next_logits(s, CONT)
    s.close()
    return dict(path=path, before=before, logits=logits, dir=d)


def test_roundtrip_in_a_fresh_session(saved):
    s = _session()
    extra = snapshot.load(s, str(saved["path"]))
    b = saved["before"]
    assert extra == {"note": "hello"}
    assert s.live == b["live"] and s.next_pos == b["next_pos"] and s.stats.tokens_seen == b["seen"]
    assert len(s.stats.evictions) == b["ev"]
    holes = set(range(s.next_pos)) - set(s.live)
    assert len(holes) > 400  # eviction left holes in the positions and they came back as they were
    s.check_cells()
    # the sliding layers' cache came back too: its window of the newest positions
    swa, _, _ = s.rt.kv_read(s.info.sliding_layers[0], keys=False, values=False)
    assert swa.max() == s.next_pos - 1 and len(swa) >= s.info.sliding_window
    got = _next_logits(s, CONT)
    _assert_same_logits(got, saved["logits"])
    # and it goes on compressing: a decode-time eviction after the load keeps llama.cpp and the session in step
    _greedy(s, 100)
    assert len(s.stats.evictions) > b["ev"] and s.n_cells <= s.cfg.budget
    s.check_cells()
    s.close()


def test_roundtrip_in_a_fresh_process(saved):
    """Load in another Python process: the original's next-token logits; the same greedy tokens as a load here."""
    out = saved["dir"] / "logits.npy"
    code = f"""
import json, numpy as np
from ea_local.engine import snapshot
from tests.test_snapshot import _session, _next_logits, _greedy, CONT
s = _session(); snapshot.load(s, {str(saved['path'])!r})
np.save({str(out)!r}, _next_logits(s, CONT)); s.close()
s = _session(); snapshot.load(s, {str(saved['path'])!r}); print(json.dumps(_greedy(s)))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0, r.stderr
    _assert_same_logits(np.load(out), saved["logits"])
    s = _session()
    snapshot.load(s, str(saved["path"]))
    assert json.loads(r.stdout.strip().splitlines()[-1]) == _greedy(s)
    s.close()


def test_tiny_llama_roundtrip(tiny_llama, tmp_path):
    """A model without sliding layers (one cache)."""
    cfg = dict(budget=128, chunk=32, step=16, recent=16)
    rng = np.random.default_rng(0)
    toks = [1] + rng.integers(3, 380, size=500).tolist()
    s = Session(tiny_llama, SessionConfig(**cfg))
    s.prefill(toks)
    snapshot.save(s, str(tmp_path / "l.ea"))
    ref = _next_logits(s, [5, 6, 7])
    s.close()
    s = Session(tiny_llama, SessionConfig(**cfg))
    snapshot.load(s, str(tmp_path / "l.ea"))
    _assert_same_logits(_next_logits(s, [5, 6, 7]), ref)
    s.close()


def test_load_other_geometry_is_refused_in_place(saved):
    s = _session(budget=600)
    with pytest.raises(snapshot.SnapshotError, match="budget 512"):
        snapshot.load(s, str(saved["path"]))
    s.close()


# ---- bad files: one line, the session keeps its state ----

def _variants(path, d, tiny_llama) -> dict:
    data = path.read_bytes()
    hlen = struct.unpack_from("<I", data, 12)[0]
    out = {}

    def w(name, b):
        p = d / name
        p.write_bytes(b)
        out[name] = p

    w("empty", b"")
    w("text", b"hello, not a session\n" * 4)
    for cut in (4, 15, 16 + hlen // 2, 16 + hlen + 10, len(data) // 2, len(data) - 1):
        w(f"trunc{cut}", data[:cut])
    flip = bytearray(data)
    flip[-100] ^= 0xFF  # in the llama state
    w("payload_flip", bytes(flip))
    flip = bytearray(data)
    flip[16 + 5] ^= 0x55  # inside the JSON header
    w("header_flip", bytes(flip))
    w("version", data[:8] + struct.pack("<I", 99) + data[12:])
    w("appended", data + b"\0" * 10)
    s = Session(tiny_llama, SessionConfig(budget=128, chunk=32, step=16, recent=16))
    s.prefill([1, 5, 6, 7, 8])
    snapshot.save(s, str(d / "foreign"))
    s.close()
    out["foreign"] = d / "foreign"
    out["directory"] = d
    out["missing"] = d / "nope"
    return out


def test_bad_files_refused_and_state_kept(saved, tiny_llama, tmp_path):
    bad = _variants(saved["path"], tmp_path, tiny_llama)
    s = _session()
    snapshot.load(s, str(saved["path"]))
    live, nxt = dict(s.live), s.next_pos
    phrases = {"empty": "not an ea-local session", "text": "not an ea-local session", "version": "version 99",
               "foreign": "another model", "directory": "directory", "missing": "no such file",
               "payload_flip": "checksum", "header_flip": "corrupt", "appended": "corrupt"}
    for name, p in bad.items():
        with pytest.raises(snapshot.SnapshotError) as ei:
            snapshot.load(s, str(p))
        msg = str(ei.value)
        assert "\n" not in msg, (name, msg)
        if name.startswith("trunc"):
            assert "truncated" in msg or "not an ea-local" in msg or "corrupt" in msg, (name, msg)
        else:
            assert phrases[name] in msg, (name, msg)
        assert s.live == live and s.next_pos == nxt, name
    pos, _, _ = s.rt.kv_read(s.info.global_layers[0], keys=False, values=False)
    assert pos.tolist() == sorted(live)
    s.close()


def test_llama_refusing_the_state_rolls_back(saved):
    """A checksummed file whose llama.cpp state is unusable: the cells in place are put back."""
    s = _session()
    snapshot.load(s, str(saved["path"]))
    live = dict(s.live)
    ref = _next_logits(s, CONT[:1])
    s.rt.seq_rm(0, s.next_pos - 1, -1)  # undo the probe token so the state is as before
    del s.live[s.next_pos - 1]
    s.next_pos -= 1
    snap = snapshot.read(saved["path"], GEMMA)
    for bad_state in (snap.state[: len(snap.state) // 2], b"\x07" * 64):
        snap.state = bad_state
        with pytest.raises(snapshot.SnapshotError, match="unchanged"):
            snapshot.restore(s, snap)
        assert s.live == live
    np.testing.assert_allclose(_next_logits(s, CONT[:1]), ref, rtol=0, atol=1e-3)
    s.close()
