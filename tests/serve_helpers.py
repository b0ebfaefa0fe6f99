"""A real `ea-local serve` process on a free loopback port, for tests and scripts."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`--threads 1` unless EA_LOCAL_TEST_THREADS says otherwise: on a shared, loaded CPU, llama.cpp's
    spinning worker threads made a 2-thread server ~10x slower than a 1-thread one."""
    def __init__(self, model: str, *args: str, api_key: str | None = None, start_timeout: float = 120.0):
        self.port = free_port()
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="ea-serve-", suffix=".log", delete=False)
        full_env = {k: v for k, v in os.environ.items() if k != "EA_LOCAL_API_KEY"}
        full_env["PYTHONPATH"] = str(ROOT)
        if api_key:
            full_env["EA_LOCAL_API_KEY"] = api_key
        cmd = [sys.executable, "-m", "ea_local.cli", "serve", "--model", model, "--port", str(self.port),
               "--log-level", "warning", "--threads", os.environ.get("EA_LOCAL_TEST_THREADS", "1"), *args]
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=self.log, stderr=subprocess.STDOUT, cwd=str(ROOT))
        self.client = httpx.Client(base_url=self.url, timeout=120.0)
        deadline = time.monotonic() + start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}): {self.output()}")
            try:
                if self.client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start: {self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        text = self.client.get("/metrics", headers=self.headers).text
        out = {}
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) ([-+\w.]+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def wait_idle(self, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            h = self.client.get("/health").json()
            if h["slots_idle"] == h["slots"] and h["queue"] == 0:
                return h
            if time.monotonic() > deadline:
                raise AssertionError(f"slots still busy after {timeout} s: {h}")
            time.sleep(0.1)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def terminate(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)
