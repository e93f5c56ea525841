"""The ServiceTitan edge: the Export API client, OAuth tokens per tenant, what a page of the
API holds and how it is checked (`page`), and the reading of upstream responses (`upstream`:
capped bodies, redirects refused, error texts redacted, Retry-After).

May use `syncd.ops` (metrics), `syncd.config` and the shared modules; knows nothing of Redis.
"""
