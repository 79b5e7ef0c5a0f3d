import torch

from common.binarize import clip_latent_weights_, sign, sign_ste
from common.bnn.model import BinaryLinear


def test_sign_of_zero_is_plus_one():
    x = torch.tensor([-2.0, -0.0, 0.0, 1e-9, 3.0])
    assert sign(x).tolist() == [-1.0, 1.0, 1.0, 1.0, 1.0]


def test_straight_through_gradient_is_indicator_of_abs_at_most_one():
    x = torch.tensor([-1.5, -1.0, -0.3, 0.0, 0.7, 1.0, 1.01], requires_grad=True)
    sign_ste(x).backward(torch.full_like(x, 2.0))
    assert x.grad.tolist() == [0.0, 2.0, 2.0, 2.0, 2.0, 2.0, 0.0]


def test_latent_weights_are_clipped_after_a_step():
    layer = BinaryLinear(4, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, -3.0, 0.5, -0.5]] * 3))
    clip_latent_weights_(torch.nn.Sequential(layer))
    assert layer.weight.max() == 1.0 and layer.weight.min() == -1.0
    assert layer.weight[0, 2] == 0.5


def test_binary_linear_uses_signs_of_latent_weights():
    layer = BinaryLinear(3, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.2, -0.9, 0.0]]))
    out = layer(torch.tensor([[1.0, 1.0, 1.0]]))
    assert out.item() == 1.0  # +1 - 1 + 1 (sign(0) = +1)
