"""What a bench run measures, parsed and validated from the command line's strings.

Every parse error is a BenchError with one line a user can act on (the CLI prints it, exit 2).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

SUITES = ("quality", "speed", "memory")
QUALITY_PARTS = ("passkey", "perplexity", "multikey", "variable_tracking", "multi_turn")  # one of them: that part only
MODES = ("agnostic", "question")
HAYSTACKS = ("filler", "prose")


class BenchError(ValueError):
    pass


@dataclass(frozen=True)
class Budget:
    """A KV budget: a fraction of each test's context (`25%`) or a number of cells (`2048`)."""
    label: str
    fraction: float | None = None
    cells: int | None = None

    def resolve(self, context: int) -> int:
        return self.cells if self.cells is not None else max(1, round(context * self.fraction))


def parse_budgets(spec: str) -> list[Budget]:
    out: list[Budget] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            raise BenchError(f"malformed --budgets {spec!r}: empty item (use e.g. 50%,25%,12.5% or 1024,2048)")
        try:
            if item.endswith("%"):
                pct = float(item[:-1])
                if not 0 < pct <= 100:
                    raise BenchError(f"budget {item!r} must be a percentage in (0%, 100%]")
                out.append(Budget(item, fraction=pct / 100))
            else:
                cells = int(item)
                if cells <= 0:
                    raise BenchError(f"budget {item!r} must be a positive number of cells")
                out.append(Budget(item, cells=cells))
        except ValueError as e:
            if isinstance(e, BenchError):
                raise
            raise BenchError(f"malformed budget {item!r} in --budgets: use a percentage (25%) or cells (2048)") from None
    if len({b.label for b in out}) != len(out):
        raise BenchError(f"--budgets {spec!r} repeats a budget")
    return out


def parse_policies(spec: str) -> list[str]:
    from ..policies import POLICIES

    names = [p.strip() for p in spec.split(",")]
    for n in names:
        if n == "none":
            raise BenchError("policy 'none' is the full cache, which every suite measures anyway: leave it out of --policies")
        if n not in POLICIES:
            raise BenchError(f"unknown policy {n!r} in --policies; choose from: {', '.join(POLICIES)} "
                             "(the full cache is always measured)")
    if len(set(names)) != len(names):
        raise BenchError(f"--policies {spec!r} repeats a policy")
    return names


def parse_suites(spec: str) -> list[str]:
    if spec == "all":
        return list(SUITES)
    names = [s.strip() for s in spec.split(",")]
    for n in names:
        if n not in SUITES + QUALITY_PARTS:
            raise BenchError(f"unknown suite {n!r}; choose from: {', '.join(SUITES)}, all, or a part of the "
                             f"quality suite: {', '.join(QUALITY_PARTS)}")
    return names


def parse_haystack(spec: str) -> str:
    if spec not in HAYSTACKS:
        raise BenchError(f"unknown haystack {spec!r}; choose from: {', '.join(HAYSTACKS)}")
    return spec


def parse_haystacks(spec: str) -> list[str]:
    """`filler,prose`: the pass key and the needles are hidden in each (trials multiply)."""
    names = [parse_haystack(h.strip()) for h in spec.split(",")]
    if len(set(names)) != len(names):
        raise BenchError(f"--haystack {spec!r} repeats a haystack")
    return names


TEXT_SETS = ("reporting", "tuning")  # bench/corpus.py: disjoint sets of real text
PRESETS = ("report",)


def parse_texts(spec: str) -> str:
    if spec not in TEXT_SETS:
        raise BenchError(f"unknown text set {spec!r}; choose from: {', '.join(TEXT_SETS)} "
                         "(settings are chosen on tuning texts, figures reported on reporting texts)")
    return spec


def parse_tokens(spec: str, what: str) -> list[int]:
    """`2k,4k,8192` -> [2048, 4096, 8192]."""
    out = []
    for raw in spec.split(","):
        item = raw.strip().lower()
        try:
            n = int(float(item[:-1]) * 1024) if item.endswith("k") else int(item)
        except ValueError:
            raise BenchError(f"malformed {what} {raw!r}: use token counts like 2k,4k or 2048") from None
        if n < 64:
            raise BenchError(f"{what} {raw!r} is too short (at least 64 tokens)")
        out.append(n)
    return sorted(set(out))


def parse_depths(spec: str) -> list[float]:
    out = []
    for raw in spec.split(","):
        try:
            d = float(raw.strip().rstrip("%")) / (100 if raw.strip().endswith("%") else 1)
        except ValueError:
            raise BenchError(f"malformed depth {raw!r}: use fractions 0,0.5,1 or percentages 0%,50%") from None
        if not 0 <= d <= 1:
            raise BenchError(f"depth {raw!r} must be within 0..1 (0%..100%)")
        out.append(d)
    return sorted(set(out))


def parse_modes(spec: str) -> list[str]:
    names = [m.strip() for m in spec.split(",")]
    for n in names:
        if n not in MODES:
            raise BenchError(f"unknown mode {n!r}; choose from: {', '.join(MODES)}")
    return names


@dataclass
class BenchOptions:
    model: str
    out: str
    suites: list[str]
    policies: list[str]
    budgets: list[Budget]
    modes: list[str] = field(default_factory=lambda: ["agnostic"])
    haystack: str = "filler"  # what the pass key and the needles hide in: repetitive filler or real prose
    haystacks: list[str] | None = None  # several of them (None: [haystack]); trials are made in each
    texts: str = "reporting"  # which real text set (bench/corpus.py) the prose haystack and perplexity read
    seeds: int = 1  # pass keys per (length, depth, haystack): different keys and, in prose, different documents
    ppl_docs: int = 1  # perplexity windows of ppl_tokens tokens, cut in a row from the text set
    multikey_keys: int = 4  # needles per multi-key document (the others are its distractors)
    vt_hops: int = 4  # variable tracking: assignments per chain
    vt_chains: int = 2  # variable tracking: chains per document
    vt_style: str = "question"  # data.VT_QUESTIONS: how the value is asked
    preset: str | None = None
    lengths: list[int] = field(default_factory=lambda: [2048, 4096, 8192])  # passkey contexts
    histories: list[int] | None = None  # speed suite's history points (None: the lengths)
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    task_length: int = 2048  # multi-key needle, variable tracking and multi-turn recall contexts
    task_samples: int = 3  # documents per task (each asks several questions)
    ppl_tokens: int = 4096
    chat_tokens: int = 4096  # memory suite: the long chat
    decode_tokens: int = 32  # speed suite: decoded tokens per history point
    cache_type: str = "f16"
    threads: int | None = None
    n_gpu_layers: int | None = None
    rpc: tuple[str, ...] = ()  # llama.cpp RPC servers (ea_local/rpc.py)
    seed: int = 0
    quick: bool = False
    command: str = ""

    def quality_parts(self) -> list[str]:
        return [p for p in QUALITY_PARTS if "quality" in self.suites or p in self.suites]

    def haystack_list(self) -> list[str]:
        return self.haystacks or [self.haystack]


def quick_sizes(o: BenchOptions) -> BenchOptions:
    """CI-sized: tiny contexts and few samples, every suite and file still produced."""
    o.lengths = [384, 768]
    o.depths = [0.0, 0.5, 1.0]
    o.task_length = 512
    o.task_samples = 1
    o.ppl_tokens = 512
    o.chat_tokens = 768
    o.decode_tokens = 8
    o.quick = True
    return o


def report_sizes(o: BenchOptions) -> BenchOptions:
    """`--preset report`: enough trials for intervals that can tell policies apart. Pass key: 5 depths
    x 3 keys x 2 haystacks = 30 trials per (length, budget, mode); multi-key needle and variable
    tracking: 10 documents per haystack, 20 in all; budgets 25% and 12.5%; perplexity: 16 windows
    of 4k tokens cut in a row from the reporting texts (65k of their 80k tokens), 2,048 scored each (32,768 scored tokens). Task variants:
    docs/bench-report.md has the full cache's accuracy on each; multi-turn recall streams one pass
    per configuration and is left out."""
    o.suites = ["passkey", "perplexity", "multikey", "variable_tracking"]
    o.budgets = parse_budgets("25%,12.5%")  # the headline budget and the hard one
    o.modes = ["agnostic", "question"]
    o.lengths = [4096]
    o.depths = [0.1, 0.3, 0.5, 0.7, 0.9]
    o.seeds = 3
    o.haystacks = ["filler", "prose"]
    o.haystack = "filler"
    o.task_length = 2048
    o.task_samples = 10  # per haystack: 20 documents per task
    o.multikey_keys = 4  # full cache 20/24 at 2k in filler (2 needles: 8/12, no easier)
    # the easiest variant that still needs a hop; the default model's full cache solves none measured
    # (2 hops, completion 1/6; 4 hops x 2 chains 0/12): the report flags such a task
    o.vt_hops, o.vt_chains, o.vt_style = 2, 1, "completion"
    o.ppl_tokens = 4096
    o.ppl_docs = 16
    o.preset = "report"
    return o


def from_flags(*, out: str, suite: str, policies: str, budgets: str | None, modes: str | None, texts: str,
               cache_type: str, threads: int | None, n_gpu_layers: int | None, seed: int, rpc: tuple[str, ...],
               command: str, preset: str | None = None, haystack: str | None = None, quick: bool = False,
               lengths: str | None = None, histories: str | None = None, task_length: str | None = None,
               ppl_tokens: str | None = None, chat_tokens: str | None = None, depths: str | None = None,
               samples: int | None = None, seeds: int | None = None, ppl_docs: int | None = None) -> BenchOptions:
    """The options of `ea-local bench` from its flags' strings: a preset's sizes first, then --quick,
    then every size flag given overrides them. BenchError (one line) for a bad value."""
    o = BenchOptions(model="", out=out, suites=parse_suites(suite), policies=parse_policies(policies),
                     budgets=parse_budgets(budgets or "50%,25%,12.5%"), modes=parse_modes(modes or "agnostic"),
                     texts=parse_texts(texts), cache_type=cache_type, threads=threads, n_gpu_layers=n_gpu_layers,
                     seed=seed, rpc=rpc, command=command)
    if preset is not None:
        if preset not in PRESETS:
            raise BenchError(f"unknown preset {preset!r}; choose from: {', '.join(PRESETS)}")
        report_sizes(o)
        if budgets:
            o.budgets = parse_budgets(budgets)
        if suite != "all":
            o.suites = parse_suites(suite)
        if modes:
            o.modes = parse_modes(modes)
    if haystack or not o.haystacks:
        hays = parse_haystacks(haystack or "filler")
        o.haystack, o.haystacks = hays[0], (hays if len(hays) > 1 else None)
    if quick:
        quick_sizes(o)
    if lengths:
        o.lengths = parse_tokens(lengths, "length")
    if histories:
        o.histories = parse_tokens(histories, "history")
    for name, val in (("task_length", task_length), ("ppl_tokens", ppl_tokens), ("chat_tokens", chat_tokens)):
        if val:
            toks = parse_tokens(val, name.replace("_", " "))
            if len(toks) != 1:
                raise BenchError(f"--{name.replace('_', '-')} takes one length, got {val!r}")
            setattr(o, name, toks[0])
    if depths:
        o.depths = parse_depths(depths)
    if samples is not None:
        if samples < 1:
            raise BenchError(f"--samples must be at least 1, got {samples}")
        o.task_samples = samples
    for flag, val, attr in (("--seeds", seeds, "seeds"), ("--ppl-docs", ppl_docs, "ppl_docs")):
        if val is not None:
            if val < 1:
                raise BenchError(f"{flag} must be at least 1, got {val}")
            setattr(o, attr, val)
    return o


def one_shot_cells(context: int) -> int:
    """The full cache of a one-shot task: its context, then its question and answer."""
    return context + 256


def speed_full_cells(o: BenchOptions) -> int:
    """The speed suite's full cache: the longest history and every point's decoded tokens."""
    hist = o.histories or o.lengths
    return max(hist) + (o.decode_tokens + 1) * len(hist) + 64


def ppl_full_cells(o: BenchOptions) -> int:
    return o.ppl_tokens + 512


def chat_full_cells(o: BenchOptions) -> int:
    return o.chat_tokens + 1024


def full_cache_cells(o: BenchOptions) -> dict[str, int]:
    """Per size flag, the most cells a full-cache session of this run holds (the suites size their
    sessions with the functions above); every session must fit in the model's training context."""
    need: dict[str, int] = {}

    def at_least(flag: str, n: int) -> None:
        need[flag] = max(need.get(flag, 0), n)

    parts = o.quality_parts()
    if "passkey" in parts:
        at_least("--lengths", one_shot_cells(max(o.lengths)))
    if "speed" in o.suites:
        at_least("--histories" if o.histories else "--lengths", speed_full_cells(o))
    if {"multikey", "variable_tracking"} & set(parts):
        at_least("--task-length", one_shot_cells(o.task_length + 128))
    if "multi_turn" in parts:  # the chat's turns end past task_length by up to one turn
        at_least("--task-length", one_shot_cells(o.task_length + 512))
    if "perplexity" in parts:
        at_least("--ppl-tokens", ppl_full_cells(o))
    if "memory" in o.suites:
        at_least("--chat-tokens", chat_full_cells(o))
    return need


def fit_context(o: BenchOptions, n_ctx_train: int, model: str, given: set[str]) -> tuple[BenchOptions, str | None]:
    """The run's sizes for a model trained on n_ctx_train tokens, checked before anything is measured.

    Default pass-key lengths (and speed histories) the model cannot hold are left out, with a note;
    a size the user gave, or one that still does not fit, is a BenchError naming the flag."""
    note = None
    fits = [n for n in o.lengths if full_cache_cells(replace(o, lengths=[n])).get("--lengths", 0) <= n_ctx_train]
    if "--lengths" not in given and fits and fits != o.lengths:
        left = [n for n in o.lengths if n not in fits]
        note = (f"{model}: pass-key lengths {', '.join(f'{n // 1024}k' if n % 1024 == 0 else str(n) for n in left)} "
                f"left out: its training context is {n_ctx_train} tokens")
        o = replace(o, lengths=fits)
    for flag, cells in full_cache_cells(o).items():
        if cells > n_ctx_train:
            raise BenchError(f"{model}: {flag} needs a full cache of {cells} cells, more than its training context "
                             f"({n_ctx_train} tokens); use a smaller {flag}")
    return o, note
