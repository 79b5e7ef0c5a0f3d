"""HyBNN: a frozen binary-latent VAE encoder feeding a small binary neural network.

This package is the plain-PyTorch library. It never imports Flower; the Flower
apps in ``server/`` and ``client/`` translate Messages to and from it.
"""

__version__ = "0.1.0"
