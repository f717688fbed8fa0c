"""Encode once: a run's inverted images are reused across stages, recomputed only when missing,
and thrown away when the autoencoder or the data plan changes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from diffex.data.loading import load_split
from diffex.explain.latents import cache_paths, encode_cached
from diffex.models.autoencoder import INVERSION_REFINE
from diffex.rundir import RunDir
from diffex.train.autoencoder import load_autoencoder


def test_cache_reuses_encodings_and_knows_its_owner(demo_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    shutil.rmtree(run / "cache", ignore_errors=True)
    rd = RunDir(run)
    plan = rd.load_plan()
    data = load_split(plan, "test")
    ae = load_autoencoder(run)
    calls: list[int] = []
    real = ae.encode

    def counting(x: torch.Tensor, *args, **kwargs):
        calls.append(len(x))
        return real(x, *args, **kwargs)

    ae.encode = counting  # type: ignore[method-assign]
    x, keys = data.x[:5], data.paths[:5]
    z1, xt1 = encode_cached(ae, run, x, keys, steps=4)
    assert calls == [5] and cache_paths(rd, 4, "fp32", ae.inversion)[0].is_file()
    z_direct, xt_direct = real(x, steps=4)
    assert torch.allclose(z1, z_direct, atol=1e-5) and torch.allclose(xt1, xt_direct, atol=1e-4)

    z2, xt2 = encode_cached(ae, run, x[[3, 1]], [keys[3], keys[1]], steps=4)
    assert calls == [5]  # nothing encoded again
    assert torch.equal(z2, z1[[3, 1]]) and torch.equal(xt2, xt1[[3, 1]])

    x6, k6 = data.x[:6], data.paths[:6]
    z6, _ = encode_cached(ae, run, x6, k6, steps=4)
    assert calls == [5, 1]  # only the new image
    assert torch.equal(z6[:5], z1)

    encode_cached(ae, run, x, keys, steps=8)  # another step count: its own cache
    assert calls == [5, 1, 5]
    ae.decode_bf16 = True  # another precision: its own cache, the fp32 one kept
    encode_cached(ae, run, x, keys, steps=4)
    assert calls == [5, 1, 5, 5] and cache_paths(rd, 4, "bf16", ae.inversion)[0].is_file()
    ae.decode_bf16 = False
    encode_cached(ae, run, x, keys, steps=4)
    assert calls == [5, 1, 5, 5]
    refined = cache_paths(rd, 4, "fp32", ae.inversion)[0]
    assert ae.inversion != "plain" and refined.is_file()
    ae.inversion_refine = 0  # plain inversion: its own cache, the refined one kept
    z_plain, xt_plain = encode_cached(ae, run, x, keys, steps=4)
    assert calls == [5, 1, 5, 5, 5] and cache_paths(rd, 4)[0].is_file() and refined.is_file()
    assert torch.equal(z_plain, z1) and not torch.allclose(xt_plain, xt1, atol=1e-4)
    ae.inversion_refine = INVERSION_REFINE
    encode_cached(ae, run, x, keys, steps=4)
    assert calls == [5, 1, 5, 5, 5]
    assert refined.name == f"latents_4steps_fp32_{ae.inversion}.safetensors"  # the whole tol
    tol = ae.inversion_tol
    ae.inversion_tol = tol / 3  # another tolerance: its own cache, never the other's x_T
    encode_cached(ae, run, x, keys, steps=4)
    assert calls == [5, 1, 5, 5, 5, 5] and refined.is_file()
    assert cache_paths(rd, 4, "fp32", ae.inversion)[0] != refined
    ae.inversion_tol = tol
    calls.clear()
    calls += [5, 1, 5, 5, 5]

    # another data plan (here: the same plan rewritten) means other images: start again
    plan_text = json.loads(rd.data_plan.read_text())
    rd.data_plan.write_text(json.dumps(plan_text, indent=1))
    encode_cached(ae, run, x, keys, steps=4)
    assert calls == [5, 1, 5, 5, 5, 5]

    # a damaged cache is rebuilt, not fatal
    refined.write_bytes(b"garbage")
    z7, _ = encode_cached(ae, run, x, keys, steps=4)
    assert calls == [5, 1, 5, 5, 5, 5, 5] and torch.allclose(z7, z1, atol=1e-5)
