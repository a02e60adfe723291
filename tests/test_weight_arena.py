"""Parameters packed side by side (mlx_loom/models/weight_arena.py): same values, names, shapes and
dtypes, the same model output, tied arrays still tied, chunks in order, and no memory kept twice."""

import gc
import sys
from pathlib import Path

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_loom.models import weight_arena
from mlx_loom.models.loader import load_model
from tiny_model import make_tiny_llama_dir


def _address(a: mx.array) -> int:
    return np.asarray(a).__array_interface__["data"][0]


def _snapshot(model: nn.Module) -> dict[str, np.ndarray]:
    return {name: np.array(a) for name, a in tree_flatten(model.parameters())}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("arena") / "tiny", num_layers=3)


def test_loader_packs_on_the_cpu_and_the_model_computes_the_same(tiny_dir, monkeypatch):
    monkeypatch.setenv("MLX_LOOM_PACK_WEIGHTS", "0")
    as_loaded = load_model(str(tiny_dir)).model
    monkeypatch.delenv("MLX_LOOM_PACK_WEIGHTS")
    assert weight_arena.packing_enabled()
    packed = load_model(str(tiny_dir)).model
    before, after = _snapshot(as_loaded), _snapshot(packed)
    assert before.keys() == after.keys()
    for name, a in before.items():
        assert a.dtype == after[name].dtype and a.shape == after[name].shape, name
        assert np.array_equal(a, after[name]), name
    addresses = [_address(a) for _, a in tree_flatten(packed.parameters())]
    assert addresses == sorted(addresses), "packed in the model's own order"
    tokens = mx.array([[3, 17, 99, 250, 4, 8]])
    assert mx.array_equal(as_loaded(tokens), packed(tokens)).item()


def test_off_switch(monkeypatch):
    monkeypatch.setenv("MLX_LOOM_PACK_WEIGHTS", "0")
    assert not weight_arena.packing_enabled()


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(40, 24)
        self.second = nn.Linear(24, 40, bias=False)
        self.quantized = nn.QuantizedLinear(64, 32, bias=False, group_size=32, bits=4)
        self.tail = mx.arange(7, dtype=mx.int32)
        self.head = self.first.weight  # the same array under two names, as a tied embedding


def test_several_chunks_keep_values_and_ties():
    model = _Tied()
    mx.eval(model.parameters())
    before = _snapshot(model)
    x = mx.random.normal((3, 64), key=mx.random.key(1))
    expected = model.quantized(x)
    chunks = weight_arena.pack_parameters(model, chunk_bytes=4096)  # several chunks
    assert chunks > 1
    after = _snapshot(model)
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[n], after[n]) and before[n].dtype == after[n].dtype for n in before)
    assert model.head is model.first.weight, "a tied array stays one array"
    assert mx.array_equal(model.quantized(x), expected).item()


def test_each_chunk_is_one_buffer_with_parameters_on_64_byte_steps():
    model = _Tied()
    mx.eval(model.parameters())
    assert weight_arena.pack_parameters(model) == 1
    arrays = [a for _, a in tree_flatten(model.parameters())]
    distinct = list({id(a): a for a in arrays}.values())
    starts = sorted(_address(a) for a in distinct)
    ends = sorted(_address(a) + a.nbytes for a in distinct)
    gaps = [s - e for s, e in zip(starts[1:], ends[:-1])]
    assert all(0 <= g < 64 for g in gaps), gaps  # side by side, padded only up to the next 64 bytes
    assert all((s - starts[0]) % 64 == 0 for s in starts)


def test_the_originals_are_freed():
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(4)])  # ~4 MiB of float32
    mx.eval(model.parameters())
    gc.collect()
    mx.clear_cache()
    held = mx.get_active_memory()
    weight_arena.pack_parameters(model)
    gc.collect()
    assert mx.get_active_memory() - held < 256 << 10  # not the 4 MiB a kept copy would add


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_COLLAPSE is Linux's")
def test_a_large_chunk_lands_on_huge_pages_where_the_kernel_allows():
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are off on this kernel")
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(4)])  # 16 MiB of float32
    mx.eval(model.parameters())
    weight_arena.pack_parameters(model)
    # the mapping holding the packed buffer (other memory of the process comes and goes meanwhile)
    start = _address(model.layers[0].weight)  # the packed buffer's start: 16 MiB from there
    if _anon_huge_kb_in(start, 16 << 20) < 12 << 10:  # all but the partial 2 MiB pages at either end
        assert not weight_arena.collapse_to_huge_pages(start, 16 << 20), \
            "the kernel gives huge pages now, but the packed buffer did not get them"


def _anon_huge_kb_in(start: int, nbytes: int) -> int:
    """AnonHugePages of every mapping overlapping [start, start + nbytes) (madvise may split one)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo < start + nbytes and start < hi
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1])
    return total
