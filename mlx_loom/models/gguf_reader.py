"""Read a GGUF file without write access: what `mx.load(path, return_metadata=True)` returns.

MLX's GGUF reader (gguflib's `gguf_open`) opens the file O_RDWR, so a model file the server cannot
write (a root-owned file in a Docker image served by a non-root user, a 0444 file, a read-only
volume) fails with "[load_gguf] gguf_init failed". This reader maps the file read-only (a numpy
memmap in mode 'r'), parses GGUF's header itself (gguf-py's GGUFReader does too, but builds a numpy
view per vocabulary string: seconds for a 150k vocabulary) and builds the same arrays MLX builds:
- Q4_0 / Q4_1 / Q8_0 blocks in MLX's affine layout: `<name>.weight` uint32 (values low bits first),
  `<name>.scales` and `<name>.biases` float16 with one value per 32-value block;
- F32 / F16 / BF16 / integer tensors as they are;
- any other block format (K-quants, Q5_*, IQ*) dequantized to float16 by gguf-py (llama.cpp's
  Python package; MLX does the same for the K-quants it reads and refuses the rest).
Metadata comes back as Python values (str, int, float, bool, lists), which every reader of it here
takes as it takes MLX's mx.array scalars. Nothing is copied to disk; each tensor is copied once
into an mx.array, as mx.load does.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, NamedTuple

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

BLOCK = 32  # values per Q4_0 / Q4_1 / Q8_0 block
_PLAIN = {Q.F32: np.float32, Q.F16: np.float16, Q.I8: np.int8, Q.I16: np.int16, Q.I32: np.int32,
          Q.I64: np.int64}
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
            12: "<d"}  # GGUF metadata value types; 8 is a string, 9 an array
_STRING, _ARRAY = 8, 9


class GgufReadError(ValueError):
    """The file is not a GGUF file this reader can parse."""


_Info = tuple[str, list[int], int, int]  # name, GGML dims (innermost first), type, offset in the data


class _Tensor(NamedTuple):
    name: str
    shape: tuple[int, ...]  # row-major (MLX's order; GGML lists dimensions innermost first)
    kind: Q
    data: np.ndarray  # the raw bytes (uint8), read-only


def read_gguf(path: str | Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """(tensors by GGUF name, metadata by key) from a GGUF file mapped read-only."""
    try:
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        metadata, infos, start = _Cursor(memoryview(raw)).header()
        found = _tensors(raw, infos, start)
    except GgufReadError:
        raise
    except (struct.error, UnicodeDecodeError, ValueError, KeyError) as exc:  # incl. an unknown tensor type
        raise GgufReadError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    tensors: dict[str, mx.array] = {}
    for t in found:
        tensors.update(_tensor_arrays(t))
    return tensors, metadata


class _Cursor:
    """Reads GGUF's header (v2/v3, little-endian) from a buffer: metadata, then tensor infos."""

    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def header(self) -> tuple[dict[str, Any], list[_Info], int]:
        """(metadata, tensor infos, offset of the tensor data)."""
        if bytes(self.buf[:4]) != b"GGUF":
            raise ValueError("bad magic")
        self.pos = 4
        version = self.scalar("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (2 and 3 are read)")
        n_tensors, n_kv = self.scalar("<Q"), self.scalar("<Q")
        metadata = {}
        for _ in range(n_kv):
            key = self.string()
            metadata[key] = self.value(self.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name, n_dims = self.string(), self.scalar("<I")
            dims = [self.scalar("<Q") for _ in range(n_dims)]
            infos.append((name, dims, self.scalar("<I"), self.scalar("<Q")))
        align = int(metadata.get("general.alignment", 32))
        return metadata, infos, self.pos + (-self.pos % align)

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        text = str(self.buf[self.pos:self.pos + n], "utf-8")
        self.pos += n
        return text

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            return self.scalar(_SCALARS[kind])
        sub, n = self.scalar("<I"), self.scalar("<Q")
        if sub == _STRING:
            return [self.string() for _ in range(n)]
        dtype = np.dtype(_SCALARS[sub])  # a nested array raises KeyError, as MLX refuses it
        values = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos).tolist()
        self.pos += n * dtype.itemsize
        return values


def _tensors(raw: np.ndarray, infos: list[_Info], start: int) -> list[_Tensor]:
    out = []
    for name, dims, kind, offset in infos:
        kind = Q(kind)
        block, block_bytes = GGML_QUANT_SIZES[kind]
        n_bytes = int(np.prod(dims, dtype=np.int64)) // block * block_bytes
        begin = start + offset
        if begin + n_bytes > raw.size:
            raise GgufReadError(f"GGUF tensor {name} runs past the end of the file (truncated?)")
        out.append(_Tensor(name, tuple(reversed(dims)), kind, raw[begin:begin + n_bytes]))
    return out


def _tensor_arrays(t: _Tensor) -> dict[str, mx.array]:
    shape = t.shape
    if t.kind in _PLAIN:
        return {t.name: mx.array(t.data.view(_PLAIN[t.kind]).reshape(shape))}
    if t.kind == Q.F64:
        return {t.name: mx.array(t.data.view(np.float64).astype(np.float32).reshape(shape))}
    if t.kind == Q.BF16:
        return {t.name: mx.array(t.data.view(np.uint16).reshape(shape)).view(mx.bfloat16)}
    if t.kind in _AFFINE:
        if shape[-1] % BLOCK:
            raise GgufReadError(f"GGUF tensor {t.name} has last dimension {shape[-1]}, not a multiple of {BLOCK}")
        weight, scales, biases = _AFFINE[t.kind](np.asarray(t.data).reshape(-1, _BLOCK_BYTES[t.kind]))
        prefix = t.name.removesuffix(".weight")
        packed_shape = (*shape[:-1], -1)
        return {t.name: mx.array(weight.reshape(packed_shape)),
                f"{prefix}.scales": mx.array(scales.reshape(packed_shape)),
                f"{prefix}.biases": mx.array(biases.reshape(packed_shape))}
    block_bytes = GGML_QUANT_SIZES[t.kind][1]
    values = dequantize(np.asarray(t.data).reshape(-1, block_bytes), t.kind)  # float32
    return {t.name: mx.array(values.astype(np.float16).reshape(shape))}


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[:, start:start + 2]).view(np.float16)[:, 0]  # [n_blocks]


def _pack_nibbles(qs: np.ndarray) -> np.ndarray:
    """GGML's 4-bit block (byte j: value j low, value j + 16 high) -> MLX's uint32 words (low bits first)."""
    values = np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # [n_blocks, 32] in element order
    packed = values[:, 0::2] | (values[:, 1::2] << 4)  # [n_blocks, 16] bytes, two values each
    return np.ascontiguousarray(packed, dtype=np.uint8).view(np.uint32)  # [n_blocks, 4]


def _q4_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _f16(blocks, 0)
    return _pack_nibbles(blocks[:, 2:]), d, d * np.float16(-8)


def _q4_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _pack_nibbles(blocks[:, 4:]), _f16(blocks, 0), _f16(blocks, 2)


def _q8_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _f16(blocks, 0)
    unsigned = np.ascontiguousarray(blocks[:, 2:] ^ 0x80, dtype=np.uint8)  # int8 q -> q + 128
    return unsigned.view(np.uint32), d, d * np.float16(-128)


_AFFINE = {Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q8_0: _q8_0}
_BLOCK_BYTES = {Q.Q4_0: 18, Q.Q4_1: 20, Q.Q8_0: 34}
