"""The model-generic path's pieces: the paged cache protocol, the layout probe, the structural check,
the head check, and the load-time self-check refusing a fast path that disagrees."""

from __future__ import annotations

import time

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
import httpx
import mlx.core as mx
import pytest
from mlx_lm.models.base import create_causal_mask

from engine_driver import make_core
from mlx_loom.worker import runner as runner_module
from mlx_loom.worker.generic_forward import plain_head
from mlx_loom.models.loader import load_model
from mlx_loom.models.layout import flattened_llama_reason, kv_layout
from mlx_loom.models.layout import LayerKV
from mlx_loom.worker.kv_pools import KVPools
from mlx_loom.worker.paged_cache import PagedLayerCache, paged_batch
from mlx_loom.worker.runner import ModelRunner
from mlx_loom.sched.scheduler import ScheduledRow
from mlx_loom.worker.self_check import ModelCheckError, check_engine_matches_model
from mlx_loom.server.app import create_app
from mlx_loom.server.settings import Settings
from server_fixtures import serve_in_thread
from tiny_archs import make_tiny_arch_dir

BS = 4


def _rows() -> list[ScheduledRow]:
    # two rows of 3 queries at positions 5.. and 0.., pages of 4 tokens
    return [ScheduledRow("a", (1, 2, 3), 5, (7, 2), True), ScheduledRow("b", (4, 5, 6), 0, (3,), True)]


def test_paged_batch_slots_tables_and_offsets():
    b = paged_batch(_rows(), BS)
    assert b.offset.tolist() == [5, 0]
    assert b.slots.tolist() == [2 * 4 + 1, 2 * 4 + 2, 2 * 4 + 3, 3 * 4 + 0, 3 * 4 + 1, 3 * 4 + 2]  # 5..7: page 1
    assert b.block_tables.tolist() == [[7, 2], [3, 3]]  # padded with the row's first page


def test_update_and_fetch_returns_each_rows_keys_in_position_order():
    pools = KVPools([LayerKV(2, 3, 5)], num_blocks=8, block_size=BS, dtype=mx.float32)
    cache = PagedLayerCache(pools, 0, paged_batch(_rows(), BS))
    k = mx.random.normal((2, 2, 3, 3))  # [B, HKV, L, Dk]
    v = mx.random.normal((2, 2, 3, 5))  # MLA-like: values of another width
    keys, values = cache.update_and_fetch(k, v)
    assert keys.shape == (2, 2, 8, 3) and values.shape == (2, 2, 8, 5)
    assert mx.array_equal(keys[0, :, 5:8], k[0]) and mx.array_equal(values[1, :, 0:3], v[1])


def test_make_mask_is_causal_per_row_and_honours_windows():
    pools = KVPools([LayerKV(1, 2, 2, window=3)], num_blocks=8, block_size=BS, dtype=mx.float32)
    cache = PagedLayerCache(pools, 0, paged_batch(_rows(), BS))
    full = cache.make_mask(3, window_size=None)
    assert full.shape == (2, 1, 3, 8)
    # row b with offset 0 and no padding keys past its page: exactly mlx-lm's causal mask, window 3
    assert mx.array_equal(full[1, 0, :, :3], create_causal_mask(3, window_size=3))
    assert full[0, 0, 0].tolist() == [False, False, False, True, True, True, False, False]  # query at 5
    wide = cache.make_mask(3, window_size=100)
    assert wide[0, 0, 0].tolist() == [True] * 6 + [False] * 2


def test_layout_probe_reads_mla_widths_and_sliding_windows(tmp_path):
    v3 = load_model(str(make_tiny_arch_dir(tmp_path / "v3", "deepseek_v3")))
    layers, dtype = kv_layout(v3.model)
    assert dtype == mx.float32 and layers[0].kv_heads == 1 and layers[0].k_dim != layers[0].v_dim
    g3 = load_model(str(make_tiny_arch_dir(tmp_path / "g3", "gemma3_text")))
    windows = [layer.window for layer in kv_layout(g3.model)[0]]
    assert windows.count(None) == 2 and set(windows) == {None, 8}


def test_structural_check_takes_the_flattened_path_only_for_llama_and_qwen3(tmp_path, default_model):
    assert flattened_llama_reason(default_model.model) is None
    qwen3 = load_model(str(make_tiny_arch_dir(tmp_path / "q3", "qwen3")))
    assert flattened_llama_reason(qwen3.model) is None  # llama + per-head q/k RMSNorms
    assert ModelRunner(qwen3.model, 8, 16, mx.float32).fused_layers is None  # float weights: the fused layer needs 4/8-bit
    qwen2 = load_model(str(make_tiny_arch_dir(tmp_path / "q2", "qwen2")))
    assert "qwen2" in flattened_llama_reason(qwen2.model)


def test_head_check_splits_plain_heads_and_keeps_scaled_ones_whole(tmp_path):
    qwen3 = load_model(str(make_tiny_arch_dir(tmp_path / "q3", "qwen3")))
    assert plain_head(qwen3.model) is not None
    gemma2 = load_model(str(make_tiny_arch_dir(tmp_path / "g2", "gemma2")))  # logit softcapping
    assert plain_head(gemma2.model) is None


def test_heads_are_split_by_class_never_by_a_probe(tmp_path):
    """A subclass of a listed model class (here one that clips its logits, which a small probe would
    not reach) runs whole; every listed class's head over its body is its own call, exactly."""
    qwen3 = load_model(str(make_tiny_arch_dir(tmp_path / "q3", "qwen3"))).model

    class ClippedQwen3(type(qwen3)):
        def __call__(self, inputs, cache=None, input_embeddings=None):
            return mx.clip(super().__call__(inputs, cache, input_embeddings), -1e4, 1e4)

    qwen3.__class__ = ClippedQwen3
    assert plain_head(qwen3) is None
    tokens = mx.array([[3 + (11 * i) % 200 for i in range(24)]], dtype=mx.int32)
    for case in ("llama", "qwen2_moe", "gemma", "gemma3_text", "gemma3_text_untied", "step3p5", "mixtral"):
        model = load_model(str(make_tiny_arch_dir(tmp_path / case, case))).model
        head = plain_head(model)
        assert head is not None, case
        assert bool(mx.array_equal(head(model.model(tokens)), model(tokens))), case


def test_generic_path_on_the_default_model_matches_its_own_forward(default_model):
    runner = ModelRunner(default_model.model, 16, 16, default_model.dtype, force_generic=True)
    result = check_engine_matches_model(runner, default_model.model, default_model.vocab_size, default_model.dtype)
    assert result.max_error < 1e-4 and result.positions == 10


def _break_the_flattened_mlp(monkeypatch) -> None:
    real = runner_module.silu_mul
    monkeypatch.setattr(runner_module, "silu_mul", lambda g, u: real(g, u) * 1.05)


def test_self_check_refuses_a_fast_path_that_disagrees(tmp_path, monkeypatch):
    llama = load_model(str(make_tiny_arch_dir(tmp_path / "l", "llama")))
    make_core(llama)  # agrees
    _break_the_flattened_mlp(monkeypatch)
    with pytest.raises(ModelCheckError, match="llama-flattened"):
        make_core(llama)


@pytest.mark.parametrize("vocab_size", [2, 8, 16, 17, 100, 50000])
def test_self_check_tokens_stay_inside_the_vocabulary(vocab_size):
    """An id past the embedding table reads arbitrary memory (a flaky self-check on tiny vocabularies)."""
    from mlx_loom.worker.self_check import _sequences

    ids = [t for seq in _sequences(vocab_size) for t in seq]
    assert 0 <= min(ids) and max(ids) < vocab_size and len(set(ids)) > 1


def test_server_refuses_to_start_with_the_reason(tmp_path, monkeypatch):
    path = make_tiny_arch_dir(tmp_path / "l", "llama")
    _break_the_flattened_mlp(monkeypatch)
    with serve_in_thread(create_app(Settings(model=str(path)))) as base:
        deadline = time.time() + 60
        while True:
            r = httpx.get(base + "/health")
            if "self-check" in r.text or time.time() > deadline:
                break
            time.sleep(0.1)
        assert r.status_code == 503 and "wrong tokens" in r.json()["error"]["message"]
        chat = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 503
