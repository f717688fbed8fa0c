"""Bring your own classifier: a TorchScript file or a Python factory, wrapped to DiffEx's protocol.

DiffEx hands every classifier images in [-1, 1] at the run's image size (its own percentile
normalisation of the data). :class:`ExternalClassifier` turns those back into what the user's
network was trained on, as declared in an :class:`ExternalSpec`:

1. pixel scale: ``unit`` maps back to the file's pixel values over their full scale (a 16-bit
   pixel of 65535 is 1.0), undoing DiffEx's normalisation; ``model`` passes [-1, 1] through;
2. resize to the declared input size (bilinear, antialiased when shrinking);
3. one channel repeated when the network wants three (grey images into an RGB network);
4. ``(x - mean) / std`` per channel;
5. logits reordered from the network's declared class order to the run's (sorted) classes.

Features come from a named layer (a forward hook on a submodule, pooled over space when it is a
feature map), from a method of the network (``features`` exported with ``@torch.jit.export``
in TorchScript), or, with none, are the logits.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffex.config import build
from diffex.errors import DiffexError, brief

KINDS = ("torchscript", "entry")
PIXEL_SCALES = ("unit", "model")


@dataclass
class ExternalSpec:
    """What a user's classifier expects, declared once when it is attached to a run."""

    kind: str
    source: str
    input_size: int | None = None
    in_channels: int | None = None
    pixel_scale: str = "unit"
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    features: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DiffexError(
                f"classifier kind must be one of {', '.join(KINDS)}, got {self.kind!r}"
            )
        if self.pixel_scale not in PIXEL_SCALES:
            raise DiffexError(f"--pixel-scale must be unit or model, got {self.pixel_scale!r}")
        for name in ("input_size", "in_channels"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise DiffexError(f"classifier {name} must be >= 1, got {value}")
        self.mean = [float(v) for v in self.mean]
        self.std = [float(v) for v in self.std]
        if bool(self.mean) != bool(self.std):
            raise DiffexError("give both --mean and --std (or neither)")
        if len(self.mean) != len(self.std):
            raise DiffexError(f"--mean has {len(self.mean)} value(s) but --std has {len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise DiffexError(f"--std values must be > 0, got {self.std}")
        if len(set(self.class_names)) != len(self.class_names):
            raise DiffexError(f"class names must be distinct, got {self.class_names}")
        if self.features in ("", "none", "logits"):
            self.features = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> ExternalSpec:
        return build(cls, d, where)


def load_network(spec: ExternalSpec, weights: Path | None = None) -> nn.Module:
    """The user's network on the CPU: ``torch.jit.load`` of ``weights`` (default: the spec's
    file), or the factory's module, with ``weights`` (safetensors) loaded into it when given."""
    if spec.kind == "torchscript":
        path = Path(weights or spec.source)
        if not path.is_file():
            raise DiffexError(f"classifier script not found: {path}")
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated in newer torch, not gone
                warnings.simplefilter("ignore", DeprecationWarning)
                return torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - any loader failure means a bad file
            raise DiffexError(
                f"cannot load TorchScript classifier {path}: {brief(exc)}; save it with "
                "torch.jit.save(torch.jit.script(model) or torch.jit.trace(model, x), path)"
            ) from None
    factory = resolve_entry(spec.source)
    try:
        module = factory()
    except Exception as exc:  # noqa: BLE001 - the user's code failed
        raise DiffexError(f"classifier entry {spec.source} failed: {brief(exc)}") from None
    if not isinstance(module, nn.Module):
        raise DiffexError(
            f"classifier entry {spec.source} returned {type(module).__name__}, "
            "not a torch.nn.Module"
        )
    if weights is not None:
        from diffex.io.checkpoint import load_state

        load_state(module, weights)
    return module.cpu()


def resolve_entry(entry: str) -> Any:
    """The callable named by ``module:factory`` or ``path/to/file.py:factory``."""
    module_name, sep, attr = entry.rpartition(":")
    if not sep or not module_name or not attr:
        raise DiffexError(f"--classifier-entry must look like module:factory, got {entry!r}")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise DiffexError(f"classifier entry file not found: {path}")
        name = f"diffex_user_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise DiffexError(f"cannot import classifier entry file {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - the user's code failed
            raise DiffexError(f"importing {path} failed: {brief(exc)}") from None
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - not importable
            raise DiffexError(f"cannot import module {module_name!r}: {brief(exc)}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise DiffexError(f"{module_name} has no callable {attr!r}")
    return factory


class ExternalClassifier(nn.Module):
    """A user's network seen through DiffEx's :class:`~diffex.models.protocol.Classifier`.

    ``low``/``high`` are the run's per-channel normalisation bounds (pixel scale ``unit``);
    ``per_image`` says the run normalised each image on its own (then [-1, 1] maps to [0, 1]).
    """

    def __init__(
        self,
        net: nn.Module,
        spec: ExternalSpec,
        class_names: list[str],
        image_size: int,
        in_channels: int,
        low: list[float],
        high: list[float],
        per_image: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.spec = spec
        self.class_names = list(class_names)
        self.image_size = int(image_size)
        self.in_channels = int(in_channels)
        self.input_size = int(spec.input_size or image_size)
        self.net_channels = int(spec.in_channels or in_channels)
        if self.net_channels != in_channels and in_channels != 1:
            raise DiffexError(
                f"classifier {spec.source} takes {self.net_channels} channel(s) but the data has "
                f"{in_channels}"
            )
        declared = spec.class_names or list(class_names)
        if sorted(declared) != sorted(class_names):
            raise DiffexError(
                f"classifier {spec.source} declares classes {declared} but the data has "
                f"{list(class_names)}"
            )
        perm = [declared.index(c) for c in class_names]
        self.register_buffer("order", torch.tensor(perm, dtype=torch.long), persistent=False)
        self.per_image = per_image
        self.register_buffer("low", _channel_vector(low or [0.0], in_channels), persistent=False)
        self.register_buffer("high", _channel_vector(high or [1.0], in_channels), persistent=False)
        mean, std = spec.mean or [0.0], spec.std or [1.0]
        for name, values in (("mean", mean), ("std", std)):
            if len(values) not in (1, self.net_channels):
                raise DiffexError(
                    f"--{name} has {len(values)} values but classifier {spec.source} takes "
                    f"{self.net_channels} channel(s)"
                )
            self.register_buffer(
                f"in_{name}", _channel_vector(values, self.net_channels), persistent=False
            )
        self.register_buffer("temperature", torch.ones(()), persistent=False)
        self._captured: torch.Tensor | None = None
        self._feature_fn = self._find_features(spec.features)
        self.feature_dim = 0  # set by :func:`validate_classifier`

    def _find_features(self, name: str | None) -> Any:
        """How to get features: None (logits), a method of the network, or a hooked submodule."""
        if name is None:
            return None
        modules = dict(self.net.named_modules())
        if name in modules and not isinstance(self.net, torch.jit.ScriptModule):
            modules[name].register_forward_hook(self._capture)
            return "hook"
        method = getattr(self.net, name, None)
        if callable(method) and not isinstance(method, nn.Module):
            return method
        if isinstance(self.net, torch.jit.ScriptModule):
            raise DiffexError(
                f"TorchScript classifier {self.spec.source} has no method {name!r}: export one "
                "with @torch.jit.export, or use --features none (the logits)"
            )
        some = ", ".join(n for n in list(modules)[1:6])
        raise DiffexError(
            f"classifier {self.spec.source} has no layer or method {name!r} (layers: {some}, ...)"
        )

    def _capture(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        self._captured = output[0] if isinstance(output, tuple) else output

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """DiffEx's [-1, 1] images -> the network's input."""
        if self.spec.pixel_scale == "unit":
            x = (x + 1.0) / 2.0
            if not self.per_image:
                lo, hi = self.low[None, :, None, None], self.high[None, :, None, None]
                x = lo + x * (hi - lo)
        if self.input_size != x.shape[-1]:
            x = F.interpolate(
                x,
                size=(self.input_size, self.input_size),
                mode="bilinear",
                align_corners=False,
                antialias=self.input_size < x.shape[-1],
            )
        if self.net_channels != x.shape[1]:
            x = x.expand(-1, self.net_channels, -1, -1)
        return (x - self.in_mean[None, :, None, None]) / self.in_std[None, :, None, None]

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(self.prepare(x))
        if isinstance(out, (tuple, list)):
            out = out[0]
        if isinstance(out, dict):
            out = out.get("logits", next(iter(out.values())))
        if not isinstance(out, torch.Tensor):
            raise DiffexError(
                f"classifier {self.spec.source} returned {type(out).__name__}, "
                "not a tensor of logits"
            )
        return out

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores in the run's class order."""
        out = self._run(x)
        if out.ndim != 2:
            raise DiffexError(
                f"classifier {self.spec.source} returned shape {tuple(out.shape)}; expected "
                "(batch, classes) logits"
            )
        return out.float().index_select(1, self.order)

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities: softmax(logits / temperature)."""
        return F.softmax(self.logits(x) / self.temperature, dim=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The declared layer's output (averaged over space when it is a map), or the logits."""
        if self._feature_fn is None:
            return self.logits(x)
        if self._feature_fn == "hook":
            self._captured = None
            self._run(x)
            h = self._captured
            self._captured = None
        else:
            h = self._feature_fn(self.prepare(x))
        if not isinstance(h, torch.Tensor):
            raise DiffexError(
                f"classifier {self.spec.source} features {self.spec.features!r} gave no tensor"
            )
        h = h.float()
        return h.mean(dim=tuple(range(2, h.ndim))) if h.ndim > 2 else h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)


@torch.no_grad()
def validate_classifier(model: ExternalClassifier, x: torch.Tensor) -> None:
    """Run the classifier on a batch of the data: wrong input shape, wrong number of classes,
    NaN outputs or unusable features give one clear line. Sets ``feature_dim``."""
    source = model.spec.source
    shape = tuple(model.prepare(x[:1]).shape[1:])
    try:
        out = model._run(x)
    except DiffexError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's network rejected the input
        raise DiffexError(
            f"classifier {source} failed on a batch of {len(x)} images of shape {shape} "
            f"(declared --input-size {model.input_size}, {model.net_channels} channel(s)): "
            f"{brief(exc)}"
        ) from None
    n = len(model.class_names)
    if out.ndim != 2 or out.shape[0] != len(x):
        raise DiffexError(
            f"classifier {source} returned shape {tuple(out.shape)} for {len(x)} images; "
            f"expected ({len(x)}, {n}) logits"
        )
    if out.shape[1] != n:
        raise DiffexError(
            f"classifier {source} returns {out.shape[1]} class scores but the data has {n} "
            f"classes ({', '.join(model.class_names)})"
        )
    if not torch.isfinite(out).all():
        raise DiffexError(f"classifier {source} returned NaN or infinite logits on the data")
    try:
        feats = model.features(x)
    except DiffexError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's feature method failed
        raise DiffexError(
            f"classifier {source} features {model.spec.features!r} failed: {brief(exc)}"
        ) from None
    if feats.ndim != 2 or feats.shape[0] != len(x) or not torch.isfinite(feats).all():
        raise DiffexError(
            f"classifier {source} features {model.spec.features!r} gave shape "
            f"{tuple(feats.shape)} or non-finite values; expected ({len(x)}, D)"
        )
    model.feature_dim = int(feats.shape[1])


def _channel_vector(values: list[float], n: int) -> torch.Tensor:
    v = torch.tensor([float(x) for x in values], dtype=torch.float32)
    return v.expand(n).clone() if len(v) == 1 else v
