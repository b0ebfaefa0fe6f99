"""A conversation with one model inside a fixed KV budget.

The Session feeds tokens to the Runtime, remembers which token sits at which position, and,
when the next chunk or token would not fit, scores the live cells with a policy and evicts the
least important ones down to `budget - step` (prefill: after each chunk, as kvpress compresses
while prefilling; decoding: once every `step` tokens). The first `n_sink` tokens and the most
recent `recent` tokens are never evicted; the newest cell never is (llama.cpp needs the next
token at seq_pos_max + 1).

On iSWA models (gemma2/3) only the global layers' cache is evicted and scored: the sliding
layers keep their window in a window-sized cache of their own (swa_full off), so eviction never
takes a token they still attend to (DESIGN.md).

Query-aware statistics (docs/query_aware.md). Question-agnostic statistics (the recent context's queries,
kvpress' protocol) lose facts that only the question attends to. So the Session keeps a second
window, the *focus*: the queries of the user's newest message (`prefill(..., turn=True)`), or of
a question known before the text is compressed (`set_question`), which is decoded as a probe
right after the context at each compression and removed again. Policies see the union of the
two windows with `question_weight` of the total weight on the focus (0: question-agnostic).
Compression is lazy — it runs only when the next chunk would not fit — so a user turn that fits
in the headroom (n_ctx - cells, at least `chunk` cells once compressed) is prefilled whole and
compressed once at its end, with its own queries in the statistics.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Sequence

import numpy as np

from ..model.info import read_model_info
from ..policies import get_policy
from ..policies.base import CellView
from ..model.rope_model import rope_specs
from .archive import Archive, plan_swap, pool_spans
from .recall import asked_scores
from .runtime import ContextConfig, LlamaError, Runtime, SharedModel
from .sampling import Sampler, SamplingParams, TokenLogprob, token_logprob
from .textstream import TextStream
from .transcript import Transcript
from .windows import QueryWindow


class BudgetError(ValueError):
    pass


def evictable(positions: np.ndarray, n_sink: int, recent: int, next_pos: int) -> np.ndarray:
    """(n,) bool: the cells a compression may evict, neither a sink (position < n_sink) nor in the
    recent window (position >= next_pos - recent)."""
    positions = np.asarray(positions)
    return (positions >= n_sink) & (positions < next_pos - recent)


def select_evictions(positions: np.ndarray, scores: np.ndarray, n_sink: int, recent: int, next_pos: int,
                     n: int) -> np.ndarray:
    """The sorted positions of the n lowest-scoring evictable cells (`evictable`); among equal scores the
    cell listed first goes (the older one: views list cells by position). BudgetError if fewer than n
    cells may go."""
    positions = np.asarray(positions)
    cand = np.flatnonzero(evictable(positions, n_sink, recent, next_pos))
    if len(cand) < n:
        raise BudgetError(f"cannot evict {n} cells: only {len(cand)} are not protected")
    order = cand[np.argsort(np.asarray(scores)[cand], kind="stable")]
    return np.sort(positions[order[:n]])


def scored_layers(global_layers: Sequence[int], n: int | None = None) -> list[int]:
    """The layers a compression reads and scores: all global layers up to n (None: the session's default
    max_score_layers), else n evenly spaced ones, the first and (n > 1) the last included: reading K/V
    is most of a compression's cost."""
    n = SessionConfig.max_score_layers if n is None else n
    idx = np.unique(np.linspace(0, len(global_layers) - 1, min(len(global_layers), n)).round().astype(int))
    return [global_layers[i] for i in idx]


def query_shape(info, layer: int) -> tuple[int, int]:
    """(query heads, head size) of `layer`'s captured queries: per layer, since a GGUF may give each
    layer its own head count (attention.head_count as an array)."""
    return info.n_head_per_layer[layer], info.head_dims(layer)[0]


class InvariantError(RuntimeError):
    """EA_LOCAL_DEBUG=1: the session's bookkeeping and llama.cpp's cells disagree (a bug, not bad input)."""


# EA_LOCAL_DEBUG=1: after every compression, check the bookkeeping against llama.cpp's cells
DEBUG = os.environ.get("EA_LOCAL_DEBUG", "") not in ("", "0")


# Expected Attention max-pools its scores over 7 neighbouring cells where every layer is evicted, and
# not on iSWA models: on the report preset pooling gained on SmolLM2 (all 30 layers) and lost on
# Gemma 3 (3 global layers) at 25% (docs/bench-report.md, "Pooling over 5 cells"); 7 instead of 5
# keeps the far needles of a 7k context whole (docs/bench-report.md, "Pooling over 7 cells").
EA_POOL_ALL_LAYERS = 7


@dataclass
class SessionConfig:
    budget: int = 2048  # KV cells of the (global) cache the conversation may occupy
    policy: str = "expected-attention"
    n_sink: int = 4
    recent: int = 64  # newest tokens never evicted
    step: int = 128  # evict down to budget - step_cells, so compression runs once per step_cells tokens
    chunk: int = 512  # prefill chunk: n_ctx = budget + chunk
    stats_window: int = 128  # decoded queries kept as the statistics, and the fewest a prefill chunk leaves
    max_score_layers: int = 15  # global layers read and scored per compression, evenly spaced (docs/ea-paths.md)
    prefill_stats: int | None = None  # statistics from the last N prefill queries (None: the chunk's, at least stats_window)
    cache_type: str = "f16"
    n_threads: int | None = None
    n_gpu_layers: int | None = None  # None: EA_LOCAL_N_GPU_LAYERS, else all on a GPU build or with rpc, 0 on CPU
    rpc: tuple[str, ...] = ()  # llama.cpp RPC servers, HOST:PORT (ea_local/rpc.py); (): EA_LOCAL_RPC or none
    seed: int = 0
    policy_options: dict = field(default_factory=dict)
    question_weight: float = 0.5  # share of the statistics from the focus window (0: question-agnostic)
    answer_lookahead: int = 8  # greedy answer tokens decoded after a probed question; their queries join the focus
    # recall (docs/recall.md): evicted cells go to a host archive; a new user message brings back the ones it needs
    recall: bool = False
    archive_tokens: int | None = None  # archive bound in cells (None: archive_bytes only, or unbounded)
    archive_bytes: int | None = None  # archive bound in bytes
    recall_max: int | None = None  # most cells a message brings back (None: budget // 4)
    recall_radius: int = 8  # archived neighbours within this many positions come back with a cell (spans)
    recall_queries: int = 128  # the message's last queries that score the cells
    recall_redecode: int = 64  # the message's last tokens decoded again once cells came back (their logits)
    # with recall off, a probed question keeps the cells it asks for: at each compression the recall_cells
    # its probe looks for most are not evicted (docs/ea-paths.md, "What the question asks for"); the
    # products turn it on, the bench measures the policies alone, as kvpress runs them
    guard_question: bool = False

    @property
    def step_cells(self) -> int:
        """Cells a compression frees: `step`, or a quarter of a budget under 4 steps, so that a small
        budget is not compressed to half of itself."""
        return max(1, min(self.step, self.budget // 4))

    @property
    def recall_cells(self) -> int:
        """Most cells one recall brings back (recall_max; None: a quarter of the budget)."""
        return self.recall_max if self.recall_max is not None else self.budget // 4

    @property
    def min_budget(self) -> int:
        """The smallest budget that holds the sinks, the recent window and one step of new tokens."""
        return self.n_sink + self.recent + self.step_cells + 1

    @property
    def smallest_budget(self) -> int:
        """The smallest budget these settings allow (a smaller budget frees a smaller step); the floor with
        a whole step always holds, so the search ends there."""
        top = self.n_sink + self.recent + self.step + 1
        return next(b for b in range(1, top + 1) if replace(self, budget=b).min_budget <= b)

    def validate(self) -> None:
        if self.budget <= 0:
            raise BudgetError(f"budget must be positive, got {self.budget}")
        if self.budget < self.min_budget:
            raise BudgetError(f"budget {self.budget} cannot hold n_sink {self.n_sink} + recent window {self.recent} "
                              f"+ step {self.step_cells}: use at least {self.smallest_budget}")
        if not 0 < self.chunk <= 4096:
            raise BudgetError(f"chunk must be in 1..4096, got {self.chunk}")
        if self.n_threads is not None and self.n_threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.n_threads}")
        if self.n_gpu_layers is not None and self.n_gpu_layers < -1:
            raise ValueError(f"n-gpu-layers must be -1 (all) or more, got {self.n_gpu_layers}")
        if not 0.0 <= self.question_weight <= 1.0:
            raise BudgetError(f"question_weight must be in [0, 1], got {self.question_weight}")
        if self.answer_lookahead < 0:
            raise BudgetError(f"answer_lookahead must be at least 0, got {self.answer_lookahead}")
        for name in ("archive_tokens", "archive_bytes", "recall_max"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise BudgetError(f"{name} must be at least 0, got {v}")


@dataclass
class Eviction:
    at_token: int  # tokens seen when it happened
    phase: str  # "prefill" or "decode"
    n_before: int
    n_evicted: int
    score_s: float  # reading the cache + scoring
    evict_s: float  # the removal call


@dataclass
class Stats:
    tokens_seen: int = 0
    evictions: list[Eviction] = field(default_factory=list)
    compactions: int = 0
    archived: int = 0  # cells copied to the archive, ever
    recalls: int = 0  # messages that brought cells back
    recalled: int = 0  # cells brought back
    recall_s: float = 0.0  # scoring + restoring
    redecode_s: float = 0.0  # decoding the message's tail again after a recall


# the smallest budget the default settings allow: every conversation's floor (the server's and chat's)
MIN_CONVERSATION_BUDGET = SessionConfig().smallest_budget


def conversation_protection(budget: int) -> int:
    """A conversation's protected cells at `budget`, for the opening and for the newest tokens each: a
    quarter of the budget, at most 64. A chat prompt's opening (the template's system part and the
    instruction that usually leads a pasted document) is what a small budget loses first and what an
    instruct model needs to answer from the rest; 4 sinks are not enough below a quarter of a 1k
    prompt (docs/ea-paths.md, "The prompt's opening"). The server's slots and chat use it; the bench
    keeps kvpress' 4 sinks. BudgetError below MIN_CONVERSATION_BUDGET."""
    if budget <= 0:
        raise BudgetError(f"budget must be positive, got {budget}")
    if budget < MIN_CONVERSATION_BUDGET:
        raise BudgetError(f"budget {budget} cannot hold the protected opening, recent window and a step: use at least {MIN_CONVERSATION_BUDGET}")
    return min(64, budget // 4)


class Session:
    """One sequence in one llama.cpp context, kept within `cfg.budget` cells."""

    def __init__(self, model_path: str, cfg: SessionConfig | None = None, shared: SharedModel | None = None):
        self.cfg = cfg = cfg or SessionConfig()
        cfg.validate()
        self.policy = get_policy(cfg.policy)
        self.info = read_model_info(model_path)
        self.model_path = model_path
        if cfg.budget > self.info.n_ctx_train:  # positions are compacted below n_ctx_train: the cells must fit there
            raise BudgetError(f"budget {cfg.budget} is more than the model's training context ({self.info.n_ctx_train} "
                              "tokens)")
        self.iswa = bool(self.info.sliding_layers)
        gpu = {} if cfg.n_gpu_layers is None else {"n_gpu_layers": cfg.n_gpu_layers}
        if cfg.rpc:
            gpu["rpc"] = tuple(cfg.rpc)
        n_ctx = cfg.budget + cfg.chunk
        if not self.policy.evicts:  # "none": the context is the budget itself
            n_ctx = cfg.budget
        elif self.policy.lookahead:  # pseudo tokens need free cells, on iSWA also in the sliding cache (capped by n_ctx)
            n_ctx = max(n_ctx, self.info.sliding_window + cfg.chunk if self.iswa else 0) + self.policy.lookahead
        elif self.iswa:  # the sliding cache (capped by n_ctx) holds its window plus a chunk: budgets below the window
            n_ctx = max(n_ctx, self.info.sliding_window + cfg.chunk)
        self.rt = Runtime(model_path, ContextConfig(
            n_ctx=n_ctx, n_batch=cfg.chunk, cache_type=cfg.cache_type,
            swa_full=not self.iswa, n_threads=cfg.n_threads, seed=cfg.seed, **gpu), shared=shared)
        self.layers = scored_layers(self.info.global_layers, cfg.max_score_layers)
        try:
            self.rope = rope_specs(self.info, self.layers, self.rt.n_ctx)  # as llama.cpp rotates, or refused
        except ValueError:
            self.rt.close()
            raise
        self.q_shape = {il: query_shape(self.info, il) for il in self.layers}
        # the layers an eviction touches, hence the archive's: every layer with a KV cache, the global ones on iSWA
        self.evicted_layers = [il for il in range(self.rt.n_layer) if (li := self.rt.layer_info(il)) is not None
                               and not (self.iswa and li["is_swa"])]
        self.archive: Archive | None = None
        self.set_policy(cfg.policy, **cfg.policy_options)
        self.reset()

    # ---- settings that change while a conversation goes on ----
    def set_policy(self, name: str, **options) -> None:
        """Score with `name` from the next compression on. Its options replace the previous policy's
        (an option of one policy means nothing to another); query capture follows its needs."""
        pol = get_policy(name)  # ValueError for an unknown name
        unknown = sorted(set(options) - set(pol.options))
        if unknown:
            raise ValueError(f"policy {name} has no option {', '.join(unknown)} (it has: {', '.join(pol.options) or 'none'})")
        if name == "expected-attention" and not self.iswa:
            options = {"kernel_size": EA_POOL_ALL_LAYERS, **options}
        self.policy, self.cfg.policy, self.cfg.policy_options = pol, name, dict(options)
        self.set_capture()

    def set_budget(self, n: int, compress: bool = True, protect: int | None = None) -> int:
        """Keep at most `n` cells from now on; the context holds at most its size (budget + chunk when
        the session was made). With `compress`, cells past `n` are evicted now (down to n - step, as
        every compression does); returns how many. `protect` (default: unchanged) sets both n_sink and
        the recent window."""
        if n > self.rt.n_ctx:
            raise BudgetError(f"budget {n} is more than this context holds ({self.rt.n_ctx} cells): start a new session")
        kept = {} if protect is None else {"n_sink": protect, "recent": protect}
        replace(self.cfg, budget=n, **kept).validate()
        self.cfg.budget = n
        vars(self.cfg).update(kept)
        return self.compress(n - self.cfg.step_cells, phase="decode") if compress and self.n_cells > n else 0

    def set_one_shot_budget(self, n: int, recent: int | None = None) -> None:
        """The budget of kvpress' one-shot protocol: the whole context was prefilled and is compressed
        once to `n` cells (the caller's compress), not streamed through them, so the streaming floor
        (sinks + recent + step) does not apply. `recent` also sets the newest tokens never evicted."""
        if not 0 < n <= self.rt.n_ctx:
            raise BudgetError(f"budget {n} is not in 1..{self.rt.n_ctx} (this context's cells)")
        self.cfg.budget = n
        if recent is not None:
            self.cfg.recent = recent

    def stop_compressing(self) -> None:
        """Raise the budget to the whole context: the cells kept so far stay, new tokens only add cells
        (the bench asks its question on a cache it compressed once)."""
        self.set_budget(self.rt.n_ctx, compress=False)

    def set_question_weight(self, w: float) -> None:
        """Share of the statistics from the focus window from now on (0: question-agnostic)."""
        replace(self.cfg, question_weight=w).validate()
        self.cfg.question_weight = w

    def set_statistics(self, window: QueryWindow) -> None:
        """Replace the statistics window the next compression reads (measurements of its size and span)."""
        self.queries = window.copy(self.layers)

    @property
    def recall_on(self) -> bool:
        """Recall runs: asked for, and the policy evicts without renumbering positions."""
        return self.cfg.recall and self.policy.evicts and not self.policy.shift

    @property
    def captures(self) -> bool:
        """Queries are captured: the policy reads them, or recall scores cells with them."""
        return self.policy.needs_queries or self.recall_on

    def set_capture(self) -> None:
        """Capture queries of the scored layers when `captures` (call after changing the policy or recall)."""
        self.rt.capture_layers(self.layers if self.captures else [])
        self.rt.capture(self.captures)
        if self.recall_on and self.archive is None:
            self.archive = Archive(tuple(self.evicted_layers), self.cfg.archive_tokens, self.cfg.archive_bytes)
        elif not self.recall_on:
            self.archive = None

    # ---- state ----
    def reset(self) -> None:
        self.rt.clear()
        self.rt.capture_clear()
        self.live: dict[int, int] = {}  # position -> token, cells of the global cache
        self.transcript = Transcript()  # every token fed, evicted ones included
        self.next_pos = 0
        self.queries = QueryWindow()  # the statistics window: the context's newest queries
        self.focus = QueryWindow()  # the user's newest message or the probed question
        # the focus a newer message replaced: recall's baseline, what the conversation looked for before it
        self.before = QueryWindow()
        self.question: list[int] = []
        self.probe_answer: list[int] = []  # the last probe's greedy answer tokens: what steered that compression
        self._n_captured = 0
        self.stats = Stats()
        self.recalled_count: dict[int, int] = {}  # position -> times a live cell came back from the archive
        if self.archive is not None:
            self.archive.clear()

    def close(self) -> None:
        self.rt.close()

    @property
    def n_cells(self) -> int:
        return len(self.live)

    def kv_bytes(self, n_cells: int | None = None) -> int:
        """KV bytes held now (or for n_cells): global cells + the sliding layers' window cache."""
        n = self.n_cells if n_cells is None else n_cells
        per = self.info.kv_bytes_per_token_for(self.cfg.cache_type)
        if not self.iswa:
            return n * per.total
        swa_cells = min(n, self.info.sliding_window + self.cfg.chunk)
        return n * per.global_part + swa_cells * per.sliding_part

    # ---- feeding tokens ----
    def prefill(self, tokens: list[int], progress: Callable[[int, int], None] | None = None,
                turn: bool = False) -> None:
        """Feed tokens in chunks; compress only when the next chunk would not fit, and at the end if over budget.

        turn: these tokens are the user's newest message; their queries become the focus window.
        Question-agnostic (question_weight 0), a turn is context like any other text: its queries
        join the statistics window, which is all a question-agnostic policy reads.
        """
        turn = turn and self.cfg.question_weight > 0
        # the nominal context (llama.cpp may pad n_ctx), less the room a question probe or a lookahead needs
        room = min(self.cfg.budget + self.cfg.chunk, self.rt.n_ctx - self._probe_len() - self.policy.lookahead)
        try:
            for s in range(0, len(tokens), self.cfg.chunk):
                part = tokens[s:s + self.cfg.chunk]
                if self.policy.evicts and self.n_cells + len(part) > room:
                    self.compress(min(self.room_target, room - len(part)), phase="prefill")
                self._decode(part, focus=turn, new_focus=turn and s == 0)
                if progress:
                    progress(min(s + len(part), len(tokens)), len(tokens))
        except (KeyboardInterrupt, Exception):
            # an interrupted prefill (Ctrl-C, a client gone) still leaves the session within its budget
            if self.policy.evicts and self.n_cells > self.cfg.budget:
                try:
                    self.compress(self.room_target, phase="prefill")
                except Exception:  # noqa: BLE001 - the original error is the one to report
                    pass
            raise
        if self.n_cells > self.cfg.budget:
            self.compress(self.room_target, phase="prefill")

    def evicts_reading(self, n_tokens: int) -> bool:
        """True when reading n_tokens more leaves more cells than the budget: some are evicted while or
        once they are read (a question known in advance should then steer, set with set_question)."""
        return self.policy.evicts and self.n_cells + n_tokens > self.cfg.budget

    @property
    def max_question(self) -> int:
        """Longest question set_question takes: the probe (question + answer lookahead) fits in one chunk."""
        return max(0, self.cfg.chunk - 1 - self.cfg.answer_lookahead)

    def set_question(self, tokens: list[int] | None) -> None:
        """A question known before the text is read (summarize --prompt, a request that carries its
        question): decoded after the context at every compression, its queries are the focus window."""
        tokens = list(tokens or [])
        if len(tokens) > self.max_question:
            raise BudgetError(f"the question has {len(tokens)} tokens: at most {self.max_question} "
                              "(chunk - 1 - answer_lookahead)")
        self.question = tokens
        self.focus = QueryWindow()

    def prefill_scored(self, tokens: list[int]) -> np.ndarray:
        """Feed one chunk (<= cfg.chunk tokens) and return every token's logits, then compress if needed."""
        self._decode(tokens, logits_all=True)
        logits = self.rt.all_logits(len(tokens))
        if self.n_cells > self.cfg.budget:
            self.compress(self.room_target, phase="prefill")
        return logits

    def _decode(self, tokens: list[int], logits_all: bool = False, focus: bool = False,
                new_focus: bool = False) -> None:
        if not self.policy.evicts and self.n_cells + len(tokens) > self.cfg.budget:
            raise BudgetError(f"policy 'none' keeps the full cache: {self.n_cells} + {len(tokens)} tokens do not fit "
                              f"in its context of {self.cfg.budget}; use a larger --budget or an evicting --policy")
        if self.next_pos + len(tokens) + self.cfg.chunk >= self.info.n_ctx_train:
            self.compact()
        if not focus and len(self.focus) and self.focus.pos.max() >= self.next_pos:
            # a probe's queries (decoded after the context, then undone) at the positions these tokens take
            # describe tokens that are not there: recall must find the real read's, in the statistics window
            self.focus.truncate(self.next_pos)
        if focus and self.captures and self._n_captured:
            # queries decoded since the last pull (the previous reply) belong to the statistics window,
            # not to the focus: the focus holds the newest message's queries only
            self._pull_queries(keep=self.cfg.stats_window)
        positions = list(range(self.next_pos, self.next_pos + len(tokens)))
        self.rt.decode(tokens, positions, logits_all=logits_all)
        self.live.update(zip(positions, tokens))
        self.transcript.record(tokens, self.next_pos)
        self.next_pos += len(tokens)
        self.stats.tokens_seen += len(tokens)
        if self.captures:
            self._n_captured += len(tokens)
            if new_focus and self.recall_on and len(self.focus):
                self.before = self.focus.last(self.cfg.recall_queries)
            if focus:  # a user turn: its queries (the last `chunk`) are the focus window
                self._pull_queries(keep=self.cfg.chunk, into_focus=True, extend=not new_focus)
            elif len(tokens) > 1:  # a prefill chunk: its queries are the statistics window, topped up from the
                # previous window to stats_window: a request's short last chunk alone (a few tokens) is too
                # few queries for a covariance, and would hide a question it completes from _question_read
                self._pull_queries(keep=self.cfg.prefill_stats or max(len(tokens), self.cfg.stats_window))
            elif self._n_captured >= 4 * self.cfg.stats_window:  # decoding: pulled in batches, not per token
                self._pull_queries(keep=self.cfg.stats_window)

    def _pull_queries(self, keep: int, into_focus: bool = False, extend: bool = True) -> None:
        """Move captured queries from llama.cpp into a window, keeping its last `keep` queries.

        Statistics window: the new queries, topped up from the old window when fewer than `keep`.
        Focus window (into_focus): the new queries, appended to the old focus when `extend`."""
        qs, pos = {}, np.empty(0, dtype=np.int64)
        for il in self.layers:
            pos, qs[il] = self.captured_queries(il)
        if into_focus:
            self.focus.push(qs, pos, keep, extend=extend)
        else:
            self.queries.push(qs, pos, keep, extend=len(pos) < keep)
        self.rt.capture_clear()
        self._n_captured = 0

    def captured_queries(self, il: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions (m,), pre-RoPE queries (m, n_head of the layer, d_k)) llama.cpp captured for `il`."""
        h, d = self.q_shape[il]
        pos, q = self.rt.captured(il, h * d)
        return pos, q.reshape(len(pos), h, d)

    def _probe_len(self) -> int:
        return len(self.question) + self.cfg.answer_lookahead if self.question else 0

    def _probe_question(self) -> None:
        """Decode the question right after the context (unless the context ends with it), then
        `answer_lookahead` greedy answer tokens; keep their queries as the focus, remove their cells.

        The answer's own queries are the ones that read the fact back (a pass key's later digits are
        attended to while the earlier ones are written, not while the question is read): LAQ's
        pseudo queries (arXiv 2505.20334), taken after the question instead of after the context.
        Invisible to the conversation: positions, bookkeeping and the last logits are restored."""
        if self._n_captured:
            self._pull_queries(keep=self.cfg.stats_window)
        read = self._question_read()
        asked = [] if read else self.question  # a question the context ends with is not asked twice
        # its queries, captured when the context read it, lead the focus as a probe's would
        self.focus = self.queries.last(len(self.question)) if read else QueryWindow()
        pos = list(range(self.next_pos, self.next_pos + len(asked) + self.cfg.answer_lookahead))
        with self._undone(pos):
            if asked:
                self.rt.decode(asked, pos[:len(asked)])
            self.probe_answer = []
            for p in pos[len(asked):]:
                self.probe_answer.append(int(np.argmax(self.rt.logits())))
                self.rt.decode([self.probe_answer[-1]], [p])
            self._n_captured = len(pos)
            self._pull_queries(keep=self._probe_len(), into_focus=True)

    def _question_read(self) -> bool:
        """Whether the context's newest tokens are the question and their queries are in the statistics
        window: the last prompt chunk of a request ended with its question, then compressed."""
        n = len(self.question)
        pos = range(self.next_pos - n, self.next_pos)
        return (n > 0 and [self.live.get(p) for p in pos] == self.question
                and self.queries.pos[-n:].tolist() == list(pos))

    @contextmanager
    def _undone(self, positions: list[int]):
        """Decodes made inside leave no trace: their cells are removed from every cache, captured
        queries not pulled are dropped, and the logits of the last real token are written back
        (llama.cpp keeps only the last decode's logits and the next sample reads them). On iSWA
        models the in-window sliding cells are first shared with seq 1, so that llama.cpp cannot
        reuse them (it reuses cells a later position has pushed out of the window)."""
        logits = self.rt.logits() if self.stats.tokens_seen else None
        if self.iswa:
            self.rt.seq_cp(0, 1, max(0, self.next_pos - self.info.sliding_window), self.next_pos)
        try:
            yield
        finally:
            self.rt.capture_clear()
            self.rt.rm_positions(positions)
            if self.iswa:
                self.rt.seq_rm(1)
            if logits is not None:
                self.rt.set_logits(logits)

    @property
    def _probes(self) -> bool:
        """A compression decodes the question as a probe: it is known and the policy reads queries."""
        return bool(self.policy.needs_queries and self.question and self.cfg.question_weight > 0)

    # ---- compression ----
    def view(self) -> CellView:
        """What the policy sees: the live global cells and the statistics window."""
        if self.captures and self._n_captured:
            self._pull_queries(keep=self.cfg.stats_window)
        probed = self._probes
        if probed:
            self._probe_question()
        queries, qpos, qw = self._statistics()
        keys, values, norms = {}, {}, {}
        positions = None
        p = self.policy
        norms_only = p.needs_value_norms and not p.needs_values  # the rows never leave llama.cpp
        for il in self.layers:
            if p.needs_keys or p.needs_values:
                positions, k, v = self.rt.kv_read(il, keys=p.needs_keys, values=p.needs_values)
                if k is not None:
                    keys[il] = k
                if v is not None:
                    values[il] = v
            if norms_only:
                positions, norms[il] = self.rt.kv_vnorm(il)
        if positions is None:
            positions = np.array(sorted(self.live), dtype=np.int64)
        return CellView(positions=positions, keys=keys, values=values, value_norms=norms, queries=queries,
                        query_positions=qpos, query_weights=qw, rope=self.rope, next_pos=self.next_pos,
                        attn_scale=self.info.kq_scale, seed=self.cfg.seed + len(self.stats.evictions),
                        pseudo_queries=self.cfg.answer_lookahead if probed else 0)

    def _statistics(self) -> tuple[dict[int, np.ndarray], np.ndarray, np.ndarray | None]:
        """(queries, positions, weights) for the policy: the statistics window alone, or its union with
        the focus window, which gets `question_weight` of the total weight."""
        w = self.cfg.question_weight
        mf, mc = len(self.focus), len(self.queries)
        # an empty window never empties the statistics: the other one stands in (e.g. question-agnostic
        # right after a turn read as focus before question_weight was set to 0)
        if not self._focus_steers and mc:
            return dict(self.queries.q), self.queries.pos, None  # a copy: LAQ's lookahead extends the view's
        if w >= 1 or mc == 0:
            return dict(self.focus.q), self.focus.pos, None
        queries = {il: np.concatenate([self.queries.q[il], self.focus.q[il]]) for il in self.layers}
        weights = np.concatenate([np.full(mc, (1 - w) / mc), np.full(mf, w / mf)])
        return queries, np.concatenate([self.queries.pos, self.focus.pos]), weights

    def _score_options(self) -> dict:
        """The policy's options for this compression. Expected Attention adds the newest query's rows
        except, on models whose every layer is evicted, when a message or probed question steers the
        statistics: there they cost needles (SmolLM2 multi-key needle at 12.5%, question known: 53 -> 46
        of 80, p 0.039, tuning texts), on Gemma 3 they found them (26 -> 49); docs/bench-report.md, "The newest query".
        An explicit ``newest_query`` wins."""
        options = self.cfg.policy_options
        if self.cfg.policy == "expected-attention" and not self.iswa and self._focus_steers:
            return {"newest_query": False, **options}
        return options

    @property
    def _focus_steers(self) -> bool:
        """Whether the focus window (the newest message or the probed question) has a share of the statistics."""
        return self.cfg.question_weight > 0 and len(self.focus) > 0

    @property
    def room_target(self) -> int:
        """Cells a compression leaves: the budget less one step, so that the next step's tokens fit."""
        return self.cfg.budget - self.cfg.step_cells

    def compress(self, target: int, phase: str = "decode") -> int:
        """Evict the lowest-scoring cells so that `target` remain. Returns how many were evicted."""
        n_before = self.n_cells
        if not self.policy.evicts:
            raise BudgetError(f"policy 'none' never evicts: {n_before} cells cannot be brought to {target}")
        if self.policy.target is not None:  # e.g. context shift decides how much it discards
            target = self.policy.target(n_before, self.cfg.n_sink, self.cfg.budget)
        if n_before <= target:
            return 0
        t0 = time.perf_counter()
        view = self.view()
        if self.policy.lookahead:
            self._lookahead(view, self.policy.lookahead)
        pos = view.positions
        if self.policy.needs_queries and not len(view.query_positions):
            # no query seen since the windows were last emptied (a truncate that removed every captured
            # query): recency is the only evidence left, so the sinks and the newest cells are kept
            scores = get_policy("streaming-llm").score(view)
        else:
            scores = np.asarray(self.policy.score(view, **self._score_options()), dtype=np.float64)
            if self.cfg.guard_question and self._probes and len(self.focus) and not self.recall_on:
                asked, top = self._asked_cells(view)
                scores[top] = scores.max() + 1.0 + asked[top]  # above every cell the policy ranks
        n_evict = n_before - target
        evict = select_evictions(pos, scores, self.cfg.n_sink, self.cfg.recent, self.next_pos, n_evict)
        if self.archive is not None:
            self._archive_cells(evict, view.positions, view.keys)
        t1 = time.perf_counter()
        self._remove(evict, global_only=self.iswa and not self.policy.shift)
        t2 = time.perf_counter()
        if self.policy.shift:  # contiguous positions before, so renumbering = llama.cpp's seq_add(-n_discard)
            self.compact()
        self.stats.evictions.append(Eviction(self.stats.tokens_seen, phase, n_before, n_evict, t1 - t0, t2 - t1))
        if DEBUG:
            self.check_cells()
        return n_evict

    def _asked_cells(self, view: CellView) -> tuple[np.ndarray, np.ndarray]:
        """(pooled scores, indices of the best recall_cells) of view's cells for what the probed question
        asks: the probe's queries (the focus) over as many of the context's newest queries before it
        (recall.asked_scores), max-pooled over recall_radius positions so that a fact is kept whole.
        Expected Attention folds the probe's few decisive queries into one Gaussian with the context's,
        which keeps almost none of a prose needle on SmolLM2; this is the per-query attention recall
        ranks archived cells by, applied before the cells are evicted rather than after."""
        f = self.focus
        base_q, base_pos = self.baseline_queries(int(f.pos.min()), len(f))
        keys = {il: view.keys[il] if il in view.keys else self.rt.kv_read(il, values=False)[1] for il in self.layers}
        asked = asked_scores({il: f.q[il] for il in self.layers}, f.pos, base_q, base_pos, keys, self.rope,
                             self.info.kq_scale)
        asked = pool_spans(view.positions, asked, self.cfg.recall_radius)
        # the sinks and the recent window stay anyway
        free = np.flatnonzero(evictable(view.positions, self.cfg.n_sink, self.cfg.recent, self.next_pos))
        return asked, free[np.argsort(-asked[free], kind="stable")[:self.cfg.recall_cells]]

    def _remove(self, positions: np.ndarray, global_only: bool) -> None:
        """Remove the live cells at `positions` from llama.cpp's cache and from `live`."""
        removed = self.rt.rm_positions(positions, global_only=global_only)
        for p in positions.tolist():
            del self.live[p]
        if removed < len(positions):
            raise LlamaError(f"removed {removed} cells, expected {len(positions)}")

    # ---- recall (docs/recall.md) ----
    def _float_keys(self, positions: np.ndarray, have_pos: np.ndarray | None = None,
                    have: dict | None = None) -> dict[int, np.ndarray]:
        """Float keys (n, n_kv_head, d_k) of the live cells at `positions` for the scored layers, from `have`
        (keys of the cells at have_pos, e.g. a policy's view) or read from the cache."""
        out = {}
        for il in self.layers:
            if have is not None and il in have and have_pos is not None:
                pos, k = have_pos, have[il]
            else:
                pos, k, _ = self.rt.kv_read(il, values=False)
            out[il] = k[np.searchsorted(pos, positions)]
        return out

    def _archive_cells(self, positions: np.ndarray, have_pos: np.ndarray | None = None,
                       have: dict | None = None) -> None:
        """Copy the cells at `positions` (live, about to be evicted) to the archive: raw rows of every
        evicted layer, token ids, digest keys of the scored layers, how often each came back already."""
        a = self.archive
        positions = np.asarray(positions, dtype=np.int64)
        if a is None or not len(positions):
            return
        rows = {il: self.rt.kv_read_raw(il, positions) for il in a.layers}
        digest = self._float_keys(positions, have_pos, have)
        recalls = [self.recalled_count.pop(int(p), 0) for p in positions]
        a.add(positions, [self.live[int(p)] for p in positions], rows, digest, recalls=recalls)
        self.stats.archived += len(positions)

    def message_queries(self, since: int, until: int | None = None) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """The captured pre-RoPE queries of the newest message, last `recall_queries` of them: from the focus
        window, or the statistics window when the turn was read as context (question-agnostic).

        until None: every query from position `since` on, a probed question's greedy answer tokens (decoded
        after the context, at positions from next_pos) included; given: the user's words only, positions
        since..until-1. Measured on the tuning texts (docs/recall.md, "The template's tail"): with the answer
        tokens Gemma 3's completion requests found more keys, SmolLM2's chat requests fewer."""
        if self._n_captured:
            self._pull_queries(keep=self.cfg.stats_window)
        for win in (self.focus, self.queries):
            mine = win.pos >= since if until is None else (win.pos >= since) & (win.pos < until)
            sel = np.flatnonzero(mine)[-self.cfg.recall_queries:]
            if len(sel) and win.covers(self.layers):
                return {il: win.q[il][sel] for il in self.layers}, win.pos[sel]
        return {}, np.empty(0, dtype=np.int64)

    def baseline_queries(self, since: int, m: int) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """The last m captured queries before the newest message (positions < since): the previous reply's
        (statistics window), the previous message's (the focus it replaced) or the same prompt's."""
        wins = [w for w in (self.before, self.queries, self.focus) if len(w) and w.covers(self.layers)]
        if not wins or m <= 0:
            return {}, np.empty(0, dtype=np.int64)
        # a position in two windows counts once
        pos, first = np.unique(np.concatenate([w.pos for w in wins]), return_index=True)
        keep = (pos >= 0) & (pos < since)
        sel = first[keep][-m:]
        return {il: np.concatenate([w.q[il] for w in wins])[sel] for il in self.layers}, pos[keep][-m:]

    def recall(self, since: int, until: int | None = None, recent: int | None = None) -> int:
        """Bring back the archived cells the newest message (positions >= since, already prefilled) needs.

        Its queries (those of positions before `until`, when given) score live and archived cells together
        (recall.py). A chat caller passes until = where the user's text ends: the chat template's end of
        turn and assistant header after it attend to the conversation's structure (the system prompt, earlier
        turn markers) whatever the message asks, and on SmolLM2 took the whole recall at small budgets
        (docs/recall.md, "The template's tail"). `recent` (default cfg.recent): the newest positions before
        the message that no recalled cell may replace; a request's probed question passes 0, since what
        precedes it is the same document, not the conversation's last exchange (docs/recall.md). Scores are
        max-pooled over neighbours within `recall_radius` positions so that spans come back whole; the best
        archived cells replace the lowest-scoring live ones that are neither sinks, nor recent, nor the message
        (archive.plan_swap), and go back at their positions. The budget holds: the cells only grow into
        the room below budget - step. Returns the number of cells brought back."""
        a = self.archive
        if a is None or not len(a) or any(il not in a.digest for il in self.layers):
            return 0
        t0 = time.perf_counter()
        queries, q_pos = self.message_queries(since, until)
        if not len(q_pos):
            return 0
        live_pos, live_keys = None, {}
        for il in self.layers:
            live_pos, live_keys[il], _ = self.rt.kv_read(il, values=False)
        n_live = len(live_pos)
        keys = {il: (live_keys[il], a.digest[il]) for il in self.layers}  # one softmax over both
        base_q, base_pos = self.baseline_queries(since, len(q_pos))
        scores = asked_scores(queries, q_pos, base_q, base_pos, keys, self.rope, self.info.kq_scale)
        r = self.cfg.recall_radius
        live_s = pool_spans(live_pos, scores[:n_live], r)
        arch_s = pool_spans(a.pos, scores[n_live:], r)
        keep = self.cfg.recent if recent is None else recent
        may_go = evictable(live_pos, self.cfg.n_sink, keep, self.next_pos) & (live_pos < since)  # not the message
        room = max(0, self.room_target - self.n_cells)
        back, out = plan_swap(arch_s, live_s, may_go, room, self.cfg.recall_cells)
        if not len(back):
            self.stats.recall_s += time.perf_counter() - t0
            return 0
        pos, rot, tok, rows, _, counts = a.take(back)
        if len(out):
            evict = np.sort(live_pos[out])
            self._archive_cells(evict, live_pos, live_keys)
            self._remove(evict, global_only=self.iswa)
        self.rt.kv_restore(pos, rows, tokens=tok, rotated_at=None if np.array_equal(pos, rot) else rot,
                           global_only=self.iswa)
        for p, t, c in zip(pos.tolist(), tok.tolist(), counts.tolist()):
            self.live[p] = t
            self.recalled_count[p] = c
        t1 = time.perf_counter()
        self._redecode_tail(since)
        self.stats.recalls += 1
        self.stats.recalled += len(pos)
        self.stats.recall_s += t1 - t0
        self.stats.redecode_s += time.perf_counter() - t1
        if DEBUG:
            self.check_cells()
        return len(pos)

    def recall_message(self, start: int, question: list[int], until: int | None = None) -> int:
        """Recall for the message prefilled from position `start`: asked by all of it, or, when a question
        was probed while it was read (its last tokens), by that question, which may then replace its own
        document's last cells (recent=0). `until`: where the user's words end (see recall); None: the
        message's end, and the probe's greedy answer tokens after it only on iSWA models. Measured on the
        tuning texts (docs/recall.md, "The probe's answer tokens"): on Gemma 3 they found more keys, on
        SmolLM2 (every layer evicted) a wrong greedy answer asked for the cells that matched it."""
        if until is None and question and not self.iswa:
            until = self.next_pos
        return self.recall(since=self.next_pos - len(question) if question else start, until=until,
                           recent=0 if question else None)

    def _redecode_tail(self, since: int) -> None:
        """The message was decoded before the recalled cells were back: its last tokens (up to
        recall_redecode, the contiguous live run ending at the newest) are decoded again, so that their
        cells and the logits the answer starts from attend to what came back. Their queries, captured
        again, are dropped: the windows keep the first decode's."""
        pos: list[int] = []
        p = self.next_pos - 1
        while p >= since and p in self.live and len(pos) < self.cfg.recall_redecode:
            pos.append(p)
            p -= 1
        pos.reverse()
        if pos and not self.iswa and pos[0] > 0 and pos[0] - 1 not in self.live:
            # llama.cpp takes the batch only at seq_pos_max + 1: a run that follows an evicted token starts
            # one later (on iSWA models the sliding cache, which reports seq_pos_max, holds every recent position)
            pos = pos[1:]
        if not pos:
            return
        self.rt.rm_positions(pos)  # every cache: the sliding layers decode them again too
        self.rt.decode([self.live[q] for q in pos], pos)
        self.rt.capture_clear()
        self._n_captured = 0

    def _lookahead(self, view: CellView, k: int) -> None:
        """Decode k greedy pseudo tokens, add their captured queries to `view`, then undo them (LAQ).

        Undone exactly (`_undone`); the engine's bookkeeping and the user's sampler are never touched.
        """
        if not self.policy.needs_queries:
            raise ValueError("a lookahead policy must capture queries")
        view.queries = dict(view.queries)  # the view's own copy: the statistics window stays as it was
        positions = list(range(self.next_pos, self.next_pos + k))
        tok = int(np.argmax(self.rt.logits()))
        with self._undone(positions):
            for i, p in enumerate(positions):
                self.rt.decode([tok], [p])
                if i + 1 < k:
                    tok = int(np.argmax(self.rt.logits()))
            for il in self.layers:
                pos, q = self.captured_queries(il)
                if pos.tolist() != positions:
                    raise LlamaError(f"lookahead captured positions {pos.tolist()}, expected {positions}")
                old = view.queries.get(il)
                view.queries[il] = q if old is None or not len(old) else np.concatenate([old, q])
            view.query_positions = np.concatenate([np.asarray(view.query_positions, dtype=np.int64), pos])
            view.query_weights = None  # LAQ votes with the union of its windows, unweighted

    def check_cells(self) -> None:
        """Raise InvariantError unless llama.cpp's cells (a global layer) are exactly the live positions."""
        pos, _, _ = self.rt.kv_read(self.info.global_layers[0], keys=False, values=False)
        mine = sorted(self.live)
        if pos.tolist() != mine:
            extra, missing = sorted(set(pos.tolist()) - set(mine)), sorted(set(mine) - set(pos.tolist()))
            raise InvariantError(f"KV bookkeeping out of step with llama.cpp after {len(self.stats.evictions)} "
                                 f"compressions: {len(pos)} cells vs {len(mine)} live positions "
                                 f"(in llama.cpp only: {extra[:8]}, in the session only: {missing[:8]})")

    def compact(self) -> None:
        """Renumber live positions 0..n-1 (llama.cpp re-rotates K) before they reach the training context."""
        if self.archive is not None:  # archived cells are renumbered with the live ones: keep them well inside
            self.archive.enforce(cap=max(0, self.info.n_ctx_train // 2 - len(self.live) - self.cfg.chunk))
        arch = self.archive.pos.tolist() if self.archive is not None else []
        old = sorted(set(self.live) | set(self._swa_positions()) | set(arch))
        new = list(range(len(old)))
        self.rt.remap(old, new)
        self.transcript.renumber(old)
        if self.archive is not None:
            self.archive.remap(old, new)
        remap = dict(zip(old, new))
        self.recalled_count = {remap[p]: c for p, c in self.recalled_count.items() if p in remap}
        self.live = {remap[p]: t for p, t in self.live.items()}
        for win in (self.queries, self.focus, self.before):
            win.remap(remap)
        self.next_pos = len(old)
        self.stats.compactions += 1

    def keep_prefix(self, k: int) -> int:
        """Keep at most the first k tokens of the transcript and drop the rest from the cache; returns
        how many are kept (the caller feeds the rest from there), 0 when the cache cannot continue at all.

        llama.cpp takes a sequence's next token only at seq_pos_max + 1. When the tokens just before
        the cut were evicted, the cache ends earlier: the cut moves back to just after the last
        cached token, and the evicted tokens between there and k are fed again. On sliding-window
        models the sliding cache reports seq_pos_max and holds every recent position, so there the
        condition is that it still holds the window before the cut."""
        t = self.transcript
        k = min(k, len(t))
        pos = t.positions[k] if k < len(t) else self.next_pos
        if self.iswa:
            swa = self._swa_positions()
            # a token at p attends to (p - n_swa, p] in the sliding layers (llama.cpp LLAMA_SWA_TYPE_STANDARD)
            need = max(0, pos - self.info.sliding_window + 1)
            if swa and min(swa) > need and pos > 0:
                return 0
        else:
            last = max((p for p in self.live if p < pos), default=-1)
            if last < 0:
                return 0
            pos = min(pos, last + 1)
        self.truncate(pos)
        if self.rt.seq_pos_range(0)[1] != pos - 1:  # the next batch could not start at pos: start over
            return 0
        return len(t)

    def _swa_positions(self) -> list[int]:
        if not self.iswa:
            return []
        pos, _, _ = self.rt.kv_read(self.info.sliding_layers[0], keys=False, values=False)
        return pos.tolist()

    # ---- generation ----
    def generate(self, prompt_tokens: list[int], params: SamplingParams | None = None,
                 stop: list[str] | None = None, max_tokens: int = 256,
                 should_stop: Callable[[], bool] | None = None, turn: bool = False,
                 recall: bool = True, on_token: Callable[[TokenLogprob], None] | None = None,
                 top_logprobs: int = 0) -> Iterator[str]:
        """Prefill the prompt, then sample; yields text pieces (UTF-8 safe, stop strings held back).

        on_token: called with each generated token's log-probability and its `top_logprobs` likeliest
        alternatives, before the token's text is yielded.

        turn: the prompt is the user's newest message (its queries steer compression, see prefill), and
        it recalls archived cells when recall is on for the session; recall=False skips that for this
        message (the archive keeps growing: the same cells are evicted either way)."""
        params = params or SamplingParams(seed=self.cfg.seed)
        if prompt_tokens:
            start = self.next_pos
            self.prefill(prompt_tokens, turn=turn)
            if turn and recall and self.recall_on:
                self.recall(since=start)
        sampler = Sampler(self.rt, params)
        stream = TextStream(stop or [])
        try:
            for _ in range(max_tokens):
                if should_stop and should_stop():
                    break
                tok = sampler.sample()
                if self.rt.is_eog(tok):
                    break
                if on_token is not None:  # the logits that chose tok: read before tok is decoded
                    on_token(token_logprob(self.rt.logits(), tok, top_logprobs, self.rt.token_bytes))
                self._decode([tok])
                if self.n_cells > self.cfg.budget:
                    self.compress(self.room_target, phase="decode")
                piece, stopped = stream.push(self.rt.token_bytes(tok))
                if piece:
                    yield piece
                if stopped:
                    return
            tail = stream.flush()
            if tail:
                yield tail
        finally:
            sampler.close()

    # ---- reuse ----
    def truncate(self, pos: int) -> int:
        """Forget every cell at position >= pos, in every layer, and continue from pos.

        A server reuses a conversation's cache up to where a new request diverges from what was
        fed; cells before `pos` that were evicted stay evicted. Returns the global cells dropped."""
        if self.captures and self._n_captured:
            self._pull_queries(keep=self.cfg.stats_window)
        if self.archive is not None:
            self.archive.truncate(pos)
            self.recalled_count = {p: c for p, c in self.recalled_count.items() if p < pos}
        drop = [p for p in self.live if p >= pos]
        self.rt.seq_rm(0, pos, -1)
        if self.rt.seq_pos_range(0)[1] >= pos:
            raise LlamaError(f"could not remove positions >= {pos}")
        for p in drop:
            del self.live[p]
        self.transcript.truncate(pos)
        for win in (self.queries, self.focus, self.before):
            win.truncate(pos)
        self.next_pos = pos
        return len(drop)
