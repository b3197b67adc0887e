"""1x1 convolutions as products inside dpnas's per-sample backward: the convolution's values and input gradient,
taken only where no weight needs a gradient, and the modules left as they were."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpnas import MODELS, build_model
from dpnas.dp.per_sample import PerSampleClipper
from dpnas.dp.pointwise import is_pointwise, pointwise_as_products


def _graph_nodes(y: torch.Tensor) -> set[str]:
    """The names of the autograd nodes behind `y`."""
    names, stack = set(), [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None:
            names.add(type(node).__name__)
            stack += [next_node for next_node, _ in node.next_functions]
    return names


def _conv(bias: bool = False) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(12, 6, 1, bias=bias)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("channels_last_grad", [False, True])
def test_the_product_gives_the_convolutions_values_and_input_gradient(bias, channels_last_grad):
    conv = _conv(bias)
    conv.requires_grad_(False)
    x = torch.randn(5, 12, 7, 9, requires_grad=True)
    grad = torch.randn(5, 6, 7, 9)
    if channels_last_grad:  # as dpnas's smoothing max pool hands it back
        grad = grad.contiguous(memory_format=torch.channels_last)
    expected = F.conv2d(x, conv.weight, conv.bias)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    with pointwise_as_products([conv]):
        y = conv(x)
    assert "_PointwiseProductBackward" in _graph_nodes(y) and "ConvolutionBackward0" not in _graph_nodes(y)
    (x_grad,) = torch.autograd.grad(y, x, grad)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_grad, expected_grad, rtol=1e-5, atol=1e-5)


def _ran_product(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    with pointwise_as_products([conv]):
        y = conv(x)
    return "_PointwiseProductBackward" in _graph_nodes(y)


def test_the_convolution_stays_wherever_more_than_the_inputs_gradient_is_needed():
    conv = _conv()
    x = torch.randn(3, 12, 4, 4, requires_grad=True)
    assert not _ran_product(conv, x)  # the weight requires a gradient: a non-private step, Opacus's hooks
    conv.requires_grad_(False)
    assert _ran_product(conv, x)
    assert not _ran_product(conv, x.detach())  # nothing needs a gradient: the forward alone
    with torch.no_grad():
        assert not _ran_product(conv, x)
    assert not _ran_product(conv, x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True))
    assert not _ran_product(_conv().double().requires_grad_(False), x.detach().double().requires_grad_(True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _ran_product(conv, x)


def test_only_plain_pointwise_convolutions_qualify():
    assert is_pointwise(nn.Conv2d(4, 2, 1))
    assert is_pointwise(nn.Conv2d(4, 2, 1, bias=True))
    assert not is_pointwise(nn.Conv2d(4, 2, 3, padding=1))
    assert not is_pointwise(nn.Conv2d(4, 2, 1, stride=2))
    assert not is_pointwise(nn.Conv2d(4, 2, 1, padding=1))
    assert not is_pointwise(nn.Conv2d(4, 2, 1, groups=2))
    assert not is_pointwise(nn.Conv2d(4, 2, 1, padding="same"))  # a string padding: left to the convolution
    assert not is_pointwise(nn.Conv2d(4, 2, 1, padding_mode="reflect"))
    from dpnas.arch.layers import WSConv2d
    assert not is_pointwise(WSConv2d(4, 2, 1))  # its forward standardises the weight


def test_the_modules_forward_is_restored_even_when_the_block_fails():
    conv = _conv()
    with pytest.raises(RuntimeError, match="inside"), pointwise_as_products([conv]):
        assert "forward" in vars(conv)
        raise RuntimeError("inside")
    assert "forward" not in vars(conv)
    torch.save(conv, io.BytesIO())  # nothing left behind that pickling would trip on


def test_the_per_sample_backward_runs_the_transition_as_products_and_gets_the_same_clipped_sums():
    torch.manual_seed(0)
    model = build_model(MODELS["tiny"].arch, num_classes=4, in_channels=3)
    (transition,) = [m for m in model.modules() if is_pointwise(m)]
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 4, (6,))
    seen = []
    transition.register_forward_hook(lambda m, i, out: seen.append(type(out.grad_fn).__name__))

    def clipped_sums(products: bool) -> dict:
        clipper = PerSampleClipper(model, method="unfold", pointwise_products=products)
        clipper.backward(model, x, y)
        sums = clipper.clipped_sum(1.0)
        clipper.close()
        return {name: sums[p] for name, p in model.named_parameters()}

    with_products, stock = clipped_sums(True), clipped_sums(False)
    assert seen == ["_PointwiseProductBackward", "ConvolutionBackward0"]
    assert "forward" not in vars(transition)
    for name in stock:
        torch.testing.assert_close(with_products[name], stock[name], rtol=1e-4, atol=1e-6)
