"""widedeep: benchmark and activation-analysis suite for PyTorch MLPs on tabular data."""

__version__ = "0.1.0"
