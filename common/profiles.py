"""Experiment profiles: how long each stage trains.

``paper`` follows the paper: VAE about 20 epochs, BNN 100 epochs, baselines 15
epochs, three federated clients. ``quick`` is a first look with short training
(about 5 minutes on 2 cores).
``smoke`` exists for the end-to-end tests: it trains on a few thousand samples for
one or two epochs, so its accuracies mean nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from common.errors import HyBNNError


@dataclass(frozen=True)
class Profile:
    name: str
    vae_epochs: int
    bnn_epochs: int
    baseline_epochs: int
    fed_clients: int
    fed_rounds: int
    fed_local_epochs: int
    vae_images: int | None = None
    """Pretrain the VAE on the first this many training images (None: all 60k)."""
    train_limit: int | None = None
    """Train the baselines on the first this many samples of a task (None: all)."""

    def to_dict(self) -> dict:
        return asdict(self)


PROFILES: dict[str, Profile] = {
    "quick": Profile("quick", vae_epochs=2, bnn_epochs=20, baseline_epochs=1,
                     fed_clients=3, fed_rounds=3, fed_local_epochs=1),
    "paper": Profile("paper", vae_epochs=20, bnn_epochs=100, baseline_epochs=15,
                     fed_clients=3, fed_rounds=20, fed_local_epochs=2),
    "smoke": Profile("smoke", vae_epochs=1, bnn_epochs=2, baseline_epochs=1,
                     fed_clients=2, fed_rounds=1, fed_local_epochs=1,
                     vae_images=1024, train_limit=1024),
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise HyBNNError(f"Unknown profile {name!r}. Valid profiles are: {', '.join(PROFILES)}.") from None
