"""An LLM API gateway: YAML routes and keys, per-key limits, byte-for-byte streaming proxy."""

__version__ = "0.1.0"
