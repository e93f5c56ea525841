"""The daemon: starting up, the main loop, reloading on SIGHUP, readiness, shutting down, and
its part in a fleet. An I/O shell around the engine, the fleet and the operations server.

May use `syncd.engine`, `syncd.fleet`, `syncd.servicetitan`, `syncd.ops`, `syncd.redis`,
`syncd.config` and the shared modules; only `syncd.cli` uses it.
"""

from syncd.daemon.daemon import EXIT_CONFIG, EXIT_FEEDS_FAILED, EXIT_OK, Daemon
from syncd.daemon.state import cancel_all, http_session, redis_client

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FEEDS_FAILED",
    "EXIT_OK",
    "Daemon",
    "cancel_all",
    "http_session",
    "redis_client",
]
