"""DiffEx: explain image classifiers with diffusion autoencoders."""

import os

# OpenMP reads this once, when torch loads it. Several processes on one machine (a multi-process
# launch): idle worker threads sleep at once, so the processes do not steal each other's cores.
# One process keeps OpenMP's default (spin briefly, then sleep): PASSIVE made each training step
# about 1.3 times slower on 2 cores, with the same results (BENCHMARKS: "The readout on 64
# cells, and OpenMP's wait policy").
_local = os.environ.get("LOCAL_WORLD_SIZE", "")
if _local.isdigit() and int(_local) > 1:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
