"""The tiny UNet / encoder and the classifier-aware diffusion autoencoder."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffex.errors import DiffexError
from diffex.models.autoencoder import (
    OUTWARD_FROM,
    AutoencoderConfig,
    DiffusionAutoencoder,
    outward_steps,
)
from diffex.models.encoder import ENCODER_PRESETS, SemanticEncoder
from diffex.models.protocol import Classifier
from diffex.models.unet import UNET_PRESETS, UNet, count_parameters, unet_preset

SIZE = 16


class TinyClassifier(nn.Module):
    """A Protocol-conforming conv net with BatchNorm and dropout, so eval mode matters."""

    def __init__(self) -> None:
        super().__init__()
        self.class_names = ["a", "b"]
        self.in_channels, self.image_size, self.feature_dim = 3, SIZE, 8
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.5),
            nn.Linear(8, 8),
            nn.ReLU(),
        )
        self.head = nn.Linear(8, 2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.logits(x), dim=1)


def _images(n: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, SIZE, SIZE, generator=g) * 2 - 1


def _make(output: str = "probs", seed: int = 0) -> tuple[DiffusionAutoencoder, TinyClassifier]:
    torch.manual_seed(seed)
    clf = TinyClassifier()
    clf.train()  # the autoencoder must switch it to eval
    cfg = AutoencoderConfig.from_preset("tiny", in_channels=3, classifier_output=output, T=100)
    return DiffusionAutoencoder(cfg, clf), clf


def _wake(ae: DiffusionAutoencoder) -> None:
    """Give every zero-initialised parameter small random values (a 'trained' network)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ae.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_preset_sizes():
    assert count_parameters(UNet(UNET_PRESETS["tiny"])) < 200_000
    assert count_parameters(SemanticEncoder(ENCODER_PRESETS["tiny"])) < 200_000
    cfg = AutoencoderConfig(unet="cpu64")
    assert cfg.encoder == ENCODER_PRESETS["cpu64"] and cfg.z_dim == cfg.unet.z_dim


def test_unet_shape_and_zero_init():
    unet = UNet(UNET_PRESETS["tiny"])
    x = torch.randn(3, 3, SIZE, SIZE)
    out = unet(x, torch.tensor([0, 50, 99]), torch.randn(3, unet.config.z_dim))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0
    cl = x.contiguous(memory_format=torch.channels_last)
    out_cl = unet.to(memory_format=torch.channels_last)(cl, torch.tensor(5), torch.zeros(3, 16))
    assert out_cl.shape == x.shape


def test_patched_networks():
    """``patch_size`` 2 folds 2 x 2 pixels into channels: the UNet still predicts noise of the
    image's shape (zero when fresh), each output pixel reads its own position (a woken network
    changes the four pixels of a patch differently), the encoder gives the latent size, the
    ``cpu64p`` presets keep ``cpu64``'s parameter count and latents within 10 %, sizes the
    patches cannot tile fail with one line, and a config saved before the option loads as 1."""
    torch.manual_seed(0)
    unet = UNet(unet_preset("tiny", patch_size=2, dropout=0.0)).eval()
    x, t, z = torch.randn(2, 3, SIZE, SIZE), torch.tensor([10, 80]), torch.randn(2, 16)
    assert unet.conv_in.in_channels == 12 and unet.conv_out.out_channels == 12
    assert torch.count_nonzero(unet(x, t, z)) == 0
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        out = unet(x, t, z)
    assert out.shape == x.shape
    patch = out[:, :, :2, :2].reshape(2, 3, 4)
    assert (patch - patch.mean(dim=2, keepdim=True)).abs().amin() > 0  # not one value per patch
    enc = SemanticEncoder(replace(ENCODER_PRESETS["tiny"], patch_size=2, channel_mult=(1, 2)))
    assert enc(x).shape == (2, ENCODER_PRESETS["tiny"].out_dim)
    plain, patched = AutoencoderConfig(unet="cpu64"), AutoencoderConfig(unet="cpu64p")
    assert patched.unet.patch_size == patched.encoder.patch_size == 2
    assert patched.z_dim == plain.z_dim
    for net, cfg in ((UNet, "unet"), (SemanticEncoder, "encoder")):
        n_plain = count_parameters(net(getattr(plain, cfg)))
        assert abs(count_parameters(net(getattr(patched, cfg))) / n_plain - 1) < 0.1
    AutoencoderConfig.from_preset("cpu64p", in_channels=3, image_size=48)  # 24 px levels
    with pytest.raises(DiffexError, match="multiple of patch_size 2"):
        unet_preset("tiny", image_size=15, patch_size=2)
    with pytest.raises(DiffexError, match="patch_size"):
        unet_preset("tiny", patch_size=0)
    old = AutoencoderConfig.from_preset("tiny", in_channels=3).to_dict()
    del old["unet"]["patch_size"], old["encoder"]["patch_size"]
    again = AutoencoderConfig.from_dict(old)
    assert again.unet.patch_size == again.encoder.patch_size == 1


def test_z_norm_conditions_on_the_direction_of_z_only():
    """With ``z_norm`` the UNet's output is the same for z and 4 z (the gains see z's
    direction); without it, scaling z changes the output. A config saved before the option
    existed loads with it off."""
    torch.manual_seed(0)
    x, t = torch.randn(2, 3, SIZE, SIZE), torch.tensor([10, 80])
    z = torch.randn(2, UNET_PRESETS["tiny"].z_dim)
    outs = {}
    for z_norm in (False, True):
        torch.manual_seed(1)
        unet = UNet(unet_preset("tiny", z_norm=z_norm, dropout=0.0)).eval()
        with torch.no_grad():
            for p in unet.parameters():  # wake the zero-initialised layers
                p.add_(torch.randn_like(p) * 0.05)
            outs[z_norm] = (unet(x, t, z), unet(x, t, 4 * z))
    plain, normed = outs[False], outs[True]
    assert torch.allclose(normed[0], normed[1], atol=1e-5)
    assert (plain[0] - plain[1]).abs().max() > 100 * (normed[0] - normed[1]).abs().max()
    assert (plain[0] - normed[0]).abs().max() > 1e-3  # the option changes the network
    old = AutoencoderConfig.from_preset("tiny", in_channels=3).to_dict()
    del old["unet"]["z_norm"]
    assert AutoencoderConfig.from_dict(old).unet.z_norm is False


def test_config_round_trip_and_errors():
    cfg = AutoencoderConfig.from_preset("tiny", in_channels=3, z_dim=24)
    assert cfg.unet.z_dim == 24
    again = AutoencoderConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict() and again.unet == cfg.unet
    with pytest.raises(DiffexError, match="unknown UNet preset"):
        AutoencoderConfig(unet="huge")
    with pytest.raises(DiffexError, match="classifier_output"):
        AutoencoderConfig(unet="tiny", classifier_output="softmax")
    with pytest.raises(DiffexError, match="channels"):
        DiffusionAutoencoder(AutoencoderConfig.from_preset("tiny", in_channels=1), TinyClassifier())


def test_classifier_frozen_hidden_and_eval():
    ae, clf = _make()
    assert isinstance(clf, Classifier)
    assert not clf.training and not any(m.training for m in clf.modules())
    ae.train()
    assert ae.training and ae.unet.training
    assert not any(m.training for m in clf.modules())
    clf_params = {id(p) for p in clf.parameters()}
    assert not clf_params & {id(p) for p in ae.parameters()}
    assert not any(k.startswith(("classifier", "_classifier")) for k in ae.state_dict())
    assert all(not p.requires_grad for p in clf.parameters())
    assert copy.deepcopy(ae).classifier is clf  # EMA copies share the classifier


@pytest.mark.parametrize("output", ["probs", "logits", "features"])
def test_semantic_latent_shape(output):
    ae, _ = _make(output)
    z = ae.semantic(_images(4))
    assert z.shape == (4, ae.config.z_dim) and z.requires_grad


def test_training_loss_with_consistency_leaves_classifier_alone():
    ae, clf = _make()
    _wake(ae)
    ae.train()
    bn = clf.body[1]
    mean_before = bn.running_mean.clone()
    out = ae.training_loss(_images(), torch.Generator().manual_seed(0), consistency_weight=1.0)
    assert set(out) == {"loss", "mse", "consistency"}
    assert out["consistency"].item() > 0
    out["loss"].backward()
    assert all(p.grad is None for p in clf.parameters())
    assert torch.equal(bn.running_mean, mean_before) and not clf.training


def test_consistency_gradient_reaches_encoder_and_unet():
    ae, _ = _make()
    _wake(ae)
    out = ae.training_loss(
        _images(), torch.Generator().manual_seed(0), consistency_weight=1.0, consistency_tmax=50
    )
    out["consistency"].backward()
    for part in (ae.encoder, ae.z_proj, ae.unet):
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert grads and sum(g.abs().sum().item() for g in grads) > 0
    no_cons = ae.training_loss(_images(), torch.Generator().manual_seed(0))
    assert no_cons["consistency"].item() == 0 and torch.equal(no_cons["loss"], no_cons["mse"])


def test_classifier_logits_with_grad_reaches_input():
    ae, _ = _make()
    x = _images(2).requires_grad_(True)
    ae.classifier_logits_with_grad(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("patch", [1, 2])
def test_a_few_steps_reduce_the_loss(patch):
    ae, _ = _make()
    if patch > 1:  # the same tiny autoencoder with 2 x 2 patches
        torch.manual_seed(0)
        cfg = AutoencoderConfig.from_preset(
            "tiny", in_channels=3, T=100, unet_overrides={"patch_size": patch}
        )
        ae = DiffusionAutoencoder(cfg, TinyClassifier())
    ae.train()
    x = _images(8)
    opt = torch.optim.AdamW(ae.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        out = ae.training_loss(x, torch.Generator().manual_seed(0), t_skew=1.0)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.95 * losses[0] and losses[-1] < min(losses[:5])


def test_bf16_decodes_track_fp32():
    """``decode_bf16`` runs the UNet of DDIM inversion and decoding under bf16 autocast (the
    results differ from fp32's) while z_sem and the DDIM state stay fp32, and the round trips
    stay close to fp32's."""
    ae, _ = _make()
    _wake(ae)
    x = _images(6)
    out = {}
    for bf16 in (False, True):
        ae.decode_bf16 = bf16
        z, x_T = ae.encode(x, steps=8)
        rec = ae.decode(z, x_T, steps=8)
        assert z.dtype == x_T.dtype == rec.dtype == torch.float32
        out[bf16] = (z, x_T, rec)
    (z32, xT32, r32), (z16, xT16, r16) = out[False], out[True]
    assert torch.equal(z32, z16)  # the encoder and the classifier are not autocast
    assert not torch.equal(r32, r16)  # autocast took effect
    assert float((xT16 - xT32).abs().mean()) < 0.01
    assert float((r16 - r32).abs().mean()) < 0.01


def test_encode_decode_shapes_batching_determinism():
    ae, _ = _make()
    _wake(ae)
    ae.train()  # encode / decode must switch to eval themselves (dropout off)
    x = _images(5)
    z, x_T = ae.encode(x, steps=8)
    assert z.shape == (5, ae.config.z_dim) and x_T.shape == x.shape
    assert z.dtype == x_T.dtype == torch.float32 and not z.is_inference()
    assert ae.training and not ae.classifier.training
    z3, x_T3 = ae.encode(x, steps=8, batch_size=3)
    torch.testing.assert_close(z3, z, atol=1e-5, rtol=0)
    torch.testing.assert_close(x_T3, x_T, atol=1e-5, rtol=0)
    rec = ae.decode(z, x_T, steps=8)
    assert rec.shape == x.shape and rec.dtype == torch.float32
    assert rec.min() >= -1 and rec.max() <= 1
    torch.testing.assert_close(ae.decode(z, x_T, steps=8, batch_size=3), rec, atol=1e-5, rtol=0)
    torch.testing.assert_close(ae.reconstruct(x, steps=8), rec, atol=0, rtol=0)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    semantic_only = ae.decode(z, None, steps=4, generator=g1)
    assert torch.equal(semantic_only, ae.decode(z, None, steps=4, generator=g2))


def test_bounded_z_gains_hold_the_data_and_stop_extrapolation():
    """``limit_z_gains`` leaves the output for the latents that set the range unchanged (margin
    0), holds every block's gain for a latent far outside within the bounds (and so changes the
    output there), widens the bounds by the margin, and is undone by ``None``."""
    torch.manual_seed(0)
    unet = UNet(unet_preset("tiny", dropout=0.0)).eval()
    with torch.no_grad():
        for p in unet.parameters():  # wake the zero-initialised layers
            p.add_(torch.randn_like(p) * 0.05)
    x, t = torch.randn(3, 3, SIZE, SIZE), torch.tensor([10, 40, 80])
    data = torch.randn(64, UNET_PRESETS["tiny"].z_dim)
    far = 6 * data[:3]
    with torch.no_grad():
        free = unet(x, t, data[:3]), unet(x, t, far)
        unet.limit_z_gains(data)
        bounded = unet(x, t, data[:3]), unet(x, t, far)
        blocks = unet.z_blocks()
        assert blocks and all(b.gain_lo is not None for b in blocks)
        for b in blocks:
            g = b.z_gain(far)
            assert bool(((g >= b.gain_lo) & (g <= b.gain_hi)).all())
            assert bool((b.z_proj(far) > b.gain_hi).any() | (b.z_proj(far) < b.gain_lo).any())
        width = blocks[0].gain_hi - blocks[0].gain_lo
        unet.limit_z_gains(data, margin=0.5)
        assert torch.allclose(blocks[0].gain_hi - blocks[0].gain_lo, 2 * width)
        unet.limit_z_gains(None)
        again = unet(x, t, far)
    assert torch.allclose(free[0], bounded[0], atol=1e-6)
    assert (free[1] - bounded[1]).abs().max() > 1e-3
    assert torch.equal(again, free[1]) and blocks[0].gain_lo is None
    with pytest.raises(DiffexError, match="margin"):
        unet.limit_z_gains(data, margin=-0.1)


def test_class_axis_penalty_reads_the_decoder_along_the_class_axis():
    """The penalty is positive for a decoder that responds to z_sem, its gradient reaches the
    UNet but not the encoder or z_proj, and it is zero for a batch of one class and for a
    decoder whose z gains ignore z_sem."""
    ae, _ = _make()
    _wake(ae)
    x, y = _images(8), torch.tensor([0, 1] * 4)
    spread = torch.full((3,), 0.01)

    def penalty(labels: torch.Tensor) -> torch.Tensor:
        return ae.class_axis_penalty(x, labels, spread, torch.Generator().manual_seed(0))

    value = penalty(y)
    assert value.item() > 0
    value.backward()
    unet_grads = [p.grad for p in ae.unet.parameters() if p.grad is not None]
    assert unet_grads and sum(g.abs().sum().item() for g in unet_grads) > 0
    assert all(p.grad is None for p in (*ae.encoder.parameters(), *ae.z_proj.parameters()))
    assert penalty(torch.zeros(8, dtype=torch.long)).item() == 0
    with torch.no_grad():
        for block in ae.unet.modules():
            if getattr(block, "z_proj", None) is not None:
                block.z_proj[-1].weight.zero_()
                block.z_proj[-1].bias.zero_()
    assert penalty(y).item() == pytest.approx(0.0, abs=1e-8)


def test_outward_steps_leave_the_data_away_from_the_other_class():
    """The axis's own class moves along +axis, the others along -axis, by OUTWARD_FROM to
    ``reach`` class gaps; seeded."""
    inside = torch.tensor([True, False] * 200)
    steps = outward_steps(inside, 3.0, torch.Generator().manual_seed(0))
    assert (steps[inside] > 0).all() and (steps[~inside] < 0).all()
    size = steps.abs()
    assert size.min() >= OUTWARD_FROM and size.max() < 3.0 and size.max() > 2.5
    again = outward_steps(inside, 3.0, torch.Generator().manual_seed(0))
    assert torch.equal(steps, again)
