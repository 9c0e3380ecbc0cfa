"""Replication scenarios written as text scripts (tests/testdata/replication/*.txt).

Each script drives real :class:`flowray.core.replication.Node` objects over a network that
delivers only what the script says, with fake disks. Commands (node ids are numbers):

    nodes N [append_bytes_max B]   start N replicas with ids 1..N
    tick ID [COUNT]                 tick one replica (elections start only by 'campaign':
                                    timeouts are 19 ticks, leases 10)
    campaign ID                     the replica stands for election now
    gone ID PEER                    the replica saw PEER's connection end (leader_gone)
    propose ID NAME [fails]         propose a payload on a replica (or expect refusal)
    deliver [A->B]                  deliver pending messages (all, or A to B), until quiet
    drop [A->B]                     drop pending messages (all, or A to B)
    cut A->B / mend A->B            lose every message from A to B from now on (one way)
    pause ID                        the replica's process stops: no ticks, and messages
                                    to it wait (in its socket) instead of arriving
    resume ID TICKS                 it runs again: first the TICKS the clock owes it
                                    (as the shell feeds them), then what waited arrives
    crash ID / restart ID           crash keeps only what was persisted
    wipe ID                         the replica comes back on a new, empty disk
    expect role ID ROLE             master, follower or candidate
    expect term ID T / expect commit ID C / expect last ID L / expect abstain ID A|None
    expect log ID T1 T2 ...         the persisted log, as the term of each entry
    expect sent A->B N              entries in the messages from A to B not yet delivered
    expect payloads ID P1 P2 ...    payloads of the persisted data entries
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from flowray.core.replication import ABSTAIN_UNKNOWN, Msg, Node, NotMaster, Timing
from flowray.storage.segment import KIND_DATA
from flowray.testing.simulator import MemLog

SCRIPTS = sorted((Path(__file__).parent / "testdata" / "replication").glob("*.txt"))


class _LateRng(random.Random):
    """Election timeouts at their longest, so a script's ticks never start an election
    by surprise: a replica stands only when the script says 'campaign'."""

    def randrange(self, *args: int, **_: object) -> int:  # type: ignore[override]
        return args[-1] - 1 if len(args) == 1 else args[1] - 1


class Harness:
    def __init__(self, n: int, append_bytes_max: int) -> None:
        self.ids = list(range(1, n + 1))
        self.append_bytes_max = append_bytes_max
        self.disks = {i: MemLog() for i in self.ids}
        self.nodes: dict[int, Node | None] = {i: self._boot(i) for i in self.ids}
        self.pending: list[Msg] = []
        self.cut: set[tuple[int, int]] = set()
        self.paused: set[int] = set()

    def _boot(self, i: int) -> Node:
        disk = self.disks[i]
        return Node(
            i,
            self.ids,
            disk,
            disk.term,
            disk.voted_for,
            Timing(10, 2),
            _LateRng(),
            append_bytes_max=self.append_bytes_max,
            abstain=disk.abstain,
        )

    def node(self, i: int) -> Node:
        node = self.nodes[i]
        assert node is not None, f"replica {i} is down"
        assert i not in self.paused, f"replica {i} is paused"
        return node

    def flush(self, i: int) -> None:
        node = self.nodes[i]
        while node is not None and node.has_ready():
            rd = node.ready()
            self.disks[i].persist(rd)
            self.pending.extend(rd.messages)
            node.advance(rd)

    def deliver(self, src: int | None, dst: int | None) -> None:
        for _ in range(1000):
            batch = [m for m in self.pending if _matches(m, src, dst) and m.dst not in self.paused]
            if not batch:
                return
            self.pending = [m for m in self.pending if m not in batch]
            for msg in batch:
                node = self.nodes.get(msg.dst)
                if node is not None and (msg.src, msg.dst) not in self.cut:
                    node.step(msg)
                    self.flush(msg.dst)
        raise AssertionError("messages never stopped flowing")

    def run(self, words: list[str], where: str) -> None:
        cmd, args = words[0], words[1:]
        if cmd == "tick":
            for _ in range(int(args[1]) if len(args) > 1 else 1):
                self.node(int(args[0])).tick()
            self.flush(int(args[0]))
        elif cmd == "campaign":
            self.node(int(args[0])).campaign()
            self.flush(int(args[0]))
        elif cmd == "gone":  # gone NODE PEER: NODE saw PEER's connection end
            self.node(int(args[0])).leader_gone(int(args[1]))
            self.flush(int(args[0]))
        elif cmd == "transfer":  # transfer FROM TO
            self.node(int(args[0])).transfer(int(args[1]))
            self.flush(int(args[0]))
        elif cmd == "propose":
            self._propose(int(args[0]), args[1], fails=args[2:] == ["fails"], where=where)
        elif cmd in ("deliver", "drop"):
            src, dst = _route(args)
            if cmd == "deliver":
                self.deliver(src, dst)
            else:
                self.pending = [m for m in self.pending if not _matches(m, src, dst)]
        elif cmd in ("cut", "mend"):
            src, dst = (int(x) for x in args[0].split("->"))
            if cmd == "cut":
                self.cut.add((src, dst))
            else:
                self.cut.discard((src, dst))
        elif cmd == "pause":
            self.node(int(args[0]))
            self.paused.add(int(args[0]))
        elif cmd == "resume":
            self.paused.discard(int(args[0]))
            for _ in range(int(args[1])):
                self.node(int(args[0])).tick()
            self.flush(int(args[0]))
        elif cmd == "crash":
            self.nodes[int(args[0])] = None
            self.pending = [m for m in self.pending if m.src != int(args[0])]
        elif cmd == "restart":
            self.nodes[int(args[0])] = self._boot(int(args[0]))
        elif cmd == "wipe":
            self.disks[int(args[0])] = MemLog(abstain=ABSTAIN_UNKNOWN)
            self.nodes[int(args[0])] = self._boot(int(args[0]))
        elif cmd == "expect":
            self._expect(args, where)
        else:
            raise AssertionError(f"{where}: unknown command {cmd!r}")

    def _propose(self, i: int, name: str, fails: bool, where: str) -> None:
        try:
            self.node(i).propose([(KIND_DATA, 0, 0, 0, name.encode())])
        except NotMaster:
            assert fails, f"{where}: replica {i} refused a proposal"
            return
        assert not fails, f"{where}: replica {i} accepted a proposal it should refuse"
        self.flush(i)

    def _expect(self, args: list[str], where: str) -> None:
        if args[0] == "sent":
            src, dst = _route(args[1:2])
            sent = sum(len(m.entries) for m in self.pending if _matches(m, src, dst))
            assert [str(sent)] == args[2:], f"{where}: {sent} entries wait, expected {args[2:]}"
            return
        what, i, rest = args[0], int(args[1]), args[2:]
        node, disk = self.nodes[i], self.disks[i]
        if what == "log":
            got: list[str] = [str(e.term) for e in disk.entries]
        elif what == "payloads":
            got = [e.payload.decode() for e in disk.entries if e.kind == KIND_DATA]
        else:
            assert node is not None, f"{where}: replica {i} is down"
            value = {
                "role": node.role.value,
                "term": node.term,
                "commit": node.commit_index,
                "last": node.last_index,
                "abstain": node.abstain,
            }[what]
            got = [str(value)]
        assert got == rest, f"{where}: {what} of replica {i} is {got}, expected {rest}"


def _route(args: list[str]) -> tuple[int | None, int | None]:
    if not args:
        return None, None
    src, dst = args[0].split("->")
    return (None if src == "*" else int(src)), (None if dst == "*" else int(dst))


def _matches(msg: Msg, src: int | None, dst: int | None) -> bool:
    return (src is None or msg.src == src) and (dst is None or msg.dst == dst)


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_scenario(script: Path) -> None:
    harness: Harness | None = None
    for number, line in enumerate(script.read_text().splitlines(), start=1):
        words = line.split("#")[0].split()
        if not words:
            continue
        where = f"{script.name}:{number}"
        if words[0] == "nodes":
            limit = int(words[3]) if len(words) > 3 else 8 * 1024 * 1024
            harness = Harness(int(words[1]), limit)
            continue
        assert harness is not None, f"{where}: 'nodes N' must come first"
        harness.run(words, where)


def test_there_are_scenarios() -> None:
    assert len(SCRIPTS) >= 6
