#!/usr/bin/env bash
# On the offline GPU machine: CUDA build of the patched llama.cpp (and a stock libllama from the same
# tree, patch reversed), the hook tests on the GPU, and the hook benchmark on a random-weight
# Llama-3-8B-shaped Q4_0 model, and the engine's budgeted decode against the full cache. Needs
# out/gpu/src.tgz (`build_llama.py --export-source`) and out/whl/ (pure-Python wheels the machine lacks:
# `pip download --no-deps -d out/whl gguf diskcache rich markdown-it-py mdurl pygments jinja2`).
# SKIP_STOCK=1 leaves out the stock build and the hook benchmark. Logs and JSON go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
ROOT=$PWD
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site out/whl/*.whl || exit 1
rm -rf /tmp/w /tmp/patched /tmp/stock; mkdir -p /tmp/w && tar xzf out/gpu/src.tgz -C /tmp/w
SRC=/tmp/w/llama_cpp_python-0.3.36; L=$SRC/vendor/llama.cpp
export PYTHONPATH=/tmp/site:$SRC:$ROOT
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
t0=$(date +%s)
cmake -S "$L" -B "$L/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF > "$OUT/build.log" 2>&1
cmake --build "$L/build" -j16 --target llama >> "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
t1=$(date +%s); echo "patched CUDA build (ggml-cuda + libllama, sm_90, 16 cores): $((t1-t0)) s"
cp -a "$L/build/bin" /tmp/patched
if [ -z "${SKIP_STOCK:-}" ]; then
  (cd "$L" && patch -R -p1 -s < "$ROOT/patches/0001-ea-kv-hooks.patch") || exit 1
  cmake --build "$L/build" -j16 --target llama >> "$OUT/build.log" 2>&1 || exit 1
  cp -a "$L/build/bin" /tmp/stock
  echo "stock libllama rebuild: $(( $(date +%s) - t1 )) s"
fi
[ -n "${SKIP_TESTS:-}" ] || EA_LOCAL_N_GPU_LAYERS=99 LLAMA_CPP_LIB_PATH=/tmp/patched timeout ${TESTS_TIMEOUT:-240} python3 -c \
  "import llama_cpp, sys, pytest; sys.exit(pytest.main(sys.argv[1:]))" -q -p no:cacheprovider \
  tests/test_hooks.py -k "tiny or long_run or reject or symbols or compaction" \
  --deselect "tests/test_hooks.py::test_compaction_equals_fresh_prefill[gemma-None]" \
  --deselect tests/test_hooks.py::test_compaction_after_removal_keeps_the_cache_usable \
  --deselect tests/test_hooks.py::test_remap_rejects_bad_mappings 2>&1 | tee "$OUT/pytest_gpu.log" | tail -5
python3 scripts/bench/random_gguf.py /tmp/l8b.gguf --shape llama3-8b && echo "random 8B written"
[ -n "${SKIP_STOCK:-}" ] || for H in ${HISTORIES:-32768}; do
  timeout 200 python3 scripts/bench/bench_hooks.py /tmp/l8b.gguf --stock-lib /tmp/stock --patched-lib /tmp/patched \
    --ngl 99 --history "$H" --tokens 64 --rounds 3 --processes 1 --json "$OUT/hooks_gpu_$H.json" | grep SUMMARY
done
LLAMA_CPP_LIB_PATH=/tmp/patched timeout ${ENGINE_TIMEOUT:-300} python3 -c "import llama_cpp, runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')" \
  scripts/bench/bench_engine.py /tmp/l8b.gguf --history 32768 --budget 8192 --tokens ${ENGINE_TOKENS:-1024} --step 512 --chunk 2048 \
  --ngl 99 --json "$OUT/engine_gpu_32k_8k.json" 2>&1 | tee "$OUT/engine.log" | grep -E "SUMMARY|Error"
