"""Support for tests, benchmarks and the demo: throwaway Redis and Sentinel servers on free
ports, and the simulator run in-process or as a child process.

Not used by the daemon: only `syncd.cli` (for `demo`), the tests and the benchmarks import it.
May use `syncd.simulator` and the shared modules.
"""
