"""Our encoder/decoder layers and stacks equal torch.nn's given the same weights; FFN and norms."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model_core.norms import RMSNorm, make_norm
from model_core.transformer import (
    Decoder,
    DecoderLayer,
    Encoder,
    EncoderLayer,
    FeedForward,
    merge_masks,
)
from tests.model_core.utils import load_from_torch, pads, torch_causal

TOL = 1e-5
D, NH, FF = 32, 4, 64


pytestmark = pytest.mark.usefixtures("one_thread")

LAYER_CASES = [
    (False, "relu", True),
    (True, "relu", True),
    (False, "gelu", True),
    (True, "gelu", False),
]


# References run with autograd on (parameters require grad), which keeps torch on its plain path
# rather than the inference fast path (nested tensors zero the padded outputs there).


@pytest.mark.parametrize("norm_first,activation,bias", LAYER_CASES)
def test_encoder_layer_matches_torch(norm_first: bool, activation: str, bias: bool) -> None:
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(
        D,
        NH,
        FF,
        dropout=0.1,
        activation=activation,
        batch_first=True,
        norm_first=norm_first,
        bias=bias,
        layer_norm_eps=1e-6,
    ).eval()
    ours = EncoderLayer(
        D, NH, FF, dropout=0.1, activation=activation, norm_first=norm_first, eps=1e-6, bias=bias
    ).eval()
    load_from_torch(ours, ref)
    x = torch.randn(3, 7, D)
    pad = pads([7, 4, 2], 7)
    torch.testing.assert_close(ours(x, src_key_padding_mask=pad), ref(x, src_key_padding_mask=pad), atol=TOL, rtol=0)
    torch.testing.assert_close(ours(x), ref(x), atol=TOL, rtol=0)
    additive = torch.randn(7, 7)  # a float src_mask means the same in both conventions
    torch.testing.assert_close(
        ours(x, src_key_padding_mask=pad, attn_mask=additive),
        ref(x, src_mask=additive, src_key_padding_mask=pad.float() * -1e30),
        atol=TOL,
        rtol=0,
    )


@pytest.mark.parametrize("norm_first,activation,bias", LAYER_CASES)
def test_decoder_layer_matches_torch(norm_first: bool, activation: str, bias: bool) -> None:
    torch.manual_seed(1)
    ref = nn.TransformerDecoderLayer(
        D, NH, FF, dropout=0.1, activation=activation, batch_first=True, norm_first=norm_first, bias=bias
    ).eval()
    ours = DecoderLayer(D, NH, FF, dropout=0.1, activation=activation, norm_first=norm_first, bias=bias).eval()
    load_from_torch(ours, ref)
    T, S = 6, 8
    x, memory = torch.randn(3, T, D), torch.randn(3, S, D)
    tgt_pad, mem_pad = pads([6, 3, 5], T), pads([8, 8, 2], S)
    expected = ref(
        x,
        memory,
        tgt_mask=torch_causal(T),
        tgt_is_causal=True,
        tgt_key_padding_mask=tgt_pad,
        memory_key_padding_mask=mem_pad,
    )
    got = ours(x, memory, tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=mem_pad, causal=True)
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
    # an explicit mask instead of the causal flag (ours: True = attend)
    got = ours(
        x,
        memory,
        tgt_key_padding_mask=tgt_pad,
        memory_key_padding_mask=mem_pad,
        causal=False,
        self_attn_mask=~torch_causal(T),
    )
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
    # no causal mask at all is a different function
    noncausal = ours(x, memory, causal=False)
    torch.testing.assert_close(noncausal, ref(x, memory), atol=TOL, rtol=0)
    assert (noncausal - ours(x, memory)).abs().max() > 1e-3


@pytest.mark.parametrize("norm_first", [False, True])
def test_stacks_match_torch(norm_first: bool) -> None:
    torch.manual_seed(2)
    n_enc, n_dec = 3, 2
    enc_layer = nn.TransformerEncoderLayer(
        D, NH, FF, dropout=0.0, activation="gelu", batch_first=True, norm_first=norm_first
    )
    dec_layer = nn.TransformerDecoderLayer(
        D, NH, FF, dropout=0.0, activation="gelu", batch_first=True, norm_first=norm_first
    )
    ref_enc = nn.TransformerEncoder(enc_layer, n_enc, norm=nn.LayerNorm(D), enable_nested_tensor=False).eval()
    ref_dec = nn.TransformerDecoder(dec_layer, n_dec, norm=nn.LayerNorm(D)).eval()
    for p in list(ref_enc.parameters()) + list(ref_dec.parameters()):  # layers are deep copies: differ them
        nn.init.normal_(p, std=0.3)
    enc = Encoder(D, NH, FF, activation="gelu", norm_first=norm_first, n_layers=n_enc, final_norm=True).eval()
    dec = Decoder(D, NH, FF, activation="gelu", norm_first=norm_first, n_layers=n_dec, final_norm=True).eval()
    load_from_torch(enc, ref_enc)
    load_from_torch(dec, ref_dec)
    src, tgt = torch.randn(2, 9, D), torch.randn(2, 5, D)
    src_pad, tgt_pad = pads([9, 6], 9), pads([4, 5], 5)
    ref_memory = ref_enc(src, src_key_padding_mask=src_pad)
    memory = enc(src, src_key_padding_mask=src_pad)
    torch.testing.assert_close(memory, ref_memory, atol=TOL, rtol=0)
    expected = ref_dec(
        tgt,
        ref_memory,
        tgt_mask=torch_causal(5),
        tgt_is_causal=True,
        tgt_key_padding_mask=tgt_pad,
        memory_key_padding_mask=src_pad,
    )
    got = dec(tgt, memory, tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=src_pad)
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


def test_stack_without_final_norm() -> None:
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(D, NH, FF, dropout=0.0, batch_first=True, norm_first=True)
    ref = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    ours = Encoder(D, NH, FF, norm_first=True, n_layers=2, final_norm=False).eval()
    assert ours.norm is None
    load_from_torch(ours, ref)
    x = torch.randn(2, 4, D)
    torch.testing.assert_close(ours(x), ref(x), atol=TOL, rtol=0)


def test_rmsnorm_layers_run_and_differ_from_layernorm() -> None:
    torch.manual_seed(4)
    ours = EncoderLayer(D, NH, FF, norm="rmsnorm", norm_first=True)
    assert isinstance(ours.norm1, RMSNorm)
    x = torch.randn(2, 3, D)
    ref = EncoderLayer(D, NH, FF, norm_first=True)
    ref.load_state_dict(ours.state_dict(), strict=False)
    assert (ours(x) - ref(x)).abs().max() > 1e-4  # LayerNorm also centres; RMSNorm does not


def test_merge_masks() -> None:
    pad = torch.tensor([[False, False, True]])
    assert merge_masks(None, None) is None
    keep = merge_masks(None, pad)
    assert keep is not None and keep.shape == (1, 1, 1, 3) and keep.tolist() == [[[[True, True, False]]]]
    both = merge_masks(torch.tensor([[True, False, True]]), pad)
    assert both is not None and both.tolist() == [[[[True, False, False]]]]
    additive = merge_masks(torch.tensor([[0.5, -1.0, 2.0]]), pad)
    assert additive is not None and additive.tolist() == [[[[0.5, -1.0, float("-inf")]]]]


def test_feedforward_swiglu_matches_reference() -> None:
    torch.manual_seed(5)
    ff = FeedForward(D, FF, activation="swiglu", bias=False)
    x = torch.randn(2, 3, D)
    w_gate, w_up = ff.w_in.weight[:FF], ff.w_in.weight[FF:]
    expected = (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ ff.w_out.weight.T
    torch.testing.assert_close(ff(x), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu", "geglu"])
def test_feedforward_activations_match_reference(activation: str) -> None:
    torch.manual_seed(6)
    ff = FeedForward(D, FF, activation=activation)
    x = torch.randn(2, 3, D)
    acts: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "relu": F.relu,
        "gelu": F.gelu,
        "silu": F.silu,
        "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    }
    h = x @ ff.w_in.weight.T + ff.w_in.bias
    if activation == "geglu":
        h = F.gelu(h[..., :FF]) * h[..., FF:]
    else:
        h = acts[activation](h)
    torch.testing.assert_close(ff(x), h @ ff.w_out.weight.T + ff.w_out.bias, atol=TOL, rtol=0)
    with pytest.raises(ValueError):
        FeedForward(D, FF, activation="tanh")


def test_rmsnorm_matches_formula_and_torch() -> None:
    torch.manual_seed(7)
    norm = RMSNorm(D, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(D))
    x = torch.randn(4, 5, D) * 3
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected, atol=TOL, rtol=0)
    if hasattr(nn, "RMSNorm"):
        ref = nn.RMSNorm(D, eps=1e-6)
        with torch.no_grad():
            ref.weight.copy_(norm.weight)
        torch.testing.assert_close(norm(x), ref(x), atol=TOL, rtol=0)
    # a bf16 module normalises in fp32 and returns bf16
    y = norm.to(torch.bfloat16)(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, atol=0.1, rtol=0.02)


def test_make_norm() -> None:
    assert isinstance(make_norm("rmsnorm", 8), RMSNorm)
    ln = make_norm("layernorm", 8, eps=1e-3)
    assert isinstance(ln, nn.LayerNorm) and ln.eps == 1e-3
    with pytest.raises(ValueError):
        make_norm("batchnorm", 8)
