"""The built-in classifier: a small ResNet that owns its input normalisation and temperature."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffex.config import build, check_positive
from diffex.errors import DiffexError

CLASSIFIER_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"widths": (8, 16, 32), "blocks": (1, 1, 1)},
    "small": {"widths": (32, 64, 128, 256), "blocks": (1, 1, 1, 1)},
    "base": {"widths": (64, 128, 256, 512), "blocks": (2, 2, 2, 2)},
}


@dataclass
class ClassifierConfig:
    """Architecture of the built-in ResNet classifier."""

    in_channels: int
    image_size: int
    class_names: list[str]
    widths: tuple[int, ...] = (32, 64, 128, 256)
    blocks: tuple[int, ...] = (1, 1, 1, 1)
    dropout: float = 0.2
    preset: str = "small"
    #: stride of the first convolution; None: 2 from 64 px up, else 1 (the rule before the
    #: option, so configs saved without it load as they trained)
    stem_stride: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.stem_stride is None:
            self.stem_stride = 2 if self.image_size >= 64 else 1
        if self.stem_stride not in (1, 2):
            raise DiffexError(f"classifier stem_stride must be 1 or 2, got {self.stem_stride}")
        self.widths = tuple(int(w) for w in self.widths)
        self.blocks = tuple(int(b) for b in self.blocks)
        if len(self.widths) != len(self.blocks) or not self.widths:
            raise DiffexError("classifier widths and blocks must be non-empty and of equal length")
        if len(self.class_names) < 2:
            raise DiffexError("a classifier needs at least two class names")
        check_positive(self, "in_channels", "image_size", "widths", "blocks")
        if not 0 <= self.dropout < 1:
            raise DiffexError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_preset(
        cls,
        preset: str,
        in_channels: int,
        image_size: int,
        class_names: list[str],
        stem_stride: int | None = None,
    ) -> ClassifierConfig:
        if preset not in CLASSIFIER_PRESETS:
            raise DiffexError(
                f"unknown classifier preset {preset!r}; "
                f"choose one of {', '.join(CLASSIFIER_PRESETS)}"
            )
        return cls(
            in_channels,
            image_size,
            list(class_names),
            preset=preset,
            stem_stride=stem_stride,
            **CLASSIFIER_PRESETS[preset],
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["widths"], d["blocks"] = list(self.widths), list(self.blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "classifier") -> ClassifierConfig:
        return build(cls, d, where)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        nn.init.zeros_(self.bn2.weight)  # each block starts as the identity
        self.short: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.short(x))


class ResNetClassifier(nn.Module):
    """ResNet on images in [-1, 1]; satisfies :class:`diffex.models.protocol.Classifier`.

    Buffers ``in_mean``/``in_std`` hold the input normalisation (fitted on training data) and
    ``temperature`` the calibration temperature used by :meth:`probs`.
    """

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        self.class_names = list(config.class_names)
        self.in_channels = config.in_channels
        self.image_size = config.image_size
        self.feature_dim = config.widths[-1]
        w0 = config.widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(config.in_channels, w0, 3, config.stem_stride, 1, bias=False),
            nn.BatchNorm2d(w0),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        c_in = w0
        for i, (w, n) in enumerate(zip(config.widths, config.blocks, strict=True)):
            for j in range(n):
                layers.append(BasicBlock(c_in, w, 2 if (j == 0 and i > 0) else 1))
                c_in = w
        self.body = nn.Sequential(*layers)
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(self.feature_dim, len(self.class_names))
        self.register_buffer("in_mean", torch.zeros(config.in_channels))
        self.register_buffer("in_std", torch.ones(config.in_channels))
        self.register_buffer("temperature", torch.ones(()))

    def set_input_stats(self, x: torch.Tensor) -> None:
        """Fit the per-channel input normalisation on a batch of [-1, 1] images."""
        self.in_mean.copy_(x.mean(dim=(0, 2, 3)))
        self.in_std.copy_(x.std(dim=(0, 2, 3)).clamp_min(1e-3))

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.in_mean[None, :, None, None]) / self.in_std[None, :, None, None]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (global average pool of the last stage)."""
        h = self.body(self.stem(self._normalise(x)))
        return h.mean(dim=(2, 3))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Raw class scores (before temperature)."""
        return self.head(self.drop(self.features(x)))

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities: softmax(logits / temperature)."""
        return F.softmax(self.logits(x) / self.temperature, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)
