"""Directions stage: learn K contrastive latent directions, write ``RUN/directions/``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffex.config import build
from diffex.data.loading import DataPlan, SplitData, load_split
from diffex.diffusion import ddim_decode, ddim_encode, q_sample
from diffex.errors import DiffexError
from diffex.io.atomic import write_json
from diffex.io.checkpoint import load_config, load_state, save_module
from diffex.log import info
from diffex.models.autoencoder import DiffusionAutoencoder, straight_through_clamp
from diffex.models.contrastive import (
    OBJECTIVES,
    Projector,
    contrastive_accuracy,
    contrastive_loss,
    decorrelation_penalty,
)
from diffex.models.directions import (
    DirectionModelConfig,
    DirectionModels,
    LatentEditor,
    LatentSpace,
    data_span,
)
from diffex.models.nuisance import (
    background_mask,
    background_noise,
    class_separation,
    core_brightness,
    invariance_penalty,
    real_statistics,
)
from diffex.models.nuisance import names as nuisance_names
from diffex.report.plots import training_curve
from diffex.rundir import RunDir
from diffex.runtime import check_precision, resolve_precision
from diffex.train.autoencoder import load_autoencoder, semantic_latents
from diffex.train.loop import EpochSampler, LoopConfig, run_loop
from diffex.train.resume import stage_resume, weights_digest

#: Which signs of alpha the directions are trained at (see DirectionTrainConfig).
SIGNS: tuple[str, ...] = ("plus", "both")
#: Whether the invariance penalty holds the cell's outlined area (see DirectionTrainConfig).
HOLD_AREA: tuple[str, ...] = ("auto", "on", "off")
#: ``hold_area auto`` holds the area when no two classes' means of it differ by this many
#: pooled within-class sds on the training images.
HOLD_MAX_SEPARATION = 0.2


@dataclass
class DirectionTrainConfig:
    """Settings of the directions stage.

    ``restarts``: independent sets of ``k`` directions, trained one after the other from
    different random starts (restart r uses seed ``seed + 100 r`` for its initialisation, batch
    order and noise; restart 0 is the single set of ``restarts = 1``). The contrastive
    objective has several optima, and which one a start reaches decides which factors a set
    finds; the rank stage keeps the set whose best edit moves the classifier most.

    ``precision``: ``auto`` runs the one-step decodes (the UNet, most of a step's work) under
    bf16 autocast where the hardware has native bf16, as the autoencoder trains; the features,
    the direction models, the statistics and the losses stay fp32.

    ``signs``: ``plus`` trains every edit at +alpha; ``both`` draws the sign of each image's
    edits at random, so the invariance penalty also holds the reverse half of a sweep (which the
    explanations show) and the contrast compares sign-corrected feature changes.

    ``reverse``: also decode every edit at -alpha and add its invariance penalty, weighted by
    ``reverse`` relative to the +alpha edit's (0 = off; it costs a second one-step decode of
    every edit). The contrast still sees the +alpha edits only.

    ``span``: keep every shift within the principal axes that hold this share of the training
    latents' variance in standardised z (:func:`diffex.models.directions.data_span`; None =
    unconstrained). z_sem fills a few of its dimensions, and off them the decoder was hardly
    trained.

    ``hold_area``: add the area the actin channel outlines (``object_area``,
    :mod:`diffex.models.nuisance`) to the statistics the invariance penalty holds: ``on``,
    ``off``, or ``auto``: only when the real classes do not differ in it (by less than
    ``HOLD_MAX_SEPARATION`` pooled sds), so that a phenotype that is the cell's size stays
    findable. Needs a channel with the actin role; ``auto`` skips it without one.

    ``t_edit_max``: None decodes every edit in one step from noise level ``t_edit``; a level
    above it draws each image's level uniformly from ``t_edit`` .. ``t_edit_max``, so that the
    invariance penalty also sees what an edit does at the noisier levels, where a full decode
    from x_T sets the image's overall intensity.

    ``decoded_invariance``: weight of a second invariance penalty, measured where the
    explanations are: on ``decoded_images`` images of each batch, inverted exactly and decoded in
    ``decoded_steps`` DDIM steps with each of the K edits at +alpha and at -alpha (gradients
    through the whole decode), holding the same statistics and the background's grain
    (:func:`diffex.models.nuisance.background_noise`). 0 = off. The one-step decode that the
    other penalty and the contrast use is smooth and sees neither the grain nor the stain's
    gain that a full decode from x_T gives the edited cell.

    ``decoded_core``: weight, within the decoded penalty, of the squared change of the nucleus
    core's brightness (:func:`diffex.models.nuisance.nucleus_core`, the readout's
    ``brightness``) in natural sds; needs ``decoded_invariance`` and a nucleus channel. 0 = off.
    The plateau that ``nucleus_gain`` holds can stay while a growing nucleus dims its core.
    ``decoded_every``: the decoded penalty on every n-th step only (it costs most of a step)."""

    k: int = 10
    restarts: int = 2
    kind: str = "nonlinear"
    objective: str = "classifier"
    alpha: float = 1.0
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-3
    decorrelation: float = 0.0
    invariance: float = 0.3
    t_edit: int = 400
    hidden: int = 256
    eval_images: int = 32
    checkpoint_every: int = 50
    seed: int = 0
    precision: str = "auto"
    signs: str = "plus"
    reverse: float = 0.0
    span: float | None = None
    hold_area: str = "off"
    t_edit_max: int | None = None
    decoded_invariance: float = 0.0
    decoded_steps: int = 4
    decoded_images: int = 2
    decoded_core: float = 0.0
    decoded_every: int = 1

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.t_edit < 0:
            raise DiffexError(f"t_edit must be a noise level >= 0, got {self.t_edit}")
        if self.t_edit_max is not None and self.t_edit_max <= self.t_edit:
            raise DiffexError(
                f"t_edit_max must lie above t_edit ({self.t_edit}), got {self.t_edit_max}"
            )
        if self.hold_area not in HOLD_AREA:
            raise DiffexError(f"hold_area {self.hold_area!r} must be one of {', '.join(HOLD_AREA)}")
        if self.span is not None and not 0.0 < self.span <= 1.0:
            raise DiffexError(f"span must be a share of variance in (0, 1], got {self.span}")
        if self.signs not in SIGNS:
            raise DiffexError(f"signs {self.signs!r} must be one of {', '.join(SIGNS)}")
        if self.objective not in OBJECTIVES:
            raise DiffexError(
                f"objective {self.objective!r} must be one of {', '.join(OBJECTIVES)}"
            )
        if self.alpha <= 0:
            raise DiffexError(f"alpha must be > 0 (in class gaps), got {self.alpha}")
        if self.batch_size < 2:
            raise DiffexError(
                f"batch_size must be >= 2 (positives need pairs), got {self.batch_size}"
            )
        if self.steps < 1:
            raise DiffexError(f"steps must be >= 1, got {self.steps}")
        if self.k < 2:
            raise DiffexError(f"k must be >= 2 (negatives need other directions), got {self.k}")
        if self.restarts < 1:
            raise DiffexError(f"restarts must be >= 1, got {self.restarts}")
        if self.decoded_invariance < 0:
            raise DiffexError(f"decoded_invariance must be >= 0, got {self.decoded_invariance}")
        if self.decoded_invariance > 0 and self.objective == "paper":
            raise DiffexError("decoded_invariance needs an image objective, not paper")
        if self.decoded_core < 0:
            raise DiffexError(f"decoded_core must be >= 0, got {self.decoded_core}")
        if self.decoded_core > 0 and self.decoded_invariance == 0:
            raise DiffexError("decoded_core is part of the decoded penalty: set decoded_invariance")
        if self.decoded_every < 1:
            raise DiffexError(f"decoded_every must be >= 1 (steps), got {self.decoded_every}")
        if self.decoded_steps < 1 or self.decoded_images < 1:
            raise DiffexError(
                f"decoded_steps and decoded_images must be >= 1, got {self.decoded_steps} "
                f"and {self.decoded_images}"
            )
        if self.reverse < 0:
            raise DiffexError(f"reverse must be >= 0, got {self.reverse}")
        if self.invariance < 0 or self.decorrelation < 0:
            raise DiffexError(
                f"penalty weights must be >= 0, got invariance {self.invariance} and "
                f"decorrelation {self.decorrelation}"
            )


class DirectionTrainer(nn.Module):
    """What the directions stage optimises: the direction models and, for ``paper``, the
    projector. The autoencoder and classifier are frozen and kept outside (eval mode)."""

    def __init__(self, editor: LatentEditor, objective: str, z_dim: int) -> None:
        super().__init__()
        self.editor = editor
        self.projector = Projector(z_dim) if objective == "paper" else None


def one_step_x0(
    ae: DiffusionAutoencoder, x_t: Tensor, t: Tensor, z: Tensor, bf16: bool = False
) -> Tensor:
    """The one-step estimate of x_0 from ``x_t`` given z_sem ``z``, clamped to [-1, 1], in fp32;
    ``bf16`` runs the UNet under bf16 autocast."""
    with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=bf16):
        return ae.x0_estimate(x_t, t, z).clamp(-1, 1)


def edit_features(
    trainer: DirectionTrainer,
    ae: DiffusionAutoencoder,
    objective: str,
    z: Tensor,
    x: Tensor,
    alpha: float,
    t_edit: int,
    generator: torch.Generator,
    spread: Tensor | None = None,
    gain_channel: int | None = None,
    bf16: bool = False,
    both_signs: bool = False,
    reverse: float = 0.0,
    area_channel: int | None = None,
    t_edit_max: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Contrastive features of all K edits of a batch: (features (K*B, F), labels, units,
    invariance penalty). The penalty (:func:`diffex.models.nuisance.invariance_penalty` of the
    one-step decoded edits against the unedited one-step decode) is computed when ``spread``, the
    natural sd of the statistics, is given and the objective decodes images; else it is None.
    ``gain_channel`` (the nucleus channel, if any) adds its gain to the statistics. ``bf16``
    runs the one-step decodes under bf16 autocast; the features (whose differences between an
    edit and its base are the contrast) and all else stay fp32. ``both_signs`` edits each image
    at +alpha or -alpha (drawn from ``generator``) and multiplies its feature changes by the
    sign, so that both halves of a direction count as the same direction. ``reverse`` > 0 adds
    ``reverse`` times the penalty of the same edits decoded at the opposite sign;
    ``area_channel`` (the actin channel, or None) adds the area it outlines to the statistics;
    ``t_edit_max`` draws each image's noise level from ``t_edit`` .. ``t_edit_max``."""
    editor = trainer.editor
    space, dirs = editor.space, editor.directions
    zs = space.standardise(z)
    units = dirs.units(zs)  # (K, B, D)
    k, b, _ = units.shape
    sign = torch.ones(b, device=z.device)
    if both_signs:
        sign = (torch.randint(0, 2, (b,), generator=generator) * 2 - 1).to(z.device, z.dtype)
    step = alpha * space.gap * sign[None, :, None] * units  # (K, B, D) standardised
    edited = zs[None] + step
    labels = torch.arange(k, device=z.device).repeat_interleave(b)
    row_sign = sign.repeat(k)[:, None]  # rows are (direction, image), image fastest
    if objective == "paper":
        assert trainer.projector is not None
        base = trainer.projector(zs)
        feats = trainer.projector(edited.reshape(k * b, -1)) - base.repeat(k, 1)
        return feats * row_sign, labels, units, None
    # One-step decode of each edit from the same noisy image at t_edit.
    if t_edit_max is None:
        t = torch.full((b,), t_edit, dtype=torch.long, device=x.device)
    else:
        t = torch.randint(t_edit, t_edit_max + 1, (b,), generator=generator).to(x.device)
    noise = torch.randn(x.shape, generator=generator).to(x.device)
    x_t = q_sample(ae.schedule, x, t, noise)
    z_raw = space.unstandardise(edited.reshape(k * b, -1))
    x_t_rep, t_rep = x_t.repeat(k, 1, 1, 1), t.repeat(k)
    x0_edit = one_step_x0(ae, x_t_rep, t_rep, z_raw, bf16)
    phi = ae.classifier.features if objective == "classifier" else ae.encoder
    with torch.no_grad():
        x0_base = one_step_x0(ae, x_t, t, z, bf16)
        base = phi(x0_base).float()
    feats = (phi(x0_edit).float() - base.repeat(k, 1)) * row_sign
    if spread is None:
        return feats, labels, units, None
    penalty = invariance_penalty(x0_edit, x0_base, spread, gain_channel, area_channel)
    if reverse > 0:
        z_opp = space.unstandardise((zs[None] - step).reshape(k * b, -1))
        x0_opp = one_step_x0(ae, x_t_rep, t_rep, z_opp, bf16)
        penalty = penalty + reverse * invariance_penalty(
            x0_opp, x0_base, spread, gain_channel, area_channel
        )
    return feats, labels, units, penalty


def decoded_penalty(
    editor: LatentEditor,
    ae: DiffusionAutoencoder,
    z: Tensor,
    x: Tensor,
    alpha: float,
    steps: int,
    spread: Tensor,
    noise_spread: Tensor,
    gain_channel: int | None = None,
    area_channel: int | None = None,
    bf16: bool = False,
    core: tuple[Tensor, float] | None = None,
    units: Tensor | None = None,
) -> Tensor:
    """The invariance penalty of every edit of images ``x`` (z_sem ``z``) at +alpha and -alpha,
    decoded in ``steps`` DDIM steps from the images' exact inversion (the autoencoder's
    refinement), against their unedited decode, plus the squared change of their background's
    grain in units of ``noise_spread`` and, with ``core`` = (sd, weight) and a ``gain_channel``,
    weight times the squared change of the nucleus core's brightness in units of sd. Gradients
    flow through the whole decode. ``units`` (K, n, D): the edits' standardised unit shifts as
    the training batch's forward pass computed them; pass them, since a direction model with
    BatchNorm run on these few images alone would normalise over them (over two images every
    hidden unit becomes +-1): other edits than the ones explained, and noisy running statistics.
    Without them the editor is run on ``z``."""
    eps = ae.eps_fn(bf16)
    refine, tol = max(ae.inversion_refine, 1), ae.inversion_tol
    with torch.no_grad():
        x_T = ddim_encode(eps, x, steps, ae.schedule, z, refine=refine, tol=tol)
        base = ddim_decode(eps, x_T, steps, ae.schedule, z).clamp(-1, 1)
    space = editor.space
    zs = space.standardise(z)
    if units is None:
        units = editor.directions.units(zs)
    elif units.shape[:2] != (editor.k, len(z)):
        raise DiffexError(f"units of shape {tuple(units.shape)} for K={editor.k}, n={len(z)}")
    step = alpha * space.gap * units  # (K, n, D)
    rows = 2 * step.shape[0]
    edited = torch.cat([zs[None] + step, zs[None] - step]).reshape(rows * len(z), -1)
    z_edit = space.unstandardise(edited)
    out = ddim_decode(eps, x_T.repeat(rows, 1, 1, 1), steps, ae.schedule, z_edit)
    out = straight_through_clamp(out)
    mask = background_mask(base)
    masks = mask.repeat(rows, 1, 1, 1)
    penalty = invariance_penalty(out, base, spread, gain_channel, area_channel, mask)
    grain = background_noise(out, masks)
    change = (grain - background_noise(base, mask).repeat(rows)) / noise_spread.to(grain)
    penalty = penalty + (change**2).mean()
    if core is not None and gain_channel is not None:
        sd, weight = core
        level = core_brightness(out, masks, gain_channel)
        shift = (level - core_brightness(base, mask, gain_channel).repeat(rows)) / sd.to(level)
        penalty = penalty + weight * (shift**2).mean()
    return penalty


#: seed offset between restarts: restart r trains with ``seed + RESTART_SEED_STEP * r``
RESTART_SEED_STEP = 100


def held_statistics(
    hold_area: str, plan: DataPlan, train: SplitData, gain_channel: int | None = None
) -> tuple[Tensor, int | None, float | None]:
    """The invariance statistics of the training images (one pass over them), the channel whose
    outlined area they hold (None: not held) and, where ``auto`` or ``on`` measured it, the
    classes' separation in that area."""
    channel = None if hold_area == "off" else plan.measure_channels.get("actin")
    if channel is None and hold_area == "on":
        raise DiffexError("hold_area on needs a channel with the actin role (none here)")
    stats = real_statistics(train.x, gain_channel, area_channel=channel)
    if channel is None:
        return stats, None, None
    separation = float(class_separation(stats[:, -1:], torch.as_tensor(train.y))[0])
    if hold_area == "on" or separation < HOLD_MAX_SEPARATION:
        info(f"directions: holding the outlined cell area (classes differ by {separation:.2f} sd)")
        return stats, channel, separation
    info(
        f"directions: not holding the outlined cell area: the classes differ by "
        f"{separation:.2f} sd in it (>= {HOLD_MAX_SEPARATION})"
    )
    return stats[:, :-1], None, separation


#: training images per chunk when measuring their background statistics
_CHUNK = 256


def core_hold(
    weight: float,
    train: SplitData,
    gain_channel: int | None,
    device: torch.device,
    masks: list[Tensor] | None = None,
) -> tuple[Tensor, float] | None:
    """(sd of the nucleus core's brightness over the training images, ``weight``) for the
    decoded penalty; None when ``weight`` is 0. Raises without a nucleus channel. ``masks``:
    the images' background masks, per chunk of ``_CHUNK``, where already computed."""
    if weight == 0:
        return None
    if gain_channel is None:
        raise DiffexError("decoded_core needs a channel with the nucleus role (none here)")
    chunks = train.x.split(_CHUNK)
    with torch.no_grad():
        if masks is None:
            masks = [background_mask(xb) for xb in chunks]
        levels = torch.cat(
            [core_brightness(xb, m, gain_channel) for xb, m in zip(chunks, masks, strict=True)]
        )
    sd = levels.std().clamp_min(1e-6)
    info(f"directions: decoded penalty holds the nucleus core's brightness (sd {float(sd):.3g})")
    return sd.to(device), weight


def restart_seed(seed: int, restart: int) -> int:
    """The seed of restart ``restart`` (restart 0 keeps ``seed``)."""
    return seed + RESTART_SEED_STEP * restart


def train_directions(
    run: str | Path, cfg: DirectionTrainConfig, device: torch.device
) -> dict[str, Any]:
    """Fit the latent space on training latents, train ``cfg.restarts`` sets of K directions,
    write RUN/directions/ (one model holding every set, set r as directions r*K .. r*K+K-1)."""
    rd = RunDir(run)
    plan = rd.load_plan()
    ae = load_autoencoder(run, device).eval().requires_grad_(False)
    top = max(cfg.t_edit, cfg.t_edit_max or 0)
    if top >= ae.schedule.T:
        raise DiffexError(f"t_edit {top} is past the autoencoder's {ae.schedule.T} noise levels")
    train = load_split(plan, "train")
    info(f"directions: encoding {len(train.y)} training images to z_sem")
    z_train = semantic_latents(ae, train.x)
    z_dim = z_train.shape[1]
    space = LatentSpace(z_dim, len(plan.classes)).fit(z_train, train.y)
    info(f"directions: class gap in standardised z = {float(space.gap):.2f} (alpha unit)")
    spread = None
    gain_channel = plan.measure_channels.get("nucleus")
    area_channel, area_separation = None, None
    noise_spread, core = None, None
    if (cfg.invariance > 0 or cfg.decoded_invariance > 0) and cfg.objective != "paper":
        stats, area_channel, area_separation = held_statistics(
            cfg.hold_area, plan, train, gain_channel
        )
        spread = stats.std(0).clamp_min(1e-6).to(device)
    if cfg.decoded_invariance > 0 and spread is not None:
        chunks = train.x.split(_CHUNK)
        with torch.no_grad():  # one background mask per image, for the grain and the core
            masks = [background_mask(xb) for xb in chunks]
            grain = torch.cat(
                [background_noise(xb, m) for xb, m in zip(chunks, masks, strict=True)]
            )
        noise_spread = grain.std().clamp_min(1e-6).to(device)
        core = core_hold(cfg.decoded_core, train, gain_channel, device, masks)
        info(
            f"directions: decoded invariance on {cfg.decoded_images} images per batch, "
            f"{cfg.decoded_steps} DDIM steps (grain sd {float(noise_spread):.3g})"
        )
    # the one-step penalty only where it is weighted (the decoded one may need spread alone)
    one_step_spread = spread if cfg.invariance > 0 else None
    stat_names = nuisance_names(gain_channel, area_channel)
    if spread is not None:
        sds = zip(stat_names, spread.tolist(), strict=True)
        info("directions: invariance penalty on " + ", ".join(f"{n} (sd {v:.3g})" for n, v in sds))
    held = load_split(plan, "val")
    n_eval = min(cfg.eval_images, len(held.y))
    z_held, x_held = semantic_latents(ae, held.x[:n_eval]), held.x[:n_eval]
    basis = None if cfg.span is None else data_span(space.standardise(z_train), cfg.span)
    if basis is not None:
        info(
            f"directions: shifts kept in the data's span: {len(basis)} of {z_dim} dimensions "
            f"hold {cfg.span:.4g} of the latents' variance"
        )
    dcfg = DirectionModelConfig(
        z_dim=z_dim,
        k=cfg.k,
        kind=cfg.kind,
        hidden=cfg.hidden,
        span_rank=0 if basis is None else len(basis),
    )
    upstream = weights_digest(rd, "autoencoder")
    precision = "fp32" if cfg.objective == "paper" else resolve_precision(cfg.precision, device)
    bf16 = precision == "bf16"
    if cfg.objective != "paper":
        info(f"directions: {precision} one-step decoding ({cfg.precision})")

    def train_set(restart: int) -> tuple[DirectionTrainer, Any]:
        """One set of K directions from its own random start."""
        seed = restart_seed(cfg.seed, restart)
        torch.manual_seed(seed)
        models = DirectionModels(dcfg)
        if basis is not None:
            models.set_span(basis)
        trainer = DirectionTrainer(LatentEditor(space, models), cfg.objective, z_dim)
        trainer.to(device)
        gen = torch.Generator().manual_seed(seed + 7)
        batches = iter(EpochSampler(len(z_train), cfg.batch_size, seed))

        def loss_fn(m: nn.Module, idx: Tensor, step: int) -> dict[str, Tensor]:
            feats, labels, units, penalty = edit_features(
                m,
                ae,
                cfg.objective,
                z_train[idx].to(device),
                train.x[idx].to(device),
                cfg.alpha,
                cfg.t_edit,
                gen,
                one_step_spread,
                gain_channel,
                bf16,
                cfg.signs == "both",
                cfg.reverse,
                area_channel,
                cfg.t_edit_max,
            )
            loss = contrastive_loss(feats, labels)
            out = {"contrastive": loss}
            if penalty is not None:
                loss = loss + cfg.invariance * penalty
                out["invariance"] = penalty
            if noise_spread is not None and spread is not None and step % cfg.decoded_every == 0:
                n = min(cfg.decoded_images, len(idx))
                decoded = decoded_penalty(
                    m.editor,
                    ae,
                    z_train[idx[:n]].to(device),
                    train.x[idx[:n]].to(device),
                    cfg.alpha,
                    cfg.decoded_steps,
                    spread,
                    noise_spread,
                    gain_channel,
                    area_channel,
                    bf16,
                    core,
                    units=units[:, :n],  # the batch's edits (BatchNorm over the whole batch)
                )
                loss = loss + cfg.decoded_invariance * decoded
                out["decoded_invariance"] = decoded
            if cfg.decorrelation > 0:
                pen = decorrelation_penalty(units)
                loss = loss + cfg.decorrelation * pen
                out["decorrelation"] = pen
            out["loss"] = loss
            return out

        def evaluate(m: nn.Module) -> dict[str, float]:
            with torch.no_grad():
                feats, labels, _, penalty = edit_features(
                    m,
                    ae,
                    cfg.objective,
                    z_held.to(device),
                    x_held.to(device),
                    cfg.alpha,
                    cfg.t_edit,
                    torch.Generator().manual_seed(seed + 99),
                    one_step_spread,
                    gain_channel,
                    bf16,
                    cfg.signs == "both",
                    cfg.reverse,
                    area_channel,
                    cfg.t_edit_max,
                )
                out = {
                    "heldout_loss": float(contrastive_loss(feats, labels)),
                    "heldout_accuracy": contrastive_accuracy(feats, labels),
                }
                if penalty is not None:
                    out["heldout_invariance"] = float(penalty)
                return out

        loop = LoopConfig(
            steps=cfg.steps,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            warmup_steps=0,
            schedule="constant",
            eval_every=max(1, cfg.steps // 4),
            log_every=max(1, cfg.steps // 20),
        )
        extra = {"restart": str(restart)} if restart else {}
        resume = stage_resume(  # the resolved precision: never resume bf16 steps in fp32
            rd,
            "directions",
            replace(cfg, precision=precision),
            {"noise": gen},
            name="checkpoint" if not restart else f"checkpoint_restart{restart}",
            autoencoder=upstream,
            **extra,
        )
        desc = "directions" if cfg.restarts == 1 else f"directions {restart + 1}/{cfg.restarts}"
        result = run_loop(
            trainer, loss_fn, batches, loop, device, evaluate=evaluate, desc=desc, resume=resume
        )
        return result.model, result

    out = rd.stage("directions")
    trainers, results = zip(*(train_set(r) for r in range(cfg.restarts)), strict=True)
    merged = DirectionTrainer(
        LatentEditor(space, DirectionModels.concat([t.editor.directions for t in trainers])),
        cfg.objective,
        z_dim,
    )
    if trainers[0].projector is not None:  # the paper objective's projector (training only)
        merged.projector = trainers[0].projector
    config = {
        "model": merged.editor.directions.config.to_dict(),
        "train": asdict(cfg),
        "precision": precision,
        "n_classes": len(plan.classes),
        "classes": plan.classes,
    }
    save_module(out, merged, config)
    finals = [r.evals[-1] if r.evals else {} for r in results]
    metrics = {
        "class_gap": float(space.gap),
        "invariance_spread": (
            dict(zip(stat_names, spread.tolist(), strict=True)) if spread is not None else None
        ),
        # the classes' separation in the outlined area (pooled sds), where hold_area measured it
        "area_separation": area_separation,
        # mean over restarts; each restart's own curves are under "restarts"
        "final": {key: sum(f[key] for f in finals) / len(finals) for key in finals[0]},
        "evals": results[0].evals,
        "history": results[0].history,
        "train_seconds": round(sum(r.seconds for r in results), 1),
        "restarts": [
            {
                "restart": i,
                "seed": restart_seed(cfg.seed, i),
                "directions": [i * cfg.k, (i + 1) * cfg.k - 1],
                "final": finals[i],
                "evals": r.evals,
                "history": r.history,
                "train_seconds": round(r.seconds, 1),
            }
            for i, r in enumerate(results)
        ],
    }
    write_json(out / "metrics.json", metrics)
    for i, r in enumerate(results):
        training_curve(
            r.history,
            r.evals,
            out / ("training_curve.png" if not i else f"training_curve_restart{i}.png"),
            "directions" if cfg.restarts == 1 else f"directions, restart {i}",
            eval_keys=("heldout_accuracy",),
        )
    return metrics


def direction_sets(config: dict[str, Any], k_total: int) -> tuple[int, int]:
    """(directions per restart, restarts) of a directions config.json (runs from before
    restarts hold one set of ``k_total``)."""
    train = config.get("train", {})
    restarts = int(train.get("restarts", 1))
    k = int(train.get("k", k_total)) if restarts > 1 else k_total
    if k * restarts != k_total:
        raise DiffexError(
            f"directions config: {restarts} restarts of k={k} do not make the model's {k_total}"
        )
    return k, restarts


def load_editor(run: str | Path, device: torch.device | str = "cpu") -> LatentEditor:
    """Load a run's latent space and direction models (eval mode)."""
    folder = RunDir(run).require("directions")
    cfg = load_config(folder)
    try:
        dcfg = build(DirectionModelConfig, cfg["model"], f"{folder}/config.json model")
        objective = cfg["train"]["objective"]
        n_classes = int(cfg["n_classes"])
    except (KeyError, TypeError) as exc:
        raise DiffexError(f"{folder / 'config.json'} is not a directions config: {exc}") from None
    editor = LatentEditor(LatentSpace(dcfg.z_dim, n_classes), DirectionModels(dcfg))
    trainer = DirectionTrainer(editor, objective, dcfg.z_dim)
    load_state(trainer, folder / "model.safetensors")
    return trainer.editor.to(device).eval()
