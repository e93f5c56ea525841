"""Every Redis key syncd reads or writes, built in one place (see the README's Redis layout).

The tenant id sits in a hash tag, so all keys of one tenant share a Redis Cluster slot.
"""

from __future__ import annotations

DEFAULT_PREFIX = "st"


class Keys:
    """Key names of one tenant under one prefix."""

    __slots__ = ("base", "prefix", "tenant")

    def __init__(self, prefix: str, tenant: int) -> None:
        self.prefix = prefix
        self.tenant = tenant
        self.base = f"{prefix}:{{{tenant}}}"

    def stream(self, feed: str) -> str:
        """Change events of one feed."""
        return f"{self.base}:{feed}"

    @property
    def cursors(self) -> str:
        """Hash: feed -> last stored continueFrom."""
        return f"{self.base}:cursors"

    def index(self, feed: str) -> str:
        """Hash: the metadata of a feed's index (`syncd.engine.index`); its buckets, small
        hashes of record key -> what was last published, are `<this key>:<n>`."""
        return f"{self.base}:idx:{feed}"

    def bucket(self, feed: str, n: int) -> str:
        """Hash: bucket `n` of a feed's index."""
        return f"{self.index(feed)}:{n}"

    def seen(self, feed: str) -> str:
        """Hash: a feed's index in the layout before buckets (record key -> fingerprint and
        timestamp of the last published version), read until its keys have moved."""
        return f"{self.base}:seen:{feed}"

    def dead_seen(self, feed: str) -> str:
        """Set: digests of the records of one feed already written to the dead-letter stream."""
        return f"{self.base}:dead_seen:{feed}"

    @property
    def dead(self) -> str:
        """Stream of records that could not be turned into events, with the reason."""
        return f"{self.base}:dead"

    def replay(self, feed: str, group: str) -> str:
        """Stream: the dead letters of one feed that `syncd dead replay` handed back to one
        consumer group, read by that group alone beside the feed's stream. The feed comes
        first: feed names hold no colon, group names may."""
        return f"{self.base}:replay:{feed}:{group}"

    @property
    def missed(self) -> str:
        """Hash: `<feed>:<group>` (`missed_field`) -> how many events of the feed's stream were
        trimmed before the group read them, as consumers last reported it
        (`syncd.consumer.trimmed`); the field goes when the group is created again."""
        return f"{self.base}:missed"

    @staticmethod
    def missed_field(feed: str, group: str) -> str:
        """A group's field in `missed` (feed names hold no colon, group names may)."""
        return f"{feed}:{group}"

    def reasons(self, group: str) -> str:
        """Hash: `reason_field` -> why a consumer of `group` last failed that pending entry
        (`Failed(event, reason)`), for whichever consumer of the group dead-letters it (its
        `detail`); a field goes when the entry is acknowledged or dead-lettered, the hash a week
        after its last write."""
        return f"{self.base}:reasons:{group}"

    def reason_field(self, stream: str, entry_id: str) -> str:
        """An entry's field in `reasons`: the stream's name after the tenant's part (the feed,
        or `replay:<feed>:<group>`), a space, the entry id (which holds no space)."""
        return f"{stream.removeprefix(self.base + ':')} {entry_id}"

    @property
    def state(self) -> str:
        """Hash: per-feed operational state (last poll, last error), for `syncd status`."""
        return f"{self.base}:state"

    @property
    def owner(self) -> str:
        """String with a TTL: the fleet instance polling this tenant now (its lease), as
        `<name>#<incarnation>`: the name and the random token of that process."""
        return f"{self.base}:owner"


class FleetKeys:
    """Key names of the fleet's membership under one prefix.

    They share the hash tag `{fleet}` (tenant tags are numbers, so none collides), which puts
    them in one Cluster slot; each tenant's lease lives in the tenant's own slot (`Keys.owner`).
    """

    __slots__ = ("base", "prefix")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.base = f"{prefix}:{{fleet}}"

    @property
    def members(self) -> str:
        """Set: the names of the instances that joined and have not been seen gone."""
        return f"{self.base}:members"

    def member(self, instance: str) -> str:
        """String with a TTL of one lease: an instance's heartbeat (JSON)."""
        return f"{self.base}:member:{instance}"

    def known(self, instance: str) -> str:
        """Set with a TTL of one lease: the tenant ids an instance's configuration lists."""
        return f"{self.base}:known:{instance}"

    def config(self, instance: str) -> str:
        """String (JSON) with a TTL of one lease: an instance's effective per-tenant
        configuration (its distinct profiles and the tenants of each)."""
        return f"{self.base}:config:{instance}"

    def clash(self, instance: str) -> str:
        """String (JSON) with a TTL of one lease: the heartbeat of a process kept out of the
        fleet because another live process holds its instance name."""
        return f"{self.base}:clash:{instance}"

    @property
    def epoch(self) -> str:
        """Counter bumped on every join, leave and release, so the others look at once."""
        return f"{self.base}:epoch"
