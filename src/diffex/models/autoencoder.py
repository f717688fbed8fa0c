"""Classifier-aware diffusion autoencoder (DiffAE variant, DESIGN.md 1.2 and 1.3).

``z_sem = Linear([C_out(x); E(x)])`` where C is the frozen classifier (kept in eval mode, never a
registered submodule: not saved, not trained, not switched to train mode) and E the semantic
encoder; a UNet predicts the noise from (x_t, t, z_sem). ``encode`` / ``decode`` are deterministic
DDIM inversion / sampling on the same step schedule, so ``decode(*encode(x))`` reproduces x.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffex.config import INVERSION_REFINE, INVERSION_TOL, build
from diffex.diffusion import (
    Progress,
    Schedule,
    ScheduleKind,
    ddim_decode,
    ddim_encode,
    eps_from_v,
    predict_x0,
    q_sample,
    sample_timesteps,
    v_target,
)
from diffex.errors import DiffexError
from diffex.models.encoder import ENCODER_PRESETS, EncoderConfig, SemanticEncoder
from diffex.models.nuisance import invariance_penalty
from diffex.models.protocol import Classifier
from diffex.models.unet import UNET_PRESETS, UNet, UNetConfig

ClassifierOutput = Literal["probs", "logits", "features"]
CLASSIFIER_OUTPUTS: tuple[str, ...] = ("probs", "logits", "features")


@dataclass
class AutoencoderConfig:
    """The autoencoder: UNet and encoder architectures (configs or preset names), latent size,
    which classifier output feeds z_sem, and the noise schedule.

    ``z_dim`` (when set) overrides ``unet.z_dim``; after construction both agree.
    """

    unet: UNetConfig | str = "cpu64"
    encoder: EncoderConfig | str | None = None
    z_dim: int | None = None
    classifier_output: ClassifierOutput = "probs"
    prediction: str = "eps"
    schedule: ScheduleKind = "linear"
    T: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.unet, str):
            if self.encoder is None:
                self.encoder = self.unet
            self.unet = _preset(UNET_PRESETS, self.unet, "UNet")
        if isinstance(self.encoder, str):
            self.encoder = _preset(ENCODER_PRESETS, self.encoder, "encoder")
        if self.encoder is None:
            raise DiffexError("autoencoder config: give an encoder config or preset name")
        if self.z_dim is None:
            self.z_dim = self.unet.z_dim
        elif self.unet.z_dim != self.z_dim:
            self.unet = replace(self.unet, z_dim=self.z_dim)
        if self.classifier_output not in CLASSIFIER_OUTPUTS:
            raise DiffexError(
                f"classifier_output {self.classifier_output!r} must be one of "
                f"{', '.join(CLASSIFIER_OUTPUTS)}"
            )
        if self.prediction not in ("eps", "v"):
            raise DiffexError(f"prediction {self.prediction!r} must be 'eps' or 'v'")
        enc, un = self.encoder, self.unet
        if (enc.in_channels, enc.image_size) != (un.in_channels, un.image_size):
            raise DiffexError(
                f"encoder ({enc.in_channels} channels, {enc.image_size} px) and UNet "
                f"({un.in_channels} channels, {un.image_size} px) must agree"
            )

    @classmethod
    def from_preset(
        cls,
        name: str,
        in_channels: int,
        image_size: int | None = None,
        unet_overrides: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> AutoencoderConfig:
        """A preset (``paper128``, ``cpu64``, ``tiny``) adapted to the data's channels and size;
        ``unet_overrides`` replaces UNet fields (``z_norm``, say)."""
        unet = _preset(UNET_PRESETS, name, "UNet")
        enc = _preset(ENCODER_PRESETS, name, "encoder")
        size = image_size or unet.image_size
        return cls(
            unet=replace(unet, in_channels=in_channels, image_size=size, **(unet_overrides or {})),
            encoder=replace(enc, in_channels=in_channels, image_size=size),
            **kwargs,
        )

    def to_dict(self) -> dict[str, Any]:
        assert isinstance(self.unet, UNetConfig) and isinstance(self.encoder, EncoderConfig)
        return {
            "unet": self.unet.to_dict(),
            "encoder": self.encoder.to_dict(),
            "z_dim": self.z_dim,
            "classifier_output": self.classifier_output,
            "prediction": self.prediction,
            "schedule": self.schedule,
            "T": self.T,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "autoencoder") -> AutoencoderConfig:
        return build(cls, data, where)


def _preset(table: dict[str, Any], name: str, what: str) -> Any:
    if name not in table:
        raise DiffexError(f"unknown {what} preset {name!r}; choose from {', '.join(table)}")
    return table[name]


class _FrozenRef:
    """Holds the classifier outside the module tree; shared (not copied) by ``copy.deepcopy``."""

    __slots__ = ("obj",)

    def __init__(self, obj: Classifier) -> None:
        self.obj = obj

    def __deepcopy__(self, memo: dict[int, Any]) -> _FrozenRef:
        return self


def freeze_classifier(classifier: Classifier) -> None:
    """Turn off gradients for the classifier's parameters and put it in eval mode (if it can)."""
    params = getattr(classifier, "parameters", None)
    if callable(params):
        for p in params():
            p.requires_grad_(False)
    set_eval = getattr(classifier, "eval", None)
    if callable(set_eval):
        set_eval()


def _chunks(x: Tensor, batch_size: int | None) -> Iterator[Tensor]:
    step = batch_size if batch_size and batch_size > 0 else max(1, x.shape[0])
    yield from x.split(step)


def straight_through_clamp(x: Tensor, lo: float = -1.0, hi: float = 1.0) -> Tensor:
    """Clamp in the forward pass, identity gradient in the backward pass."""
    return x + (x.clamp(lo, hi) - x).detach()


class DiffusionAutoencoder(nn.Module):
    """Semantic encoder + z projection + noise-prediction UNet, with a frozen classifier alongside.

    The classifier is not a submodule: it is absent from ``parameters()`` and ``state_dict()``,
    its parameters never require grad, and ``train()`` always puts it back in eval mode.
    ``.to(device)`` also moves it (device only).
    """

    def __init__(self, config: AutoencoderConfig, classifier: Classifier) -> None:
        super().__init__()
        assert isinstance(config.unet, UNetConfig) and isinstance(config.encoder, EncoderConfig)
        if classifier.in_channels != config.unet.in_channels:
            raise DiffexError(
                f"classifier takes {classifier.in_channels} channels but the autoencoder "
                f"{config.unet.in_channels}"
            )
        if classifier.image_size != config.unet.image_size:
            raise DiffexError(
                f"classifier takes {classifier.image_size} px images but the autoencoder "
                f"{config.unet.image_size} px"
            )
        self.config = config
        self._classifier_ref = _FrozenRef(classifier)
        freeze_classifier(classifier)
        cls_dim = (
            int(classifier.feature_dim)
            if config.classifier_output == "features"
            else len(classifier.class_names)
        )
        self.cls_dim = cls_dim
        self.encoder = SemanticEncoder(config.encoder)
        self.z_proj = nn.Linear(cls_dim + config.encoder.out_dim, int(config.z_dim or 0))
        self.unet = UNet(config.unet)
        self.schedule = Schedule.from_config(
            config.schedule, config.T, config.beta_start, config.beta_end
        )
        #: Run the UNet of encode/decode under bf16 autocast (the DDIM state stays fp32).
        self.decode_bf16 = False
        #: Fixed-point refinement of DDIM inversion: at most this many extra UNet calls per level,
        #: stopping a sample once its largest pixel change is below ``inversion_tol``
        #: (:func:`diffex.diffusion.ddim_encode`); 0 is the plain one-call inversion.
        self.inversion_refine = INVERSION_REFINE
        self.inversion_tol = INVERSION_TOL

    # ------------------------------------------------------------------ classifier plumbing
    @property
    def classifier(self) -> Classifier:
        return self._classifier_ref.obj

    def train(self, mode: bool = True) -> DiffusionAutoencoder:
        super().train(mode)
        freeze_classifier(self.classifier)
        return self

    def to(self, *args: Any, **kwargs: Any) -> DiffusionAutoencoder:
        super().to(*args, **kwargs)
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        move = getattr(self.classifier, "to", None)
        if device is not None and callable(move):
            move(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def classifier_output(self, x: Tensor) -> Tensor:
        """The configured classifier output on x (no gradient), float32, shape (N, cls_dim)."""
        c = self.classifier
        fn = {"probs": c.probs, "logits": c.logits, "features": c.features}
        with torch.no_grad():
            return fn[self.config.classifier_output](x).float()

    def classifier_logits_with_grad(self, x: Tensor) -> Tensor:
        """Classifier logits with gradients flowing through the frozen classifier into x."""
        return self.classifier.logits(x)

    def classifier_probs_with_grad(self, x: Tensor) -> Tensor:
        """Classifier probabilities (with its own temperature) with gradients into x."""
        return self.classifier.probs(x)

    # ------------------------------------------------------------------ network pieces
    def semantic(self, x: Tensor) -> Tensor:
        """z_sem = z_proj([C_out(x); E(x)]); gradients reach the encoder and z_proj only."""
        return self.z_proj(torch.cat([self.classifier_output(x), self.encoder(x).float()], dim=1))

    def eps(self, x_t: Tensor, t: Tensor, z: Tensor) -> Tensor:
        """Predicted noise in x_t at steps t given z_sem (converted from v when the UNet
        predicts v = sqrt(abar) eps - sqrt(1 - abar) x0)."""
        out = self.unet(x_t, t, z)
        if self.config.prediction == "v":
            return eps_from_v(self.schedule, x_t, t, out)
        return out

    def eps_fn(self, bf16: bool | None = None) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
        """The UNet's noise prediction as a DDIM model function ``(x_t, t, z) -> eps`` in fp32,
        under bf16 autocast when ``bf16`` (None: the decode precision). It keeps gradients, so
        a loss can flow through a whole decode."""
        use_bf16 = self.decode_bf16 if bf16 is None else bf16

        def eps(x_t: Tensor, t: Tensor, z: Tensor | None) -> Tensor:
            assert z is not None
            if t.ndim == 0:
                t = t.expand(x_t.shape[0])
            if not use_bf16:
                return self.eps(x_t, t, z)
            with torch.autocast(x_t.device.type, dtype=torch.bfloat16):
                return self.eps(x_t, t, z).float()  # v -> eps in fp32: x_t is fp32

        return eps

    @property
    def inversion(self) -> str:
        """How encode inverts: ``plain`` or ``fp{refine}-{tol}`` (in the latent cache's name)."""
        if not self.inversion_refine:
            return "plain"
        return f"fp{self.inversion_refine}-{self.inversion_tol:g}"

    @property
    def decode_precision(self) -> str:
        """``bf16`` or ``fp32``: what the UNet of encode/decode runs in."""
        return "bf16" if self.decode_bf16 else "fp32"

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    def _dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    # ------------------------------------------------------------------ encode / decode
    def encode(
        self,
        x: Tensor,
        steps: int = 50,
        batch_size: int | None = None,
        progress: Progress | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(z_sem, x_T): semantic latent and deterministic DDIM inversion of x in [-1, 1],
        refined by fixed-point iteration as ``inversion_refine`` / ``inversion_tol`` say.

        Runs in eval mode under ``torch.inference_mode`` in chunks of ``batch_size``; results are
        ordinary tensors on x's device.
        """
        zs, xts = [], []
        with self._eval_mode(), torch.inference_mode():
            for chunk in _chunks(x, batch_size):
                chunk = chunk.to(self.device, self._dtype())
                z = self.semantic(chunk)
                zs.append(z)
                xts.append(
                    ddim_encode(
                        self.eps_fn(),
                        chunk,
                        steps,
                        self.schedule,
                        z,
                        progress,
                        refine=self.inversion_refine,
                        tol=self.inversion_tol,
                    )
                )
        return torch.cat(zs).to(x.device), torch.cat(xts).to(x.device)

    def decode(
        self,
        z: Tensor,
        x_T: Tensor | None = None,
        steps: int = 50,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
        progress: Progress | None = None,
    ) -> Tensor:
        """Deterministic DDIM decoding of (z_sem, x_T) to images in [-1, 1] (clamped at the end).

        ``x_T=None`` draws Gaussian noise (from ``generator``): a semantic-only reconstruction.
        """
        cfg = self.config.unet
        assert isinstance(cfg, UNetConfig)
        out_device = z.device
        if x_T is None:
            shape = (z.shape[0], cfg.in_channels, cfg.image_size, cfg.image_size)
            gen_device = generator.device if generator is not None else self.device
            x_T = torch.randn(shape, generator=generator, device=gen_device)
        outs = []
        with self._eval_mode(), torch.inference_mode():
            for zc, xc in zip(_chunks(z, batch_size), _chunks(x_T, batch_size), strict=True):
                zc = zc.to(self.device, torch.float32)
                xc = xc.to(self.device, self._dtype())
                outs.append(ddim_decode(self.eps_fn(), xc, steps, self.schedule, zc, progress))
        return torch.cat(outs).clamp_(-1, 1).to(out_device)

    def reconstruct(self, x: Tensor, steps: int = 50, batch_size: int | None = None) -> Tensor:
        """decode(encode(x)) with the same step schedule."""
        z, x_T = self.encode(x, steps, batch_size)
        return self.decode(z, x_T, steps, batch_size)

    # ------------------------------------------------------------------ training
    def training_loss(
        self,
        x: Tensor,
        generator: torch.Generator | None = None,
        t_skew: float = 0.0,
        consistency_weight: float = 0.0,
        consistency_tmax: int = 200,
        consistency_fraction: float = 1.0,
    ) -> dict[str, Tensor]:
        """Epsilon-prediction MSE plus an optional classifier-consistency term.

        Consistency: on the first ``consistency_fraction`` of the batch, a second UNet pass at
        t ~ U[0, consistency_tmax) gives the one-step estimate x0_hat (straight-through clamped to
        [-1, 1]); the term is KL(C(x) || C(x0_hat)) on class probabilities and back-propagates
        through the frozen classifier into the UNet, z_proj and encoder. Returns 'loss', 'mse',
        'consistency' (zero when the weight is 0).
        """
        n = x.shape[0]
        T = self.schedule.T
        z = self.semantic(x)
        t = sample_timesteps(n, T, generator, t_skew, device=x.device)
        noise = _randn_like(x, generator)
        x_t = q_sample(self.schedule, x, t, noise)
        out = self.unet(x_t, t, z)
        target = noise if self.config.prediction == "eps" else v_target(self.schedule, x, t, noise)
        mse = F.mse_loss(out.float(), target.float())
        consistency = torch.zeros((), device=x.device)
        if consistency_weight > 0:
            m = max(1, min(n, round(n * consistency_fraction)))
            tmax = max(1, min(int(consistency_tmax), T))
            tc = sample_timesteps(m, tmax, generator, 0.0, device=x.device)
            xc, noise_c = x[:m], _randn_like(x[:m], generator)
            xc_t = q_sample(self.schedule, xc, tc, noise_c)
            x0_hat = predict_x0(self.schedule, xc_t, tc, self.eps(xc_t, tc, z[:m]))
            consistency = classifier_kl(self.classifier, xc, straight_through_clamp(x0_hat.float()))
        loss = mse + consistency_weight * consistency
        return {"loss": loss, "mse": mse, "consistency": consistency}

    def class_axis_penalty(
        self,
        x: Tensor,
        y: Tensor,
        spread: Tensor,
        generator: torch.Generator | None = None,
        gain_channel: int | None = None,
        reach: float = 3.0,
        share: float = 1.0,
        t_range: tuple[float, float] = (0.2, 0.6),
    ) -> Tensor:
        """How much the decoder changes the imaging when z_sem moves past the data along the
        class axis.

        The axis is the batch's own: the mean z_sem of one class (drawn from those present)
        minus that of the others, with no gradient. Each image of the first ``share`` of the
        batch is moved outward, away from the other side (the target class's images along
        +axis, the others along -axis), by s ~ U[``OUTWARD_FROM``, ``reach``) class gaps:
        where the reverse half of an explanation's sweep goes and no training image is. The
        moved and unmoved latents are decoded in one step from the same x_t, t ~ T U[t_range)
        (about where the directions decode their edits). The result is
        :func:`diffex.models.nuisance.invariance_penalty` of the moved decodes against the
        unmoved ones (natural sds ``spread``). Its gradient reaches the UNet only: the encoder
        is not asked to change z_sem. Dropout is off for both decodes. Zero when the batch
        holds one class.
        """
        classes = torch.unique(y)
        if len(classes) < 2:
            return torch.zeros((), device=x.device)
        with torch.no_grad():
            z = self.semantic(x).float()
            pick = torch.randint(len(classes), (1,), generator=generator).item()
            inside = (y == classes[pick]).to(x.device)
            axis = z[inside].mean(0) - z[~inside].mean(0)
        m = max(1, min(len(x), round(len(x) * share)))
        s = outward_steps(inside[:m], reach, generator)
        T = self.schedule.T
        lo, hi = (max(0, min(T - 1, int(f * T))) for f in t_range)
        t = torch.randint(lo, max(lo + 1, hi), (m,), generator=generator).to(x.device)
        xm = x[:m]
        x_t = q_sample(self.schedule, xm, t, _randn_like(xm, generator))
        with self._eval_mode():  # no dropout: the two decodes differ by the move alone
            with torch.no_grad():
                base = self.x0_estimate(x_t, t, z[:m]).clamp(-1, 1)
            moved = self.x0_estimate(x_t, t, z[:m] + s[:, None] * axis[None])
        return invariance_penalty(straight_through_clamp(moved), base, spread, gain_channel)

    def x0_estimate(self, x_t: Tensor, t: Tensor, z: Tensor) -> Tensor:
        """The one-step estimate of x_0 from ``x_t`` at steps t given z_sem, in fp32 and not
        clamped (the UNet runs in whatever autocast is active)."""
        return predict_x0(self.schedule, x_t, t, self.eps(x_t, t, z).float())


#: The smallest outward move of :meth:`DiffusionAutoencoder.class_axis_penalty`, in class gaps.
OUTWARD_FROM = 0.5


def outward_steps(inside: Tensor, reach: float, generator: torch.Generator | None = None) -> Tensor:
    """Signed moves along the class axis, in class gaps, that take each latent away from the
    other side: s ~ U[OUTWARD_FROM, reach), positive where ``inside`` (the axis's own class),
    negative elsewhere."""
    size = torch.rand(len(inside), generator=generator).to(inside.device)
    size = OUTWARD_FROM + (max(reach, OUTWARD_FROM) - OUTWARD_FROM) * size
    return torch.where(inside, size, -size)


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def classifier_kl(classifier: Classifier, x: Tensor, x_hat: Tensor, eps: float = 1e-8) -> Tensor:
    """Mean KL(C(x) || C(x_hat)) over the batch; C(x) is a fixed target, gradients flow to x_hat."""
    with torch.no_grad():
        p = classifier.probs(x).float()
    log_q = classifier.probs(x_hat).float().clamp_min(eps).log()
    return (torch.xlogy(p, p) - p * log_q).sum(dim=1).mean()
