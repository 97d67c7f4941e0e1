"""Replica pools: discovery by DNS, least-in-flight choice, passive and active health.

A pool is built from one or more `host:port` targets. A host name is resolved
to every address it has (one per replica under compose or Swarm's dnsrr) and
re-resolved periodically, so scaling up or down is picked up without a
restart. A replica is chosen only while it is healthy (its last active probe
passed) and not ejected (passive health: a refused connection, or several
failures in a row, take it out for a while).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import aiohttp
from yarl import URL

from kit.errors import BadGateway, ServiceUnavailable

logger = logging.getLogger("gateway.pool")


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(eq=False, slots=True)
class Replica:
    """One upstream process, addressed by IP so every request reaches that replica."""

    address: str
    port: int
    healthy: bool = True
    in_flight: int = 0
    failures: int = 0
    ejected_until: float = 0.0
    origin: URL = field(init=False)

    def __post_init__(self) -> None:
        self.origin = URL.build(scheme="http", host=self.address, port=self.port)

    def url(self, raw_path: bytes, query_string: bytes) -> URL:
        return URL.build(
            scheme="http",
            host=self.address,
            port=self.port,
            path=raw_path.decode("latin-1"),
            query_string=query_string.decode("latin-1"),
            encoded=True,
        )

    def available(self, now: float) -> bool:
        return self.healthy and self.ejected_until <= now

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
    ) -> None:
        self.name = name
        self.targets = list(targets)
        self.eject_after_failures = eject_after_failures
        self.eject_seconds = eject_seconds
        # With active probes on, a replica takes traffic only once a probe passed.
        self.probing = probing
        self.replicas: list[Replica] = []
        self._cursor = 0

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
        """The available replica with the fewest requests in flight; ties rotate."""
        replicas = self.replicas
        count = len(replicas)
        if not count:
            return None
        now = time.monotonic()
        self._cursor = start = (self._cursor + 1) % count
        best: Replica | None = None
        for offset in range(count):
            replica = replicas[(start + offset) % count]
            if (best is None or replica.in_flight < best.in_flight) and replica.available(now):
                if tried and replica in tried:
                    continue
                best = replica
                if not replica.in_flight:
                    break
        return best

    def choose_or_refuse(self, tried: Collection[Replica], *, service: str) -> Replica:
        """`choose`, or the problem to answer when no replica can take the request:
        502 after every replica failed, 503 (with `Retry-After`) when none is up."""
        replica = self.choose(tried)
        if replica is not None:
            return replica
        if tried:
            raise BadGateway(f"The {service} service is unreachable")
        raise ServiceUnavailable(
            f"No {service} replica is available",
            headers={"Retry-After": str(self.retry_after())},
        )

    def retry_after(self) -> int:
        """Whole seconds until an ejected replica returns (at least 1)."""
        now = time.monotonic()
        waits = [
            r.ejected_until - now for r in self.replicas if r.healthy and r.ejected_until > now
        ]
        return max(1, int(min(waits, default=1.0) + 0.999))

    # -- passive health ---------------------------------------------------------

    def succeeded(self, replica: Replica) -> None:
        replica.failures = 0

    def failed(self, replica: Replica, *, unreachable: bool = False) -> None:
        """Counts a failure; a refused connection ejects at once, others after a streak."""
        replica.failures += 1
        if unreachable or replica.failures >= self.eject_after_failures:
            replica.failures = 0
            replica.ejected_until = time.monotonic() + self.eject_seconds
            logger.warning(
                "ejected %s replica %s:%s for %.1fs",
                self.name,
                replica.address,
                replica.port,
                self.eject_seconds,
            )

    # -- discovery --------------------------------------------------------------

    async def resolve(self) -> list[tuple[str, int]]:
        loop = asyncio.get_running_loop()
        addresses: list[tuple[str, int]] = []
        for host, port in self.targets:
            if is_ip_literal(host):
                found = [(host, port)]
            else:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
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
                replica = Replica(address, port, healthy=not self.probing)
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
                healthy = 200 <= response.status < 300
        except (aiohttp.ClientError, TimeoutError, OSError):
            healthy = False
        if healthy != replica.healthy:
            logger.warning(
                "%s replica %s:%s is %s",
                pool.name,
                replica.address,
                replica.port,
                "healthy" if healthy else "unhealthy",
            )
        replica.healthy = healthy

    async def probe_all(self, pool: Pool, replicas: Sequence[Replica] | None = None) -> None:
        chosen = pool.replicas if replicas is None else replicas
        await asyncio.gather(*(self.probe(pool, replica) for replica in chosen))
