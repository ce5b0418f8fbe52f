"""The native LoRA deltas (kernels/lora.c, lora_add), every build this CPU runs: each row's own adapter's
B (A x) added to its output row in double precision and rounded once, rows without an adapter untouched, a row's
result the same bit for bit alone or among others on any number of threads, and bad arguments refused."""

from __future__ import annotations

import pytest
import torch

from model_core.native import AIGC_ERR_ARGS, KernelError
from model_core.qmatmul import ACT
from tests.utils import kernels_for, native_isas

ISAS = native_isas()
DTYPES = [torch.float32, torch.bfloat16]
RANKS = (4, 0, 7, 16)  # slot 1 does not target the projection (rank 0)

pytestmark = pytest.mark.skipif(not ISAS, reason="no C compiler: the native kernels cannot build here")


def _case(dtype: torch.dtype, n: int = 11, n_in: int = 96, n_out: int = 70, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(n, n_in, generator=g).to(dtype),
        "out": torch.randn(n, n_out, generator=g).to(dtype),
        "slots": torch.tensor([i % (len(RANKS) + 1) - 1 for i in range(n)], dtype=torch.int32),  # -1, 0, 1, 2, 3, -1..
        **{f"a{s}": torch.randn(r, n_in, generator=g) * 0.3 for s, r in enumerate(RANKS)},
        **{f"bt{s}": torch.randn(r, n_out, generator=g) * 0.3 for s, r in enumerate(RANKS)},
    }


def _lora_add(isa: str, c: dict[str, torch.Tensor], rows: slice, threads: int) -> torch.Tensor:
    x, out, slots = c["x"][rows].contiguous(), c["out"][rows].clone(), c["slots"][rows].contiguous()
    G = len(RANKS)
    a = torch.cat([c[f"a{s}"] for s in range(G)])  # (sum r, n_in): the slots' A stacked
    bt = torch.cat([c[f"bt{s}"] for s in range(G)])  # (sum r, n_out)
    ranks = torch.tensor(RANKS, dtype=torch.int32)
    kernels_for(isa).call(
        "lora_add", x.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], out.shape[1], ACT[x.dtype],
        slots.data_ptr(), G, a.data_ptr(), bt.data_ptr(), ranks.data_ptr(), threads,
    )  # fmt: skip
    return out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_row_gets_its_adapters_delta_in_double_rounded_once(isa: str, dtype: torch.dtype) -> None:
    c = _case(dtype)
    got = _lora_add(isa, c, slice(None), threads=2)
    for i, s in enumerate(c["slots"].tolist()):
        if s < 0 or not RANKS[s]:  # no adapter, or one that does not target this projection: untouched
            assert torch.equal(got[i], c["out"][i]), i
            continue
        delta = (c["x"][i].double() @ c[f"a{s}"].double().T) @ c[f"bt{s}"].double()  # (n_out,)
        want = (c["out"][i].double() + delta).float().to(dtype)
        # the same double sum up to its order: the same rounding but for a last-place tie
        ulp = 2.0**-23 if dtype == torch.float32 else 2.0**-7
        torch.testing.assert_close(got[i].float(), want.float(), rtol=ulp, atol=0.0)
        assert not torch.equal(got[i], c["out"][i])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_rows_result_is_the_same_alone_in_any_batch_and_on_any_threads(isa: str, dtype: torch.dtype) -> None:
    c = _case(dtype, n=13, n_in=200, n_out=150, seed=1)  # outputs past one chunk of 64, inputs not a multiple of 8
    full = _lora_add(isa, c, slice(None), threads=2)
    for threads in (1, 3):
        assert torch.equal(_lora_add(isa, c, slice(None), threads), full), threads
    for i in range(13):
        assert torch.equal(_lora_add(isa, c, slice(i, i + 1), threads=1)[0], full[i]), i
    assert torch.equal(_lora_add(isa, c, slice(3, 9), threads=2), full[3:9])


@pytest.mark.parametrize("isa", ISAS)
def test_bad_arguments_are_refused(isa: str) -> None:
    c = _case(torch.float32)
    c["slots"][2] = len(RANKS)  # no such adapter
    with pytest.raises(KernelError) as e:
        _lora_add(isa, c, slice(None), threads=1)
    assert e.value.code == AIGC_ERR_ARGS
    c = _case(torch.float32)
    ranks = torch.tensor(RANKS, dtype=torch.int32)
    with pytest.raises(KernelError):  # ranks given, matrices missing
        kernels_for(isa).call(
            "lora_add", c["x"].data_ptr(), c["out"].data_ptr(), 11, 96, 70, 0, c["slots"].data_ptr(), len(RANKS),
            None, None, ranks.data_ptr(), 1,
        )  # fmt: skip
