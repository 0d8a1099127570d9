"""batchserve: a micro-batching text-to-image HTTP server for diffusion models."""

from __future__ import annotations

__version__ = "0.1.0"
