"""Noise-prediction UNet conditioned on the timestep and the semantic latent z_sem (DiffAE-style).

Every residual block is modulated as
``h = GroupNorm(h); h = h * (1 + t_scale) + t_shift; h = h * (1 + z_scale)`` followed by SiLU,
dropout and a zero-initialised 3x3 conv added to the residual; z_sem enters every residual block
(down path, middle and up path). With ``z_norm`` the UNet first layer-normalises z_sem (no
affine), so the gains follow z's direction, not its length. Self-attention blocks use
``scaled_dot_product_attention``. All residual-branch output layers and the final conv are
zero-initialised, so a fresh UNet predicts exactly zero noise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffex.config import build, check_positive
from diffex.errors import DiffexError
from diffex.runtime import check_gain_margin


# --------------------------------------------------------------------------- config
def validate_levels(image_size: int, channel_mult: tuple[int, ...], what: str) -> None:
    """Raise if the image cannot be halved once per level transition."""
    if not channel_mult:
        raise DiffexError(f"{what} channel_mult must not be empty")
    factor = 2 ** (len(channel_mult) - 1)
    if image_size < factor or image_size % factor:
        raise DiffexError(
            f"{what} image_size {image_size} must be a multiple of {factor} "
            f"for channel_mult {tuple(channel_mult)}"
        )


def validate_network(cfg: Any, what: str) -> None:
    """Sizes and widths >= 1, dropout in [0, 1), an image size the patches tile, and a patched
    size the levels can halve."""
    check_positive(
        cfg,
        "in_channels",
        "image_size",
        "base_channels",
        "channel_mult",
        "head_dim",
        "groups",
        "num_heads",
        "patch_size",
    )
    if cfg.num_res_blocks < 1:
        raise DiffexError(f"num_res_blocks must be >= 1, got {cfg.num_res_blocks}")
    if not 0 <= cfg.dropout < 1:
        raise DiffexError(f"dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.image_size % cfg.patch_size:
        raise DiffexError(
            f"{what} image_size {cfg.image_size} must be a multiple of patch_size {cfg.patch_size}"
        )
    validate_levels(cfg.image_size // cfg.patch_size, cfg.channel_mult, what)


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the noise-prediction UNet.

    ``attn_resolutions`` are feature-map sizes in pixels (e.g. 16 means attention at 16 x 16).
    ``patch_size`` p > 1 folds each p x p block of pixels into channels before the first
    convolution (``pixel_unshuffle``) and unfolds the prediction after the last, so the levels
    run at ``image_size / p``: at 48 px, p = 2 with base 64 and channel_mult (1, 1, 2) has the
    parameters of ``cpu64`` and trains 2 times faster on a CPU (BENCHMARKS: "Patched networks").
    Attention uses ``num_heads`` heads when set, otherwise ``channels // head_dim`` heads.
    ``z_norm`` layer-normalises z_sem before it conditions the blocks: edited latents far
    longer than real ones then do not blow up or collapse the blocks' gains (BENCHMARKS:
    "z_sem layer-normalised").
    """

    in_channels: int = 3
    image_size: int = 64
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    z_dim: int = 512
    emb_dim: int = 512
    num_heads: int | None = None
    head_dim: int = 64
    groups: int = 32
    mid_attention: bool = True
    z_norm: bool = False
    patch_size: int = 1

    def __post_init__(self) -> None:
        validate_network(self, "UNet")
        check_positive(self, "z_dim", "emb_dim")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "unet") -> UNetConfig:
        return build(cls, data, where)


UNET_PRESETS: dict[str, UNetConfig] = {
    # The authors' 128 px model.
    "paper128": UNetConfig(
        image_size=128,
        base_channels=128,
        channel_mult=(1, 1, 2, 3, 4),
        num_res_blocks=2,
        attn_resolutions=(16,),
        dropout=0.1,
        z_dim=512,
        emb_dim=512,
    ),
    # A small 64 px model for demo training on a few CPU cores.
    "cpu64": UNetConfig(
        image_size=64,
        base_channels=32,
        channel_mult=(1, 2, 2, 4),
        num_res_blocks=1,
        attn_resolutions=(16, 8),
        dropout=0.0,
        z_dim=256,
        emb_dim=128,
        head_dim=32,
        groups=8,
    ),
    # For tests.
    "tiny": UNetConfig(
        image_size=16,
        base_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(8,),
        dropout=0.1,
        z_dim=16,
        emb_dim=32,
        head_dim=8,
        groups=4,
    ),
}


# cpu64 with 2 x 2 patches: the same levels below the first and about the same parameters,
# without the full-resolution level that costs half of a CPU step (BENCHMARKS: "Patched
# networks").
UNET_PRESETS["cpu64p"] = replace(
    UNET_PRESETS["cpu64"], base_channels=64, channel_mult=(1, 1, 2), patch_size=2
)


def unet_preset(name: str, **overrides: Any) -> UNetConfig:
    """A preset from :data:`UNET_PRESETS` with some fields replaced."""
    if name not in UNET_PRESETS:
        raise DiffexError(f"unknown UNet preset {name!r}; choose from {', '.join(UNET_PRESETS)}")
    return replace(UNET_PRESETS[name], **overrides)


# --------------------------------------------------------------------------- building blocks
def patches_in(x: Tensor, patch_size: int) -> Tensor:
    """Fold each ``patch_size`` x ``patch_size`` patch of ``x`` into channels (identity at 1)."""
    return F.pixel_unshuffle(x, patch_size) if patch_size > 1 else x


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count dividing ``channels`` that is <= ``groups``."""
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) steps t, shape (N,) -> (N, dim), float32."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """Residual block; conditioned on a time embedding and z_sem when their widths are given.

    Without conditioning (``emb_dim`` and ``z_dim`` None) it is a plain
    norm-SiLU-conv-norm-SiLU-dropout-conv block, as used by the semantic encoder.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        emb_dim: int | None = None,
        z_dim: int | None = None,
        dropout: float = 0.0,
        groups: int = 32,
    ) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.t_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch)) if emb_dim else None
        self.z_proj = nn.Sequential(nn.SiLU(), nn.Linear(z_dim, out_ch)) if z_dim else None
        self.norm2 = group_norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        # Per-channel bounds of the z gain (UNet.limit_z_gains); not saved with the weights.
        self.register_buffer("gain_lo", None, persistent=False)
        self.register_buffer("gain_hi", None, persistent=False)

    def z_gain(self, z: Tensor) -> Tensor:
        """(N, out_ch) gain offset of z_sem, within its bounds when they are set."""
        g = self.z_proj(z)
        if self.gain_lo is not None:
            g = torch.clamp(g, self.gain_lo.to(g.dtype), self.gain_hi.to(g.dtype))
        return g

    def forward(self, x: Tensor, emb: Tensor | None = None, z: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.t_proj is not None:
            t_scale, t_shift = self.t_proj(emb)[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + t_scale) + t_shift
        if self.z_proj is not None:
            h = h * (1 + self.z_gain(z)[:, :, None, None])
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all pixels, with a zero-initialised output projection."""

    def __init__(self, channels: int, num_heads: int, groups: int = 32) -> None:
        super().__init__()
        if channels % num_heads:
            raise DiffexError(f"attention: {channels} channels not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        n, c, hgt, wid = x.shape
        heads = self.num_heads
        qkv = self.qkv(self.norm(x)).reshape(n, 3, heads, c // heads, hgt * wid)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (N, heads, L, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(n, c, hgt, wid)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class CondSequential(nn.ModuleList):
    """Run layers in order, passing (emb, z) to residual blocks only."""

    def forward(self, h: Tensor, emb: Tensor | None = None, z: Tensor | None = None) -> Tensor:
        for layer in self:
            h = layer(h, emb, z) if isinstance(layer, ResBlock) else layer(h)
        return h


def attention_heads(channels: int, num_heads: int | None, head_dim: int) -> int:
    """Head count: ``num_heads`` if given, else channels // head_dim (at least 1)."""
    return num_heads if num_heads else max(1, channels // head_dim)


# --------------------------------------------------------------------------- the UNet
class UNet(nn.Module):
    """eps_theta(x_t, t, z_sem): predicts the noise in ``x_t`` at steps ``t`` given ``z_sem``."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        ch0 = cfg.base_channels * cfg.channel_mult[0]
        self.time_mlp = nn.Sequential(
            nn.Linear(cfg.base_channels, cfg.emb_dim),
            nn.SiLU(),
            nn.Linear(cfg.emb_dim, cfg.emb_dim),
        )
        block = {
            "emb_dim": cfg.emb_dim,
            "z_dim": cfg.z_dim,
            "dropout": cfg.dropout,
            "groups": cfg.groups,
        }

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, attention_heads(ch, cfg.num_heads, cfg.head_dim), cfg.groups)

        pixels = cfg.in_channels * cfg.patch_size**2
        self.conv_in = nn.Conv2d(pixels, ch0, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [ch0]
        ch, res = ch0, cfg.image_size // cfg.patch_size
        for level, mult in enumerate(cfg.channel_mult):
            out = cfg.base_channels * mult
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, out, **block)]
                if res in cfg.attn_resolutions:
                    layers.append(attn(out))
                self.down.append(CondSequential(layers))
                ch = out
                skip_channels.append(ch)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(CondSequential([Downsample(ch)]))
                skip_channels.append(ch)
                res //= 2

        mid: list[nn.Module] = [ResBlock(ch, ch, **block)]
        if cfg.mid_attention:
            mid.append(attn(ch))
        mid.append(ResBlock(ch, ch, **block))
        self.mid = CondSequential(mid)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            out = cfg.base_channels * mult
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), out, **block)]
                ch = out
                if res in cfg.attn_resolutions:
                    layers.append(attn(ch))
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    res *= 2
                self.up.append(CondSequential(layers))

        self.norm_out = group_norm(ch, cfg.groups)
        self.conv_out = zero_module(nn.Conv2d(ch, pixels, 3, padding=1))

    def z_blocks(self) -> list[ResBlock]:
        """The residual blocks that z_sem conditions, in order."""
        return [m for m in self.modules() if isinstance(m, ResBlock) and m.z_proj is not None]

    def _z_in(self, z: Tensor) -> Tensor:
        return F.layer_norm(z, z.shape[-1:]) if self.config.z_norm else z

    @torch.no_grad()
    def limit_z_gains(self, z: Tensor | None, margin: float = 0.0) -> None:
        """Bound every block's z gain, per channel, to the range it takes over latents ``z``
        (N, z_dim; the training images'), widened by ``margin`` times that range on each side;
        ``z`` None removes the bounds. An edited latent far outside the data then conditions
        the blocks as the data's most extreme latents do, instead of extrapolating the gains
        (BENCHMARKS: "Gains bounded to the data")."""
        check_gain_margin(margin)
        for block in self.z_blocks():
            if z is None:
                block.gain_lo = block.gain_hi = None
                continue
            g = block.z_proj(self._z_in(z.to(block.z_proj[1].weight))).float()
            lo, hi = g.amin(dim=0), g.amax(dim=0)
            block.gain_lo, block.gain_hi = lo - margin * (hi - lo), hi + margin * (hi - lo)

    def forward(self, x_t: Tensor, t: Tensor, z: Tensor) -> Tensor:
        """Predicted noise, shape of ``x_t``; ``t``: (N,) steps or a scalar; ``z``: (N, z_dim)."""
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        emb = self.time_mlp(timestep_embedding(t, self.config.base_channels).to(x_t.dtype))
        z = self._z_in(z)
        h = self.conv_in(patches_in(x_t, self.config.patch_size))
        hs = [h]
        for layer in self.down:
            h = layer(h, emb, z)
            hs.append(h)
        h = self.mid(h, emb, z)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], dim=1), emb, z)
        out = self.conv_out(F.silu(self.norm_out(h)))
        p = self.config.patch_size
        return F.pixel_shuffle(out, p) if p > 1 else out


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
