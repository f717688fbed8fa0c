"""Encode once: (z_sem, x_T) of every image a run has inverted, kept in ``RUN/cache/``.

Ranking, calibration, explanations, the evaluation and the GCD baseline all invert images with
the same autoencoder; the test-split source images they share are inverted once per number of
DDIM steps, decode precision and inversion method. The cache belongs to one autoencoder and one
data plan (their digests are stored beside it) and is rebuilt when either changes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffex.errors import DiffexError
from diffex.io.atomic import read_json, write_json
from diffex.io.checkpoint import load_weights, save_weights
from diffex.models.autoencoder import DiffusionAutoencoder
from diffex.rundir import RunDir
from diffex.train.resume import file_digest, weights_digest


def cache_paths(
    rd: RunDir, steps: int, precision: str = "fp32", inversion: str = "plain"
) -> tuple[Path, Path]:
    """The tensors and the index of the cache for ``steps`` DDIM steps inverted in
    ``precision`` (the autoencoder's ``decode_precision``: a bf16 inversion is not the fp32
    one, and a stage decodes from the x_T of its own precision) by ``inversion`` (the
    autoencoder's ``inversion``: plain or fixed-point refined)."""
    name = f"latents_{steps}steps_{precision}"
    if inversion != "plain":
        name += f"_{inversion}"
    folder = rd.root / "cache"  # not with_suffix: it would cut "fp10-0.01" at its dot
    return folder / f"{name}.safetensors", folder / f"{name}.json"


def _owner(rd: RunDir) -> dict[str, str]:
    return {"autoencoder": weights_digest(rd, "autoencoder"), "data": file_digest(rd.data_plan)}


def encode_cached(
    ae: DiffusionAutoencoder,
    run: str | Path,
    x: torch.Tensor,
    keys: list[str],
    steps: int,
    batch_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_sem, x_T) of images ``x`` named by ``keys`` (their paths in the data plan): from the
    cache where this autoencoder already inverted them, the rest encoded now in one batched call
    and added to the cache."""
    if len(keys) != len(x):
        raise DiffexError(f"encode_cached: {len(keys)} keys for {len(x)} images")
    rd = RunDir(run)
    tensors_path, index_path = cache_paths(rd, steps, ae.decode_precision, ae.inversion)
    owner = _owner(rd)
    known: list[str] = []
    z_all = xt_all = None
    if tensors_path.is_file() and index_path.is_file():
        try:
            index = read_json(index_path)
            if (
                isinstance(index, dict)
                and index.get("owner") == owner
                and index.get("inversion", "plain") == ae.inversion
            ):
                stored = load_weights(tensors_path)
                z_all, xt_all = stored["z"], stored["x_T"]
                known = list(index["keys"])
                if len(known) != len(z_all) or len(known) != len(xt_all):
                    known, z_all, xt_all = [], None, None
        except (DiffexError, KeyError):
            known, z_all, xt_all = [], None, None  # a broken cache is rebuilt, not fatal
    position = {k: i for i, k in enumerate(known)}
    missing = [i for i, k in enumerate(keys) if k not in position]
    if missing:
        z_new, xt_new = ae.encode(x[missing], steps=steps, batch_size=batch_size)
        z_new, xt_new = z_new.float().cpu(), xt_new.float().cpu()
        new_keys = [keys[i] for i in missing]
        z_all = z_new if z_all is None else torch.cat([z_all, z_new])
        xt_all = xt_new if xt_all is None else torch.cat([xt_all, xt_new])
        for j, k in enumerate(new_keys):
            position[k] = len(known) + j
        known += new_keys
        save_weights(tensors_path, {"z": z_all, "x_T": xt_all})
        write_json(
            index_path,
            {"owner": owner, "steps": steps, "inversion": ae.inversion, "keys": known},
        )
    assert z_all is not None and xt_all is not None
    rows = torch.tensor([position[k] for k in keys], dtype=torch.long)
    return z_all[rows].to(x.device), xt_all[rows].to(x.device)
