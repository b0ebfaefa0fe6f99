"""Reading a GGUF file's header: metadata key/values and tensor descriptors, never tensor data.

Why not `gguf.GGUFReader`: it builds one numpy view per array element, which for a
262k-token vocabulary (gemma3) took 13.5 s and 716 MB RSS on the 250 MB default model,
and on corrupt input it can loop on garbage array lengths. The parser here is a small,
bounds-checked walker of the same format, through a read-only memory map, that uses the
`gguf` package for all format constants (value types, magic, tensor type sizes, key names);
the tests check it against GGUFReader on small files.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import gguf
from gguf import GGMLQuantizationType, GGUFValueType


class ModelFileError(Exception):
    """The file cannot be used as a model: missing, unreadable, not GGUF, corrupt, unsupported.

    str(error) is always a single line meant for the user.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class _Corrupt(Exception):
    pass


@dataclass(frozen=True)
class GGUFArray:
    elem_type: GGUFValueType
    length: int
    values: tuple | None  # None when the array was long and not kept


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int
    offset: int


@dataclass
class GGUFHeader:
    version: int
    kv: dict[str, Any]
    tensors: list[TensorInfo]
    data_offset: int
    file_size: int


_SCALAR_FMT = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}
_KEEP_ARRAY = 4096  # arrays longer than this (vocabularies) are skipped, only counted
_MAGIC = struct.pack("<I", gguf.GGUF_MAGIC)  # b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes, endian: str, offset: int):
        self.buf, self.e, self.o, self.n = buf, endian, offset, len(buf)

    def need(self, nbytes: int, what: str) -> None:
        if nbytes < 0 or self.o + nbytes > self.n:
            raise _Corrupt(f"{what} at offset {self.o} runs past the end of the file ({self.n} bytes)")

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        self.need(size, what)
        v = struct.unpack_from(self.e + fmt, self.buf, self.o)
        self.o += size
        return v[0] if len(v) == 1 else v

    def string(self, what: str, strict: bool = False) -> str:
        n = self.unpack("Q", what)
        self.need(n, what)
        raw = bytes(self.buf[self.o:self.o + n])
        self.o += n
        try:
            return raw.decode("utf-8", errors="strict" if strict else "replace")
        except UnicodeDecodeError:
            raise _Corrupt(f"{what} at offset {self.o - n} is not valid UTF-8") from None

    def skip_strings(self, count: int, what: str) -> None:
        buf, e, o, n = self.buf, self.e + "Q", self.o, self.n
        for _ in range(count):
            if o + 8 > n:
                self.o = o
                self.need(8, what)
            (slen,) = struct.unpack_from(e, buf, o)
            o += 8 + slen
            if o > n:
                self.o = o - slen
                self.need(slen, what)
        self.o = o


def _value_type(raw: int, key: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise _Corrupt(f"key {key!r} has invalid value type {raw}") from None


def _read_value(c: _Cursor, vtype: GGUFValueType, key: str) -> Any:
    if vtype == GGUFValueType.STRING:
        return c.string(f"value of {key!r}")
    if vtype == GGUFValueType.ARRAY:
        etype = _value_type(c.unpack("I", f"array type of {key!r}"), key)
        length = c.unpack("Q", f"array length of {key!r}")
        if etype == GGUFValueType.ARRAY:
            raise _Corrupt(f"key {key!r} is a nested array (not supported by llama.cpp)")
        if etype == GGUFValueType.STRING:
            c.need(8 * length, f"array {key!r} of {length} strings")  # each has an 8-byte length
            if length <= _KEEP_ARRAY:
                return GGUFArray(etype, length, tuple(c.string(f"element of {key!r}") for _ in range(length)))
            c.skip_strings(length, f"array {key!r}")
            return GGUFArray(etype, length, None)
        fmt = _SCALAR_FMT[etype]
        size = struct.calcsize(fmt) * length
        c.need(size, f"array {key!r} of {length} {etype.name}")
        values = None
        if length <= _KEEP_ARRAY:
            values = struct.unpack_from(f"{c.e}{length}{fmt}", c.buf, c.o)
        c.o += size
        return GGUFArray(etype, length, values)
    return c.unpack(_SCALAR_FMT[vtype], f"value of {key!r}")


def _parse_header(buf: mmap.mmap | bytes) -> GGUFHeader:
    n = len(buf)
    (version,) = struct.unpack_from("<I", buf, 4)
    endian = "<"
    if version & 0xFFFF == 0:  # written on a big-endian machine (GGUFReader does the same test)
        endian = ">"
        (version,) = struct.unpack_from(">I", buf, 4)
    if version not in _SUPPORTED_VERSIONS:
        raise _BadVersion(version)
    c = _Cursor(buf, endian, 8)
    n_tensors = c.unpack("Q", "tensor count")
    n_kv = c.unpack("Q", "key/value count")
    # every KV pair takes >= 13 bytes and every tensor descriptor >= 24: reject absurd counts early
    if n_kv * 13 > n - c.o or n_tensors * 24 > n - c.o:
        raise _Corrupt(f"header claims {n_kv} keys and {n_tensors} tensors in a {n}-byte file")
    kv: dict[str, Any] = {}
    for _ in range(n_kv):
        key = c.string("key name", strict=True)
        if key in kv:
            raise _Corrupt(f"duplicate key {key!r}")
        vtype = _value_type(c.unpack("I", f"value type of {key!r}"), key)
        kv[key] = _read_value(c, vtype, key)
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    if "general.alignment" in kv:
        alignment = kv["general.alignment"]
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 \
                or alignment & (alignment - 1):
            raise _Corrupt(f"invalid general.alignment {alignment!r}")
    tensors: list[TensorInfo] = []
    names: set[str] = set()
    for _ in range(n_tensors):
        name = c.string("tensor name")
        if name in names:
            raise _Corrupt(f"duplicate tensor {name!r}")
        names.add(name)
        n_dims = c.unpack("I", f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= 4:
            raise _Corrupt(f"tensor {name!r} has {n_dims} dimensions")
        shape = tuple(c.unpack("Q", f"shape of tensor {name!r}") for _ in range(n_dims))
        raw_type = c.unpack("I", f"type of tensor {name!r}")
        offset = c.unpack("Q", f"data offset of tensor {name!r}")
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[GGMLQuantizationType(raw_type)]
        except (ValueError, KeyError):
            raise _Corrupt(f"tensor {name!r} has unknown type {raw_type}") from None
        if shape[0] % block:
            raise _Corrupt(f"tensor {name!r} row of {shape[0]} is not a multiple of its block size {block}")
        n_el = math.prod(shape)
        if offset % alignment:
            raise _Corrupt(f"tensor {name!r} data offset {offset} is not aligned to {alignment}")
        tensors.append(TensorInfo(name, raw_type, shape, n_el, n_el // block * type_size, offset))
    data_offset = -(-c.o // alignment) * alignment
    for t in tensors:
        end = data_offset + t.offset + t.n_bytes
        if end > n:
            raise _Corrupt(f"data of tensor {t.name!r} ends at byte {end}, past the end of the file ({n} bytes)")
    return GGUFHeader(version=version, kv=kv, tensors=tensors, data_offset=data_offset, file_size=n)


class _BadVersion(Exception):
    def __init__(self, version: int):
        self.version = version


def read_header(path: str) -> GGUFHeader:
    if not os.path.lexists(path):
        raise ModelFileError(f"no such file: {path}")
    if os.path.isdir(path):
        raise ModelFileError(f"is a directory, not a GGUF file: {path}")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 4:
                what = "empty file" if not head else f"only {len(head)} bytes"
                raise ModelFileError(f"not a GGUF file: {path} ({what})")
            if head[:4] != _MAGIC:
                raise ModelFileError(f"not a GGUF file: {path} (starts with {head[:4]!r}, expected {_MAGIC!r})")
            if len(head) < 8 or size < 24:
                raise ModelFileError(f"truncated or corrupt GGUF file: {path} (file ends inside the header, {size} bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                try:
                    return _parse_header(buf)
                except _BadVersion as e:
                    raise ModelFileError(
                        f"unsupported GGUF version {e.version} in {path} "
                        f"(supported: {', '.join(map(str, _SUPPORTED_VERSIONS))})") from None
                except _Corrupt as e:
                    raise ModelFileError(f"truncated or corrupt GGUF file: {path} ({e})") from None
                except (struct.error, ValueError, OverflowError, MemoryError, IndexError) as e:
                    raise ModelFileError(f"truncated or corrupt GGUF file: {path} ({type(e).__name__}: {e})") from None
    except ModelFileError:
        raise
    except PermissionError:
        raise ModelFileError(f"cannot read {path}: permission denied") from None
    except OSError as e:
        raise ModelFileError(f"cannot read {path}: {e.strerror or e}") from None
