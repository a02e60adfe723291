"""Exact-state tests of the KV cache manager: tables, prefix hits, freeing tail first."""

from mlx_loom.sched.kv_cache_manager import KVCacheManager
from mlx_loom.sched.params import SamplingParams
from mlx_loom.sched.request import Request

BS = 4


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=8))


def compute(m: KVCacheManager, r: Request, n: int, hits=()) -> tuple[int, ...]:
    ids = m.allocate_slots(r, n, hits)
    assert ids is not None
    r.num_computed_tokens += len(hits) * BS + n
    m.cache_blocks(r)
    return ids


def test_table_grows_a_block_at_a_time():
    m = KVCacheManager(8, BS)
    r = req("a", list(range(6)))
    assert compute(m, r, 6) == (0, 1)
    r.append_output_token(100)
    r.append_output_token(101)
    assert compute(m, r, 1) == (0, 1)  # position 6 still fits block 1
    assert compute(m, r, 1) == (0, 1)  # position 7 fills it
    r.append_output_token(102)
    assert compute(m, r, 1) == (0, 1, 2)
    assert m.num_free_blocks == 5


def test_allocation_fails_without_side_effects_when_short():
    m = KVCacheManager(2, BS)
    r = req("a", list(range(12)))
    assert m.allocate_slots(r, 12) is None
    assert m.num_free_blocks == 2 and m.get_block_ids("a") == ()


def test_prefix_hit_shares_blocks_and_never_covers_the_last_token():
    m = KVCacheManager(8, BS)
    a = req("a", list(range(9)))
    compute(m, a, 9)  # blocks 0,1 full and cached; block 2 partial
    b = req("b", list(range(8)))
    hits, n = m.get_computed_blocks(b)
    # 8 tokens = 2 full blocks, but the last token must be computed: only block 0 is a hit.
    assert [h.block_id for h in hits] == [0] and n == 4
    c = req("c", list(range(8)) + [50, 51])
    hits, n = m.get_computed_blocks(c)
    assert [h.block_id for h in hits] == [0, 1] and n == 8
    ids = compute(m, c, 2, hits)
    assert ids == (0, 1, 3)
    assert [m.pool.blocks[i].ref_cnt for i in (0, 1, 2, 3)] == [2, 2, 1, 1]


def test_free_returns_blocks_tail_first_and_keeps_cached_ones_reusable():
    m = KVCacheManager(6, BS)
    a = req("a", list(range(10)))
    compute(m, a, 10)  # blocks 0,1 cached, 2 partial
    m.free(a)
    # Partial block 2 goes to the front; cached blocks join the back, tail (1) before head (0).
    assert m.pool.free_block_ids() == [2, 3, 4, 5, 1, 0]
    b = req("b", list(range(10)))
    hits, n = m.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1] and n == 8
    assert compute(m, b, 2, hits) == (0, 1, 2)
    assert m.pool.free_block_ids() == [3, 4, 5]


def test_hits_in_the_free_queue_count_against_free_blocks():
    m = KVCacheManager(3, BS)
    a = req("a", list(range(9)))
    compute(m, a, 9)
    m.free(a)  # all 3 free; 0 and 1 cached
    b = req("b", list(range(8)) + [60, 61, 62, 63, 64])
    hits, _ = m.get_computed_blocks(b)
    assert len(hits) == 2
    # b needs 4 blocks: 2 hits (taken from the free queue) + 2 new, only 1 left.
    assert m.allocate_slots(b, 5, hits) is None
    assert m.pool.num_free_blocks == 3 and all(h.ref_cnt == 0 for h in hits)


def test_prefix_caching_off_never_hits():
    m = KVCacheManager(4, BS, enable_caching=False)
    a = req("a", list(range(9)))
    compute(m, a, 9)
    assert m.get_computed_blocks(req("b", list(range(9)))) == ([], 0)
    assert m.pool.num_cached_blocks == 0
