"""DiffEx: explain image classifiers with diffusion autoencoders."""

import os

# OpenMP reads this once, when torch loads it: idle worker threads then sleep instead of spinning,
# so two processes (or a process and its data loading) do not steal each other's cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
