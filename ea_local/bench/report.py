"""report.md: the tables of a bench run, written from results.json's dict."""
from __future__ import annotations

from .stats import fmt_p, fmt_rate, wilson
from .summary import (TASKS, accuracy, columns, delta_ci, full_accuracy, headline, headline_budget, paired, ppl_ci,
                      ppl_of, ppl_units)


def _pct(h: int, n: int) -> str:
    """k/n (rate%, 95% Wilson interval in %)."""
    return fmt_rate(h, n)


def _f(x, fmt: str = ".2f") -> str:
    return "–" if x is None else format(x, fmt)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def _header(res: dict) -> list[str]:
    s, m, mach = res["settings"], res["model"], res["machine"]
    secs = ", ".join(f"{k} {v:.0f} s" for k, v in res["seconds"].items())
    return [
        f"# ea-local bench{' (quick)' if s['quick'] else ''}", "",
        f"Regenerate: `{res['command']}`", "",
        f"- model: `{m['name']}` ({m['architecture']}, {m['file_type']}, {m['n_layer']} layers, "
        f"{m['global_layers']} global — only those are evicted on iSWA models), KV cache {s['cache_type']}, seed {s['seed']}",
        f"- machine: {mach['cpu']}, {mach['cores']} cores, {mach['platform']}, GPU layers {mach['n_gpu_layers'] or 0}, "
        + (f"RPC servers {', '.join(mach['rpc'])}, " if mach.get("rpc") else "")
        + f"threads {s['threads'] or 'all'}" + (f"; 1-minute load average after each part: "
                                              f"{', '.join(map(str, mach['load_avg_1min']))}" if mach.get("load_avg_1min") else ""),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items() if v),
        f"- run: {res['started']} → {res['finished']} ({secs})"
        + (f"; estimated before it started: {_hours(res['estimate']['total_s'])} of CPU" if res.get("estimate") else ""),
        f"- policies: {', '.join(s['policies'])}; budgets: {', '.join(s['budgets'])} "
        "(a percentage is of each test's own context; the full cache is always measured)"] + \
        [f"- note: {n}" for n in res.get("notes", [])] + [""]


def _headline(res: dict) -> list[str]:
    """One row per policy at the headline budget, with a column only for what this run measured."""
    b = headline_budget(res)
    rows = headline(res)
    if not rows or b is None:
        return []
    length, history = rows[0]["length"], rows[0]["history"]
    has_pk, has_ppl = any(r["passkey"] for r in rows), any(r["ppl"] is not None for r in rows)
    has_speed = any(r["decode_tok_s"] is not None for r in rows)
    if not (has_pk or has_ppl or has_speed):
        return []
    head, what = ["policy"], [f"Budget {b} (full cache: no eviction)"]
    if has_pk:
        head.append(f"pass key @ {length}")
        what.append(f"pass key: question-agnostic, context {length} tokens, every depth")
    if has_ppl:
        head.append("perplexity (Δ)")
        what.append("perplexity: Δ against the full cache")
    if has_speed:
        head += ["decode tok/s", "decode speed ratio"]
        what.append(f"decode: tok/s at the longest history ({history} tokens) and the ratio to the full cache in "
                    "the same run")
    body = []
    for r in rows:
        line = [r["policy"]]
        if has_pk:
            line.append(_pct(*r["passkey"]) if r["passkey"] else "–")
        if has_ppl:
            dppl = "" if r["policy"] == "full" else f" ({'+' if (r['delta_ppl'] or 0) >= 0 else ''}{_f(r['delta_ppl'])})"
            prow, pfull = ppl_of(res, r["policy"], r["budget"]), ppl_of(res, "full", "full")
            if r["policy"] != "full" and prow and pfull and "ppl" in prow and (d := delta_ci(prow, pfull)):
                dppl = f" (Δ {d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}])"
            line.append(_f(r["ppl"]) + (dppl if r["ppl"] is not None else ""))
        if has_speed:
            line += [f"{_f(r['decode_tok_s'], '.1f')}",
                     "1.00 (reference)" if r["policy"] == "full" else _f(r["decode_ratio"])]
        body.append(line)
    return ["## Headline", "", "; ".join(what) + ".", ""] + _table(head, body) + [""]


def _hours(sec: float) -> str:
    return f"{sec / 3600:.1f} h" if sec >= 3600 else f"{sec / 60:.0f} min"


def _texts(res: dict) -> list[str]:
    t = res.get("texts")
    if not t:
        return []
    other = "tuning" if t["set"] == "reporting" else "reporting"
    docs = ", ".join(f"`{d['name']}` ({d['chars']:,} chars, sha256 {d['sha256']})" for d in t["documents"])
    out = [f"Real text: the **{t['set']}** set (`ea_local/bench/corpus.py`, read at run time from Debian's "
           f"base-files and perl-modules and from Python {t['python']}'s docstrings; disjoint from the {other} set, "
           f"on which settings are chosen): {docs}."]
    if t.get("missing"):
        out[0] += f" Not on this machine, left out: {', '.join(t['missing'])}."
    return out + [""]


def _comparisons(res: dict, rows: list[dict]) -> list[str]:
    """The first policy against each other one on the same trials (exact McNemar)."""
    s = res["settings"]
    pols = s["policies"]
    if len(pols) < 2:
        return []
    a = pols[0]
    body = []
    for b in s["budgets"]:
        for m in s["modes"]:
            for other in pols[1:]:
                t = paired(rows, a, other, b, m)
                if t is None:
                    continue
                body.append([b, m, other, f"{t.a_hits}/{t.n} vs {t.b_hits}/{t.n}", f"{t.a_only} / {t.b_only}",
                             fmt_p(t.p_value), t.verdict(a, other) if t.significant else "**not significant**"])
    if not body:
        return []
    return [f"{a} against each other policy on the same trials (exact McNemar test on the discordant pairs: "
            f"trials only one of the two got right; two-sided, significant below p = 0.05, no correction for the "
            f"{len(body)} comparisons):", ""] + \
        _table(["budget", "mode", "vs", f"{a} vs it", "only " + a + " / only it", "p", "verdict"], body) + [""]


def _quality(res: dict, figs: list[str]) -> list[str]:
    q = res.get("quality")
    if not q:
        return []
    s = res["settings"]
    out = ["## Quality", "",
           "One-shot tasks (pass key, multi-key needle, variable tracking) follow kvpress' main protocol: the "
           "context is prefilled in full, compressed once to the budget, then the question is asked (greedy, "
           "8 tokens; found = the answer contains the expected string, a number standing alone). One prefill per sample serves every "
           "policy and budget (the sequence state is saved and restored). The query-based "
           "policies' statistics are the queries of the context's last prefill chunk (up to 512 tokens, at least 128; "
           "question-agnostic mode), or those mixed half and half with the question's (question-known mode: the "
           "engine decodes the question after the context at the compression, then removes it and asks it on "
           "the compressed cache). Multi-turn recall and perplexity stream through the budget (compression "
           "after every turn or chunk) and cost one pass per policy and budget; in multi-turn recall's "
           "question-known mode every turn, the question included, is a user turn whose queries steer the "
           "compressions, as in `ea-local chat`; each question is then also asked from the same state with "
           "recall of evicted cells (mode question+recall, `ea-local chat`'s default: docs/recall.md).", "",
           "Every accuracy is k/n (rate, 95% Wilson interval in %). Two policies are compared on the same trials "
           "with an exact McNemar test; where it says *not significant*, the data cannot tell them apart.", ""]
    if "question" not in s["modes"]:
        out += ["Question-known mode: not run here (`--modes agnostic,question`).", ""]
    pk = q.get("passkey", [])
    hays = s.get("haystacks") or [s.get("haystack", "filler")]
    texts = s.get("texts", "reporting")
    hay = " and ".join("real prose (the " + texts + " texts below)" if h == "prose" else "repetitive filler (`ea_local/bench/data.py`)"
                       for h in hays)
    n, tl = s["task_samples"] * len(hays), s["task_length"]
    seeds = s.get("seeds", 1)
    per_cell = len(s["depths"]) * seeds * len(hays)
    keys, hops, chains = s.get("multikey_keys", 4), s.get("vt_hops", 4), s.get("vt_chains", 2)
    data = {  # what each part that ran was measured on
        "passkey": f"pass-key contexts {', '.join(map(str, s['lengths']))} tokens × depths "
                   f"{', '.join(f'{d:.0%}' for d in s['depths'])} × {seeds} key(s) × {len(hays)} haystack(s) "
                   f"({per_cell} trials per length, budget and mode)",
        "multikey": f"multi-key needle ({keys} needles, each asked; RULER format), {n} documents of ~{tl} tokens",
        "variable_tracking": f"variable tracking ({chains} chain(s) of {hops} hops, each asked, "
                             f"{s.get('vt_style', 'question')} style; RULER format), {n} documents of ~{tl} tokens",
        "multi_turn": f"multi-turn recall: 3 facts in the first turns of a plain-text chat followed by turns "
                      f"quoting the GPL (Debian base-files) up to ~{tl} tokens, {s['task_samples']} chats, each fact asked",
    }
    ran = [text for key, text in data.items() if q.get(key)]
    if ran:
        out += [f"Data: the pass key and the needles hidden in {hay}; " + "; ".join(ran) + ".", ""]
    out += _texts(res)
    for key, title in TASKS.items():
        rows = q.get(key, [])
        if not rows:
            continue
        body = []
        cols = columns(res)[1:]
        if key == "multi_turn":  # each question also asked with recall of evicted cells (the chat's default)
            if any(r["mode"] == "question+recall" for r in rows):
                cols += [(p, "question+recall") for p in s["policies"]]
        for p, m in cols:
            body.append([p, m] + [_pct(*accuracy(rows, p, b, m)) for b in s["budgets"]])
        fk, fn = full_accuracy(rows)
        warn = []
        if fn and wilson(fk, fn)[1] < 0.5:  # even the interval's top is a coin flip: the model cannot do the task
            warn = ["**The full cache fails this task** (its 95% interval stays below 50%): the model cannot do it, "
                    "so the rows below say nothing about eviction.", ""]
        out += [f"### {title}", "", f"Full cache: **{_pct(fk, fn)}**.", ""] + warn + \
            _table(["policy", "mode"] + s["budgets"], body) + [""]
        if key != "multi_turn":
            out += _comparisons(res, rows)
        if key == "passkey" and len({r["length"] for r in rows}) > 1:
            longest = max(r["length"] for r in rows)
            at = [r for r in rows if r["length"] == longest]
            out += [f"At the longest context alone ({longest} tokens; full cache {_pct(*full_accuracy(at))}):", ""] + \
                _table(["policy", "mode"] + s["budgets"],
                       [[p, m] + [_pct(*accuracy(at, p, b, m)) for b in s["budgets"]] for p, m in columns(res)[1:]]) + [""]
        if key in ("passkey", "multikey", "variable_tracking") and len({r.get("haystack") for r in rows}) > 1:
            for h in hays:
                at = [r for r in rows if r.get("haystack") == h]
                out += [f"In the {h} haystack alone (full cache {_pct(*full_accuracy(at))}):", ""] + \
                    _table(["policy", "mode"] + s["budgets"],
                           [[p, m] + [_pct(*accuracy(at, p, b, m)) for b in s["budgets"]] for p, m in columns(res)[1:]]) + [""]
        if key == "passkey":
            kept = []
            for p, m in columns(res)[1:]:
                cells = []
                for b in s["budgets"]:
                    v = [r["needle_kept"] for r in pk if r["policy"] == p and r["budget"] == b and r["mode"] == m
                         and r["needle_kept"] is not None]
                    cells.append(f"{100 * sum(v) / len(v):.0f}%" if v else "–")
                kept.append([p, m] + cells)
            out += ["Share of the needle's tokens still in the cache when the question is asked:", ""] + \
                _table(["policy", "mode"] + s["budgets"], kept) + [""]
        if key == "multi_turn":
            ev = {(r["policy"], r["budget"]): r.get("evictions", "skipped") for r in rows}
            out += ["Compression events before the questions: " + ", ".join(
                f"{b} {ev.get((s['policies'][0], b), '–')}" for b in s["budgets"]) + f" ({s['policies'][0]}).", ""]
    out += _perplexity(res)
    for f in figs:
        if f.startswith(("accuracy", "ppl", "passkey")):
            out += [f"![{f}]({f})", ""]
    return out


def _ppl_cell(r: dict, full: dict) -> str:
    if "ppl" not in r:
        return "skipped*"
    ci, d = ppl_ci(r), delta_ci(r, full)
    cell = f"{r['ppl']:.3f}" + (f" [{ci.lo:.3f}–{ci.hi:.3f}]" if ci else "")
    if d:
        cell += f" (Δ {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}])"
    else:
        cell += f" ({r['delta_ppl']:+.3f})"
    return cell


def _perplexity(res: dict) -> list[str]:
    ppl = res.get("quality", {}).get("perplexity", [])
    if not ppl:
        return []
    s = res["settings"]
    full = ppl[0]
    wins = full.get("windows") or []
    _, counts, unit = ppl_units(full)
    if len(wins) >= 2:
        docs = {d for w in wins for d in w["doc"].split(" + ")}
        what = (f"{len(wins)} consecutive windows of {full['n_tokens']} tokens covering {len(docs)} documents of "
                f"the {s.get('texts', 'reporting')} texts read in a row, each streamed through the budget in 256-token chunks "
                f"(compression after every chunk over budget); mean NLL of each window's tokens "
                f"{full['eval_from']}–{full['n_tokens'] - 1}, {sum(counts):,} scored tokens in all")
    else:
        what = (f"{(wins[0]['doc'] if wins else 'GPL-3 + GPL-2 (Debian base-files)')}, the first {full['n_tokens']} "
                f"tokens streamed through the budget in 256-token chunks (compression after every chunk over budget); "
                f"mean NLL of tokens {full['eval_from']}–{full['n_tokens'] - 1}. One text")
    ci = ppl_ci(full)
    interval = (f"; in brackets 95% bootstrap intervals over the {len(counts)} {unit}s (2,000 resamples, seeded), "
                "Δ paired: the same resampled units for the policy and the full cache"
                + (" — scored chunks of one text are not independent, so these intervals are too narrow"
                   if unit == "chunk" else "") if ci else "")
    out = ["### perplexity", "",
           f"{what}{interval}. Full cache: **{full['ppl']:.3f}**"
           + (f" [{ci.lo:.3f}–{ci.hi:.3f}]" if ci else "") + ".", ""]
    body = [[p] + [next((_ppl_cell(r, full) for r in ppl if r["policy"] == p and r["budget"] == b), "–")
                   for b in s["budgets"]] for p in s["policies"]]
    return out + _table(["policy"] + s["budgets"], body) + [""]


def _speed(res: dict, figs: list[str]) -> list[str]:
    rows = res.get("speed")
    if not rows:
        return []
    s = res["settings"]
    full = rows[0]["points"]
    out = ["## Speed", "",
           f"Real text read up to each history length, then {s['decode_tokens']} tokens decoded through the "
           "engine's decode loop (teacher-forced, compressions included); prefill tok/s is for the segment "
           "read since the previous point. Budgets are fractions of the longest history. The full cache is a "
           "session that never reaches its budget, query capture off. One run per configuration.", ""]
    head = ["policy", "budget"] + [f"decode @ {p['history']}" for p in full] + ["prefill @ last", "compression (mean, n)"]
    body = [["full cache", ""] + [f"{p['decode_tok_s']:.1f}" for p in full] + [f"{full[-1]['prefill_tok_s']:.0f}", "–"]]
    for r in rows[1:]:
        if not r["points"]:
            body.append([r["policy"], f"{r['budget']} ({r['cells']})"] + ["skipped*"] * (len(head) - 2))
            continue
        evs = [e for p in r["points"] for e in (p["prefill_compressions"], p["decode_compressions"])]
        n = sum(e["n"] for e in evs)
        tot = sum(e["total_s"] for e in evs)
        body.append([r["policy"], f"{r['budget']} ({r['cells']})"] +
                    [f"{p['decode_tok_s']:.1f} ({p['decode_ratio']:.2f}×)" for p in r["points"]] +
                    [f"{r['points'][-1]['prefill_tok_s']:.0f} ({r['points'][-1]['prefill_ratio']:.2f}×)",
                     f"{1000 * tot / n:.0f} ms, {n}" if n else "none"])
    out += ["Decode tok/s (ratio to the full cache at the same history):", ""] + _table(head, body) + [""]
    out += [f"![{f}]({f})" for f in figs if f.startswith("decode")] + [""]
    return out


def _memory(res: dict, figs: list[str]) -> list[str]:
    rows = res.get("memory")
    if not rows:
        return []
    out = ["## Memory", "",
           f"A plain-text chat quoting the GPL, one turn at a time, policy {res['settings']['policies'][0]}; "
           "KV held = live cells × bytes per cell (sliding layers: their window); KV allocated = what llama.cpp "
           "allocates for the context (budget + one chunk); RSS of a fresh process per configuration.", ""]
    body = []
    for r in rows:
        if not r["series"]:
            body.append([r["budget"], str(r["cells"])] + ["skipped*"] * 4)
            continue
        last = r["series"][-1]
        body.append(["full cache" if r["policy"] == "full" else r["budget"], str(r["cells"]), str(last["tokens"]),
                     f"{last['kv_mib']:.1f}", f"{last['kv_alloc_mib']:.1f}",
                     f"{max(p['rss_mib'] for p in r['series']):.0f}"])
    out += _table(["budget", "cells", "chat tokens", "KV held MiB", "KV allocated MiB", "peak RSS MiB"], body) + [""]
    out += [f"![{f}]({f})" for f in figs if f.startswith("kv_memory")] + [""]
    return out


def _skips(res: dict) -> list[str]:
    """The reasons for skipped configurations, once each."""
    found: dict[str, list[str]] = {}
    parts = [("multi-turn", res.get("quality", {}).get("multi_turn", [])),
             ("perplexity", res.get("quality", {}).get("perplexity", [])),
             ("speed", res.get("speed", [])), ("memory", res.get("memory", []))]
    for name, rows in parts:
        for r in rows:
            if "skipped" in r:
                found.setdefault(r["skipped"], []).append(f"{name} {r['policy']} {r['budget']}")
    if not found:
        return []
    return ["## Skipped", ""] + [f"\\* {why}: {', '.join(sorted(set(where)))}." for why, where in found.items()] + [""]


def render(res: dict, figs: list[str]) -> str:
    return "\n".join(_header(res) + _headline(res) + _quality(res, figs) + _speed(res, figs) + _memory(res, figs)
                     + _skips(res)) + "\n"
