"""The pipeline's stages after the data, in the order they run (light: the CLI imports it)."""

from __future__ import annotations

STAGES: tuple[str, ...] = ("classifier", "autoencoder", "directions", "rank", "explain", "evaluate")
