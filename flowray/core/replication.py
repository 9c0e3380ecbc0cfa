"""The replication rules of a shard group, as a pure state machine (Raft).

No I/O, no clock, no Ray: the caller feeds the node messages (:meth:`Node.step`),
ticks (:meth:`Node.tick`) and proposals (:meth:`Node.propose`), and takes back a
:class:`Ready` of what to persist, what to send and what is committed. The caller's
duties, in order, for every Ready:

1. Take it with :meth:`Node.ready` (only when :meth:`Node.has_ready`).
2. Persist the hard state (term, vote) if it changed, then cut the log after
   ``truncate_after`` when it is set, then append ``entries`` — and fsync. Persist
   before you send: a vote or an acknowledgement promises that the data is on disk.
   Except when ``send_first`` is set: a master's appends promise nothing about its
   own disk (it counts itself toward a majority only after ``advance``), so it may
   send them first and write while its followers write (Raft thesis, 10.2.1).
3. Send ``messages``; they may be lost, duplicated or reordered: the rules cope.
4. Call :meth:`Node.advance` with the same Ready.
5. Entries up to ``commit_index`` are committed: answer the clients whose proposals
   they hold (only while the entry at that index still has the proposal's term).

The rules are Raft's: terms fence old masters; a vote goes to a candidate whose log
is at least as complete; an append must match the entry before it (log matching); a
divergent uncommitted tail is cut; the master commits an index once a majority,
itself included, has it on disk, counting only entries of its own term; a new master
appends a no-op so earlier entries commit through it; a master that has not heard
from a majority for an election timeout steps down (check quorum).

Silence is detected by time, not only by a connection ending: a follower that hears
nothing from its master for a randomized election timeout stands. It first asks
for *pre-votes* (Raft thesis, 9.6): would a majority vote for it in the next term?
Only then does it raise its term. Replicas that heard from a live master within the
minimum election timeout (its lease) refuse, so a replica that was itself paused, or
whose incoming link alone is cut, cannot depose a healthy master when it comes back.
The master keeps when it last heard from each follower, counted in ticks, and steps
down at the first tick at which a majority has been silent for an election timeout.
The shell feeds the ticks that wall-clock time owes before anything else (a paused
process that resumes first sees its pause), so a master stopped for longer than an
election timeout steps down before it reads a single message that queued meanwhile,
and answers no waiting client as master of a term that others may have ended.
(Commits it counted before the pause stay committed: a majority held them.)

A replica that lost its disk (Ray restarted it on another node, in an empty
directory) has forgotten its term and vote, and its log: voting, it could vote twice
in a term or help a candidate that lacks committed entries win. So it starts
*abstaining* (``abstain``, kept in the hard state): it neither votes nor stands for
election until its log holds every entry that was committed when it first heard
from a master (that master's commit index, learned from its first append), and in
that master's term it counts its vote as given to that master. Meanwhile it
replicates as any follower, and its acknowledgements count. A group with a majority
of intact replicas is not slowed; one without waits for an intact replica to come
back, as with a majority down, instead of losing entries.

Mastership can be handed over (:meth:`Node.transfer`, as in Raft's leadership
transfer): the master stops taking proposals, brings the chosen follower up to date,
and tells it to stand for election at once; its vote requests carry ``transfer`` so
that voters do not wait out their lease. Votes still go only to a complete log, once
per term, so a handover can fail (then the master takes proposals again after an
election timeout) but never breaks the rules above.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from flowray.core.entry import CONTROL_SHARD, KIND_NOOP, Entry
from flowray.core.invariant import require
from flowray.core.quorum import committed_index, majority

APPEND_BYTES_MAX = 8 * 1024 * 1024
# ``Node.abstain`` of a replica that lost its state and has not yet heard from a master.
ABSTAIN_UNKNOWN = -1


class Role(StrEnum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre-candidate"
    CANDIDATE = "candidate"
    MASTER = "master"


class NotMaster(RuntimeError):
    """This replica is not (or no longer) the master; ``leader`` is who it thinks is.

    ``refused`` means nothing was appended, so the caller may send the same write to
    ``leader`` at once; otherwise the write may still commit, and only a retry with
    event ids is safe.
    """

    def __init__(self, message: str, leader: int | None = None, refused: bool = True) -> None:
        super().__init__(message)
        self.leader = leader
        self.refused = refused

    def __reduce__(self) -> tuple[Any, ...]:  # crosses Ray and the wire as itself
        return (NotMaster, (str(self), self.leader, self.refused))


@dataclass(frozen=True)
class Msg:
    """A message between replicas. Which fields matter depends on ``kind``."""

    # "pre_vote", "pre_vote_resp", "vote", "vote_resp", "append", "append_resp",
    # "timeout_now"; a pre-vote's term is the one its sender would stand in.
    kind: str
    src: int
    dst: int
    term: int
    index: int = 0  # vote: last index; append: prev index; append_resp: match or hint
    log_term: int = 0  # vote: last term; append: prev term
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    ok: bool = False
    transfer: bool = False  # vote: asked for by the master handing over mastership


class LogView(Protocol):
    """What the node reads of the persisted log."""

    @property
    def last_index(self) -> int: ...

    def term_at(self, index: int) -> int: ...

    def read(self, from_index: int, bytes_max: int) -> list[Entry]: ...


@dataclass
class Ready:
    term: int
    voted_for: int | None
    hard_state_changed: bool
    truncate_after: int | None
    entries: list[Entry]
    messages: list[Msg]
    commit_index: int
    send_first: bool = False  # the messages may be sent before the persisting
    abstain: int | None = None  # part of the hard state (see Node.abstain)


@dataclass
class Progress:
    """What the master knows of one follower."""

    match: int = 0
    next: int = 1
    heard_at: int = 0  # Node.ticks when this follower last answered in this term
    answered: bool = False  # it answered since the last heartbeat
    # It did not answer between two heartbeats (paused, cut off, its disk hung): it is
    # sent empty probes only, until it answers. Resending it entries at every beat
    # read and encoded megabytes on the master's loop for nobody, and the stalls cost
    # the master its lease with the followers that did answer.
    paused: bool = False


@dataclass(frozen=True)
class Timing:
    election_ticks: int = 10
    heartbeat_ticks: int = 2


@dataclass
class _Pending:
    messages: list[Msg] = field(default_factory=list)
    hard_state_changed: bool = False


class Node:
    def __init__(
        self,
        node_id: int,
        peers: Sequence[int],
        storage: LogView,
        term: int = 0,
        voted_for: int | None = None,
        timing: Timing = Timing(),
        rng: random.Random | None = None,
        append_bytes_max: int = APPEND_BYTES_MAX,
        abstain: int | None = None,
    ) -> None:
        require(node_id in peers, "a node is one of its group's peers")
        require(len(peers) % 2 == 1, "a group has an odd number of replicas")
        self.id = node_id
        self.peers = sorted(peers)
        self.storage = storage
        self.term = term
        self.voted_for = voted_for
        self.timing = timing
        self.rng = rng or random.Random(node_id)
        self.append_bytes_max = append_bytes_max
        self.role = Role.FOLLOWER
        self.leader: int | None = None
        self.commit_index = 0
        self.stable_last = storage.last_index
        self.unstable: list[Entry] = []
        self.need_truncate = False
        self.votes: set[int] = set()
        self.progress: dict[int, Progress] = {}
        self.elapsed = 0
        self.heartbeat_elapsed = 0
        self.ticks = 0  # every tick since start: the master's clock for its lease
        self.timeout = self._random_timeout()
        self._pending = _Pending()
        self.transferee: int | None = None  # master: handing over to this peer
        self.transfer_elapsed = 0
        # None: votes and stands for election. Else this replica lost its state, and
        # abstains until its log holds this index (ABSTAIN_UNKNOWN: no master heard yet).
        self.abstain = abstain

    # ---- the log: persisted part plus unstable tail ----------------------------------
    @property
    def last_index(self) -> int:
        return self.stable_last + len(self.unstable)

    def term_at(self, index: int) -> int:
        require(0 <= index <= self.last_index, f"no entry {index} (last {self.last_index})")
        if index == 0:
            return 0
        if index <= self.stable_last:
            return self.storage.term_at(index)
        return self.unstable[index - self.stable_last - 1].term

    @property
    def last_term(self) -> int:
        return self.term_at(self.last_index)

    def entries_from(self, index: int, bytes_max: int) -> list[Entry]:
        """Entries from ``index`` to at most ``bytes_max`` payload bytes (at least one)."""
        out: list[Entry] = []
        if index <= self.stable_last:
            out = self.storage.read(index, bytes_max)
            out = [e for e in out if e.index <= self.stable_last]
            size = sum(len(e.payload) for e in out)
            if size >= bytes_max:
                return out
            index = self.stable_last + 1
        else:
            size = 0
        for entry in self.unstable[index - self.stable_last - 1 :]:
            if out and size + len(entry.payload) > bytes_max:
                break
            out.append(entry)
            size += len(entry.payload)
        return out

    def _truncate(self, after: int) -> None:
        require(after >= self.commit_index, f"cannot cut committed entries (after {after})")
        if after >= self.stable_last:
            del self.unstable[after - self.stable_last :]
        else:
            self.unstable = []
            self.stable_last = after
            self.need_truncate = True

    def _append(self, entries: Sequence[Entry]) -> None:
        for entry in entries:
            require(entry.index == self.last_index + 1, f"gap before entry {entry.index}")
            require(entry.term >= self.last_term, "terms never decrease along the log")
            self.unstable.append(entry)

    # ---- input -----------------------------------------------------------------------
    def tick(self) -> None:
        """One unit of time. Elections, heartbeats and the lease are counted in ticks."""
        self.ticks += 1
        if self.role == Role.MASTER:
            if self.transferee is not None:
                self.transfer_elapsed += 1
                if self.transfer_elapsed >= self.timing.election_ticks:
                    self.transferee = None  # the handover failed: take proposals again
            if not self.lease_valid():
                self._become_follower(self.term, None)  # check quorum: step down
                return
            self.heartbeat_elapsed += 1
            if self.heartbeat_elapsed >= self.timing.heartbeat_ticks:
                self.heartbeat_elapsed = 0
                self._broadcast_append(heartbeat=True)
            return
        self.elapsed += 1
        if self.elapsed >= self.timeout:
            self.pre_campaign()

    def leader_gone(self, peer: int) -> None:
        """The shell saw ``peer``'s connection end (its process died, most likely).

        If ``peer`` is this follower's master, stop honouring its lease and stand for
        election soon instead of after a whole election timeout: the other followers
        see the same connection end, so they grant their votes. The followers wait
        in turn, by id (2 * heartbeat_ticks + 1 ticks times their rank among the
        group without the master), so that two of them never split the vote: the
        first stands, and the next, whose wait is longer, votes for it. A master that
        is in fact alive (only a connection broke) has two heartbeats within the
        shortest wait to be heard again over a new connection, which makes it the
        leader again and cancels the election; if both are lost, this follower's
        higher term deposes it, an election as after a timeout. Timing only: safety
        never rests on it."""
        if self.role != Role.FOLLOWER or self.leader != peer:
            return
        self.leader = None
        rank = sorted(p for p in self.peers if p != peer).index(self.id)
        wait = (2 * self.timing.heartbeat_ticks + 1) * (rank + 1)
        self.elapsed = max(self.elapsed, self.timeout - wait)

    def pre_campaign(self) -> None:
        """Ask whether a majority would elect this replica in the next term, without
        raising its own term: a replica that cannot win (its log behind, or the others
        still hearing from a live master) then disturbs nobody."""
        if self.abstain is not None:
            self.elapsed = 0
            return
        if len(self.peers) == 1:
            self.campaign()
            return
        self.role = Role.PRE_CANDIDATE
        self.leader = None
        self.votes = {self.id}
        self.elapsed = 0
        self.timeout = self._random_timeout()
        for peer in self._others():
            self._send(
                Msg("pre_vote", self.id, peer, self.term + 1, self.last_index, self.last_term)
            )

    def campaign(self, transfer: bool = False) -> None:
        """Stand for election under a new term (``transfer``: asked to by the master)."""
        if self.abstain is not None:
            self.elapsed = 0
            return
        if len(self.peers) == 1:
            self._become_candidate()
            self._become_leader()
            return
        self._become_candidate()
        for peer in self._others():
            self._send(
                Msg(
                    "vote",
                    self.id,
                    peer,
                    self.term,
                    self.last_index,
                    self.last_term,
                    transfer=transfer,
                )
            )

    def transfer(self, to: int) -> None:
        """Hand mastership over to follower ``to``: refuse proposals from now on, bring
        ``to`` up to date, then tell it to stand for election at once."""
        if self.role != Role.MASTER:
            raise NotMaster(f"not the master (master is {self.leader})", self.leader)
        require(to in self.peers and to != self.id, f"cannot hand over to {to}")
        self.transferee = to
        self.transfer_elapsed = 0
        if self.progress[to].match == self.last_index:
            self._send(Msg("timeout_now", self.id, to, self.term))
        else:
            self._send_append(to)

    def propose(self, items: Sequence[tuple[int, int, int, int, bytes]]) -> tuple[int, int]:
        """Append (kind, shard, hour, part, payload) items; returns (first, last) index."""
        if self.role != Role.MASTER:
            raise NotMaster(f"not the master (master is {self.leader})", self.leader)
        if self.transferee is not None:
            raise NotMaster(f"handing mastership over to {self.transferee}", self.transferee)
        require(bool(items), "an empty proposal")
        first = self.last_index + 1
        entries = [
            Entry(self.term, first + i, kind, shard, hour, part, payload)
            for i, (kind, shard, hour, part, payload) in enumerate(items)
        ]
        self._append(entries)
        self._broadcast_append(heartbeat=False)
        if len(self.peers) == 1:
            self._maybe_commit()
        return first, self.last_index

    def step(self, msg: Msg) -> None:
        """Take one message from a peer."""
        if msg.dst != self.id or msg.src not in self.peers or msg.src == self.id:
            return  # misrouted: ignore, never crash on the network's mistakes
        if msg.kind == "vote" and msg.term > self.term and self._in_lease() and not msg.transfer:
            return  # a live master is known: do not let a stray candidate depose it
        if msg.kind == "pre_vote":
            self._on_pre_vote(msg)  # never changes this replica's term
            return
        if msg.kind == "pre_vote_resp":
            self._on_pre_vote_resp(msg)
            return
        if msg.term > self.term:
            leader = msg.src if msg.kind == "append" else None
            waited = (self.elapsed, self.timeout) if self.role != Role.MASTER else None
            self._become_follower(msg.term, leader)
            if leader is None and waited is not None:
                # A higher term without a master (a candidate's vote request) does not
                # restart the election clock, as in Raft: a candidate whose log is
                # behind would otherwise push back the election of one that is not
                # (by a whole timeout after leader_gone hastened it).
                self.elapsed, self.timeout = waited
        if msg.kind == "vote":
            self._on_vote(msg)
        elif msg.kind == "vote_resp":
            self._on_vote_resp(msg)
        elif msg.kind == "append":
            self._on_append(msg)
        elif msg.kind == "append_resp":
            self._on_append_resp(msg)
        elif msg.kind == "timeout_now":
            self._on_timeout_now(msg)

    # ---- output ----------------------------------------------------------------------
    def has_ready(self) -> bool:
        return bool(
            self._pending.messages
            or self._pending.hard_state_changed
            or self.unstable
            or self.need_truncate
        )

    def ready(self) -> Ready:
        rd = Ready(
            term=self.term,
            voted_for=self.voted_for,
            hard_state_changed=self._pending.hard_state_changed,
            truncate_after=self.stable_last if self.need_truncate else None,
            entries=list(self.unstable),
            messages=self._pending.messages,
            commit_index=self.commit_index,
            abstain=self.abstain,
            send_first=self.role == Role.MASTER
            and not self._pending.hard_state_changed
            and not self.need_truncate,
        )
        self._pending = _Pending()
        return rd

    def advance(self, rd: Ready) -> None:
        """The caller persisted ``rd`` and sent its messages."""
        if rd.truncate_after is not None and self.stable_last == rd.truncate_after:
            self.need_truncate = False
        for entry in rd.entries:
            head = self.unstable[0] if self.unstable else None
            if head is None or head.index != entry.index or head.term != entry.term:
                # Cut after this Ready was taken: the disk holds a tail to drop next.
                self.need_truncate = True
                break
            self.unstable.pop(0)
            self.stable_last = entry.index
        if self.role == Role.MASTER:
            self._maybe_commit()

    # ---- roles -----------------------------------------------------------------------
    def _others(self) -> list[int]:
        return [p for p in self.peers if p != self.id]

    def _random_timeout(self) -> int:
        base = self.timing.election_ticks
        return base + self.rng.randrange(base)

    def _set_hard_state(self, term: int, voted_for: int | None) -> None:
        if (term, voted_for) != (self.term, self.voted_for):
            require(term >= self.term, "the term never goes back")
            self.term, self.voted_for = term, voted_for
            self._pending.hard_state_changed = True

    def _become_follower(self, term: int, leader: int | None) -> None:
        self._set_hard_state(term, self.voted_for if term == self.term else None)
        self.transferee = None
        self.role = Role.FOLLOWER
        self.leader = leader
        self.elapsed = 0
        self.timeout = self._random_timeout()
        self.progress = {}

    def _become_candidate(self) -> None:
        self._set_hard_state(self.term + 1, self.id)
        self.role = Role.CANDIDATE
        self.leader = None
        self.votes = {self.id}
        self.elapsed = 0
        self.timeout = self._random_timeout()

    def _become_leader(self) -> None:
        self.role = Role.MASTER
        self.leader = self.id
        self.elapsed = 0
        self.heartbeat_elapsed = 0
        self.progress = {
            p: Progress(next=self.last_index + 1, heard_at=self.ticks) for p in self._others()
        }
        self.transferee = None
        self.propose([(KIND_NOOP, CONTROL_SHARD, 0, 0, b"")])

    def _in_lease(self) -> bool:
        """A master heard from within the minimum election timeout (by a follower), or,
        for a master, a majority heard from within it."""
        if self.role == Role.MASTER:
            return self.lease_valid()
        return self.leader is not None and self.elapsed < self.timing.election_ticks

    def lease_valid(self) -> bool:
        """Whether this master heard from a majority, itself included, within the last
        election timeout (check quorum): if not, it steps down at its next tick."""
        if self.role != Role.MASTER:
            return False
        since = self.ticks - self.timing.election_ticks
        heard = 1 + sum(1 for pr in self.progress.values() if pr.heard_at > since)
        return heard >= majority(len(self.peers))

    # ---- messages --------------------------------------------------------------------
    def _send(self, msg: Msg) -> None:
        self._pending.messages.append(msg)

    def _on_vote(self, msg: Msg) -> None:
        up_to_date = (msg.log_term, msg.index) >= (self.last_term, self.last_index)
        free = self.voted_for in (None, msg.src)
        grant = msg.term == self.term and free and up_to_date and self.abstain is None
        if grant:
            self._set_hard_state(self.term, msg.src)
            self.elapsed = 0
        self._send(Msg("vote_resp", self.id, msg.src, self.term, ok=grant))

    def _on_pre_vote(self, msg: Msg) -> None:
        up_to_date = (msg.log_term, msg.index) >= (self.last_term, self.last_index)
        grant = msg.term > self.term and up_to_date and not self._in_lease()
        # A granted pre-vote answers in the term asked about; a refusal in this
        # replica's own, which tells a pre-candidate of an older term to catch up.
        term = msg.term if grant else self.term
        self._send(Msg("pre_vote_resp", self.id, msg.src, term, ok=grant))

    def _on_pre_vote_resp(self, msg: Msg) -> None:
        if not msg.ok:
            if msg.term > self.term:
                self._become_follower(msg.term, None)
            return
        if self.role != Role.PRE_CANDIDATE or msg.term != self.term + 1:
            return  # a late answer to an earlier round
        self.votes.add(msg.src)
        if len(self.votes) >= majority(len(self.peers)):
            self.campaign()

    def _on_vote_resp(self, msg: Msg) -> None:
        if self.role != Role.CANDIDATE or msg.term != self.term or not msg.ok:
            return
        self.votes.add(msg.src)
        if len(self.votes) >= majority(len(self.peers)):
            self._become_leader()

    def _on_append(self, msg: Msg) -> None:
        if msg.term < self.term:
            self._send(Msg("append_resp", self.id, msg.src, self.term, self.last_index))
            return
        if self.role != Role.FOLLOWER or self.leader != msg.src:
            self._become_follower(msg.term, msg.src)
        self.elapsed = 0
        if self.abstain == ABSTAIN_UNKNOWN:
            # The first master heard: what it has committed, this replica must hold
            # before it votes; and in this term its vote is the master's.
            self.abstain = msg.commit
            self._set_hard_state(self.term, msg.src)
            self._pending.hard_state_changed = True
        if msg.index > self.last_index or self.term_at(msg.index) != msg.log_term:
            hint = min(self.last_index, max(msg.index - 1, 0))
            self._send(Msg("append_resp", self.id, msg.src, self.term, hint))
            return
        fresh = self._drop_known(msg.entries)
        if fresh:
            if fresh[0].index <= self.last_index:
                self._truncate(fresh[0].index - 1)
            self._append(fresh)
        match = msg.index + len(msg.entries)
        self.commit_index = max(self.commit_index, min(msg.commit, match))
        if self.abstain is not None and self.abstain != ABSTAIN_UNKNOWN and match >= self.abstain:
            self.abstain = None  # persisted with the entries, before any vote is sent
            self._pending.hard_state_changed = True
        self._send(Msg("append_resp", self.id, msg.src, self.term, match, ok=True))

    def _drop_known(self, entries: Sequence[Entry]) -> list[Entry]:
        for i, entry in enumerate(entries):
            if entry.index > self.last_index or self.term_at(entry.index) != entry.term:
                return list(entries[i:])
        return []

    def _on_timeout_now(self, msg: Msg) -> None:
        """Our master hands mastership over to us: stand for election now."""
        if msg.term == self.term and self.role == Role.FOLLOWER and self.leader == msg.src:
            self.campaign(transfer=True)

    def _on_append_resp(self, msg: Msg) -> None:
        if self.role != Role.MASTER or msg.term != self.term:
            return
        pr = self.progress[msg.src]
        pr.heard_at = self.ticks
        pr.answered, pr.paused = True, False
        if msg.ok:
            if msg.index > pr.match:
                pr.match = msg.index
                self._maybe_commit()
            if msg.src == self.transferee and pr.match == self.last_index:
                self._send(Msg("timeout_now", self.id, msg.src, self.term))
            pr.next = max(pr.next, pr.match + 1)
            if pr.next <= self.last_index:
                self._send_append(msg.src)
        else:
            if msg.index < pr.match:
                # The follower holds less than it acknowledged: it came back without its
                # disk (see abstain). Send it everything from what it has.
                pr.match = msg.index
            pr.next = max(pr.match + 1, min(pr.next - 1, msg.index + 1))
            self._send_append(msg.src)

    def _broadcast_append(self, heartbeat: bool) -> None:
        for peer in self._others():
            pr = self.progress[peer]
            if heartbeat:
                pr.paused = not pr.answered
                pr.answered = False
                if pr.paused:
                    self._send_append(peer, probe=True)
                    continue
                if pr.match < self.last_index:
                    pr.next = pr.match + 1  # resend what may have been lost
                self._send_append(peer)
            elif pr.next <= self.last_index and not pr.paused:
                self._send_append(peer)

    def _send_append(self, peer: int, probe: bool = False) -> None:
        """Entries from the peer's next index on; none for a ``probe``, which only asks
        whether the peer holds the entry before them (its answer resumes the flow)."""
        pr = self.progress[peer]
        prev = pr.next - 1
        entries = (
            self.entries_from(pr.next, self.append_bytes_max)
            if pr.next <= self.last_index and not probe
            else []
        )
        self._send(
            Msg(
                "append",
                self.id,
                peer,
                self.term,
                prev,
                self.term_at(prev),
                tuple(entries),
                self.commit_index,
            )
        )
        if entries:
            pr.next = entries[-1].index + 1

    def _maybe_commit(self) -> None:
        match = {p: pr.match for p, pr in self.progress.items()}
        match[self.id] = self.stable_last
        candidate = committed_index(match, len(self.peers))
        if candidate > self.commit_index and self.term_at(candidate) == self.term:
            self.commit_index = candidate
