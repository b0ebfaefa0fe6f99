"""`import ea_local` loads llama.cpp's library before anything imports numpy, once, cheaply.

Each check runs in a fresh interpreter: this test process has long loaded both."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")

MAPPED = "lambda: {l.split()[-1] for l in open('/proc/self/maps') if 'libllama' in l}"


def py(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, env=env)


def test_libllama_is_mapped_before_numpy_is_imported():
    # a finder that looks at the process's mappings the moment numpy is first imported
    r = py(f"""
        import sys
        mapped = {MAPPED}
        seen = []

        class Spy:
            def find_spec(self, name, path=None, target=None):
                if name == "numpy" and not seen:
                    seen.append(mapped())
                return None

        sys.meta_path.insert(0, Spy())
        import ea_local.policies.base  # imports numpy
        assert seen, "numpy was not imported"
        assert seen[0], "numpy was imported before libllama was loaded"
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_llama_cpp_gets_the_library_already_loaded():
    r = py(f"""
        import os, sys
        import ea_local
        mapped = {MAPPED}
        assert ea_local.LIBLLAMA and "numpy" not in sys.modules and "llama_cpp" not in sys.modules
        before = mapped()
        import llama_cpp.llama_cpp as ll
        assert os.path.samefile(ll._lib._name, ea_local.LIBLLAMA), (ll._lib._name, ea_local.LIBLLAMA)
        assert mapped() == before and len(before) == 1, (before, mapped())
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_help_stays_cheap():
    # the preload is a dlopen: `ea-local --help` imports neither llama_cpp's package nor numpy
    r = py("""
        import sys
        sys.argv = ["ea-local", "--help"]
        from ea_local.cli import main
        try:
            main()
        except SystemExit:
            pass
        print(sorted(m for m in ("llama_cpp", "numpy") if m in sys.modules))
    """)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "[]", (r.stdout[-500:], r.stderr)


def test_no_library_found_is_not_an_import_error(tmp_path):
    # an empty LLAMA_CPP_LIB_PATH: the package still imports; the engine's import reports the problem
    r = py("""
        import ea_local
        print(ea_local.LIBLLAMA)
    """, env=dict(os.environ, LLAMA_CPP_LIB_PATH=str(tmp_path)))
    assert r.returncode == 0 and r.stdout.strip() == "None", r.stderr
