"""The training loop's speed switches: channels_last and gradient accumulation leave the result
unchanged, and a torch.compile that fails on the first step falls back to eager with a warning."""

from __future__ import annotations

import pytest
import torch

from diffex.errors import DiffexError
from diffex.train.loop import EpochSampler, LoopConfig, run_loop


def _train(cfg: LoopConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 8, 8, generator=g)
    y = x.mean(dim=(1, 2, 3))
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(256, 1),
    )
    batches = ((x[i], y[i]) for i in iter(EpochSampler(16, 8, seed=0)))

    def loss_fn(m: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], step: int):
        xb, yb = batch
        return {"loss": ((m(xb).squeeze(1) - yb) ** 2).mean()}

    out = run_loop(net, loss_fn, batches, cfg, torch.device("cpu"), desc="toy")
    return {k: v.clone() for k, v in out.model.state_dict().items()}


def test_channels_last_and_accumulation_change_nothing_but_speed() -> None:
    plain = _train(LoopConfig(steps=5, lr=0.05, channels_last=False))
    nhwc = _train(LoopConfig(steps=5, lr=0.05, channels_last=True))
    micro = _train(LoopConfig(steps=5, lr=0.05, accumulate=4))
    for key in plain:
        assert torch.allclose(plain[key], nhwc[key], atol=1e-5), key
        assert torch.allclose(plain[key], micro[key], atol=1e-5), key


def test_failing_compile_falls_back_to_eager(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(fn, *args, **kwargs):  # what a missing compiler or an unsupported op looks like
        def call(*a, **k):
            raise RuntimeError("inductor: no C++ compiler found")

        return call

    eager = _train(LoopConfig(steps=3, lr=0.05, compile=False))
    monkeypatch.setattr(torch, "compile", broken)
    fallback = _train(LoopConfig(steps=3, lr=0.05, compile=True))
    for key in eager:
        assert torch.equal(eager[key], fallback[key]), key
    assert "torch.compile failed (inductor: no C++ compiler found)" in capsys.readouterr().err


def test_accumulate_must_be_positive() -> None:
    with pytest.raises(DiffexError, match="accumulate"):
        LoopConfig(steps=1, accumulate=0)


def test_speed_switch_defaults_and_overrides() -> None:
    """channels_last is on by default on any device, compile only with CUDA; the global option
    overrides the default and a stage's own setting overrides both."""
    from diffex.runtime import set_speed, speed_on, to_channels_last

    cpu = torch.device("cpu")
    try:
        assert speed_on("channels_last", cpu) and not speed_on("compile", cpu)
        assert speed_on("compile", "cuda")
        assert not speed_on("channels_last", cpu, value=False)
        conv = torch.nn.Conv2d(3, 4, 3)
        to_channels_last(conv, cpu)
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        assert not conv.weight.is_contiguous()
        set_speed(channels_last=False)
        assert not speed_on("channels_last", cpu) and speed_on("channels_last", cpu, value=True)
        plain = torch.nn.Conv2d(3, 4, 3)
        to_channels_last(plain, cpu)
        assert plain.weight.is_contiguous()
    finally:
        set_speed(channels_last=None)


def test_native_bf16_follows_the_hardware_probes() -> None:
    from diffex.runtime import native_bf16

    probes = (torch.cpu._is_avx512_bf16_supported(), torch.cpu._is_amx_tile_supported())
    assert native_bf16("cpu") is any(probes)
    assert native_bf16(torch.device("meta")) is False
    if not torch.cuda.is_available():
        assert native_bf16("cuda") is False
