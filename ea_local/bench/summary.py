"""Aggregates of results.json shared by the report and the plots."""
from __future__ import annotations

from .stats import McNemar, PplInterval, delta_ppl_interval, mcnemar_exact, pair, ppl_interval

TASKS = {"passkey": "pass key", "multikey": "multi-key needle", "variable_tracking": "variable tracking",
         "multi_turn": "multi-turn recall"}


def columns(res: dict) -> list[tuple[str, str]]:
    """(policy, mode) pairs measured, full cache first."""
    s = res["settings"]
    return [("full", "none")] + [(p, m) for p in s["policies"] for m in s["modes"]]


def accuracy(rows: list[dict], policy: str, budget: str, mode: str | None = None) -> tuple[int, int]:
    sel = [r for r in rows if r["policy"] == policy and r["budget"] == budget and "skipped" not in r
           and (mode is None or r["mode"] == mode)]
    return sum(bool(r["found"]) for r in sel), len(sel)


def full_accuracy(rows: list[dict]) -> tuple[int, int]:
    return accuracy(rows, "full", "full")


def passkey_grid(rows: list[dict], policy: str, budget: str, mode: str | None) -> tuple[list[int], list[float], list[list[float]]]:
    """lengths, depths, mean found[depth][length] (NaN where not measured)."""
    sel = [r for r in rows if r["policy"] == policy and r["budget"] == budget and (mode is None or r["mode"] == mode)]
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    grid = []
    for d in depths:
        line = []
        for n in lengths:
            hits = [bool(r["found"]) for r in sel if r["length"] == n and r["depth"] == d]
            line.append(sum(hits) / len(hits) if hits else float("nan"))
        grid.append(line)
    return lengths, depths, grid


def headline_budget(res: dict) -> str | None:
    """25% when measured, else the middle budget."""
    b = res["settings"]["budgets"]
    if not b:
        return None
    return "25%" if "25%" in b else b[len(b) // 2]


def ppl_of(res: dict, policy: str, budget: str) -> dict | None:
    return next((r for r in res.get("quality", {}).get("perplexity", [])
                 if r["policy"] == policy and r["budget"] == budget), None)


def speed_of(res: dict, policy: str, budget: str) -> dict | None:
    return next((r for r in res.get("speed", []) if r["policy"] == policy and r["budget"] == budget), None)


def headline(res: dict) -> list[dict]:
    """Per policy: pass key at the longest context and the headline budget, ΔPPL, decode speed ratio."""
    b = headline_budget(res)
    q = res.get("quality", {})
    pk = q.get("passkey", [])
    longest = max((r["length"] for r in pk), default=None)
    at_longest = [r for r in pk if r["length"] == longest]
    rows = []
    for p in ["full"] + res["settings"]["policies"]:
        budget = "full" if p == "full" else b
        hit, n = accuracy(at_longest, p, budget, None if p == "full" else "agnostic")
        ppl = ppl_of(res, p, budget)
        sp = speed_of(res, p, budget)
        last = sp["points"][-1] if sp and sp["points"] else None
        rows.append({"policy": p, "budget": budget, "passkey": (hit, n) if n else None, "length": longest,
                     "ppl": ppl.get("ppl") if ppl else None, "delta_ppl": ppl.get("delta_ppl") if ppl else None,
                     "decode_ratio": (last.get("decode_ratio", 1.0) if last else None),
                     "decode_tok_s": last["decode_tok_s"] if last else None,
                     "history": last["history"] if last else None})
    return rows


TRIAL_FIELDS = ("length", "depth", "seed", "haystack", "sample", "question")


def trial_key(r: dict) -> tuple:
    """What identifies one trial across policies: the same document, needle and question."""
    return tuple(r.get(k) for k in TRIAL_FIELDS)


def paired(rows: list[dict], a: str, b: str, budget: str, mode: str) -> McNemar | None:
    """Exact McNemar of policy a vs policy b on the trials both ran at this budget and mode."""
    ra = [r for r in rows if r["policy"] == a and r["budget"] == budget and r.get("mode") == mode and "skipped" not in r]
    rb = [r for r in rows if r["policy"] == b and r["budget"] == budget and r.get("mode") == mode and "skipped" not in r]
    fa, fb = pair(ra, rb, trial_key)
    return mcnemar_exact(fa, fb) if fa else None


def ppl_units(row: dict) -> tuple[list[float], list[int], str]:
    """Bootstrap units of a perplexity row: its windows when there are several documents' worth,
    else the scored chunks of its one window (correlated: the interval is then optimistic)."""
    wins = row.get("windows") or []
    if len(wins) >= 2:
        return [w["nll_sum"] for w in wins], [w["n"] for w in wins], "window"
    if len(wins) == 1 and len(wins[0]["chunk_n"]) >= 2:
        return wins[0]["chunk_nll"], wins[0]["chunk_n"], "chunk"
    return [], [], ""


def ppl_ci(row: dict, seed: int = 0) -> PplInterval | None:
    num, den, _ = ppl_units(row)
    return ppl_interval(num, den, seed=seed) if num else None


def delta_ci(row: dict, full: dict, seed: int = 0) -> tuple[float, float, float] | None:
    """ΔPPL against the full cache with a paired bootstrap interval over the same units."""
    a, n, kind = ppl_units(row)
    r, n2, kind2 = ppl_units(full)
    if not a or kind != kind2 or n != n2:
        return None
    return delta_ppl_interval(a, r, n, seed=seed)
