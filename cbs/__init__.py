"""cbs: measure steps-to-target against batch size and extract the critical batch size."""

__version__ = "0.1.0"
