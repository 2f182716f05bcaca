"""The reference path on CUDA where it differs from the CPU: W8A8 int8 at 1-16 rows (``torch._int_mm``
refuses them there), and an NF4 layer compiled whole with CUDA graphs."""

from __future__ import annotations

import pytest
import torch

from quantdeploy.engine import QuantLinear
from quantdeploy.kernels import reference
from quantdeploy.quant.primitives import quantize_weight
from quantdeploy.quant.spec import QuantSpec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("rows", [1, 2, 7, 16, 17, 33])
def test_w8a8_int8_runs_at_every_row_count_and_matches_the_cpu(rows):
    torch.manual_seed(rows)
    qw = quantize_weight(torch.randn(256, 512), QuantSpec(dtype="int8", group_size=None, activations="int8"))
    x = torch.randn(rows, 512)
    expected = reference.qlinear(x, qw, None)
    on_gpu = type(qw)(qw.spec, qw.shape, {k: v.cuda() for k, v in qw.tensors.items()})
    got = reference.qlinear(x.cuda(), on_gpu, None).cpu()
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_an_nf4_layer_compiles_with_cuda_graphs():
    torch.manual_seed(0)
    qw = quantize_weight(torch.randn(256, 512), QuantSpec(dtype="nf4", group_size=64, double_quant=True))
    layer = QuantLinear.from_quantized(qw, None, torch.bfloat16).cuda()
    layer.prepare()
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        got = compiled(x).clone()
    assert torch.allclose(got.float(), layer(x).float(), rtol=2e-2, atol=2e-2)
