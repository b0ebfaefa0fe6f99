"""scripts/build_llama.py: cache key and patch application (no compiler needed)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("build_llama", Path(__file__).parent.parent / "scripts" / "build_llama.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


def _tree(tmp_path: Path, text: str) -> Path:
    src = tmp_path / "sdist"
    (src / "vendor" / "llama.cpp" / "src").mkdir(parents=True)
    (src / "vendor" / "llama.cpp" / "src" / "a.cpp").write_text(text)
    return src


PATCH = """--- a/src/a.cpp
+++ b/src/a.cpp
@@ -1,3 +1,3 @@
 one
-two
+TWO
 three
"""


def test_patch_applies(tmp_path):
    src = _tree(tmp_path, "one\ntwo\nthree\n")
    p = tmp_path / "x.patch"
    p.write_text(PATCH)
    build.apply_patches(src, [p])
    assert (src / "vendor/llama.cpp/src/a.cpp").read_text() == "one\nTWO\nthree\n"


def test_patch_that_does_not_apply_names_the_hunk(tmp_path):
    src = _tree(tmp_path, "one\nsomething else\nthree\n")
    p = tmp_path / "x.patch"
    p.write_text(PATCH)
    with pytest.raises(build.BuildError, match=r"x\.patch does not apply(.|\n)*Hunk #1 FAILED"):
        build.apply_patches(src, [p])
    assert (src / "vendor/llama.cpp/src/a.cpp").read_text() == "one\nsomething else\nthree\n"  # untouched


def test_real_patch_applies_to_pinned_sdist_layout():
    assert build.patches(), "patches/ must hold at least one patch"
    text = build.patches()[0].read_text()
    assert "include/llama-ea.h" in text and "llama_ea_api_version" in text


def test_cache_key_depends_on_backend_flags_and_patches(monkeypatch):
    k_cpu = build.build_key("cpu", build.COMMON_FLAGS)
    assert k_cpu == build.build_key("cpu", build.COMMON_FLAGS)
    assert k_cpu != build.build_key("cuda", build.COMMON_FLAGS + build.BACKEND_FLAGS["cuda"])
    assert k_cpu != build.build_key("cpu", build.COMMON_FLAGS + ["-DGGML_AVX512=OFF"])
    monkeypatch.setattr(build, "patch_hash", lambda: "different")
    assert k_cpu != build.build_key("cpu", build.COMMON_FLAGS)
