"""Exact-state tests of the block pool: ids handed out, ref counts, eviction order."""

import pytest

from mlx_loom.sched.block_pool import BlockPool, hash_block_tokens


def test_new_blocks_come_from_the_front_in_id_order():
    pool = BlockPool(4)
    got = pool.get_new_blocks(3)
    assert [b.block_id for b in got] == [0, 1, 2]
    assert [b.ref_cnt for b in got] == [1, 1, 1]
    assert pool.free_block_ids() == [3]


def test_asking_for_more_than_free_raises():
    pool = BlockPool(2)
    with pytest.raises(ValueError, match="only 2 free"):
        pool.get_new_blocks(3)


def test_unhashed_block_goes_to_front_hashed_to_back():
    pool = BlockPool(4)
    a, b, c = pool.get_new_blocks(3)
    assert pool.cache_full_block(a, hash_block_tokens(None, [1, 2]))
    pool.free_blocks([a, b])
    # b (no hash, nothing worth keeping) is reused first; a (cached) is evicted last.
    assert pool.free_block_ids() == [b.block_id, 3, a.block_id]
    assert pool.num_cached_blocks == 1


def test_touch_takes_a_cached_block_back_from_the_free_queue():
    pool = BlockPool(3)
    (a,) = pool.get_new_blocks(1)
    h = hash_block_tokens(None, [7, 8])
    pool.cache_full_block(a, h)
    pool.free_blocks([a])
    assert pool.get_cached_block(h) is a and a.ref_cnt == 0
    pool.touch([a])
    assert a.ref_cnt == 1 and a.block_id not in pool.free_block_ids()
    pool.touch([a])
    assert a.ref_cnt == 2
    pool.free_blocks([a])
    assert a.ref_cnt == 1 and a.block_id not in pool.free_block_ids()


def test_eviction_drops_the_hash():
    pool = BlockPool(2)
    a, b = pool.get_new_blocks(2)
    h = hash_block_tokens(None, [1])
    pool.cache_full_block(a, h)
    pool.free_blocks([a, b])
    assert pool.free_block_ids() == [b.block_id, a.block_id]
    pool.get_new_blocks(2)  # evicts a too
    assert pool.get_cached_block(h) is None and a.block_hash is None


def test_duplicate_hash_keeps_the_first_block():
    pool = BlockPool(2)
    a, b = pool.get_new_blocks(2)
    h = hash_block_tokens(None, [5])
    assert pool.cache_full_block(a, h)
    assert not pool.cache_full_block(b, h)
    assert pool.get_cached_block(h) is a and b.block_hash is None


def test_double_free_is_caught():
    pool = BlockPool(1)
    (a,) = pool.get_new_blocks(1)
    pool.free_blocks([a])
    with pytest.raises(AssertionError):
        pool.free_blocks([a])


def test_chained_hash_depends_on_the_prefix():
    h1 = hash_block_tokens(None, [1, 2])
    assert hash_block_tokens(h1, [3, 4]) != hash_block_tokens(hash_block_tokens(None, [9, 9]), [3, 4])
    assert hash_block_tokens(h1, [3, 4]) == hash_block_tokens(hash_block_tokens(None, [1, 2]), [3, 4])
