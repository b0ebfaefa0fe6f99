"""`ea-local`: the command line.

llama_cpp is imported (through the engine) before numpy-heavy code: on CUDA builds the other
order was seen to crash at model load (DESIGN.md). Errors a user can fix are one line on stderr
and exit code 2, never a traceback.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Long contexts on local GGUF models inside a fixed KV budget (Expected Attention eviction).")

ModelOpt = typer.Option(None, "--model", "-m", help="GGUF file (default: the embedded Gemma 3 270M Q4_K_M)")
# the flags every command that runs a model shares
PolicyOpt = typer.Option("expected-attention", help="eviction policy (see `ea-local policies`)")
CacheOpt = typer.Option("f16", help="KV cache type: f16, q8_0 or q4_0")
GpuOpt = typer.Option(None, help="layers to offload to the GPU (default: EA_LOCAL_N_GPU_LAYERS or 0)")
ThreadsOpt = typer.Option(None, help="CPU threads (default: all cores)")
SeedOpt = typer.Option(0)
TempOpt = typer.Option(0.0, help="sampling temperature (0: greedy)")


class UserError(Exception):
    """Bad input: printed as one line, exit code 2."""


def _fail(msg: str, code: int = 2) -> None:
    typer.echo(f"ea-local: error: {msg}", err=True)
    raise typer.Exit(code)


def _model_info(model: Optional[Path]):
    from .model_info import ModelFileError, read_model_info
    from .models import resolve_model

    path = resolve_model(str(model) if model else None)
    try:
        return read_model_info(path)
    except ModelFileError as e:
        _fail(str(e))


@app.command()
def info(model: Optional[Path] = typer.Argument(None, help="GGUF file (default: the embedded model)")) -> None:
    """Architecture, attention geometry, RoPE, sliding window and KV bytes per token of a GGUF (no weights loaded)."""
    from .info_format import format_info

    typer.echo(format_info(_model_info(model)))


@app.command()
def policies() -> None:
    """List the eviction policies with a one-line description and their paper."""
    from .policies import POLICIES

    width = max(map(len, POLICIES))
    for p in POLICIES.values():
        typer.echo(f"{p.name:<{width}}  {p.description}\n{'':<{width}}  {p.paper}")


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
) -> None:
    """The main job: read a long document with a pass key in it through a small KV budget, then ask for the key."""
    from .demo import run_demo

    info = _model_info(model)
    try:
        run_demo(info, budget=budget, policy=policy, length=length, cache_type=cache_type, seed=seed,
                 threads=threads, n_gpu_layers=n_gpu_layers)
    except (UserError, ValueError) as e:
        _fail(str(e))


def _check_cache_type(cache_type: str) -> None:
    if cache_type not in ("f16", "q8_0", "q4_0"):
        _fail(f"unknown cache type {cache_type!r}; choose from f16, q8_0, q4_0")


@app.command()
def chat(
    model: Optional[Path] = ModelOpt,
    budget: int = typer.Option(2048, help="KV cells the conversation may occupy"),
    policy: str = PolicyOpt,
    cache_type: str = CacheOpt,
    n_gpu_layers: Optional[int] = GpuOpt,
    threads: Optional[int] = ThreadsOpt,
    seed: int = SeedOpt,
    max_tokens: int = typer.Option(512, help="most tokens per answer"),
    temperature: float = TempOpt,
    system: Optional[str] = typer.Option(None, "--system", help="system prompt"),
    file: Optional[str] = typer.Option(None, "--file", "-f", help="a text/markdown file to chat about (read through the budget first)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="a stats line after every answer"),
) -> None:
    """Chat in a REPL that streams answers and stays inside the KV budget (piped stdin: one turn per line)."""
    from .chat import ChatError, ChatOptions, run_chat
    from .chat_template import TemplateError
    from .engine.runtime import LlamaError

    _check_cache_type(cache_type)
    info = _model_info(model)
    opts = ChatOptions(budget=budget, policy=policy, cache_type=cache_type, n_gpu_layers=n_gpu_layers,
                       threads=threads, seed=seed, max_tokens=max_tokens, temperature=temperature,
                       system=system, file=file)
    try:
        run_chat(info, opts, verbose=verbose)
    except (UserError, ChatError, TemplateError, LlamaError, ValueError) as e:
        _fail(str(e))


@app.command()
def summarize(
    source: str = typer.Argument(..., metavar="FILE|-", help="text or markdown file; - reads standard input"),
    model: Optional[Path] = ModelOpt,
    output: Optional[str] = typer.Option(None, "--output", "-o", help="write the summary here (default: stdout)"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="instruction asked after the document"),
    budget: int = typer.Option(2048, help="KV cells the document may occupy"),
    policy: str = PolicyOpt,
    chunk: Optional[int] = typer.Option(None, help="prefill chunk in tokens (default: min(512, budget/2))"),
    cache_type: str = CacheOpt,
    n_gpu_layers: Optional[int] = GpuOpt,
    threads: Optional[int] = ThreadsOpt,
    seed: int = SeedOpt,
    max_tokens: int = typer.Option(512, help="most tokens of summary"),
    temperature: float = TempOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="a stats line on stderr at the end"),
) -> None:
    """Read a long document through the KV budget (chunked prefill + eviction), then stream a summary."""
    from .chat import ChatError
    from .chat_template import TemplateError
    from .engine.runtime import LlamaError
    from .summarize import SummarizeOptions, run_summarize

    _check_cache_type(cache_type)
    info = _model_info(model)
    opts = SummarizeOptions(budget=budget, policy=policy, cache_type=cache_type, n_gpu_layers=n_gpu_layers,
                            threads=threads, seed=seed, max_tokens=max_tokens, temperature=temperature,
                            chunk=chunk, prompt=prompt, output=output, verbose=verbose)
    try:
        run_summarize(info, source, opts)
    except (UserError, ChatError, TemplateError, LlamaError, ValueError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
