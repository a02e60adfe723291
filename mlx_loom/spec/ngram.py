"""Prompt-lookup drafting: propose the tokens that followed the latest earlier copy of the suffix.

Pure Python (no mlx), run per row per step, so the search stays in C where it can: it walks a
reversed copy of the sequence with `list.index` over occurrences of the last token and measures
each one's match length backwards. When the last token is so frequent that this visits more than
`_CANDIDATE_BUDGET` occurrences, it switches to `bytes.rfind` over the int32 image of the
sequence (one pass per n, cost independent of the content). Either way a 2k-token row costs
tens of microseconds (bench: benchmarks/bench_spec_acceptance.py reports it).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

_CANDIDATE_BUDGET = 64  # real text visits a median of 3 occurrences, p99 ~110 (2k-4k tokens)


class NgramProposer:
    def __init__(self, min_n: int = 1, max_n: int = 4):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k tokens after the most recent earlier occurrence of the longest matching suffix
        (n from max_n down to min_n); [] when nothing matches or k <= 0."""
        if k <= 0 or len(tokens) < self.min_n + 1:
            return []
        tokens = tokens if isinstance(tokens, list) else list(tokens)
        start = _scan_reversed(tokens, self.min_n, self.max_n)
        if start == -1:
            start = _scan_bytes(tokens, self.min_n, self.max_n)
        return [] if start is None else tokens[start:start + k]


def _scan_reversed(tokens: list[int], min_n: int, max_n: int) -> int | None:
    """Index just after the chosen occurrence, None when there is none, -1 when over budget.

    Candidates p >= 1 in rev (an occurrence ending at L-1-p) come in order of recency; the first
    whose match length reaches max_n wins, else the most recent one of the longest length >= min_n.
    """
    rev = tokens[::-1]  # rev[p] = tokens[L-1-p]; the suffix is rev[:n]
    size, last = len(rev), rev[0]
    best_len, best_p, p = 0, None, 0
    for _ in range(_CANDIDATE_BUDGET):
        try:
            p = rev.index(last, p + 1)
        except ValueError:
            return None if best_p is None else size - best_p
        limit = min(max_n, size - p)  # an occurrence cannot start before the sequence
        n = 1
        while n < limit and rev[p + n] == rev[n]:
            n += 1
        if n > best_len and n >= min_n:
            best_len, best_p = n, p
            if n == max_n:
                return size - p
    return -1


def _scan_bytes(tokens: list[int], min_n: int, max_n: int) -> int | None:
    """Same answer as _scan_reversed, by rfind of each suffix in the int32 bytes (4 bytes a token)."""
    buf = array("i", tokens).tobytes()
    end = len(buf) - 4  # the occurrence must end before the last token
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        pattern = buf[-4 * n:]
        pos = buf.rfind(pattern, 0, end)
        while pos > 0 and pos % 4:  # a hit straddling token boundaries: look further back
            pos = buf.rfind(pattern, 0, pos + 4 * n - 1)
        if pos >= 0:
            return pos // 4 + n
    return None
