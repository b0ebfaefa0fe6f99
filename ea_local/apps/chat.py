"""`ea-local chat`: a REPL over one Session, kept inside the KV budget.

The conversation is fed incrementally: each turn only the new text (end of the previous
answer's turn, the user's message, the generation prompt) is prefilled; the Session evicts
cells when the budget is exceeded, so the chat never stops with "context full". The system
prompt is read with the first message (a --file document opens that message), so a conversation
meets the same chunks and compressions here as through `ea-local serve`.

Interactive (stdin is a terminal): readline editing and history, a line ending with a
backslash continues on the next line, Ctrl-C stops a generation (or clears the line), Ctrl-D
exits. Piped: each line is one user turn (backslash continuation too), answers on stdout,
notices and stats on stderr.
"""
from __future__ import annotations

import os
import secrets
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, TextIO

from ..engine.runtime import LlamaError
from ..engine.sampling import CHAT_TEMPERATURE, SamplingParams
from ..engine import snapshot
from ..engine.question import chat_question_text, question_cap, question_length
from ..engine.archive import parse_size
from ..engine.session import BudgetError, Session, SessionConfig, conversation_protection
from ..model.chat_template import TemplateError, TurnRenderer, resolve_template
from ..policies import get_policy

HELP = """commands:
  /stats          cells used / budget, evictions, tokens seen, KV memory, last compression, protected cells
  /policy NAME    switch the eviction policy (see `ea-local policies`)
  /budget N       change the KV budget (a larger one moves the conversation, archive included, to a larger context)
  /reset          forget the conversation (the system prompt and --file are read again with the next message)
  /save FILE      save the conversation with its compressed cache
  /load FILE      continue a conversation saved with /save (same model)
  /help           this list
  //text          send a message that starts with '/'
input: a line ending with '\\' continues on the next line; Ctrl-C stops an answer; Ctrl-D exits"""


class ChatError(ValueError):
    """Bad input the user can fix (one line, exit 2)."""


@dataclass
class ChatOptions:
    budget: int = 2048
    policy: str = "expected-attention"
    cache_type: str = "f16"
    n_gpu_layers: int | None = None
    threads: int | None = None
    seed: int | None = None  # None: a random sampling seed, as llama.cpp
    max_tokens: int = 512
    temperature: float = CHAT_TEMPERATURE  # llama.cpp's sampling defaults; 0: greedy
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    system: str | None = None
    file: str | None = None
    chunk: int | None = None  # None: min(512, budget // 2)
    rpc: tuple[str, ...] = ()  # llama.cpp RPC servers (HOST:PORT)
    question_agnostic: bool = False  # True: the user's message does not steer compression (docs/query_aware.md)
    recall: bool = True  # evicted cells archived on the host, recalled when a message needs them (docs/recall.md)
    archive: str = "64MiB"  # the archive's bound: tokens ("4096") or bytes ("64MiB")

    def sampling(self, seed: int) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              repeat_penalty=self.repeat_penalty, repeat_last_n=self.repeat_last_n, seed=seed)


def read_text_file(path: str) -> str:
    """A UTF-8 text file, or ChatError for a missing, binary or empty one. '-' reads stdin."""
    if path == "-":
        data = sys.stdin.buffer.read()
        name = "standard input"
    else:
        p = Path(path)
        if not p.exists():
            raise ChatError(f"{path}: no such file")
        if p.is_dir():
            raise ChatError(f"{path}: is a directory")
        try:
            data = p.read_bytes()
        except OSError as e:
            raise ChatError(f"{path}: {e.strerror or e}") from e
        name = path
    if b"\x00" in data[:65536]:
        raise ChatError(f"{name}: looks like a binary file (NUL bytes), expected text or markdown")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ChatError(f"{name}: not UTF-8 text (byte {e.start})") from e
    if not text.strip():
        raise ChatError(f"{name}: is empty")
    return text


def valid_utf8(text: str) -> str:
    """Command-line text whose bytes were not UTF-8 (Python keeps them as surrogates) with U+FFFD instead."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def session_config(opts: ChatOptions) -> SessionConfig:
    if opts.max_tokens < 1:
        raise ChatError(f"max-tokens must be at least 1, got {opts.max_tokens}")
    try:
        opts.sampling(0).validate()
    except ValueError as e:
        raise ChatError(str(e)) from None
    chunk = opts.chunk if opts.chunk is not None else max(1, min(512, opts.budget // 2))
    try:
        a_tokens, a_bytes = parse_size(opts.archive)
    except ValueError as e:
        raise ChatError(str(e)) from None
    k = conversation_protection(opts.budget)
    return SessionConfig(budget=opts.budget, policy=opts.policy, cache_type=opts.cache_type, seed=opts.seed or 0,
                         n_threads=opts.threads, n_gpu_layers=opts.n_gpu_layers, chunk=chunk,
                         rpc=tuple(opts.rpc), recall=opts.recall, archive_tokens=a_tokens, archive_bytes=a_bytes,
                         n_sink=k, recent=k, guard_question=True,
                         **({"question_weight": 0.0} if opts.question_agnostic else {}))


def fmt_mib(b: float) -> str:
    return f"{b / 2**20:.1f} MiB"


def recall_line(s: Session) -> str:
    """/stats: the archive and what came back from it."""
    a = s.archive
    if a is None:
        return "recall      off"
    st = s.stats
    return (f"recall      archive {len(a)} tokens, {fmt_mib(a.nbytes)} ({a.dropped} dropped); "
            f"{st.recalls} recalls, {st.recalled} cells recalled, {1000 * st.recall_s:.0f} ms")


class _Stopped(Exception):
    pass


def _stop_if(should_stop: Callable[[], bool] | None) -> None:
    if should_stop and should_stop():
        raise _Stopped


class Chat:
    """A conversation: template rendering, incremental feeding, budget/policy changes, stats."""

    def __init__(self, info, opts: ChatOptions, document: str | None = None):
        self.info = info
        self.opts = opts
        cfg = session_config(opts)
        cfg.validate()
        get_policy(opts.policy)  # unknown policy: ValueError before the model loads
        self.s = Session(str(info.path), cfg)
        self.template, self.notice = resolve_template(info, self.s.rt)
        self.system = valid_utf8(opts.system or "") or None
        # a --file document opens the first user message, as a pasted one does: small instruct models
        # answer from their user turn, not from a document in the system prompt
        name = Path(opts.file).name if opts.file and opts.file != "-" else "document"
        self.attachment = None if document is None else f"Document ({name}):\n\n{document.strip()}"
        self.turns = TurnRenderer(self.template, self.system)
        self.opening: str | None = None  # the system prompt's text, read with the first message
        self.turn_count = 0
        self.last_turn: dict = {}
        self.seed = opts.seed if opts.seed is not None else secrets.randbits(31)

    # ---- feeding ----
    def tokens(self, text: str, first: bool = False) -> list[int]:
        rt = self.s.rt
        return rt.prompt_tokens(text) if first else rt.tokenize(text, add_bos=False, special=True)

    def start(self) -> int:
        """Take what precedes the first user message (BOS, system prompt); returns its tokens. It is read
        with the first message, as the server reads a request: the same conversation meets the same
        chunks and compressions through both."""
        self.opening = self.turns.prefix()
        return len(self.tokens(self.opening, first=True))

    def attachment_tokens(self) -> int:
        return len(self.tokens(self.attachment)) if self.attachment else 0

    def _content(self, text: str) -> str:
        """The first user message carries the attached document before the user's words."""
        if self.attachment and not any(m["role"] == "user" for m in self.turns.messages):
            return f"{self.attachment}\n\n{text}"
        return text

    def feed_opening(self) -> None:
        if self.opening is not None:
            toks = self.tokens(self.opening, first=True)
            if toks:
                self.s.prefill(toks)
            self.opening = None

    def ask(self, text: str, should_stop: Callable[[], bool] | None = None,
            progress: Callable[[int, int], None] | None = None) -> Iterator[str]:
        """Stream the answer to one user message; the (possibly partial) answer joins the history.
        progress(done, total) follows the reading of the prompt."""
        content = self._content(text)
        tail = self.turns.split()[1]  # the end of the user turn; before turn(), whose rendering add() keeps
        # tokenized as one text, as the server tokenizes a request: a prefix ending in a space ("User: ")
        # would otherwise end in a token of its own
        rendered = (self.opening or "") + self.turns.turn(content)
        prompt = self.tokens(rendered, first=self.opening is not None)
        self.opening = None
        params = self.opts.sampling((self.seed + self.turn_count) & 0x7FFFFFFF)
        pieces: list[str] = []
        t0 = time.perf_counter()
        n0 = self.s.stats.tokens_seen
        t_first = None
        started = False
        try:
            # the prompt is fed here, not by generate(), so that Ctrl-C also stops a long prefill between chunks;
            # a message that fits the budget is the user's turn: its queries steer compression. One that does
            # not (a pasted document, or any message once a long chat fills the cache) is compressed while or
            # once it is read: its question is probed at each compression, as the server probes a request's
            # (engine/question.py: the same tokens, the same cap), and the message is read as context (its
            # queries the statistics, the probe's the focus); question-agnostic, it is context and no probe
            agnostic = self.s.cfg.question_weight == 0
            question: list[int] = []
            if not agnostic and self.s.evicts_reading(len(prompt)):
                cap = question_cap(self.s.cfg)
                q = chat_question_text(rendered, [{"role": "user", "content": content}], self.s.rt.count, cap)
                n = question_length(q, len(prompt), self.s.rt.count, cap)
                question = prompt[len(prompt) - n:] if n else []
                if question and self.s.policy.needs_queries:
                    self.s.set_question(question)
            start = self.s.next_pos
            try:
                self.s.prefill(prompt, progress=lambda d, t: (_stop_if(should_stop), progress and progress(d, t)),
                               turn=not (question or agnostic))
            except _Stopped:  # what was read stays, as with any message stopped while it is read
                return
            if self.s.recall_on:  # the message is in: bring back what it (its question, when known) needs,
                # asked by the user's text, not by the template's end of turn and assistant header after it
                n_tail = self.s.rt.count(tail)
                self.s.recall_message(start, question, until=self.s.next_pos - n_tail)
            for piece in self.s.generate([], params, stop=list(self.template.stop), max_tokens=self.opts.max_tokens,
                                         should_stop=should_stop):
                if t_first is None:
                    t_first = time.perf_counter()
                if not started:  # answers often open with a newline or a space
                    piece = piece.lstrip()
                    if not piece:
                        continue
                    started = True
                pieces.append(piece)
                yield piece
        finally:
            self._drop_stop_string(self.s.stats.tokens_seen - n0 - len(prompt))
            if self.s.question:
                self.s.set_question(None)
            answer = "".join(pieces).rstrip()
            self.turns.add("user", content)
            self.turns.add("assistant", answer)
            self.turn_count += 1
            t1 = time.perf_counter()
            n_gen = self.s.stats.tokens_seen - n0 - len(prompt)
            dt = t1 - (t_first or t1)
            self.last_turn = {"prompt": len(prompt), "generated": max(0, n_gen),
                              "tok_s": n_gen / dt if dt > 0 and n_gen > 0 else 0.0, "seconds": t1 - t0}

    def _drop_stop_string(self, n_generated: int) -> None:
        """A generation that ended on a stop string (a base model writing the next "\nUser:" line) has fed it:
        forget the cells from the token where it starts, so the next turn's text follows the answer once."""
        if not self.template.stop or n_generated <= 0 or not self.s.live:
            return
        positions = sorted(self.s.live)[-min(16, n_generated):]
        pieces = [self.s.rt.token_bytes(self.s.live[p]) for p in positions]
        text = b"".join(pieces)
        at = max((text.rfind(st.encode()) for st in self.template.stop), default=-1)
        if at < 0:
            return
        end = 0
        for pos, piece in zip(positions, pieces):
            end += len(piece)
            if end > at:
                self.s.truncate(pos)
                return

    # ---- commands ----
    def stats_lines(self) -> list[str]:
        s = self.s
        ev = s.stats.evictions
        full = s.kv_bytes(max(s.stats.tokens_seen, s.n_cells))
        lines = [
            f"cells       {s.n_cells} / {s.cfg.budget} budget",
            f"evictions   {len(ev)} events, {sum(e.n_evicted for e in ev)} cells evicted",
            f"tokens      {s.stats.tokens_seen} seen, {self.turn_count} turns",
            f"KV memory   {fmt_mib(s.kv_bytes())} now, {fmt_mib(full)} with the full cache",
        ]
        if ev:
            e = ev[-1]
            lines.append(f"last compression  {1000 * (e.score_s + e.evict_s):.0f} ms "
                         f"({e.phase}, {e.n_evicted} cells at token {e.at_token})")
        else:
            lines.append("last compression  none yet")
        lines.append(f"policy      {s.cfg.policy}, KV cache {s.cfg.cache_type}")
        lines.append(f"protected   the first {s.cfg.n_sink} and the newest {s.cfg.recent} positions")
        lines.append(recall_line(s))
        return lines

    def turn_line(self) -> str:
        t = self.last_turn
        s = self.s
        return (f"[turn {self.turn_count}: {t.get('prompt', 0)} prompt + {t.get('generated', 0)} generated tokens, "
                f"{t.get('tok_s', 0.0):.1f} tok/s | cells {s.n_cells}/{s.cfg.budget} | "
                f"{len(s.stats.evictions)} evictions, {sum(e.n_evicted for e in s.stats.evictions)} cells]")

    def set_policy(self, name: str) -> str:
        self.s.set_policy(name)  # ValueError for an unknown name
        return f"policy: {name} (from the next compression on)"

    def set_budget(self, n: int) -> str:
        s = self.s
        k = conversation_protection(n)
        cfg = replace(s.cfg, budget=n, n_sink=k, recent=k, policy_options=dict(s.cfg.policy_options))
        cfg.validate()
        if n <= s.cfg.budget:  # the context (budget + chunk cells) already has room
            evicted = s.set_budget(n, protect=k)
            return f"budget: {n} cells (same session; {evicted} cells evicted now)"
        # a larger context: the conversation moves through a session file, so the cells keep their
        # positions and the statistics, focus and archive of evicted cells (recall) come along
        with tempfile.TemporaryDirectory(prefix="ea-local-budget-") as tmp:
            path = os.path.join(tmp, "session.eal")
            snapshot.save(s, path)
            snap = snapshot.read(path, str(self.info.path))
        snap.config.update(budget=n, n_sink=k, recent=k)
        new = self._session_from(snap, cfg)
        s.close()
        self.s = new
        return f"budget: {n} cells — a larger context took the {new.n_cells} cells and the archive as they were"

    def _session_from(self, snap: snapshot.Snapshot, cfg: SessionConfig) -> Session:
        """A new session of the snapshot's geometry (cfg for the rest) holding the snapshot; the current
        one is untouched, so on any error the conversation goes on as it was."""
        new = Session(str(self.info.path), snapshot.session_config(snap, cfg))
        try:
            snapshot.restore(new, snap)
        except Exception:
            new.close()
            raise
        return new

    def reset(self) -> str:
        self.s.reset()
        self.turns = TurnRenderer(self.template, self.system)
        self.turn_count = 0
        self.start()
        what = "the system prompt and the document are" if self.attachment else "the system prompt is"
        return f"conversation reset ({what} read again with the next message)"

    def save(self, path: str) -> str:
        self.feed_opening()  # a saved conversation holds its system prompt
        extra = {"messages": self.turns.messages, "system": self.system, "turn_count": self.turn_count,
                 "seed": self.seed, "attachment": self.attachment}
        n = snapshot.save(self.s, path, extra)
        return f"saved {self.turn_count} turns, {self.s.n_cells} cells to {path} ({fmt_mib(n)})"

    def load(self, path: str) -> str:
        """Continue a saved conversation; on any error the current one is kept as it was."""
        snap = snapshot.read(path, str(self.info.path))
        extra = snap.extra
        try:
            messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in extra["messages"]]
            turn_count, system = int(extra["turn_count"]), extra["system"]
        except (KeyError, TypeError, ValueError):
            raise ChatError(f"{path}: not a chat session (no conversation in it)") from None
        if snapshot.fits(self.s, snap):
            snapshot.restore(self.s, snap)
        else:  # other budget, chunk or cache type: a context of the saved geometry
            new = self._session_from(snap, self.s.cfg)
            self.s.close()
            self.s = new
        self.system = system
        attachment = extra.get("attachment")
        self.attachment = attachment if isinstance(attachment, str) else None
        self.turns = TurnRenderer(self.template, None)
        self.turns.messages = messages
        self.opening = None
        self.turn_count = turn_count
        if self.opts.seed is None and isinstance(extra.get("seed"), int):  # sample on as the saved chat would have
            self.seed = extra["seed"]
        s = self.s
        return (f"loaded {turn_count} turns, {s.n_cells} cells ({s.stats.tokens_seen} tokens seen) from {path}; "
                f"budget {s.cfg.budget}, policy {s.cfg.policy}")

    def close(self) -> None:
        self.s.close()


# ---- the REPL ----

class _Interrupt:
    """SIGINT sets a flag while an answer streams; Session.generate polls it."""

    def __init__(self):
        self.hit = False
        self._old = None

    def __enter__(self):
        self.hit = False
        self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):  # noqa: ANN001
        self.hit = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._old)
        return False


def _setup_readline() -> None:
    try:
        import readline
    except ImportError:  # pragma: no cover - not on every platform
        return
    hist = Path(os.environ.get("EA_LOCAL_HISTORY", Path.home() / ".cache" / "ea_local" / "chat_history"))
    try:
        hist.parent.mkdir(parents=True, exist_ok=True)
        if hist.exists():
            readline.read_history_file(str(hist))
        readline.set_history_length(1000)
        import atexit
        atexit.register(lambda: _save_history(readline, hist))
    except OSError:
        pass


def _save_history(readline, hist: Path) -> None:  # noqa: ANN001
    try:
        readline.write_history_file(str(hist))
    except OSError:
        pass


def read_message(interactive: bool, stdin: TextIO) -> str:
    """One user message; backslash at the end of a line continues it. EOFError at the end of input."""
    lines: list[str] = []
    while True:
        if interactive:
            line = input(">>> " if not lines else "... ")
        else:
            line = stdin.readline()
            if not line:
                if lines:
                    break
                raise EOFError
            line = line.rstrip("\r\n")
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        lines.append(line)
        break
    return "\n".join(lines)


def run_repl(chat: Chat, interactive: bool, verbose: bool = False, stdin: TextIO | None = None,
             out: TextIO | None = None, err: TextIO | None = None) -> None:
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    err = err or sys.stderr
    info_out = out if interactive else err  # stats and command replies: the terminal, or stderr when piped
    if interactive:
        _setup_readline()

    def say(msg: str) -> None:
        print(msg, file=info_out, flush=True)

    while True:
        try:
            text = read_message(interactive, stdin)
        except EOFError:
            if interactive:
                print(file=out)
            break
        except KeyboardInterrupt:
            print("^C" if interactive else "", file=out)
            continue
        msg = text.strip()
        if not msg:
            continue
        if msg.startswith("/") and not msg.startswith("//"):
            cmd, _, arg = msg[1:].partition(" ")
            arg = arg.strip()
            try:
                if cmd in ("help", "?"):
                    say(HELP)
                elif cmd == "stats":
                    say("\n".join(chat.stats_lines()))
                elif cmd == "policy":
                    if not arg:
                        say(f"policy: {chat.s.cfg.policy}; usage: /policy NAME")
                    else:
                        say(chat.set_policy(arg))
                elif cmd == "budget":
                    if not arg:
                        say(f"budget: {chat.s.cfg.budget} cells; usage: /budget N")
                    else:
                        try:
                            n = int(arg)
                        except ValueError:
                            raise ChatError(f"/budget needs a whole number of cells, got {arg!r}") from None
                        say(chat.set_budget(n))
                elif cmd == "reset":
                    say(chat.reset())
                elif cmd in ("save", "load"):
                    if not arg:
                        say(f"usage: /{cmd} FILE")
                    else:
                        say(chat.save(arg) if cmd == "save" else chat.load(arg))
                elif cmd in ("quit", "exit"):
                    break
                else:
                    say(f"unknown command /{cmd}; /help lists them")
            except (ValueError, LlamaError) as e:  # BudgetError, ChatError, unknown policy
                say(f"error: {e}")
            continue
        if msg.startswith("//"):
            msg = msg[1:]
        _answer(chat, msg, interactive, out, err, verbose)


class _ReadingBar:
    """A transient progress bar on a terminal while a prompt of more than one chunk is read (a pasted
    document, or the first message with --file's)."""

    def __init__(self, chat: Chat, err: TextIO):
        from rich.console import Console

        self.chat, self.console, self.bar, self.task = chat, Console(file=err), None, None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            if done >= total or total <= self.chat.s.cfg.chunk or not self.console.is_terminal:
                return
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("reading"), BarColumn(), TextColumn("{task.completed}/{task.total} tokens"),
                                TextColumn("{task.fields[cells]} cells"), TimeElapsedColumn(), console=self.console,
                                transient=True)
            self.bar.start()
            self.task = self.bar.add_task("read", total=total, cells=0)
        self.bar.update(self.task, completed=done, total=total, cells=self.chat.s.n_cells)
        if done >= total:
            self.stop()

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _answer(chat: Chat, msg: str, interactive: bool, out: TextIO, err: TextIO, verbose: bool) -> None:
    wrote = False
    bar = _ReadingBar(chat, err)
    with _Interrupt() as intr:
        try:
            for piece in chat.ask(msg, should_stop=lambda: intr.hit, progress=bar):
                bar.stop()
                out.write(piece)
                out.flush()
                wrote = True
        except (LlamaError, BudgetError, TemplateError) as e:
            print(file=out)
            print(f"error: {e}", file=err, flush=True)
            return
        finally:
            bar.stop()
    if wrote or not interactive:
        print(file=out, flush=True)
    if intr.hit:
        print("[interrupted]", file=err if not interactive else out, flush=True)
    if verbose or not interactive:
        print(chat.turn_line(), file=err if not interactive else out, flush=True)


def banner(chat: Chat) -> list[str]:
    info = chat.info
    s = chat.s
    lines = [f"ea-local chat: {info.architecture} {info.file_type or ''} ({Path(str(info.path)).name}), "
             f"budget {s.cfg.budget} cells, policy {s.cfg.policy}, KV cache {s.cfg.cache_type}"]
    if chat.notice:
        lines.append(chat.notice)
    return lines


def run_chat(info, opts: ChatOptions, verbose: bool = False) -> None:
    if opts.file == "-":
        raise ChatError("--file -: standard input carries the messages; give a file path")
    document = read_text_file(opts.file) if opts.file else None
    interactive = sys.stdin.isatty()
    # bytes that are not UTF-8 become U+FFFD instead of ending the session with a decode error
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")
    chat = Chat(info, opts, document)
    try:
        head = out = sys.stdout if interactive else sys.stderr
        for line in banner(chat):
            print(line, file=head, flush=True)
        chat.start()
        if document:
            print(f"{opts.file}: {chat.attachment_tokens()} tokens, read with your first message", file=out,
                  flush=True)
        if interactive:
            print("type a message; /help for commands, Ctrl-D to exit", flush=True)
        run_repl(chat, interactive, verbose=verbose)
        if not interactive:
            print("\n".join(chat.stats_lines()), file=sys.stderr, flush=True)
    finally:
        chat.close()
