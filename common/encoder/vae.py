"""The full-precision VAE with a binary latent (stage 1, representation learning).

Architecture (BinPlay-shaped)::

    encoder: (N,1,28,28) -> conv 1->32 -> conv 32->64 -> conv 64->128 -> FC 2048->200 logits
             each conv: kernel 3, stride 2, pad 1, no bias, BatchNorm, LeakyReLU
             spatial size 28 -> 14 -> 7 -> 4, so the flattened map is 128*4*4 = 2048
    decoder: the mirror image: FC 200->2048 -> deconv 128->64->32 -> deconv 32->1 logits

For images of another shape ``(H, W, C)`` (``VAEConfig.image_shape``, from the data
set), the first conv takes C channels, the last deconv gives C, and the FC layers take
the flattened ``128 x ceil(H/8) x ceil(W/8)`` map; the 200-bit latent stays.

Default variant ``"bernoulli-ste"``: a true binary VAE. Each of the 200 latent units is
Bernoulli with ``p = sigmoid(logit)``; during training a hard 0/1 sample is drawn and
the gradient flows straight through to ``p`` (``b + p - stop_grad(p)``). The KL term is
to the prior Bernoulli(0.5), weighted by ``kl_weight`` (1.0 by default). The decoder sees the sample as +-1.

Variant ``"deterministic-ste"``: no sampling, no KL; the decoder sees ``sign(logit)``
with the straight-through gradient of :func:`common.binarize.sign_ste` applied to
``tanh(logit)``. It is kept as an ablation (an autoencoder, close to BinPlay's code).

Option ``code_rotation="itq"``: after training, the standardised logits are rotated by
iterative quantization, fitted on the training images without labels and folded into
the encoder's FC layer (:mod:`common.encoder.rotation`); the decoder is not changed
(it is not kept).

At inference the code is always deterministic: ``bit = (logit >= 0)``, i.e. ``p >= 0.5``
(``sign(0) = +1``, bit 1 means +1, as in :mod:`common.binarize` and :mod:`common.packing`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from common.binarize import sign_ste
from common.encoder.rotation import ROTATIONS, fit_code_rotation, fold_code_rotation
from common.errors import HyBNNError

VARIANTS = ("bernoulli-ste", "deterministic-ste")
IMAGE_SIZE = 28
MNIST_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 1)


@dataclass(frozen=True)
class VAEConfig:
    """Architecture and loss of the binary-latent VAE; recorded in the encoder manifest."""

    latent_bits: int = 200
    channels: tuple[int, ...] = (32, 64, 128)
    variant: str = "bernoulli-ste"
    kl_weight: float = 1.0
    """Weight of KL(q(b|x) || Bernoulli(0.5)) relative to the summed pixel BCE. Fashion-MNIST
    runs with 0.1 are in docs/datasets.md; the default stays until MNIST is confirmed."""
    leaky_slope: float = 0.2
    image_shape: tuple[int, int, int] = MNIST_SHAPE
    """The input images' (height, width, channels): the first conv takes the channels, the
    FC layer the flattened map of that size. MNIST's 28 x 28 x 1 by default."""
    code_rotation: str = "none"
    """``"itq"``: after training, rotate the standardised logits by ITQ (fitted on the
    training images, no labels) and fold it into the encoder's FC layer
    (:mod:`common.encoder.rotation`); ``"none"``: the code is the sign of the VAE's own logits."""

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise HyBNNError(
                f"Unknown VAE variant {self.variant!r}. Valid variants are: {', '.join(VARIANTS)}."
            )
        if self.latent_bits <= 0 or not self.channels:
            raise HyBNNError("A VAE needs latent_bits > 0 and at least one conv layer.")
        if not (isinstance(self.leaky_slope, (int, float)) and 0 <= self.leaky_slope < 1):
            raise HyBNNError(f"The VAE's leaky_slope is {self.leaky_slope!r}; it must be a number from 0 "
                             "up to (not including) 1.")
        if not (isinstance(self.kl_weight, (int, float)) and 0 <= self.kl_weight < float("inf")):
            raise HyBNNError(f"The VAE's kl_weight is {self.kl_weight!r}; it must be a finite number >= 0.")
        if self.code_rotation not in ROTATIONS:
            raise HyBNNError(f"Unknown code rotation {self.code_rotation!r}. Valid rotations are: "
                             f"{', '.join(ROTATIONS)}.")
        shape = tuple(int(v) for v in self.image_shape)
        object.__setattr__(self, "image_shape", shape)  # a list from JSON compares equal to the tuple
        if len(shape) != 3 or min(shape) < 1 or shape[2] not in (1, 3):
            raise HyBNNError(f"A VAE's image shape is (height, width, 1 or 3 channels); got {shape}.")

    def sizes(self, side: int) -> list[int]:
        """A side's length at the input and after each stride-2 conv (``s`` -> ``ceil(s / 2)``)."""
        out = [side]
        for _ in self.channels:
            out.append((out[-1] + 1) // 2)
        return out

    @property
    def spatial_hw(self) -> tuple[int, int]:
        """Height and width of the last feature map."""
        return self.sizes(self.image_shape[0])[-1], self.sizes(self.image_shape[1])[-1]

    @property
    def spatial(self) -> int:
        """Side of the last feature map of square images (4 for MNIST)."""
        return self.spatial_hw[0]

    @property
    def in_channels(self) -> int:
        return int(self.image_shape[2])

    @property
    def flat_features(self) -> int:
        h, w = self.spatial_hw
        return self.channels[-1] * h * w

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["image_shape"] = list(self.image_shape)
        if self.code_rotation == "none":
            # as before the option existed: earlier encoders keep their feature caches and matches
            del d["code_rotation"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        return cls(
            latent_bits=int(d["latent_bits"]),
            channels=tuple(int(c) for c in d["channels"]),
            variant=str(d["variant"]),
            kl_weight=float(d.get("kl_weight", 1.0)),
            leaky_slope=float(d.get("leaky_slope", 0.2)),
            # manifests written before other data sets existed hold MNIST encoders
            image_shape=tuple(int(v) for v in d.get("image_shape", MNIST_SHAPE)),
            code_rotation=str(d.get("code_rotation", "none")),
        )


@dataclass
class VAETrainConfig:
    """Optimisation of the VAE. Batch size and lr are chosen for 2 CPU cores (docs/encoder.md)."""

    epochs: int = 20
    batch_size: int = 256
    lr: float = 2e-3
    """Adam's initial learning rate; cosine decay to ``lr * final_lr_fraction``."""
    final_lr_fraction: float = 0.05
    seed: int = 0
    input_shift: int = 0
    """Denoising by translation: each training image enters the encoder shifted by a random
    whole number of pixels, up to this many in each direction (zero fill), and the decoder
    reconstructs the unshifted image, so the code learns to ignore small shifts. 0: off."""
    input_rotation: int = 0
    """Denoising by rotation: each training image enters the encoder turned by a random
    angle of up to this many degrees either way (before any shift), and the decoder
    reconstructs the upright image. 0: off."""
    input_mask: float = 0.0
    """Masking noise (a denoising autoencoder's): each pixel of a training image enters the
    encoder zeroed with this probability (after any turn and shift), and the decoder
    reconstructs the whole image. 0: off."""

    def __post_init__(self) -> None:
        from common.bnn.training import check_training_options

        check_training_options(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                               seed=self.seed, final_lr_fraction=self.final_lr_fraction)
        if isinstance(self.input_shift, bool) or not isinstance(self.input_shift, int) \
                or not 0 <= self.input_shift <= 8:
            raise HyBNNError(f"The VAE's input_shift is {self.input_shift!r}; it must be a whole number "
                             "of pixels from 0 to 8.")
        if isinstance(self.input_rotation, bool) or not isinstance(self.input_rotation, int) \
                or not 0 <= self.input_rotation <= 45:
            raise HyBNNError(f"The VAE's input_rotation is {self.input_rotation!r}; it must be a whole "
                             "number of degrees from 0 to 45.")
        if isinstance(self.input_mask, bool) or not isinstance(self.input_mask, (int, float)) \
                or not 0 <= self.input_mask <= 0.9:
            raise HyBNNError(f"The VAE's input_mask is {self.input_mask!r}; it must be a fraction of the "
                             "pixels from 0 to 0.9.")

    def to_dict(self) -> dict:
        d = asdict(self)
        # options that are off are left out, as before they existed, so `reproduce`
        # still reuses earlier encoders
        for option in ("input_shift", "input_rotation", "input_mask"):
            if d[option] == 0:
                del d[option]
        return d


class Encoder(nn.Module):
    """Image ``(N,C,H,W)`` float in [0,1] -> latent logits ``(N, latent_bits)``; MNIST: C=1, H=W=28."""

    def __init__(self, config: VAEConfig = VAEConfig()) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        in_ch = config.in_channels
        for ch in config.channels:
            layers += [
                nn.Conv2d(in_ch, ch, kernel_size=3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(ch),
                nn.LeakyReLU(config.leaky_slope),
            ]
            in_ch = ch
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(config.flat_features, config.latent_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).flatten(1))


class Decoder(nn.Module):
    """Latent ``(N, latent_bits)`` of +-1 -> pixel logits ``(N,C,H,W)``."""

    def __init__(self, config: VAEConfig = VAEConfig()) -> None:
        super().__init__()
        self.config = config
        self.fc = nn.Linear(config.latent_bits, config.flat_features)
        # Sizes on the way up, e.g. 4 -> 7 -> 14 -> 28: output_padding picks the parity.
        heights = list(reversed(config.sizes(config.image_shape[0])))  # [4, 7, 14, 28]
        widths = list(reversed(config.sizes(config.image_shape[1])))
        chans = list(reversed(config.channels))  # [128, 64, 32]
        layers: list[nn.Module] = []
        for i, in_ch in enumerate(chans):
            last = i == len(chans) - 1
            out_ch = config.in_channels if last else chans[i + 1]
            out_pad = (heights[i + 1] - (2 * heights[i] - 1), widths[i + 1] - (2 * widths[i] - 1))
            layers.append(
                nn.ConvTranspose2d(in_ch, out_ch, kernel_size=3, stride=2, padding=1,
                                   output_padding=out_pad, bias=last)
            )
            if not last:
                layers += [nn.BatchNorm2d(out_ch), nn.LeakyReLU(config.leaky_slope)]
        self.deconv = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c, (sh, sw) = self.config.channels[-1], self.config.spatial_hw
        h = F.leaky_relu(self.fc(z), self.config.leaky_slope).view(-1, c, sh, sw)
        return self.deconv(h)


def bernoulli_ste(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Forward: a hard sample ``b ~ Bernoulli(sigmoid(logits))`` in {0,1}.

    Backward: the gradient of ``sigmoid(logits)`` (straight-through on the probability).
    """
    p = torch.sigmoid(logits)
    b = torch.bernoulli(p.detach(), generator=generator)
    return b + p - p.detach()


def kl_to_half(logits: torch.Tensor) -> torch.Tensor:
    """``KL(Bernoulli(sigmoid(l)) || Bernoulli(0.5))`` per sample, summed over bits (nats).

    Written with log-sigmoids so it stays finite for large ``|l|``.
    """
    p = torch.sigmoid(logits)
    log_p = F.logsigmoid(logits)
    log_q = F.logsigmoid(-logits)
    return (p * log_p + (1 - p) * log_q + math.log(2.0)).sum(dim=1)


class BinaryVAE(nn.Module):
    """Encoder + binary latent + decoder. ``forward`` returns ``(pixel_logits, latent_logits)``."""

    def __init__(self, config: VAEConfig = VAEConfig()) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def latent(self, logits: torch.Tensor) -> torch.Tensor:
        """The +-1 latent the decoder sees: a sample in training, ``sign(logits)`` in eval."""
        if not self.training:
            return torch.where(logits >= 0, 1.0, -1.0).to(logits.dtype)
        if self.config.variant == "bernoulli-ste":
            return bernoulli_ste(logits) * 2 - 1
        return sign_ste(torch.tanh(logits))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.encoder(x)
        return self.decoder(self.latent(logits)), logits

    def loss(self, x: torch.Tensor, target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"loss", "recon", "kl"}``, each a per-sample mean; recon is the summed pixel BCE
        of the reconstruction of ``x`` against ``target`` (``x`` itself by default)."""
        pixel_logits, logits = self(x)
        target = x if target is None else target
        recon = F.binary_cross_entropy_with_logits(pixel_logits, target, reduction="sum") / len(x)
        if self.config.variant == "bernoulli-ste":
            kl = kl_to_half(logits).mean()
        else:
            kl = torch.zeros((), dtype=x.dtype)
        return {"loss": recon + self.config.kl_weight * kl, "recon": recon, "kl": kl}


def images_to_tensor(images_uint8: np.ndarray, shape: tuple[int, int, int] = MNIST_SHAPE) -> torch.Tensor:
    """uint8 ``(N,H,W)`` or ``(N,H,W,C)`` -> float32 ``(N,C,H,W)`` in [0,1] (the encoder's input).

    ``shape`` is the ``(H, W, C)`` the caller expects (MNIST's by default); other images
    are refused, never resized.
    """
    images = np.asarray(images_uint8)
    h, w, c = (int(v) for v in shape)
    want = (h, w) if c == 1 else (h, w, c)
    got = images.shape[1:]
    if images.ndim == 4 and c == 1 and images.shape[3] == 1:
        got = images.shape[1:3]
        images = images[..., 0]
    if images.dtype != np.uint8 or got != want:
        raise HyBNNError(
            f"Expected uint8 images of shape (N, {', '.join(map(str, want))}), got "
            f"{images.dtype} {images.shape}."
        )
    from common.resources import check_fits_in_memory

    # a uint8 copy, its channel-first copy and the float32 result (4 bytes a pixel)
    check_fits_in_memory(images.size * 6, f"{len(images)} images of {h}x{w}x{c} as the encoder's float input",
                         "Use a smaller --image-size or fewer images.")
    # np.array copies, so a read-only (memory-mapped) input never aliases a torch tensor.
    t = torch.from_numpy(np.array(images, dtype=np.uint8))
    t = t.unsqueeze(1) if c == 1 else t.permute(0, 3, 1, 2).contiguous()
    return t.float().div_(255.0)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image of ``x`` ``(N,C,H,W)`` moved by its own random whole-pixel offset in
    ``[-max_shift, max_shift]`` along each axis; pixels moved in are 0."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]


def random_rotation(x: torch.Tensor, max_degrees: int, generator: torch.Generator) -> torch.Tensor:
    """Each image of ``x`` ``(N,C,H,W)`` turned about its centre by its own random angle in
    ``[-max_degrees, max_degrees]`` (bilinear; pixels turned in are 0)."""
    if max_degrees == 0:
        return x
    n, _, h, w = x.shape
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(max_degrees)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # affine_grid works in [-1, 1] coordinates; the aspect terms keep non-square images undistorted
    theta = torch.stack([torch.stack([cos, -sin * h / w, torch.zeros(n)], 1),
                         torch.stack([sin * w / h, cos, torch.zeros(n)], 1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_mask(x: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """``x`` with each pixel (each channel apart) zeroed with ``probability``."""
    if probability == 0:
        return x
    return x * (torch.rand(x.shape, generator=generator) >= probability)


def train_vae(
    images_uint8: np.ndarray,
    config: VAEConfig = VAEConfig(),
    train_config: VAETrainConfig = VAETrainConfig(),
    progress: bool = True,
) -> tuple[BinaryVAE, list[dict]]:
    """Train a :class:`BinaryVAE` on ``images_uint8`` (unlabelled); return it in eval mode.

    The history holds one ``{"epoch", "loss", "recon", "kl", "seconds"}`` per epoch
    (means over the epoch's samples). Seeds torch, so a run is reproducible on one machine.
    """
    if len(images_uint8) < 2:
        raise HyBNNError(f"The VAE needs at least 2 training images (batch norm); got {len(images_uint8)}.")
    torch.manual_seed(train_config.seed)
    generator = torch.Generator().manual_seed(train_config.seed)
    x = images_to_tensor(images_uint8, config.image_shape)
    model = BinaryVAE(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=train_config.lr)
    steps_per_epoch = max(1, -(-len(x) // train_config.batch_size))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer,
        T_max=max(1, train_config.epochs * steps_per_epoch),
        eta_min=train_config.lr * train_config.final_lr_fraction,
    )
    history: list[dict] = []
    model.train()
    bar = tqdm(range(train_config.epochs), desc="vae", disable=not progress, unit="epoch")
    for epoch in bar:
        start = time.perf_counter()
        order = torch.randperm(len(x), generator=generator)
        sums = {"loss": 0.0, "recon": 0.0, "kl": 0.0}
        seen = 0
        for begin in range(0, len(x), train_config.batch_size):
            idx = order[begin : begin + train_config.batch_size]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            batch = x[idx]
            seen_by_encoder = random_shift(random_rotation(batch, train_config.input_rotation, generator),
                                           train_config.input_shift, generator)
            seen_by_encoder = random_mask(seen_by_encoder, train_config.input_mask, generator)
            parts = model.loss(seen_by_encoder, batch)
            optimizer.zero_grad(set_to_none=True)
            parts["loss"].backward()
            optimizer.step()
            scheduler.step()
            for key in sums:
                sums[key] += parts[key].item() * len(idx)
            seen += len(idx)
        stats = {"epoch": epoch + 1, **{k: v / max(1, seen) for k, v in sums.items()},
                 "seconds": time.perf_counter() - start}
        history.append(stats)
        bar.set_postfix(loss=f"{stats['loss']:.1f}", recon=f"{stats['recon']:.1f}",
                        kl=f"{stats['kl']:.1f}", s=f"{stats['seconds']:.0f}")
    model.eval()
    if config.code_rotation == "itq":
        with torch.inference_mode():
            logits = torch.cat([model.encoder(x[i : i + 2048]) for i in range(0, len(x), 2048)])
        matrix, mean = fit_code_rotation(logits, seed=train_config.seed)
        fold_code_rotation(model.encoder.fc, matrix, mean)
    return model, history
