"""Synthetic long-context tasks, generated from a seed (nothing downloaded).

Each generator returns plain text plus the questions and their answers, so tests can check the
answers against the text itself. Formats follow RULER (Hsieh et al., arXiv 2404.06654):
`niah_multikey` ("One of the special magic numbers for X is: N") and variable tracking
("VAR ABCDE = 12345", "VAR FGHIJ = VAR ABCDE"). Questions end in a completion cue because the
default model is a base model.
"""
from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..engine.runtime import Runtime


# Debian base-files: real English prose, no download at run time
_LICENSE_DIR = Path("/usr/share/common-licenses")
LICENSES = [_LICENSE_DIR / "GPL-3", _LICENSE_DIR / "GPL-2"]
# other licences of the same package: the text engine settings are tuned on, never the reported one
HELD_OUT = [_LICENSE_DIR / f for f in ("GFDL-1.3", "MPL-2.0", "Apache-2.0", "Artistic", "CC0-1.0")]

WORDS = ["apple", "river", "candle", "falcon", "meadow", "silver", "harbor", "pepper", "tunnel", "violet",
         "anchor", "glacier", "lantern", "orchard", "pebble", "saddle", "thunder", "walnut", "zephyr", "copper"]


# the pass-key test (Mohtashami and Jaggi, arXiv 2305.16300): a needle in repetitive filler
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")


def passkey_needle(key: int) -> str:
    """The pass-key sentences hidden in the haystack (every pass-key prompt, the bench's and the scripts')."""
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def passkey_prompt(rt: "Runtime", length: int, depth: float, key: int,
                   haystack: list[int] | None = None) -> tuple[list[int], list[int], tuple[int, int]]:
    """(context tokens, question tokens, (start, end) token span of the needle) for ~length tokens.

    haystack: tokens of real text to hide the needle in (cut at token boundaries); None: the
    repetitive filler of the usual pass-key test."""
    needle = passkey_needle(key) + " "
    head = [rt.bos()] if rt.add_bos() else []
    head += rt.tokenize("There is important info hidden inside a lot of irrelevant text. Find it and memorize it. ")
    if haystack is None:
        unit = rt.tokenize(FILLER)
        n_fill = max(1, (length - 64) // len(unit))
        before, after = unit * int(n_fill * depth), unit * (n_fill - int(n_fill * depth))
    else:
        n_fill = max(1, length - 64)
        if len(haystack) < n_fill:
            raise ValueError(f"haystack has {len(haystack)} tokens, need {n_fill}")
        before, after = haystack[:int(n_fill * depth)], haystack[int(n_fill * depth):n_fill]
    ctx = head + before
    start = len(ctx)
    ctx += rt.tokenize(needle)
    span = (start, len(ctx))
    ctx += after
    question = rt.tokenize("What is the pass key? The pass key is")
    return ctx, question, span


def answered(expected: str, reply: str) -> bool:
    """Whether the reply states the expected answer: it contains it, and a number is not part of a
    longer one ("276111" does not answer 27611)."""
    lead = r"(?<!\d)" if expected[:1].isdigit() else ""
    trail = r"(?!\d)" if expected[-1:].isdigit() else ""
    return re.search(lead + re.escape(expected) + trail, reply) is not None


@dataclass
class Question:
    prompt: str  # asked after the context
    answer: str  # counted as found when the model's answer contains it


@dataclass
class Task:
    context: str
    questions: list[Question]


def place(units: list[str], statements: list[str], depths: list[float]) -> str:
    """The haystack `units` (filler sentences or paragraphs) with statement i inserted after
    int(len(units) * depths[i]) units (statements at the same depth keep their order)."""
    at: dict[int, list[str]] = {}
    for s, d in zip(statements, depths):
        at.setdefault(int(len(units) * d), []).append(s)
    parts = []
    for i in range(len(units) + 1):
        parts.extend(s + " " for s in at.get(i, []))
        if i < len(units):
            parts.append(units[i])
    return "".join(parts)


def multikey_needle(rng: random.Random, haystack: list[str], n_keys: int = 4) -> Task:
    """Several needles at evenly spread depths; one question per needle."""
    words = rng.sample(WORDS, n_keys)
    nums = [str(rng.randint(100000, 999999)) for _ in words]
    statements = [f"One of the special magic numbers for {w} is: {n}." for w, n in zip(words, nums)]
    depths = [(i + 0.5) / n_keys for i in range(n_keys)]
    head = "Some special magic numbers are hidden inside the following text. Remember them.\n"
    qs = [Question(f"\nWhat is the special magic number for {w}? The special magic number for {w} is:", n)
          for w, n in zip(words, nums)]
    return Task(head + place(haystack, statements, depths), qs)


def _var_names(rng: random.Random, n: int) -> list[str]:
    """n distinct random names in the order drawn (a set's order would follow the process's string
    hashing, so the same seed would build another task in another process)."""
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    return names


VT_QUESTIONS = {  # how the value of the chain's last variable is asked
    "question": "\nQuestion: what is the value of VAR {v}? Answer: VAR {v} =",
    "completion": "\nThe value of VAR {v} is",  # a base model continues a statement more readily
}


def variable_tracking(rng: random.Random, haystack: list[str], n_hops: int = 4, n_chains: int = 2,
                      style: str = "question") -> Task:
    """`n_chains` chains `VAR A = v; VAR B = VAR A; ...` of n_hops assignments each, interleaved and
    spread over the text; one question per chain asks for the value of its last variable."""
    names = _var_names(rng, n_hops * n_chains)
    values = rng.sample(range(10000, 99999), n_chains)
    chains = [names[c * n_hops:(c + 1) * n_hops] for c in range(n_chains)]
    statements = []
    for hop in range(n_hops):  # hop-major order: every chain's first assignment before any second one
        for c, chain in enumerate(chains):
            rhs = str(values[c]) if hop == 0 else f"VAR {chain[hop - 1]}"
            statements.append(f"VAR {chain[hop]} = {rhs}.")
    depths = [(i + 0.5) / len(statements) for i in range(len(statements))]
    head = "Memorize and track the chain(s) of variable assignments hidden in the following text.\n"
    qs = [Question(VT_QUESTIONS[style].format(v=chain[-1]), str(values[c])) for c, chain in enumerate(chains)]
    return Task(head + place(haystack, statements, depths), qs)


FACTS = [  # (what the user says, the question, the answer cue)
    ("My locker code is {n}.", "What is my locker code?", "Your locker code is"),
    ("My flight number is {n}.", "What is my flight number?", "Your flight number is"),
    ("The PIN of my bike lock is {n}.", "What is the PIN of my bike lock?", "The PIN of your bike lock is"),
]


# the long-memory chat's facts (FACTS first): what the user says, the question, the answer cue
MORE_FACTS = FACTS + [
    (f"My {thing} is {{n}}.", f"What is my {thing}?", f"Your {thing} is")
    for thing in ("room number", "member ID", "order number", "ticket number", "account number",
                  "parcel tracking number", "badge number", "gate code", "library card number",
                  "bank branch code", "car park level code", "seat number", "customer number",
                  "policy number", "case number", "voucher code", "invoice number")
]


def real_text(files: list[Path] = LICENSES) -> str:
    """GPL-3 followed by GPL-2 (by default): the real English prose of every quality measurement."""
    missing = [str(p) for p in files if not p.exists()]
    if missing:
        raise FileNotFoundError(f"reference texts missing (Debian base-files): {', '.join(missing)}")
    return "\n\n".join(p.read_text() for p in files)


def paragraphs() -> list[str]:
    return [" ".join(p.split()) for p in real_text().split("\n\n") if len(p.split()) >= 20]


@dataclass
class Chat:
    turns: list[str]  # fed one after the other; the facts are in the first len(questions) turns
    questions: list[Question]


def multi_turn(rng: random.Random, n_filler_turns: int, paras: list[str]) -> Chat:
    """A plain-text chat: facts stated in the first turns, then filler turns quoting real prose."""
    nums = [str(rng.randint(10000, 99999)) for _ in FACTS]
    turns = [_fact_turn(say, n) for (say, _, _), n in zip(FACTS, nums)]
    start = rng.randrange(len(paras))
    turns += [_filler_turn(paras[(start + i) % len(paras)]) for i in range(n_filler_turns)]
    qs = [Question(f"User: {q}\nAssistant: {cue}", n) for (_, q, cue), n in zip(FACTS, nums)]
    return Chat(turns, qs)


def long_memory(rng: random.Random, n_facts: int, n_filler_turns: int, paras: list[str]) -> Chat:
    """A plain-text chat with n_facts facts (MORE_FACTS) spread evenly over n_filler_turns prose turns,
    the first one at the start; questions in the order the facts were stated."""
    facts = MORE_FACTS[:n_facts]
    if len(facts) < n_facts:
        raise ValueError(f"at most {len(MORE_FACTS)} facts, asked for {n_facts}")
    nums = [str(rng.randint(10000, 99999)) for _ in facts]
    every = max(1, n_filler_turns // n_facts)
    start = rng.randrange(len(paras))
    turns: list[str] = []
    for i in range(n_filler_turns):
        if i % every == 0 and i // every < n_facts:
            turns.append(_fact_turn(facts[i // every][0], nums[i // every]))
        turns.append(_filler_turn(paras[(start + i) % len(paras)]))
    qs = [Question(f"User: {q}\nAssistant: {cue}", n) for (_, q, cue), n in zip(facts, nums)]
    return Chat(turns, qs)


def _fact_turn(say: str, n: str) -> str:
    return f"User: Please remember this. {say.format(n=n)}\nAssistant: Noted: {say.format(n=n)}\n"


def _filler_turn(p: str) -> str:
    return f"User: Here is a passage I am reading: {p}\nAssistant: Thank you, I have read it.\n"
