"""The fleet: which instance polls which tenant. `assign` decides (pure, from live instances,
known tenants and current owners); `compare` decides (pure) how the instances' configurations
differ and which of them may own a tenant; `fleet` keeps membership and per-tenant leases in
Redis and rebalances, with `transitions` for a member's own tenants; `state` reads what the
fleet keeps there.

May use `syncd.redis`, `syncd.config` and the shared modules. Leases make the fleet efficient;
the publisher's fence keeps it correct.
"""
