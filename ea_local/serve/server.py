"""Start-up and shutdown: load the model once, one context per slot, uvicorn, SIGTERM drain."""
from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import uvicorn

from ..model.chat_template import resolve_template
from ..engine.archive import parse_size
from ..engine.question import question_cap
from ..engine.runtime import SharedModel
from ..engine.session import SessionConfig, conversation_protection
from ..policies import get_policy
from ..model.info import ModelInfo
from .app import Server, ServeConfig, create_app
from .slots import build_pool


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def check_flags(*, parallel: int, queue: int, max_tokens: int, max_prompt_tokens: int, max_body: int, port: int,
                log_level: str, policy: str) -> None:
    """`ea-local serve`'s flags that need no model; ValueError (one line) for a bad one."""
    for name, v, lo in (("--parallel", parallel, 1), ("--queue", queue, 0), ("--max-tokens", max_tokens, 1),
                        ("--max-prompt-tokens", max_prompt_tokens, 1), ("--max-body", max_body, 1024)):
        if v < lo:
            raise ValueError(f"{name} must be at least {lo}, got {v}")
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {port}")
    if log_level not in LOG_LEVELS:
        raise ValueError(f"unknown --log-level {log_level!r}")
    get_policy(policy)  # ValueError for an unknown name


def configure(info: ModelInfo, *, budget: int, policy: str, max_tokens: int, max_prompt_tokens: int, max_body: int,
              temperature: float, api_key: str | None, cache_type: str, seed: int, threads: int | None,
              n_gpu_layers: int | None, rpc: tuple[str, ...], recall: bool,
              archive: str) -> tuple[ServeConfig, SessionConfig]:
    """The server's and every slot's settings for `info`'s model; ValueError (one line) for a bad value."""
    a_tokens, a_bytes = parse_size(archive)
    k = conversation_protection(budget)
    scfg = SessionConfig(budget=budget, policy=policy, cache_type=cache_type, seed=seed, n_threads=threads,
                         n_gpu_layers=n_gpu_layers, chunk=max(1, min(512, budget // 2)), rpc=rpc,
                         recall=recall, archive_tokens=a_tokens, archive_bytes=a_bytes,
                         n_sink=k, recent=k, guard_question=True)
    scfg.validate()
    cfg = ServeConfig(model_id=model_id(str(info.path)), budget=budget, policy=policy,
                      max_tokens=max_tokens,
                      max_tokens_limit=max(max_tokens, info.n_ctx_train), max_prompt_tokens=max_prompt_tokens,
                      temperature=temperature, api_key=api_key or None, max_body=max_body,
                      max_question=question_cap(scfg))
    return cfg, scfg


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
