"""model_core.tools.quant_accuracy on tiny llama GGUFs (F16 and Q8_0): its figures are sane, and its CLI prints the
table with one row per file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from model_core.tools.quant_accuracy import TABLE_HEADER, main, measure, table_header, table_row  # noqa: E402
from tests.model_core.tiny_formats import tiny_hf_llama, tiny_vocab, write_gguf  # noqa: E402


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("quant-accuracy")
    hf = tiny_hf_llama(n_kv_heads=2, seed=3, hidden=64, ffn=96)
    vocab = tiny_vocab()
    return {q: write_gguf(hf, d / f"tiny-{q}.gguf", q, vocab=vocab).path for q in ("F16", "Q8_0")}


def test_f16_in_float32_on_torch_is_hf_up_to_summation_order(tiny_files: dict[str, Path]) -> None:
    acc = measure(tiny_files["F16"], kernels="torch", dtype="float32", tokens=64)
    print(table_row(acc))
    assert (acc.file, acc.tensor_types, acc.backend, acc.dtype) == (
        "tiny-F16.gguf",
        "F16 x16, F32 x5",
        "torch",
        "float32",
    )
    assert acc.tokens == 64 and acc.quantized_layers == 0
    assert acc.top1_agree == acc.tokens and acc.top1_fraction == 1.0
    assert acc.max_logit_diff < 1e-3
    assert acc.mean_logprob_diff < 1e-4
    assert 1.0 < acc.ppl_hf and abs(acc.ppl_delta) < 1e-4
    assert acc.hf_bf16_logprob_diff is None and TABLE_HEADER == table_header()


def test_q8_0_with_the_default_backend_is_close_to_hf_fp32(tiny_files: dict[str, Path]) -> None:
    """What the server runs by default (the best native build and its dtype, the Q8_0 weights as stored where a build
    runs): close to HF fp32 on the dequantized weights, not equal (bf16 or int8 activations round)."""
    acc = measure(tiny_files["Q8_0"], kernels="auto", dtype="auto", tokens=64)
    print(table_row(acc))
    assert acc.tensor_types == "Q8_0 x16, F32 x5"
    assert (acc.quantized_layers > 0) == acc.backend.startswith("native-")
    assert acc.top1_fraction >= 0.85
    assert acc.max_logit_diff < 2.0  # the tiny model's logits span about -25..25; measured 0.26-0.42
    assert acc.mean_logprob_diff < 0.15
    assert abs(acc.ppl_delta) < 0.05


def test_cli_prints_the_command_and_a_row_per_file(
    tiny_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog while the cat sleeps in the sun. " * 4)
    out = tmp_path / "acc.json"
    files = [str(tiny_files["F16"]), str(tiny_files["Q8_0"])]
    argv = [*files, "--text-file", str(text), "--tokens", "24", "--kernels", "torch", "--dtype", "float32", "--hf-bf16"]
    results = main([*argv, "--json", str(out)])
    printed = capsys.readouterr().out
    assert "command: python -m model_core.tools.quant_accuracy " + " ".join(argv) in printed
    assert table_header(hf_bf16=True) in printed and TABLE_HEADER not in printed
    rows = [line for line in printed.splitlines() if line.startswith("| tiny-")]
    assert [r.split(" | ")[0] for r in rows] == ["| tiny-F16.gguf", "| tiny-Q8_0.gguf"]
    assert rows == [table_row(r) for r in results]
    assert all(row.count(" | ") == table_header(hf_bf16=True).splitlines()[0].count(" | ") for row in rows)
    assert all(r.tokens == 24 and r.top1_agree == 24 for r in results)  # dense fp32 on both: HF up to sum order
    saved = json.loads(out.read_text())
    assert [s["file"] for s in saved] == ["tiny-F16.gguf", "tiny-Q8_0.gguf"]
    assert saved[0]["top1_fraction"] == 1.0 and "ppl_delta" in saved[0]
    assert all(0 < s["hf_bf16_logprob_diff"] < 0.5 for s in saved)  # bf16 rounding moves the log-probs a little


def test_cli_refuses_fewer_than_two_tokens(tiny_files: dict[str, Path]) -> None:
    with pytest.raises(SystemExit):
        main([str(tiny_files["F16"]), "--tokens", "1"])
