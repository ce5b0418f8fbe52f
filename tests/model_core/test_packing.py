"""Pre-packed oneDNN linear layers compute what nn.Linear computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model_core.packing import PackedLinear, pack_linears, packing_available

pytestmark = pytest.mark.skipif(
    not packing_available(torch.bfloat16, torch.device("cpu")), reason="oneDNN weight packing is not available"
)


@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_linear(rows: int, bias: bool) -> None:
    torch.manual_seed(rows)
    lin = nn.Linear(96, 160, bias=bias).to(torch.bfloat16)
    x = torch.randn(2, rows, 96, dtype=torch.bfloat16)
    with torch.inference_mode():
        ref = lin(x).float()
        got = PackedLinear(lin)(x).float()
    assert got.shape == ref.shape
    # bf16 outputs: allow one rounding step of the largest magnitudes
    assert torch.allclose(got, ref, atol=3e-2, rtol=1e-2)


def test_pack_linears_replaces_every_linear_and_keeps_outputs() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Sequential(nn.Linear(64, 16))).to(torch.bfloat16)
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    with torch.inference_mode():
        ref = net(x).float()
        assert pack_linears(net) == 2
        assert not any(isinstance(m, nn.Linear) for m in net.modules())
        assert torch.allclose(net(x).float(), ref, atol=3e-2, rtol=1e-2)
