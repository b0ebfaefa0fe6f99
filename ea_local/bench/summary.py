"""Aggregates of results.json shared by the report and the plots."""
from __future__ import annotations

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
