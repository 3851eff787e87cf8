"""hashfed: a federation hub for sharing hashes of known abusive media."""

__version__ = "0.1.0"
