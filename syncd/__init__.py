"""syncd: keeps downstream systems in sync with ServiceTitan through Redis streams."""

__version__ = "0.3.0"
