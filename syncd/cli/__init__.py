"""The command line and the operator's tools: `syncd run`, `check-config`, `doctor`, `status`,
`reset-cursor`, `backfill`, `tail`, `feeds`, `simulate` and `demo`.

The top of the import order: may use every other package, including the simulator and the
throwaway servers of `syncd.testing` (for `demo`). Nothing imports it but `__main__`.
"""

from syncd.cli.main import main

__all__ = ["main"]
