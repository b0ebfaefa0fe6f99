"""ea_local on llama.cpp's RPC backend, on loopback: two ggml-rpc-server processes on 127.0.0.1 hold
the upper half of the default model's layers (and their KV caches); the hooks, an eviction and a chat
must give what the same run gives locally.

Why exact equality is expected for tokens and K/V and a small tolerance for logits: the servers run
the same ggml CPU code on the same machine, and a graph split between devices computes the same ops
in the same order; what can differ is the thread count (the servers use 1 thread, the client 2),
which changes how rows are split among threads but not the order of any sum, and the copies of
activations between devices (f32, exact). The measured difference is printed by the tests below.
"""
from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

from ea_local import rpc
from ea_local.engine.runtime import ContextConfig, Runtime
from ea_local.apps.placement import parse

from .conftest import GEMMA, gpl_tokens

N_GPU_LAYERS = 10  # gemma3 270M has 18 layers: 9..17 + output on the two servers, 0..8 local
LOGIT_TOL = 1e-3  # see the module docstring; measured differences are 0 (tests print them)


def _skip_reason() -> str | None:
    if not rpc.supported():
        return "this llama.cpp build has no RPC backend (scripts/build_llama.py --no-rpc, or an older wheel)"
    if rpc.server_binary() is None:
        return "this install has no ggml-rpc-server (wheel built before build_llama.py added it)"
    return None


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    if _skip_reason():
        pytest.skip(_skip_reason())
    logs = tmp_path_factory.mktemp("rpc")
    started = []
    try:
        for i in range(2):
            started.append(rpc.LocalServer(threads=1, log=logs / f"server{i}.log"))
        yield tuple(s.endpoint for s in started)
    finally:
        for s in started:
            s.stop()
        for s in started:
            assert s.proc.poll() is not None  # stopped


# ---- no model: endpoints and the handshake ----

@pytest.mark.parametrize("spec,want", [
    ("127.0.0.1:50052", ("127.0.0.1:50052",)),
    (" a:1 ,b.example:65535", ("a:1", "b.example:65535")),
    (["h:2", "i:3,j:4"], ("h:2", "i:3", "j:4")),
    ("", ()),
    (None, ()),
])
def test_parse_endpoints(spec, want):
    assert rpc.parse_endpoints(spec) == want


@pytest.mark.parametrize("bad", ["localhost", "h:0", "h:65536", ":50052", "h:port", "::1:50052", "a:1,a:1"])
def test_parse_endpoints_rejects(bad):
    with pytest.raises(rpc.RpcError, match="RPC endpoint"):
        rpc.parse_endpoints(bad)


def test_hello_nothing_listening_is_one_clear_error():
    port = rpc.free_port()
    with pytest.raises(rpc.RpcError, match=r"cannot connect .*ggml-rpc-server running there"):
        rpc.hello(f"127.0.0.1:{port}", timeout=2)


def test_hello_silent_server_times_out_with_a_reason():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    conns = []
    t = threading.Thread(target=lambda: conns.append(srv.accept()), daemon=True)
    t.start()
    try:
        with pytest.raises(rpc.RpcError, match="one client at a time"):
            rpc.hello(f"127.0.0.1:{srv.getsockname()[1]}", timeout=0.5)
    finally:
        t.join(2)
        for c, _ in conns:
            c.close()
        srv.close()


def test_busy_server_is_reported_not_aborted(servers):
    """A server already serving a client: llama.cpp would wait forever; the check says why."""
    ep = servers[0]
    host, _, port = ep.rpartition(":")
    with socket.create_connection((host, int(port))) as held:
        held.sendall(bytes([14]) + (24).to_bytes(8, "little") + bytes(24))  # HELLO: now the server is ours
        assert len(held.recv(64)) > 0
        with pytest.raises(rpc.RpcError, match="one client at a time"):
            rpc.hello(ep, timeout=1)
    rpc.hello(ep, timeout=5)  # free again once that client left


def test_runtime_with_unreachable_server_raises_rpc_error():
    if _skip_reason():
        pytest.skip(_skip_reason())
    with pytest.raises(rpc.RpcError, match="cannot connect"):
        Runtime(GEMMA, ContextConfig(n_ctx=64, rpc=(f"127.0.0.1:{rpc.free_port()}",)))


# ---- the default model split between local and two RPC devices ----

def _runtime(endpoints: tuple[str, ...], n_ctx: int = 1024) -> Runtime:
    cfg = ContextConfig(n_ctx=n_ctx, n_batch=256, swa_full=False, n_threads=2, repack=False,
                        n_gpu_layers=N_GPU_LAYERS if endpoints else 0, rpc=endpoints)
    return Runtime(GEMMA, cfg)


def test_layers_and_kv_really_live_on_the_servers(servers):
    rt = _runtime(servers)
    try:
        p = parse(rt.load_log)
        n = rt.n_layer
        assert len(p.layer_device) == n + 1  # every layer + output reported
        remote = {il for il, d in p.layer_device.items() if d.startswith("RPC")}
        assert remote == set(range(n + 1 - N_GPU_LAYERS, n + 1))
        assert {d for d in p.layer_device.values() if d.startswith("RPC")} == {"RPC0", "RPC1"}  # both servers
        kv_remote = {il for c in p.kv_device.values() for il, d in c.items() if d.startswith("RPC")}
        assert kv_remote == {il for il in range(n) if il in remote}
        assert any(b.startswith("RPC") and mib > 0 for c in p.kv_mib.values() for b, mib in c.items())
        assert any(b.startswith("RPC") and mib > 0 for b, mib in p.weights_mib.items())
    finally:
        rt.close()


def _greedy(rt: Runtime, prompt: list[int], n: int) -> list[int]:
    rt.decode(prompt, list(range(len(prompt))))
    out = []
    for i in range(n):
        t = int(np.argmax(rt.logits()))
        out.append(t)
        rt.decode([t], [len(prompt) + i])
    return out


def test_greedy_output_equals_local(servers):
    prompt = gpl_tokens(200)
    local = _runtime(())
    want = _greedy(local, prompt, 24)
    local.close()
    remote = _runtime(servers)
    got = _greedy(remote, prompt, 24)
    remote.close()
    assert got == want


def _evict_remap_capture(rt: Runtime, toks: list[int], global_layers: list[int]) -> dict:
    """Prefill with query capture, read K/V, evict a third of the middle (from both the global and the
    sliding cache, so that compaction has gaps to close everywhere), compact positions (K re-rotated by
    llama.cpp's K-shift on each layer's device), decode one token."""
    rt.capture_layers(global_layers)
    rt.capture(True)
    rt.decode(toks, list(range(len(toks))))
    out = {"q": {il: rt.captured(il, 4 * 256)[1] for il in global_layers}}
    out["kv"] = {il: rt.kv_read(il)[1:] for il in global_layers}
    evict = np.arange(16, len(toks) - 32, 3)
    assert rt.rm_positions(evict, global_only=False) == 2 * len(evict)  # global + sliding cache
    glob, _, _ = rt.kv_read(global_layers[0], keys=False, values=False)
    swa, _, _ = rt.kv_read(0, keys=False, values=False)
    old = sorted(set(glob.tolist()) | set(swa.tolist()))
    assert rt.remap(old, list(range(len(old)))) > 0
    rt.capture(False)
    rt.decode([toks[-1]], [len(old)])
    out["logits"] = rt.logits()
    out["kv_after"] = {il: rt.kv_read(il) for il in global_layers}
    return out


def test_eviction_and_compaction_give_the_local_logits(servers):
    toks = gpl_tokens(600)
    global_layers = [5, 11, 17]  # gemma3: every 6th layer is global; 5 local, 11 and 17 on the servers
    local = _runtime(())
    want = _evict_remap_capture(local, toks, global_layers)
    local.close()
    remote = _runtime(servers)
    p = parse(remote.load_log)
    assert p.layer_device[5] == "CPU" and p.layer_device[11].startswith("RPC") and p.layer_device[17].startswith("RPC")
    got = _evict_remap_capture(remote, toks, global_layers)
    remote.close()
    for il in global_layers:
        np.testing.assert_array_equal(got["q"][il], want["q"][il])  # query capture from a remote graph
        for a, b in zip(got["kv"][il], want["kv"][il]):
            np.testing.assert_array_equal(a, b)  # K/V rows read from a remote buffer
        for a, b in zip(got["kv_after"][il], want["kv_after"][il]):
            np.testing.assert_array_equal(a, b)  # same cells, same positions, same re-rotated K
    diff = float(np.max(np.abs(got["logits"] - want["logits"])))
    print(f"max |logit RPC - logit local| after eviction + compaction: {diff:.3g}")
    assert int(np.argmax(got["logits"])) == int(np.argmax(want["logits"]))
    assert diff <= LOGIT_TOL


def test_session_stays_inside_its_budget_on_rpc(servers):
    from ea_local.engine.sampling import SamplingParams
    from ea_local.engine.session import Session, SessionConfig

    cfg = SessionConfig(budget=512, chunk=128, step=64, n_threads=2, n_gpu_layers=N_GPU_LAYERS, rpc=servers)
    s = Session(GEMMA, cfg)
    try:
        assert any(d.startswith("RPC") for d in parse(s.rt.load_log).layer_device.values())
        toks = gpl_tokens(1200)
        for i in range(0, len(toks), 128):
            s.prefill(toks[i:i + 128])
            pos, _, _ = s.rt.kv_read(s.layers[-1], keys=False, values=False)  # a layer held by a server
            assert pos.tolist() == sorted(s.live)
            assert s.n_cells <= cfg.budget
        text = "".join(s.generate([], SamplingParams(ignore_eos=True), max_tokens=100))
        assert text
        assert s.n_cells <= cfg.budget
        assert len(s.stats.evictions) >= 3
    finally:
        s.close()


def test_chat_cli_with_rpc_stays_inside_its_budget(servers):
    from .test_chat import long_message, stats_fields

    stdin = "\n".join(long_message(1300, start=i * 1300) for i in range(2)) + "\n/stats\n"
    r = subprocess.run([sys.executable, "-m", "ea_local.cli", "chat", "--budget", "512", "--max-tokens", "8",
                        "--rpc", ",".join(servers), "--n-gpu-layers", str(N_GPU_LAYERS), "--threads", "2"],
                       input=stdin, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    blocks = stats_fields(r.stderr)
    assert blocks and all(b["cells"] <= 512 for b in blocks)
    assert blocks[-1]["seen"] > 512 and blocks[-1]["events"] >= 1


def test_info_shows_placement(servers):
    r = subprocess.run([sys.executable, "-m", "ea_local.cli", "info", "--rpc", servers[0], "--n-gpu-layers", "7",
                        "--ctx", "1024"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert re.search(r"weights\s+CPU\s+layers 0-11\n", out), out
    assert re.search(rf"weights\s+RPC0 \({re.escape(servers[0])}\)\s+layers 12-17 \+ output", out), out
    assert re.search(rf"KV global\s+RPC0 \({re.escape(servers[0])}\)\s+layers 17\n", out), out
    assert re.search(r"RPC0\[.*\]\s+KV global\s+\d+\.\d\d MiB", out), out


def test_cli_bad_rpc_is_one_line_exit_2():
    if _skip_reason():
        pytest.skip(_skip_reason())
    r = subprocess.run([sys.executable, "-m", "ea_local.cli", "demo", "--rpc", "nohost"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "bad RPC endpoint 'nohost'" in r.stderr
    port = rpc.free_port()
    r = subprocess.run([sys.executable, "-m", "ea_local.cli", "demo", "--rpc", f"127.0.0.1:{port}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot connect" in r.stderr and "Traceback" not in r.stderr


def test_serve_with_rpc_answers_like_the_local_server(servers, monkeypatch):
    """`ea-local serve --rpc`: two slots on one model whose upper layers live on the servers; a greedy
    answer equals the local server's (both without CPU weight repacking, as the servers' CPU device)."""
    from .serve_helpers import ServerProcess

    monkeypatch.setenv("EA_LOCAL_REPACK", "0")
    body = {"model": "x", "messages": [{"role": "user", "content": "Name three colours."}],
            "max_tokens": 12, "temperature": 0}
    answers = {}
    for name, extra in (("remote", ["--rpc", ",".join(servers), "--n-gpu-layers", str(N_GPU_LAYERS)]), ("local", [])):
        s = ServerProcess(GEMMA, "--budget", "512", "--parallel", "2", *extra)
        try:
            r = s.client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            answers[name] = r.json()["choices"][0]["message"]["content"]
        finally:
            s.stop()
    assert answers["remote"] and answers["remote"] == answers["local"], answers


@pytest.mark.parametrize("cmd", [["demo"], ["chat"], ["summarize", "-"], ["serve"], ["bench", "--quick"], ["info"]])
def test_every_model_command_takes_rpc(cmd):
    """--rpc is in the shared option set of every command that runs a model: a bad value is one line, exit 2."""
    r = subprocess.run([sys.executable, "-m", "ea_local.cli", *cmd, "--rpc", "nohost:x"], capture_output=True,
                       text=True, timeout=60, input="")
    assert r.returncode == 2, (cmd, r.stderr)
    assert "bad RPC endpoint 'nohost:x'" in r.stderr and r.stderr.strip().count("\n") == 0
