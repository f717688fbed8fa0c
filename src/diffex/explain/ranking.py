"""Ranking latent directions by how much they move the classifier (AttFind, after StylEx).

Everything here works against plain callables, so that any autoencoder, direction model and
classifier can be plugged in (and stubs in tests):

- ``EditFn(z (N, D), k, sign, alpha) -> z_edited (N, D)``: apply direction ``k`` with sign +1/-1;
- ``DecodeFn(z (M, D), x_T (M, C, H, W)) -> images (M, C, H, W)`` in [-1, 1];
- ``ProbFn(images) -> probs (M, n_classes)``.

Two steps. :func:`edit_effects` decodes the unedited reconstruction of every image once and every
(direction, sign) edit of every image, and keeps the classifier's probabilities. :func:`attfind`
then chooses up to M directions greedily from those numbers (no decoding, so it is cheap to rerun
with other thresholds or another target class). Deltas are always taken against the unedited
*reconstruction* decode(z, x_T), never against the original image, so that reconstruction error is
not credited to a direction (DESIGN 1.5).

The artifact guard that keeps noise out of the ranking lives in :mod:`diffex.explain.guard`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from diffex.errors import DiffexError
from diffex.evaluate.disentangle import abs_cosine_matrix
from diffex.log import progress_bar

EditFn = Callable[[torch.Tensor, int, int, float], torch.Tensor]
DecodeFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ProbFn = Callable[[torch.Tensor], torch.Tensor]

#: Sign of the edit along the second axis of the (K, 2, N) arrays: index 0 is +1, index 1 is -1.
SIGNS: tuple[int, int] = (1, -1)


def sign_index(sign: int) -> int:
    """+1 -> 0, -1 -> 1 (position on the sign axis of :class:`EditEffects` arrays)."""
    if sign not in SIGNS:
        raise DiffexError(f"edit sign must be +1 or -1, got {sign!r}")
    return SIGNS.index(sign)


# --------------------------------------------------------------------------------------------
# Decoding every edit
# --------------------------------------------------------------------------------------------


@dataclass
class EditEffects:
    """Classifier outputs for the reconstructions and for every (direction, sign) edit.

    ``probs_recon`` (N, n_classes) and ``probs_edit`` (K, 2, N, n_classes) hold the full
    probability vectors, so one set of effects serves any target class. Sign axis: index 0 is
    +1, index 1 is -1 (:data:`SIGNS`). ``recon`` (N, C, H, W) and ``edited`` (K, 2, N, C, H, W)
    are the decoded images (CPU, [-1, 1]) when they were kept, else ``None``.
    """

    target: int
    alpha: float
    probs_recon: np.ndarray
    probs_edit: np.ndarray
    recon: torch.Tensor | None = None
    edited: torch.Tensor | None = None

    @property
    def n_directions(self) -> int:
        return int(self.probs_edit.shape[0])

    @property
    def n_images(self) -> int:
        return int(self.probs_recon.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.probs_recon.shape[1])

    @property
    def pred_recon(self) -> np.ndarray:
        """Predicted class of each reconstruction, (N,)."""
        return self.probs_recon.argmax(-1)

    @property
    def pred_edit(self) -> np.ndarray:
        """Predicted class of each edit, (K, 2, N)."""
        return self.probs_edit.argmax(-1)

    def p_recon(self, target: int | None = None) -> np.ndarray:
        """p(target) of each reconstruction, (N,)."""
        return self.probs_recon[:, self._check_target(target)]

    def p_edit(self, target: int | None = None) -> np.ndarray:
        """p(target) of each edit, (K, 2, N)."""
        return self.probs_edit[..., self._check_target(target)]

    def delta(self, target: int | None = None) -> np.ndarray:
        """p(target | edit) - p(target | unedited reconstruction), (K, 2, N)."""
        return self.p_edit(target) - self.p_recon(target)[None, None, :]

    def _check_target(self, target: int | None) -> int:
        t = self.target if target is None else target
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise DiffexError(f"target class must be an integer index, got {t!r}")
        if not 0 <= int(t) < self.n_classes:
            raise DiffexError(
                f"target class {t} out of range: the classifier has {self.n_classes} classes"
            )
        return int(t)


def _check_probs(p: torch.Tensor, rows: int) -> torch.Tensor:
    if not isinstance(p, torch.Tensor) or p.ndim != 2 or p.shape[0] != rows:
        shape = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
        raise DiffexError(f"prob_fn must return ({rows}, n_classes) probabilities, got {shape}")
    return p


@torch.no_grad()
def edit_effects(
    z: torch.Tensor,
    x_T: torch.Tensor,
    edit_fn: EditFn,
    decode_fn: DecodeFn,
    prob_fn: ProbFn,
    K: int,
    alpha: float,
    target: int,
    batch_size: int = 256,
    progress: bool = True,
    keep_images: bool = False,
) -> EditEffects:
    """Decode the reconstruction and all K x 2 edits of every image; collect classifier outputs.

    ``z`` (N, D) and ``x_T`` (N, C, H, W) come from ``encode``. The reconstruction is
    ``decode_fn(z, x_T)``, decoded once. Edits of many (direction, sign) pairs are concatenated
    into decode calls of at most ``batch_size`` rows: ``max(1, batch_size // (2 K))`` images per
    group, all 2 K edits of a group decoded together (when 2 K exceeds ``batch_size`` one image's
    edits are split over several calls). ``keep_images`` keeps every decoded image on the CPU
    (K * 2 * N images: mind the memory).
    """
    if z.ndim != 2 or x_T.ndim != 4 or len(z) != len(x_T):
        raise DiffexError(
            f"edit_effects: expected z (N, D) and x_T (N, C, H, W) with the same N, "
            f"got {tuple(z.shape)} and {tuple(x_T.shape)}"
        )
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise DiffexError(f"number of directions K must be a positive integer, got {K!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DiffexError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or target < 0:
        raise DiffexError(f"target class must be a non-negative integer index, got {target!r}")
    n = len(z)
    if n == 0:
        raise DiffexError("edit_effects: no images to edit")
    pairs = [(k, s) for k in range(K) for s in SIGNS]
    group = max(1, batch_size // len(pairs))
    n_groups = -(-n // group)
    calls_recon = -(-n // batch_size)
    calls_edit = sum(
        -(-min(group, n - g * group) * len(pairs) // batch_size) for g in range(n_groups)
    )

    recon_p: list[torch.Tensor] = []
    recon_x: list[torch.Tensor] = []
    probs_edit: np.ndarray | None = None
    edited: torch.Tensor | None = None

    with progress_bar() as bar:
        task = bar.add_task(
            "decoding edits", total=calls_recon + calls_edit, status="", visible=progress
        )
        for i in range(0, n, batch_size):
            img = decode_fn(z[i : i + batch_size], x_T[i : i + batch_size])
            recon_p.append(_check_probs(prob_fn(img), len(img)).float().cpu())
            if keep_images:
                recon_x.append(img.float().cpu())
            bar.advance(task)
        probs_recon = torch.cat(recon_p).numpy()
        n_classes = probs_recon.shape[1]
        if not 0 <= target < n_classes:
            raise DiffexError(
                f"target class {target} out of range: the classifier has {n_classes} classes"
            )
        probs_edit = np.zeros((K, 2, n, n_classes), dtype=np.float32)

        for g in range(n_groups):
            i0, i1 = g * group, min(n, (g + 1) * group)
            zg, xg = z[i0:i1], x_T[i0:i1]
            ze = []
            for k, s in pairs:
                out = edit_fn(zg, k, s, float(alpha))
                if not isinstance(out, torch.Tensor) or out.shape != zg.shape:
                    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise DiffexError(
                        f"edit_fn must return z of shape {tuple(zg.shape)}, got {got}"
                    )
                ze.append(out)
            z_all = torch.cat(ze)  # rows ordered (pair, image)
            x_all = xg.repeat(len(pairs), *([1] * (xg.ndim - 1)))
            rows_k = np.repeat([k for k, _ in pairs], i1 - i0)
            rows_s = np.repeat([sign_index(s) for _, s in pairs], i1 - i0)
            rows_i = np.tile(np.arange(i0, i1), len(pairs))
            for r in range(0, len(z_all), batch_size):
                img = decode_fn(z_all[r : r + batch_size], x_all[r : r + batch_size])
                p = _check_probs(prob_fn(img), len(img)).float().cpu().numpy()
                sl = slice(r, r + len(img))
                probs_edit[rows_k[sl], rows_s[sl], rows_i[sl]] = p
                if keep_images:
                    if edited is None:
                        edited = torch.zeros((K, 2, n, *img.shape[1:]), dtype=torch.float32)
                    idx = (
                        torch.as_tensor(rows_k[sl]),
                        torch.as_tensor(rows_s[sl]),
                        torch.as_tensor(rows_i[sl]),
                    )
                    edited[idx] = img.float().cpu()
                bar.advance(task)

    effects = EditEffects(
        target=int(target),
        alpha=float(alpha),
        probs_recon=probs_recon.astype(np.float32),
        probs_edit=probs_edit,
        recon=torch.cat(recon_x) if keep_images else None,
        edited=edited,
    )
    return effects


# --------------------------------------------------------------------------------------------
# AttFind
# --------------------------------------------------------------------------------------------


@dataclass
class RankedDirection:
    """One accepted (direction, sign) of the AttFind ranking.

    ``mean_delta_p`` is over all source images; ``mean_delta_p_round`` over the images still
    unexplained when it was chosen (the number the threshold was applied to); ``flip_rate`` is
    the share of all source images whose predicted class becomes the target after the edit;
    ``n_explained`` how many of the remaining images it explained (and removed);
    ``duplicates`` the other directions that make the same edit (see :func:`attfind`).
    """

    rank: int
    direction: int
    sign: int
    mean_delta_p: float
    mean_delta_p_round: float
    flip_rate: float
    n_explained: int
    threshold: float
    artifact_flags: list[str] = field(default_factory=list)
    duplicates: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": int(self.rank),
            "direction": int(self.direction),
            "sign": int(self.sign),
            "mean_delta_p": float(self.mean_delta_p),
            "mean_delta_p_round": float(self.mean_delta_p_round),
            "flip_rate": float(self.flip_rate),
            "n_explained": int(self.n_explained),
            "threshold": float(self.threshold),
            "artifact_flags": list(self.artifact_flags),
            "duplicates": [int(j) for j in self.duplicates],
        }


class Ranking(list):
    """The accepted :class:`RankedDirection` s, in rank order, with why the ranking stopped."""

    def __init__(self, items: Iterable[RankedDirection] = (), stop_reason: str = "") -> None:
        super().__init__(items)
        self.stop_reason = stop_reason


Pair = tuple[int, int]


def _flag_map(flagged: Mapping[Pair, Sequence[str]] | Iterable[Pair] | None) -> dict[Pair, list]:
    if flagged is None:
        return {}
    if isinstance(flagged, Mapping):
        items = flagged.items()
    else:
        items = ((p, ["flagged"]) for p in flagged)
    out: dict[Pair, list[str]] = {}
    for pair, flags in items:
        try:
            k, s = (int(v) for v in pair)
        except (TypeError, ValueError):
            raise DiffexError(f"flagged pairs must be (direction, sign), got {pair!r}") from None
        sign_index(s)
        if flags:  # a pair mapped to no flags is clean
            out[(k, s)] = [str(f) for f in flags]
    return out


def _source_indices(effects: EditEffects, target: int, images: Any) -> np.ndarray:
    n = effects.n_images
    if images is None:
        return np.flatnonzero(effects.pred_recon != target)
    idx = np.asarray(images)
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise DiffexError(f"image mask has shape {idx.shape}, expected ({n},)")
        return np.flatnonzero(idx)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise DiffexError("images must be a boolean mask or a 1-D array of image indices")
    idx = np.unique(idx.astype(np.int64))
    if idx.size and (idx[0] < 0 or idx[-1] >= n):
        raise DiffexError(f"image index out of range 0..{n - 1}")
    return idx


def attfind(
    effects: EditEffects,
    target: int,
    M: int,
    threshold: float = 0.25,
    threshold_step: float = 0.02,
    min_threshold: float = 0.0,
    flagged: Mapping[Pair, Sequence[str]] | Iterable[Pair] | None = None,
    skip_flagged: bool = True,
    images: np.ndarray | Sequence[int] | None = None,
    min_explained: float = 0.0,
    shifts: np.ndarray | None = None,
    max_cosine: float = 1.0,
    candidates: Iterable[int] | None = None,
    legibility: np.ndarray | None = None,
    legible_within: float = 0.0,
    first_best: float | None = None,
) -> Ranking:
    """Greedy AttFind ranking of (direction, sign) pairs for class ``target``.

    Source images: ``images`` (a boolean mask or indices into the effects' images; pass the
    images labelled as another class), by default every image whose reconstruction is not
    predicted as ``target``. delta_i(k, s) = p(target | edit) - p(target | reconstruction).

    Rule, round r = 0, 1, ... with R the still-unexplained source images (initially all):

    1. candidates: every (k, s) whose direction k is not used yet (either sign) and, when
       ``skip_flagged``, that is not in ``flagged``;
    2. pick the candidate with the largest mean of delta_i over R (ties: lowest k, then +1);
    3. accept it if that mean is > t_r = max(min_threshold, threshold - r * threshold_step),
       otherwise stop;
    4. the images it explains, {i in R : delta_i >= its mean over R} plus the image with the
       largest delta_i (so at least one), leave R; direction k is marked used. If they are
       fewer than ``min_explained`` of all source images (a share; at least one image), the
       candidate is not accepted and the ranking stops: a direction that explains a handful of
       leftover cells describes those cells, not the class.

    5. with ``shifts`` (K, D), each direction's mean shift in the latent space, every unused
       direction j with |cos(shift_j, shift_k)| >= ``max_cosine`` is the same edit as k: it is
       marked used too and listed in the accepted direction's ``duplicates``, so one attribute
       is not ranked several times over.

    Stops when M directions are accepted, no candidate is left, R is empty, or the best
    candidate fails the threshold or the floor (``stop_reason`` of the result says which).
    Every accepted round marks one more of the K directions used, so there are at most K rounds.
    ``flagged`` maps (k, s) to artifact flags (or is a set of pairs); with
    ``skip_flagged=False`` flagged pairs may be chosen and carry their flags. ``candidates``
    limits the ranking to those directions (default: all K), for example one restart's set.

    With ``legibility`` (K, 2) and ``legible_within`` > 0, step 2 picks, among the candidates
    whose mean is at least (1 - ``legible_within``) times the best one, the most legible
    (:func:`legible_pick`; :mod:`diffex.explain.legibility`); steps 3 and 4 then use that
    pick's own mean. ``first_best``: the best mean that round 0's bar is taken from, when it is
    not this ranking's own (the best over every restart, so that the restart chosen by
    :func:`best_restart` ranks the same first edit).
    """
    if isinstance(M, bool) or not isinstance(M, (int, np.integer)) or M < 1:
        raise DiffexError(f"number of directions to rank M must be a positive integer, got {M!r}")
    K = effects.n_directions
    if M > K:
        raise DiffexError(f"cannot rank M={M} directions: only K={K} directions exist")
    if not 0 <= min_explained <= 1:
        raise DiffexError(f"min_explained must be a share in [0, 1], got {min_explained}")
    if not (threshold_step >= 0 and 0 <= min_threshold <= threshold):
        raise DiffexError(
            "AttFind thresholds need threshold_step >= 0 and 0 <= min_threshold <= threshold, "
            f"got threshold={threshold}, threshold_step={threshold_step}, "
            f"min_threshold={min_threshold}"
        )
    if not 0 < max_cosine <= 1:
        raise DiffexError(f"max_cosine must be in (0, 1], got {max_cosine}")
    _check_legibility(legibility, legible_within, K)
    cosine = None
    if shifts is not None:
        if np.shape(shifts)[0] != K or np.ndim(shifts) != 2:
            raise DiffexError(f"shifts must be (K={K}, D), got shape {np.shape(shifts)}")
        cosine = abs_cosine_matrix(shifts)
    target = effects._check_target(target)
    flags = _flag_map(flagged)
    src = _source_indices(effects, target, images)
    delta = effects.delta(target).astype(np.float64)  # (K, 2, N)
    flipped = (effects.pred_edit == target) & (effects.pred_recon != target)[None, None, :]

    allowed = _allowed_pairs(K, flags, skip_flagged, candidates)
    ranked = Ranking()
    remaining = src.copy()
    floor = max(1, int(np.ceil(min_explained * src.size - 1e-9)))
    for r in range(K + 1):  # each accepted round uses a direction: round K always stops
        if len(ranked) >= M:
            ranked.stop_reason = f"M = {M} reached"
            break
        if remaining.size == 0:
            ranked.stop_reason = "every source image is explained"
            break
        if not allowed.any():
            ranked.stop_reason = "no direction left"
            break
        means = delta[:, :, remaining].mean(axis=2)
        means = np.where(allowed & np.isfinite(means), means, -np.inf)
        k, si = legible_pick(means, legibility, legible_within, first_best if r == 0 else None)
        best = float(means[k, si])
        s = SIGNS[si]
        name = f"direction {int(k)} ({'+' if s > 0 else '-'})"
        t_r = max(float(min_threshold), float(threshold) - r * float(threshold_step))
        if not best > t_r:
            ranked.stop_reason = (
                f"the best remaining edit, {name}, raises p(target) by {best:.3f} on the "
                f"unexplained images, not above the threshold {t_r:.2f}"
            )
            break
        d = delta[k, si, remaining]
        explained = d >= best
        explained[int(np.argmax(d))] = True
        if int(explained.sum()) < floor:
            ranked.stop_reason = (
                f"the best remaining edit, {name}, would explain {int(explained.sum())} of "
                f"{src.size} images, fewer than the floor of {floor} "
                f"({min_explained:.0%} of the images)"
            )
            break
        ranked.append(
            RankedDirection(
                rank=len(ranked) + 1,
                direction=int(k),
                sign=s,
                mean_delta_p=float(delta[k, si, src].mean()),
                mean_delta_p_round=best,
                flip_rate=float(flipped[k, si, src].mean()),
                n_explained=int(explained.sum()),
                threshold=t_r,
                artifact_flags=list(flags.get((int(k), s), [])),
            )
        )
        remaining = remaining[~explained]
        if cosine is not None:
            same = (cosine[k] >= max_cosine) & allowed.any(axis=1)
            same[k] = False
            ranked[-1].duplicates = np.flatnonzero(same).tolist()
            allowed[same, :] = False
        allowed[k, :] = False
    return ranked


def _check_legibility(legibility: np.ndarray | None, within: float, K: int) -> None:
    if not 0 <= within < 1:
        raise DiffexError(f"legible_within must be a share in [0, 1), got {within}")
    if legibility is not None and np.shape(legibility) != (K, 2):
        raise DiffexError(f"legibility must be (K={K}, 2), got shape {np.shape(legibility)}")


def legible_pick(
    means: np.ndarray,
    legibility: np.ndarray | None = None,
    within: float = 0.0,
    reference: float | None = None,
) -> tuple[int, int]:
    """The (direction, sign index) to pick from (K, 2) ``means`` (-inf: not allowed).

    Without ``legibility`` or with ``within`` = 0: the largest mean (ties: lowest k, then +1).
    Otherwise the most legible pair whose mean is at least the bar ``reference - within *
    |reference|`` (``reference`` defaults to the largest mean); ties go to the larger mean. If
    no allowed pair reaches the bar (a ``reference`` from elsewhere), the largest mean."""
    top = np.unravel_index(int(np.argmax(means)), means.shape)
    if legibility is None or within <= 0 or not np.isfinite(means[top]):
        return int(top[0]), int(top[1])
    ref = float(means[top]) if reference is None else float(reference)
    ok = np.isfinite(means) & (means >= ref - within * abs(ref))
    if not ok.any():
        return int(top[0]), int(top[1])
    leg = np.nan_to_num(np.asarray(legibility, dtype=np.float64), nan=-1.0, posinf=1e12)
    order = np.lexsort((-means.ravel(), -np.where(ok, leg, -np.inf).ravel()))
    k, si = np.unravel_index(int(order[0]), means.shape)
    return int(k), int(si)


def _allowed_pairs(
    K: int,
    flags: Mapping[Pair, Sequence[str]],
    skip_flagged: bool,
    candidates: Iterable[int] | None,
) -> np.ndarray:
    """(K, 2) mask of the (direction, sign) pairs that may be ranked."""
    allowed = np.ones((K, 2), dtype=bool)
    if candidates is not None:
        allowed[:] = False
        for k in candidates:
            if not 0 <= int(k) < K:
                raise DiffexError(f"candidate direction {k} is not one of the K={K} directions")
            allowed[int(k)] = True
    if skip_flagged:
        for k, s in flags:
            if 0 <= k < K:
                allowed[k, sign_index(s)] = False
    return allowed


def _restart_means(
    effects: EditEffects,
    target: int,
    k: int,
    flagged: Mapping[Pair, Sequence[str]] | Iterable[Pair] | None,
    skip_flagged: bool,
    images: np.ndarray | Sequence[int] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """((K, 2) mean delta-p of every pair AttFind may rank, -inf elsewhere; source indices)."""
    K = effects.n_directions
    if k < 1 or K % k:
        raise DiffexError(f"{K} directions do not split into restarts of k={k}")
    target = effects._check_target(target)
    allowed = _allowed_pairs(K, _flag_map(flagged), skip_flagged, None)
    src = _source_indices(effects, target, images)
    means = effects.delta(target).astype(np.float64)[:, :, src].mean(axis=2)
    return np.where(allowed & np.isfinite(means), means, -np.inf), src


def best_restart(
    effects: EditEffects,
    target: int,
    k: int,
    flagged: Mapping[Pair, Sequence[str]] | Iterable[Pair] | None = None,
    skip_flagged: bool = True,
    images: np.ndarray | Sequence[int] | None = None,
    legibility: np.ndarray | None = None,
    legible_within: float = 0.0,
) -> tuple[int, list[float]]:
    """The restart (consecutive sets of ``k`` directions) whose best edit moves the classifier
    most: for each set, the largest mean delta-p over the source images of its (direction,
    sign) pairs that AttFind may rank (``flagged``, ``skip_flagged`` and ``images`` as in
    :func:`attfind`); that edit is the set's first AttFind pick. Returns (the chosen restart,
    each set's best mean delta-p); ties go to the earlier restart, and a set with no rankable
    pair scores -inf. With ``legibility`` and ``legible_within`` > 0 (see :func:`attfind`) the
    chosen set is the one that holds :func:`legible_pick`'s pair over every set."""
    means, _ = _restart_means(effects, target, k, flagged, skip_flagged, images)
    _check_legibility(legibility, legible_within, len(means))
    best = [float(means[r * k : (r + 1) * k].max()) for r in range(len(means) // k)]
    if legibility is not None and legible_within > 0 and np.isfinite(means).any():
        return legible_pick(means, legibility, legible_within)[0] // k, best
    return int(np.argmax(best)), best


def restart_margin(
    effects: EditEffects,
    target: int,
    k: int,
    flagged: Mapping[Pair, Sequence[str]] | Iterable[Pair] | None = None,
    skip_flagged: bool = True,
    images: np.ndarray | Sequence[int] | None = None,
) -> dict[str, Any]:
    """How sure :func:`best_restart`'s choice is: the mean over the source images of the
    per-image difference in delta-p between the chosen set's best edit and the runner-up
    set's, its standard error, and ``close`` when the margin is under two standard errors
    (another sample of images could choose the other set). Arguments as for
    :func:`best_restart`; with one set, or no rankable runner-up, nothing is close."""
    means, src = _restart_means(effects, target, k, flagged, skip_flagged, images)
    n_sets = len(means) // k
    best = np.array([means[r * k : (r + 1) * k].max() for r in range(n_sets)])
    order = np.argsort(-best, kind="stable")
    if n_sets < 2 or not np.isfinite(best[order[1]]) or len(src) < 2:
        return {"runner_up": None, "margin": None, "margin_se": None, "close": False}
    chosen, runner = int(order[0]), int(order[1])

    def best_pair(r: int) -> tuple[int, int]:
        flat = int(np.argmax(means[r * k : (r + 1) * k]))
        return r * k + flat // 2, flat % 2

    delta = effects.delta(target).astype(np.float64)[:, :, src]
    diff = delta[best_pair(chosen)] - delta[best_pair(runner)]
    margin, se = float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))
    return {"runner_up": runner, "margin": margin, "margin_se": se, "close": margin < 2 * se}


def format_ranking(ranked: Sequence[RankedDirection]) -> str:
    """A plain-text table of the ranking (for the console)."""
    if not ranked:
        return "no direction ranked"
    lines = ["rank  direction  sign  mean dp  dp(round)  flip rate  explained  flags"]
    for d in ranked:
        lines.append(
            f"{d.rank:>4}  {d.direction:>9}  {'+' if d.sign > 0 else '-':>4}  "
            f"{d.mean_delta_p:+7.3f}  {d.mean_delta_p_round:+9.3f}  {d.flip_rate:9.2f}  "
            f"{d.n_explained:>9}  {'; '.join(d.artifact_flags)}"
        )
        if d.duplicates:
            same = ", ".join(str(j) for j in d.duplicates)
            lines.append(f"      (directions {same}: the same edit, not ranked again)")
    return "\n".join(lines)
