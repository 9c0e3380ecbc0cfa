"""Where each group's master is: found by asking the replicas, then remembered.

The ingress, the admin calls and the processor all need the current master of a
group. A replica that is asked to do a master's work and is not the master answers
NotMaster with the master it knows of; the directory then forgets its guess, and the
next lookup asks every replica of the group and trusts the highest term.

A master that does not answer in time (paused, cut off, its disk hung) is *suspected*:
until SUSPECT_S passes, answers that name it in the term it was master in are passed
over, so the lookup waits for the election that its silence starts instead of finding
it again through followers that have not noticed yet. A higher term clears it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray

from flowray.actors.names import actor_name
from flowray.actors.replica import WIRE_ERRORS
from flowray.actors.wire import Address, Link
from flowray.config import Settings
from flowray.core.quorum import majority


class NoMaster(RuntimeError):
    """No replica of the group claims to be master right now (an election is on)."""


# Actor lookups (ray.get_actor: a round trip to Ray's GCS) run on threads of their own,
# at most this many: a lookup that hangs keeps its thread, and on the default pool such
# threads would starve the ingress's parsing, which runs there too.
LOOKUP_THREADS = 2
# How long a master that missed a deadline is passed over (two longest election
# timeouts at the default timing: its followers have stood by then).
SUSPECT_S = 2.0
# How long still_followed waits for each follower's answer.
FOLLOWED_TIMEOUT_S = 0.5
_lookup_pool: ThreadPoolExecutor | None = None


def _lookups() -> ThreadPoolExecutor:
    global _lookup_pool
    if _lookup_pool is None:
        _lookup_pool = ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="actor-lookup")
    return _lookup_pool


async def lookup_actor(name: str, namespace: str, timeout_s: float) -> Any:
    """``ray.get_actor`` on a lookup thread, within ``timeout_s`` (TimeoutError);
    ValueError if no such actor is running."""
    return await asyncio.wait_for(
        asyncio.get_running_loop().run_in_executor(
            _lookups(), functools.partial(ray.get_actor, name, namespace=namespace)
        ),
        timeout_s,
    )


class Directory:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._handles: dict[tuple[int, int], Any] = {}
        self._looking: dict[tuple[int, int], asyncio.Future[Any]] = {}
        self._links: dict[tuple[int, int], Link] = {}
        self._master: dict[int, int] = {}
        # group -> (replica, term): the master a lookup found, and in which term
        self._found: dict[int, tuple[int, int]] = {}
        # group -> (replica, its term if known, until when on the monotonic clock)
        self._suspects: dict[int, tuple[int, int | None, float]] = {}

    def handle(self, group: int, replica: int) -> Any:
        key = (group, replica)
        if key not in self._handles:
            self._handles[key] = ray.get_actor(
                actor_name(group, replica), namespace=self.settings.namespace
            )
        return self._handles[key]

    async def handle_async(self, group: int, replica: int) -> Any:
        """``handle``, its lookup (the first time, and after a replica is re-created)
        on a lookup thread, so the event loop goes on meanwhile. Callers that want the
        same replica meanwhile share one lookup. Within rpc_timeout_s, or TimeoutError;
        ValueError if no such actor is running."""
        key = (group, replica)
        if key in self._handles:
            return self._handles[key]
        looking = self._looking.get(key)
        if looking is None:
            name, namespace = actor_name(group, replica), self.settings.namespace
            looking = asyncio.get_running_loop().run_in_executor(
                _lookups(), functools.partial(ray.get_actor, name, namespace=namespace)
            )
            self._looking[key] = looking

            def found(done: asyncio.Future[Any]) -> None:  # kept even if all callers gave up
                self._looking.pop(key, None)
                if not done.cancelled() and done.exception() is None:
                    self._handles[key] = done.result()

            looking.add_done_callback(found)
        return await asyncio.wait_for(asyncio.shield(looking), self.settings.rpc_timeout_s)

    async def _master_handle(self, group: int, replica: int) -> tuple[int, Any]:
        """(replica, its handle) as the group's master: remembered only once found."""
        try:
            handle = await self.handle_async(group, replica)
        except (ValueError, TimeoutError) as exc:  # being re-created by Ray, or GCS slow
            self._master.pop(group, None)
            raise NoMaster(f"group {group}: replica {replica} cannot be reached: {exc}") from exc
        self._master[group] = replica
        return replica, handle

    def link(self, group: int, replica: int) -> Link:
        """The direct connection to a replica, for proposals (see :mod:`flowray.actors.wire`)."""
        key = (group, replica)
        if key not in self._links:

            async def resolve() -> Address:
                self._handles.pop(key, None)  # the replica may have been re-created
                handle = await self.handle_async(group, replica)
                address: Address = await handle.wire_address.remote()
                return address

            self._links[key] = Link(resolve, WIRE_ERRORS)
        return self._links[key]

    def suspect(self, group: int, replica: int) -> None:
        """``replica`` missed a deadline as ``group``'s master: pass it over for a while."""
        found = self._found.get(group)
        term = found[1] if found is not None and found[0] == replica else None
        self._suspects[group] = (replica, term, time.monotonic() + SUSPECT_S)
        if self._master.get(group) == replica:
            self._master.pop(group, None)

    async def still_followed(self, group: int, replica: int) -> bool:
        """Whether enough replicas still follow ``replica`` that no other master can have
        been elected: a master needs a majority of votes, and a replica that follows
        ``replica`` has not voted in a newer term. So while more than ``n - majority``
        of the others follow it, it is alive but slow (its followers hear it within
        their election timeout); otherwise it may be paused, cut off or replaced. A
        replica that does not answer within FOLLOWED_TIMEOUT_S is not counted."""
        others = [r for r in range(self.settings.replicas) if r != replica]
        needed = self.settings.replicas - majority(self.settings.replicas)
        if not others:
            return True  # a group of one: nobody else can be master

        async def follows(r: int) -> bool:
            with contextlib.suppress(Exception):  # down, restarting, or too slow
                handle = await self.handle_async(group, r)
                leader, _term, role = await asyncio.wait_for(
                    handle.leader.remote(), FOLLOWED_TIMEOUT_S
                )
                return bool(leader == replica and role == "follower")
            return False

        answers = await asyncio.gather(*(follows(r) for r in others))
        return sum(answers) >= needed

    def _suspected(self, group: int, replica: int, term: int) -> bool:
        entry = self._suspects.get(group)
        if entry is None:
            return False
        who, suspected_term, until = entry
        newer = suspected_term is not None and term > suspected_term
        if time.monotonic() >= until or newer:
            del self._suspects[group]
            return False
        return who == replica

    def forget(self, group: int, hint: int | None = None) -> None:
        """The guess for ``group`` was wrong; ``hint`` is who a replica says is master."""
        self._master.pop(group, None)
        if hint is not None:
            self._master[group] = hint

    async def master(self, group: int) -> tuple[int, Any]:
        """(replica id, handle) of the group's master, asking the replicas if unknown.

        The first replica that says it is master, or names one, is taken: waiting for
        every answer would wait out a replica that Ray is restarting (seconds, after a
        master's death), and once a majority knows of no master an election is on.
        A wrong guess (a stale master cut off from the others) refuses proposals with
        NotMaster and a better hint, and the caller then forgets it.
        """
        if group in self._master:
            return await self._master_handle(group, self._master[group])
        timeout = self.settings.rpc_timeout_s

        async def ask(r: int) -> tuple[int, tuple[int | None, int, str] | None]:
            with contextlib.suppress(Exception):  # a replica down or restarting
                handle = await self.handle_async(group, r)
                answer: tuple[int | None, int, str] = await asyncio.wait_for(
                    handle.leader.remote(), timeout
                )
                return r, answer
            return r, None

        asks = [asyncio.ensure_future(ask(r)) for r in range(self.settings.replicas)]
        answered = 0
        try:
            for next_answer in asyncio.as_completed(asks):
                replica, answer = await next_answer
                if answer is None:
                    continue
                leader, term, role = answer
                if role == "master" and not self._suspected(group, replica, term):
                    self._found[group] = (replica, term)
                    return await self._master_handle(group, replica)
                # A follower's master: a guess, checked by the call.
                if leader is not None and not self._suspected(group, leader, term):
                    self._found[group] = (leader, term)
                    return await self._master_handle(group, leader)
                answered += 1
                if answered >= majority(self.settings.replicas):
                    break  # a majority knows no master: an election is on; do not wait
        finally:
            for task in asks:
                task.cancel()
        raise NoMaster(f"group {group} has no master right now (election in progress)")
