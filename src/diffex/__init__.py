"""DiffEx: explain image classifiers with diffusion autoencoders."""

__version__ = "0.1.0"
