"""HyBNN: a frozen binary-latent VAE encoder feeding a small binary neural network.

This package is the plain-PyTorch library. Only :mod:`common.federated.wire`, the message
format the Flower apps in ``server/`` and ``client/`` share, imports Flower; the apps
translate Messages to and from the rest of it.
"""

__version__ = "0.1.0"
