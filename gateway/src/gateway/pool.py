"""Replica pools: discovery by DNS, least-in-flight choice, passive and active health.

A pool is built from one or more `host:port` targets. A host name is resolved
to every address it has (one per replica under compose or Swarm's dnsrr) and
re-resolved periodically, and soon after a connection fails, so scaling up or
down is picked up without a restart; a name with no address left empties the
pool (503 at once).

Health is judged only on what says a replica is sick, never on what a client
asked for (an application's 4xx or 500 answer to a bad request counts as a
working replica), so no sequence of requests can take a service out:

- down: its connection was refused (nothing listens): skipped at once, until a
  probe passes or `eject_seconds` go by. Nobody can fake this from outside.
- ejected (passive): `eject_after_failures` sickness signals in a row (a
  timeout, a reset, a 502/503/504 from it, but not the service's own 503
  problem+json about a dependency) take it out for `eject_seconds`;
  never more than half of the pool's live replicas at once.
- unhealthy (active): its readiness probe answered non-2xx, or failed in
  transport `probe_failures` times in a row (one slow probe is no verdict).

A replica is preferred while it is healthy and not ejected. When fewer than
half of the live replicas are preferred, the pool panics, as Envoy does at its
default 50% threshold: it ignores health and ejection and spreads requests
over every live replica, since a replica that may be sick serves better than
none. Only when every replica is down (or DNS has none) is the answer a 503,
and only after a fresh look (`look_again`): discovery and probes run on their
own intervals, so a replica that came up since the last round (a deploy that
just converged, a service scaled up from nothing) serves the request instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field

import aiohttp
from yarl import URL

from kit.errors import ServiceUnavailable

logger = logging.getLogger("gateway.pool")

# a replica's own answers that say it is sick, not that the request was bad
SICK_STATUSES = frozenset({502, 503, 504})
# the kernel's answers that say nothing listens there any more
_NOT_LISTENING = frozenset(
    {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN}
)
# getaddrinfo's "this name has no address", as opposed to "DNS did not answer"
_NO_ADDRESS = frozenset(
    {code for name in ("EAI_NONAME", "EAI_NODATA") if (code := getattr(socket, name, None))}
)
REFRESH_GAP_SECONDS = 1.0


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def not_listening(error: BaseException) -> bool:
    """Whether a failed connect means the replica is gone (refused, unreachable),
    rather than slow to accept."""
    os_error = getattr(error, "os_error", error)
    return isinstance(os_error, OSError) and os_error.errno in _NOT_LISTENING


@dataclass(eq=False, slots=True)
class Replica:
    """One upstream process, addressed by IP so every request reaches that replica."""

    address: str
    port: int
    healthy: bool = True
    in_flight: int = 0
    failures: int = 0
    probe_failures: int = 0
    ejected_until: float = 0.0
    down_until: float = 0.0
    # when it last answered a request (monotonic): a replica that does is busy, not dead
    answered_at: float = -math.inf
    origin: URL = field(init=False)

    def __post_init__(self) -> None:
        self.origin = URL.build(scheme="http", host=self.address, port=self.port)

    def live(self, now: float) -> bool:
        return self.down_until <= now

    def available(self, now: float) -> bool:
        """Preferred for traffic: live, healthy and not ejected."""
        return self.healthy and self.ejected_until <= now and self.down_until <= now

    @property
    def key(self) -> tuple[str, int]:
        return (self.address, self.port)


class Pool:
    def __init__(
        self,
        name: str,
        targets: Sequence[tuple[str, int]],
        *,
        eject_after_failures: int,
        eject_seconds: float,
        probing: bool,
        probe_failures: int = 3,
        busy_grace_seconds: float = 5.0,
        stalled: Callable[[], bool] = lambda: False,
    ) -> None:
        self.name = name
        self.targets = list(targets)
        self.eject_after_failures = eject_after_failures
        self.eject_seconds = eject_seconds
        self.probe_failures = probe_failures
        # a probe that times out is not held against a replica that answered
        # a request this recently (a probe interval and its timeout)
        self.busy_grace_seconds = busy_grace_seconds
        # With active probes on, a replica takes traffic only once a probe passed.
        self.probing = probing
        # whether this process's own event loop ran late just now
        # (`kit.loopwatch`): its timeouts then say nothing about a replica
        self.stalled = stalled
        self.replicas: list[Replica] = []
        self._cursor = 0
        # set when a connection failed, so discovery runs before its next interval
        self.stale = asyncio.Event()
        self._refreshed_at = 0.0
        # counts a passive ejection (gateway_upstream_ejections_total)
        self.ejections: Callable[[], None] | None = None
        # the look requests share when none of them found a replica (`look_again`)
        self._look: asyncio.Task[None] | None = None
        self._looked_at = -math.inf

    @property
    def host_header(self) -> str:
        """What the gateway's own requests (probes, OpenAPI) send as `Host`."""
        host, port = self.targets[0]
        return f"{host}:{port}"

    @property
    def uses_dns(self) -> bool:
        return any(not is_ip_literal(host) for host, _ in self.targets)

    # -- choosing ---------------------------------------------------------------

    def choose(self, tried: Collection[Replica] = ()) -> Replica | None:
        """The preferred replica with the fewest requests in flight (ties
        rotate); in a panic, the live one with the fewest."""
        replicas = self.replicas
        count = len(replicas)
        if not count:
            return None
        now = time.monotonic()
        self._cursor = start = (self._cursor + 1) % count
        live = preferred = 0
        best: Replica | None = None
        best_live: Replica | None = None
        for offset in range(count):
            replica = replicas[(start + offset) % count]
            if replica.down_until > now:
                continue
            live += 1
            is_preferred = replica.healthy and replica.ejected_until <= now
            preferred += is_preferred
            if tried and replica in tried:
                continue
            if best_live is None or replica.in_flight < best_live.in_flight:
                best_live = replica
            if is_preferred and (best is None or replica.in_flight < best.in_flight):
                best = replica
        if 2 * preferred < live:
            return best_live  # panic
        return best

    def panicking(self) -> bool:
        now = time.monotonic()
        live = [replica for replica in self.replicas if replica.live(now)]
        return 2 * sum(replica.available(now) for replica in live) < len(live)

    def choose_or_refuse(self, tried: Collection[Replica], *, service: str) -> Replica:
        """`choose`, or a 503 with `Retry-After` when no replica can take the
        request: none in DNS, or every one refused its connection."""
        replica = self.choose(tried)
        if replica is not None:
            return replica
        raise ServiceUnavailable(
            f"No {service} replica is available",
            headers={"Retry-After": str(self.retry_after())},
        )

    async def look_again(
        self, probe: Callable[[Sequence[Replica]], Awaitable[None]] | None, *, within: float
    ) -> None:
        """Before a request is refused for want of a live replica: resolves the
        targets again and probes every replica that is out (new, refused, never
        answered), so one that came up since the last round takes the request.

        Requests refused at the same moment share one look: a request joins the
        look in progress, or the one made less than `REFRESH_GAP_SECONDS` ago,
        so an outage costs one DNS query and one probe per replica a second,
        however many requests arrive. A request waits for the look at most
        `within` seconds; the look itself runs on and updates the pool."""
        look = self._look
        if look is None or (
            look.done() and time.monotonic() - self._looked_at >= REFRESH_GAP_SECONDS
        ):
            self._looked_at = time.monotonic()
            look = self._look = asyncio.create_task(self._look_now(probe))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(look), within)

    async def _look_now(self, probe: Callable[[Sequence[Replica]], Awaitable[None]] | None) -> None:
        try:
            await self.refresh()
            if probe is not None:
                now = time.monotonic()
                out = [replica for replica in self.replicas if not replica.live(now)]
                if out:
                    await probe(out)
        except Exception:
            logger.exception("%s pool: looking for a replica failed", self.name)

    async def stop_looking(self) -> None:
        """Cancels a look still in progress (the gateway is stopping)."""
        if self._look is not None and not self._look.done():
            self._look.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._look

    def retry_after(self) -> int:
        """Whole seconds until a replica that is out may be back (at least 1)."""
        now = time.monotonic()
        waits = [
            until - now
            for replica in self.replicas
            for until in (replica.down_until, replica.ejected_until)
            if now < until < math.inf
        ]
        return max(1, int(min(waits, default=1.0) + 0.999))

    def states(self) -> dict[str, int]:
        """How many replicas are in each state, for the metrics."""
        now = time.monotonic()
        counts = {"available": 0, "ejected": 0, "unhealthy": 0, "down": 0}
        for replica in self.replicas:
            if replica.down_until == math.inf:
                counts["unhealthy"] += 1  # not answered a probe yet
            elif not replica.live(now):
                counts["down"] += 1
            elif not replica.healthy:
                counts["unhealthy"] += 1
            elif replica.ejected_until > now:
                counts["ejected"] += 1
            else:
                counts["available"] += 1
        return counts

    # -- passive health ---------------------------------------------------------

    def succeeded(self, replica: Replica) -> None:
        """The replica answered (whatever its status, unless it said it is sick)."""
        replica.failures = 0
        replica.answered_at = time.monotonic()

    def failed(self, replica: Replica) -> None:
        """A sickness signal: a timeout, a reset, a 502/503/504 from the replica.
        A streak of them ejects it, unless half the pool is out already."""
        replica.failures += 1
        if replica.failures < self.eject_after_failures:
            return
        replica.failures = 0
        now = time.monotonic()
        live = [other for other in self.replicas if other.live(now)]
        ejected = sum(other.ejected_until > now for other in live)
        if 2 * (ejected + 1) > len(live):
            logger.warning(
                "%s replica %s:%s keeps failing; not ejected, half the pool is out already",
                self.name,
                replica.address,
                replica.port,
            )
            return
        replica.ejected_until = now + self.eject_seconds
        if self.ejections is not None:
            self.ejections()
        logger.warning(
            "ejected %s replica %s:%s for %.1fs",
            self.name,
            replica.address,
            replica.port,
            self.eject_seconds,
        )

    def timed_out(self, replica: Replica) -> None:
        """A connection or an answer that did not come in time: a sickness
        signal, unless this process's event loop was running late meanwhile. A
        gateway swamped by a connection storm reads in-time answers late; were
        those counted, it would eject healthy replicas when it is busiest and
        pile the storm onto the replicas left."""
        if not self.stalled():
            self.failed(replica)

    def lost(self, replica: Replica) -> None:
        """A connection it held (a relayed WebSocket) broke off without a close:
        a sickness signal, as a reset is, unless it is out already; DNS is
        asked again. A replica killed with thousands of sockets is out after
        the first few, and gone from the pool once DNS no longer lists it."""
        now = time.monotonic()
        if replica.ejected_until <= now and replica.live(now):
            self.failed(replica)
        self.request_refresh()

    def unreachable(self, replica: Replica) -> None:
        """Its connection was refused: nothing listens there now. Skipped at
        once (this is no signal a client can fake), and DNS is asked again."""
        if replica.down_until <= time.monotonic():
            logger.warning(
                "%s replica %s:%s refused the connection", self.name, replica.address, replica.port
            )
        replica.down_until = time.monotonic() + self.eject_seconds
        replica.failures = 0
        self.request_refresh()

    def request_refresh(self) -> None:
        """Asks discovery to resolve the targets again now (at most once a second)."""
        if time.monotonic() - self._refreshed_at >= REFRESH_GAP_SECONDS:
            self.stale.set()

    # -- active health ------------------------------------------------------------

    def probed(
        self,
        replica: Replica,
        *,
        ready: bool | None,
        refused: bool = False,
        timed_out: bool = False,
    ) -> None:
        """Applies one readiness probe: `ready` is its verdict when the replica
        answered, None when the probe failed in transport (timed out, reset).
        A replica turns unhealthy when it says it is not ready, when nothing
        listens, or after `probe_failures` failed probes in a row while it
        answered no request either: a slow answer is not a failure."""
        was = replica.healthy
        if refused:
            replica.healthy = False
            replica.probe_failures = 0
            self.unreachable(replica)
        elif ready is None:
            if time.monotonic() - replica.answered_at <= self.busy_grace_seconds:
                return  # slow to probe but answering traffic: busy, not dead
            if timed_out and self.stalled():
                return  # this process was too busy to read the answer in time
            replica.probe_failures += 1
            if replica.probe_failures >= self.probe_failures:
                replica.healthy = False
        else:
            replica.probe_failures = 0
            replica.healthy = ready
            if replica.down_until == math.inf:
                replica.down_until = 0.0  # answered its first probe: it listens
            if ready:
                # a replica that answers its probe is back, as with Envoy's
                # successful_active_health_check_uneject_host
                replica.down_until = replica.ejected_until = 0.0
                replica.failures = 0
        if replica.healthy != was:
            logger.warning(
                "%s replica %s:%s is %s",
                self.name,
                replica.address,
                replica.port,
                "healthy" if replica.healthy else "unhealthy",
            )

    # -- discovery --------------------------------------------------------------

    async def resolve(self) -> list[tuple[str, int]]:
        """Every address of every target. A name DNS says has no address adds
        none; any other resolution failure raises (the membership is kept)."""
        loop = asyncio.get_running_loop()
        addresses: list[tuple[str, int]] = []
        for host, port in self.targets:
            if is_ip_literal(host):
                found = [(host, port)]
            else:
                try:
                    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                except socket.gaierror as error:
                    if error.errno not in _NO_ADDRESS:
                        raise
                    infos = []
                found = [(str(info[4][0]), port) for info in infos]
            for address in found:
                if address not in addresses:
                    addresses.append(address)
        return addresses

    def update(self, addresses: Sequence[tuple[str, int]]) -> list[Replica]:
        """Sets the membership; keeps state of known replicas, returns the new ones."""
        known = {replica.key: replica for replica in self.replicas}
        members: list[Replica] = []
        added: list[Replica] = []
        for address, port in addresses:
            replica = known.get((address, port))
            if replica is None:
                # while probing, a new replica is out until its first probe is
                # answered: a container still starting never sees a request
                replica = Replica(address, port, healthy=not self.probing)
                if self.probing:
                    replica.down_until = math.inf
                added.append(replica)
            members.append(replica)
        if added or len(members) != len(self.replicas):
            logger.info(
                "%s pool: %s",
                self.name,
                ", ".join(f"{r.address}:{r.port}" for r in members) or "empty",
            )
        # a new list, so a choice in progress keeps iterating the old one
        self.replicas = members
        return added

    async def refresh(self) -> list[Replica]:
        """Re-resolves the targets; keeps the last membership when DNS fails."""
        self.stale.clear()
        self._refreshed_at = time.monotonic()
        try:
            addresses = await self.resolve()
        except OSError as error:
            logger.warning("%s pool: DNS resolution failed: %s", self.name, error)
            return []
        return self.update(addresses)


class HealthProber:
    """Active health: probes each replica's readiness endpoint."""

    def __init__(
        self, session: aiohttp.ClientSession, *, path: str, timeout_seconds: float
    ) -> None:
        self.session = session
        self.path = path
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds)

    async def probe(self, pool: Pool, replica: Replica) -> None:
        try:
            async with self.session.get(
                replica.origin.with_path(self.path),
                headers={"Host": pool.host_header},
                timeout=self.timeout,
                allow_redirects=False,
            ) as response:
                ready = 200 <= response.status < 300
        except aiohttp.ClientConnectorError as error:
            pool.probed(replica, ready=None, refused=not_listening(error))
        except TimeoutError:
            pool.probed(replica, ready=None, timed_out=True)
        except (aiohttp.ClientError, OSError):
            pool.probed(replica, ready=None)
        else:
            pool.probed(replica, ready=ready)

    async def probe_all(self, pool: Pool, replicas: Sequence[Replica] | None = None) -> None:
        chosen = pool.replicas if replicas is None else replicas
        await asyncio.gather(*(self.probe(pool, replica) for replica in chosen))
