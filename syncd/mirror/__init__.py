"""The PostgreSQL mirror (`syncd mirror`): the events of the configured streams kept as one
table per feed, read through a consumer group and applied exactly once in effect (one
transaction per batch, the newest version of each key winning, acknowledged after COMMIT).
`schema` creates and migrates the tables, `rows` decides (pure: an event's row, what an error
means), `apply` writes a batch, `mirror` is the process around them.

May use `syncd.consumer`, `syncd.ops` (sd_notify), `syncd.redis`, `syncd.config` and the shared
modules, and psycopg (the `postgres` extra); knows nothing of the engine, the fleet or
ServiceTitan. Only `syncd.cli` uses it.
"""

from syncd.mirror.mirror import EXIT_OK, EXIT_SCHEMA, Mirror, subscriptions

__all__ = ["EXIT_OK", "EXIT_SCHEMA", "Mirror", "subscriptions"]
