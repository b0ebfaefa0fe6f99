"""The bench's real text (ea_local/bench/corpus.py): named tuning and reporting sets that share no
text, read at run time from Debian's packages and Python's docstrings."""
from __future__ import annotations

import re

import pytest

from ea_local.bench import corpus


def _shingles(text: str, k: int = 12) -> set[tuple[str, ...]]:
    w = re.findall(r"[a-z0-9]+", text.lower())
    return {tuple(w[i:i + k]) for i in range(len(w) - k + 1)}


def test_tuning_and_reporting_sets_are_disjoint():
    rep, tun = corpus.documents("reporting"), corpus.documents("tuning")
    assert {s.name for s in corpus.REPORTING}.isdisjoint(s.name for s in corpus.TUNING)
    assert len(rep) >= 8 and len(tun) >= 8  # several documents each on a Debian 12 machine with Python
    assert {d.kind if hasattr(d, "kind") else d.name.split(":")[0] for d in rep} >= {"license", "perl", "python"}
    # no shared paragraph of prose, and no shared run of 30 words anywhere (boilerplate lines such as
    # "This library is free software" are shorter than that)
    rp = {" ".join(p.split()).lower() for d in rep for p in re.split(r"\n\s*\n", d.text) if len(p.split()) >= 20}
    tp = {" ".join(p.split()).lower() for d in tun for p in re.split(r"\n\s*\n", d.text) if len(p.split()) >= 20}
    assert not rp & tp
    rs = set().union(*(_shingles(d.text, 30) for d in rep))
    ts = set().union(*(_shingles(d.text, 30) for d in tun))
    assert not rs & ts


def test_gfdl_loses_the_paragraphs_it_shares_with_gpl3():
    """GFDL-1.3 quotes GPL-3's termination paragraphs; the tuning copy drops them, the file keeps them."""
    raw = corpus.read_source(corpus.Source("license:GFDL-1.3"))
    tuned = next(d for d in corpus.documents("tuning") if d.name == "license:GFDL-1.3")
    gpl = corpus.documents("reporting")[0]
    assert gpl.name == "license:GPL-3"
    shared = _shingles(raw, 30) & _shingles(gpl.text, 30)
    assert shared  # the raw files do overlap
    assert not _shingles(tuned.text, 30) & _shingles(gpl.text, 30)
    assert len(tuned.text) > 0.8 * len(raw)  # only the shared paragraphs went


def test_documents_are_real_text_of_their_sources():
    docs = {d.name: d for d in corpus.documents("reporting")}
    tpj = docs["perl:Locale/Maketext/TPJ13.pod"].text
    assert "Localization and Perl: gettext breaks, Maketext fixes" in tpj
    assert not re.search(r"^=(head|over|item|back|cut)", tpj, re.M)  # POD commands are gone
    assert "I<" not in tpj and "C<" not in tpj
    arg = docs["python:argparse"].text
    assert arg.startswith("Command-line parsing library")
    assert "ArgumentParser:" in arg  # the class docstrings follow the module's
    assert len(corpus.text("reporting").split()) > 40000  # far more than the two GPL files (8.6k words)


def test_pod_to_text_known_answer():
    pod = ("package Foo;\nsub x { 1 }\n\n=head1 NAME\n\nFoo - a B<bold> C<code> L<link text|Some::Module> "
           "E<lt>tagE<gt> X<index>thing\n\n=over 4\n\n=item * first\n\nItem body.\n\n=back\n\n"
           "  verbatim code\n  line 2\n\n=begin html\n\n<p>skip</p>\n\n=end html\n\n=cut\n\nmore_perl();\n")
    assert corpus.pod_to_text(pod) == ("NAME\n\nFoo - a bold code link text <tag> thing\n\nfirst\n\nItem body.\n\n"
                                       "  verbatim code\n  line 2")


def test_paragraph_rotation_and_errors():
    first = corpus.paragraphs("reporting", start=0)
    third = corpus.paragraphs("reporting", start=2)
    assert first[0] != third[0] and sorted(first) == sorted(third)  # same paragraphs, another first document
    assert all(len(p.split()) >= 20 for p in first)
    with pytest.raises(ValueError, match="unknown text set"):
        corpus.documents("nope")
    with pytest.raises(ValueError, match="unknown text source"):
        corpus.read_source(corpus.Source("web:example"))
    d = corpus.describe("tuning")
    assert d["set"] == "tuning" and all(len(x["sha256"]) == 12 for x in d["documents"])
