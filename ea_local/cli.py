"""`ea-local`: the command line.

The package's `__init__` loads libllama before anything imports numpy (DESIGN.md: the CUDA
build crashed at model load with the other order). Errors a user can fix are one line on stderr
and exit code 2, never a traceback.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Long contexts on local GGUF models inside a fixed KV budget (Expected Attention eviction).")

ModelOpt = typer.Option(None, "--model", "-m", help="GGUF file or embedded model name (default: gemma3-270m, "
                                                   "the embedded Gemma 3 270M Q4_K_M base model; `ea-local info` lists them)")
ChatModelOpt = typer.Option(None, "--model", "-m", help="GGUF file or embedded model name (default: smollm2-135m, "
                                                       "the embedded SmolLM2-135M-Instruct; `ea-local info` lists them)")
# the flags every command that runs a model shares
PolicyOpt = typer.Option("expected-attention", help="eviction policy (see `ea-local policies`)")
CacheOpt = typer.Option("f16", help="KV cache type: f16, q8_0 or q4_0")
GpuOpt = typer.Option(None, help="layers to offload to the GPU, -1 all (default: EA_LOCAL_N_GPU_LAYERS, else all "
                                  "on a CUDA/Metal build, 0 on a CPU build; `ea-local info` shows it)")
ThreadsOpt = typer.Option(None, help="CPU threads (default: all cores)")
SeedOpt = typer.Option(0)
TempOpt = typer.Option(0.0, help="sampling temperature (0: greedy)")
# chat and summarize sample as llama.cpp does by default (engine/sampling.py)
ChatTempOpt = typer.Option(0.8, help="sampling temperature (0: greedy, the same answer every time)")
TopKOpt = typer.Option(40, "--top-k", help="sample among the k likeliest tokens (0: off)")
TopPOpt = typer.Option(0.95, "--top-p", help="... and the likeliest ones that make up this probability (1: off)")
MinPOpt = typer.Option(0.05, "--min-p", help="... dropping tokens less likely than min-p times the likeliest (0: off)")
RepeatPenaltyOpt = typer.Option(1.0, "--repeat-penalty",
                                help="make tokens among the last --repeat-last-n generated ones less likely: their "
                                     "logits are divided by this (negative ones multiplied); 1: off, 1.1 a common choice")
RepeatLastNOpt = typer.Option(64, "--repeat-last-n", help="generated tokens the repeat penalty looks back on")
ChatSeedOpt = typer.Option(None, "--seed", help="sampling seed (default: a random one, as llama.cpp)")
RpcOpt = typer.Option(None, "--rpc", metavar="HOST:PORT[,HOST:PORT...]",
                      help="llama.cpp RPC servers to offload layers to (`ea-local rpc-server` on each; docs/rpc.md); "
                           "without --n-gpu-layers every layer goes to them. Default: EA_LOCAL_RPC")
AgnosticOpt = typer.Option(False, "--question-agnostic",
                           help="compression ignores the question: statistics from the context only (kvpress' protocol)")
RecallOpt = typer.Option(True, "--recall/--no-recall",
                         help="archive evicted cells on the host and bring back the ones a new message needs (docs/recall.md)")
ArchiveOpt = typer.Option("64MiB", "--archive", metavar="TOKENS|SIZE",
                          help="bound of each conversation's archive of evicted cells: tokens (4096) or bytes (64MiB)")


class UserError(Exception):
    """Bad input: printed as one line, exit code 2."""


def _fail(msg: str, code: int = 2) -> None:
    typer.echo(f"ea-local: error: {msg}", err=True)
    raise typer.Exit(code)


def _rpc_endpoints(rpc: Optional[str]) -> tuple[str, ...]:
    """--rpc checked for form here (one clear line); reachability is checked when the model loads."""
    from .rpc import RpcError, parse_endpoints, require_rpc

    try:
        eps = parse_endpoints(rpc)
        if eps:
            require_rpc()
        return eps
    except RpcError as e:
        _fail(str(e))


def _model_info(model: Optional[Path], default: Optional[str] = None):
    """--model (a path or an embedded model's name) read, or `default` (an embedded name; None: Gemma)."""
    from .model.info import ModelFileError, read_model_info
    from .model.embedded import BASE_MODEL, ModelNotFound, resolve_model

    try:
        return read_model_info(resolve_model(str(model) if model else None, default=default or BASE_MODEL))
    except (ModelFileError, ModelNotFound) as e:
        _fail(str(e))


@app.command()
def info(
    model: Optional[Path] = typer.Argument(None, help="GGUF file or embedded model name (default: gemma3-270m; "
                                                      "without one the embedded models are listed too)"),
    rpc: Optional[str] = RpcOpt,
    n_gpu_layers: Optional[int] = GpuOpt,
    ctx: int = typer.Option(4096, "--ctx", help="with --rpc/--n-gpu-layers: KV cells of the context to place"),
    cache_type: str = CacheOpt,
) -> None:
    """Architecture, attention geometry, RoPE, sliding window and KV bytes per token of a GGUF (no weights loaded),
    and the llama.cpp build: backends, CPU features compiled in, what goes to the GPU.

    With --rpc or --n-gpu-layers the model is loaded (weights are sent to the RPC servers) and llama.cpp's
    placement is shown: which device holds each layer's weights and KV cache, and how many MiB each buffer holds."""
    from .apps.info import info_blocks
    from .engine.runtime import LlamaError

    endpoints = _rpc_endpoints(rpc)
    mi = _model_info(model)
    try:
        for block in info_blocks(mi, model is None, endpoints, n_gpu_layers, ctx, cache_type):
            typer.echo(block)
    except (LlamaError, ValueError) as e:
        _fail(str(e))


@app.command()
def policies() -> None:
    """List the eviction policies with a one-line description, their paper and their options."""
    from .policies import POLICIES, UNAVAILABLE

    width = max(map(len, POLICIES))
    for p in POLICIES.values():
        typer.echo(f"{p.name:<{width}}  {p.description}\n{'':<{width}}  {p.paper}")
        if p.options:
            typer.echo(f"{'':<{width}}  options: {', '.join(f'{k}={v!r}' for k, v in p.options.items())}")
    for name, why in UNAVAILABLE.items():
        typer.echo(f"\nnot available: {name}: {why}")


@app.command()
def demo(
    model: Optional[Path] = ModelOpt,
    budget: int = typer.Option(1024, help="KV cells the context may occupy"),
    policy: str = PolicyOpt,
    length: int = typer.Option(4096, help="tokens of context to read"),
    cache_type: str = CacheOpt,
    seed: int = SeedOpt,
    threads: Optional[int] = ThreadsOpt,
    n_gpu_layers: Optional[int] = GpuOpt,
    rpc: Optional[str] = RpcOpt,
    question_agnostic: bool = AgnosticOpt,
) -> None:
    """The main job: read a long document with a pass key in it through a small KV budget, then ask for the key."""
    from .apps.demo import run_demo

    endpoints = _rpc_endpoints(rpc)
    info = _model_info(model)
    try:
        run_demo(info, budget=budget, policy=policy, length=length, cache_type=cache_type, seed=seed,
                 threads=threads, n_gpu_layers=n_gpu_layers, rpc=endpoints, question_agnostic=question_agnostic)
    except (UserError, ValueError) as e:
        _fail(str(e))


def _check_cache_type(cache_type: str) -> None:
    if cache_type not in ("f16", "q8_0", "q4_0"):
        _fail(f"unknown cache type {cache_type!r}; choose from f16, q8_0, q4_0")


def _check_sampling(opts) -> None:
    """Sampling options checked before the model loads (one line, exit 2)."""
    try:
        opts.sampling(0).validate()
    except ValueError as e:
        _fail(f"--{e}")


@app.command()
def chat(
    model: Optional[Path] = ChatModelOpt,
    budget: int = typer.Option(2048, help="KV cells the conversation may occupy"),
    policy: str = PolicyOpt,
    cache_type: str = CacheOpt,
    n_gpu_layers: Optional[int] = GpuOpt,
    threads: Optional[int] = ThreadsOpt,
    seed: Optional[int] = ChatSeedOpt,
    max_tokens: int = typer.Option(512, help="most tokens per answer"),
    temperature: float = ChatTempOpt,
    top_k: int = TopKOpt,
    top_p: float = TopPOpt,
    min_p: float = MinPOpt,
    repeat_penalty: float = RepeatPenaltyOpt,
    repeat_last_n: int = RepeatLastNOpt,
    system: Optional[str] = typer.Option(None, "--system", help="system prompt"),
    file: Optional[str] = typer.Option(None, "--file", "-f", help="a text/markdown file to chat about: it opens the first message, read through the budget with it"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="a stats line after every answer"),
    rpc: Optional[str] = RpcOpt,
    question_agnostic: bool = AgnosticOpt,
    recall: bool = RecallOpt,
    archive: str = ArchiveOpt,
) -> None:
    """Chat in a REPL that streams answers and stays inside the KV budget (piped stdin: one turn per line)."""
    from .apps.chat import ChatError, ChatOptions, run_chat
    from .model.chat_template import TemplateError
    from .engine.runtime import LlamaError

    from .model.embedded import CHAT_MODEL

    _check_cache_type(cache_type)
    opts = ChatOptions(budget=budget, policy=policy, cache_type=cache_type, n_gpu_layers=n_gpu_layers,
                       threads=threads, seed=seed, max_tokens=max_tokens, temperature=temperature,
                       top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                       repeat_last_n=repeat_last_n, system=system, file=file, rpc=_rpc_endpoints(rpc),
                       question_agnostic=question_agnostic, recall=recall, archive=archive)
    _check_sampling(opts)
    info = _model_info(model, default=CHAT_MODEL)
    try:
        run_chat(info, opts, verbose=verbose)
    except (UserError, ChatError, TemplateError, LlamaError, ValueError) as e:
        _fail(str(e))


@app.command()
def summarize(
    source: str = typer.Argument(..., metavar="FILE|-", help="text or markdown file; - reads standard input"),
    model: Optional[Path] = ChatModelOpt,
    output: Optional[str] = typer.Option(None, "--output", "-o", help="write the summary here (default: stdout)"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="instruction asked after the document"),
    budget: int = typer.Option(2048, help="KV cells the document may occupy"),
    policy: str = PolicyOpt,
    chunk: Optional[int] = typer.Option(None, help="prefill chunk in tokens (default: min(512, budget/2))"),
    cache_type: str = CacheOpt,
    n_gpu_layers: Optional[int] = GpuOpt,
    threads: Optional[int] = ThreadsOpt,
    seed: Optional[int] = ChatSeedOpt,
    max_tokens: int = typer.Option(512, help="most tokens of summary"),
    temperature: float = ChatTempOpt,
    top_k: int = TopKOpt,
    top_p: float = TopPOpt,
    min_p: float = MinPOpt,
    repeat_penalty: float = RepeatPenaltyOpt,
    repeat_last_n: int = RepeatLastNOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="a stats line on stderr at the end"),
    rpc: Optional[str] = RpcOpt,
    question_agnostic: bool = AgnosticOpt,
    recall: bool = RecallOpt,
    archive: str = ArchiveOpt,
) -> None:
    """Read a long document through the KV budget (chunked prefill + eviction), then stream a summary."""
    from .apps.chat import ChatError
    from .model.chat_template import TemplateError
    from .engine.runtime import LlamaError
    from .apps.summarize import SummarizeOptions, run_summarize

    from .model.embedded import CHAT_MODEL

    _check_cache_type(cache_type)
    opts = SummarizeOptions(budget=budget, policy=policy, cache_type=cache_type, n_gpu_layers=n_gpu_layers,
                            threads=threads, seed=seed, max_tokens=max_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                            repeat_last_n=repeat_last_n, chunk=chunk, prompt=prompt, output=output, verbose=verbose,
                            rpc=_rpc_endpoints(rpc), question_agnostic=question_agnostic, recall=recall, archive=archive)
    _check_sampling(opts)
    info = _model_info(model, default=CHAT_MODEL)
    try:
        run_summarize(info, source, opts)
    except (UserError, ChatError, TemplateError, LlamaError, ValueError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130)


@app.command("rpc-server")
def rpc_server(
    host: str = typer.Option("127.0.0.1", help="address to listen on; another machine's clients need this machine's "
                                               "LAN address (or 0.0.0.0) -- trusted networks only, there is no authentication"),
    port: int = typer.Option(50052, help="TCP port"),
    threads: Optional[int] = typer.Option(None, help="CPU threads of the server's CPU device (default: half the cores)"),
    cache: bool = typer.Option(False, "--cache", help="keep received tensors on disk (faster reloads of the same model)"),
    device: Optional[str] = typer.Option(None, help="expose only this device (e.g. CUDA0); default: all accelerators, else the CPU"),
) -> None:
    """Run llama.cpp's ggml-rpc-server (from this install's patched build) so other machines can offload layers here.

    It has NO authentication and NO encryption: anyone who can reach the port can run code-like graphs and
    read or write its memory. Bind it to a trusted network only (docs/rpc.md)."""
    import os

    from .rpc import RpcError, server_command

    if not 0 < port < 65536:
        _fail(f"--port must be in 1..65535, got {port}")
    try:
        cmd = server_command(host, port, threads, cache, device)
    except RpcError as e:
        _fail(str(e))
    typer.echo(f"ea-local: starting {cmd[0]} on {host}:{port} (no authentication: trusted network only)", err=True)
    os.execv(cmd[0], cmd)


@app.command()
def serve(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="GGUF file or embedded model name "
                                         "(default: smollm2-135m, the instruct model; `ea-local info` lists them)"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0: every interface; set --api-key then)"),
    port: int = typer.Option(8080, help="TCP port"),
    budget: int = typer.Option(2048, help="KV cells each conversation (slot) may occupy; requests may ask for less"),
    policy: str = PolicyOpt,
    parallel: int = typer.Option(1, "--parallel", "-np", help="slots: conversations decoded at the same time"),
    queue: int = typer.Option(16, help="requests that may wait for a slot; beyond that: 503 + Retry-After"),
    api_key: Optional[str] = typer.Option(None, envvar="EA_LOCAL_API_KEY", show_envvar=True,
                                          help="require Authorization: Bearer KEY (prefer the environment variable)"),
    max_tokens: int = typer.Option(512, help="tokens per answer when a request does not say"),
    max_prompt_tokens: int = typer.Option(131072, help="longest prompt accepted, in tokens (400 beyond)"),
    max_body: int = typer.Option(4 * 2**20, help="largest request body in bytes (413 beyond)"),
    temperature: float = TempOpt,
    reuse: bool = typer.Option(True, "--reuse/--no-reuse", help="continue a conversation from its slot's cache"),
    cache_type: str = CacheOpt,
    n_gpu_layers: Optional[int] = GpuOpt,
    threads: Optional[int] = ThreadsOpt,
    seed: int = SeedOpt,
    log_level: str = typer.Option("info", help="uvicorn log level (warning: no access log)"),
    rpc: Optional[str] = RpcOpt,
    recall: bool = RecallOpt,
    archive: str = ArchiveOpt,
) -> None:
    """An OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions) whose conversations stay inside the KV budget."""
    from .engine.runtime import LlamaError
    from .model.embedded import CHAT_MODEL
    from .serve.server import build_server, check_flags, configure, serve as run_server

    _check_cache_type(cache_type)
    try:
        check_flags(parallel=parallel, queue=queue, max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens,
                    max_body=max_body, port=port, log_level=log_level, policy=policy)
    except ValueError as e:
        _fail(str(e))
    info = _model_info(model, default=CHAT_MODEL)
    try:
        cfg, scfg = configure(info, budget=budget, policy=policy, max_tokens=max_tokens,
                              max_prompt_tokens=max_prompt_tokens, max_body=max_body, temperature=temperature,
                              api_key=api_key, cache_type=cache_type, seed=seed, threads=threads,
                              n_gpu_layers=n_gpu_layers, rpc=_rpc_endpoints(rpc), recall=recall, archive=archive)
    except ValueError as e:
        _fail(str(e))
    if host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        typer.echo(f"ea-local serve: warning: listening on {host} without an API key", err=True)
    try:
        srv = build_server(info, cfg, scfg, parallel=parallel, queue=queue, reuse=reuse)
    except (LlamaError, ValueError) as e:
        _fail(str(e))
    if srv.notice:
        typer.echo(srv.notice, err=True)
    typer.echo(f"ea-local serve: {cfg.model_id}, {parallel} slot(s) x {budget} cells, policy {policy}, "
               f"KV cache {cache_type}", err=True)
    try:
        run_server(srv, host, port, log_level=log_level)
    except OSError as e:
        _fail(f"cannot listen on {host}:{port}: {e.strerror or e}")


@app.command()
def bench(
    suite: str = typer.Option("all", help="quality, speed, memory or all, or a quality part: passkey, perplexity, "
                                          "multikey, variable_tracking, multi_turn (a comma list works too)"),
    policy_list: str = typer.Option("expected-attention,streaming-llm,snapkv,tova,knorm,random", "--policies",
                                    help="comma list of policies; the full cache is always measured"),
    budgets: Optional[str] = typer.Option(None, help="comma list: percentages of each test's context or cell counts "
                                                     "(default 50%,25%,12.5%; --preset report: 25%,12.5%)"),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="GGUF file or embedded model name, or a comma list of them "
                                             "(e.g. gemma3-270m,smollm2-135m: each is measured, results in "
                                             "--out/NAME/); default: gemma3-270m"),
    out: Path = typer.Option(Path("bench-out"), "--out", help="folder for results.json, report.md and the PNGs"),
    quick: bool = typer.Option(False, "--quick", help="CI-sized run: tiny contexts, one sample, every file still written"),
    modes: Optional[str] = typer.Option(None, help="agnostic (compress before the question) and/or question (question known)"),
    haystack: Optional[str] = typer.Option(None, help="what the pass key and the needles hide in: filler "
                                                      "(default) or prose, or both (filler,prose: trials in each)"),
    preset: Optional[str] = typer.Option(None, help="report: the sizes of the reported figures (>=30 trials per "
                                                    "cell, 20 documents per task, 32k scored tokens); flags given "
                                                    "after it override its sizes"),
    seeds: Optional[int] = typer.Option(None, help="pass keys per (length, depth, haystack)"),
    ppl_docs: Optional[int] = typer.Option(None, "--ppl-docs", help="perplexity windows, cut one after another from the text set"),
    texts: str = typer.Option("reporting", help="real-text set for prose and perplexity: reporting or tuning "
                                                "(disjoint; settings are chosen on tuning)"),
    estimate_only: bool = typer.Option(False, "--estimate-only", help="calibrate, print the estimated time, exit"),
    lengths: Optional[str] = typer.Option(None, help="pass-key contexts (and speed histories unless --histories), e.g. 2k,4k,8k"),
    histories: Optional[str] = typer.Option(None, help="speed suite's history lengths, e.g. 1k,2k,4k"),
    task_length: Optional[str] = typer.Option(None, help="context of the needle / variable-tracking / multi-turn tasks"),
    ppl_tokens: Optional[str] = typer.Option(None, help="tokens of real text for perplexity (scored: the second half)"),
    chat_tokens: Optional[str] = typer.Option(None, help="length of the memory suite's chat"),
    depths: Optional[str] = typer.Option(None, help="pass-key needle depths, e.g. 0,0.25,0.5,0.75,1"),
    samples: Optional[int] = typer.Option(None, help="documents per needle / variable-tracking / multi-turn task"),
    cache_type: str = CacheOpt,
    threads: Optional[int] = ThreadsOpt,
    n_gpu_layers: Optional[int] = GpuOpt,
    seed: int = SeedOpt,
    rpc: Optional[str] = RpcOpt,
    from_results: Optional[Path] = typer.Option(None, "--from-results",
                                                help="only re-write report.md and the plots from this results.json"),
) -> None:
    """Measure quality, speed and memory under each budget and policy; write results.json, report.md and plots."""
    from .bench.options import BenchError, from_flags

    _check_cache_type(cache_type)
    try:
        o = from_flags(
            out=str(out), suite=suite, policies=policy_list, budgets=budgets, modes=modes, texts=texts,
            cache_type=cache_type, threads=threads, n_gpu_layers=n_gpu_layers, seed=seed, rpc=_rpc_endpoints(rpc),
            command="ea-local bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
            preset=preset, haystack=haystack, quick=quick, lengths=lengths, histories=histories,
            task_length=task_length, ppl_tokens=ppl_tokens, chat_tokens=chat_tokens, depths=depths,
            samples=samples, seeds=seeds, ppl_docs=ppl_docs)
    except BenchError as e:
        _fail(str(e))
    if from_results is not None:
        _bench_report_only(from_results, out)
        return
    runs = _bench_models(model, out)  # every model checked before the first is measured
    from dataclasses import replace

    from .bench.options import fit_context
    from .model.info import read_model_info

    given = {flag for flag, val in (("--lengths", lengths), ("--histories", histories), ("--task-length", task_length),
                                    ("--ppl-tokens", ppl_tokens), ("--chat-tokens", chat_tokens)) if val}
    sized = []
    for path, folder in runs:
        try:
            om, note = fit_context(replace(o, model=path, out=str(folder)), read_model_info(path).n_ctx_train,
                                   Path(path).name, given)
        except BenchError as e:
            _fail(str(e))
        if note:
            typer.echo(note, err=True)
        sized.append(om)
    if estimate_only:
        from .bench.run import print_estimate

        print_estimate(sized[0])
        return
    from .bench.run import run_bench
    from .engine.runtime import LlamaError
    from .engine.session import BudgetError

    for om in sized:
        path, folder = om.model, om.out
        try:
            run_bench(om)
        except (BudgetError, LlamaError, OSError, ValueError) as e:
            _fail(f"{Path(path).name}: {e}" if len(runs) > 1 else str(e))
        typer.echo(f"wrote {folder}/results.json, {folder}/report.md and plots")


def _bench_models(model: Optional[str], out: Path) -> list[tuple[str, Path]]:
    """(model path, output folder) per model of --model: one model writes into --out, a list into --out/NAME."""
    names = [model] if not model or Path(model).exists() else [m.strip() for m in model.split(",")]
    if any(not n for n in names) or len(set(names)) != len(names):
        _fail(f"--model: a comma list of distinct models, got {model!r}")
    paths = [str(_model_info(Path(n) if n else None).path) for n in names]
    if len(paths) == 1:
        return [(paths[0], out)]
    folders = [Path(n).stem if n.lower().endswith(".gguf") else Path(n).name for n in names]
    if len(set(folders)) != len(folders):
        _fail(f"--model: two models would share the folder name ({', '.join(folders)})")
    return [(p, out / f) for p, f in zip(paths, folders)]


def _bench_report_only(results: Path, out: Path) -> None:
    import json

    from .bench.run import write_outputs

    try:
        res = json.loads(results.read_text())
    except (OSError, ValueError) as e:
        _fail(f"cannot read {results}: {e}")
    out.mkdir(parents=True, exist_ok=True)
    write_outputs(res, out)
    typer.echo(f"wrote {out}/report.md and plots")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
