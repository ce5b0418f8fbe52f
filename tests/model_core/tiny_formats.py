"""Tiny random Hugging Face LMs written in the real on-disk formats our loaders read.

- `tiny_hf_llama` / `tiny_hf_gpt2`: small `transformers` models with weights scaled up so the
  logits are far from uniform (2 layers, hidden 64, 4 heads; GQA with 2 KV heads for llama).
- `tiny_vocab`: a byte-level BPE vocabulary (GPT-2 style) trained on a few sentences.
- `write_hf_dir`: `save_pretrained` plus tokenizer.json / tokenizer_config.json.
- `write_gguf`: a GGUF laid out the way llama.cpp's converter writes it (tensor names, Q/K row
  permutation for llama, Conv1D transposes for GPT-2, F32 norms and biases, hyper-parameters and
  the tokenizer in the metadata), with the 2-D tensors stored as F32, F16, BF16, Q8_0, Q4_0 or Q4_1.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from model_core.weights.names import permute_rope_rows
from tests.utils import quantize_k

VOCAB_SIZE = 300
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
_FILE_TYPES = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_S,
    "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K,
    "Q4_K_M": gguf.LlamaFileType.MOSTLY_Q4_K_M,  # Q4_K, with Q6_K for ffn_down and the head (as llama.cpp's mix)
    "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
    "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
    "Q5_K": gguf.LlamaFileType.MOSTLY_Q5_K_S,
    "Q2_K": gguf.LlamaFileType.MOSTLY_Q2_K,
    "Q3_K": gguf.LlamaFileType.MOSTLY_Q3_K_S,
}
_Q6_K_IN_Q4_K_M = ("ffn_down.weight", "output.weight")
_CORPUS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Hello world! Hello tokenizer, hello model: numbers 123 4567 and code def f(x): return x * 2",
    "Transformers attend to every previous token; caches keep keys and values for later steps.",
    "Once upon a time there was a little language model that wanted to predict the next word.",
]


# -------------------------------------------------------------------- models
def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """Matrices ~ N(0, 0.2), norm weights ~ 1 + N(0, 0.1), biases ~ N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() > 1:
                p.copy_(0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(1.0 + 0.1 * noise)


def tiny_hf_llama(
    *,
    vocab_size: int = VOCAB_SIZE,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    tie: bool = False,
    max_pos: int = 128,
    rope_theta: float = 10000.0,
    seed: int = 0,
    hidden: int = 64,
    ffn: int = 128,
) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=2,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=max_pos,
        rope_theta=rope_theta,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=0,
        attn_implementation="eager",
    )  # type: ignore[call-arg]  # transformers' configs take these as **kwargs
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    _randomize_(model, seed)
    if tie:
        model.tie_weights()
    return model.eval()


def tiny_hf_gpt2(*, vocab_size: int = VOCAB_SIZE, max_pos: int = 128, seed: int = 0) -> GPT2LMHeadModel:
    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=max_pos,
        layer_norm_epsilon=1e-5,
        bos_token_id=1,
        eos_token_id=0,
        attn_implementation="eager",
    )  # type: ignore[call-arg]
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    _randomize_(model, seed)
    model.tie_weights()
    return model.eval()


# -------------------------------------------------------------------- tokenizer
@dataclass(frozen=True)
class TinyVocab:
    tokens: list[str]
    merges: list[str]
    types: list[int]  # llama.cpp token types: 3 = control, 1 = normal
    backend_json: str  # the trained `tokenizers` model, for tokenizer.json

    @property
    def bos_id(self) -> int:
        return self.tokens.index("<|im_start|>")

    @property
    def eos_id(self) -> int:
        return self.tokens.index("<|endoftext|>")


def tiny_vocab(vocab_size: int = VOCAB_SIZE) -> TinyVocab:
    """A byte-level BPE with exactly `vocab_size` tokens: 3 specials, the 256 byte symbols, merges."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS * 4, trainer)
    data = json.loads(backend.to_str())
    tokens = [t for t, _ in sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])]
    if len(tokens) != vocab_size:
        raise ValueError(f"the tiny corpus yields {len(tokens)} tokens, not {vocab_size}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    types = [3 if t in SPECIAL_TOKENS else 1 for t in tokens]
    return TinyVocab(tokens, merges, types, backend.to_str())


# -------------------------------------------------------------------- HF directory
def write_hf_dir(
    model: PreTrainedModel, path: Path, vocab: TinyVocab | None = None, max_shard_size: str | None = None
) -> Path:
    """`save_pretrained` (safetensors, optionally sharded) plus a tokenizer.json directory."""
    path.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    vocab = vocab or tiny_vocab(model.config.vocab_size)
    (path / "tokenizer.json").write_text(vocab.backend_json)
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


# -------------------------------------------------------------------- GGUF
@dataclass(frozen=True)
class _Entry:
    gguf_name: str
    hf_name: str
    to_gguf: Callable[[torch.Tensor], torch.Tensor]  # HF layout -> llama.cpp layout
    conv1d: bool = False  # HF stores it (in, out): llama.cpp transposes it


@dataclass
class TinyGGUF:
    path: Path
    written: dict[str, tuple[np.ndarray, GGMLQuantizationType]]  # GGUF name -> (bytes or floats as written, type)
    hf_state: dict[str, torch.Tensor]  # HF state dict holding exactly the weights the file stores


def _identity(w: torch.Tensor) -> torch.Tensor:
    return w


def _llama_entries(model: LlamaForCausalLM) -> list[_Entry]:
    c = model.config
    nh, nkv = int(c.num_attention_heads), int(c.num_key_value_heads or c.num_attention_heads)
    out = [_Entry("token_embd.weight", "model.embed_tokens.weight", _identity)]
    for i in range(c.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        out += [
            _Entry(b + "attn_norm.weight", p + "input_layernorm.weight", _identity),
            _Entry(b + "attn_q.weight", p + "self_attn.q_proj.weight", lambda w: permute_rope_rows(w, nh)),
            _Entry(b + "attn_k.weight", p + "self_attn.k_proj.weight", lambda w: permute_rope_rows(w, nkv)),
            _Entry(b + "attn_v.weight", p + "self_attn.v_proj.weight", _identity),
            _Entry(b + "attn_output.weight", p + "self_attn.o_proj.weight", _identity),
            _Entry(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", _identity),
            _Entry(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", _identity),
            _Entry(b + "ffn_up.weight", p + "mlp.up_proj.weight", _identity),
            _Entry(b + "ffn_down.weight", p + "mlp.down_proj.weight", _identity),
        ]
    out.append(_Entry("output_norm.weight", "model.norm.weight", _identity))
    if not c.tie_word_embeddings:
        out.append(_Entry("output.weight", "lm_head.weight", _identity))
    return out


def _gpt2_entries(model: GPT2LMHeadModel, output: bool) -> list[_Entry]:
    c = model.config
    t = "transformer."
    out = [
        _Entry("token_embd.weight", t + "wte.weight", _identity),
        _Entry("position_embd.weight", t + "wpe.weight", _identity),
    ]
    pairs = [
        ("attn_norm", "ln_1", False),
        ("attn_qkv", "attn.c_attn", True),
        ("attn_output", "attn.c_proj", True),
        ("ffn_norm", "ln_2", False),
        ("ffn_up", "mlp.c_fc", True),
        ("ffn_down", "mlp.c_proj", True),
    ]
    for i in range(c.n_layer):
        for ours, theirs, conv in pairs:
            out.append(
                _Entry(
                    f"blk.{i}.{ours}.weight",
                    f"{t}h.{i}.{theirs}.weight",
                    (lambda w: w.t()) if conv else _identity,
                    conv1d=conv,
                )
            )
            out.append(_Entry(f"blk.{i}.{ours}.bias", f"{t}h.{i}.{theirs}.bias", _identity))
    out += [
        _Entry("output_norm.weight", t + "ln_f.weight", _identity),
        _Entry("output_norm.bias", t + "ln_f.bias", _identity),
    ]
    if output:  # llama.cpp's converter writes GPT-2's tied head as its own tensor
        out.append(_Entry("output.weight", "lm_head.weight", _identity))
    return out


Q = GGMLQuantizationType


def _encode(w: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    if qtype == GGMLQuantizationType.F32:
        return w.astype(np.float32)
    if qtype == GGMLQuantizationType.F16:
        return w.astype(np.float16)
    if qtype in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K):  # gguf has no quantizer for them
        return quantize_k(w.astype(np.float32), int(qtype))
    return quantize(w.astype(np.float32), qtype)


def _round_trip(w: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """What reading the stored tensor back gives (float32, same shape)."""
    return np.asarray(dequantize(_encode(w, qtype), qtype), dtype=np.float32).reshape(w.shape)


def write_gguf(
    model: PreTrainedModel,
    path: Path,
    qtype: str = "F32",
    *,
    vocab: TinyVocab | None = None,
    arch: str | None = None,
    drop: Collection[str] = (),
    replace: Mapping[str, np.ndarray] | None = None,
    extra: Mapping[str, np.ndarray] | None = None,
    gpt2_output: bool = True,
    types: Mapping[str, str] | None = None,
) -> TinyGGUF:
    """Write `model` as a GGUF file; 2-D tensors stored as `qtype`, 1-D ones (norms, biases) as F32.

    arch: the general.architecture to write (default: the model's); the hyper-parameter keys use it.
    drop / replace / extra: leave tensors out, store other data under their names, add tensors (F32)
    the layout does not have (to test errors).
    gpt2_output: write GPT-2's tied head as `output.weight`, as llama.cpp's converter does.
    types: other types for the 2-D tensors whose names end so (e.g. {"attn_v.weight": "Q8_0"}, as llama-quantize's
    mixes keep v at more bits).
    """
    model_type = model.config.model_type
    if model_type == "llama":
        entries = _llama_entries(model)  # type: ignore[arg-type]
    elif model_type == "gpt2":
        entries = _gpt2_entries(model, gpt2_output)  # type: ignore[arg-type]
    else:
        raise ValueError(f"no GGUF layout for {model_type!r}")
    arch = arch or model_type
    qt = GGMLQuantizationType[qtype.removesuffix("_M")]
    vocab = vocab or tiny_vocab(model.config.vocab_size)
    replace = dict(replace or {})
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{model_type}")
    w.add_file_type(int(_FILE_TYPES[qtype]))
    if qtype not in ("F32", "F16", "BF16"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if model_type == "llama":
        w.add_block_count(c.num_hidden_layers)
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    else:
        w.add_block_count(c.n_layer)
        w.add_context_length(c.n_positions)
        w.add_embedding_length(c.n_embd)
        w.add_feed_forward_length(c.n_inner or 4 * c.n_embd)
        w.add_head_count(c.n_head)
        w.add_layer_norm_eps(c.layer_norm_epsilon)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    w.add_chat_template(CHAT_TEMPLATE)

    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    written: dict[str, tuple[np.ndarray, GGMLQuantizationType]] = {}
    hf_state = dict(state)
    for e in entries:
        hf = state[e.hf_name]
        g = e.to_gguf(hf).contiguous().numpy()
        t = qt if g.ndim == 2 else GGMLQuantizationType.F32
        if qtype == "Q4_K_M" and e.gguf_name.endswith(_Q6_K_IN_Q4_K_M):
            t = GGMLQuantizationType.Q6_K
        for suffix, other in (types or {}).items():
            if g.ndim == 2 and e.gguf_name.endswith(suffix):
                t = GGMLQuantizationType[other]
        # quantization works on rows of the GGUF layout: a row permutation commutes with it, a transpose not
        rt = torch.from_numpy(_round_trip(g if e.conv1d else hf.numpy(), t))
        hf_state[e.hf_name] = rt.t().contiguous() if e.conv1d else rt
        if e.gguf_name in drop:
            continue
        data = replace.pop(e.gguf_name, None)
        if data is not None:
            g, t = data.astype(np.float32), GGMLQuantizationType.F32
        enc = _encode(g, t)
        written[e.gguf_name] = (enc, t)
        w.add_tensor(
            e.gguf_name, enc, raw_dtype=t if t not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) else None
        )
    if replace:
        raise KeyError(f"no tensors named {sorted(replace)}")
    for name, data in (extra or {}).items():
        written[name] = (data.astype(np.float32), GGMLQuantizationType.F32)
        w.add_tensor(name, data.astype(np.float32))
    if getattr(c, "tie_word_embeddings", False):  # HF's tied head is the (round-tripped) embedding
        emb = "model.embed_tokens.weight" if model_type == "llama" else "transformer.wte.weight"
        hf_state["lm_head.weight"] = hf_state[emb]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return TinyGGUF(path, written, hf_state)


def hf_with_state(model: PreTrainedModel, state: Mapping[str, torch.Tensor]) -> PreTrainedModel:
    """A copy of `model` (same class and config) holding `state`."""
    clone = type(model)(model.config)
    clone.load_state_dict(dict(state), strict=True)
    return clone.eval()
