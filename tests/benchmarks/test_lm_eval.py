"""lm-evaluation-harness, unchanged, against a live server on the default model (slow: about 6 minutes on 2
cores): the local multiple-choice task (loglikelihood: echo + logprobs) and the generation task, with
`tokenizer_backend=remote` (GET /tokenizer_info, /tokenize, /detokenize), give what a direct computation with
the reference model (plain full forwards of the same weights) gives on the same items."""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")


@pytest.mark.slow
def test_lm_eval_matches_the_reference_model() -> None:
    from benchmarks.lm_eval_check import GEN_TASK, MC_TASK, main

    summary = main([])
    served, ref = summary["lm_eval"], summary["reference"]
    assert served[MC_TASK]["acc,none"] == ref[MC_TASK]["acc"]
    assert served[MC_TASK]["acc_norm,none"] == ref[MC_TASK]["acc_norm"]
    assert summary["max_abs_loglikelihood_diff"] < 1e-3
    assert served[MC_TASK]["sample_len"] == 32
    # greedy decoding runs on the quantized decode kernels: allow a generation or two to differ
    assert summary["generations_equal_to_reference"] >= summary["generations"] - 2
    assert abs(served[GEN_TASK]["exact_match,strip"] - ref[GEN_TASK]["exact_match"]) <= 2 / summary["generations"]
