"""Real text for the bench, read at run time from what Debian and Python ship (nothing is copied
into the repository or downloaded): licences (base-files), Perl's POD manuals (perl-modules) and
the documentation strings of Python's standard library (the running interpreter).

The documents form two named, disjoint sets: TUNING (what settings are chosen on) and REPORTING
(what the reported figures are measured on). A paragraph of a tuning document that shares a run of
30 words with a reporting document is dropped from the tuning one (GFDL-1.3 quotes GPL-3's
termination paragraphs; zipfile's docstrings repeat tarfile's), so the two sets share no text.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

LICENSES = Path("/usr/share/common-licenses")
PERL = Path("/usr/share/perl/5.36.0")  # perl-modules-5.36 (Debian 12)


@dataclass(frozen=True)
class Source:
    name: str  # how the report names it, e.g. "license:GPL-3", "perl:Test/Tutorial.pod", "python:argparse"

    @property
    def kind(self) -> str:
        return self.name.split(":", 1)[0]

    @property
    def ref(self) -> str:
        return self.name.split(":", 1)[1]


REPORTING = [Source(n) for n in (
    "license:GPL-3", "license:GPL-2",
    "perl:Locale/Maketext/TPJ13.pod", "perl:Test/Tutorial.pod", "perl:IO/Compress/FAQ.pod",
    "perl:ExtUtils/MakeMaker/FAQ.pod", "perl:Encode/Supported.pod", "perl:Getopt/Long.pm", "perl:Memoize.pm",
    "python:argparse", "python:subprocess", "python:threading", "python:logging", "python:tarfile",
    "python:email.message", "python:unittest.case",
)]
TUNING = [Source(n) for n in (
    "license:GFDL-1.3", "license:MPL-2.0", "license:Apache-2.0", "license:Artistic", "license:CC0-1.0",
    "perl:Locale/Maketext.pod", "perl:Pod/Simple/Subclassing.pod", "perl:version/Internals.pod",
    "perl:Test2/Transition.pod", "perl:Net/libnetFAQ.pod", "perl:Benchmark.pm", "perl:File/Find.pm",
    "python:collections", "python:typing", "python:inspect", "python:zipfile", "python:pathlib", "python:difflib",
    "python:configparser", "python:dataclasses",
)]
SETS = {"reporting": REPORTING, "tuning": TUNING}


@dataclass(frozen=True)
class Document:
    name: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:12]


# ---- readers ----

_POD_CODE = re.compile(r"[IBCFSXZLE]<(?:<+\s(.*?)\s>+|([^<>]*))>", re.S)
_POD_ESC = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&"}


def _pod_inline(s: str) -> str:
    def repl(m: re.Match) -> str:
        code = m.group(0)[0]
        body = m.group(1) if m.group(1) is not None else m.group(2)
        if code == "E":
            return _POD_ESC.get(body, chr(int(body)) if body.isdigit() else "")
        if code in "XZ":  # index entries and null codes print nothing
            return ""
        if code == "L":  # L<text|target>: the text; L<target>: the target's name
            return body.split("|", 1)[0].strip('"')
        return body
    for _ in range(4):  # nested codes (B<C<x>>) unwrap from the inside out
        s2 = _POD_CODE.sub(repl, s)
        if s2 == s:
            break
        s = s2
    return s


def pod_to_text(pod: str) -> str:
    """Plain text of a POD document (perlpod): headings and items become lines, command paragraphs
    with no prose (=over, =back, =cut, =begin ... =end) are dropped, formatting codes unwrapped;
    code outside POD blocks (a .pm file's Perl) is skipped."""
    out: list[str] = []
    in_pod, skip = False, False
    for para in re.split(r"\n\s*\n", pod):
        first = para.lstrip("\n")
        if first.startswith("="):
            cmd, _, rest = first[1:].partition(" ")
            cmd = cmd.split("\n", 1)[0]
            in_pod = cmd != "cut"
            if cmd == "begin":
                skip = True
            elif cmd == "end":
                skip = False
            elif cmd.startswith("head") or cmd == "item":
                rest = " ".join(rest.split())
                if cmd == "item":  # a bullet ("=item *", "=item o") is no text
                    rest = re.sub(r"^[*o](\s+|$)", "", rest)
                if rest and not skip:
                    out.append(_pod_inline(rest))
            continue
        if not in_pod or skip:
            continue
        if para[:1] in (" ", "\t"):  # verbatim (code) paragraph: as is
            out.append(para.rstrip())
        else:
            out.append(_pod_inline(" ".join(para.split())))
    return "\n\n".join(p for p in out if p.strip())


def python_docs(module: str) -> str:
    """The documentation strings of a standard-library module, in definition order: the module's,
    then each public class (and its public methods) and function defined in it. Doctest lines
    (>>> and their output) are kept: they are what the documentation says."""
    with warnings.catch_warnings():  # typing's deprecated aliases warn when their docstrings are read
        warnings.simplefilter("ignore", DeprecationWarning)
        return _python_docs(importlib.import_module(module))


def _python_docs(mod) -> str:
    parts = [inspect.getdoc(mod) or ""]
    for name, obj in vars(mod).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            doc = inspect.getdoc(obj)
            if doc and not (inspect.isclass(obj) and doc == inspect.getdoc(type)):
                parts.append(f"{name}: {doc}")
            if inspect.isclass(obj):
                for mname, meth in vars(obj).items():
                    if mname.startswith("_") or not inspect.isfunction(meth):
                        continue
                    if d := inspect.getdoc(meth):
                        parts.append(f"{name}.{mname}: {d}")
    return "\n\n".join(p for p in parts if p.strip())


def read_source(src: Source) -> str:
    """The text of one source; FileNotFoundError / ImportError when this machine lacks it."""
    if src.kind == "license":
        return (LICENSES / src.ref).read_text()
    if src.kind == "perl":
        return pod_to_text((PERL / src.ref).read_text(errors="replace"))
    if src.kind == "python":
        return python_docs(src.ref)
    raise ValueError(f"unknown text source {src.name!r}")


def _paras(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


SHINGLE = 30  # words: longer than any licence boilerplate line two unrelated documents may share


def _shingles(text: str) -> set[tuple[str, ...]]:
    """Every run of SHINGLE words (lower case, punctuation ignored): two texts share text iff they
    share one, whatever their paragraphs' layout."""
    w = re.findall(r"[a-z0-9]+", text.lower())
    return {tuple(w[i:i + SHINGLE]) for i in range(len(w) - SHINGLE + 1)}


@functools.lru_cache(maxsize=None)
def documents(which: str = "reporting") -> tuple[Document, ...]:
    """The documents of a named set that this machine has (in the set's order), tuning documents
    stripped of any paragraph that shares a run of 30 words with a reporting document. Missing sources are left out (see
    missing()); the bench names the documents it used in its report."""
    if which not in SETS:
        raise ValueError(f"unknown text set {which!r}; choose from: {', '.join(SETS)}")
    docs = []
    for src in SETS[which]:
        try:
            text = read_source(src)
        except (OSError, ImportError):
            continue
        docs.append(Document(src.name, text))
    if which == "tuning":
        seen = set().union(*(_shingles(d.text) for d in documents("reporting")))
        docs = [Document(d.name, "\n\n".join(p for p in _paras(d.text) if not _shingles(p) & seen)) for d in docs]
    return tuple(d for d in docs if d.text.strip())


def missing(which: str = "reporting") -> list[str]:
    have = {d.name for d in documents(which)}
    return [s.name for s in SETS[which] if s.name not in have]


def describe(which: str) -> dict:
    """What a results.json records about a text set: names, characters, content hashes, and the
    Python whose docstrings were read (they change between Python versions)."""
    return {"set": which, "documents": [{"name": d.name, "chars": len(d.text), "sha256": d.sha256}
                                        for d in documents(which)],
            "missing": missing(which), "python": sys.version.split()[0]}


def paragraphs(which: str = "reporting", min_words: int = 20, start: int = 0) -> list[str]:
    """Prose paragraphs (at least min_words words, whitespace collapsed) of a set, beginning with
    document `start` (mod the number of documents) and wrapping around: different samples hide
    their needles in different documents."""
    docs = documents(which)
    if not docs:
        raise FileNotFoundError(f"no {which} text on this machine: {', '.join(missing(which))} missing")
    order = docs[start % len(docs):] + docs[:start % len(docs)]
    return [" ".join(p.split()) for d in order for p in _paras(d.text) if len(p.split()) >= min_words]


def text(which: str = "reporting", start: int = 0) -> str:
    """All documents of a set, beginning with document `start` (mod the count)."""
    docs = documents(which)
    if not docs:
        raise FileNotFoundError(f"no {which} text on this machine: {', '.join(missing(which))} missing")
    order = docs[start % len(docs):] + docs[:start % len(docs)]
    return "\n\n".join(d.text for d in order)
