"""Stop strings across token boundaries: nothing of the stop string is ever emitted."""

import random

import pytest

from mlx_loom.server.stop import StopMatcher


def run(stops, pieces):
    m = StopMatcher(stops)
    out = [m.feed(p) for p in pieces]
    return "".join(out) + m.flush(), m.stopped, out


def test_stop_inside_one_piece():
    assert run(["END"], ["abc END def"])[:2] == ("abc ", True)


def test_stop_split_across_pieces_is_held_back_then_dropped():
    text, stopped, out = run(["END"], ["abc E", "N", "D tail"])
    assert (text, stopped) == ("abc ", True)
    assert out == ["abc ", "", ""]  # "E" and "N" were held, never shown


def test_partial_match_released_when_it_is_not_a_stop():
    text, stopped, out = run(["END"], ["abc E", "NX", " more"])
    assert (text, stopped) == ("abc ENX more", False)
    assert out[0] == "abc "


def test_held_text_released_at_flush():
    text, stopped, _ = run(["END"], ["abc EN"])
    assert (text, stopped) == ("abc EN", False)


def test_earliest_of_several_stops_wins():
    assert run(["xyz", "b"], ["a", "bxyz"])[:2] == ("a", True)
    assert run(["\n\n", "Q:"], ["one\n", "\nQ: two"])[:2] == ("one", True)


def test_nothing_after_stop():
    m = StopMatcher(["S"])
    assert m.feed("aSb") == "a" and m.feed("more") == "" and m.flush() == ""


@pytest.mark.parametrize("seed", range(20))
def test_random_splits_match_whole_text(seed):
    rng = random.Random(seed)
    alphabet = "ab\nc"
    text = "".join(rng.choice(alphabet) for _ in range(60))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(2)]
    cuts = sorted(rng.sample(range(1, len(text)), 10))
    pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    expected = text[: min(hits)] if hits else text
    got, stopped, out = run(stops, pieces)
    assert got == expected and stopped == bool(hits)
    # Every prefix released while streaming is a prefix of the final text.
    assert all(expected.startswith("".join(out[:k])) for k in range(len(out) + 1))
