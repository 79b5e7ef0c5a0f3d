"""Experiment profiles: how long each stage trains.

``paper`` follows the paper (baselines 15 epochs, three federated clients), with the
encoder recipe that gives the best codes measured: 20 VAE epochs on images shifted by up
to 2 pixels (the decoder reconstructs the unshifted image; docs/reproduce.md, "Encoder
levers"), and the BNN for 80 epochs where the paper trains 100 (on these codes 80 gave
the pair tasks the same accuracy), but for at most 600 optimizer steps' worth of epochs: a
pair task takes 6 steps an epoch and trains its 80 epochs; all10, five times the codes,
stops at 20 epochs, as accurate as at 80 over two seeds (docs/reproduce.md, "Training cost"). ``quick`` is a
first look with short training (about 5 minutes on 2 cores).
``smoke`` exists for the end-to-end tests: it trains on a few thousand samples for
one or two epochs, so its accuracies mean nothing.

``transfer`` measures how well one frozen encoder serves another data set: encoders
pretrained on MNIST, on Fashion-MNIST and on their union, each with the paper's BNN
on the six tasks of both data sets (:class:`TransferProfile`, docs/datasets.md).
``transfer-smoke`` is its tiny variant for the end-to-end test.
"""

from __future__ import annotations

import math
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
    vae_input_shift: int = 0
    """``VAETrainConfig.input_shift`` of the encoder's pretraining (``hybnn pretrain --input-shift``)."""
    bnn_steps: int | None = None
    """The BNN trains at most this many optimizer steps' worth of whole epochs (None: always ``bnn_epochs``)."""

    def bnn_epochs_for(self, train_samples: int, batch_size: int) -> int:
        """The BNN's epochs on a task of ``train_samples`` codes: ``bnn_epochs``, or fewer where
        that many would pass ``bnn_steps`` optimizer steps (never fewer than one)."""
        if self.bnn_steps is None:
            return self.bnn_epochs
        steps_per_epoch = max(1, math.ceil(train_samples / batch_size))
        return max(1, min(self.bnn_epochs, math.ceil(self.bnn_steps / steps_per_epoch)))

    def to_dict(self) -> dict:
        return asdict(self)


PROFILES: dict[str, "Profile | TransferProfile"] = {
    "quick": Profile("quick", vae_epochs=2, bnn_epochs=20, baseline_epochs=1,
                     fed_clients=3, fed_rounds=3, fed_local_epochs=1),
    "paper": Profile("paper", vae_epochs=20, bnn_epochs=80, baseline_epochs=15,
                     fed_clients=3, fed_rounds=20, fed_local_epochs=3, vae_input_shift=2, bnn_steps=600),
    "smoke": Profile("smoke", vae_epochs=1, bnn_epochs=2, baseline_epochs=1,
                     fed_clients=2, fed_rounds=1, fed_local_epochs=1,
                     vae_images=1024, train_limit=1024),
}


@dataclass(frozen=True)
class TransferProfile:
    """The transfer experiment: which encoders, which tasks, how long each stage trains.

    Every encoder uses the default :class:`common.encoder.vae.VAEConfig` (for the data's image
    shape) and :class:`common.encoder.vae.VAETrainConfig` with ``vae_epochs`` (``union_vae_epochs``
    for an encoder trained on a union), so a change of the default recipe reaches it.
    """

    name: str
    vae_epochs: int
    union_vae_epochs: int
    bnn_epochs: int
    baseline_epochs: int
    encoders: tuple[str, ...] = ("mnist", "fashion-mnist", "mnist+fashion-mnist")
    """What each encoder is pretrained on (a data set or a union ``A+B``); also its name."""
    datasets: tuple[str, ...] = ("mnist", "fashion-mnist")
    """The data sets whose tasks every encoder is tested on."""
    vae_images: int | None = None
    """Pretrain on the first this many training images of each data set (None: all)."""
    train_limit: int | None = None
    """Train the baselines on the first this many samples of a task (None: all)."""
    vae_input_shift: int = 0
    """``VAETrainConfig.input_shift`` of every encoder's pretraining."""

    def to_dict(self) -> dict:
        return asdict(self)


# Budget: at most 45 minutes on 2 quiet cores. Costs per unit, from docs/encoder.md and
# docs/reproduce.md (2 torch threads) and, in parentheses, measured on the project's
# 2-core machine with 1 torch thread at load average 0.9 to 2.1: a VAE epoch over 60k
# images 19-35 s (49 s); encoding 70k images into codes (5 s); a pair task's BNN, 100
# epochs, 3-4 s (6 s); all10's BNN (512 hidden, 60k codes) 30-60 s (100 s); a CNN
# baseline epoch on a pair task 2-2.7 s (2.9 s), on all10 8-12 s (14 s).
#   encoders:  6 epochs on 60k + 6 on 60k + 6 on the 120k union = 24 x 60k-image epochs,
#              8-14 min (20 min);
#   features:  3 encoders x 140k images, under 1 min;
#   hybnn:     3 encoders x 2 data sets x (5 pairs + all10) = 36 BNNs, 5-8 min (13 min);
#   baselines: 2 models x 2 data sets x 6 tasks x 5 epochs = 24 runs, 7-8.5 min (10 min).
# Total 20-31 min with 2 threads, about 43 min with 1: within 45 either way.
# Six VAE epochs, not the paper's 20 (which would not fit three times): the encoder's
# codes change little past a few epochs (an 8-epoch Fashion-MNIST encoder matched a
# 20-epoch one on every task, docs/datasets.md; a 3-epoch MNIST encoder was within
# half a point on all10, docs/encoder.md). The union gets the same epochs, not the same
# steps: every image is seen as often as by the single data set encoders, so the
# union's in-domain numbers are not lowered by fewer passes over each image. Baselines:
# 5 epochs, not 15, to fit.
PROFILES["transfer"] = TransferProfile("transfer", vae_epochs=6, union_vae_epochs=6, bnn_epochs=100,
                                       baseline_epochs=5)
PROFILES["transfer-smoke"] = TransferProfile("transfer-smoke", vae_epochs=1, union_vae_epochs=1,
                                             bnn_epochs=2, baseline_epochs=1,
                                             vae_images=512, train_limit=512)
"""Tiny, for the end-to-end test: accuracies mean nothing."""


def get_profile(name: str) -> Profile | TransferProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise HyBNNError(f"Unknown profile {name!r}. Valid profiles are: {', '.join(PROFILES)}.") from None
