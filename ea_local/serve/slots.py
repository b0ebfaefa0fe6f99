"""The slot pool: one Session (one llama.cpp context) per slot, a bounded queue, conversation reuse.

Reuse. Each slot's session remembers every token it was fed, in order, and the position each one
was decoded at (`Session.transcript`). A request's prompt tokens are compared with that history; the longest common
prefix `k` is kept and only `prompt[k:]` is prefilled. The kept prefix is kept *as compressed*:
tokens of it that the policy evicted are not recomputed — the slot continues exactly as one
uninterrupted conversation would (what `ea-local chat` does between turns). When the history goes
on past `k` (the client edited or cut the last answer, a stop string's tokens were decoded but
not returned, or the template renders the answer differently), every cell from the position of
history token `k` on is dropped (`Session.truncate`) and prefilling resumes there.
On sliding-window models the sliding layers must still hold the window before that position; if
they were pruned past it, the slot starts over (full prefill) — counted as no reuse.
llama.cpp continues a sequence only at its highest cached position + 1, so on all-layer models a
prefix whose last tokens were evicted is shortened to end at its last cached token
(`Session.keep_prefix`).
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import KW_ONLY, dataclass, field
from typing import Callable

import numpy as np

from ..engine.runtime import LlamaError, SharedModel
from ..engine.sampling import SamplingParams, TokenLogprob
from ..engine.session import Session, SessionConfig, conversation_protection
from ..engine.textstream import TextStream
from .errors import APIError


class Cancelled(Exception):
    """The client went away or the server is shutting down."""


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(diff[0]) if len(diff) else n


@dataclass
class GenRequest:
    tokens: list[int]
    params: SamplingParams
    stop: list[str]
    max_tokens: int
    policy: str
    budget: int
    question_agnostic: bool = False
    question_len: int = 0  # the prompt's last tokens that are its question (engine/question.py)
    template_tail: int | None = None  # chat: the prompt's last tokens the template wrote after the user's text
    logprobs: int | None = None  # report each token's log-probability and this many alternatives (None: off)

    @property
    def compression(self) -> tuple[str, int, bool]:
        """What decides which cells a compression keeps (a cache compressed otherwise answers otherwise)."""
        return self.policy, self.budget, self.question_agnostic


@dataclass
class GenResult:
    text: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens taken from the slot's cache instead of prefilled
    question_tokens: int = 0  # question tokens probed at this request's compressions (0: not steered)
    completion_tokens: int = 0
    finish_reason: str = "stop"
    evicted_cells: int = 0
    evictions: int = 0
    compression_s: float = 0.0
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    cells: int = 0
    recalled_cells: int = 0  # cells the request's message brought back from the slot's archive
    recall_s: float = 0.0
    budget: int = 0
    policy: str = ""
    slot: int = 0
    logprobs: list[TokenLogprob] | None = None  # the tokens of `text`, when the request asked for them


@dataclass
class Slot:
    id: int
    session: Session
    _: KW_ONLY
    reuse: bool = True
    busy: bool = False
    last_used: float = 0.0
    compressed_as: tuple[str, int, bool] | None = None  # the last request's GenRequest.compression
    cancel: threading.Event = field(default_factory=threading.Event)

    def match(self, tokens: list[int], compression: tuple[str, int, bool] | None = None) -> int:
        """Prompt tokens the cache stands for: none when it lost cells under other compression settings
        (a request's policy, budget or question-agnostic mode would then answer as the previous one's)."""
        s = self.session
        if not self.reuse or (compression is not None and self.compressed_as not in (None, compression)
                              and s.n_cells < len(s.transcript)):
            return 0
        return common_prefix(s.transcript.tokens, tokens)

    def _configure(self, policy: str, budget: int) -> None:
        s = self.session
        if policy != s.cfg.policy:  # as chat's /policy: the next compression scores with it
            s.set_policy(policy)
        s.set_budget(budget, protect=conversation_protection(budget))

    def prepare(self, tokens: list[int], budget: int | None = None,
                compression: tuple[str, int, bool] | None = None) -> int:
        """Make the cache hold a prefix of `tokens`; returns its length (tokens not to prefill).

        A prompt that fits the budget whole is read again from scratch when its cached prefix lost
        cells to eviction: reading it costs at most `budget` tokens and nothing of it is lost."""
        s = self.session
        k = min(self.match(tokens, compression), len(tokens) - 1)  # at least one token is fed: it gives the logits
        if k > 0:
            k = s.keep_prefix(k)
        if k > 0 and budget is not None and len(tokens) <= budget and s.n_cells < k:
            k = 0
        if k == 0:
            s.reset()
        return k

    def question(self, req: GenRequest, k: int) -> list[int]:
        """The request's question, when it must steer: the prompt's new tokens will be compressed
        before the question at their end is read (they do not fit the budget), so a policy that reads
        queries probes it after the context at every compression, as `summarize --prompt` does, and
        recall brings back what it asks for once it is read (whatever the policy)."""
        s = self.session
        n = min(req.question_len, s.max_question)
        new = len(req.tokens) - k
        if req.question_agnostic or n == 0 or new <= n or not s.evicts_reading(new):
            return []
        return req.tokens[len(req.tokens) - n:]

    def run(self, req: GenRequest, emit: Callable[[str, list[TokenLogprob]], None]) -> GenResult:
        """Prefill what the cache lacks and generate; runs in a worker thread. The cache is reset on
        any engine error, so a failed request never leaves a half-updated conversation behind."""
        s = self.session
        t0 = time.perf_counter()
        try:
            # a request that repeats the cached conversation (a regenerate) says nothing new: recall with the
            # one token re-fed for its logits would change the cache the first answer was given from
            says_new = self.match(req.tokens, req.compression) < len(req.tokens)
            k = self.prepare(req.tokens, req.budget, req.compression)
            self.compressed_as = req.compression
            self._configure(req.policy, req.budget)
            ev0 = len(s.stats.evictions)

            def check(done: int, total: int) -> None:
                if self.cancel.is_set():
                    raise Cancelled()

            question = self.question(req, k)
            s.set_question_weight(0.0 if req.question_agnostic else SessionConfig.question_weight)
            s.set_question(question if s.policy.needs_queries else None)
            # question-agnostic: the new tokens are context like any other (their queries are the statistics);
            # otherwise, unless a question steers, they end with the user's newest message: their queries
            # are the focus
            start = s.next_pos
            turn = not (question or req.question_agnostic)
            s.prefill(req.tokens[k:], progress=check, turn=turn)
            r0, rs0 = s.stats.recalled, s.stats.recall_s
            if s.recall_on and not req.question_agnostic and says_new:
                # the conversation's archive: bring back what the new message needs, or, when the prompt was
                # compressed before its end was read, what its question asks for (its queries against the
                # context's just before it, as summarize --prompt recalls with its question; a completion has
                # no template tail, and the engine decides whether the probe's answer tokens ask too)
                s.recall_message(start, question,
                                 until=None if req.template_tail is None else s.next_pos - req.template_tail)
            res = GenResult(prompt_tokens=len(req.tokens), cached_tokens=k, slot=self.id, policy=req.policy,
                            budget=req.budget, question_tokens=len(s.question))
            res.prefill_s = time.perf_counter() - t0
            res.recalled_cells, res.recall_s = s.stats.recalled - r0, s.stats.recall_s - rs0
            stream = TextStream(req.stop)  # stop strings here, not in Session.generate: we need to know one hit
            n0 = s.stats.tokens_seen
            pieces: list[str] = []
            stopped = False
            tokens: list[TokenLogprob] = []  # generated so far, when the request asked for their logprobs
            sent = sent_bytes = shown = 0

            def send(text: str) -> None:
                """Emit text with the tokens whose bytes it completes (a stop string's tokens never go out)."""
                nonlocal sent, sent_bytes, shown
                if not pieces:
                    res.ttft_s = time.perf_counter() - t0
                pieces.append(text)
                shown += len(text.encode("utf-8"))
                done = sent
                while done < len(tokens) and sent_bytes + len(tokens[done].token) <= shown:
                    sent_bytes += len(tokens[done].token)
                    done += 1
                emit(text, tokens[sent:done])
                sent = done

            for piece in s.generate([], req.params, max_tokens=req.max_tokens, should_stop=self.cancel.is_set,
                                    on_token=None if req.logprobs is None else tokens.append,
                                    top_logprobs=req.logprobs or 0):
                out, stopped = stream.push(piece.encode("utf-8"))
                if out:
                    send(out)
                if stopped:
                    break
            if not stopped:
                tail = stream.flush()
                if tail:
                    send(tail)
            if req.logprobs is not None:
                res.logprobs = tokens[:sent]
            res.completion_tokens = s.stats.tokens_seen - n0
            res.text = "".join(pieces)
            if self.cancel.is_set():
                res.finish_reason = "cancelled"
            elif not stopped and res.completion_tokens >= req.max_tokens:
                res.finish_reason = "length"
            evs = s.stats.evictions[ev0:]
            res.evictions = len(evs)
            res.evicted_cells = sum(e.n_evicted for e in evs)
            res.compression_s = sum(e.score_s + e.evict_s for e in evs)
            res.cells = s.n_cells
            return res
        except Cancelled:
            raise
        except Exception:
            s.reset()
            raise
        finally:
            self.last_used = time.monotonic()


class SlotPool:
    """Free slots are handed to requests; beyond them up to `queue` requests wait (FIFO), then 503."""

    def __init__(self, slots: list[Slot], queue: int, retry_after: int = 2):
        self.slots = slots
        self.queue_limit = queue
        self.retry_after = retry_after
        self.waiters: deque[asyncio.Future] = deque()
        self.reserved = 0  # slots promised to woken waiters that have not picked yet
        self.closing = False

    @property
    def n_free(self) -> int:
        return sum(not s.busy for s in self.slots)

    @property
    def queue_length(self) -> int:
        return len(self.waiters)

    def _busy_error(self, why: str) -> APIError:
        return APIError(503, why, code="server_busy", headers={"Retry-After": str(self.retry_after)})

    async def acquire(self, req: GenRequest) -> Slot:
        if self.closing:
            raise self._busy_error("the server is shutting down")
        if self.n_free - self.reserved > 0:
            return self._take(req)
        if len(self.waiters) >= self.queue_limit:
            raise self._busy_error(f"all {len(self.slots)} slots are busy and {len(self.waiters)} requests wait")
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut in self.waiters:
                self.waiters.remove(fut)
            elif fut.done() and not fut.cancelled():  # woken but gone: pass the slot on
                self.reserved -= 1
                self._wake()
            raise
        self.reserved -= 1
        if self.closing:
            self._wake()
            raise self._busy_error("the server is shutting down")
        return self._take(req)

    def _take(self, req: GenRequest) -> Slot:
        """The free slot whose cache holds the longest part of this prompt; when none holds at least
        half of its own history, the least recently used one (so unrelated clients do not wipe each
        other's conversations while an idle slot exists)."""
        free = [s for s in self.slots if not s.busy]
        best = max(free, key=lambda s: (s.match(req.tokens, req.compression), -s.last_used))
        k = best.match(req.tokens, req.compression)
        if k == 0 or k < len(best.session.transcript) // 2:
            best = min(free, key=lambda s: s.last_used)
        best.busy = True
        best.cancel.clear()
        return best

    def release(self, slot: Slot) -> None:
        slot.busy = False
        self._wake()

    def _wake(self) -> None:
        while self.waiters and self.n_free - self.reserved > 0:
            fut = self.waiters.popleft()
            if not fut.done():
                self.reserved += 1
                fut.set_result(None)

    def drain(self) -> None:
        """Shutdown: refuse new requests, stop running generations, wake the queue (it gets 503)."""
        self.closing = True
        for s in self.slots:
            if s.busy:
                s.cancel.set()
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                self.reserved += 1
                fut.set_result(None)

    def close(self) -> None:
        for s in self.slots:
            s.session.close()


def build_pool(model_path: str, cfg: SessionConfig, parallel: int, queue: int, reuse: bool = True,
               shared: SharedModel | None = None) -> SlotPool:
    slots = []
    try:
        for i in range(parallel):
            slots.append(Slot(i, Session(model_path, SessionConfig(**{**cfg.__dict__,
                                                                          "policy_options": dict(cfg.policy_options)}),
                                             shared=shared), reuse=reuse))
    except (LlamaError, ValueError):
        for s in slots:
            s.session.close()
        raise
    return SlotPool(slots, queue)
