"""PNG plots of a bench run (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

from .stats import wilson
from .summary import TASKS, accuracy, columns, full_accuracy, passkey_grid, ppl_ci

matplotlib.use("Agg")  # before pyplot is imported: no display needed
import matplotlib.pyplot as plt  # noqa: E402


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", s.replace("%", "pct")).strip("_")


def _save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110, bbox_inches="tight")  # legends placed outside the axes stay in
    plt.close(fig)
    return name


def _policy_colours(policies: list[str]) -> dict[str, tuple]:
    """One colour per policy, shared by its modes (the line style tells them apart); the default
    cycle repeats after 10 lines, which a run of 6 policies in 2 modes passes."""
    names = list(dict.fromkeys(policies))
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {p: cmap(i % cmap.N) for i, p in enumerate(names)}


def accuracy_vs_budget(res: dict, out: Path) -> str | None:
    q = res.get("quality")
    if not q:
        return None
    budgets = res["settings"]["budgets"]
    tasks = [(k, t) for k, t in TASKS.items() if q.get(k)]  # the parts that ran
    if not tasks:
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks) + 1.5, 3.8), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, (key, title) in zip(axes, tasks):
        rows = q.get(key, [])
        hit, n = full_accuracy(rows)
        if n:
            ax.axhline(hit / n, color="black", ls="--", lw=1, label="full cache")
        cols = [c for c in columns(res)[1:] if not (key == "multi_turn" and c[1] != "agnostic")]
        colour = _policy_colours([p for p, _ in cols])
        for j, (p, m) in enumerate(cols):
            ys, lo, hi = [], [], []
            for b in budgets:
                h, k = accuracy(rows, p, b, m)
                ys.append(h / k if k else math.nan)
                w = wilson(h, k) if k else (math.nan, math.nan)
                lo.append(ys[-1] - w[0] if k else 0)
                hi.append(w[1] - ys[-1] if k else 0)
            # 95% Wilson intervals; lines nudged sideways so overlapping bars stay readable
            xs = [i + 0.06 * (j - (len(cols) - 1) / 2) for i in range(len(budgets))]
            agnostic = m == "agnostic"
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o" if agnostic else "s", ls="-" if agnostic else ":",
                        mfc=None if agnostic else "white", color=colour[p], capsize=2, lw=1,
                        label=p if agnostic else f"{p} (question known)")
        ax.set_xticks(range(len(budgets)), budgets)
        ax.set_title(f"{title} (n={n} per point, 95% CI)", fontsize=9)
        ax.set_xlabel("KV budget")
        ax.set_ylim(-0.05, 1.05)
    axes[0].set_ylabel("accuracy")
    axes[-1].legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _save(fig, out, "accuracy_vs_budget.png")


def ppl_vs_budget(res: dict, out: Path) -> str | None:
    rows = res.get("quality", {}).get("perplexity")
    if not rows:
        return None
    budgets = res["settings"]["budgets"]
    fig, ax = plt.subplots(figsize=(6, 4))
    full = next(r for r in rows if r["policy"] == "full")
    ax.axhline(full["ppl"], color="black", ls="--", lw=1, label=f"full cache ({full['ppl']:.2f})")
    pols = res["settings"]["policies"]
    for j, p in enumerate(pols):
        ys, lo, hi = [], [], []
        for b in budgets:
            r = next((r for r in rows if r["policy"] == p and r["budget"] == b and "ppl" in r), None)
            ci = ppl_ci(r) if r else None
            ys.append(r["ppl"] if r else math.nan)
            lo.append(r["ppl"] - ci.lo if ci else 0)
            hi.append(ci.hi - r["ppl"] if ci else 0)
        xs = [i + 0.05 * (j - (len(pols) - 1) / 2) for i in range(len(budgets))]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=2, lw=1, label=p)  # 95% bootstrap intervals
    for i, b in enumerate(budgets):
        if all("ppl" not in r for r in rows if r["budget"] == b):
            ax.annotate("skipped", (i, full["ppl"]), xytext=(0, 12), textcoords="offset points", ha="center",
                        fontsize=8, color="gray")
    ax.set_xticks(range(len(budgets)), budgets)
    ax.set_xlabel("KV budget (fraction of the text)")
    ax.set_ylabel("perplexity")
    n_win = len(full.get("windows") or []) or 1
    ax.set_title(f"perplexity of real text, {n_win} window(s), tokens {full['eval_from']}-{full['n_tokens']} (95% CI)",
                 fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, out, "ppl_vs_budget.png")


def passkey_heatmaps(res: dict, out: Path) -> list[str]:
    rows = res.get("quality", {}).get("passkey")
    if not rows:
        return []
    names = []
    for m in res["settings"]["modes"]:
        for b in res["settings"]["budgets"]:
            cols = [("full", "full", None)] + [(p, b, m) for p in res["settings"]["policies"]]
            fig, axes = plt.subplots(1, len(cols), figsize=(2.4 * len(cols) + 1.5, 3.4), squeeze=False, sharey=True)
            for ax, (p, bb, mm) in zip(axes[0], cols):
                lengths, depths, grid = passkey_grid(rows, p, bb, mm)
                im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
                ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n >= 1024 else str(n) for n in lengths])
                ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
                ax.tick_params(labelleft=ax is axes[0][0])
                ax.set_title(p if p == "full" else f"{p}", fontsize=9)
                ax.set_xlabel("context")
                for i, line in enumerate(grid):
                    for j, v in enumerate(line):
                        if not math.isnan(v):
                            ax.text(j, i, f"{v:.0%}" if 0 < v < 1 else ("yes" if v else "no"),
                                    ha="center", va="center", fontsize=7)
            axes[0][0].set_ylabel("needle depth")
            fig.colorbar(im, ax=axes[0].tolist(), fraction=0.02)
            fig.suptitle(f"pass key found, budget {b} of the context ({'question known' if m == 'question' else 'question-agnostic'})",
                         fontsize=10, y=1.03)
            fig.savefig(out / (name := f"passkey_heatmap_{m}_{_slug(b)}.png"), dpi=110, bbox_inches="tight")
            plt.close(fig)
            names.append(name)
    return names


def decode_speed(res: dict, out: Path) -> str | None:
    rows = res.get("speed")
    if not rows:
        return None
    full = rows[0]
    budgets = [b for b in res["settings"]["budgets"] if any(r["budget"] == b for r in rows[1:])]
    fig, axes = plt.subplots(2, len(budgets), figsize=(4.5 * len(budgets), 7), squeeze=False, sharex=True)
    for j, b in enumerate(budgets):
        for i, (key, label) in enumerate([("decode_tok_s", "decode tok/s"), ("prefill_tok_s", "prefill tok/s")]):
            ax = axes[i][j]
            hx = [p["history"] for p in full["points"]]
            ax.plot(hx, [p[key] for p in full["points"]], "k--", marker="s", label="full cache")
            if not any(r["points"] for r in rows[1:] if r["budget"] == b):
                ax.text(0.5, 0.5, "skipped: below the model's\nsliding window (report.md)", transform=ax.transAxes,
                        ha="center", va="center", fontsize=9, color="gray")
            for r in rows[1:]:
                if r["budget"] == b:
                    ax.plot([p["history"] for p in r["points"]], [p[key] for p in r["points"]], marker="o",
                            label=r["policy"])
            ax.set_ylabel(label)
            ax.set_title(f"budget {b} ({next((r['cells'] for r in rows[1:] if r['budget'] == b), '?')} cells)", fontsize=9)
            if i == 1:
                ax.set_xlabel("history (tokens)")
            ax.set_ylim(bottom=0)
    axes[0][-1].legend(fontsize=7)
    return _save(fig, out, "decode_speed.png")


def kv_memory(res: dict, out: Path) -> str | None:
    rows = res.get("memory")
    if not rows:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        s = r["series"]
        if not s:
            continue
        lab = "full cache" if r["policy"] == "full" else f"{r['budget']} ({r['cells']} cells)"
        a1.plot([p["tokens"] for p in s], [p["kv_mib"] for p in s], label=lab, ls="--" if r["policy"] == "full" else "-")
        a2.plot([p["tokens"] for p in s], [p["rss_mib"] for p in s], label=lab, ls="--" if r["policy"] == "full" else "-")
    a1.set_title("KV cache held (live cells)")
    a1.set_ylabel("MiB")
    a2.set_title("process RSS")
    a2.set_ylabel("MiB")
    for a in (a1, a2):
        a.set_xlabel("chat tokens so far")
        a.legend(fontsize=8)
    return _save(fig, out, "kv_memory.png")


def write_all(res: dict, out: Path) -> list[str]:
    names = [accuracy_vs_budget(res, out), ppl_vs_budget(res, out)] + passkey_heatmaps(res, out) + \
            [decode_speed(res, out), kv_memory(res, out)]
    return [n for n in names if n]
