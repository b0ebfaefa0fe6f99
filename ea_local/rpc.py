"""llama.cpp's RPC backend (ggml-rpc) seen from ea_local: endpoints, a handshake check, the device
list for the model parameters, and the ggml-rpc-server binary that scripts/build_llama.py puts in
the wheel (llama_cpp/lib/ggml-rpc-server).

llama.cpp aborts the whole process when an endpoint cannot be reached or speaks another protocol
version (GGML_ABORT in ggml-rpc.cpp's rpc_dispatcher::start), so every endpoint is checked here
first with the same HELLO handshake and a timeout, and a bad one becomes a one-line RpcError.
"""
from __future__ import annotations

import ctypes
import os
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import llama_cpp.llama_cpp as ll

from . import ggml_registry, kvhooks
from .ggml_registry import fn

SERVER_NAME = "ggml-rpc-server"
DEFAULT_PORT = 50052
# ggml/include/ggml-rpc.h and ggml/src/ggml-rpc/ggml-rpc.cpp of the vendored llama.cpp
PROTO_MAJOR = 7
_CMD_HELLO = 14
_CONN_CAPS = 24  # RPC_CONN_CAPS_SIZE (transport.h)
_HELLO_RSP = 4 + _CONN_CAPS  # major, minor, patch, padding, conn_caps


class RpcError(ValueError):
    """An RPC setup problem the user can fix (bad endpoint, nothing listening, busy, no RPC in the build)."""


def parse_endpoints(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    """'HOST:PORT[,HOST:PORT...]' (or a list of them) -> normalised tuple; RpcError on a bad one."""
    if not spec:
        return ()
    items = spec.split(",") if isinstance(spec, str) else [p for s in spec for p in s.split(",")]
    out: list[str] = []
    for raw in items:
        ep = raw.strip()
        host, sep, port = ep.rpartition(":")
        # llama.cpp splits at the first ':' (parse_endpoint), so IPv6 literals cannot be given
        if not sep or not host or ":" in host or not port.isdigit() or not 0 < int(port) < 65536:
            raise RpcError(f"bad RPC endpoint {raw.strip()!r}: expected HOST:PORT with a port in 1..65535 "
                           f"(e.g. 192.168.1.20:{DEFAULT_PORT})")
        ep = f"{host}:{int(port)}"
        if ep in out:
            raise RpcError(f"RPC endpoint {ep} is listed twice")
        out.append(ep)
    return tuple(out)


def hello(endpoint: str, timeout: float = 5.0) -> tuple[int, int, int]:
    """The server's protocol version (major, minor, patch) through the RPC HELLO handshake."""
    host, _, port = endpoint.rpartition(":")
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    except socket.gaierror as e:
        raise RpcError(f"RPC endpoint {endpoint}: cannot resolve {host!r} ({e.strerror})") from e
    except (TimeoutError, socket.timeout) as e:
        raise RpcError(f"RPC endpoint {endpoint}: no answer within {timeout:g} s (firewall? wrong host?)") from e
    except OSError as e:
        raise RpcError(f"RPC endpoint {endpoint}: cannot connect ({e.strerror or e}); is {SERVER_NAME} "
                       f"running there (`ea-local rpc-server --port {port}` on that machine)?") from e
    with sock:
        sock.settimeout(timeout)
        try:
            # request: | cmd (1 byte) | size (u64) | rpc_msg_hello_req |; response: | size (u64) | rpc_msg_hello_rsp |
            sock.sendall(struct.pack("<BQ", _CMD_HELLO, _CONN_CAPS) + bytes(_CONN_CAPS))
            data = b""
            while len(data) < 8 + _HELLO_RSP:
                chunk = sock.recv(8 + _HELLO_RSP - len(data))
                if not chunk:
                    break
                data += chunk
        except (TimeoutError, socket.timeout) as e:
            raise RpcError(f"RPC endpoint {endpoint} accepted the connection but did not answer the handshake "
                           f"within {timeout:g} s: {SERVER_NAME} serves one client at a time, so another client "
                           "is probably connected (or this port is not an RPC server)") from e
        except OSError as e:
            raise RpcError(f"RPC endpoint {endpoint}: handshake failed ({e.strerror or e})") from e
    if len(data) < 8 + _HELLO_RSP or struct.unpack("<Q", data[:8])[0] != _HELLO_RSP:
        raise RpcError(f"RPC endpoint {endpoint} did not answer like {SERVER_NAME} (protocol v{PROTO_MAJOR}.x)")
    major, minor, patch = data[8], data[9], data[10]
    if major != PROTO_MAJOR:
        raise RpcError(f"RPC endpoint {endpoint} speaks RPC protocol v{major}.{minor}.{patch}, this build speaks "
                       f"v{PROTO_MAJOR}.x: build both sides from the same llama.cpp (scripts/build_llama.py)")
    return major, minor, patch


_DEV_GPU, _DEV_IGPU = ggml_registry.DEV_GPU, ggml_registry.DEV_IGPU


def supported() -> bool:
    """Whether this llama.cpp build has the RPC backend (scripts/build_llama.py --rpc, the default)."""
    return bool(ll.llama_supports_rpc())


def require_rpc() -> None:
    if not supported():
        raise RpcError("this llama.cpp build has no RPC backend: rebuild with `python scripts/build_llama.py "
                       "--rpc --install` (the default since RPC support was added)")


_in_use: Counter = Counter()  # endpoint -> live Runtimes of this process connected to it
_lock = threading.Lock()


def rpc_devices(endpoints: Sequence[str], timeout: float = 5.0) -> list[int]:
    """ggml devices of the given servers (one per device a server exposes), after a handshake check."""
    require_rpc()
    reg = fn("ggml_backend_reg_by_name")(b"RPC")
    add = fn("ggml_backend_reg_get_proc_address")(reg, b"ggml_backend_rpc_add_server") if reg else None
    if not add:
        raise RpcError("the RPC backend of this build does not export ggml_backend_rpc_add_server")
    add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(add)
    devs: list[int] = []
    for ep in endpoints:
        with _lock:
            busy_with_us = _in_use[ep] > 0
        if not busy_with_us:  # our own open connection would make the server look busy
            hello(ep, timeout)
        sreg = add_server(ep.encode())
        if not sreg:
            raise RpcError(f"RPC endpoint {ep} exposes no device")
        devs += [fn("ggml_backend_reg_dev_get")(sreg, i) for i in range(fn("ggml_backend_reg_dev_count")(sreg))]
    return devs


def local_gpus() -> list[int]:
    """This machine's GPU devices in llama.cpp's default order (discrete; integrated only when none)."""
    gpus, igpus = [], []
    for i in range(fn("ggml_backend_dev_count")()):
        d = fn("ggml_backend_dev_get")(i)
        t = fn("ggml_backend_dev_type")(d)
        if t == _DEV_GPU and fn("ggml_backend_reg_name")(fn("ggml_backend_dev_backend_reg")(d)) != b"RPC":
            gpus.append(d)
        elif t == _DEV_IGPU:
            igpus.append(d)
    return gpus or igpus


def model_devices(endpoints: Sequence[str], timeout: float = 5.0):
    """NULL-terminated ggml_backend_dev_t array for llama_model_params.devices: the RPC devices first,
    then the local GPUs, as llama.cpp orders them when it picks devices itself (src/llama.cpp,
    llama_prepare_model_devices: "add RPC servers at the front of the list to minimize network transfers")."""
    devs = rpc_devices(endpoints, timeout) + local_gpus()
    return (ctypes.c_void_p * (len(devs) + 1))(*devs, None)


def acquire(endpoints: Sequence[str]) -> None:
    with _lock:
        _in_use.update(endpoints)


def release(endpoints: Sequence[str]) -> None:
    with _lock:
        _in_use.subtract(endpoints)


# ---- the server binary ----

def server_binary() -> Path | None:
    """ggml-rpc-server: $EA_LOCAL_RPC_SERVER, else the one in the installed wheel next to libllama."""
    env = os.environ.get("EA_LOCAL_RPC_SERVER")
    if env:
        return Path(env)
    p = Path(kvhooks.lib_path).parent / SERVER_NAME
    return p if p.exists() else None


def server_command(host: str = "127.0.0.1", port: int = DEFAULT_PORT, threads: int | None = None,
                   cache: bool = False, device: str | None = None) -> list[str]:
    exe = server_binary()
    if exe is None:
        raise RpcError(f"{SERVER_NAME} is not in this install ({Path(kvhooks.lib_path).parent}): rebuild with "
                       "`python scripts/build_llama.py --rpc --install`, or set EA_LOCAL_RPC_SERVER")
    cmd = [str(exe), "--host", host, "--port", str(port)]
    if threads:
        cmd += ["--threads", str(threads)]
    if cache:
        cmd.append("--cache")
    if device:
        cmd += ["--device", device]
    return cmd


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalServer:
    """A ggml-rpc-server child process on this machine (tests, benchmarks); stopped by stop() or `with`."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", threads: int | None = 1,
                 start_timeout: float = 30.0, log: Path | None = None):
        self.host, self.port = host, port or free_port(host)
        self.endpoint = f"{host}:{self.port}"
        self._log = open(log, "wb") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(server_command(host, self.port, threads), stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + start_timeout
        while True:
            if self.proc.poll() is not None:
                self.stop()
                raise RpcError(f"{SERVER_NAME} on {self.endpoint} exited at start (code {self.proc.returncode})")
            try:
                hello(self.endpoint, timeout=2.0)
                return
            except RpcError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RpcError(f"{SERVER_NAME} on {self.endpoint} did not answer within {start_timeout:g} s")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()
            self._log = subprocess.DEVNULL

    def __enter__(self) -> "LocalServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
