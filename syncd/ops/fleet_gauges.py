"""The fleet's five gauges, as this instance sees the fleet (none before it joins one)."""

from __future__ import annotations

from syncd.ops.exposition import Family, Key, Labels


class FleetGauges:
    def __init__(self) -> None:
        none = Labels(())
        self.members = Family("syncd_fleet_members", "Live members of the fleet.", "gauge", none)
        self.owned = Family(
            "syncd_fleet_tenants_owned", "Tenants this instance holds the lease of.", "gauge", none
        )
        self.disagreements = Family(
            "syncd_fleet_config_disagreements",
            "Tenants whose configuration differs between live fleet members (listed or not,"
            " feeds, options); `syncd status --fleet` names the differences.",
            "gauge",
            none,
        )
        self.unpolled = Family(
            "syncd_fleet_feeds_unpolled",
            "Tenant feeds some live member lists that the tenant's owner does not poll (feed"
            " lists no member's list contains all of).",
            "gauge",
            none,
        )
        self.name_clash = Family(
            "syncd_fleet_instance_name_clash",
            "1 while another live process uses this instance's name (the later one polls nothing).",
            "gauge",
            none,
        )
        self._families = (
            self.members,
            self.owned,
            self.disagreements,
            self.unpolled,
            self.name_clash,
        )

    def set(
        self, members: int, owned: int, disagreements: int, unpolled: int, name_clash: bool
    ) -> None:
        """The fleet's live members as this instance sees them, the tenants it owns, the tenants
        whose configuration differs between members, the tenant feeds no owner polls, and
        whether another live process uses this instance's name."""
        self.members.values[()] = members
        self.owned.values[()] = owned
        self.disagreements.values[()] = disagreements
        self.unpolled.values[()] = unpolled
        self.name_clash.values[()] = int(name_clash)

    def snapshot(self) -> list[tuple[Family, dict[Key, float]]]:
        return [(f, f.values.copy()) for f in self._families if f.values]
