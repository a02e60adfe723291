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


def test_verification_rows_run_fused_and_equal_one_decode_per_token(tmp_path):
    """A verification row (last token + drafts) runs on the fused decode layer with one entry per
    token: its logits are bit for bit those of decoding the tokens one step at a time, beside a plain
    decode row in the same step (what keeps greedy speculation lossless)."""
    from tiny_model import make_tiny_llama_dir

    from mlx_loom.models.loader import load_model

    d = make_tiny_llama_dir(tmp_path / "m", num_layers=2)
    weights = mx.load(str(d / "model.safetensors"))
    mx.save_safetensors(str(d / "model.safetensors"), {k: v.astype(mx.float16) for k, v in weights.items()})
    model = load_model(str(d)).model
    prompt, other, drafts = [5, 9, 20, 33, 7, 3], [40, 41, 42], [11, 12, 13, 14]

    def runner_after_prompts() -> ModelRunner:
        r = ModelRunner(model, num_blocks=16, block_size=BS, dtype=mx.float32)
        r.execute([ScheduledRow("p", tuple(prompt), 0, (3, 7, 1), True), ScheduledRow("o", tuple(other), 0, (9,), True)])
        return r

    one = runner_after_prompts()
    if one.fused_layers is None:
        pytest.skip("no fused native decode layer here")
    want = [np.array(one.execute([ScheduledRow("p", (t,), len(prompt) + i, (3, 7, 1), True)])[0][0])
            for i, t in enumerate(drafts)]
    decode = np.array(one.execute([ScheduledRow("o", (50,), len(other), (9,), True)])[0][0])

    fused = runner_after_prompts()
    verify = ScheduledRow("p", tuple(drafts), len(prompt), (3, 7, 1), True, num_draft=len(drafts) - 1)
    logits, sample_rows = fused.execute([verify, ScheduledRow("o", (50,), len(other), (9,), True)])
    assert sample_rows == (0, 1)
    got = np.array(logits)
    assert got.shape[0] == len(drafts) + 1
    for i in range(len(drafts)):
        np.testing.assert_array_equal(got[i], want[i])
    np.testing.assert_array_equal(got[-1], decode)

    # A draft's runner also takes short catch-up rows fused: only the last token samples.
    catch_up = runner_after_prompts()
    catch_up.fused_row_tokens = 8
    logits, _ = catch_up.execute([ScheduledRow("p", tuple(drafts), len(prompt), (3, 7, 1), True)])
    assert logits.shape[0] == 1
    np.testing.assert_array_equal(np.array(logits[0]), want[-1])
