"""A ServiceTitan Export API simulator: real HTTP, deterministic data, injected trouble.

`syncd simulate` runs it as a server; `syncd.testing.simulator` runs it from tests
(`run_simulator`, in-process) and benchmarks (`SimulatorProcess`, a child process).
"""

from syncd.simulator.options import SimOptions

__all__ = ["SimOptions"]
