"""The engine's sparse prefill (issue 8, --sparse-prefill): long prompts only, passkey kept."""

import pytest

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
from mlx_loom.kernels.calibration import calibration_text  # noqa: E402
from mlx_loom.kernels.sparse_patterns import MIN_KV_LEN  # noqa: E402
from mlx_loom.sched.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from mlx_loom.engine.core import EngineCore  # noqa: E402
from mlx_loom.sched.params import SamplingParams  # noqa: E402

from engine_driver import chat_ids, run  # noqa: E402

PASSKEY = "68421"


def _core(loaded, sparse: str) -> EngineCore:
    cfg = EngineConfig(cache=CacheConfig(block_size=16, num_blocks=512), sparse_prefill=sparse,
                       scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=512))
    return EngineCore(cfg, loaded)


@pytest.fixture(scope="module")
def passkey_prompt(default_model):
    tok = default_model.tokenizer
    filler = tok.decode(tok.encode(calibration_text())[: MIN_KV_LEN + 600])
    cut = len(filler) // 5  # the key sits at ~20% depth
    text = (filler[:cut] + f"\nThe passkey is {PASSKEY}. Remember it.\n" + filler[cut:]
            + "\nWhat is the passkey? Answer with the number only.")
    return chat_ids(tok, text)


def test_long_prompt_prefills_sparse_and_keeps_the_passkey(default_model, passkey_prompt):
    params = SamplingParams(temperature=0, max_tokens=12)
    dense_core, sparse_core = _core(default_model, "off"), _core(default_model, "auto")
    assert sparse_core.runner.sparse is not None  # the shipped config for the default model
    dense = run(dense_core, [("p", passkey_prompt, params)])["p"]
    sparse = run(sparse_core, [("p", passkey_prompt, params)])["p"]
    stats = sparse_core.stats()
    assert stats.sparse_prefill_chunks > 0 and 0 < stats.sparse_prefill_tokens < len(passkey_prompt)
    assert dense_core.stats().sparse_prefill_chunks == 0
    answer = default_model.tokenizer.decode
    if PASSKEY in answer(dense.tokens):
        assert PASSKEY in answer(sparse.tokens)
    assert len(sparse.tokens) == len(dense.tokens) or sparse.finish_reason == "stop"


@pytest.mark.parametrize("tokens", [4096, 8000])
def test_passkey_is_retrieved_at_4k_and_8k_dense_and_sparse(default_model, tokens):
    """The native tiled attention (dense) and the sparse tiles keep long-range retrieval exact:
    both answers hold the passkey planted at 20% depth of a ~4k / ~8k-token prompt."""
    tok = default_model.tokenizer
    filler = tok.decode(tok.encode(calibration_text() * 3)[: tokens - 60])
    cut = len(filler) // 5
    prompt = chat_ids(tok, filler[:cut] + f"\nThe passkey is {PASSKEY}. Remember it.\n" + filler[cut:]
                      + "\nWhat is the passkey? Answer with the number only.")
    assert tokens - 100 < len(prompt) < 8192
    params = SamplingParams(temperature=0, max_tokens=12)
    for sparse in ("off", "auto"):
        core = _core(default_model, sparse)
        out = run(core, [("p", prompt, params)])["p"]
        assert PASSKEY in tok.decode(out.tokens), (sparse, tok.decode(out.tokens))
        assert (core.stats().sparse_prefill_chunks > 0) == (sparse == "auto")


def test_short_prompts_stay_dense(default_model):
    core = _core(default_model, "auto")
    prompt = chat_ids(default_model.tokenizer, "What is the capital of France?")
    out = run(core, [("s", prompt, SamplingParams(temperature=0, max_tokens=8))])["s"]
    assert out.tokens and core.stats().sparse_prefill_chunks == 0


def test_config_for_another_model_is_refused(default_model, tmp_path):
    from mlx_loom.kernels.sparse_patterns import DENSE, SparsePatternConfig, save_config

    path = save_config(SparsePatternConfig.uniform(DENSE, 3, default_model.num_heads), tmp_path / "p.json")
    with pytest.raises(ValueError, match="3 layers"):
        _core(default_model, str(path))
