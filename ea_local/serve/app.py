"""The HTTP routes: OpenAI's chat and text completions (JSON or SSE), models, health, metrics.

The model runs in worker threads (one per slot); the event loop only parses, queues and streams.
A streamed answer travels from the worker to the loop through an asyncio queue; when the client
goes away the worker's slot is told to stop (it checks before every token and between prefill
chunks) and the slot returns to the pool when the worker has stopped using it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import accumulate
from typing import Callable

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from ..model.chat_template import ChatTemplate, TemplateError
from ..engine.runtime import LlamaError, Runtime
from ..engine.sampling import SamplingParams, TokenLogprob, check_grammar
from ..engine.session import MIN_CONVERSATION_BUDGET, BudgetError
from ..policies import get_policy
from .errors import APIError, error_response
from .guard import Guard
from .metrics import Metrics
from ..engine.question import chat_question_text, chat_tail_text, completion_question_text, question_length
from .schemas import ChatRequest, CompletionRequest, chat_messages, check_common, parse
from .slots import Cancelled, GenRequest, GenResult, Slot, SlotPool

log = logging.getLogger("ea_local.serve")


@dataclass
class ServeConfig:
    model_id: str
    budget: int  # the slots' budget: the largest a request may ask for
    policy: str = "expected-attention"
    min_budget: int = MIN_CONVERSATION_BUDGET  # the engine's floor
    max_tokens: int = 512  # when a request gives none
    max_tokens_limit: int = 32768
    max_prompt_tokens: int = 131072
    temperature: float = 0.0
    api_key: str | None = None
    max_body: int = 4 * 2**20
    shutdown_grace_s: float = 5.0
    max_question: int = 120  # question tokens probed at compressions (question.py); <= step - answer_lookahead


@dataclass
class Prepared:
    tokens: list[int]
    gen: GenRequest
    stream: bool
    include_usage: bool


class Server:
    """State shared by the routes: pool, tokenizer, template, metrics, worker threads."""

    def __init__(self, cfg: ServeConfig, pool: SlotPool, rt: Runtime, template: ChatTemplate):
        self.cfg = cfg
        self.pool = pool
        self.rt = rt  # tokenizing only (model-level vocab, read-only; safe beside a decoding context)
        self.template = template
        self.metrics = Metrics(pool)
        self.workers = ThreadPoolExecutor(max_workers=len(pool.slots), thread_name_prefix="ea-slot")
        self.created = int(time.time())

    def drain(self) -> None:
        """Stop taking requests and end running generations (called from the SIGTERM handler)."""
        self.pool.drain()

    def close(self) -> None:
        self.workers.shutdown(wait=True)
        self.pool.close()

    # ---- request -> tokens ----
    def tokens(self, text: str) -> list[int]:
        return self.rt.prompt_tokens(text)

    def chat_request(self, messages: list[dict]) -> tuple[list[int], int, int]:
        """(prompt tokens, how many of the last ones are the question, how many of those the template
        wrote after the user's text)."""
        try:
            text = self.template.render(messages, add_generation_prompt=True)
        except TemplateError as e:
            raise APIError(400, str(e), code="invalid_value", param="messages") from None
        tokens = self.tokens(text)
        q = chat_question_text(text, messages, self.rt.count, self.cfg.max_question)
        tail = chat_tail_text(text, messages)
        return (tokens, question_length(q, len(tokens), self.rt.count, self.cfg.max_question),
                min(self.rt.count(tail), len(tokens) - 1) if tail else 0)

    def completion_request(self, prompt) -> tuple[list[int], int, int | None]:
        tokens = self.prompt_tokens(prompt)
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):  # token ids: the question is found in their text
            prompt = b"".join(self.rt.token_bytes(t, special=True) for t in tokens).decode("utf-8", errors="replace")
        q = completion_question_text(prompt)
        return tokens, question_length(q, len(tokens), self.rt.count, self.cfg.max_question), None  # no template

    def prompt_tokens(self, prompt) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            bad = [t for t in prompt if not 0 <= t < self.rt.n_vocab]
            if bad:
                raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary (0..{self.rt.n_vocab - 1})",
                               code="invalid_value", param="prompt")
            return list(prompt)
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, f"prompt: one prompt per request is supported, got {len(prompt)}",
                               code="invalid_value", param="prompt")
            prompt = prompt[0]
        return self.tokens(prompt)

    async def prepare(self, req, max_tokens: int | None,
                      make_tokens: Callable[[], tuple[list[int], int, int | None]]) -> Prepared:
        cfg = self.cfg
        kv = req.kv_compression
        policy = (kv.policy if kv and kv.policy else None) or cfg.policy
        try:
            pol = get_policy(policy)
        except ValueError as e:
            raise APIError(400, f"kv_compression.policy: {e}", code="unknown_policy",
                           param="kv_compression.policy") from None
        if policy != cfg.policy and (not pol.evicts or pol.lookahead):
            # the slots' contexts were sized for the server's policy: "none" needs n_ctx = budget, a lookahead
            # policy extra cells for its pseudo tokens
            raise APIError(400, f"kv_compression.policy: {policy!r} sizes the context differently; start the "
                           f"server with --policy {policy} to use it", code="unsupported_policy",
                           param="kv_compression.policy")
        budget = kv.budget if kv and kv.budget is not None else cfg.budget
        if not cfg.min_budget <= budget <= cfg.budget:
            raise APIError(400, f"kv_compression.budget must be in {cfg.min_budget}..{cfg.budget} (the server's "
                           f"--budget), got {budget}", code="invalid_value", param="kv_compression.budget")
        tokens, question_len, template_tail = await asyncio.to_thread(make_tokens)
        if not tokens:
            raise APIError(400, "the prompt is empty", code="invalid_value", param="prompt")
        if len(tokens) > cfg.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(tokens)} tokens; this server takes at most "
                           f"{cfg.max_prompt_tokens} per request (--max-prompt-tokens)",
                           code="context_length_exceeded", param="messages")
        temp = cfg.temperature if req.temperature is None else req.temperature
        seed = req.seed if req.seed is not None else (secrets.randbits(32) if temp > 0 else 0)
        params = SamplingParams(temperature=temp, seed=seed & 0xFFFFFFFF, ignore_eos=req.ignore_eos,
                                grammar=req.grammar())
        if params.grammar is not None:
            try:
                check_grammar(self.rt, params.grammar)
            except ValueError as e:
                raise APIError(400, f"response_format: {e}", code="invalid_value", param="response_format") from None
        for name in ("top_p", "top_k", "min_p", "repeat_penalty", "repeat_last_n", "frequency_penalty",
                     "presence_penalty"):
            if getattr(req, name) is not None:
                setattr(params, name, getattr(req, name))
        gen = GenRequest(tokens=tokens, params=params, stop=req.stop_list(), max_tokens=max_tokens or cfg.max_tokens,
                         policy=policy, budget=budget, question_agnostic=bool(kv and kv.question_agnostic),
                         question_len=question_len, template_tail=template_tail, logprobs=req.logprobs_k())
        include = bool(req.stream_options and req.stream_options.include_usage)
        return Prepared(tokens, gen, bool(req.stream), include)

    # ---- running ----
    async def acquire(self, request: Request, gen: GenRequest) -> Slot:
        task = asyncio.ensure_future(self.pool.acquire(gen))
        gone = await _race_disconnect(request, task)
        if gone:
            raise _ClientGone()
        return task.result()

    def start(self, slot: Slot, gen: GenRequest, emit: Callable[[str, list[TokenLogprob]], None]) -> asyncio.Future:
        """The request's generation in a worker thread: its GenResult, or None if it was cancelled
        before generating (a result, not an exception: a stream whose client left never reads it, and
        asyncio would log an unread exception as an error)."""
        loop = asyncio.get_running_loop()

        def work() -> GenResult | None:
            try:
                res = slot.run(gen, emit)
                self.metrics.record(res)
                return res
            except Cancelled:
                self.metrics.cancelled.inc()
                return None
            finally:
                _call_soon(loop, self.pool.release, slot)

        return loop.run_in_executor(self.workers, work)


class _ClientGone(Exception):
    pass


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: the process is exiting
        pass


async def _race_disconnect(request: Request, fut: asyncio.Future, every: float = 0.25) -> bool:
    """Wait for fut; True (and fut cancelled) if the client disconnects first."""
    while True:
        done, _ = await asyncio.wait({fut}, timeout=every)
        if done:
            return False
        if await request.is_disconnected():
            fut.cancel()
            return True


def _token_text(b: bytes) -> str:
    """A token's text; bytes that are not UTF-8 on their own (part of a character) as OpenAI writes them."""
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{c:02x}" for c in b)


def _logprobs(tokens: list[TokenLogprob], chat: bool) -> dict:
    """OpenAI's logprobs object: chat's `content` list, or the legacy completions' parallel lists."""
    text = [_token_text(t.token) for t in tokens]
    if chat:
        def entry(b: bytes, s: str, lp: float) -> dict:
            return {"token": s, "logprob": lp, "bytes": list(b)}
        return {"content": [{**entry(t.token, s, t.logprob),
                             "top_logprobs": [entry(b, _token_text(b), lp) for b, lp in t.top]}
                            for t, s in zip(tokens, text)], "refusal": None}
    offsets = list(accumulate((len(t.token.decode("utf-8", errors="replace")) for t in tokens[:-1]), initial=0))
    return {"tokens": text, "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{_token_text(b): lp for b, lp in t.top} for t in tokens],
            "text_offset": offsets if tokens else []}


def _usage(res: GenResult) -> dict:
    return {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
            "total_tokens": res.prompt_tokens + res.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": res.cached_tokens}}


def _kv(res: GenResult) -> dict:
    """Extension: what the request did to its slot's cache."""
    return {"slot": res.slot, "cells": res.cells, "budget": res.budget, "policy": res.policy,
            "prefilled_tokens": res.prompt_tokens - res.cached_tokens, "question_tokens": res.question_tokens,
            "evicted_cells": res.evicted_cells, "recalled_cells": res.recalled_cells,
            "compression_ms": round(1000 * res.compression_s, 1)}


def _finish(res: GenResult) -> str:
    # a generation cut short by a disconnect or a shutdown is reported as truncated
    return "length" if res.finish_reason == "cancelled" else res.finish_reason


def create_app(srv: Server) -> Guard:
    cfg = srv.cfg
    app = FastAPI(title="ea-local", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        msg = {404: f"unknown route {request.url.path}", 405: f"method {request.method} not allowed on "
               f"{request.url.path}"}.get(e.status_code, str(e.detail))
        return error_response(APIError(e.status_code, msg, code={404: "not_found", 405: "method_not_allowed"}
                                       .get(e.status_code)))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        return error_response(APIError(400, str(e), code="invalid_value"))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("internal error")
        return error_response(APIError(500, f"internal error: {type(e).__name__}", code="internal_error"))

    @app.get("/health")
    async def health():
        pool = srv.pool
        return {"status": "shutting_down" if pool.closing else "ok", "slots_idle": pool.n_free,
                "slots": len(pool.slots), "queue": pool.queue_length,
                "cells": [s.session.n_cells for s in pool.slots]}

    @app.get("/metrics")
    async def metrics():
        return Response(srv.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict:
        return {"id": cfg.model_id, "object": "model", "created": srv.created, "owned_by": "ea-local",
                "kv_compression": {"policy": cfg.policy, "budget": cfg.budget}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != cfg.model_id:
            raise APIError(404, f"model {model_id!r} is not served here (this server runs {cfg.model_id!r})",
                           code="model_not_found", param="model")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse(ChatRequest, await request.body())
        mt = check_common(req, cfg.max_tokens_limit)
        msgs = chat_messages(req)
        prep = await srv.prepare(req, mt, lambda: srv.chat_request(msgs))
        return await _respond(request, prep, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await request.body())
        mt = check_common(req, cfg.max_tokens_limit)
        prep = await srv.prepare(req, mt, lambda: srv.completion_request(req.prompt))
        return await _respond(request, prep, chat=False)

    async def _respond(request: Request, prep: Prepared, chat: bool):
        try:
            slot = await srv.acquire(request, prep.gen)
        except _ClientGone:
            return Response(status_code=499)  # nobody is listening; the status only shows in the access log
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if prep.stream:
            return _stream(slot, prep, chat, rid, created)
        fut = srv.start(slot, prep.gen, lambda *_: None)
        if await _race_disconnect(request, fut):
            slot.cancel.set()  # the worker stops at its next token and frees the slot
            return Response(status_code=499)
        try:
            res = fut.result()
        except BudgetError as e:  # policy "none": the conversation no longer fits its context
            raise APIError(400, str(e), code="context_length_exceeded") from None
        except LlamaError as e:
            raise APIError(500, f"the engine failed: {e}", code="engine_error") from None
        if res is None:
            raise APIError(503, "the server is shutting down", code="server_busy")
        lp = None if res.logprobs is None else _logprobs(res.logprobs, chat)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": res.text}, "logprobs": lp,
                      "finish_reason": _finish(res)}
        else:
            choice = {"index": 0, "text": res.text, "logprobs": lp, "finish_reason": _finish(res)}
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": cfg.model_id, "choices": [choice], "usage": _usage(res),
                             "kv_cache": _kv(res)})

    def _stream(slot: Slot, prep: Prepared, chat: bool, rid: str, created: int) -> EventSourceResponse:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        fut = srv.start(slot, prep.gen, lambda piece, tokens: _call_soon(loop, q.put_nowait, (piece, tokens)))
        fut.add_done_callback(lambda f: q.put_nowait(f))
        obj = "chat.completion.chunk" if chat else "text_completion"
        shutdown = anyio.Event()

        def chunk(text: str | None, finish: str | None = None, first: bool = False,
                  tokens: list[TokenLogprob] | None = None) -> dict:
            lp = None if prep.gen.logprobs is None or tokens is None else _logprobs(tokens, chat)
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": lp, "finish_reason": finish}
            body = {"id": rid, "object": obj, "created": created, "model": cfg.model_id, "choices": [choice]}
            if prep.include_usage:
                body["usage"] = None
            return {"data": json.dumps(body)}

        async def watch_shutdown():
            await shutdown.wait()
            slot.cancel.set()

        async def events():
            finished = False
            watcher = asyncio.ensure_future(watch_shutdown())
            try:
                if chat:
                    yield chunk(None, first=True)
                while True:
                    item = await q.get()
                    if isinstance(item, tuple):
                        piece, tokens = item
                        yield chunk(piece, tokens=tokens)
                        continue
                    finished = True
                    try:
                        res = item.result()
                    except Exception as e:  # noqa: BLE001 — reported in the stream, as OpenAI does
                        log.warning("generation failed: %s", e)
                        yield {"data": json.dumps({"error": {"message": f"the engine failed: {e}",
                                                             "type": "server_error", "code": "engine_error"}})}
                    else:
                        if res is None:  # cancelled before it generated (the server is shutting down)
                            yield chunk(None, "length")
                        else:
                            body = json.loads(chunk(None, _finish(res))["data"])
                            body["kv_cache"] = _kv(res)
                            yield {"data": json.dumps(body)}
                            if prep.include_usage:
                                yield {"data": json.dumps({"id": rid, "object": obj, "created": created,
                                                           "model": cfg.model_id, "choices": [], "usage": _usage(res)})}
                    yield {"data": "[DONE]"}
                    return
            finally:
                watcher.cancel()
                if not finished:  # the client went away mid-stream
                    slot.cancel.set()

        return EventSourceResponse(events(), ping=15, shutdown_event=shutdown,
                                   shutdown_grace_period=cfg.shutdown_grace_s)

    return Guard(app, cfg.api_key, cfg.max_body, count=lambda route, status: srv.metrics.requests.labels(
        route, str(status)).inc())
