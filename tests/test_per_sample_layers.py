"""Each per-sample method gives every sample's exact gradient norm and clipped sum, checked against autograd."""

import pytest
import torch
from torch import nn

from dpnas.arch.layers import WSConv2d
from dpnas.dp.per_sample_layers import CONV_METHODS, clipped_sum, layer_norms, unfold

CONVS = {
    "3x3": lambda: nn.Conv2d(5, 7, 3, padding=1, bias=False),
    "3x3 bias stride 2": lambda: nn.Conv2d(5, 7, 3, stride=2, padding=1),
    "1x1": lambda: nn.Conv2d(19, 6, 1, bias=False),
    "dilated rectangular": lambda: nn.Conv2d(4, 3, (3, 2), padding=(2, 1), dilation=(2, 1), bias=False),
    # rows and columns of kernel offsets that fall wholly in the padding, and a stride that skips inputs
    "padding beyond the kernel": lambda: nn.Conv2d(3, 4, 3, padding=(4, 3), bias=False),
    "5x5 stride 3 unpadded": lambda: nn.Conv2d(3, 4, 5, stride=3, bias=False),
    "weight standardised": lambda: WSConv2d(6, 8, 3, padding=1, bias=False),
    "weight standardised, bias, stride 2": lambda: WSConv2d(6, 8, 3, stride=2, padding=1),
    # fewer patch rows (C_in x kh x kw) than filters, as a first conv has: unfold takes the product the other way
    "one input channel, many filters": lambda: nn.Conv2d(1, 16, 3, padding=1, bias=False),
    "weight standardised, one input channel, bias": lambda: WSConv2d(1, 12, 3, padding=1),
}


def brute_force(layer, a, g, k):
    """Each sample's gradient (mean over its k rows), one autograd call per row."""
    grads = []
    for row in range(a.shape[0]):
        layer.zero_grad()
        (layer(a[row : row + 1]) * g[row : row + 1]).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in layer.parameters()]))
    per_row = torch.stack(grads)
    return per_row.view(a.shape[0] // k, k, -1).mean(1)


# None: dpnas's bound on a temporary (8 MiB, more than these layers need); 600 bytes: unfolded one sample at a
# time and squared a few columns at a time, so the blocked paths are checked against autograd too
TEMPORARY_BYTES = [None, 600]


@pytest.mark.parametrize("temporary_bytes", TEMPORARY_BYTES)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("method", CONV_METHODS)
@pytest.mark.parametrize("name", list(CONVS))
def test_conv_norms_and_weighted_sum_are_exact(name, method, k, temporary_bytes, monkeypatch):
    if temporary_bytes:
        monkeypatch.setattr("dpnas.dp.per_sample_layers._TEMPORARY_BYTES", temporary_bytes)
    torch.manual_seed(0)
    layer = CONVS[name]()
    with torch.no_grad():
        layer.weight.mul_(3).add_(0.2)  # non-zero filter means, so standardisation matters
    a = torch.randn(4 * k, layer.in_channels, 9, 10)
    out = layer(a).detach()
    g = torch.randn_like(out)
    expected = brute_force(layer, a, g, k)

    result = layer_norms(layer, method, a, g, k=k, output=out)
    torch.testing.assert_close(result.squared, expected.pow(2).sum(1), rtol=1e-4, atol=1e-5)

    weights = torch.rand(4)
    summed = clipped_sum(layer, result, a, g, weights, k)
    got = torch.cat([summed[p].flatten() for p in layer.parameters()])
    reference = weights @ expected
    assert (got - reference).norm() / reference.norm() < 1e-5


@pytest.mark.parametrize("method", CONV_METHODS)
@pytest.mark.parametrize("name", list(CONVS))
def test_a_channels_last_output_gradient_gives_the_same_norms_and_sum(name, method):
    """Behind the channels-last smoothing pool a conv's output gradient arrives in NHWC layout."""
    torch.manual_seed(0)
    layer = CONVS[name]()
    a = torch.randn(4, layer.in_channels, 9, 10)
    out = layer(a).detach()
    g = torch.randn_like(out)
    g_nhwc = g.contiguous(memory_format=torch.channels_last)
    assert not g_nhwc.is_contiguous()
    expected = brute_force(layer, a, g, 1)
    result = layer_norms(layer, method, a, g_nhwc, k=1, output=out)
    torch.testing.assert_close(result.squared, expected.pow(2).sum(1), rtol=1e-4, atol=1e-5)
    weights = torch.rand(4)
    summed = clipped_sum(layer, result, a, g_nhwc, weights, 1)
    got = torch.cat([summed[p].flatten() for p in layer.parameters()])
    reference = weights @ expected
    assert (got - reference).norm() / reference.norm() < 1e-5


@pytest.mark.parametrize("temporary_bytes", [None, 8])
@pytest.mark.parametrize("k", [1, 2])
def test_linear_and_group_norm_are_exact(k, temporary_bytes, monkeypatch):
    if temporary_bytes:  # GroupNorm's per-sample gradients squared two columns at a time
        monkeypatch.setattr("dpnas.dp.per_sample_layers._TEMPORARY_BYTES", temporary_bytes)
    torch.manual_seed(0)
    for layer, shape in [(nn.Linear(6, 4), (6,)), (nn.GroupNorm(2, 6), (6, 3, 3))]:
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_()
        a = torch.randn(3 * k, *shape)
        g = torch.randn_like(layer(a))
        expected = brute_force(layer, a, g, k)
        method = "ghost" if isinstance(layer, nn.Linear) else "materialise"
        result = layer_norms(layer, method, a, g, k=k)
        torch.testing.assert_close(result.squared, expected.pow(2).sum(1), rtol=1e-4, atol=1e-5)
        weights = torch.rand(3)
        summed = clipped_sum(layer, result, a, g, weights, k)
        got = torch.cat([summed[p].flatten() for p in layer.parameters()])
        torch.testing.assert_close(got, weights @ expected, rtol=1e-4, atol=1e-5)


def test_linear_on_sequences_is_refused():
    layer = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="flat inputs"):
        layer_norms(layer, "ghost", torch.randn(2, 3, 4), torch.randn(2, 3, 2), k=1)


@pytest.mark.parametrize("geometry", [
    dict(kernel_size=3, padding=1), dict(kernel_size=1), dict(kernel_size=1, padding=1), dict(kernel_size=3),
    dict(kernel_size=(3, 5), padding=(1, 2)), dict(kernel_size=3, padding=2, dilation=2),
    dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=1, stride=2),
    dict(kernel_size=(2, 3), stride=(3, 2), padding=(0, 1), dilation=(1, 2)),
])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "a slice of a larger batch", "empty batch"])
def test_unfold_equals_torch_unfold(geometry, layout):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, **geometry)
    a = torch.randn(5, 3, 9, 8)
    if layout == "NHWC":  # what a layer behind a channels-last pool receives
        a = a.contiguous(memory_format=torch.channels_last)
    elif layout == "a slice of a larger batch":  # a view with a storage offset and a padded row stride
        a = torch.randn(7, 3, 11, 10)[2:, :, 1:10, 2:]
    elif layout == "empty batch":  # a Poisson batch may be empty
        a = a[:0]
    expected = torch.nn.functional.unfold(a, conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                                          stride=conv.stride)
    got = unfold(conv, a)
    assert got.shape == expected.shape and torch.equal(got, expected)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_both_orders_of_the_unfold_product_agree_and_the_faster_one_is_remembered(layout, monkeypatch):
    import dpnas.dp.per_sample_layers as layers

    torch.manual_seed(0)
    conv = nn.Conv2d(1, 16, 3, padding=1, bias=False)
    a = torch.randn(6, 1, 8, 8)
    g = torch.randn(6, 16, 8, 8)
    if layout == "NHWC":
        g = g.contiguous(memory_format=torch.channels_last)
    patches, out_grad = unfold(conv, a), g.flatten(2)
    expected = torch.stack([out_grad[i] @ patches[i].T for i in range(6)])
    monkeypatch.setattr(layers, "_PRODUCT_ORDER", {})
    timed = []
    monkeypatch.setattr(layers, "_transposed_is_faster", lambda p, o: timed.append(p.shape) or len(timed) == 1)
    for _ in range(3):  # the first call times the two orders (here: transposed wins), later ones remember it
        torch.testing.assert_close(layers.per_sample_product(patches, out_grad), expected)
    assert timed == [patches.shape] and list(layers._PRODUCT_ORDER.values()) == [True]
    layers._PRODUCT_ORDER[next(iter(layers._PRODUCT_ORDER))] = False  # the other order: the same values
    torch.testing.assert_close(layers.per_sample_product(patches, out_grad), expected)
    # another batch size of the same layer (Poisson sampling) reuses the choice; another layout is timed anew
    layers.per_sample_product(patches[:4], out_grad[:4])
    layers.per_sample_product(patches, out_grad.contiguous() if layout == "NHWC" else
                              g.contiguous(memory_format=torch.channels_last).flatten(2))
    assert len(timed) == 2 and len(layers._PRODUCT_ORDER) == 2



def test_the_bound_on_temporaries_splits_the_work_on_the_cpu_only(monkeypatch):
    """On the CPU the patches are unfolded a few samples at a time under the bound; elsewhere (CUDA's caching
    allocator has no mapped blocks to avoid) in one piece, as smaller pieces would only add kernel launches."""
    import dpnas.dp.per_sample_layers as layers

    monkeypatch.setattr(layers, "_TEMPORARY_BYTES", 4 * 45 * 90 * 2)  # two samples' patches (fp32)
    pieces = []
    real_unfold = layers.unfold
    monkeypatch.setattr(layers, "unfold", lambda conv, a: pieces.append(a.shape[0]) or real_unfold(conv, a))
    conv = nn.Conv2d(5, 7, 3, padding=1, bias=False)
    for device in ("cpu", "meta"):
        pieces.clear()
        a = torch.randn(5, 5, 9, 10, device=device)
        grad = layers._conv_weight_per_sample(conv.to(device), "unfold", a, torch.randn(5, 7, 9, 10, device=device))
        assert grad.shape == (5, 7, 5, 3, 3)
        assert pieces == ([2, 2, 1] if device == "cpu" else [5])
