"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against Hugging Face transformers loading
the same file: logits (fp32), greedy generation, chat prompt rendering, and a bf16 sanity check.

Part of the default run (HF's GGUF load takes ~20-30 s on 2 cores); `-s` shows the figures.
"""

from __future__ import annotations

import os

import pytest
import torch

from model_core.backend import select_backend
from model_core.device import select_dtype
from model_core.generate import generate
from model_core.lm import Output
from model_core.qmatmul import QuantLinear
from model_core.sampling import SamplingParams
from model_core.tools.quant_accuracy import decode_logits as _decode_logits
from model_core.weights.loader import LoadedLM, load_lm
from service.config import Settings
from service.main import build_text_model
from tests.service.server_utils import serve_model_in_process
from tests.utils import native_isas

pytestmark = pytest.mark.heavy  # real-model parity (make test-fast skips it)

transformers = pytest.importorskip("transformers")

CHAT = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Name three primary colours and explain why they are called primary."},
]
PROMPTS = {
    "plain": "The capital of France is Paris, and the capital of Germany is",
    "code": 'def fibonacci(n: int) -> int:\n    """Return the n-th Fibonacci number."""\n',
    "chat": None,  # CHAT rendered with the model's template
    "mixed": "Les 3 mousquetaires: Athos, Porthos, Aramis et d'Artagnan. 12345 + 678 = 13023; 東京 😀",
}
GREEDY = ("plain", "code", "chat")
N_NEW = 64


@pytest.fixture(scope="module")
def ours(smol_path: str) -> LoadedLM:
    return load_lm(smol_path, torch.float32)


@pytest.fixture(scope="module")
def hf(smol_path: str):
    d, name = os.path.split(smol_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # run exactly N_NEW tokens, like ignore_eos
    return model


@pytest.fixture(scope="module")
def hf_tok(smol_path: str):
    d, name = os.path.split(smol_path)
    return transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)


@pytest.fixture(scope="module")
def prompt_ids(ours: LoadedLM) -> dict[str, list[int]]:
    tok = ours.tokenizer
    out = {}
    for key, text in PROMPTS.items():
        if text is None:
            out[key] = tok.encode(tok.apply_chat_template(CHAT, add_generation_prompt=True), add_special_tokens=False)
        else:
            out[key] = tok.encode(text)
    return out


@pytest.fixture(scope="module")
def hf_logits(hf, prompt_ids: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        return {k: hf(torch.tensor([ids])).logits[0] for k, ids in prompt_ids.items()}


def test_config_and_tokens_match_hf(ours: LoadedLM, hf, hf_tok, prompt_ids: dict[str, list[int]]) -> None:
    c, h = ours.config, hf.config
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.d_ff, c.vocab_size) == (
        h.num_hidden_layers,
        h.hidden_size,
        h.num_attention_heads,
        h.num_key_value_heads,
        h.intermediate_size,
        h.vocab_size,
    )
    assert c.rope_theta == pytest.approx(h.rope_parameters["rope_theta"]) and c.tie_embeddings
    for key, text in PROMPTS.items():
        if text is not None:
            assert prompt_ids[key] == hf_tok.encode(text), key


def test_chat_prompt_matches_hf(ours: LoadedLM, hf_tok) -> None:
    tok = ours.tokenizer
    for msgs in (
        CHAT,
        CHAT[1:],
        [*CHAT, {"role": "assistant", "content": "Red, yellow, blue."}, {"role": "user", "content": "And for light?"}],
    ):
        for gen_prompt in (True, False):
            ours_text = tok.apply_chat_template(msgs, add_generation_prompt=gen_prompt)
            assert ours_text == hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)
            assert tok.encode(ours_text, add_special_tokens=False) == hf_tok.encode(ours_text, add_special_tokens=False)


def test_fp32_logits_match_hf(
    ours: LoadedLM, prompt_ids: dict[str, list[int]], hf_logits: dict[str, torch.Tensor]
) -> None:
    worst = 0.0
    for key, ids in prompt_ids.items():
        with torch.inference_mode():
            mine = ours.model(torch.tensor([ids]))[0]
        ref = hf_logits[key]
        d = float((mine - ref).abs().max())
        print(
            f"SmolLM2 fp32 logits vs HF [{key}, {len(ids)} tokens]: max abs diff {d:.2e} "
            f"(logit range {float(ref.min()):.1f}..{float(ref.max()):.1f})"
        )
        assert torch.equal(mine.argmax(-1), ref.argmax(-1)), key
        worst = max(worst, d)
    assert worst <= 1e-3


@pytest.fixture(scope="module")
def hf_greedy(hf, prompt_ids: dict[str, list[int]]) -> dict[str, list[int]]:
    """HF's greedy continuations (N_NEW tokens, EOS disabled) of the GREEDY prompts."""
    out = {}
    for key in GREEDY:
        x = torch.tensor([prompt_ids[key]])
        with torch.inference_mode():  # an explicit mask: else HF takes the prompt's <|im_end|> (= pad id 2) for padding
            seq = hf.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=N_NEW, do_sample=False, pad_token_id=2
            )
        out[key] = seq[0, x.shape[1] :].tolist()
    return out


@pytest.mark.parametrize("key", GREEDY)
def test_greedy_generation_matches_hf(
    key: str, ours: LoadedLM, prompt_ids: dict[str, list[int]], hf_greedy: dict[str, list[int]]
) -> None:
    params = SamplingParams(max_tokens=N_NEW, temperature=0.0, ignore_eos=True)
    mine = [s.token_id for s in generate(ours.model, prompt_ids[key], params)]
    theirs = hf_greedy[key]
    first = next((i for i, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b), None)
    print(
        f"SmolLM2 greedy [{key}]: {len(mine)} tokens, first difference at {first}: {ours.tokenizer.decode(mine)[:70]!r}"
    )
    assert len(mine) == len(theirs) == N_NEW
    assert mine == theirs


def test_bf16_logits_close_to_hf_fp32(
    smol_path: str, hf, prompt_ids: dict[str, list[int]], hf_greedy: dict[str, list[int]]
) -> None:
    """Our default bf16 load (as the service runs it) against HF in fp32, on the prompts and the
    greedy continuations (~320 positions)."""
    lm = load_lm(smol_path, torch.bfloat16)
    assert lm.model.embed.weight.dtype == torch.bfloat16
    texts = {key: prompt_ids[key] + hf_greedy.get(key, []) for key in PROMPTS}
    agree = total = 0
    worst = 0.0
    for ids in texts.values():
        x = torch.tensor([ids])
        with torch.inference_mode():
            mine = lm.model(x)[0].float()
            ref = hf(x).logits[0]
        worst = max(worst, float((mine - ref).abs().max()))
        agree += int((mine.argmax(-1) == ref.argmax(-1)).sum())
        total += len(ids)
    print(
        f"SmolLM2 bf16 logits vs HF fp32: max abs diff {worst:.3f}, top-1 agreement {agree}/{total} "
        f"= {agree / total:.1%}"
    )
    assert agree / total >= 0.95


PPL_TEXT = (
    "The water cycle describes how water moves between the land, the oceans and the atmosphere. "
    "Heat from the sun evaporates water from lakes and seas; the vapour rises, cools and condenses "
    "into clouds. When the droplets grow heavy enough they fall as rain or snow, and rivers carry the "
    "water back to the sea. Plants also release water through their leaves, a process called "
    "transpiration. Over thousands of years this cycle has shaped valleys, filled aquifers and "
    "supported every living thing on the planet. Scientists measure it with satellites, rain gauges "
    "and river flow meters, and they use the data to forecast floods and droughts.\n\n"
    "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n"
)


def _target_logprobs(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """log p(token t+1 | tokens 0..t) for each t: (T-1,) float32 of logits (T, V)."""
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    return logp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)


@pytest.fixture(scope="module")
def ppl_ids(ours: LoadedLM) -> list[int]:
    return ours.tokenizer.encode(PPL_TEXT)


@pytest.fixture(scope="module")
def fp32_logprobs(hf, ppl_ids: list[int]) -> torch.Tensor:
    """HF fp32's log-probabilities of PPL_TEXT's tokens: the reference."""
    with torch.inference_mode():
        return _target_logprobs(hf(torch.tensor([ppl_ids])).logits[0], ppl_ids)


@pytest.fixture(scope="module")
def bf16_noise(smol_path: str, ppl_ids: list[int], fp32_logprobs: torch.Tensor) -> float:
    """How far rounding to bfloat16 moves this model's log-probabilities on this CPU: HF transformers run in bf16,
    mean |log p - log p fp32| over PPL_TEXT's tokens. The bounds below are derived from it, not tuned: a path
    rounding its activations to bf16 differs from HF's bf16 run only in summation order, so it lands within 2x;
    one rounding them to int8 per block of 32 (scale max|x| / 127, error at most max|x| / 254 = 2^-7.99 of the
    block's largest value) makes errors of the same order as bf16's 2^-8 relative step; fp32 paths far below."""
    d, name = os.path.split(smol_path)
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        lp16 = _target_logprobs(hf16(torch.tensor([ppl_ids])).logits[0], ppl_ids)
    noise = float((lp16 - fp32_logprobs).abs().mean())
    print(f"HF bf16 vs HF fp32 on {len(ppl_ids)} tokens: mean |d logprob| {noise:.4f}")
    assert 0 < noise < 0.2
    return noise


def _check_logprobs(label: str, logits: torch.Tensor, ids: list[int], ref: torch.Tensor, noise: float) -> None:
    """Log-probabilities within 2x the bf16 rounding noise of HF fp32's; perplexity is then within the same
    factor (|log(ppl / ppl32)| = |mean d logprob| <= mean |d logprob|)."""
    lp = _target_logprobs(logits, ids)
    dev = float((lp - ref).abs().mean())
    ppl, ppl32 = float(torch.exp(-lp.mean())), float(torch.exp(-ref.mean()))
    print(
        f"{label}: mean |d logprob| {dev:.4f} (bound {2 * noise:.4f} = 2x HF bf16's); perplexity {ppl:.3f} vs "
        f"fp32 {ppl32:.3f} ({(ppl - ppl32) / ppl32:+.2%})"
    )
    assert dev <= 2 * noise
    assert 1.0 < ppl32 < 50.0


def test_bf16_logprobs_within_bf16_rounding_of_fp32(
    smol_path: str, ppl_ids: list[int], fp32_logprobs: torch.Tensor, bf16_noise: float
) -> None:
    """The dense bf16 load (oneDNN-packed weights, the path prompts take with --no-batch-invariant) keeps quality."""
    lm = load_lm(smol_path, torch.bfloat16)
    with torch.inference_mode():
        logits = lm.model(torch.tensor([ppl_ids]))[0]
    _check_logprobs("SmolLM2 dense bf16 prompt forward", logits, ppl_ids, fp32_logprobs, bf16_noise)


@pytest.mark.parametrize("kernels", [*native_isas(reference=False), "torch"])
def test_serving_decode_path_agrees_with_hf_fp32(
    smol_path: str,
    hf,
    kernels: str,
    prompt_ids: dict[str, list[int]],
    hf_greedy: dict[str, list[int]],
    ppl_ids: list[int],
    fp32_logprobs: torch.Tensor,
    bf16_noise: float,
) -> None:
    """What the server runs per decode step with each backend this CPU has, in the dtype `auto` picks for it (the
    4-bit weights as stored, attention from the paged cache; batch-invariant where the backend can be), against
    HF fp32, token by token over the prompts and greedy continuations, plus log-probabilities on a text."""
    backend = select_backend(kernels)
    dtype = select_dtype("auto", torch.device("cpu"), backend)
    lm = load_lm(smol_path, dtype, quantized_max_rows=None, backend=backend, batch_invariant=True)
    quantized = any(isinstance(m, QuantLinear) for m in lm.model.modules())
    assert quantized == (backend.kernels is not None)
    assert lm.batch_invariant == (backend.kernels is not None)  # every native build serves SmolLM2 invariantly
    agree = total = 0
    worst = 0.0
    for key in GREEDY:
        ids = prompt_ids[key] + hf_greedy[key]
        with torch.inference_mode():
            ref = hf(torch.tensor([ids])).logits[0]
        mine = _decode_logits(lm, ids)
        worst = max(worst, float((mine - ref).abs().max()))
        agree += int((mine.argmax(-1) == ref.argmax(-1)).sum())
        total += len(ids)
    label = (
        f"SmolLM2 decode path ({backend.name}, {dtype}, quantized kernels {'on' if quantized else 'off'}, fused "
        f"layers {'on' if lm.model.decoder_fast_path else 'off'}, batch-invariant {lm.batch_invariant})"
    )
    print(f"{label} vs HF fp32: max abs logit diff {worst:.3f}, top-1 agreement {agree}/{total} = {agree / total:.1%}")
    assert agree / total >= 0.95
    assert worst < 3.0  # logits span about -30..40; measured 1.25 for bf16 kernels (the dense bf16 forward: up to ~5)
    _check_logprobs(label, _decode_logits(lm, ppl_ids), ppl_ids, fp32_logprobs, bf16_noise)


def test_prompt_scores_with_the_default_settings_are_within_005_of_hf_fp32(
    ppl_ids: list[int], fp32_logprobs: torch.Tensor
) -> None:
    """echo + logprobs through the server as it starts by default (batch-invariant, auto backend and dtype): the
    prompt's log-probabilities come from an exact pass (model_core.lm.CausalLM.exact_hidden), within 0.05 mean
    of HF fp32 on every kind of CPU whatever its serving products round."""
    tm = build_text_model(Settings(enable_gan=False, enable_g2p=False, max_model_len=1024))
    with serve_model_in_process(tm) as live, live.client(timeout=300) as client:
        r = client.post(
            "/v1/completions",
            json={"model": tm.name, "prompt": PPL_TEXT, "max_tokens": 0, "echo": True, "logprobs": 1},
        )
    assert r.status_code == 200, r.text
    got = torch.tensor(r.json()["choices"][0]["logprobs"]["token_logprobs"][1:])
    assert len(got) == len(ppl_ids) - 1
    dev = float((got - fp32_logprobs).abs().mean())
    print(f"prompt scores, default settings ({tm.kernels}, {tm.dtype}): mean |d logprob| vs HF fp32 {dev:.4f}")
    assert dev < 0.05


@pytest.mark.parametrize("kernels", native_isas(reference=False))
def test_a_prompt_chunk_gives_each_positions_logits_of_its_token_by_token_decode(smol_path: str, kernels: str) -> None:
    """Batch-invariant on the native kernels: a 100-token prompt as one chunk (100 rows: the layers' norms, adds and
    SwiGLU split by rows among the threads, the matmuls on tiles) gives every position the logits that decoding it one
    token per step gives (single rows, one thread's elementwise work), bit for bit."""
    backend = select_backend(kernels)
    dtype = select_dtype("auto", torch.device("cpu"), backend)
    lm = load_lm(smol_path, dtype, quantized_max_rows=None, backend=backend, batch_invariant=True)
    ids = [int(t) for t in torch.randint(100, 20000, (100,), generator=torch.Generator().manual_seed(4))]
    cache = lm.model.new_cache(7, 16)
    with torch.inference_mode():
        step = cache.prepare([list(range(7))], [0], len(ids))
        chunk = lm.model(torch.tensor([ids]), cache, step, Output.LOGITS)[0].float()  # (T, V)
    assert torch.equal(chunk, _decode_logits(lm, ids))
