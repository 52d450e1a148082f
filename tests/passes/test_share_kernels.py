"""`share_kernels`: k-means over spatial kernels, the kernel-bank codebook, depthwise vs all convs, both
backends computing with the bank."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from netsqueeze.backends.onnx import to_onnx
from netsqueeze.backends.torch import to_torch
from netsqueeze.errors import NetsqueezeError
from netsqueeze.ir.weights import Codebook
from netsqueeze.passes.base import PassContext
from netsqueeze.passes.share_kernels import ShareKernels
from tests.passes.graphs import cnn, input_batches


def test_depthwise_kernels_become_a_bank_at_a_kmeans_fixed_point() -> None:
    g = cnn()
    w = g.node("dw").dense("weight").clone()
    conv1 = g.node("conv1").dense("weight").clone()
    res = ShareKernels(k=4).run(g, PassContext())
    g.verify()
    cb = g.node("dw").params["weight"]
    assert isinstance(cb, Codebook)
    assert tuple(cb.centroids.values.shape) == (4, 3, 3) and tuple(cb.indices.shape) == (14, 1)
    assert cb.shape == (14, 1, 3, 3)
    v, bank, a = w.reshape(14, 9).double(), cb.centroids.values.reshape(4, 9).double(), cb.indices.reshape(14)
    for j in range(4):  # each shared kernel is the mean of its kernels, each kernel at its nearest
        assert torch.allclose(bank[j], v[a == j].mean(0), atol=1e-6)
    assert torch.equal(a, torch.cdist(v, bank).argmin(1))
    # 4 kernels of 9 fp32 values + 14 indices of 2 bits
    assert cb.nbytes() == 4 * 9 * 4 + 4
    assert torch.equal(g.node("conv1").params["weight"], conv1)  # regular convs untouched by default
    assert res.metrics["bytes_before"] == 14 * 9 * 4 and res.metrics["bytes_after"] == 148
    assert any(n.startswith("dw (depthwise): 14 kernels -> 4 shared, 504 -> 148 bytes") for n in res.notes)


def test_all_convs_and_what_is_left_alone() -> None:
    g = cnn()
    res = ShareKernels(k=6, convs="all").run(g, PassContext())
    assert isinstance(g.node("conv1").params["weight"], Codebook)  # 24 kernels 3x3
    assert tuple(g.node("conv2").params["weight"].centroids.values.shape) == (6, 3, 3)
    assert isinstance(g.node("conv3").params["weight"], torch.Tensor)  # 1x1
    assert "conv3: left as it is (1x1 kernels)" in res.notes
    g2 = cnn()
    out = ShareKernels(k=14).run(g2, PassContext())
    assert not out.changed and "dw: left as it is (only 14 kernels)" in out.notes


def test_backends_compute_with_the_bank() -> None:
    g = cnn()
    ShareKernels(k=5, convs="all").run(g, PassContext())
    ref = g.copy()
    for n in ref.nodes():
        if "weight" in n.params and isinstance(n.params["weight"], Codebook):
            n.params["weight"] = n.params["weight"].dense()
    x = input_batches(g, n=1)[0][0]
    with torch.no_grad():
        y = to_torch(g)(x)
        assert torch.allclose(y, to_torch(ref)(x), atol=1e-6)
    import onnxruntime as ort

    sess = ort.InferenceSession(to_onnx(g).SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.allclose(got, y.numpy(), atol=1e-5)


def test_same_seed_same_bank_and_errors() -> None:
    def bank(seed: int) -> torch.Tensor:
        g = cnn()
        ShareKernels(k=3, convs="all").run(g, PassContext(seed=seed))
        return g.node("conv2").params["weight"].centroids.values

    assert torch.equal(bank(0), bank(0))
    with pytest.raises(NetsqueezeError, match="option 'convs' of pass 'share_kernels' must be one of 'depthwise', "
                                               "'all', got 'regular'"):
        ShareKernels(convs="regular")  # type: ignore[arg-type]
    g = cnn()
    ShareKernels(k=3).run(g, PassContext())
    with pytest.raises(NetsqueezeError, match="param 'weight' of node 'dw' is stored as codebook k=3"):
        ShareKernels(k=2).run(g, PassContext())


def test_policy_route_on_a_torch_model() -> None:
    import netsqueeze as ns

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 10, 10)
    res = ns.compile(model, "policy p { share_kernels on type(conv) { k = 3 } }", example_inputs=(x,))
    dw = res.graph.node("2").params["weight"]
    assert isinstance(dw, Codebook) and dw.k == 3 and dw.shape == (8, 1, 3, 3)
    assert isinstance(res.graph.node("0").params["weight"], torch.Tensor)  # a regular conv: not by default
    ref = model.eval()
    with torch.no_grad():
        ref[2].weight.copy_(dw.dense())
        assert torch.allclose(res.model(x), ref(x), atol=1e-5)
