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


def test_rpc_flags_are_in_the_key_and_default_on():
    assert build.build_key("cpu", build.COMMON_FLAGS + build.RPC_FLAGS) != build.build_key("cpu", build.COMMON_FLAGS)
    assert "-DGGML_RPC=ON" in build.RPC_FLAGS and "-DGGML_RPC_RDMA=OFF" in build.RPC_FLAGS


def test_rpc_server_is_added_to_the_wheel_with_a_record_line(tmp_path, monkeypatch):
    """add_rpc_server with a stand-in compiler: the wheel gains llama_cpp/lib/ggml-rpc-server (executable)
    and a RECORD line whose hash matches, the other entries untouched."""
    import base64
    import hashlib
    import stat
    import zipfile

    src = tmp_path / "src"
    (src / "vendor/llama.cpp/tools/rpc").mkdir(parents=True)
    (src / "vendor/llama.cpp/tools/rpc/rpc-server.cpp").write_text("int main(){}")
    (src / "vendor/llama.cpp/ggml/include").mkdir(parents=True)
    cxx = tmp_path / "fake-cxx"
    cxx.write_text('#!/bin/sh\nwhile [ "$1" != "-o" ]; do shift; done\nprintf "ELF-ish server" > "$2"\n')
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    whl = tmp_path / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
    rec = "llama_cpp_python-0.3.36.dist-info/RECORD"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("llama_cpp/__init__.py", "x")
        z.writestr("llama_cpp/lib/libggml.so.0", "lib")
        z.writestr("llama_cpp/lib/libggml-rpc.so.0", "lib")
        z.writestr(rec, "llama_cpp/__init__.py,sha256=abc,1\n" + rec + ",,\n")
    build.add_rpc_server(src, whl, tmp_path / "work")
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        data = z.read("llama_cpp/lib/ggml-rpc-server")
        mode = z.getinfo("llama_cpp/lib/ggml-rpc-server").external_attr >> 16
        lines = z.read(rec).decode().splitlines()
    assert data == b"ELF-ish server" and mode & stat.S_IXUSR
    assert "llama_cpp/__init__.py" in names and names.count("llama_cpp/lib/ggml-rpc-server") == 1
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    assert f"llama_cpp/lib/ggml-rpc-server,sha256={digest},{len(data)}" in lines
    assert lines[0] == "llama_cpp/__init__.py,sha256=abc,1" and lines[-1] == rec + ",,"


def test_rpc_server_needs_the_rpc_library_in_the_wheel(tmp_path):
    import zipfile

    whl = tmp_path / "w.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("llama_cpp/lib/libggml.so.0", "lib")
        z.writestr("x.dist-info/RECORD", "")
    with pytest.raises(build.BuildError, match="no libggml-rpc"):
        build.add_rpc_server(tmp_path, whl, tmp_path / "work")


def test_cpu_flag_choice_is_in_the_cache_key(tmp_path):
    auto = build.plan("cpu", "auto", True, [], cache=tmp_path)
    safe = build.plan("cpu", "safe", True, [], cache=tmp_path)
    native = build.plan("cpu", "native", True, [], cache=tmp_path)
    assert safe.key not in (auto.key, native.key)
    assert (auto.key != native.key) == bool(auto.cpu.cmake_args)  # x86 Linux: chosen flags; ARM/macOS: native
    for p in (auto, safe, native):
        assert list(p.cpu.cmake_args) == [a for a in p.cmake_args if a in p.cpu.cmake_args]
        assert p.key == build.build_key("cpu", p.cmake_args)
    # native is what the build passed before the choice existed: the same key, so such wheels stay usable
    assert native.key == build.build_key("cpu", build.COMMON_FLAGS + build.RPC_FLAGS)
    # the user's flags come last (CMake: the last -D wins)
    assert build.plan("cpu", "auto", True, ["-DGGML_AVX512=OFF"], cache=tmp_path).cmake_args[-1] == "-DGGML_AVX512=OFF"


def test_a_build_that_crashed_here_is_not_chosen_again(tmp_path):
    auto = build.plan("cpu", "auto", True, [], cache=tmp_path)
    if auto.cpu.cmake_args == build.plan("cpu", "safe", True, [], cache=tmp_path).cpu.cmake_args:
        pytest.skip("auto and safe are the same flags on this machine")
    (tmp_path / "wheels" / auto.key).mkdir(parents=True)
    (tmp_path / "wheels" / auto.key / build.CRASHED).write_text("x")
    again = build.plan("cpu", "auto", True, [], cache=tmp_path)
    assert again.cpu.level == "safe" and again.key != auto.key


def test_describe_prints_key_and_flags(capsys):
    assert build.main(["--describe", "--cpu-flags", "safe"]) == 0
    first, args = capsys.readouterr().out.splitlines()
    p = build.plan("cpu", "safe", True, build.shlex.split(build.os.environ.get("EA_LOCAL_CMAKE_ARGS", "")))
    assert first == p.describe() and build.shlex.split(args) == p.cmake_args
    assert build.main(["--describe", "--cmake-args=-DX='unclosed"]) == 2
