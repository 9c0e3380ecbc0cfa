"""A deterministic simulator of a shard group: the real replication core, a fake
network and a fake disk, all driven by one seeded random generator.

The network drops, delays (now and then by a whole election timeout), duplicates and
reorders messages, partitions replicas and cuts single links in one direction; a
replica's process may pause (no ticks, its incoming messages wait) and resume, fed
the ticks it was owed first, as the Ray shell does; the disk loses the unsynced part
of a write when a replica crashes mid-persist, a replica whose disk is corrupted
stays down, and a replica may come back on a new, empty disk (its node lost: it
abstains until caught up). After every step the simulator checks:

- at most one master per term;
- replicas agree on every committed index (same term, same payload);
- every acknowledged proposal is committed at its index and is never lost;
- every master holds every committed entry;
- a master that resumes after a pause of an election timeout or more is no longer
  master once it has taken the ticks it was owed (it reads nothing before them).

At the end the network heals and every replica must converge to the same log. A
failure names its seed; ``python -m flowray.testing.simulator --seed N`` replays it exactly.
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass, field

from flowray.core.invariant import InvariantError, require
from flowray.core.replication import ABSTAIN_UNKNOWN, Msg, Node, NotMaster, Ready, Role, Timing
from flowray.storage.segment import KIND_DATA, Entry

# Each step re-checks the newest committed entries of every replica; the end of a run
# compares every replica's whole log.
CHECK_WINDOW = 4


class SimulationFailure(AssertionError):
    pass


class MemLog:
    """The durable part of a replica's log (what survives a crash)."""

    def __init__(self, abstain: int | None = None) -> None:
        self.entries: list[Entry] = []
        self.term = 0
        self.voted_for: int | None = None
        self.abstain = abstain  # a new disk in place of a lost one: ABSTAIN_UNKNOWN

    @property
    def last_index(self) -> int:
        return len(self.entries)

    def term_at(self, index: int) -> int:
        return 0 if index == 0 else self.entries[index - 1].term

    def read(self, from_index: int, bytes_max: int) -> list[Entry]:
        out: list[Entry] = []
        size = 0
        for entry in self.entries[from_index - 1 :]:
            out.append(entry)
            size += len(entry.payload)
            if size >= bytes_max:
                break
        return out

    def persist(self, rd: Ready, entries_kept: int | None = None) -> None:
        """Apply a Ready; ``entries_kept`` < len models a crash in the middle."""
        if rd.hard_state_changed:
            self.term, self.voted_for, self.abstain = rd.term, rd.voted_for, rd.abstain
        if rd.truncate_after is not None:
            del self.entries[rd.truncate_after :]
        for entry in rd.entries[: len(rd.entries) if entries_kept is None else entries_kept]:
            require(entry.index == self.last_index + 1, "the fake disk got a gap")
            self.entries.append(entry)


@dataclass
class Faults:
    drop: float = 0.05
    duplicate: float = 0.03
    delay_ticks_max: int = 3
    crash: float = 0.01
    crash_mid_persist: float = 0.5
    restart: float = 0.1
    partition: float = 0.01
    heal: float = 0.05
    corrupt: float = 0.002
    propose: float = 0.3
    transfer: float = 0.01  # the master is asked to hand mastership over
    wipe: float = 0.2  # a replica comes back on a new, empty disk (its node was lost)
    # A replica is told a peer's connection ended (Node.leader_gone): after a crash,
    # the survivors mostly are; at other times, spuriously (a connection that broke).
    gone_on_crash: float = 0.8
    gone_spurious: float = 0.02
    pause: float = 0.01  # a replica's process stops (SIGSTOP, a long GC or VM stall)
    pause_ticks_max: int = 40
    one_way: float = 0.01  # one direction of one link is cut (heals with the partition)
    delay_spike: float = 0.01  # a message is held up to delay_spike_ticks_max
    delay_spike_ticks_max: int = 25


@dataclass
class _InFlight:
    due: int
    seq: int
    msg: Msg


@dataclass
class Simulation:
    seed: int
    replicas: int = 3
    faults: Faults = field(default_factory=Faults)
    timing: Timing = field(default_factory=lambda: Timing(election_ticks=10, heartbeat_ticks=2))

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.ids = list(range(self.replicas))
        self.disks = {i: MemLog() for i in self.ids}
        self.nodes: dict[int, Node | None] = {i: self._boot(i) for i in self.ids}
        self.dead_forever: set[int] = set()
        self.blocked: set[tuple[int, int]] = set()
        self.paused: dict[int, int] = {}  # replica -> the tick it resumes at
        self.paused_since: dict[int, int] = {}
        self.pauses = 0
        self.master_pauses = 0
        self.stepped_down_after_pause = 0
        self.network: list[_InFlight] = []
        self.now = 0
        self.seq = 0
        self.leaders: dict[int, int] = {}
        self.committed: dict[int, tuple[int, bytes]] = {}
        # The term in which each index was first seen committed: masters of later
        # terms must hold it (Raft's leader completeness); a deposed master need not.
        self.committed_in: dict[int, int] = {}
        self.committed_upto = 0
        self.pending: list[tuple[int, int, int, bytes]] = []  # (node, index, term, payload)
        self.acked: dict[int, tuple[int, bytes]] = {}
        self.proposals = 0
        self.transfers = 0
        self.wipes = 0

    def _boot(self, i: int) -> Node:
        disk = self.disks[i]
        return Node(
            i,
            self.ids,
            disk,
            disk.term,
            disk.voted_for,
            self.timing,
            random.Random(self.rng.getrandbits(32)),
            abstain=disk.abstain,
        )

    # ---- one step --------------------------------------------------------------------
    def step(self) -> None:
        self.now += 1
        f = self.faults
        self._maybe_faults(f)
        for i in self.ids:
            node = self.nodes[i]
            if i in self.paused and self.paused[i] <= self.now:
                self._resume(i)
            elif node is not None and i not in self.paused:
                node.tick()
                self._ready(i)
        self._deliver()
        if self.rng.random() < f.propose:
            self._propose()
        self._collect_acks()
        self.check()

    def _maybe_faults(self, f: Faults) -> None:
        live = [i for i in self.ids if self.nodes[i] is not None]
        down = [i for i in self.ids if self.nodes[i] is None and i not in self.dead_forever]
        if live and self.rng.random() < f.crash:
            self._crash(self.rng.choice(live))
        if down and self.rng.random() < f.restart:
            i = self.rng.choice(down)
            if self.rng.random() < f.wipe and self._lost() == 0:
                # One lost disk at a time: a second, before the first replica has caught
                # up, would be a majority's data lost in a group of three.
                self.disks[i] = MemLog(abstain=ABSTAIN_UNKNOWN)
                self.wipes += 1
            self.nodes[i] = self._boot(i)
        tolerable = self._lost() + 1 < self.replicas // 2 + 1
        if live and tolerable and self.rng.random() < f.corrupt:
            victim = self.rng.choice(live)
            self._crash(victim)
            self.dead_forever.add(victim)  # a corrupt log refuses to start
        if self.replicas > 1 and self.rng.random() < f.partition:
            group = set(self.rng.sample(self.ids, self.rng.randint(1, self.replicas - 1)))
            self.blocked = {
                (a, b) for a in self.ids for b in self.ids if (a in group) != (b in group)
            }
        elif self.blocked and self.rng.random() < f.heal:
            self.blocked = set()
        if self.replicas > 1 and self.rng.random() < f.one_way:
            a, b = self.rng.sample(self.ids, 2)
            self.blocked.add((a, b))
        running = [i for i in live if i not in self.paused and self.nodes[i] is not None]
        if running and self.rng.random() < f.pause:
            i = self.rng.choice(running)
            self.paused[i] = self.now + self.rng.randint(1, f.pause_ticks_max)
            self.paused_since[i] = self.now
            self.pauses += 1
            node = self.nodes[i]
            if node is not None and node.role == Role.MASTER:
                self.master_pauses += 1
        up = [n for i, n in self.nodes.items() if n is not None and i not in self.paused]
        if up and self.replicas > 1 and self.rng.random() < f.gone_spurious:
            self.rng.choice(up).leader_gone(self.rng.choice(self.ids))
        masters = [
            i
            for i in self.ids
            if (n := self.nodes[i]) is not None and n.role == Role.MASTER and i not in self.paused
        ]
        if masters and self.replicas > 1 and self.rng.random() < f.transfer:
            i = self.rng.choice(masters)
            node = self.nodes[i]
            require(node is not None, "master vanished")
            node.transfer(self.rng.choice([p for p in self.ids if p != i]))  # type: ignore[union-attr]
            self.transfers += 1
            self._ready(i)

    def _lost(self) -> int:
        """Replicas not to be counted on: dead for good, or abstaining after a wipe."""
        return len(self.dead_forever) + sum(
            1 for i in self.ids if i not in self.dead_forever and self.disks[i].abstain is not None
        )

    def _resume(self, i: int) -> None:
        """The paused process runs again: the ticks it is owed come first, then it reads
        what waited for it (delivered from the next _deliver on)."""
        owed = self.now - self.paused_since.pop(i)
        del self.paused[i]
        node = self.nodes[i]
        if node is None:
            return
        for _ in range(owed):
            node.tick()
        if owed >= self.timing.election_ticks:
            self._require(
                node.role != Role.MASTER,
                f"replica {i} is still master after a pause of {owed} ticks",
            )
            self.stepped_down_after_pause += 1
        self._ready(i)

    def _crash(self, i: int) -> None:
        self.paused.pop(i, None)
        self.paused_since.pop(i, None)
        self.nodes[i] = None
        self.pending = [p for p in self.pending if p[0] != i]
        for j, node in self.nodes.items():
            if j in self.paused:
                continue  # it sees the connection end when it runs again, as a timeout
            if node is not None and self.rng.random() < self.faults.gone_on_crash:
                node.leader_gone(i)

    def _ready(self, i: int) -> None:
        node = self.nodes[i]
        while node is not None and node.has_ready():
            rd = node.ready()
            if rd.send_first:  # a master sends, then writes beside its followers
                for msg in rd.messages:
                    self._send(msg)
            if self.rng.random() < self.faults.crash * self.faults.crash_mid_persist:
                kept = self.rng.randint(0, len(rd.entries))
                self.disks[i].persist(rd, kept)  # the rest was never fsynced
                self._crash(i)
                return
            self.disks[i].persist(rd)
            if not rd.send_first:
                for msg in rd.messages:
                    self._send(msg)
            node.advance(rd)
        self._note_commit(i)

    def _send(self, msg: Msg) -> None:
        f = self.faults
        if self.rng.random() < f.drop:
            return
        copies = 2 if self.rng.random() < f.duplicate else 1
        for _ in range(copies):
            self.seq += 1
            delay_max = f.delay_ticks_max
            if self.rng.random() < f.delay_spike:
                delay_max = f.delay_spike_ticks_max
            due = self.now + self.rng.randint(0, delay_max)
            self.network.append(_InFlight(due, self.seq, msg))

    def _deliver(self) -> None:
        # Messages to a paused process wait in its socket until it runs again.
        due = [m for m in self.network if m.due <= self.now and m.msg.dst not in self.paused]
        self.network = [m for m in self.network if m.due > self.now or m.msg.dst in self.paused]
        self.rng.shuffle(due)  # reorder
        for item in due:
            msg = item.msg
            node = self.nodes.get(msg.dst)
            if node is None or (msg.src, msg.dst) in self.blocked:
                continue
            node.step(msg)
            self._ready(msg.dst)

    def _propose(self) -> None:
        leaders = [
            i
            for i in self.ids
            if (n := self.nodes[i]) is not None and n.role == Role.MASTER and i not in self.paused
        ]
        if not leaders:
            return
        i = self.rng.choice(leaders)
        node = self.nodes[i]
        require(node is not None, "leader vanished")
        self.proposals += 1
        payload = f"p{self.seed}-{self.proposals}".encode()
        try:
            first, last = node.propose([(KIND_DATA, 0, 0, 0, payload)])  # type: ignore[union-attr]
        except NotMaster:
            return
        self.pending.append((i, last, node.term, payload))  # type: ignore[union-attr]
        self._ready(i)

    def _collect_acks(self) -> None:
        still = []
        for i, index, term, payload in self.pending:
            node = self.nodes[i]
            if i in self.paused:
                still.append((i, index, term, payload))  # a paused process answers no one
                continue
            if node is None or node.term != term or node.role != Role.MASTER:
                continue  # the client sees an error and would retry with its id
            if node.commit_index >= index and node.term_at(index) == term:
                self.acked[index] = (term, payload)
            else:
                still.append((i, index, term, payload))
        self.pending = still

    def _note_commit(self, i: int) -> None:
        node = self.nodes[i]
        if node is None:
            return
        for index in range(self.committed_upto + 1, node.commit_index + 1):
            entry = node.entries_from(index, 1)[0]
            value = self.committed.setdefault(index, (entry.term, entry.payload))
            self._require(
                value == (entry.term, entry.payload),
                f"replica {i} disagrees at committed index {index}",
            )
            self.committed_in.setdefault(index, node.term)
        self.committed_upto = max(self.committed_upto, node.commit_index)

    # ---- invariants ------------------------------------------------------------------
    def check(self) -> None:
        for i in self.ids:
            node = self.nodes[i]
            if node is None:
                continue
            if node.role == Role.MASTER:
                seen = self.leaders.setdefault(node.term, i)
                self._require(seen == i, f"two masters in term {node.term}: {seen} and {i}")
            upto = min(node.commit_index, node.last_index)
            for index in range(max(1, upto - CHECK_WINDOW), upto + 1):
                entry = node.entries_from(index, 1)[0]
                got = (entry.term, entry.payload)
                want = self.committed.setdefault(index, got)
                self.committed_in.setdefault(index, node.term)
                self._require(got == want, f"replica {i} disagrees at committed index {index}")
            if node.role == Role.MASTER:
                self._check_leader_completeness(i, node)
        for index, value in self.acked.items():
            self._require(
                self.committed.get(index) == value,
                f"acknowledged entry {index} is not committed as acknowledged",
            )

    def _check_leader_completeness(self, i: int, node: Node) -> None:
        top = max(self.committed, default=0)
        for index in range(max(1, top - CHECK_WINDOW), top + 1):
            if node.term <= self.committed_in[index]:
                continue  # committed in this master's term or later: it need not have it
            self._require(node.last_index >= index, f"master {i} lacks entry {index}")
            self._require(
                node.term_at(index) == self.committed[index][0],
                f"master {i} lost committed entry {index}",
            )

    def _require(self, condition: bool, message: str) -> None:
        if not condition:
            raise SimulationFailure(f"seed {self.seed}, tick {self.now}: {message}")

    # ---- the end ---------------------------------------------------------------------
    def settle(self, ticks_max: int = 2000) -> None:
        """Heal everything, restart who can restart, and wait for convergence."""
        self.faults = Faults(
            drop=0,
            duplicate=0,
            delay_ticks_max=1,
            crash=0,
            restart=0,
            partition=0,
            heal=1,
            corrupt=0,
            propose=0,
            wipe=0,
            pause=0,
            one_way=0,
            delay_spike=0,
        )
        self.blocked = set()
        for i in list(self.paused):
            self._resume(i)
        for i in self.ids:
            if self.nodes[i] is None and i not in self.dead_forever:
                self.nodes[i] = self._boot(i)
        for _ in range(ticks_max):
            self.step()
            if self._converged():
                break
        self._require(self._converged(), "replicas did not converge after healing")
        for i, node in self.nodes.items():
            if node is None:
                continue
            log = {e.index: (e.term, e.payload) for e in self.disks[i].entries}
            for index, value in self.committed.items():
                self._require(log.get(index) == value, f"replica {i} lost committed {index}")
        for index, value in self.acked.items():
            self._require(self.committed.get(index) == value, f"acked entry {index} lost")

    def _converged(self) -> bool:
        live = [n for n in self.nodes.values() if n is not None]
        leaders = [n for n in live if n.role == Role.MASTER]
        if len(leaders) != 1:
            return False
        last = leaders[0].last_index
        if any(n.last_index != last or n.commit_index != last or n.has_ready() for n in live):
            return False
        logs = {tuple((e.term, e.payload) for e in self.disks[n.id].entries) for n in live}
        return len(logs) == 1


def run_seed(seed: int, steps: int = 400, replicas: int = 3) -> Simulation:
    sim = Simulation(seed, replicas)
    try:
        for _ in range(steps):
            sim.step()
        sim.settle()
    except InvariantError as exc:  # an internal check of the core fired: also a failure
        raise SimulationFailure(f"seed {seed}, tick {sim.now}: {exc}") from exc
    return sim


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, help="replay one seed")
    parser.add_argument("--seeds", type=int, default=200, help="run seeds 0..N-1")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--replicas", type=int, default=3)
    args = parser.parse_args(argv)
    seeds = [args.seed] if args.seed is not None else range(args.seeds)
    acked = 0
    for seed in seeds:
        try:
            sim = run_seed(seed, args.steps, args.replicas)
        except SimulationFailure as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            return 1
        acked += len(sim.acked)
    print(f"{len(seeds)} seeds passed; {acked} acknowledged proposals checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
