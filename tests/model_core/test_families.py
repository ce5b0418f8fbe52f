"""Every LM family the loaders read (tests/model_core/families.py: FAMILIES), from its safetensors directory and from
its GGUF file, against Hugging Face transformers on the same weights:

- fp32 logits within 1e-4 of HF's (HF reading the GGUF itself for the GGUF, the directory for the directory);
- greedy generation (the reference `generate()`, cached decode) equals HF's `generate(do_sample=False)`;
- the batched engine (chunked prefill, prefix cache, concurrent requests) equals the reference `generate()`;
- Gemma 3's sliding window (8 tokens, alternate layers) on a 40-token prompt: full prefill, chunked prefill through
  a paged KV cache, and decode;
- Qwen 2 (QKV biases) and Qwen 3 (QK-norm) decoding through the fused native decoder: HF's logits, and its one-call
  layers on a Q8_0 file against the module path;
- each vocabulary kind encodes a torture string as HF's tokenizer does;
- the fixtures themselves: HF reads each GGUF back to the safetensors model's logits, and our GGUF writer writes
  byte for byte what llama.cpp's converter writes (where the converter is on this machine);
- `slow`: llama-server loads each file and completes a prompt with our tokens.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from model_core.backend import select_backend  # noqa: E402
from model_core.fused_decode import FusedLlamaDecoder  # noqa: E402
from model_core.generate import generate  # noqa: E402
from model_core.kv_cache import PagedKVCache  # noqa: E402
from model_core.lm import CausalLM, Output  # noqa: E402
from model_core.qmatmul import QuantLinear  # noqa: E402
from model_core.sampling import SamplingParams  # noqa: E402
from model_core.step_attention import StepAttention  # noqa: E402
from model_core.tokenizer import Tokenizer  # noqa: E402
from model_core.weights.loader import LoadedLM, load_for_inference, load_lm  # noqa: E402
from tests.model_core.families import (  # noqa: E402
    CONTROL,
    CORPUS,
    FAMILIES,
    MAIN_FAMILIES,
    TORTURE,
    UNKNOWN,
    VOCABS,
    TinyFamily,
    build_families,
    find_converter,
    read_gguf_contents,
    write_gguf,
)
from tests.service.engine.engine_utils import make_engine, run_all  # noqa: E402
from tests.utils import kernels_for, native_isas  # noqa: E402

TOL = 1e-4
FORMATS = ("safetensors", "gguf")
PROMPT = "The quick brown fox jumps over the lazy dog. Hello world, numbers 123 4567!"
N_NEW = 32
WINDOW_FAMILY = "gemma3_window"
WINDOW_PROMPT = 40
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one intra-op thread is faster and steadier
CASES = [pytest.param(name, fmt, id=f"{name}-{fmt}") for name in MAIN_FAMILIES for fmt in FORMATS]


# -------------------------------------------------------------------- fixtures (built once per session)
@pytest.fixture(scope="session")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyFamily]:
    return build_families(tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="session")
def loaded(families: dict[str, TinyFamily]) -> Callable[[str, str], LoadedLM]:
    """(family, format) -> our model, loaded once."""
    cache: dict[tuple[str, str], LoadedLM] = {}

    def get(name: str, fmt: str) -> LoadedLM:
        if (name, fmt) not in cache:
            path = families[name].path(fmt)
            cache[name, fmt] = load_lm(path, dtype=torch.float32, native_decode=False, pack=False)
        return cache[name, fmt]

    return get


def hf_from_gguf(tiny: TinyFamily) -> Any:
    """HF's own GGUF loader reading the file; with the directory's config where HF's reading of the metadata is
    lossy (Family.hf_reads_config), so the weights still come from the GGUF; the directory's model where HF does
    not read the architecture (Family.hf_reads_gguf)."""
    return hf_reading(tiny, tiny.gguf)


def hf_reading(tiny: TinyFamily, path: Path) -> Any:
    """HF transformers' model of the GGUF file `path` holding tiny's family (fp32, eager attention)."""
    if not tiny.family.hf_reads_gguf:
        assert path == tiny.gguf, "HF cannot read this architecture's quantized files"
        return tiny.hf_model
    kwargs = {} if tiny.family.hf_reads_config else {"config": copy.deepcopy(tiny.hf_model.config)}
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager", **kwargs
    ).eval()


@pytest.fixture(scope="session")
def oracle(families: dict[str, TinyFamily]) -> Callable[[str, str], Any]:
    """(family, format) -> HF transformers' model read from that same file or directory, loaded once."""
    cache: dict[tuple[str, str], Any] = {}

    def get(name: str, fmt: str) -> Any:
        if (name, fmt) not in cache:
            tiny = families[name]
            if fmt == "gguf":
                cache[name, fmt] = hf_from_gguf(tiny)
            else:
                cache[name, fmt] = transformers.AutoModelForCausalLM.from_pretrained(
                    str(tiny.hf_dir), dtype=torch.float32, attn_implementation="eager"
                ).eval()
        return cache[name, fmt]

    return get


# -------------------------------------------------------------------- helpers
def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def hf_logits(hf: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return hf(ids).logits


def hf_greedy(hf: Any, prompt: list[int], n: int) -> list[int]:
    """HF's greedy decoding (its forward with its own KV cache) for exactly n tokens: EOS does not stop it (HF's
    generate() stops at the EOS of the model's config even with the generation config's eos_token_id unset)."""
    out: list[int] = []
    with torch.inference_mode():
        res = hf(torch.tensor([prompt]), use_cache=True)
        for _ in range(n):
            out.append(int(res.logits[0, -1].argmax()))
            res = hf(torch.tensor([[out[-1]]]), past_key_values=res.past_key_values, use_cache=True)
    return out


def our_greedy(lm: LoadedLM, prompt: list[int], n: int, kernels: Any = None, banned: tuple[int, ...] = ()) -> list[int]:
    params = SamplingParams(
        max_tokens=n, temperature=0.0, ignore_eos=True, logit_bias=tuple((i, -100.0) for i in banned)
    )
    return [s.token_id for s in generate(lm.model, prompt, params, kernels=kernels)]


def random_ids(vocab_size: int, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


# -------------------------------------------------------------------- the fixtures are right
@pytest.mark.parametrize("name", list(FAMILIES))
def test_fixture_gguf_matches_hf_safetensors(name: str, families: dict[str, TinyFamily]) -> None:
    """HF transformers reading the GGUF gives the logits of the model saved to the directory."""
    tiny = families[name]
    ids = random_ids(tiny.vocab.size, (2, 40))
    diff = max_diff(hf_logits(hf_from_gguf(tiny), ids), hf_logits(tiny.hf_model, ids))
    print(f"{name}: HF from {tiny.gguf.parent.name} GGUF vs HF safetensors: max abs diff {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("name", list(FAMILIES))
def test_writer_matches_llama_cpp_converter(name: str, families: dict[str, TinyFamily]) -> None:
    """Our GGUFWriter file equals llama.cpp's converter's: the same metadata (types and values) and the same tensors
    (names, types, shapes, bytes). Gemma 3's converter writes no sliding-window pattern: llama.cpp then makes every
    6th layer global, which gemma3_window's layer types are not; our file says them."""
    if find_converter() is None:
        pytest.skip("llama.cpp's convert_hf_to_gguf.py not found (env LLAMA_CONVERT_HF)")
    tiny = families[name]
    assert tiny.converted_gguf is not None, tiny.converter_error
    ours_kv, ours_t = read_gguf_contents(tiny.writer_gguf)
    theirs_kv, theirs_t = read_gguf_contents(tiny.converted_gguf)
    only_ours = {k: ours_kv[k] for k in ours_kv.keys() - theirs_kv.keys()}
    if not tiny.family.converter:
        assert list(only_ours) == ["gemma3.attention.sliding_window_pattern"]
        ours_kv = {k: v for k, v in ours_kv.items() if k not in only_ours}
    assert ours_kv == theirs_kv
    assert ours_t.keys() == theirs_t.keys()
    for key, (qtype, shape, data) in ours_t.items():
        assert (qtype, shape) == theirs_t[key][:2], key
        assert data.tobytes() == theirs_t[key][2].tobytes(), key


# -------------------------------------------------------------------- ours against HF
@pytest.mark.parametrize(("name", "fmt"), CASES)
def test_logits_match_hf(
    name: str, fmt: str, families: dict[str, TinyFamily], loaded: Callable[..., LoadedLM], oracle: Callable[..., Any]
) -> None:
    lm, hf = loaded(name, fmt), oracle(name, fmt)
    assert lm.config.vocab_size == families[name].vocab.size
    ids = random_ids(families[name].vocab.size, (2, 24), seed=1)
    with torch.inference_mode():
        ours = lm.model(ids)
    diff = max_diff(ours, hf_logits(hf, ids))
    print(f"{name} {fmt}: max abs diff vs HF {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize(("name", "fmt"), CASES)
def test_greedy_generation_matches_hf(
    name: str, fmt: str, loaded: Callable[..., LoadedLM], oracle: Callable[..., Any]
) -> None:
    lm = loaded(name, fmt)
    prompt = lm.tokenizer.encode(PROMPT)
    assert our_greedy(lm, prompt, N_NEW) == hf_greedy(oracle(name, fmt), prompt, N_NEW)


@pytest.mark.parametrize(("name", "fmt"), CASES)
def test_batched_engine_matches_reference_generate(name: str, fmt: str, loaded: Callable[..., LoadedLM]) -> None:
    """Four concurrent greedy requests (two sharing a 20-token prefix) with 16-token prefill chunks."""
    lm = loaded(name, fmt)
    tok = lm.tokenizer
    prompts = [tok.encode(text) for text in CORPUS[:2]]
    shared = tok.encode(" ".join(CORPUS[3:]))
    prompts += [shared[:20] + prompts[0][:5], shared[:20] + prompts[1][:9]]
    rng = random.Random(0)
    params = [SamplingParams(max_tokens=rng.randint(4, 16), temperature=0.0, ignore_eos=True) for _ in prompts]
    engine = make_engine(lm.model, tok, max_num_batched_tokens=16, num_blocks=64, block_size=8, max_num_seqs=8)
    try:
        results = run_all(engine, list(zip(prompts, params, strict=True)))
    finally:
        engine.stop()
    for prompt, p, events in zip(prompts, params, results, strict=True):
        reference = [s.token_id for s in generate(lm.model, prompt, p)]
        assert [e.token_id for e in events] == reference
    assert engine.stats.max_decode_batch > 1, "requests were not batched"


# -------------------------------------------------------------------- Gemma 3's sliding window
def _window_case(lm: LoadedLM, hf: Any) -> tuple[list[int], list[int], torch.Tensor]:
    """A 40-token prompt, HF's 8 greedy tokens after it, and HF's logits over all 48 positions."""
    prompt = lm.tokenizer.encode(" ".join(CORPUS))[:WINDOW_PROMPT]
    assert len(prompt) == WINDOW_PROMPT
    cont = hf_greedy(hf, prompt, 8)
    return prompt, cont, hf_logits(hf, torch.tensor([prompt + cont]))[0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_sliding_window_prefill_chunked_prefill_and_decode(
    fmt: str, loaded: Callable[..., LoadedLM], oracle: Callable[..., Any]
) -> None:
    lm, hf = loaded(WINDOW_FAMILY, fmt), oracle(WINDOW_FAMILY, fmt)
    cfg = hf.config
    assert cfg.sliding_window == 8 and len(set(cfg.layer_types)) == 2
    prompt, cont, ref = _window_case(lm, hf)
    with torch.inference_mode():
        full = lm.model(torch.tensor([prompt]))[0]
    worst = {"prefill": max_diff(full, ref[:WINDOW_PROMPT]), **_cached_diffs(lm, prompt, cont, ref)}
    print(f"{WINDOW_FAMILY} {fmt}: max abs diff vs HF {worst}")
    assert max(worst.values()) <= TOL, worst
    assert our_greedy(lm, prompt, N_NEW) == hf_greedy(hf, prompt, N_NEW)


def _cached_diffs(
    lm: LoadedLM, prompt: list[int], cont: list[int], ref: torch.Tensor, kernels: Any = None, in_place: bool = False
) -> dict[str, float]:
    """Chunked prefill then decode through a paged cache with scattered 4-token blocks (chunks not aligned to
    blocks or the window): the max abs logit difference against ref (HF's full forward) of each phase. kernels:
    decode steps (and with in_place, prompt chunks) read the cache in place with the native attention kernel."""
    c = lm.model.cfg
    cache = PagedKVCache(
        c.n_layers, 16, 4, c.n_kv_heads, c.hd, max_positions=c.max_seq_len, kernels=kernels, in_place_prefill=in_place
    )
    table = [9, 2, 14, 5, 0, 11, 7, 3, 12, 6, 1, 15, 8]  # 52 positions
    start, chunked, decode = 0, 0.0, 0.0
    with torch.inference_mode():
        for size in [5, 1, 9, 3, 7, 15]:
            step = cache.prepare([table], [start], size)
            assert step.in_place == (kernels is not None and (size == 1 or in_place))
            out = lm.model(torch.tensor([prompt[start : start + size]]), cache, step)[0]
            chunked = max(chunked, max_diff(out, ref[start : start + size]))
            start += size
        for tok in cont:  # token by token, each step's logits against HF's full forward
            step = cache.prepare([table], [start], 1)
            last = lm.model(torch.tensor([[tok]]), cache, step, Output.LAST)[0]
            decode = max(decode, max_diff(last, ref[start]))
            start += 1
    return {"chunked prefill": chunked, "decode": decode}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("isa", native_isas())
def test_sliding_window_with_native_attention(
    isa: str, fmt: str, loaded: Callable[..., LoadedLM], oracle: Callable[..., Any]
) -> None:
    """Attention read in place from the cache by the native kernel (decode steps; with in_place_prefill, prompt
    chunks too: one query row a token) keeps the window: logits equal HF's, and so does greedy generate()."""
    lm, hf = loaded(WINDOW_FAMILY, fmt), oracle(WINDOW_FAMILY, fmt)
    prompt, cont, ref = _window_case(lm, hf)
    kernels = kernels_for(isa)
    for in_place in (False, True):
        worst = _cached_diffs(lm, prompt, cont, ref, kernels, in_place)
        print(f"{WINDOW_FAMILY} {fmt} {isa} in_place_prefill={in_place}: max abs diff vs HF {worst}")
        assert max(worst.values()) <= TOL, worst
    assert our_greedy(lm, prompt, N_NEW, kernels=kernels) == hf_greedy(hf, prompt, N_NEW)


# -------------------------------------------------------------------- tokenizers
KIND_FAMILY = {kind: next(n for n in MAIN_FAMILIES if FAMILIES[n].vocab == kind) for kind in VOCABS}
TEXTS = [TORTURE, PROMPT, "hello", "x  y\n\n z\t\t!", "123456789 0.5 -7e3", "<|im_start|>assistant\n"]


@pytest.mark.parametrize("kind", list(VOCABS))
def test_tokenizer_matches_hf(kind: str, families: dict[str, TinyFamily], loaded: Callable[..., LoadedLM]) -> None:
    """Ours from the GGUF equals HF's tokenizer of the GGUF; ours from the directory equals HF's of the directory."""
    tiny = families[KIND_FAMILY[kind]]
    hf = {
        "gguf": transformers.AutoTokenizer.from_pretrained(str(tiny.gguf.parent), gguf_file=tiny.gguf.name)
        if tiny.family.hf_reads_gguf
        else transformers.AutoTokenizer.from_pretrained(str(tiny.hf_dir)),
        "safetensors": transformers.AutoTokenizer.from_pretrained(str(tiny.hf_dir)),
    }
    for fmt in FORMATS:
        ours = loaded(tiny.name, fmt).tokenizer
        for text in TEXTS:
            ids = ours.encode(text)
            # the model's tokenizer.json; for the GGUF also HF's reading of it, except where HF's differs from
            # llama.cpp's (test_llama_server_tokenizes_as_we_do checks ours against llama.cpp itself): HF reads a
            # llama-style SentencePiece vocabulary with Metaspace's prefix rule (only before the text, and not before
            # a space) where llama.cpp, like Llama 2's tokenizer.json, prefixes every stretch of text between added
            # tokens; and it does not know that Phi-3's chat tokens swallow the whitespace after them
            assert ids == hf["safetensors"].encode(text), (fmt, text)
            if kind not in ("spm", "phi3") or (not text.startswith(" ") and "<" not in text):
                assert ids == hf[fmt].encode(text), (fmt, text)
            assert ours.decode(ids) == hf[fmt].decode(ids, skip_special_tokens=True), (fmt, text)
    # the two formats hold one tokenizer
    gguf_tok, dir_tok = loaded(tiny.name, "gguf").tokenizer, loaded(tiny.name, "safetensors").tokenizer
    assert gguf_tok.encode(TORTURE) == dir_tok.encode(TORTURE)
    assert (gguf_tok.bos_token_id, gguf_tok.eos_token_id) == (dir_tok.bos_token_id, dir_tok.eos_token_id)


# -------------------------------------------------------------------- llama-server (slow)
def find_llama_server() -> Path | None:
    env = os.environ.get("LLAMA_SERVER")
    if env:
        return Path(env) if Path(env).is_file() else None
    found = sorted(Path.home().glob(".cache/aigc-peers/*/build/bin/llama-server"))
    return found[-1] if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, body: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return dict(json.loads(resp.read()))


@contextmanager
def llama_server(binary: Path, model: Path, log: Path) -> Iterator[str]:
    port = _free_port()
    cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "--ctx-size", "256", "-np", "1"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"llama-server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"llama-server not ready in 60 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_llama_server_completes_as_we_do(
    name: str,
    families: dict[str, TinyFamily],
    loaded: Callable[..., LoadedLM],
    oracle: Callable[..., Any],
    tmp_path: Path,
) -> None:
    """llama-server loads the tiny GGUF, its greedy 16 tokens after a prompt are HF's (the file means to llama.cpp
    what it means to HF) and ours. Control tokens are banned on every side: with ignore_eos llama-server bans its
    end-of-generation set, which a random model may pick."""
    binary = find_llama_server()
    if binary is None:
        pytest.skip("llama-server not found (env LLAMA_SERVER)")
    tiny = families[name]
    banned = tuple(i for i, t in enumerate(tiny.vocab.types) if t in (CONTROL, UNKNOWN))
    prompt = Tokenizer.from_gguf(tiny.gguf).encode(" ".join(CORPUS[:2]))[:24]
    with llama_server(binary, tiny.gguf, tmp_path / "llama-server.log") as url:
        body = {
            "prompt": prompt,
            "n_predict": 16,
            "temperature": 0,
            "ignore_eos": True,
            "cache_prompt": False,
            "return_tokens": True,
            "logit_bias": [[i, False] for i in banned],
        }
        theirs = _post(url + "/completion", body)["tokens"]
    logits = hf_logits(oracle(name, "gguf"), torch.tensor([prompt + theirs]))[0, len(prompt) - 1 : -1].clone()
    logits[:, list(banned)] = -torch.inf
    assert logits.argmax(-1).tolist() == theirs, "llama-server's greedy tokens are not HF's"
    assert our_greedy(loaded(name, "gguf"), prompt, 16, banned=banned) == theirs


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(VOCABS))
def test_llama_server_tokenizes_as_we_do(kind: str, families: dict[str, TinyFamily], tmp_path: Path) -> None:
    """llama-server's /tokenize of the tiny GGUF of each vocabulary kind (special tokens parsed, BOS as the file
    says) equals ours, on the torture texts and on chat-template-like text around special tokens."""
    binary = find_llama_server()
    if binary is None:
        pytest.skip("llama-server not found (env LLAMA_SERVER)")
    tiny = families[KIND_FAMILY[kind]]
    ours = Tokenizer.from_gguf(tiny.gguf)
    texts = [*TEXTS, " hello", "  two  spaces", "a <|im_end|> b", "<|im_start|>user\nhi<|im_end|>\n", "\n\nx"]
    with llama_server(binary, tiny.gguf, tmp_path / "llama-server.log") as url:
        for text in texts:
            theirs = _post(url + "/tokenize", {"content": text, "add_special": True, "parse_special": True})
            assert ours.encode(text) == theirs["tokens"], text


@pytest.mark.parametrize("isa", native_isas())
def test_fused_llama_decoder_keeps_a_window(
    isa: str, loaded: Callable[..., LoadedLM], oracle: Callable[..., Any]
) -> None:
    """Mistral with a sliding window (HF's `sliding_window` on every layer) through the fused native decoder of
    llama blocks: decode steps equal HF's windowed logits."""
    base, hf = loaded("mistral", "safetensors"), copy.deepcopy(oracle("mistral", "safetensors"))
    hf.config.sliding_window = 8
    cfg = dataclasses.replace(base.model.cfg, windows=(8,) * base.model.cfg.n_layers)
    model = CausalLM(cfg)
    model.load_state_dict(base.model.state_dict())
    model.eval()
    kernels = kernels_for(isa)
    model.decoder_fast_path = FusedLlamaDecoder.build(model, kernels)
    assert model.decoder_fast_path is not None
    lm = dataclasses.replace(base, model=model, config=cfg)
    prompt, cont, ref = _window_case(lm, hf)
    worst = _cached_diffs(lm, prompt, cont, ref, kernels)
    print(f"mistral, window 8, fused decoder {isa}: max abs diff vs HF {worst}")
    assert max(worst.values()) <= TOL, worst


# the families whose block options are llama's plus what the fused decoder runs too: QKV biases, QK-norm, Gemma's
# GELU-tanh gate, post-sublayer norms, soft-caps, windows and the windowed layers' own rotary base
FUSED_VARIANTS = ("qwen2", "qwen3", "gemma", "gemma2", "gemma3")


def _counting_runs(fused: FusedLlamaDecoder) -> list[int]:
    """Record the rows of each step the fused decoder runs (on this object only)."""
    runs: list[int] = []
    run = fused.run

    def counted(x: torch.Tensor, step: StepAttention, cache: PagedKVCache) -> torch.Tensor:
        runs.append(x.shape[0] * x.shape[1])
        return run(x, step, cache)

    fused.run = counted  # type: ignore[method-assign]
    return runs


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", FUSED_VARIANTS)
@pytest.mark.parametrize("isa", native_isas())
def test_fused_decoder_runs_the_llama_variants_as_hf(
    isa: str, name: str, fmt: str, families: dict[str, TinyFamily], oracle: Callable[..., Any]
) -> None:
    """Qwen 2 (QKV biases), Qwen 3 (QK-norm) and Gemma 1/2/3 (GELU-tanh gate, post-norms, soft-caps, windows, local
    rotary base) loaded with native decoding get the fused decoder, and it runs their
    decode steps (between PyTorch's dense fp32 matmuls): the logits of chunked prefill (module path) then decode
    steps (fused) equal HF's, and so does greedy generation."""
    lm = load_lm(families[name].path(fmt), dtype=torch.float32, native_decode=True, backend=select_backend(isa))
    fused, kernels = lm.model.decoder_fast_path, lm.backend.kernels
    assert isinstance(fused, FusedLlamaDecoder) and kernels is not None
    c = lm.model.cfg
    cache = PagedKVCache(c.n_layers, 4, 4, c.n_kv_heads, c.hd, max_positions=c.max_seq_len, kernels=kernels)
    assert fused.applies(cache.prepare([[0]], [0], 1), cache)
    hf = oracle(name, fmt)
    prompt, cont, ref = _window_case(lm, hf)
    runs = _counting_runs(fused)
    worst = _cached_diffs(lm, prompt, cont, ref, kernels)
    print(f"{name} {fmt}, fused decoder {isa}: max abs diff vs HF {worst}")
    assert runs == [1] * (1 + len(cont))  # every 1-token step (the 1-token prompt chunk too), and only those
    assert max(worst.values()) <= TOL, worst
    assert our_greedy(lm, prompt, N_NEW, kernels=kernels) == hf_greedy(hf, prompt, N_NEW)


def _decode_logits(model: CausalLM, prompt: list[int], cont: list[int], kernels: Any) -> torch.Tensor:
    """The prompt in one chunk, then cont token by token through a paged cache: the decode steps' logits (T, V)."""
    c = model.cfg
    cache = PagedKVCache(c.n_layers, 16, 4, c.n_kv_heads, c.hd, max_positions=c.max_seq_len, kernels=kernels)
    table, out = [9, 2, 14, 5, 0, 11, 7, 3, 12, 6, 1, 15, 8], []
    with torch.inference_mode():
        model(torch.tensor([prompt]), cache, cache.prepare([table], [0], len(prompt)))
        for i, tok in enumerate(cont):
            step = cache.prepare([table], [len(prompt) + i], 1)
            out.append(model(torch.tensor([[tok]]), cache, step, Output.LAST)[0])
    return torch.stack(out).float()


@pytest.mark.parametrize("name", FUSED_VARIANTS)
@pytest.mark.parametrize("isa", native_isas())
def test_fused_one_call_layers_of_the_llama_variants_equal_the_module_path(
    isa: str, name: str, families: dict[str, TinyFamily], q8_files: dict[str, Path]
) -> None:
    """The Q8_0 file of Qwen 2 / Qwen 3 / Gemma 1-3 with every projection on its quantized weights: decode steps one
    native call a layer (the QKV bias added in the QKV matmul, QK-norm before RoPE, post-norms and the GELU-tanh gate in
    the call) against the module path on the same QuantLinears (the bias added by QuantLinear, the norms by RMSNorm
    modules, the gate by PyTorch): within fp32 summation order (test_native.py's
    bound for the fused decoder of llama layers)."""
    lm = load_lm(q8_files[name], dtype=torch.float32, quantized_max_rows=8, backend=select_backend(isa))
    fused, kernels = lm.model.decoder_fast_path, lm.backend.kernels
    assert isinstance(fused, FusedLlamaDecoder) and fused.max_rows >= 1 and kernels is not None
    qkv = lm.model.blocks[0].attn.qkv
    assert isinstance(qkv, QuantLinear) and (qkv.qbias is not None) == (name == "qwen2")
    assert (lm.model.blocks[0].attn.q_norm is not None) == (name in ("qwen3", "gemma3"))
    assert (lm.model.blocks[0].post_ffn_norm is not None) == (name in ("gemma2", "gemma3"))
    ids = lm.tokenizer.encode(" ".join(CORPUS))
    prompt, cont = ids[:20], ids[20:36]
    runs = _counting_runs(fused)
    got = _decode_logits(lm.model, prompt, cont, kernels)
    assert runs == [1] * len(cont)
    lm.model.decoder_fast_path = None
    want = _decode_logits(lm.model, prompt, cont, kernels)
    diff = max_diff(got, want)
    print(f"{name} Q8_0 on {isa}: one-call fused vs module path max |diff| {diff:.2e}")
    assert diff <= 1e-4 * max(want.abs().max().item(), 1.0)


# -------------------------------------------------------------------- the served path
@pytest.fixture(scope="session")
def q8_files(families: dict[str, TinyFamily], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each main family as a Q8_0 GGUF (llama-quantize's Q8_0: every matrix quantized), written once."""
    root = tmp_path_factory.mktemp("q8")
    return {
        name: write_gguf(t.family, t.hf_model, t.vocab, root / f"{name}.gguf", quantized=True)
        for name, t in families.items()
        if name in MAIN_FAMILIES
    }


def _served_logprobs(lm: LoadedLM, ids: list[int]) -> torch.Tensor:
    """Log-probabilities (T, V) fp32 of every position as the server computes them: prompt chunks of 16 through a
    paged cache on the backend's kernels (exact products), then the rest one decode step a token (the decode
    kernels: int8 activations where the backend rounds them)."""
    c = lm.model.cfg
    cache = PagedKVCache(
        c.n_layers,
        8,
        16,
        c.n_kv_heads,
        c.hd,
        lm.model.embed.weight.dtype,
        max_positions=c.max_seq_len,
        kernels=lm.backend.kernels,
    )
    table, out, prompt = list(range(8)), [], len(ids) // 2
    with torch.inference_mode():
        for start in range(0, prompt, 16):
            n = min(16, prompt - start)
            step = cache.prepare([table], [start], n)
            out.append(lm.model(torch.tensor([ids[start : start + n]]), cache, step)[0])
        for start in range(prompt, len(ids)):
            step = cache.prepare([table], [start], 1)
            out.append(lm.model(torch.tensor([[ids[start]]]), cache, step)[0])
    return torch.log_softmax(torch.cat(out).float(), dim=-1)


@pytest.mark.parametrize("isa", native_isas(reference=False) + ["torch"])
@pytest.mark.parametrize("name", MAIN_FAMILIES)
def test_served_backend_within_bf16_noise(
    name: str, isa: str, families: dict[str, TinyFamily], q8_files: dict[str, Path]
) -> None:
    """A Q8_0 file served on this backend as the server serves it (the backend's dtype, its quantized kernels for
    decode steps, native paged attention) stays within twice the rounding noise of HF transformers running the same
    file in bf16: mean |logprob - HF fp32| over 48 positions (the default model's bound, test_smollm2.py)."""
    path = q8_files[name]
    tiny = families[name]
    ids = random_ids(tiny.vocab.size, (1, 48), seed=5)
    if tiny.family.hf_reads_gguf:
        hf = hf_reading(tiny, path)
        ref = torch.log_softmax(hf_logits(hf, ids)[0], dim=-1)
    else:  # the file's values through our fp32 loader (which equals HF on the F32 file); HF's bf16 noise on the F32
        hf = copy.deepcopy(tiny.hf_model)
        with torch.inference_mode():
            exact = load_lm(path, dtype=torch.float32, native_decode=False, pack=False).model(ids)[0]
        ref = torch.log_softmax(exact, dim=-1)
    hf32 = torch.log_softmax(hf_logits(hf, ids)[0], dim=-1)
    noise = float((torch.log_softmax(hf_logits(hf.to(torch.bfloat16), ids)[0].float(), -1) - hf32).abs().mean())
    lm = load_for_inference(path, kernels=isa)
    got = float((_served_logprobs(lm, ids[0].tolist()) - ref).abs().mean())
    print(f"{name} Q8_0 on {lm.backend.describe(lm.model.embed.weight.dtype, 1)}: {got:.4f} (HF bf16 {noise:.4f})")
    assert got <= 2 * noise, (got, noise)
