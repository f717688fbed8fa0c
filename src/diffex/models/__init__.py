"""Networks: the classifier, the diffusion autoencoder and direction models."""
