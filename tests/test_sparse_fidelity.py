"""Reduced model-level fidelity of sparse prefill: the whole default model (all 30 layers, the
shipped per-head config) over 2048 tokens, sparse forced from 1024 keys on (the engine's
thresholds would run this length almost all dense). The 8k figures are in
benchmarks/results/sparse_fidelity.md (benchmarks/sparse_fidelity.py)."""

from benchmarks.sparse_fidelity import SEARCH_TOKENS, compare_prefill
from mlx_loom.kernels.calibration import calibration_tokens
from mlx_loom.kernels.sparse_patterns import load_config, shipped_config_path


def test_sparse_prefill_tracks_dense_on_the_default_model(default_model):
    lm = default_model
    config = load_config(shipped_config_path(lm.name), lm.num_heads)
    tokens = calibration_tokens(lm.tokenizer, 2048, skip=SEARCH_TOKENS)
    res = compare_prefill(lm.model, tokens, config, min_kv_len=1024, max_ratio=1.0)
    sparse = res["sparse"]
    assert sparse["positions"] == 1536  # chunks 2..4 ran sparse
    assert sparse["agreement"] >= 0.95, res
    assert sparse["mean_kl"] <= 0.01, res
    assert sparse["ppl_delta_pct"] <= 1.5, res
