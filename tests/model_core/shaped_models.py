"""A random-weight GGUF (F32) in the shape of a real model of another family, for speed benchmarks against
llama-server on the same file (requantize it with llama-quantize): Qwen2.5-0.5B (`qwen2`), Qwen3-0.6B (`qwen3`),
Qwen3-1.7B (`qwen3-1.7b`) or Gemma-3-1B (`gemma3`) sizes, with SmolLM2's tokenizer and vocabulary (49152 tokens, so
that both servers run the benchmark's text prompts; the real models' vocabularies are 151936 and 262144), written as
llama.cpp's converter writes the family (tests/model_core/families.py).

    python -m tests.model_core.shaped_models qwen2 /tmp/qwen2-f32.gguf
"""

import sys
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from model_core.default_model import find_default_model
from model_core.weights.gguf_reader import read_metadata
from tests.model_core.families import FAMILIES, gguf_tensors, hparam_calls

V = 49152


def main(which: str, out: Path) -> None:
    if which == "qwen2":
        cfg = Qwen2Config(
            vocab_size=V,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        )
        model = Qwen2ForCausalLM(cfg)
        fam = FAMILIES["qwen2"]
    elif which in ("qwen3", "qwen3-1.7b"):
        big = which == "qwen3-1.7b"
        cfg = Qwen3Config(
            vocab_size=V,
            hidden_size=2048 if big else 1024,
            intermediate_size=6144 if big else 3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=40960,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        )
        model = Qwen3ForCausalLM(cfg)
        fam = FAMILIES["qwen3"]
    else:
        cfg = Gemma3TextConfig(
            vocab_size=V,
            hidden_size=1152,
            intermediate_size=6912,
            num_hidden_layers=26,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=512,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 4 + ["sliding_attention"] * 2,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            },
        )
        model = Gemma3ForCausalLM(cfg)
        fam = FAMILIES["gemma3"]
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
            else:  # norms at their identity (Gemma's stores w for 1 + w)
                p.fill_(0.0 if fam.norm_plus_one else 1.0)
    model.eval()
    meta = read_metadata(find_default_model())
    w = gguf.GGUFWriter(str(out), fam.arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(f"random-{which}-shaped")
    for method, args in hparam_calls(fam, model.config):
        getattr(w, method)(*args)
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(list(meta["tokenizer.ggml.tokens"]))
    w.add_token_types([int(t) for t in meta["tokenizer.ggml.token_type"]])
    w.add_token_merges(list(meta["tokenizer.ggml.merges"]))
    w.add_bos_token_id(int(meta["tokenizer.ggml.bos_token_id"]))
    w.add_eos_token_id(int(meta["tokenizer.ggml.eos_token_id"]))
    w.add_chat_template(str(meta["tokenizer.chat_template"]))
    for name, data in gguf_tensors(fam, model).items():
        w.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print("wrote", out)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
