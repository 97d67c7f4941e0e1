"""What a process asks of its platform at start: light, so the gateway's
supervisor can call it before any app is imported."""

from __future__ import annotations

import logging
import resource

logger = logging.getLogger("kit.process")


def raise_open_file_limit() -> int:
    """Raises the soft limit on open files to the hard limit; returns it.

    A socket is a descriptor, and a container's soft limit may be 1,024
    (newer Docker engines; a swarm service on an engine before 23 cannot be
    given `ulimits` at all) while its hard limit is far higher: a replica
    holding thousands of sockets must not depend on the platform raising it.
    Every service calls it as its app is assembled (`kit.app.assemble`)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as error:
            logger.warning("open-file limit stays at %s: %s", soft, error)
    return soft
