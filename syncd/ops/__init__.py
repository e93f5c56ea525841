"""Operations: the ops HTTP server (/metrics, /healthz, /readyz, /status), the metrics and
their exposition, how stale each tenant and feed is, and sd_notify for systemd.

May use `syncd.config` and the shared modules only: it is told about the engine, it does not
reach into it.
"""
