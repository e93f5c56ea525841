"""The fleet: instances on one Redis share the tenants, one owner per tenant, by leases.

The thin I/O shell around `syncd.fleet.assign` and `syncd.fleet.compare`. Every lease/3 seconds
(sooner when another instance joins, leaves or releases) an instance renews its heartbeat and its
leases in one pipeline, reads the members, what each one's configuration knows and publishes and
who owns what, compares the configurations, computes the assignment, gives up the tenants it
should not hold (after the daemon stopped polling them) and takes the free ones assigned to it.
Leases are keys `<prefix>:{<tenant>}:owner` holding `<name>#<token>` (the instance name and the
random incarnation token of the process), taken with SET NX PX semantics and renewed or released
by small pipelined scripts that act only for the holder (a lease holding the bare name, written
by 0.2.0, is taken by the process holding that name).

An instance name is held like a lease too: a process writes the heartbeat of its name only while
no other live process holds that name. A second process started under a name in use stays out
of the fleet (it polls nothing), says so loudly, and joins when the holder leaves or its heartbeat
runs out; so two processes under one name never both poll, whatever the timing.

Leases make the fleet efficient; they do not make it correct. Two instances may briefly both poll
a tenant (a paused process, a clock jump); the cursor fence in the page script keeps that exactly
once. An instance that cannot reach Redis stops polling its tenants at 2/3 of the lease after its
last renewal, before anyone else may take them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import msgspec
import structlog

from syncd.fleet.assign import Plan, assign, disagreements
from syncd.fleet.compare import Comparison, Profile
from syncd.fleet.state import (
    HEARTBEAT,
    JOIN,
    LEAVE,
    RENEW,
    Cache,
    Heartbeat,
    Member,
    compare_members,
    config_document,
    digest,
    live_owners,
    read_holders,
    read_members,
)
from syncd.fleet.transitions import Callback, Transitions
from syncd.keys import Keys
from syncd.redis.conn import RedisClient

log = structlog.get_logger("syncd.fleet")

# Share of the lease after the last renewal at which an instance stops polling a tenant locally.
DROP_AT = 2 / 3
LOGGED_DIFFERENCES = 20  # configuration differences described in fleet_config_disagrees
NO_DIFFERENCES = Comparison({}, [], frozenset())


def default_instance_name() -> str:
    """The host name plus the pid: unique per process without configuration."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class KeptOut:
    """This process is out of the fleet: another process holds its instance name."""

    first: Heartbeat  # the holder as first seen
    holder: Heartbeat  # as last seen
    expires_in: float  # seconds until the holder's heartbeat runs out unless renewed
    clash: bool = False  # the holder renewed since: a live process, not a dead predecessor


@dataclass
class FleetView:
    """What the last round saw: for status, logs and tests."""

    members: dict[str, Member] = field(default_factory=dict)
    owners: dict[int, str] = field(default_factory=dict)  # tenant -> live member holding it
    holders: dict[int, str] = field(default_factory=dict)  # tenant -> its lease's value
    plan: Plan | None = None
    disagreements: dict[int, list[str]] = field(default_factory=dict)
    compared: Comparison = NO_DIFFERENCES
    unpolled: dict[int, tuple[str, ...]] = field(default_factory=dict)


class Fleet(Transitions):
    """Membership, leases and the assignment loop of one instance."""

    def __init__(
        self,
        redis: RedisClient,
        prefix: str,
        instance: str,
        lease: float,
        *,
        on_acquire: Callback,
        on_release: Callback,
        tenants: Iterable[int] = (),
        profiles: Mapping[int, Profile] | None = None,
        on_round: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(
            redis,
            prefix,
            instance,
            os.urandom(8).hex(),
            lease,
            on_acquire=on_acquire,
            on_release=on_release,
        )
        self.on_round = on_round  # after each round: the view and leases held are fresh
        self.view = FleetView()
        self.kept_out: KeptOut | None = None
        self.last_renewal: float | None = None  # wall clock, for status
        self._published = False  # the known tenants and configuration of this name are ours
        self._epoch: bytes | None = None
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self.known: frozenset[int] = frozenset()
        self._document = b""
        self._config = ""
        self._cache = Cache()
        self.set_tenants(tenants, profiles)
        self._redis_ok = True
        self._reported: object = None
        self._clash_reported: str | None = None  # token of the other process, while reported
        self._due_in: float | None = None  # next round sooner than a period, in seconds
        self._draining = False

    @property
    def period(self) -> float:
        return self.lease / 3

    @property
    def name_clash(self) -> Heartbeat | None:
        """The other live process under this instance's name, while there is one."""
        if self.kept_out is not None:
            return self.kept_out.holder if self.kept_out.clash else None
        me = self.view.members.get(self.instance)
        return me.clash if me is not None else None

    def set_tenants(
        self, tenants: Iterable[int], profiles: Mapping[int, Profile] | None = None
    ) -> None:
        """The tenants of this instance's configuration and each one's profile (at start and
        after each reload); without profiles, every tenant has the same, empty one."""
        known = frozenset(tenants)
        mine = {t: (profiles or {}).get(t, Profile()) for t in known}
        published, document, config = config_document(mine)
        if known != self.known or config != self._config:
            self.known = known
            # Its own configuration is never read from Redis; the one it replaces is, while a
            # member still publishes it.
            self._cache.config.pop(self._config, None)
            self._cache.config[config] = published
            self._document, self._config = document, config
            self._published = False
            self._wake.set()

    def drain(self) -> None:
        """Take no more tenants (shutdown began); keep renewing those held until stop()."""
        self._draining = True

    def stop(self) -> None:
        """Leave the fleet: run() releases every lease and returns."""
        self._stop.set()
        self._wake.set()

    # -- the loop ---------------------------------------------------------------------

    async def run(self) -> None:
        """Take part until stop(); then hand every tenant back at once. Cancelled (a forced
        exit) it releases nothing: its leases run out and the others take over."""
        guard = asyncio.create_task(self._guard())
        try:
            await self._loop()
        except asyncio.CancelledError:
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            if tasks:  # bounded: a cancellation lost inside a Redis call must not hold us
                await asyncio.wait(tasks, timeout=self.period)
            raise
        finally:
            guard.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await guard
        await self._leave()

    async def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            started = time.monotonic()
            self._due_in = None
            try:
                async with asyncio.timeout(self.period):
                    await self.round()
                if not self._redis_ok:
                    log.info("fleet_redis_back", instance=self.instance)
                self._redis_ok = True
            except Exception as exc:
                if self._redis_ok:
                    log.warning(
                        "fleet_redis_unavailable",
                        instance=self.instance,
                        error=f"{type(exc).__name__}: {exc}",
                    )
                self._redis_ok = False
            if self.on_round is not None:
                self.on_round()
            deadline = started + self.period
            if self._due_in is not None:
                deadline = min(deadline, time.monotonic() + self._due_in)
            await self._wait(deadline)

    async def _wait(self, deadline: float) -> None:
        """Until the next round is due, or sooner when the fleet's epoch moves."""
        poll = min(1.0, self.period / 2)
        while not self._wake.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(poll, left)):
                    await self._wake.wait()
                    return
            try:
                async with asyncio.timeout(poll):
                    epoch = await self.redis.get(self.keys.epoch)
            except Exception:
                continue
            if epoch != self._epoch:
                return

    async def _guard(self) -> None:
        """Stop polling tenants whose lease may run out: Redis has not confirmed them lately."""
        limit = self.lease * DROP_AT
        while True:
            now = time.monotonic()
            stale = [t for t, state in self.held.items() if now - state.renewed > limit]
            if stale:
                log.warning(
                    "fleet_leases_unconfirmed",
                    instance=self.instance,
                    tenants=len(stale),
                    sample=stale[:10],
                    since_s=round(now - min(self.held[t].renewed for t in stale), 3),
                )
                for tenant in stale:
                    self._drop(tenant)
            earliest = min((s.renewed for s in self.held.values()), default=now)
            await asyncio.sleep(max(0.02, min(self.period, earliest + limit - now + 0.01)))

    async def round(self) -> None:
        """One renewal and rebalancing round."""
        await self._renew()
        view = await self.read_view()
        self.view = view
        self._report(view)
        if self.kept_out is not None:  # another process holds our name: hold nothing
            self._release_all()
            self._due_in = self.kept_out.expires_in + 0.05
            return
        if view.plan is None:  # our own heartbeat is not among the members: decide nothing
            return
        mine = view.plan.tenants_of(self.instance)
        for tenant, state in list(self.held.items()):
            if tenant not in mine and not state.releasing:
                self._release(tenant)
        # Free, ours, or this instance's from before an upgrade (0.2.0 held the bare name).
        ours = (None, self.holder, self.instance)
        wanted = [t for t in sorted(mine) if t not in self.held and view.holders.get(t) in ours]
        if wanted and not self._draining:
            await self._acquire(wanted)
        await self._watch_expiries(view)

    async def _watch_expiries(self, view: FleetView) -> None:
        """Look again right when a silent member's heartbeat or an orphaned lease runs out,
        rather than up to a period later: that is when its tenants become free."""
        soonest = [m.expires_in for n, m in view.members.items() if n != self.instance]
        orphans = [t for t in view.holders if t not in view.owners]
        if orphans:
            pipe = self.redis.pipeline(transaction=False)
            for t in orphans:
                pipe.pttl(Keys(self.prefix, t).owner)
            soonest += [ms / 1000 for ms in await pipe.execute() if ms >= 0]
        due = min(soonest, default=self.period) + 0.05
        if due < self.period:
            self._due_in = due

    async def _renew(self) -> None:
        sent = time.monotonic()
        heartbeat = Heartbeat(
            token=self.token,
            known=digest(self.known),
            tenants=len(self.held),
            renewed=time.time(),
            host=socket.gethostname(),
            pid=os.getpid(),
            config=self._config,
        )
        k = self.keys
        name = self.instance
        keys = (k.members, k.member(name), k.known(name), k.config(name), k.clash(name))
        args = (name, self.lease_ms, msgspec.json.encode(heartbeat), self.token)
        join_args: list[str | int | bytes] = [*keys, *args, self._document, *sorted(self.known)]
        tenants = list(self.held)
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(k.epoch)
        if self._published:
            pipe.eval(HEARTBEAT, len(keys), *keys, *args)
        else:
            pipe.eval(JOIN, len(keys), *join_args)
        for t in tenants:
            self._lease(pipe, RENEW, t)
        results = await pipe.execute()
        self._epoch = results[0]
        code, prev, *ttl = results[1]
        joined = not self._published
        if code == 2:  # its known tenants or configuration ran out while Redis was away
            code, prev, *ttl = await self.redis.eval(JOIN, len(keys), *join_args)
            joined = True
        for t, ok in zip(tenants, results[2:], strict=True):
            if ok:
                self.held[t].renewed = sent
            elif t in self.held:
                log.warning("fleet_lease_lost", instance=self.instance, tenant=t)
                self._drop(t)
        if code == 0:
            self._published = False
            self._name_taken(msgspec.json.decode(prev, type=Heartbeat), max(0, ttl[0]) / 1000)
            return
        self._published = True
        if self.kept_out is not None:
            if self.kept_out.clash:
                log.info("fleet_instance_name_clash_over", instance=self.instance)
            self.kept_out = None
        if joined or not prev:
            await self.redis.incr(k.epoch)
            if not prev:
                log.info("fleet_joined", instance=self.instance, tenants=len(self.known))
        self.last_renewal = heartbeat.renewed

    def _name_taken(self, other: Heartbeat, expires_in: float) -> None:
        """Another process holds this instance's name. Until it renews, it may be this one's
        predecessor (killed, its heartbeat not yet run out); once it does, it is a clash."""
        kept = self.kept_out
        if kept is None:
            self.kept_out = KeptOut(other, other, expires_in)
            log.warning(
                "fleet_instance_name_taken",
                instance=self.instance,
                other_host=other.host,
                other_pid=other.pid,
                expires_in_s=round(expires_in, 3),
            )
            return
        kept.holder, kept.expires_in = other, expires_in
        renewed = (other.token, other.renewed) != (kept.first.token, kept.first.renewed)
        if renewed and not kept.clash:
            kept.clash = True
            log.error(
                "fleet_instance_name_clash",
                instance=self.instance,
                other_host=other.host,
                other_pid=other.pid,
                polling=False,
                detail="another live process holds this instance name; this one polls nothing"
                " until it leaves: give each process its own --instance",
            )

    async def read_view(self) -> FleetView:
        """Members, what each knows and publishes, the owners of those tenants, how the
        configurations compare and the assignment."""
        members = await read_members(self.redis, self.prefix, self._cache)
        me = members.get(self.instance)
        if me is None or me.heartbeat.token != self.token:  # not (or no longer) a member
            return FleetView(members=members)
        known = {name: m.known for name, m in members.items()}
        compared = await compare_members(self.redis, self.prefix, members, self._cache)
        tenants = sorted(set().union(*known.values()))
        holders = await read_holders(self.redis, self.prefix, tenants)
        owners = live_owners(holders, members)
        plan = assign(compared.eligible, owners)
        return FleetView(
            members,
            owners,
            holders,
            plan,
            disagreements(known),
            compared,
            compared.unpolled(plan.owners),
        )

    def _report(self, view: FleetView) -> None:
        """Log a change in how the configurations compare, and a clash under this name."""
        compared = view.compared
        state = (
            frozenset(view.disagreements),
            tuple((d.feed, d.option, d.values, d.tenants) for d in compared.differences),
            (len(compared.disagreeing), compared.omitted),
            tuple(sorted(view.unpolled.items())),
        )
        if state != self._reported:
            self._reported = state
            if compared.differences:
                sample = dict(list(view.disagreements.items())[:10])
                shown = compared.differences[:LOGGED_DIFFERENCES]
                log.warning(
                    "fleet_config_disagrees",
                    instance=self.instance,
                    tenants=len(compared.disagreeing),
                    missing_from={str(t): names for t, names in sample.items()},
                    differences=[d.describe() for d in shown],
                    more_differences=len(compared.differences) - len(shown) + compared.omitted,
                    unpolled=len(view.unpolled),
                )
            elif view.plan is not None:
                log.info("fleet_config_agrees", instance=self.instance)
            if view.unpolled:
                log.error(
                    "fleet_feeds_unpolled",
                    instance=self.instance,
                    tenants=len(view.unpolled),
                    sample={str(t): list(fs) for t, fs in list(view.unpolled.items())[:10]},
                    detail="no live instance lists every feed the others list for these"
                    " tenants: give the instances the same feeds",
                )
        me = view.members.get(self.instance)
        other = me.clash if me is not None and self.kept_out is None else None
        if other is not None and other.token != self._clash_reported:
            self._clash_reported = other.token
            log.error(
                "fleet_instance_name_clash",
                instance=self.instance,
                other_host=other.host,
                other_pid=other.pid,
                polling=True,
                detail="another live process uses this instance name and is kept out of the"
                " fleet: give each process its own --instance",
            )
        elif other is None and self._clash_reported is not None and self.kept_out is None:
            self._clash_reported = None
            log.info("fleet_instance_name_clash_over", instance=self.instance)

    # -- leaving ----------------------------------------------------------------------

    async def _leave(self) -> None:
        """Stop polling everything (in-flight work finishes in on_release), release every
        lease and the membership, so the others take over at once."""
        tenants = await self._stop_all()
        k = self.keys
        name = self.instance
        try:
            async with asyncio.timeout(self.lease):
                await self._release_leases(tenants)
                await self.redis.eval(
                    LEAVE,
                    6,
                    k.members,
                    k.member(name),
                    k.known(name),
                    k.config(name),
                    k.clash(name),
                    k.epoch,
                    name,
                    self.token,
                )
        except Exception as exc:
            log.warning("fleet_leave_failed", instance=self.instance, error=str(exc))
        else:
            log.info("fleet_left", instance=self.instance, released=len(tenants))
        self.held.clear()
