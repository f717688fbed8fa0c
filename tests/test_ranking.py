"""AttFind ranking on stub models with known effects, and the artifact guard on synthetic cells."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffex.errors import DiffexError
from diffex.explain.ranking import (
    SIGNS,
    EditEffects,
    attfind,
    best_restart,
    edit_effects,
    format_ranking,
    legible_pick,
    restart_margin,
)

torch.set_num_threads(1)

# --- stub models ---------------------------------------------------------------------------
# z is a vector of length K; edit k adds sign * alpha * e_k; the decoder paints a constant image
# whose value is tanh(z . w + bias) (bias = reconstruction error, ignored by the deltas);
# p(class 1) = sigmoid(SCALE * mean(image)). So direction k moves p(1) by sign * w_k.

SCALE = 4.0


def edit_fn(z: torch.Tensor, k: int, sign: int, alpha: float) -> torch.Tensor:
    out = z.clone()
    out[:, k] += sign * alpha
    return out


class Decoder:
    def __init__(self, w: list[float], bias: float = 0.05, size: int = 4) -> None:
        self.w = torch.tensor(w, dtype=torch.float32)
        self.bias = bias
        self.size = size
        self.calls: list[int] = []

    def __call__(self, z: torch.Tensor, x_T: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(z))
        v = torch.tanh(z @ self.w + self.bias + 0.0 * x_T.mean(dim=(1, 2, 3)))
        return v[:, None, None, None].expand(len(z), 1, self.size, self.size).clone()


def prob2(img: torch.Tensor) -> torch.Tensor:
    p1 = torch.sigmoid(SCALE * img.mean(dim=(1, 2, 3)))
    return torch.stack([1 - p1, p1], 1)


def prob3(img: torch.Tensor) -> torch.Tensor:
    """Three classes; class 2 rises with the image mean."""
    m = img.mean(dim=(1, 2, 3))
    return torch.softmax(torch.stack([0.5 + 0 * m, 0 * m, SCALE * m], 1), 1)


def inputs(n: int, K: int, seed: int = 0, spread: float = 0.2, offset: float = -0.4):
    g = torch.Generator().manual_seed(seed)
    z = offset + spread * torch.randn(n, K, generator=g) / K**0.5
    return z, torch.randn(n, 1, 4, 4, generator=g)


W4 = [0.8, -0.5, 0.3, 0.02]  # direction 0 +, then 1 -, then 2 +, 3 does almost nothing


def effects_for(w, n=16, target=1, prob=prob2, **kw) -> EditEffects:
    z, xT = inputs(n, len(w), **kw)
    return edit_effects(z, xT, edit_fn, Decoder(w), prob, len(w), 1.0, target, progress=False)


# --- edit_effects ----------------------------------------------------------------------------


def test_effects_shapes_and_deltas_against_reconstruction():
    w = [0.8, 0.0]
    z, xT = inputs(5, 2)
    dec = Decoder(w, bias=0.3)  # reconstruction differs from "the original"
    eff = edit_effects(z, xT, edit_fn, dec, prob2, 2, 1.0, 1)  # progress bar on (default)
    assert eff.probs_recon.shape == (5, 2) and eff.probs_edit.shape == (2, 2, 5, 2)
    assert eff.delta().shape == (2, 2, 5)
    # direction 1 has no effect: its delta is exactly zero against the reconstruction
    assert np.abs(eff.delta()[1]).max() < 1e-6
    assert (eff.delta()[0, SIGNS.index(1)] > 0).all() and (eff.delta()[0, 1] < 0).all()
    expected = prob2(dec(z, xT))[:, 1].numpy()
    np.testing.assert_allclose(eff.p_recon(), expected, atol=1e-6)


@pytest.mark.parametrize("batch_size", [1, 3, 8, 256])
def test_batching_is_invisible_and_bounded(batch_size):
    w = W4
    z, xT = inputs(7, 4)
    ref = edit_effects(z, xT, edit_fn, Decoder(w), prob2, 4, 1.0, 1, progress=False)
    dec = Decoder(w)
    eff = edit_effects(z, xT, edit_fn, dec, prob2, 4, 1.0, 1, batch_size=batch_size, progress=False)
    np.testing.assert_allclose(eff.probs_edit, ref.probs_edit, atol=1e-6)
    assert max(dec.calls) <= batch_size
    assert sum(dec.calls) == 7 + 7 * 4 * 2
    if batch_size == 256:
        assert dec.calls == [7, 56]  # reconstruction once, all edits of all images in one call


def test_keep_images_matches_direct_decode():
    w = [0.8, -0.5]
    z, xT = inputs(3, 2)
    dec = Decoder(w)
    eff = edit_effects(
        z, xT, edit_fn, dec, prob2, 2, 1.0, 1, batch_size=3, progress=False, keep_images=True
    )
    assert eff.edited.shape == (2, 2, 3, 1, 4, 4) and eff.recon.shape == (3, 1, 4, 4)
    torch.testing.assert_close(eff.edited[1, 1], dec(edit_fn(z, 1, -1, 1.0), xT))
    torch.testing.assert_close(eff.recon, dec(z, xT))


def test_effects_bad_inputs():
    z, xT = inputs(3, 2)

    def bad_edit(z, k, s, a):
        return z[:, :1]

    with pytest.raises(DiffexError, match="edit_fn"):
        edit_effects(z, xT, bad_edit, Decoder([1, 1]), prob2, 2, 1.0, 1, progress=False)
    with pytest.raises(DiffexError, match="target"):
        edit_effects(z, xT, edit_fn, Decoder([1, 1]), prob2, 2, 1.0, 5, progress=False)
    with pytest.raises(DiffexError, match="same N"):
        edit_effects(z[:2], xT, edit_fn, Decoder([1, 1]), prob2, 2, 1.0, 1, progress=False)


# --- attfind ---------------------------------------------------------------------------------


def test_known_order_and_signs():
    eff = effects_for(W4)
    ranked = attfind(eff, 1, M=4, threshold=0.1, threshold_step=0.02)
    assert [(d.direction, d.sign) for d in ranked] == [(0, 1), (1, -1), (2, 1)]
    assert [d.rank for d in ranked] == [1, 2, 3]
    assert all(d.mean_delta_p > 0 for d in ranked)
    assert ranked[0].mean_delta_p > ranked[1].mean_delta_p > ranked[2].mean_delta_p
    assert [d.threshold for d in ranked] == pytest.approx([0.1, 0.08, 0.06])
    assert sum(d.n_explained for d in ranked) <= 16
    assert 0 <= ranked[0].flip_rate <= 1 and ranked[0].flip_rate > ranked[2].flip_rate
    d = ranked[0].to_dict()
    assert d["direction"] == 0 and d["sign"] == 1 and isinstance(d["artifact_flags"], list)
    assert "rank" in format_ranking(ranked)


def test_deltas_of_the_ranking_match_the_stub():
    """mean_delta_p is the mean over all source images of the exact delta of the stub."""
    z, xT = inputs(16, 4)
    dec = Decoder(W4)
    eff = edit_effects(z, xT, edit_fn, dec, prob2, 4, 1.0, 1, progress=False)
    ranked = attfind(eff, 1, M=1)
    src = eff.pred_recon != 1
    p0 = prob2(dec(z, xT))[:, 1]
    p1 = prob2(dec(edit_fn(z, 0, 1, 1.0), xT))[:, 1]
    assert ranked[0].mean_delta_p == pytest.approx(float((p1 - p0)[src].mean()), abs=1e-5)


def test_m_equals_k_terminates():
    eff = effects_for([0.9, -0.8, 0.7])
    ranked = attfind(eff, 1, M=3, threshold=0.05)
    assert 1 <= len(ranked) <= 3
    assert len({d.direction for d in ranked}) == len(ranked)


def test_nothing_passes_threshold():
    eff = effects_for(W4)
    assert attfind(eff, 1, M=2, threshold=0.99, min_threshold=0.99) == []
    assert format_ranking([]).startswith("no direction")


def test_all_images_explained_after_one_direction():
    eff = effects_for(W4, spread=0.0)  # identical images: the first direction explains all
    ranked = attfind(eff, 1, M=3, threshold=0.05)
    assert len(ranked) == 1 and ranked[0].n_explained == 16


def test_single_direction_and_single_image():
    assert len(attfind(effects_for([0.8]), 1, M=1)) == 1
    ranked = attfind(effects_for(W4, n=1), 1, M=4, threshold=0.05)
    assert len(ranked) == 1 and ranked[0].n_explained == 1 and ranked[0].flip_rate in (0, 1)


def test_three_classes_target_2():
    eff = effects_for(W4, prob=prob3, target=2)
    assert eff.n_classes == 3
    ranked = attfind(eff, 2, M=3, threshold=0.05)
    assert [(d.direction, d.sign) for d in ranked][:2] == [(0, 1), (1, -1)]
    assert all(d.mean_delta_p > 0 for d in ranked)
    # the same effects serve class 0: every image is already predicted 0, so by default there
    # is nothing to explain; with all images passed explicitly the signs are reversed
    assert attfind(eff, 0, M=2) == []
    r0 = attfind(eff, 0, M=2, threshold=0.01, images=np.ones(16, dtype=bool))
    assert (r0[0].direction, r0[0].sign) == (0, -1)


def test_m_greater_than_k_and_bad_arguments_raise():
    eff = effects_for([0.8, 0.5])
    with pytest.raises(DiffexError, match="M=3"):
        attfind(eff, 1, M=3)
    with pytest.raises(DiffexError):
        attfind(eff, 1, M=0)
    with pytest.raises(DiffexError, match="target"):
        attfind(eff, 4, M=1)
    with pytest.raises(DiffexError, match="threshold"):
        attfind(eff, 1, M=1, threshold=0.1, min_threshold=0.2)


def test_flagged_pairs_are_skipped():
    eff = effects_for(W4)
    ranked = attfind(eff, 1, M=2, threshold=0.1, flagged={(0, 1): ["noise +5.0 sd"]})
    assert (0, 1) not in [(d.direction, d.sign) for d in ranked]
    assert (ranked[0].direction, ranked[0].sign) == (1, -1)
    kept = attfind(eff, 1, M=1, threshold=0.1, flagged={(0, 1)}, skip_flagged=False)
    assert kept[0].direction == 0 and kept[0].artifact_flags == ["flagged"]


def _hand_effects(p1_edit: np.ndarray, p1_recon: float = 0.05) -> EditEffects:
    """EditEffects from p(class 1) of each edit, (K, 2, N), for two classes."""
    pe = np.stack([1 - p1_edit, p1_edit], -1).astype(np.float32)
    n = p1_edit.shape[-1]
    pr = np.tile(np.array([[1 - p1_recon, p1_recon]], dtype=np.float32), (n, 1))
    return EditEffects(target=1, alpha=1.0, probs_recon=pr, probs_edit=pe)


def test_direction_not_reused_with_other_sign():
    # direction 0 explains images 0-1 with sign + and images 2-3 with sign -; direction 1 is weak
    p = np.full((2, 2, 4), 0.05)
    p[0, 0, :2] = 0.95
    p[0, 1, 2:] = 0.95
    p[1, 0, :] = 0.4
    eff = _hand_effects(p)
    ranked = attfind(eff, 1, M=2, threshold=0.1)
    assert [(d.direction, d.sign) for d in ranked] == [(0, 1), (1, 1)]
    assert ranked[0].n_explained == 2 and ranked[1].mean_delta_p_round == pytest.approx(0.35)
    assert ranked[0].flip_rate == 0.5 and ranked[1].flip_rate == 0.0


def _leftover_effects() -> EditEffects:
    """20 images: direction 0 explains 14, direction 1 five of the six left, direction 2 only
    the last one."""
    p = np.full((3, 2, 20), 0.05)
    p[0, 0, :14] = 0.85
    p[1, 0, 14:19] = 0.85
    p[2, 0, 19] = 0.65
    return _hand_effects(p)


def test_floor_on_images_explained_stops_before_a_leftover_direction():
    eff = _leftover_effects()
    everything = attfind(eff, 1, M=3, threshold=0.25)
    assert [(d.direction, d.n_explained) for d in everything] == [(0, 14), (1, 5), (2, 1)]
    assert everything.stop_reason == "M = 3 reached"
    floored = attfind(eff, 1, M=3, threshold=0.25, min_explained=0.2)  # floor: 4 images
    assert [(d.direction, d.n_explained) for d in floored] == [(0, 14), (1, 5)]
    assert "direction 2 (+)" in floored.stop_reason
    assert "1 of 20 images" in floored.stop_reason and "floor of 4" in floored.stop_reason
    assert floored[:2] == everything[:2]  # the floor only cuts the tail
    # a floor that even the first direction misses ranks nothing
    assert attfind(eff, 1, M=3, threshold=0.25, min_explained=0.75) == []


def test_stop_reasons_name_what_ended_the_ranking():
    eff = _leftover_effects()
    assert attfind(eff, 1, M=1).stop_reason == "M = 1 reached"
    high = attfind(eff, 1, M=3, threshold=0.99, min_threshold=0.99)
    assert high == [] and "not above the threshold 0.99" in high.stop_reason
    assert attfind(eff, 1, M=3, images=[]).stop_reason == "every source image is explained"
    with pytest.raises(DiffexError, match="min_explained"):
        attfind(eff, 1, M=1, min_explained=1.5)


def test_nan_effects_terminate():
    eff = _hand_effects(np.full((3, 2, 5), np.nan))
    assert attfind(eff, 1, M=3) == []


def test_caller_chooses_source_images():
    eff = effects_for(W4)
    mask = np.zeros(16, dtype=bool)
    mask[:4] = True
    ranked = attfind(eff, 1, M=2, threshold=0.05, images=mask)
    assert sum(d.n_explained for d in ranked) <= 4
    assert attfind(eff, 1, M=2, images=[]) == []


def test_pairs_mapped_to_no_flags_stay_rankable():
    """The rank stage passes every pair with its (often empty) flag list: only non-empty lists
    exclude a pair."""
    eff = effects_for(W4)
    clean = {(k, s): [] for k in range(4) for s in (1, -1)}
    ranked = attfind(eff, 1, M=4, threshold=0.1, threshold_step=0.02, flagged=clean)
    assert [(d.direction, d.sign) for d in ranked] == [(0, 1), (1, -1), (2, 1)]
    clean[(0, 1)] = ["noise +4.0 sd"]
    ranked = attfind(eff, 1, M=4, threshold=0.1, threshold_step=0.02, flagged=clean)
    assert (0, 1) not in [(d.direction, d.sign) for d in ranked]


def test_smallest_alpha_bisects_down_and_never_enlarges() -> None:
    from diffex.explain.rank import smallest_alpha

    seen: list[float] = []

    def flip_at(a: float) -> float:  # the rate rises linearly, reaching 0.6 at alpha 1.2
        seen.append(a)
        return min(1.0, a / 2.0)

    r = smallest_alpha(flip_at, 2.0, 0.6, steps=5)
    assert r["reached"]
    assert 1.2 <= r["alpha"] <= 1.2 + 2.0 / 2**5
    assert flip_at(r["alpha"]) >= 0.6
    assert seen[0] == 2.0 and len(r["trace"]) == 6
    weak = smallest_alpha(lambda a: 0.3, 2.0, 0.6, steps=5)
    assert weak == {"alpha": 2.0, "reached": False, "trace": [{"alpha": 2.0, "rate": 0.3}]}


def test_duplicate_directions_are_ranked_once():
    # directions 0 and 2 make the same edit (parallel mean shifts, opposite signs); 0 is
    # strongest on 12 images and 2 on the 8 others, so without the rule 2 ranks second
    p = np.full((3, 2, 20), 0.05)
    p[0, 0, :12] = 0.9
    p[2, 1, 12:] = 0.8
    p[1, 0, 12:] = 0.5
    eff = _hand_effects(p)
    shifts = np.array([[1.0, 0.0, 0.1], [0.0, 1.0, 0.0], [-2.0, 0.05, -0.2]])
    plain = attfind(eff, 1, M=3, threshold=0.1)
    assert [(d.direction, d.sign) for d in plain][:2] == [(0, 1), (2, -1)]
    ranked = attfind(eff, 1, M=3, threshold=0.1, shifts=shifts, max_cosine=0.9)
    assert [(d.direction, d.sign) for d in ranked] == [(0, 1), (1, 1)]
    assert ranked[0].duplicates == [2] and ranked[1].duplicates == []
    assert ranked[0].to_dict()["duplicates"] == [2]
    assert "directions 2: the same edit" in format_ranking(ranked)
    # a stricter rule keeps them apart; bad shapes and thresholds are refused
    assert [
        d.direction for d in attfind(eff, 1, M=3, threshold=0.1, shifts=shifts, max_cosine=1.0)
    ][:2] == [0, 2]
    with pytest.raises(DiffexError, match="shifts"):
        attfind(eff, 1, M=1, shifts=shifts[:2])
    with pytest.raises(DiffexError, match="max_cosine"):
        attfind(eff, 1, M=1, shifts=shifts, max_cosine=0.0)


def test_rank_refuses_bad_option_values(tmp_path, capsys):
    """A bad --max-cosine or --calibration-images exits 2 with the option named."""
    from diffex.cli import main
    from diffex.explain.rank import RankConfig

    with pytest.raises(DiffexError, match="max_cosine must be in"):
        RankConfig(max_cosine=1.5)
    code = main(["rank", "--run", str(tmp_path), "--max-cosine", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--max-cosine" in err and "Traceback" not in err
    code = main(["rank", "--run", str(tmp_path), "--calibration-images", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--calibration-images" in err and "Traceback" not in err


def test_best_restart_keeps_the_set_with_the_strongest_edit() -> None:
    # two restarts of K=3: the strongest edit (0.9) is direction 4, sign -, in restart 1
    w = [0.5, -0.3, 0.1, 0.2, -0.9, 0.05]
    eff = effects_for(w, n=12, offset=1.0)  # every reconstruction is called class 0
    assert not eff.pred_recon.any()
    chosen, best = best_restart(eff, 1, 3)
    assert chosen == 1 and best[1] > best[0] > 0
    ranked = attfind(eff, 1, 3, threshold=0.05, candidates=range(3, 6))
    assert [(d.direction, d.sign) for d in ranked][:2] == [(4, -1), (3, 1)]
    assert all(3 <= d.direction < 6 for d in ranked)
    # flagging that edit hands the choice to restart 0 (its best is 0.5 against 0.2)
    assert best_restart(eff, 1, 3, flagged={(4, -1)})[0] == 0
    # ...unless flagged edits may be ranked
    assert best_restart(eff, 1, 3, flagged={(4, -1)}, skip_flagged=False)[0] == 1
    # a tie goes to the earlier restart; a set with nothing rankable scores -inf
    p_edit = np.zeros((4, 2, 5, 2), dtype=np.float32)
    p_edit[..., 0] = 1.0
    p_edit[[0, 2], 0] = [0.3, 0.7]  # directions 0 and 2 (+) both raise p(1) by 0.7
    tie = EditEffects(1, 1.0, np.tile([[1.0, 0.0]], (5, 1)).astype(np.float32), p_edit)
    assert best_restart(tie, 1, 2)[0] == 0
    _, scores = best_restart(tie, 1, 2, flagged={(2, 1), (2, -1), (3, 1), (3, -1)})
    assert scores[1] == -np.inf
    with pytest.raises(DiffexError, match="do not split"):
        best_restart(eff, 1, 4)
    with pytest.raises(DiffexError, match="candidate direction 7"):
        attfind(eff, 1, 1, candidates=[7])


def _two_sets(p_set0: list[float], p_set1: list[float]) -> EditEffects:
    """Two restarts of K=2 on 4 images whose reconstructions have p(1) = 0: direction 0 (+)
    reaches ``p_set0`` and direction 2 (+) ``p_set1``; every other edit does nothing."""
    p_edit = np.zeros((4, 2, 4, 2), dtype=np.float32)
    p_edit[..., 0] = 1.0
    for d, p in ((0, p_set0), (2, p_set1)):
        p_edit[d, 0, :, 1] = p
        p_edit[d, 0, :, 0] = 1 - np.asarray(p)
    return EditEffects(1, 1.0, np.tile([[1.0, 0.0]], (4, 1)).astype(np.float32), p_edit)


def test_restart_margin_is_the_paired_difference_of_the_best_edits() -> None:
    # set 0's best edit beats set 1's by exactly 0.1 on every image: a sure choice
    sure = restart_margin(_two_sets([0.5, 0.6, 0.7, 0.8], [0.4, 0.5, 0.6, 0.7]), 1, 2)
    assert sure["runner_up"] == 1 and not sure["close"]
    assert sure["margin"] == pytest.approx(0.1, abs=1e-6)
    assert sure["margin_se"] == pytest.approx(0.0, abs=1e-6)
    # means 0.65 and 0.60, but per image the difference is -0.4, 0.3, -0.2, 0.5: sd 0.4203,
    # standard error 0.2102, so a margin of 0.05 is a close call
    close = _two_sets([0.5, 0.6, 0.7, 0.8], [0.9, 0.3, 0.9, 0.3])
    assert best_restart(close, 1, 2)[0] == 0
    m = restart_margin(close, 1, 2)
    assert m["runner_up"] == 1 and m["close"]
    assert m["margin"] == pytest.approx(0.05, abs=1e-6)
    assert m["margin_se"] == pytest.approx(np.sqrt(0.53 / 3) / 2, abs=1e-6)
    # the chosen set can be the later one: the sign of the margin follows the choice
    flipped = restart_margin(_two_sets([0.9, 0.3, 0.9, 0.3], [0.5, 0.6, 0.7, 0.8]), 1, 2)
    assert flipped["runner_up"] == 0 and flipped["margin"] == pytest.approx(0.05, abs=1e-6)
    # one set, or a runner-up with nothing rankable, is never a close call
    assert restart_margin(close, 1, 4) == {
        "runner_up": None,
        "margin": None,
        "margin_se": None,
        "close": False,
    }
    lone = restart_margin(close, 1, 2, flagged={(2, 1), (2, -1), (3, 1), (3, -1)})
    assert lone["runner_up"] is None and not lone["close"]


def test_legible_pick_takes_the_most_legible_edit_within_the_share() -> None:
    means = np.array([[0.80, -0.1], [0.74, 0.70], [-np.inf, 0.50]])
    leg = np.array([[2.0, 9.0], [3.0, 4.0], [9.0, 9.0]])
    assert legible_pick(means) == (0, 0)  # delta-p alone
    assert legible_pick(means, leg, 0.0) == (0, 0)
    assert legible_pick(means, leg, 0.05) == (0, 0)  # bar 0.76: only the best
    assert legible_pick(means, leg, 0.10) == (1, 0)  # bar 0.72: 0.74 is more legible than 0.80
    assert legible_pick(means, leg, 0.15) == (1, 1)  # bar 0.68: legibility 4 beats 3 and 2
    # bar 0.08: (2, +) may not be ranked (-inf) and (0, -) is under the bar, however legible
    assert legible_pick(means, leg, 0.9) == (2, 1)
    # equal legibility: the larger delta-p; NaN legibility counts as least legible
    assert legible_pick(means, np.full((3, 2), 1.0), 0.5) == (0, 0)
    nan_leg = np.array([[np.nan, 0.0], [0.5, 0.0], [0.0, 0.0]])
    assert legible_pick(means, nan_leg, 0.1) == (1, 0)
    # a bar from elsewhere that no pair reaches: the largest delta-p
    assert legible_pick(means, leg, 0.1, reference=2.0) == (0, 0)


def test_attfind_and_restarts_prefer_a_legible_edit_within_the_share() -> None:
    # two restarts of K=2: direction 2 (+) raises p(1) most (0.8); direction 0 (+) a little
    # less (0.75) but, by the legibility given, changes one measurement far more clearly
    eff = _two_sets([0.75] * 4, [0.8] * 4)
    leg = np.array([[5.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    assert best_restart(eff, 1, 2)[0] == 1
    assert best_restart(eff, 1, 2, legibility=leg, legible_within=0.1)[0] == 0
    assert best_restart(eff, 1, 2, legibility=leg, legible_within=0.05)[0] == 1
    ranked = attfind(eff, 1, 1, threshold=0.05, legibility=leg, legible_within=0.1)
    assert [(d.direction, d.sign) for d in ranked] == [(0, 1)]
    assert ranked[0].mean_delta_p_round == pytest.approx(0.75)  # the pick's own delta-p
    # within restart 0 alone its own best is 0.75; with the best over both sets (0.8) as round
    # 0's bar, the restart's first pick is the one best_restart chose
    only0 = dict(candidates=range(2), legibility=leg, legible_within=0.1, threshold=0.05)
    assert attfind(eff, 1, 1, first_best=0.8, **only0)[0].direction == 0
    with pytest.raises(DiffexError, match="legible_within"):
        attfind(eff, 1, 1, legibility=leg, legible_within=1.0)
    with pytest.raises(DiffexError, match="legibility must be"):
        attfind(eff, 1, 1, legibility=leg[:3], legible_within=0.1)
    with pytest.raises(DiffexError, match="legibility must be"):
        best_restart(eff, 1, 2, legibility=leg[:3], legible_within=0.1)


def test_rank_refuses_a_bad_legible_share(tmp_path, capsys):
    from diffex.cli import main
    from diffex.explain.rank import RankConfig

    with pytest.raises(DiffexError, match="legible_within must be a share"):
        RankConfig(legible_within=1.0)
    for cmd in (["rank", "--run", str(tmp_path)], ["demo", "--out", str(tmp_path)]):
        assert main([*cmd, "--legible-within", "1.5"]) == 2
        err = capsys.readouterr().err
        assert "--legible-within" in err and "Traceback" not in err


def test_source_split_takes_a_split_name_or_its_data_not_both():
    """The loaded data is assumed to be the held-out split; a split name beside it could
    silently disagree with it, so the two together are refused."""
    from diffex.data.loading import SplitData
    from diffex.explain.rank import source_split

    data = SplitData(x=torch.zeros(2, 1, 4, 4), y=torch.tensor([0, 1]), paths=["a", "b"])
    with pytest.raises(ValueError, match="not both"):
        source_split(None, 1, 1, 0, split="val", data=data)  # type: ignore[arg-type]
