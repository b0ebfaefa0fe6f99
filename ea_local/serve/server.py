"""Start-up and shutdown: load the model once, one context per slot, uvicorn, SIGTERM drain."""
from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import uvicorn

from ..model.chat_template import resolve_template
from ..engine.runtime import SharedModel
from ..engine.session import SessionConfig
from ..model.info import ModelInfo
from .app import Server, ServeConfig, create_app
from .slots import build_pool


def build_server(info: ModelInfo, cfg: ServeConfig, session_cfg: SessionConfig, parallel: int, queue: int,
                 reuse: bool = True) -> Server:
    """The model's weights are loaded once and shared by the `parallel` contexts (llama.cpp allows
    several contexts on one llama_model); each context costs its own KV cache and compute buffers."""
    path = str(info.path)
    shared = SharedModel(path, session_cfg.n_gpu_layers, tuple(session_cfg.rpc))
    try:
        pool = build_pool(path, session_cfg, parallel, queue, reuse=reuse, shared=shared)
    except Exception:
        shared.close()
        raise
    rt = pool.slots[0].session.rt
    template, notice = resolve_template(info, rt)
    srv = Server(cfg, pool, rt, template)
    srv.shared = shared
    srv.notice = notice
    return srv


def close_server(srv: Server) -> None:
    srv.close()
    srv.shared.close()


class _Uvicorn(uvicorn.Server):
    """SIGTERM/SIGINT first stop the generations (streams end with a final chunk and [DONE]), then
    uvicorn's own graceful shutdown waits for the connections; SIGTERM then exits 0."""

    def __init__(self, config: uvicorn.Config, srv: Server):
        super().__init__(config)
        self.srv = srv
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None) -> None:  # noqa: ANN001
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if not self.should_exit:
            print(f"ea-local serve: listening on http://{self.config.host}:{self._port()}/v1", file=sys.stderr,
                  flush=True)

    def _port(self) -> int:
        for s in self.servers:
            for sock in s.sockets:
                return sock.getsockname()[1]
        return self.config.port

    def handle_exit(self, sig: int, frame) -> None:  # noqa: ANN001
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.srv.drain)
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:
            # uvicorn re-raises the signal after its shutdown (exit status 143); a drained SIGTERM is a clean exit
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured[:] = [s for s in captured if s != signal.SIGTERM]


def serve(srv: Server, host: str, port: int, log_level: str = "info") -> None:
    app = create_app(srv)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                            timeout_graceful_shutdown=int(srv.cfg.shutdown_grace_s) + 5)
    server = _Uvicorn(config, srv)
    try:
        server.run()
    finally:
        close_server(srv)


def model_id(path: str) -> str:
    name = Path(path).name
    return name[:-5] if name.lower().endswith(".gguf") else name
