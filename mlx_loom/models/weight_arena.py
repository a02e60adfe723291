"""A loaded model's parameters copied, in the model's own order, into a few large buffers on 2 MiB pages.

As loaded, each weight sits wherever the loader's allocations left it (a GGUF model's tensors are
converted one by one, between temporaries, on 4 KiB pages). Copied side by side in definition
order (each layer's norms and projections together) and, on Linux, moved onto huge pages
(MADV_COLLAPSE), the weights that every decode step streams from DRAM run faster (fewer TLB misses
and page walks are the likely reason; not pinned down). Default model, engine alone, N = 1 decode step: copies vs the loader's placement
-12% to -17% (8 of 8 alternating pairs in one process, three processes), separate processes -3%
(5 of 6 pairs); huge pages on top -2% (7 of 10 in one process), -6% (5 of 8 across processes);
64-byte alignment alone made no difference. Values, shapes, dtypes and names stay; each
parameter becomes a view into its chunk's buffer, so the originals are freed as each chunk lands.
On the CPU only; MLX_LOOM_PACK_WEIGHTS=0 keeps the loader's placement (for A/B runs).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

CHUNK_BYTES = 256 << 20  # bounds the extra memory while packing: one chunk's copy at a time
_ALIGN = 64  # each parameter starts a cache line past its chunk's start


def packing_enabled() -> bool:
    """Pack on the CPU default device unless MLX_LOOM_PACK_WEIGHTS=0."""
    return mx.default_device() == mx.cpu and os.environ.get("MLX_LOOM_PACK_WEIGHTS", "1") != "0"


def pack_parameters(model: nn.Module, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Replace every parameter of `model` with an equal view into a shared chunk buffer, in the order
    of `model.parameters()`; an array held under several names (tied weights) is copied once and
    stays shared. Returns the number of chunks."""
    items = tree_flatten(model.parameters())  # [(name, array)], definition order
    chunks = _chunks([a for _, a in _distinct(items)], chunk_bytes)
    count = len(chunks)
    while chunks:
        chunk = chunks.pop(0)
        views = {id(a): v for a, v in zip(chunk, _pack(chunk))}
        items = [(name, views.get(id(a), a)) for name, a in items]
        model.update(tree_unflatten(items))
        del chunk, views  # the last references to this chunk's originals
    mx.clear_cache()  # the originals' memory leaves MLX's buffer cache ...
    _trim_heap()  # ... and the C heap, where most of them lived
    return count


def _distinct(items: list[tuple[str, mx.array]]) -> list[tuple[str, mx.array]]:
    seen: set[int] = set()
    return [(n, a) for n, a in items if not (id(a) in seen or seen.add(id(a)))]


def _chunks(arrays: list[mx.array], chunk_bytes: int) -> list[list[mx.array]]:
    """Consecutive runs of arrays of at most chunk_bytes each (a larger array is a chunk alone)."""
    out: list[list[mx.array]] = []
    size = chunk_bytes
    for a in arrays:
        if size + _padded(a.nbytes) > chunk_bytes:
            out.append([])
            size = 0
        out[-1].append(a)
        size += _padded(a.nbytes)
    return out


def _padded(nbytes: int) -> int:
    return (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN


def _pack(arrays: list[mx.array]) -> list[mx.array]:
    """One evaluated uint8 buffer holding every array at a 64-byte offset; a view of each."""
    parts, offsets, at = [], [], 0
    for a in arrays:
        raw = a.reshape(-1).view(mx.uint8)  # [nbytes]
        pad = _padded(a.nbytes) - a.nbytes
        parts += [raw, mx.zeros((pad,), dtype=mx.uint8)] if pad else [raw]
        offsets.append(at)
        at += a.nbytes + pad
    buffer = mx.concatenate(parts)  # [sum of padded sizes]
    views = [buffer[o:o + a.nbytes].view(a.dtype).reshape(a.shape) for a, o in zip(arrays, offsets)]
    mx.eval(views)
    collapse_to_huge_pages(np.asarray(buffer).__array_interface__["data"][0], buffer.nbytes)
    return views


_HUGE = 2 << 20
_MADV_COLLAPSE = 25  # Linux >= 6.1: back a populated range with 2 MiB pages now, contents kept


def collapse_to_huge_pages(start: int, nbytes: int) -> bool:
    """The whole 2 MiB pages of [start, start + nbytes) moved onto huge pages (fewer TLB misses while
    every step streams the weights). False where the kernel declines (no free 2 MiB page, THP off,
    not Linux): a hint, the memory stays as it was."""
    libc = _libc()
    if not sys.platform.startswith("linux") or libc is None or not hasattr(libc, "madvise"):
        return False
    lo, hi = (start + _HUGE - 1) // _HUGE * _HUGE, (start + nbytes) // _HUGE * _HUGE
    if hi <= lo:
        return False
    return libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), ctypes.c_int(_MADV_COLLAPSE)) == 0


def _trim_heap() -> None:
    """glibc keeps freed heap pages mapped (the originals would stay in the RSS); malloc_trim hands
    them back. Elsewhere (macOS, musl) nothing to do."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")  # runs ldconfig: once, not per chunk
    return ctypes.CDLL(name) if name else None
