"""The baselines HyBNN is compared with: one small CNN shape, three ways.

Each baseline is reported under its own name:

``bcnn-sign``
    A binary CNN whose input is ``sign(x)`` of the raw pixels in [0, 1]. Since
    ``sign(0) = +1`` every pixel becomes +1, so the network sees the same constant
    image whatever the digit and can do no better than predicting one class. This
    is the paper's ~50% baseline.
``bcnn-centered``
    The same binary CNN with the input binarized properly, ``sign(x - 0.5)``.
``fp-cnn``
    The same shape in full precision: real weights, ReLU, real [0, 1] input.

The shape (:class:`CNNConfig`) is a small BinaryNet-style network of LeNet-5's size
(LeNet-5 has 6 and 16 feature maps; this one 12 and 24)::

    input 1x28x28
    conv3x3(1->12, pad 1) -> maxpool 2 -> BN -> act      12x14x14
    conv3x3(12->24, pad 1) -> maxpool 2 -> BN -> act     24x7x7
    linear(1176->128) -> BN -> act
    linear(128->classes) -> BN                           logits

The widths are set by the paper profile's time budget, not by accuracy: the 18
baseline runs (3 models x 6 tasks x 15 epochs, 1.8 million samples per model) must
fit in about 12 minutes on 2 CPU cores. Measured on one core, the binary network
trains about 4,200 samples/s and the float one about 5,000 (16/32 channels: 3,300
and 4,200; 8/16: 7,200 and 9,000). See docs/reproduce.md.

In the binary networks every layer, the first and the last included, has binarized
weights (``sign_ste`` of a latent weight clipped to [-1, 1], as in BinaryNet), and
``act`` is ``sign_ste``: with a binary input the first layer is a pure XNOR-popcount
layer, like every layer of the HyBNN BNN. Pooling comes before batch norm and the
sign, as in BinaryNet: it takes the max over the integer pre-activations, and it
makes batch norm and the sign four times cheaper, which is most of the cost on a CPU. The output batch norm gives the
binary logits a learnable scale, the same as the HyBNN BNN's output layer. In
``fp-cnn`` the weights are real and ``act`` is ReLU. Layers have no bias (batch
norm follows each one).

All three train through :func:`common.bnn.training.fit` with the project's default
:class:`~common.bnn.training.TrainConfig` (Adam at 1e-2 with cosine decay, batch 256);
only the number of epochs differs between them. The HyBNN BNN uses its own measured
recipe (``common.bnn.pipeline.HYBNN_TRAIN_CONFIG``). Nothing here is tuned against HyBNN.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from common.binarize import LatentClipMixin, sign, sign_ste
from common.bnn.model import BinaryLinear
from common.errors import HyBNNError
from common.bnn.training import TrainConfig, evaluate, fit

BASELINES: tuple[str, ...] = ("bcnn-sign", "bcnn-centered", "fp-cnn")
INPUT_MODES: tuple[str, ...] = ("sign", "centered", "real")

#: model name -> (binary weights and activations?, input mode)
_MODEL_SPECS: dict[str, tuple[bool, str]] = {
    "bcnn-sign": (True, "sign"),
    "bcnn-centered": (True, "centered"),
    "fp-cnn": (False, "real"),
}


@dataclass(frozen=True)
class CNNConfig:
    """The one CNN shape shared by the three baselines."""

    channels: tuple[int, int] = (12, 24)
    hidden: int = 128
    num_classes: int = 2
    binary: bool = True
    """Binary weights and sign activations (True) or real weights and ReLU (False)."""
    input_mode: str = "centered"
    """How [0, 1] pixels become the first layer's input: ``sign``, ``centered`` or ``real``."""
    image_shape: tuple[int, int, int] = (28, 28, 1)
    """The input images' (height, width, channels); MNIST's by default."""

    def __post_init__(self) -> None:
        if self.input_mode not in INPUT_MODES:
            raise HyBNNError(
                f"Unknown input mode {self.input_mode!r}; use one of {', '.join(INPUT_MODES)}."
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_shape"] = list(self.image_shape)
        return d


def binarize_input(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Turn images in [0, 1] into the first layer's input.

    ``sign``: ``sign(x)``; every pixel of a [0, 1] image maps to +1 (``sign(0) = +1``),
    so all images become the same constant. ``centered``: ``sign(x - 0.5)``, black -1
    and ink +1. ``real``: ``x`` unchanged. No gradient flows to the input either way.
    """
    if mode == "sign":
        return sign(x)
    if mode == "centered":
        return sign(x - 0.5)
    if mode == "real":
        return x
    raise HyBNNError(f"Unknown input mode {mode!r}; use one of {', '.join(INPUT_MODES)}.")


class BinaryConv2d(LatentClipMixin, nn.Conv2d):
    """A 3x3 convolution without bias whose weights are ``sign(latent weight)``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        nn.init.uniform_(self.weight, -1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, sign_ste(self.weight), None)


def _pool(x: torch.Tensor) -> torch.Tensor:
    """2x2 max pooling, in channels-last layout: PyTorch's CPU max pooling is several
    times faster on NHWC than on NCHW tensors with few channels, and it dominated the
    training time of these small networks."""
    return F.max_pool2d(x.contiguous(memory_format=torch.channels_last), 2)


class BaselineCNN(nn.Module):
    """The baseline CNN (see the module docstring for the shape).

    Input: ``(N, 1, 28, 28)`` float images in [0, 1]; the configured input mode is
    applied inside ``forward``, so every model takes the same tensors.
    Output: ``(N, num_classes)`` logits.
    """

    def __init__(self, config: CNNConfig = CNNConfig()) -> None:
        super().__init__()
        self.config = config
        c1, c2 = config.channels
        h, w, in_ch = config.image_shape
        flat = c2 * (h // 4) * (w // 4)  # two 2x2 max pools (floor)
        if h < 4 or w < 4:
            raise HyBNNError(f"The baseline CNNs need images of at least 4x4 pixels; got {h}x{w}.")
        if config.binary:
            self.conv1: nn.Module = BinaryConv2d(in_ch, c1)
            self.conv2: nn.Module = BinaryConv2d(c1, c2)
            self.fc1: nn.Module = BinaryLinear(flat, config.hidden)
            self.fc2: nn.Module = BinaryLinear(config.hidden, config.num_classes)
            self.act: Callable[[torch.Tensor], torch.Tensor] = sign_ste
        else:
            self.conv1 = nn.Conv2d(in_ch, c1, 3, padding=1, bias=False)
            self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
            self.fc1 = nn.Linear(flat, config.hidden, bias=False)
            self.fc2 = nn.Linear(config.hidden, config.num_classes, bias=False)
            self.act = F.relu
        self.bn1 = nn.BatchNorm2d(c1)
        self.bn2 = nn.BatchNorm2d(c2)
        self.bn3 = nn.BatchNorm1d(config.hidden)
        self.bn_out = nn.BatchNorm1d(config.num_classes)

    def first_layer_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the first convolution sees for images ``x`` in [0, 1]."""
        return binarize_input(x, self.config.input_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first_layer_input(x)
        x = self.act(self.bn1(_pool(self.conv1(x))))
        x = self.act(self.bn2(_pool(self.conv2(x))))
        x = self.act(self.bn3(self.fc1(x.flatten(1))))
        return self.bn_out(self.fc2(x))


def build_baseline(model_name: str, num_classes: int = 2,
                   image_shape: tuple[int, int, int] = (28, 28, 1)) -> BaselineCNN:
    """The untrained network called ``model_name`` (one of :data:`BASELINES`)."""
    try:
        binary, mode = _MODEL_SPECS[model_name]
    except KeyError:
        raise HyBNNError(
            f"Unknown baseline {model_name!r}. Valid baselines are: {', '.join(BASELINES)}."
        ) from None
    return BaselineCNN(CNNConfig(num_classes=num_classes, binary=binary, input_mode=mode,
                                 image_shape=tuple(image_shape)))


def images_to_inputs(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W)`` or ``(N, H, W, C)`` -> float32 ``(N, C, H, W)`` in [0, 1]."""
    from common.resources import check_fits_in_memory

    # the float32 copy and its channel-first copy
    check_fits_in_memory(images_uint8.size * 8, f"{len(images_uint8)} images as the baseline's float input",
                         "Use a smaller --image-size or fewer images.")
    x = torch.from_numpy(np.array(images_uint8, dtype=np.float32)).div_(255.0)
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()


def task_images(data_root: Path | str, task, split: str, dataset: str = "mnist") -> tuple[torch.Tensor, torch.Tensor]:
    """The task's ``(images (N,C,H,W) in [0,1], labels)`` from ``dataset``'s ``split``."""
    from common.data.mnist import load_mnist
    from common.data.datasets import get_dataset
    from common.data.tasks import select_task

    data = get_dataset(dataset)
    images, labels = load_mnist(data_root, split) if data.is_mnist else data.load(data_root, split)
    images, labels = select_task(images, labels, task, split=split, dataset=dataset)
    return images_to_inputs(images), torch.from_numpy(labels)


def train_baseline(
    model_name: str,
    task_name: str,
    *,
    epochs: int,
    data_root: Path | str,
    seed: int = 0,
    progress: bool = True,
    train_config: TrainConfig | None = None,
    limit: int | None = None,
    dataset: str = "mnist",
) -> dict:
    """Train baseline ``model_name`` on task ``task_name``; test it on the task's MNIST test images.

    Returns ``{"model", "task", "test_acc", "test_loss", "train_seconds",
    "train_cpu_seconds", "epochs", "history", "config", "train_config", "train_samples",
    "samples_per_second"}``;
    ``history`` holds one ``{"epoch", "loss", "acc"}`` per epoch on the training
    batches. ``limit`` keeps only the first ``limit`` training samples (for tests).

    ``train_config`` defaults to the project's one :class:`~common.bnn.training.TrainConfig`
    (Adam 1e-2, batch 256, cosine decay), the recipe the HyBNN BNN trains with; its
    ``epochs`` and ``seed`` are replaced by the arguments.
    """
    from common.data.datasets import get_dataset
    from common.data.tasks import task_for_dataset

    data = get_dataset(dataset)
    task = task_for_dataset(task_name, data)
    config = replace(train_config or TrainConfig(), epochs=epochs, seed=seed)  # checked before the data load
    torch.manual_seed(seed)
    model = build_baseline(model_name, task.num_classes, data.shape)
    x_train, y_train = task_images(data_root, task, "train", dataset)
    if limit is not None:
        x_train, y_train = x_train[:limit], y_train[:limit]
    x_test, y_test = task_images(data_root, task, "test", dataset)
    result = fit(model, x_train, y_train, config, desc=f"{model_name} {task.name}", progress=progress)
    metrics = evaluate(model, x_test, y_test, batch_size=1024)
    seconds = result.seconds
    return {
        "model": model_name,
        "task": task.name,
        "dataset": data.name,
        "class_names": list(task.class_names),
        "test_acc": metrics["acc"],
        "test_loss": metrics["loss"],
        "train_seconds": seconds,
        "train_cpu_seconds": result.cpu_seconds,
        "epochs": epochs,
        "history": result.history,
        "config": model.config.to_dict(),
        "train_config": config.to_dict(),
        "train_samples": int(len(x_train)),
        "samples_per_second": len(x_train) * epochs / seconds if seconds > 0 else None,
    }
