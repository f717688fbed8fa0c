"""Ground truth on the synthetic benchmark: which causal factors the directions recover, and how
much they move the nuisance factors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from diffex.data.measure import CIRCULAR, FACTOR_MEASURES
from diffex.data.spec import SynthSpec

#: A direction recovers a factor when |rho| along alpha is at least this ...
MIN_RHO = 0.6
#: ... and its change at +alpha is within this range of the real class gap (right sign).
GAP_RANGE = (0.5, 2.0)


def expected_signs(spec: SynthSpec, source: str, target: str) -> dict[str, int]:
    """Sign of (target - source) shift of each causal factor; factors with no shift are left out."""
    out = {}
    for f in spec.causal:
        d = spec.shift(target, f) - spec.shift(source, f)
        if d != 0:
            out[f] = int(np.sign(d))
    return out


def _num(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return float("nan")
    return v


def _worst_leak(
    directions: Sequence[Mapping[str, Any]], nuisance: Sequence[str], key: str
) -> tuple[float, dict[str, Any] | None]:
    """Largest finite |``key``| of a nuisance feature over the directions, and where it is."""
    leak, worst = 0.0, None
    for d in directions:
        for f in nuisance:
            if f in CIRCULAR:
                continue
            rho = _num(d["features"].get(FACTOR_MEASURES.get(f, f), {}).get(key))
            if np.isfinite(rho) and (worst is None or abs(rho) > leak):
                leak, worst = abs(rho), {"direction": d["name"], "factor": f, "rho": rho}
    return leak, worst


def recovery(
    directions: Sequence[Mapping[str, Any]],
    signs: Mapping[str, int],
    nuisance: Sequence[str],
    min_rho: float = MIN_RHO,
    gap_range: tuple[float, float] = GAP_RANGE,
) -> dict[str, Any]:
    """Recovery and leakage of a set of directions.

    ``directions``: one mapping per direction with ``name`` and ``features``: feature ->
    ``{"rho": Spearman rho along alpha, "fraction_of_gap": change at +alpha / real class gap}``.
    ``signs``: causal factor -> expected sign of its change towards the target.

    A causal factor is recovered when some direction changes it with |rho| >= ``min_rho``, the
    expected sign of rho, and a fraction of the class gap within ``gap_range`` (which also has
    the expected sign, since the gap is target - source). ``recovery`` is the share of causal
    factors recovered; ``leakage`` the largest |rho| of any nuisance factor over the directions
    (circular factors such as rotation are not measured along alpha and are skipped).
    ``leakage_forward`` is the same over the sweeps' halves towards the target (``rho_forward``
    of each feature, when given; else None): a leak there is one the counterfactual shows, one
    only in ``leakage`` comes from extrapolating away from the target. Half the sweep gives
    smaller |rho| for every factor, causal ones too, so compare it with theirs.
    """
    factors: dict[str, Any] = {}
    for f, sign in signs.items():
        feat = FACTOR_MEASURES.get(f, f)
        hits = []
        for d in directions:
            row = d["features"].get(feat, {})
            rho, frac = _num(row.get("rho")), _num(row.get("fraction_of_gap"))
            ok = (
                np.isfinite(rho)
                and abs(rho) >= min_rho
                and np.sign(rho) == sign
                and np.isfinite(frac)
                and gap_range[0] <= frac <= gap_range[1]
            )
            if ok:
                hits.append(d["name"])
        factors[f] = {"expected_sign": sign, "recovered": bool(hits), "by": hits}
    leak, worst = _worst_leak(directions, nuisance, "rho")
    leak_fwd, worst_fwd = _worst_leak(directions, nuisance, "rho_forward")
    n = len(factors)
    return {
        "recovery": float(sum(v["recovered"] for v in factors.values()) / n) if n else float("nan"),
        "leakage": float(leak) if directions else float("nan"),
        "worst_leak": worst,
        "leakage_forward": float(leak_fwd) if worst_fwd is not None else None,
        "worst_leak_forward": worst_fwd,
        "factors": factors,
        "criteria": {"min_abs_rho": min_rho, "fraction_of_gap": list(gap_range)},
    }
