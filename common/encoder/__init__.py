"""Stage 2, the frozen encoder: the binary-latent VAE, its artifact, and the packed codes it yields."""
