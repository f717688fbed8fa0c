"""The pipeline's stages after the data, in the order they run (light: the CLI imports it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

STAGES: tuple[str, ...] = ("classifier", "autoencoder", "directions", "rank", "explain", "evaluate")


def code_revision(stage: str, settings: Mapping[str, Any]) -> int:
    """The revision of a stage's code for these settings: raised when a fix changes what the
    stage computes with them, so that results (demo markers, training checkpoints) from before
    the fix are not reused. 0 (recorded as nothing) for settings no fix has touched.

    - directions, revision 1 (2026-12-07): with ``decoded_invariance`` > 0 the decoded penalty
      ran the BatchNorm direction models on its few images alone (other edits than the ones
      explained, and running statistics updated twice a step).
    """
    if stage == "directions" and float(settings.get("decoded_invariance") or 0) > 0:
        return 1
    return 0


def with_revision(stage: str, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with the stage's code revision added where it is not 0."""
    revision = code_revision(stage, settings)
    return {**settings, "code_revision": revision} if revision else settings
