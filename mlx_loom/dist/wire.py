"""The step frame: what every rank needs to run a step, as int32 arrays (numpy only, no mlx).

A frame is FRAME int32 values: an 8-value header [magic, op, payload length, step, rows, 0...] and the
payload's first FRAME - HEADER values; a longer payload follows in one more message of exactly the
remaining length (the header says how long). Rows are encoded as 7 values each
[id_hi, id_lo, start_pos, num_tokens, num_blocks, sample, num_draft], then every row's tokens, then
every row's block table. Request ids travel as a 64-bit hash: the followers only need the same
identity (the decode mirror keys rows by id), never the text.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mlx_loom.sched.scheduler import ScheduledRow

MAGIC = 0x4C6F6F6D  # "Loom"
HEADER = 8
FRAME = 512
ROW_FIELDS = 7

OP_STEP = 1  # run runner.execute(rows)
OP_STOP = 2  # rank 0 is shutting down: leave the loop
OP_PING = 3  # nothing to run; proves every rank is alive while rank 0 idles
OP_DISCARD = 4  # runner.discard_derived() (after a failed step)
OPS = {OP_STEP: "step", OP_STOP: "stop", OP_PING: "ping", OP_DISCARD: "discard"}


class FrameError(ValueError):
    """A frame that is not ours (another program on the group, or a torn message)."""


@dataclass(frozen=True)
class Header:
    op: int
    length: int  # payload values
    step: int
    count: int  # rows (OP_STEP)


def id_words(request_id: str) -> tuple[int, int]:
    """A request id as two int32 values (64-bit blake2b)."""
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    hi, lo = np.frombuffer(digest, dtype=np.int32)
    return int(hi), int(lo)


def encode_rows(rows: Sequence[ScheduledRow]) -> np.ndarray:
    """rows -> int32 payload: 7 values per row, then the tokens, then the block tables."""
    meta = np.empty((len(rows), ROW_FIELDS), dtype=np.int32)
    for i, r in enumerate(rows):
        meta[i] = (*id_words(r.request_id), r.start_pos, len(r.token_ids), len(r.block_ids), int(r.sample),
                   r.num_draft)
    tokens = [t for r in rows for t in r.token_ids]
    blocks = [b for r in rows for b in r.block_ids]
    return np.concatenate([meta.reshape(-1), np.asarray(tokens, dtype=np.int32),
                           np.asarray(blocks, dtype=np.int32)]).astype(np.int32)


def decode_rows(payload: np.ndarray, count: int) -> list[ScheduledRow]:
    """The inverse of encode_rows for `count` rows (request ids become 'r<hi>:<lo>')."""
    values = payload.tolist()
    meta = [values[i * ROW_FIELDS:(i + 1) * ROW_FIELDS] for i in range(count)]
    tok_at = count * ROW_FIELDS
    blk_at = tok_at + sum(m[3] for m in meta)
    if blk_at + sum(m[4] for m in meta) != len(values):
        raise FrameError("row payload lengths do not add up")
    rows = []
    for hi, lo, start, ntok, nblk, sample, draft in meta:
        rows.append(ScheduledRow(f"r{hi}:{lo}", tuple(values[tok_at:tok_at + ntok]), start,
                                 tuple(values[blk_at:blk_at + nblk]), bool(sample), draft))
        tok_at, blk_at = tok_at + ntok, blk_at + nblk
    return rows


def frame(op: int, payload: np.ndarray, step: int, count: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """(the first FRAME values, the rest of the payload or None); count: rows in a step's payload."""
    first = np.zeros(FRAME, dtype=np.int32)
    first[:5] = (MAGIC, op, len(payload), step, count)
    head = payload[:FRAME - HEADER]
    first[HEADER:HEADER + len(head)] = head
    rest = payload[FRAME - HEADER:]
    return first, (rest if len(rest) else None)


def read_header(first: np.ndarray) -> Header:
    if int(first[0]) != MAGIC or int(first[1]) not in OPS:
        raise FrameError(f"not an mlx-loom step frame (header {first[:4].tolist()}): this rank and rank 0 are "
                         "out of step (a collective of one matched another of the other)")
    return Header(int(first[1]), int(first[2]), int(first[3]), int(first[4]))


def payload_of(first: np.ndarray, header: Header, rest: np.ndarray | None) -> np.ndarray:
    head = first[HEADER:HEADER + min(header.length, FRAME - HEADER)]
    return head if rest is None else np.concatenate([head, rest])
