"""relay: a local gateway for Segment-protocol analytics."""

__version__ = "0.1.0"
