"""Semantic encoder E: the down half of a UNet, global average pool, then a linear to w in R^d."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from diffex.config import build, check_positive
from diffex.errors import DiffexError
from diffex.models.unet import (
    AttentionBlock,
    CondSequential,
    Downsample,
    ResBlock,
    attention_heads,
    group_norm,
    patches_in,
    validate_network,
)


@dataclass(frozen=True)
class EncoderConfig:
    """Architecture of the semantic encoder (``attn_resolutions`` in pixels of the feature
    maps; ``patch_size`` as in :class:`diffex.models.unet.UNetConfig`)."""

    in_channels: int = 3
    image_size: int = 64
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    out_dim: int = 512
    dropout: float = 0.0
    num_heads: int | None = None
    head_dim: int = 64
    groups: int = 32
    patch_size: int = 1

    def __post_init__(self) -> None:
        validate_network(self, "encoder")
        check_positive(self, "out_dim")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "encoder") -> EncoderConfig:
        return build(cls, data, where)


ENCODER_PRESETS: dict[str, EncoderConfig] = {
    "paper128": EncoderConfig(
        image_size=128,
        base_channels=128,
        channel_mult=(1, 1, 2, 3, 4, 4),
        num_res_blocks=2,
        attn_resolutions=(16,),
        out_dim=512,
    ),
    "cpu64": EncoderConfig(
        image_size=64,
        base_channels=32,
        channel_mult=(1, 2, 2, 4, 4),
        num_res_blocks=1,
        attn_resolutions=(),
        out_dim=256,
        head_dim=32,
        groups=8,
    ),
    "tiny": EncoderConfig(
        image_size=16,
        base_channels=8,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(),
        out_dim=16,
        head_dim=8,
        groups=4,
    ),
}
# cpu64's encoder on 2 x 2 patches (the levels of the UNet's cpu64p).
ENCODER_PRESETS["cpu64p"] = replace(
    ENCODER_PRESETS["cpu64"], base_channels=64, channel_mult=(1, 1, 2, 2), patch_size=2
)


def encoder_preset(name: str, **overrides: Any) -> EncoderConfig:
    """A preset from :data:`ENCODER_PRESETS` with some fields replaced."""
    if name not in ENCODER_PRESETS:
        raise DiffexError(
            f"unknown encoder preset {name!r}; choose from {', '.join(ENCODER_PRESETS)}"
        )
    return replace(ENCODER_PRESETS[name], **overrides)


class SemanticEncoder(nn.Module):
    """x in [-1, 1], (N, C, H, W) -> w, (N, out_dim). No time or z conditioning."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = cfg = config
        ch = cfg.base_channels * cfg.channel_mult[0]
        self.conv_in = nn.Conv2d(cfg.in_channels * cfg.patch_size**2, ch, 3, padding=1)
        layers: list[nn.Module] = []
        res = cfg.image_size // cfg.patch_size
        for level, mult in enumerate(cfg.channel_mult):
            out = cfg.base_channels * mult
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(ch, out, dropout=cfg.dropout, groups=cfg.groups))
                ch = out
                if res in cfg.attn_resolutions:
                    heads = attention_heads(ch, cfg.num_heads, cfg.head_dim)
                    layers.append(AttentionBlock(ch, heads, cfg.groups))
            if level < len(cfg.channel_mult) - 1:
                layers.append(Downsample(ch))
                res //= 2
        self.blocks = CondSequential(layers)
        self.norm_out = group_norm(ch, cfg.groups)
        self.fc = nn.Linear(ch, cfg.out_dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(self.conv_in(patches_in(x, self.config.patch_size)))
        h = F.silu(self.norm_out(h)).mean(dim=(2, 3))
        return self.fc(h)
