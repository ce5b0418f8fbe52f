"""Settings: every option from an environment variable `AIGC_<OPTION>` or a CLI flag `--option`.

This is the only place in `service/` that reads the environment; the rest of the service receives plain
values. (`model_core.native` reads `AIGC_CACHE_DIR` and `CC` itself: where the kernels are built, and with
which compiler, is a build setting the image build and `python -m model_core.native --build` share.)
Invalid settings fail at start-up with a message naming the option.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _split_list(v: Any) -> Any:
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    return v


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12}
_UNITS |= {"tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?(?:e[0-9]+)?)\s*([a-z]*)\s*$")


def parse_bytes(text: str) -> int:
    """A size in bytes: a number, or one with a unit (k, M, G, T: powers of 1000; KiB, MiB, GiB, TiB: of 1024)."""
    m = _SIZE.match(text.lower())
    if m is None or m.group(2) not in _UNITS:
        raise ValueError(f"expected a size such as 8GiB, 512MiB, 4GB or a number of bytes, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AIGC_", extra="ignore", validate_default=True)

    host: str = Field("127.0.0.1", description="interface to bind")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    model: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="an LM to serve: a GGUF file or HF directory, or NAME=PATH to give its id (repeatable; env: "
        "comma-separated); default: SmolLM2-135M-Instruct from its wheel, unless models_dir is set",
    )
    served_model_name: str | None = Field(
        None, description="id of the LM when one is served by a bare path; default: the file or folder name"
    )
    models_dir: str | None = Field(
        None,
        description="serve every GGUF file and HF model folder (config.json + *.safetensors) in this directory too, "
        "each by its file (without .gguf) or folder name",
    )
    max_loaded_models: int = Field(
        4,
        ge=0,
        description="LMs loaded at once; a request for another unloads the least recently used idle one; 0 = no limit",
    )
    max_loaded_memory: int | None = Field(
        None,
        ge=1,
        description="bytes of LMs loaded at once (estimated per model: its weight files + kv_cache_memory_gb), as a "
        "number of bytes or with a unit (e.g. 8GiB, 512MiB, 4GB); default: no limit",
    )
    lora_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="LoRA adapters served as models of their own: NAME=PATH (over the first model) or "
        "NAME=PATH@MODEL, PATH a PEFT folder or a llama.cpp GGUF LoRA (space-separated or repeated; env: "
        "comma-separated)",
    )
    preload: Annotated[list[str] | None, NoDecode] = Field(
        None,
        description="comma-separated LMs loaded at start-up, before /ready says ready; 'all' or 'none' too; "
        "default: the first model (the others load on first use)",
    )
    device: str = Field("auto", description="auto | cpu | cuda[:N]")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="weights/activations")
    kernels: Literal["auto", "torch", "avx512bf16", "avx2", "avx512vnni", "neon-dotprod", "neon", "reference"] = Field(
        "auto",
        description="CPU decode backend: native kernels for an instruction set this CPU runs, or torch only; "
        "auto = the best here",
    )
    quant_max_rows: int | None = Field(
        None,
        ge=0,
        le=1024,
        description="matmuls of up to this many rows (decode "
        "batches, prompt chunks) run on a GGUF's quantized weights as stored (CPU "
        "kernels); 0 = off; default: the kernels' own (avx512bf16 with AMX 16, 4 for F16/BF16 weights, "
        "without AMX 6; avx2 without AVX-512 512, others 32)",
    )
    dense_weights: Literal["auto", "keep", "drop"] = Field(
        "auto",
        description="a GGUF's quantized linear layers also keep dense copies (dequantized at load: prompt chunks and "
        "batches above quant_max_rows run on them, the fastest prompts) or not (drop: those batches dequantize each "
        "layer's weights for the call, the same products, about a quarter of the memory); auto = keep where the "
        "copies take at most 1 GiB and a quarter of the memory available (small models)",
    )
    batch_invariant: bool | None = Field(
        None,
        description="temperature 0 gives the same text under any load: each token's logits are computed the same "
        "way alone or batched, in any prompt chunking, with or without a prefix-cache hit or preemption (every "
        "matmul on the native kernels' integer products, activations rounded to 16 bits per block, AMX-INT8 tiles "
        "for big batches where the CPU has them; GGUF models of the types the kernels read); "
        "--no-batch-invariant: prompt chunks on the dense matmuls (faster prompts) and int8 activations in decode "
        "steps on the int8 builds; default (none): on, except for a model with F16/BF16 weights (no integer form: "
        "their prompts would run several times slower)",
    )
    max_num_seqs: int = Field(32, ge=1, le=1024, description="max sequences decoded together")
    max_num_batched_tokens: int = Field(512, ge=16, description="token budget per engine step")
    kv_cache_memory_gb: float = Field(1.0, gt=0, description="memory for the KV cache")
    block_size: int = Field(16, ge=1, le=1024, description="tokens per KV cache block")
    enable_prefix_caching: bool = Field(
        True,
        description="reuse the KV cache blocks of prompt prefixes computed before (--no-enable-prefix-caching: off)",
    )
    max_model_len: int | None = Field(None, ge=16, description="context length cap; default: the model's")
    speculative_method: Literal["off", "ngram", "draft"] = Field(
        "off",
        description="speculative decoding: ngram = propose the tokens that followed the last few tokens earlier in "
        "the prompt or output (no extra model); draft = a draft model's greedy guesses (--speculative-model); "
        "verified in the batched step: temperature 0 gives the same text as off where the model is "
        "batch-invariant, and sampling keeps the model's distribution",
    )
    speculative_model: str | None = Field(
        None, description="the draft model (GGUF file or HF directory) of --speculative-method draft: same vocabulary"
    )
    num_speculative_tokens: int = Field(4, ge=1, le=16, description="most tokens proposed per decode step")
    ngram_prompt_lookup_max: int = Field(4, ge=1, le=16, description="longest n-gram looked up (ngram method)")
    ngram_prompt_lookup_min: int = Field(2, ge=1, le=16, description="shortest n-gram looked up (ngram method)")
    speculative_disable_by_batch_size: int = Field(
        4,
        ge=1,
        description="propose nothing while more sequences than this decode together (a step of many rows is bound "
        "by compute: every draft token costs about a row)",
    )
    max_waiting: int = Field(256, ge=0, description="queued requests beyond which new ones get 503")
    request_timeout_s: float = Field(600.0, gt=0, description="longest a text request may run (504 after)")
    queue_timeout_s: float = Field(120.0, gt=0, description="longest a request may wait before it starts (503)")
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, description="comma-separated keys")
    api_key_file: str | None = Field(None, description="file with one API key per line")
    public_paths: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["/health", "/ready", "/metrics"], description="paths open without a key"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="allowed CORS origins; empty = CORS off"
    )
    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="largest accepted request body")
    request_body_timeout_s: float = Field(
        30.0, gt=0, description="longest a client may take to send a request body (408 after)"
    )
    header_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="longest a client may take to send a request's line and headers, on a new connection or "
        "between requests on a kept-alive one (then the connection closes, with a 408 if part of them came)",
    )
    max_connections: int = Field(
        1000,
        ge=1,
        description="open client connections at most; one more is answered 503 (too_many_connections) and closed",
    )
    grammar_probe_workers: int = Field(
        2,
        ge=0,
        le=8,
        description="processes that compile each new grammar before the server does, so that a crash inside the "
        "grammar compiler costs that request a 400, never the server; 0 = off",
    )
    max_tokens_default: int | None = Field(
        None,
        ge=1,
        description="completion limit of requests that set no "
        "max_tokens; default: the rest of the context for chat, 16 for completions",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info")
    log_format: Literal["json", "text"] = Field("json", description="stderr log lines as JSON or text")
    enable_gan: bool = Field(True, description="serve /v1/images/generations")
    gan_path: str | None = Field(None, description="GAN checkpoint dir; default: the shipped one")
    image_max_batch: int = Field(32, ge=1, le=256, description="GAN micro-batch size")
    image_max_wait_ms: float = Field(10.0, ge=0, le=1000, description="GAN micro-batch wait")
    enable_g2p: bool = Field(True, description="serve the grapheme-to-phoneme model cmudict-g2p on /v1/completions")
    g2p_path: str | None = Field(None, description="G2P checkpoint dir; default: the shipped one")
    g2p_max_batch: int = Field(64, ge=1, le=1024, description="G2P micro-batch size, in decoder rows")
    g2p_max_wait_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="G2P micro-batch wait (0: a batch takes what is "
        "queued; requests arriving while one runs form the next)",
    )
    drain_timeout_s: float = Field(30.0, ge=0, description="graceful shutdown drain timeout")
    ui: bool = Field(True, description="serve the web playground at / (--no-ui or --ui false: off)")

    @field_validator("api_keys", "public_paths", "cors_origins", "model", "preload", "lora_modules", mode="before")
    @classmethod
    def _lists(cls, v: Any) -> Any:
        return _split_list(v)

    @field_validator("max_loaded_memory", mode="before")
    @classmethod
    def _bytes(cls, v: Any) -> Any:
        return parse_bytes(v) if isinstance(v, str) else v

    def all_api_keys(self) -> list[str]:
        keys = list(self.api_keys)
        if self.api_key_file:
            with open(self.api_key_file) as f:
                keys += [line.strip() for line in f if line.strip() and not line.startswith("#")]
        return keys

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v != "auto" and v != "cpu" and not v.startswith("cuda"):
            raise ValueError("expected auto, cpu or cuda[:N]")
        return v

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs")
        if self.ngram_prompt_lookup_min > self.ngram_prompt_lookup_max:
            raise ValueError("ngram_prompt_lookup_min must be <= ngram_prompt_lookup_max")
        if (self.speculative_method == "draft") != (self.speculative_model is not None):
            raise ValueError("speculative_model is the draft model of speculative_method draft: give both or neither")
        if self.api_key_file is not None:
            try:
                if not self.all_api_keys():
                    raise ValueError(f"api_key_file {self.api_key_file!r} holds no keys")
            except OSError as e:
                raise ValueError(f"api_key_file: {e}") from None
        return self


def _shown_default(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(value) if value else "none"
    return "none" if value is None else str(value)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    """CLI flags override environment variables, which override defaults."""
    ap = argparse.ArgumentParser(prog="python -m service", description="AIGC inference server")
    for name, f in Settings.model_fields.items():
        if name == "api_keys":
            ap.add_argument(
                "--api-key",
                help="API key (repeatable); env AIGC_API_KEYS",
                default=None,
                action="append",
                dest="api_keys",
                metavar="KEY",
            )
        elif name == "lora_modules":
            ap.add_argument(
                "--lora-modules",
                help=f"{f.description} (env AIGC_LORA_MODULES)",
                default=None,
                nargs="+",
                action="extend",
                dest="lora_modules",
                metavar="NAME=PATH[@MODEL]",
            )
        elif name == "model":
            ap.add_argument(
                "--model",
                help=f"{f.description} (env AIGC_MODEL)",
                default=None,
                action="append",
                dest="model",
                metavar="[NAME=]PATH",
            )
        else:
            switch: dict[str, Any] = {}
            if f.annotation in (bool, bool | None):  # --x alone means true, --no-x false; --x true|false works too
                ap.add_argument(
                    "--no-" + _flag(name)[2:],
                    dest=name,
                    action="store_const",
                    const="false",
                    help=f"same as {_flag(name)} false",
                )
                switch = {"nargs": "?", "const": "true"}
            ap.add_argument(
                _flag(name),
                dest=name,
                default=None,
                **switch,
                help=f"{f.description or name} (env AIGC_{name.upper()}, default "
                f"{_shown_default(f.get_default(call_default_factory=True))})",
            )
    args = {k: v for k, v in vars(ap.parse_args(argv)).items() if v is not None}
    try:
        return Settings(**args)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'settings'}: {err['msg']}" for err in e.errors())
        ap.error(f"invalid settings: {msgs}")
        raise  # unreachable
