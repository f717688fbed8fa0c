"""What the explanation probes (``sweep_halves.py``, ``partial_inversion.py``) load from a run:
its data plan, ranked directions with the class-mean reference, autoencoder and held-out split,
on the CPU."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffex.data.loading import DataPlan, SplitData, load_split
from diffex.data.measure import spot_noise_floor
from diffex.explain.methods import DirectionSet, load_direction_set
from diffex.explain.rank import heldout_split
from diffex.models.autoencoder import DiffusionAutoencoder
from diffex.rundir import RunDir
from diffex.train.autoencoder import load_autoencoder


@dataclass
class ProbeRun:
    """A run's pieces for a probe; ``target`` is the ranking's target class index."""

    plan: DataPlan
    dset: DirectionSet
    ae: DiffusionAutoencoder
    held: SplitData

    @property
    def target(self) -> int:
        return self.dset.target

    def spot_floor(self) -> float | None:
        """The spot-noise floor that ``diffex explain`` measures generated cells with: that of
        the validation split's real cells."""
        real = self.plan.normalization.to_unit(load_split(self.plan, "val").x)
        return spot_noise_floor(real, self.plan.measure_channels)


def open_run(run: str) -> ProbeRun:
    """Load ``run`` (a folder with rank done) for a probe, decoding as the run's stages do."""
    device = torch.device("cpu")
    plan = RunDir(run).load_plan()
    return ProbeRun(
        plan=plan,
        dset=load_direction_set(run, "diffex", device, reference=True),
        ae=load_autoencoder(run, device, precision="auto"),
        held=load_split(plan, heldout_split(plan)),
    )
