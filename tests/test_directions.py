"""Direction models, the latent space and the contrastive objectives."""

from __future__ import annotations

import math

import pytest
import torch
from test_autoencoder import _images, _make, _wake

from diffex.diffusion import q_sample
from diffex.errors import DiffexError
from diffex.models.autoencoder import DiffusionAutoencoder
from diffex.models.contrastive import (
    contrastive_accuracy,
    contrastive_loss,
    decorrelation_penalty,
)
from diffex.models.directions import (
    DirectionModelConfig,
    DirectionModels,
    LatentEditor,
    LatentSpace,
)
from diffex.train.directions import (
    DirectionTrainConfig,
    DirectionTrainer,
    core_hold,
    decoded_penalty,
    direction_sets,
    edit_features,
    one_step_x0,
    semantic_latents,
)


def test_paper_loss_matches_hand_computation() -> None:
    f = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.8, 0.6], [0.6, -0.8]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    total = 0.0
    for i in range(5):
        pos, neg = [], []
        for j in range(5):
            if i == j:
                continue
            s = math.exp(0.5 * abs(float(f[i] @ f[j])))
            (pos if labels[i] == labels[j] else neg).append(s)
        total += -math.log((sum(pos) / len(pos)) / (sum(neg) / len(neg)))
    assert float(contrastive_loss(f, labels)) == pytest.approx(total / 5, rel=1e-6)


def test_paper_loss_floor_and_accuracy() -> None:
    f = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # identical (up to sign) features within a direction, orthogonal across: the floor -0.5
    assert float(contrastive_loss(f, labels)) == pytest.approx(-0.5, abs=1e-6)
    assert contrastive_accuracy(f, labels) == 1.0


def test_decorrelation_penalty() -> None:
    eye = torch.eye(3)[:, None, :].expand(3, 4, 3)  # K=3 orthogonal shifts at 4 samples
    assert float(decorrelation_penalty(eye)) == pytest.approx(0.0)
    same = torch.ones(3, 4, 3) / math.sqrt(3)
    assert float(decorrelation_penalty(same)) == pytest.approx(1.0)


def test_latent_space_gap_and_edit_length() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 6, generator=g) * torch.tensor([1.0, 2, 3, 4, 5, 6])
    y = torch.arange(200) % 2
    z[y == 1, 0] += 4.0
    space = LatentSpace(6, 2).fit(z, y)
    zs = space.standardise(z)
    gap = (zs[y == 1].mean(0) - zs[y == 0].mean(0)).norm()
    assert float(space.gap) == pytest.approx(float(gap), rel=1e-5)
    for kind in ("nonlinear", "linear", "global"):
        dirs = DirectionModels(DirectionModelConfig(z_dim=6, k=3, kind=kind, hidden=16)).eval()
        editor = LatentEditor(space, dirs)
        moved = space.standardise(editor.edit(z[:5], 1, -1, 0.5)) - zs[:5]
        torch.testing.assert_close(moved.norm(dim=1), torch.full((5,), 0.5 * float(gap)))
    # the class-mean unit vector points from source to target
    d = space.class_direction(0, 1)
    assert float(d.norm()) == pytest.approx(1.0) and float(d[0]) > 0.9


def test_config_validation() -> None:
    with pytest.raises(DiffexError, match="kind"):
        DirectionModelConfig(z_dim=4, kind="wiggly")
    with pytest.raises(DiffexError, match="at least two latents"):
        LatentSpace(4, 2).fit(torch.zeros(1, 4), torch.zeros(1, dtype=torch.long))


def test_direction_sets_of_a_config() -> None:
    assert direction_sets({"train": {"k": 10, "restarts": 2}}, 20) == (10, 2)
    assert direction_sets({"train": {"k": 10}}, 10) == (10, 1)  # runs before restarts
    with pytest.raises(DiffexError, match="restarts"):
        direction_sets({"train": {"k": 10, "restarts": 2}}, 10)
    with pytest.raises(DiffexError, match="restarts must be >= 1"):
        DirectionTrainConfig(restarts=0)
    with pytest.raises(DiffexError, match="precision must be auto, fp32 or bf16, got 'fp16'"):
        DirectionTrainConfig(precision="fp16")


def test_bf16_one_step_decode_tracks_fp32() -> None:
    """Under bf16 autocast the one-step decode really runs in bf16 (it differs from fp32), yet
    the decoded images and the gradient that reaches z_sem stay close to fp32's."""
    ae, _ = _make()
    _wake(ae)
    ae.eval().requires_grad_(False)
    x = _images(8)
    t = torch.full((8,), 50)
    x_t = q_sample(
        ae.schedule, x, t, torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    )
    z0 = semantic_latents(ae, x)
    out = {}
    for bf16 in (False, True):
        z = z0.clone().requires_grad_(True)
        x0 = one_step_x0(ae, x_t, t, z, bf16)
        assert x0.dtype == torch.float32 and float(x0.detach().abs().max()) <= 1.0
        x0.square().mean().backward()
        out[bf16] = (x0.detach(), z.grad)
    (x32, g32), (x16, g16) = out[False], out[True]
    assert not torch.equal(x32, x16)  # autocast took effect
    assert float((x16 - x32).abs().mean()) < 0.01
    assert float(torch.cosine_similarity(g32.flatten(), g16.flatten(), dim=0)) > 0.95


@pytest.mark.parametrize("kind", ["nonlinear", "linear", "global"])
def test_concatenated_sets_edit_like_their_parts(kind: str) -> None:
    torch.manual_seed(0)
    z = torch.randn(40, 6)
    space = LatentSpace(6, 2).fit(z, torch.arange(40) % 2)
    sets = [
        DirectionModels(DirectionModelConfig(z_dim=6, k=3, kind=kind, hidden=8)).eval()
        for _ in range(2)
    ]
    joined = DirectionModels.concat(sets).eval()
    assert joined.k == 6
    for r, part in enumerate(sets):
        for j in range(3):
            torch.testing.assert_close(
                LatentEditor(space, joined).edit(z[:4], 3 * r + j, -1, 0.7),
                LatentEditor(space, part).edit(z[:4], j, -1, 0.7),
            )
    other = DirectionModels(DirectionModelConfig(z_dim=6, k=3, kind=kind, hidden=16))
    with pytest.raises(DiffexError, match="architectures"):
        DirectionModels.concat([sets[0], other])


def _global_pair() -> tuple[
    DiffusionAutoencoder, torch.Tensor, torch.Tensor, DirectionTrainer, DirectionTrainer
]:
    """A tiny awake autoencoder, 8 images, their z_sem, and a trainer of K = 3 global
    directions beside one whose directions are the negated ones."""
    ae, _ = _make()
    _wake(ae)
    ae.eval().requires_grad_(False)
    x = _images(8)
    z = semantic_latents(ae, x)
    space = LatentSpace(z.shape[1], 2).fit(z, torch.arange(8) % 2)
    cfg = DirectionModelConfig(z_dim=z.shape[1], k=3, kind="global")
    trainer = DirectionTrainer(LatentEditor(space, DirectionModels(cfg)), "classifier", z.shape[1])
    flipped = DirectionTrainer(LatentEditor(space, DirectionModels(cfg)), "classifier", z.shape[1])
    with torch.no_grad():
        flipped.editor.directions.vectors.copy_(-trainer.editor.directions.vectors)
    return ae, x, z, trainer, flipped


def test_both_signs_edit_each_image_at_a_random_sign_and_correct_its_features() -> None:
    """With ``both_signs`` an image drawn -1 is edited like the plus-only edit of the negated
    direction, and its feature change is multiplied by -1; an image drawn +1 is edited like
    the plus-only edit. Labels stay the direction's index."""
    ae, x, z, trainer, flipped = _global_pair()

    def feats(model: DirectionTrainer, both: bool, skip_signs: bool) -> torch.Tensor:
        gen = torch.Generator().manual_seed(5)
        if skip_signs:  # consume the sign draw so that the noise matches the both-signs call
            torch.randint(0, 2, (8,), generator=gen)
        f, labels, _, _ = edit_features(
            model, ae, "classifier", z, x, 0.5, 50, gen, both_signs=both
        )
        assert torch.equal(labels, torch.arange(3).repeat_interleave(8))
        return f

    sign = torch.randint(0, 2, (8,), generator=torch.Generator().manual_seed(5)) * 2 - 1
    assert (sign > 0).any() and (sign < 0).any()
    both = feats(trainer, True, False)
    plus, minus = feats(trainer, False, True), feats(flipped, False, True)
    row_sign = sign.repeat(3)
    torch.testing.assert_close(both[row_sign > 0], plus[row_sign > 0])
    torch.testing.assert_close(both[row_sign < 0], -minus[row_sign < 0])
    assert not torch.allclose(both, plus)
    with pytest.raises(DiffexError, match="signs"):
        DirectionTrainConfig(signs="minus")


def test_reverse_adds_the_penalty_of_the_opposite_edit() -> None:
    """``reverse`` adds ``reverse`` times the invariance penalty of each edit decoded at the
    opposite sign: the same as the plus-only penalty of the negated directions."""
    from diffex.models.nuisance import natural_spread

    ae, x, z, trainer, flipped = _global_pair()
    spread = natural_spread(x, 0)

    def penalty(model: DirectionTrainer, reverse: float) -> torch.Tensor:
        gen = torch.Generator().manual_seed(5)
        out = edit_features(model, ae, "classifier", z, x, 0.5, 50, gen, spread, 0, reverse=reverse)
        assert out[3] is not None
        return out[3].detach()

    plus, minus = penalty(trainer, 0.0), penalty(flipped, 0.0)
    assert float(plus) > 0 and float(minus) > 0 and not torch.isclose(plus, minus)
    torch.testing.assert_close(penalty(trainer, 0.5), plus + 0.5 * minus)
    with pytest.raises(DiffexError, match="reverse"):
        DirectionTrainConfig(reverse=-1.0)


def test_data_span_finds_the_few_dimensions_the_latents_fill() -> None:
    """Latents in a 3-dimensional subspace of 16 (plus faint noise): the span that holds 0.999
    of their variance is that subspace, as 3 orthonormal rows; share 1 keeps every axis."""
    from diffex.models.directions import data_span

    torch.manual_seed(0)
    true = torch.linalg.qr(torch.randn(16, 3))[0].T  # (3, 16) orthonormal rows
    zs = torch.randn(500, 3) * torch.tensor([5.0, 3.0, 2.0]) @ true + 1e-3 * torch.randn(500, 16)
    basis = data_span(zs, 0.999)
    assert basis.shape == (3, 16)
    torch.testing.assert_close(basis @ basis.T, torch.eye(3), atol=1e-5, rtol=0)
    # the true axes lie in the found span: projecting them loses (almost) nothing
    assert float(((true @ basis.T) @ basis - true).norm()) < 1e-2
    assert data_span(zs, 1.0).shape[0] == 16
    with pytest.raises(DiffexError, match="share"):
        data_span(zs, 0.0)


@pytest.mark.parametrize("kind", ["nonlinear", "global"])
def test_span_keeps_every_shift_in_the_span_and_is_saved(kind: str, tmp_path) -> None:
    """With a span, every unit shift lies in it (and still has norm 1); the basis is saved with
    the weights and loads back; sets on different spans are not joined."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(1)
    basis = torch.linalg.qr(torch.randn(8, 2))[0].T.contiguous()  # (2, 8)
    cfg = DirectionModelConfig(z_dim=8, k=3, kind=kind, hidden=16, span_rank=2)
    models = DirectionModels(cfg).eval()
    models.set_span(basis)
    zs = torch.randn(5, 8)
    units = models.units(zs)  # (K, N, D)
    torch.testing.assert_close(units.norm(dim=-1), torch.ones(3, 5))
    torch.testing.assert_close((units @ basis.T) @ basis, units, atol=1e-5, rtol=0)
    free = DirectionModels(DirectionModelConfig(z_dim=8, k=3, kind=kind, hidden=16)).eval()
    free.load_state_dict({k: v for k, v in models.state_dict().items() if k != "basis"})
    fu = free.units(zs).detach()
    assert float(((fu @ basis.T) @ basis - fu).norm()) > 0.1  # without the span: off it
    save_file(models.state_dict(), str(tmp_path / "m.safetensors"))
    again = DirectionModels(cfg).eval()
    again.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    torch.testing.assert_close(again.units(zs), units)
    other = DirectionModels(cfg)
    other.set_span(torch.linalg.qr(torch.randn(8, 2))[0].T.contiguous())
    with pytest.raises(DiffexError, match="span"):
        DirectionModels.concat([models, other])
    with pytest.raises(DiffexError, match="span basis"):
        models.set_span(torch.zeros(3, 8))


def test_train_directions_with_a_span(demo_run, tmp_path) -> None:
    """``train-directions --span`` on the quick demo's autoencoder: the saved editor keeps
    every shift in the span it found and records its rank; a share out of range is one line."""
    import shutil

    from diffex.cli import main
    from diffex.io.atomic import read_json
    from diffex.train.directions import load_editor

    run = tmp_path / "run"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("directions", "cache"))
    args = ["--device", "cpu", "train-directions", "--run", str(run), "--k", "2"]
    args += ["--steps", "2", "--batch-size", "2", "--restarts", "1"]
    assert main([*args, "--span", "0.99"]) == 0
    rank = read_json(run / "directions" / "config.json")["model"]["span_rank"]
    assert 1 <= rank < 16
    editor = load_editor(run, torch.device("cpu"))
    basis = editor.directions.basis
    z = torch.randn(6, basis.shape[1]) * editor.space.std + editor.space.mean
    units = editor.units(z)
    torch.testing.assert_close((units @ basis.T) @ basis, units, atol=1e-4, rtol=0)
    assert main([*args, "--span", "1.5"]) == 2


def test_hold_area_auto_holds_the_area_only_where_the_classes_share_it() -> None:
    """``auto`` holds the outlined area when the classes' cells are the same size and leaves it
    free when size is what tells them apart; ``on`` without an actin channel is one error."""
    from types import SimpleNamespace

    from test_nuisance import disk

    from diffex.train.directions import held_statistics

    def split(radii: list[float]) -> SimpleNamespace:
        x = torch.cat([disk(r, 0.6) for r in radii])
        return SimpleNamespace(x=x, y=torch.tensor([0, 1] * (len(radii) // 2)))

    plan = SimpleNamespace(measure_channels={"nucleus": 0, "actin": 1})
    same = split([6, 6.5, 7, 7.5, 8, 8.5, 8.5, 8, 7.5, 7, 6.5, 6])
    _, channel, sep = held_statistics("auto", plan, same)
    assert channel == 1 and sep is not None and sep < 0.2
    grown = split([6, 9, 6.5, 9.5, 7, 10, 6, 9, 6.5, 9.5, 7, 10])
    _, channel, sep = held_statistics("auto", plan, grown)
    assert channel is None and sep is not None and sep > 2
    assert held_statistics("on", plan, grown)[1] == 1
    assert held_statistics("off", plan, same)[1:] == (None, None)
    no_actin = SimpleNamespace(measure_channels={"nucleus": 0})
    assert held_statistics("auto", no_actin, same)[1:] == (None, None)
    with pytest.raises(DiffexError, match="actin role"):
        held_statistics("on", no_actin, same)
    with pytest.raises(DiffexError, match="hold_area"):
        DirectionTrainConfig(hold_area="sometimes")


def test_train_directions_holding_the_area(demo_run, tmp_path) -> None:
    """``train-directions --hold-area on`` on the quick demo: the penalty's statistics name the
    outlined area with its natural sd, and the classes' separation in it is recorded."""
    import shutil

    from diffex.cli import main
    from diffex.io.atomic import read_json

    run = tmp_path / "run"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("directions", "cache"))
    args = ["--device", "cpu", "train-directions", "--run", str(run), "--k", "2"]
    args += ["--steps", "2", "--batch-size", "2", "--restarts", "1", "--hold-area", "on"]
    assert main(args) == 0
    metrics = read_json(run / "directions" / "metrics.json")
    assert list(metrics["invariance_spread"])[-1] == "object_area"
    assert metrics["invariance_spread"]["object_area"] > 0
    assert metrics["area_separation"] >= 0
    assert read_json(run / "directions" / "config.json")["train"]["hold_area"] == "on"
    assert main([*args[:-1], "sometimes"]) == 2


def test_t_edit_max_draws_each_images_noise_level_in_its_range() -> None:
    """With ``t_edit_max`` every image's edits (and its unedited decode) are decoded from one
    level drawn in ``t_edit .. t_edit_max``, not all from ``t_edit``; without it, all are."""
    ae, x, z, trainer, _ = _global_pair()
    seen: list[torch.Tensor] = []
    real = ae.x0_estimate

    def spy(x_t: torch.Tensor, t: torch.Tensor, zz: torch.Tensor) -> torch.Tensor:
        seen.append(t.clone())
        return real(x_t, t, zz)

    ae.x0_estimate = spy  # type: ignore[method-assign]
    gen = torch.Generator().manual_seed(3)
    edit_features(trainer, ae, "classifier", z, x, 0.5, 50, gen, t_edit_max=90)
    edits, base = seen
    assert int(base.min()) >= 50 and int(base.max()) <= 90 and len(set(base.tolist())) > 1
    assert torch.equal(edits, base.repeat(3))  # the K edits of an image share its level
    seen.clear()
    edit_features(trainer, ae, "classifier", z, x, 0.5, 50, gen)
    assert all(set(t.tolist()) == {50} for t in seen)
    with pytest.raises(DiffexError, match="t_edit_max must lie above t_edit"):
        DirectionTrainConfig(t_edit=400, t_edit_max=400)
    with pytest.raises(DiffexError, match="t_edit must be"):
        DirectionTrainConfig(t_edit=-1)


def test_train_directions_refuses_a_level_past_the_schedule(demo_run, tmp_path) -> None:
    """``train-directions --t-edit-max`` past the autoencoder's noise levels, or not above
    t_edit, exits 2 with a one-line error before any training."""
    import shutil

    from diffex.cli import main

    run = tmp_path / "run"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("directions", "cache"))
    args = ["--device", "cpu", "train-directions", "--run", str(run), "--k", "2"]
    args += ["--steps", "1", "--batch-size", "2", "--restarts", "1"]
    assert main([*args, "--t-edit-max", "1000"]) == 2
    assert main([*args, "--t-edit-max", "300"]) == 2
    assert not (run / "directions" / "model.safetensors").exists()
    assert main([*args, "--t-edit-max", "800"]) == 0
    from diffex.io.atomic import read_json

    assert read_json(run / "directions" / "config.json")["train"]["t_edit_max"] == 800


def test_decoded_penalty_is_zero_for_no_edit_and_trains_the_directions() -> None:
    """The decoded invariance penalty compares full decodes of the edits with the unedited
    decode of the same exact inversion: a vanishing edit costs nothing, a real one costs more
    at twice the size, and its gradient reaches the direction models."""
    from diffex.models.nuisance import natural_spread

    ae, x, z, trainer, _ = _global_pair()
    spread = natural_spread(x, 0)
    grain = torch.tensor(0.01)

    def pen(alpha: float) -> torch.Tensor:
        return decoded_penalty(trainer.editor, ae, z[:2], x[:2], alpha, 3, spread, grain, 0)

    assert pen(1e-7).item() < 1e-6
    core = (torch.tensor(0.05), 2.0)
    held = decoded_penalty(trainer.editor, ae, z[:2], x[:2], 1.0, 3, spread, grain, 0, core=core)
    assert held.item() > pen(1.0).item()  # the core's squared change adds to the penalty
    small, large = pen(0.5), pen(1.0)
    assert 0 < small.item() < large.item()
    # the edits may come from the batch's forward pass: the same units give the same penalty
    units = trainer.editor.directions.units(trainer.editor.space.standardise(z[:2]))
    given = decoded_penalty(trainer.editor, ae, z[:2], x[:2], 1.0, 3, spread, grain, 0, units=units)
    assert given.item() == pytest.approx(large.item(), rel=1e-5)
    with pytest.raises(DiffexError, match="units of shape"):
        decoded_penalty(
            trainer.editor, ae, z[:2], x[:2], 1.0, 3, spread, grain, 0, units=units[:, :1]
        )
    large.backward()
    grads = [p.grad for p in trainer.editor.directions.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    with pytest.raises(DiffexError, match="decoded_invariance"):
        DirectionTrainConfig(decoded_invariance=-1.0)
    with pytest.raises(DiffexError, match="decoded_steps"):
        DirectionTrainConfig(decoded_steps=0)
    with pytest.raises(DiffexError, match="not paper"):
        DirectionTrainConfig(objective="paper", decoded_invariance=0.5)
    with pytest.raises(DiffexError, match="decoded_core must be >= 0"):
        DirectionTrainConfig(decoded_invariance=0.5, decoded_core=-1.0)
    with pytest.raises(DiffexError, match="set decoded_invariance"):
        DirectionTrainConfig(decoded_core=0.5)
    with pytest.raises(DiffexError, match="decoded_every"):
        DirectionTrainConfig(decoded_every=0)
    with pytest.raises(DiffexError, match="decoded_core needs a channel with the nucleus role"):
        core_hold(0.5, None, None, torch.device("cpu"))  # type: ignore[arg-type]
    assert core_hold(0.0, None, None, torch.device("cpu")) is None  # type: ignore[arg-type]


def test_train_directions_with_the_decoded_penalty(demo_run, tmp_path) -> None:
    """``train-directions --decoded-invariance`` (here with ``--decoded-core`` and
    ``--decoded-every 2``) trains with the decoded penalty on every second step, logs it and
    records it; a bad weight or period, or a core weight without the decoded penalty, exits 2."""
    import shutil

    from diffex.cli import main
    from diffex.io.atomic import read_json

    run = tmp_path / "run"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("directions", "cache"))
    args = ["--device", "cpu", "train-directions", "--run", str(run), "--k", "2"]
    args += ["--steps", "2", "--batch-size", "2", "--restarts", "1", "--decoded-steps", "2"]
    assert main([*args, "--decoded-invariance", "-1"]) == 2
    assert main([*args, "--decoded-core", "0.5"]) == 2  # without --decoded-invariance
    assert main([*args, "--decoded-every", "0"]) == 2
    decoded = ["--decoded-invariance", "0.5", "--decoded-core", "0.3", "--decoded-every", "2"]
    assert main([*args, *decoded]) == 0
    first, second = read_json(run / "directions" / "metrics.json")["history"]
    assert first["decoded_invariance"] > 0  # step 1 of every 2
    assert "decoded_invariance" not in second
    train = read_json(run / "directions" / "config.json")["train"]
    assert train["decoded_invariance"] == 0.5 and train["decoded_steps"] == 2
    assert train["decoded_core"] == 0.3 and train["decoded_every"] == 2
    # the decoded penalty edits with the batch's own forward pass: the non-linear directions'
    # BatchNorm sees one batch per step (not the penalty's few images as a second one), and
    # a single decoded image works
    assert main([*args, "--decoded-invariance", "0.5", "--decoded-images", "1"]) == 0
    from safetensors.torch import load_file

    weights = load_file(run / "directions" / "model.safetensors")
    tracked = [int(v) for k, v in weights.items() if k.endswith("num_batches_tracked")]
    assert tracked and set(tracked) == {2}
