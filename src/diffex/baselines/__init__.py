"""Baseline explainers run on DiffEx's own autoencoder and classifier."""
