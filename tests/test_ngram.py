"""Prompt-lookup proposer (mlx_loom/spec/ngram.py): exact cases, both search paths against a brute force."""

import random
import statistics
import time

import pytest

from mlx_loom.spec import ngram
from mlx_loom.spec.ngram import NgramProposer


def brute_force(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """The definition: longest n first, then the most recent earlier occurrence of the n-suffix."""
    if k <= 0:
        return []
    for n in range(max_n, min_n - 1, -1):
        if len(tokens) < n + 1:
            continue
        pattern = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == pattern:
                return tokens[start + n:start + n + k]
    return []


@pytest.fixture(params=["reversed", "bytes"])
def search_path(request, monkeypatch):
    """Run each test on both search paths (budget 0 sends every call to the bytes scan)."""
    if request.param == "bytes":
        monkeypatch.setattr(ngram, "_CANDIDATE_BUDGET", 0)
    return request.param


@pytest.mark.parametrize("tokens, k, max_n, expect", [
    ([1, 2, 3, 1, 2], 2, 4, [3, 1]),  # [1, 2] seen at 0
    ([1, 2, 9, 1, 2, 8, 1, 2], 1, 4, [8]),  # the most recent occurrence wins
    ([5, 1, 2, 7, 3, 2, 8, 1, 2], 1, 4, [7]),  # a longer match beats a more recent shorter one
    ([5, 1, 2, 7, 3, 2, 8, 1, 2], 1, 1, [8]),  # max_n = 1: only the last token is matched
    ([4, 5, 4], 3, 4, [5, 4]),  # stops at the end of the sequence
    ([7, 7, 7], 4, 4, [7]),  # overlapping occurrence ([7, 7] at 0)
    ([1, 2, 3], 2, 4, []),  # no earlier occurrence
    ([1, 2, 3, 1], 0, 4, []),  # k <= 0
    ([1], 2, 4, []),
    ([], 2, 4, []),
])
def test_cases(search_path, tokens, k, max_n, expect):
    assert NgramProposer(1, max_n).propose(tokens, k) == expect


def test_min_n(search_path):
    assert NgramProposer(2, 3).propose([1, 2, 3, 1], 2) == []  # only [1] would match
    assert NgramProposer(2, 3).propose([3, 1, 2, 3, 1], 2) == [2, 3]


def test_accepts_any_sequence(search_path):
    assert NgramProposer().propose((1, 2, 3, 1, 2), 1) == [3]
    assert NgramProposer().propose(range(3), 1) == []


@pytest.mark.parametrize("vocab", [2, 3, 8, 50])
def test_matches_brute_force(search_path, vocab):
    rng = random.Random(vocab)
    for trial in range(300):
        tokens = [rng.randrange(vocab) for _ in range(rng.randrange(0, 120))]
        min_n = rng.randint(1, 3)
        max_n = rng.randint(min_n, 5)
        k = rng.randint(0, 6)
        got = NgramProposer(min_n, max_n).propose(tokens, k)
        assert got == brute_force(tokens, k, min_n, max_n), (tokens, k, min_n, max_n)


def test_frequent_last_token_goes_over_budget_to_the_bytes_scan():
    tokens = [1, 2] * 200 + [3, 2]  # 200 occurrences of the last token, none preceded by 3
    assert ngram._scan_reversed(tokens, 1, 4) == -1
    assert NgramProposer().propose(tokens, 3) == brute_force(tokens, 3, 1, 4) == [3, 2]


def test_invalid_n():
    with pytest.raises(ValueError, match="min_n <= max_n"):
        NgramProposer(3, 2)
    with pytest.raises(ValueError, match="1 <= min_n"):
        NgramProposer(0, 2)


@pytest.mark.parametrize("vocab", [3, 50, 49152])
def test_fast_on_2k_tokens(vocab):
    """A loose guard (shared CI CPUs): the bench measures ~tens of microseconds."""
    rng = random.Random(0)
    tokens = [rng.randrange(vocab) for _ in range(2000)]
    proposer = NgramProposer()
    times = []
    for _ in range(50):
        start = time.perf_counter()
        proposer.propose(tokens, 4)
        times.append(time.perf_counter() - start)
    assert statistics.median(times) < 1e-3
