"""The engine: what is due and when (`due`, `policy`, `fairshare`, `ratelimit`), the scheduler
that polls feeds with a bounded pool of workers, the publisher that applies a page in one atomic
Redis call (the fence), and stream upkeep (groups, retention, backpressure).

Pure decisions live in `due`, `policy`, `fairshare` and `ratelimit` and are tested by tables;
`scheduler`, `publisher` and `upkeep` are the I/O around them. May use `syncd.servicetitan`,
`syncd.ops` (metrics), `syncd.redis`, `syncd.config` and the shared modules.
"""
