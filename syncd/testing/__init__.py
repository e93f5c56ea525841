"""Support for tests, benchmarks and the demo: throwaway Redis, Sentinel and PostgreSQL servers
on free ports (or throwaway databases), the simulator run in-process or as a child process, and
the demo's watchdog (`demoguard`, standard library only: it runs as
`python -m syncd.testing.demoguard`).

Not used by the daemon: only `syncd.cli` (for `demo`), the tests and the benchmarks import it.
May use `syncd.simulator` and the shared modules.
"""
