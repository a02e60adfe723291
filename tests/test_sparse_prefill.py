"""Sparse prefill attention (mlx_loom/kernels/sparse_prefill) against its masked references, the pattern
config, the cost model and the pattern search on synthetic heads."""

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest

from mlx_loom.kernels import sparse_prefill as sp
from mlx_loom.kernels import sparse_prefill_reference as ref
from mlx_loom.kernels.pattern_search import candidate_patterns, choose_patterns, head_errors
from mlx_loom.kernels.sparse_patterns import (HeadPattern, SparsePatternConfig, estimated_compute_ratio, load_config,
                                     save_config, should_use_sparse, shipped_config_path)

# (H, HKV, LQ, q_offset, D): odd lengths, chunk suffixes, one tile or several, GQA and MHA
SHAPES = [(4, 2, 100, 237, 16), (6, 3, 64, 0, 16), (3, 1, 37, 500, 8), (4, 4, 130, 0, 16), (9, 3, 200, 391, 16)]


@pytest.fixture(autouse=True, params=["native", "mlx"])
def attention_kernels(request, monkeypatch):
    """Every test twice: with the native tile / dense kernels where they apply (CPU, D % 16 == 0)
    and with the MLX-op tiles, the GPU path."""
    if request.param == "mlx":
        monkeypatch.setattr(sp, "native_attention_applies", lambda *a: False)
    return request.param


def _qkv(rng, H, HKV, LQ, q_offset, D, extra=3):
    L = q_offset + LQ
    q = mx.array(rng.standard_normal((1, H, LQ, D)).astype(np.float32))
    k = mx.array(rng.standard_normal((1, HKV, L + extra, D)).astype(np.float32))  # keys past L are ignored
    v = mx.array(rng.standard_normal((1, HKV, L + extra, D)).astype(np.float32))
    return q, k, v


def _rel(a, b) -> float:
    return float(mx.abs(a - b).max() / mx.abs(b).max())


def _tiles(q, k, v, q_offset, kv=None):
    H, HKV = q.shape[1], k.shape[1]
    kv = mx.arange(H) // (H // HKV) if kv is None else kv
    return sp.make_tiles(q[0], k[0], v[0], q_offset, q.shape[-1] ** -0.5, kv)


@pytest.mark.parametrize("shape", SHAPES)
def test_dense_path_matches_reference(shape):
    q, k, v = _qkv(np.random.default_rng(0), *shape)
    off, scale = shape[3], shape[4] ** -0.5
    dense = ref.masked_attention(q, k, v, off, scale, mx.array(True))
    assert _rel(sp.dense_prefill_attention(q, k, v, off, scale), dense) <= 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_patterns_covering_every_key_equal_dense(shape):
    q, k, v = _qkv(np.random.default_rng(1), *shape)
    H, off, scale = shape[0], shape[3], shape[4] ** -0.5
    dense = ref.masked_attention(q, k, v, off, scale, mx.array(True))
    t = _tiles(q, k, v, off)
    NK = t.k.shape[1]
    every_diag = mx.broadcast_to(mx.arange(NK), (H, NK))
    assert _rel(sp.tile_attention(t, sp.diagonal_index(t, every_diag))[None], dense) <= 1e-5
    assert _rel(sp.tile_attention(t, sp.a_shape_index(t, 0, NK * 64))[None], dense) <= 1e-5
    assert _rel(sp.tile_attention(t, sp.block_sparse_index(t, NK * 64))[None], dense) <= 1e-5
    # columns duplicating the tiles must not be counted twice
    cols = mx.broadcast_to(mx.arange(t.shift, t.shift + 40, dtype=mx.int32), (H, 40))
    assert _rel(sp.tile_attention(t, sp.diagonal_index(t, every_diag, cols))[None], dense) <= 1e-5


def _random_vs_index(rng, H, L, NK, shift):
    nv, ns = int(rng.integers(1, max(2, L // 3))), int(rng.integers(1, NK + 1))
    cols = np.stack([rng.choice(L, size=min(nv, L), replace=False) for _ in range(H)])
    diags = np.stack([np.concatenate([[0], rng.choice(np.arange(1, NK), size=min(ns, NK) - 1, replace=False)])
                      for _ in range(H)])
    return mx.array(cols, dtype=mx.int32), mx.array(diags, dtype=mx.int32)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape", SHAPES)
def test_random_vertical_slash_indexes_match_reference(shape, seed):
    rng = np.random.default_rng(10 + seed)
    q, k, v = _qkv(rng, *shape)
    H, off, scale = shape[0], shape[3], shape[4] ** -0.5
    t = _tiles(q, k, v, off)
    cols, diags = _random_vs_index(rng, H, off + shape[2], t.k.shape[1], t.shift)
    out = sp.tile_attention(t, sp.diagonal_index(t, diags, cols + t.shift))[None]
    assert _rel(out, ref.vertical_slash_reference(q, k, v, off, scale, cols, diags)) <= 1e-5


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape", SHAPES)
def test_random_block_sparse_indexes_match_reference(shape, seed):
    rng = np.random.default_rng(20 + seed)
    q, k, v = _qkv(rng, *shape)
    H, off, scale = shape[0], shape[3], shape[4] ** -0.5
    t = _tiles(q, k, v, off)
    own = np.array(t.query_tiles)
    nb = int(rng.integers(1, t.k.shape[1] + 1))
    blocks = np.stack([[np.concatenate([[i], rng.choice(i + 1, size=nb, replace=True)]) for i in own]
                       for _ in range(H)])  # [H, NQ, nb+1], own tile first, repeats allowed
    ok = np.ones(blocks.shape, bool)
    ok[..., 1:] = [[[b not in row[:j + 1] for j, b in enumerate(row[1:])] for row in head] for head in blocks]
    index = sp.TileIndex(mx.array(blocks, dtype=mx.int32), mx.array(ok))
    out = sp.tile_attention(t, index)[None]
    expect = ref.block_sparse_reference(q, k, v, off, scale, mx.array(np.where(ok, blocks, -1)))
    assert _rel(out, expect) <= 1e-5


@pytest.mark.parametrize("sink,local", [(0, 1), (3, 64), (70, 100), (5, 200)])
@pytest.mark.parametrize("shape", SHAPES)
def test_a_shape_matches_reference(shape, sink, local):
    q, k, v = _qkv(np.random.default_rng(2), *shape)
    off, scale = shape[3], shape[4] ** -0.5
    out = sp.a_shape_attention(q, k, v, off, scale, sink, local)
    assert _rel(out, ref.a_shape_reference(q, k, v, off, scale, sink, -(-local // 64))) <= 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_a_shape_sinks_never_index_past_the_keys(shape):
    # more sinks than keys once gathered rows past the array: garbage that was NaN now and then
    q, k, v = _qkv(np.random.default_rng(4), *shape, extra=0)
    t = _tiles(q, k, v, shape[3])
    index = sp.a_shape_index(t, shape[2] + shape[3] + 50, 64)
    assert int(index.columns.max()) < t.k.shape[1] * 64
    assert index.columns.shape[1] == shape[2] + shape[3]


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[2] + s[3] > 300])
def test_online_kernels_match_reference_with_their_estimated_index(shape):
    q, k, v = _qkv(np.random.default_rng(3), *shape)
    off, scale = shape[3], shape[4] ** -0.5
    t = _tiles(q, k, v, off)
    vs = sp.vertical_slash_index(t, 40, 130)
    diags = t.query_tiles[-1] - vs.blocks[:, -1]
    out = sp.vertical_slash_attention(q, k, v, off, scale, 40, 130)
    assert _rel(out, ref.vertical_slash_reference(q, k, v, off, scale, vs.columns - t.shift, diags)) <= 1e-5
    bs = sp.block_sparse_index(t, 128)
    out = sp.block_sparse_attention(q, k, v, off, scale, 128)
    blocks = mx.where(bs.block_ok, bs.blocks, -1)
    assert _rel(out, ref.block_sparse_reference(q, k, v, off, scale, blocks)) <= 1e-5


def _planted(rng, H=3, HKV=1, L=1000, LQ=300, D=32, columns=(0, 137, 451, 690), slash=200):
    """Keys with a few strong columns; queries that also align with the key `slash` positions back."""
    k = rng.standard_normal((1, HKV, L, D)).astype(np.float32) * 0.3
    k[0, :, list(columns)] += 4.0 * np.ones(D, np.float32) / np.sqrt(D)
    q = np.zeros((1, H, LQ, D), np.float32) + 3.0 * np.ones(D, np.float32) / np.sqrt(D)
    pos = np.arange(L - LQ, L)
    q[0] += 6.0 * k[0, 0, pos - slash] / np.linalg.norm(k[0, 0, pos - slash], axis=-1, keepdims=True)
    v = rng.standard_normal((1, HKV, L, D)).astype(np.float32)
    return mx.array(q), mx.array(k), mx.array(v), L - LQ


def test_vertical_slash_estimate_finds_planted_columns_and_diagonal():
    q, k, v, off = _planted(np.random.default_rng(4))
    t = _tiles(q, k, v, off)
    index = sp.vertical_slash_index(t, 36, 192)  # 32 sink columns + 4
    cols = set(np.array(index.columns[0] - t.shift).tolist())
    assert {137, 451, 690} <= cols and 0 in cols
    diags = set(np.array(t.query_tiles[-1] - index.blocks[0, -1]).tolist())
    assert {0, 1} <= diags and (200 // 64 in diags or 200 // 64 + 1 in diags)


def test_per_head_dispatch_runs_each_pattern_on_its_heads():
    rng = np.random.default_rng(5)
    q, k, v = _qkv(rng, 6, 3, 150, 400, 16)
    heads = [HeadPattern("dense"), HeadPattern("vertical_and_slash", 40, 130), HeadPattern("a_shape", 4, 100),
             HeadPattern("block_sparse", 192), HeadPattern("a_shape", 4, 100), HeadPattern("a_shape", 0.5, 0.5)]
    out = sp.sparse_prefill_attention(q, k, v, 400, 0.25, heads)
    for h, p in enumerate(heads):
        expect = sp.run_pattern(p, q[:, h : h + 1], k, v, 400, 0.25, kv_heads=mx.array([h // 2]))
        assert _rel(out[:, h : h + 1], expect) <= 1e-6, (h, p)
    dense = ref.masked_attention(q, k, v, 400, 0.25, mx.array(True))
    assert _rel(out[:, 0], dense[:, 0]) <= 1e-5 and _rel(out[:, 5], dense[:, 5]) <= 1e-5  # 0.5+0.5 of L covers all


def test_config_round_trip_and_relative_budgets(tmp_path):
    cfg = SparsePatternConfig((
        (HeadPattern("vertical_and_slash", 256, 512, 0.97), HeadPattern("a_shape", 64, 0.125, 0.9)),
        (HeadPattern("block_sparse", 0.1, 0), HeadPattern("dense", 0, 0, 0.4)),
    ))
    path = save_config(cfg, tmp_path / "p.json")
    assert load_config(path) == cfg
    assert HeadPattern("a_shape", 64, 0.125).budgets(8192) == (64, 1024)
    assert HeadPattern("block_sparse", 0.1).budgets(1000) == (100, 0)
    raw = [{"0": ["stream_llm", 64, 512, 0.9]}, {"1": ["vertical_and_slash", 100, 200]}]
    loaded = SparsePatternConfig.from_json(raw, num_heads=2)
    assert loaded.layer(0) == (HeadPattern("a_shape", 64, 512, 0.9), HeadPattern("dense"))
    assert loaded.layer(1)[0].kind == "dense" and loaded.layer(1)[1].budgets(10) == (100, 200)
    with pytest.raises(ValueError):
        SparsePatternConfig.from_json([{"0": ["diagonal", 1, 2]}])


def test_shipped_config_loads_for_the_default_model():
    path = shipped_config_path("SmolLM2-135M-Instruct.Q4_1")
    assert path is not None
    cfg = load_config(path, num_heads=9)
    assert cfg.num_layers == 30 and all(len(h) == 9 for h in cfg.layers)


def test_cost_model_and_threshold():
    vs = SparsePatternConfig.uniform(HeadPattern("vertical_and_slash", 256, 512), 2, 9)
    ratios = [estimated_compute_ratio(vs.layer(0), 512, L) for L in (1024, 2048, 4096, 8192)]
    assert ratios == sorted(ratios, reverse=True) and ratios[0] > 0.8 and ratios[-1] < 0.3
    assert not should_use_sparse(1024, vs) and should_use_sparse(8192, vs)
    assert not should_use_sparse(8192, vs, q_len=1)  # decode stays dense
    dense = SparsePatternConfig.uniform(HeadPattern("dense"), 2, 9)
    assert not should_use_sparse(8192, dense)


def _position_codes(rng, pos, high: float):
    """[len(pos), 48]: 24 random-frequency (cos, sin) pairs; code(p) . code(j) = sum cos(w (p - j)),
    24 at p = j and O(sqrt(12)) noise far away (frequencies up to `high` set how fast it decays)."""
    w = rng.uniform(0, high, 24)
    return np.concatenate([np.cos(np.outer(pos, w)), np.sin(np.outer(pos, w))], axis=1).astype(np.float32)


def _synthetic_heads(rng, L=1024, LQ=256, D=64):
    """Four query heads (one kv head each) over 16 key tiles: A-shaped, vertical-slash,
    block-sparse and diffuse. Dims 0..47 carry position codes, 48..63 flags."""
    H, pos, keys = 4, np.arange(L - LQ, L), np.arange(L)
    q, k = np.zeros((H, LQ, D), np.float32), np.zeros((H, L, D), np.float32)
    # 0: sink (key 0) plus a local bump ~40 keys wide
    k[0, :, :48], q[0, :, :48] = _position_codes(np.random.default_rng(1), keys, np.pi / 80), 0.0
    q[0, :, :48] = 0.5 * _position_codes(np.random.default_rng(1), pos, np.pi / 80)
    k[0, 0, 48], q[0, :, 48] = 1.0, 12.0
    # 1: columns 100, 333, 517 and the diagonal 320 (= 5 tiles) back
    k[1, :, :48] = _position_codes(np.random.default_rng(2), keys, np.pi)
    q[1, :, :48] = 0.5 * _position_codes(np.random.default_rng(2), pos - 320, np.pi)
    k[1, [100, 333, 517], 49], q[1, :, 49] = 1.0, 12.0
    # 2: query tile i reads key tile f(i), one flag dimension per key tile
    k[2, keys, 48 + keys // 64] = 1.0
    for i, p0 in enumerate(range(0, LQ, 64)):
        q[2, p0 : p0 + 64, 48 + (5 * i + 3) % 11 + 1] = 12.0
    # 3: nearly uniform attention
    k[3] = rng.standard_normal((L, D))
    q[3] = 0.01 * rng.standard_normal((LQ, D))
    v = rng.standard_normal((H, L, D)).astype(np.float32)
    return mx.array(q[None]), mx.array(k[None]), mx.array(v[None]), L - LQ


def test_search_picks_the_pattern_each_synthetic_head_was_built_with():
    q, k, v, off = _synthetic_heads(np.random.default_rng(6))
    cands = candidate_patterns(256)
    err2, norm2 = head_errors(q, k, v, off, 1.0, cands)
    chosen = choose_patterns(np.array(err2), np.array(norm2), cands, max_error=0.2, kv_len=1024, q_len=256)
    assert [p.kind for p in chosen] == ["a_shape", "vertical_and_slash", "block_sparse", "dense"]
    assert all(0.8 <= p.score <= 1.0 for p in chosen[:3])


def test_cli_parses_search_patterns_without_mlx_import_side_effects():
    from mlx_loom.server.cli import build_parser

    ns = build_parser().parse_args(["search-patterns", "--length", "2048", "--output", "x.json"])
    assert ns.command == "search-patterns" and ns.length == 2048 and ns.model is None


def test_search_patterns_command_on_a_tiny_model(tmp_path, capsys):
    from mlx_loom.server.cli import main
    from tiny_model import make_tiny_llama_dir

    model_dir = make_tiny_llama_dir(tmp_path / "tiny")
    out = tmp_path / "patterns.json"
    argv = ["search-patterns", "--model", str(model_dir), "--length", "256", "--chunk", "64", "--budget", "64",
            "--min-kv-len", "128", "--output", str(out)]
    assert main(argv) == 0
    cfg = load_config(out)
    assert cfg.num_layers == 2 and all(len(heads) == 4 for heads in cfg.layers)
    assert str(out) in capsys.readouterr().out
