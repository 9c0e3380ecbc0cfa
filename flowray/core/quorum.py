"""The majority commit rule, on its own so it can be read and table-tested at once.

A group of N voters commits index i when a majority (N // 2 + 1) of them, the master
included, hold the log up to i durably. Voters whose progress is unknown (no answer
yet, or down) count as holding nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

from flowray.core.invariant import require


def majority(voters: int) -> int:
    """How many voters make a majority of ``voters``."""
    require(voters >= 1, "a group has at least one voter")
    return voters // 2 + 1


def committed_index(match: Mapping[int, int | None], voters: int) -> int:
    """The highest index that a majority of the voters has durably appended.

    ``match`` maps a voter id to the last index known durable on it, or ``None`` when
    unknown. Voters missing from ``match`` are unknown too.
    """
    require(len(match) <= voters, "more acks than voters")
    known = sorted((m or 0 for m in match.values()), reverse=True)
    known += [0] * (voters - len(known))
    return known[majority(voters) - 1]
