"""The paged, flattened forward equals mlx-lm's own forward on a tiny random llama."""

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache

from mlx_loom.worker.runner import ModelRunner
from mlx_loom.sched.scheduler import ScheduledRow

BS = 4


@pytest.fixture(scope="module")
def tiny():
    mx.random.seed(0)
    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=97,
                           rope_theta=10000.0, tie_word_embeddings=True)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def reference_logits(model, tokens: list[int]) -> np.ndarray:
    """mlx-lm forward over the whole sequence: logits at every position [L, V]."""
    cache = make_prompt_cache(model)
    return np.array(model(mx.array([tokens]), cache=cache)[0])


def test_mixed_step_matches_reference(tiny):
    """One step mixing a decode row, a fresh prefill and a chunk continuing a prefix."""
    runner = ModelRunner(tiny, num_blocks=32, block_size=BS, dtype=mx.float32)
    rng = np.random.default_rng(0)
    a, b, c = (rng.integers(0, 97, n).tolist() for n in (9, 6, 13))
    # Step 1: prefill all of a, first 5 tokens of c (chunk, no sampling).
    rows1 = [ScheduledRow("a", tuple(a), 0, (3, 7, 1), True), ScheduledRow("c", tuple(c[:5]), 0, (9, 2), False)]
    logits1, sample_rows1 = runner.execute(rows1)
    assert sample_rows1 == (0,)
    np.testing.assert_allclose(np.array(logits1[0]), reference_logits(tiny, a)[-1], rtol=1e-4, atol=1e-4)
    # Step 2: decode a (1 token), prefill b whole, finish c's prompt (8 tokens over its 5 cached).
    nxt = 5
    rows2 = [ScheduledRow("c", tuple(c[5:]), 5, (9, 2, 4, 11), True),
             ScheduledRow("a", (nxt,), 9, (3, 7, 1), True),
             ScheduledRow("b", tuple(b), 0, (5, 6), True)]
    logits2, sample_rows2 = runner.execute(rows2)
    assert sample_rows2 == (0, 1, 2)
    got = np.array(logits2)
    np.testing.assert_allclose(got[0], reference_logits(tiny, c)[-1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[1], reference_logits(tiny, a + [nxt])[-1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[2], reference_logits(tiny, b)[-1], rtol=1e-4, atol=1e-4)


def test_kv_bytes_per_block(tiny):
    # 2 (k, v) * 2 layers * BS tokens * 2 kv heads * 16 head dim * 4 bytes
    assert ModelRunner.kv_bytes_per_block(tiny, BS, mx.float32) == 2 * 2 * BS * 2 * 16 * 4
