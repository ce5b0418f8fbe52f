"""The loaded LM as the text routes see it."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from model_core.grammar import GrammarCompiler
from model_core.tokenizer import Tokenizer
from service.engine.engine import LLMEngine


@dataclass
class TextModel:
    """What the text routes need to know of the LM: its engine, tokenizer and limits (ServerState.text_model, set once
    it has loaded)."""

    engine: LLMEngine
    tokenizer: Tokenizer
    name: str
    max_model_len: int
    vocab_size: int
    created: int
    load_seconds: float = 0.0
    dtype: str = "float32"  # of the weights and activations
    kernels: str = "torch"  # what runs decode steps: a native ISA build (avx2, avx512bf16, neon...) or torch
    batch_invariant: bool = False  # each token's logits the same in any batch (model_core.lm)
    lora: str | None = None  # the LoRA adapter its requests run with: a view of its base model (`for_adapter`)
    _grammars: list[GrammarCompiler] = field(default_factory=list, repr=False)  # shared by the base and its views

    def __post_init__(self) -> None:
        self.max_prompt_chars = self.max_model_len * self.tokenizer.max_token_bytes

    @property
    def grammars(self) -> GrammarCompiler:
        """Compiles (and caches) output grammars for this tokenizer; built on first use, off the event loop
        (`service.api.structured.compile_grammar`)."""
        if not self._grammars:
            self._grammars.append(GrammarCompiler(self.tokenizer, self.vocab_size))
        return self._grammars[0]

    @grammars.setter
    def grammars(self, compiler: GrammarCompiler) -> None:
        """Use `compiler` (other bounds or limits: tests, embedding) for this model and its adapters' views."""
        self._grammars[:] = [compiler]

    def for_adapter(self, name: str) -> TextModel:
        """This model as the LoRA adapter `name` serves it: the same engine, tokenizer and grammar cache; requests
        run with the adapter, and replies name it."""
        view = copy.copy(self)
        view.name = view.lora = name
        return view
