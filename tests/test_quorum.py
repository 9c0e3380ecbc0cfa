"""Table test of the majority commit rule, in the manner of etcd raft's quorum tests.

Each row is: voters, the known durable index per voter (None = unknown), and the index
that is committed. Voters absent from the mapping are unknown too.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowray.core.invariant import InvariantError
from flowray.core.quorum import committed_index, majority


@pytest.mark.parametrize(
    ("voters", "expected"), [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3), (6, 4), (7, 4)]
)
def test_majority(voters: int, expected: int) -> None:
    assert majority(voters) == expected


@pytest.mark.parametrize("voters", [0, -1])
def test_majority_needs_a_voter(voters: int) -> None:
    with pytest.raises(InvariantError):
        majority(voters)


CASES: list[tuple[int, dict[int, int | None], int]] = [
    # ---- one voter: its own log is the majority
    (1, {}, 0),
    (1, {1: None}, 0),
    (1, {1: 0}, 0),
    (1, {1: 7}, 7),
    # ---- three voters: the second highest
    (3, {}, 0),
    (3, {1: 5}, 0),
    (3, {1: 5, 2: None, 3: None}, 0),
    (3, {1: 5, 2: 3}, 3),
    (3, {1: 5, 2: 3, 3: None}, 3),
    (3, {1: 5, 2: 3, 3: 4}, 4),
    (3, {1: 5, 2: 5, 3: 1}, 5),  # tie at the top
    (3, {1: 2, 2: 2, 3: 2}, 2),  # all equal
    (3, {1: 9, 2: 0, 3: 0}, 0),
    (3, {1: 1, 2: 9, 3: 3}, 3),  # order of voter ids does not matter
    (3, {7: 4, 8: 6}, 4),  # arbitrary voter ids
    # ---- five voters: the third highest
    (5, {}, 0),
    (5, {1: 10, 2: 10}, 0),
    (5, {1: 10, 2: 10, 3: None, 4: None, 5: None}, 0),
    (5, {1: 10, 2: 9, 3: 8}, 8),
    (5, {1: 10, 2: 9, 3: 8, 4: None}, 8),
    (5, {1: 10, 2: 9, 3: 8, 4: 7, 5: 6}, 8),
    (5, {1: 1, 2: 2, 3: 3, 4: 4, 5: 5}, 3),
    (5, {1: 4, 2: 4, 3: 2, 4: 2, 5: 2}, 2),  # 2 vs 3 tie: the bigger side wins
    (5, {1: 4, 2: 4, 3: 4, 4: 2, 5: 2}, 4),
    (5, {1: 6, 2: None, 3: 6, 4: None, 5: 6}, 6),
    (5, {1: 6, 2: None, 3: 6, 4: None, 5: 0}, 0),
    # ---- even groups: a tie of halves never commits the higher half
    (2, {1: 5, 2: 3}, 3),
    (2, {1: 5}, 0),
    (4, {1: 8, 2: 8, 3: 2, 4: 2}, 2),
    (4, {1: 8, 2: 8, 3: 8, 4: None}, 8),
]


@pytest.mark.parametrize(("voters", "match", "expected"), CASES)
def test_committed_index(voters: int, match: dict[int, int | None], expected: int) -> None:
    assert committed_index(match, voters) == expected


def test_more_acks_than_voters_is_a_bug() -> None:
    with pytest.raises(InvariantError):
        committed_index({1: 1, 2: 1, 3: 1, 4: 1}, 3)


@given(
    voters=st.sampled_from([1, 3, 5]),
    data=st.data(),
)
@settings(max_examples=200, deadline=None)
def test_committed_index_is_held_by_a_majority(voters: int, data: st.DataObject) -> None:
    """The committed index is the largest i that at least a majority of voters hold."""
    match = data.draw(
        st.dictionaries(
            st.integers(1, voters), st.one_of(st.none(), st.integers(0, 20)), max_size=voters
        )
    )
    got = committed_index(match, voters)
    held = [m or 0 for m in match.values()]
    assert sum(h >= got for h in held) >= majority(voters) or got == 0
    assert sum(h >= got + 1 for h in held) < majority(voters)
    # Learning more acks never lowers the commit index.
    more = dict(match)
    for v in range(1, voters + 1):
        more[v] = max(more.get(v) or 0, got)
    assert committed_index(more, voters) >= got
