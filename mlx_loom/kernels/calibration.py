"""Calibration text for offline searches and load-time statistics, with no download.

The Python language reference shipped with every CPython (`pydoc_data.topics`, ~450K characters
of prose with code). Slices are taken by token position, so a search and its evaluation can use
disjoint parts of it.
"""

from __future__ import annotations

# Characters encoded per requested token: English prose with code runs at ~4 characters a token,
# so this margin lets a short request encode a prefix instead of the whole text.
_CHARS_PER_TOKEN = 8


def calibration_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def calibration_tokens(tokenizer, length: int, skip: int = 0) -> list[int]:
    """`length` tokens of the calibration text after the first `skip` (disjoint slices for
    searching and for evaluating)."""
    text = calibration_text()
    ids = tokenizer.encode(text[: (skip + length + 1) * _CHARS_PER_TOKEN])
    if skip + length >= len(ids):  # the prefix ran short: encode it all
        ids = tokenizer.encode(text)
    if skip + length > len(ids):
        raise ValueError(f"calibration text has {len(ids)} tokens; {skip + length} requested")
    return list(ids[skip : skip + length])
