"""Constrained decoding through the batched engine (tiny random llama with the real SmolLM2 tokenizer)."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest
import torch

from model_core.grammar import CompiledGrammar, GrammarCompiler, GrammarMatcher, GrammarSpec, apply_token_masks
from model_core.sampling import SamplingParams
from service.engine.engine import LLMEngine, TokenEvent
from service.engine.errors import EngineError, ErrorKind
from tests.service.engine.engine_utils import make_engine

WEATHER = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "minLength": 1, "maxLength": 8},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["location", "unit", "days"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def compiler(smol_tokenizer, tiny_model) -> GrammarCompiler:
    return GrammarCompiler(smol_tokenizer, tiny_model.cfg.vocab_size)


@pytest.fixture(scope="module")
def engine(tiny_model, smol_tokenizer):
    eng = make_engine(tiny_model, smol_tokenizer)
    yield eng
    eng.stop()


Job = tuple[list[int], SamplingParams, CompiledGrammar | None]


def run(engine: LLMEngine, jobs: list[Job]) -> list[list[TokenEvent]]:
    async def one(prompt, params, grammar):
        return [ev async for ev in engine.generate(prompt, params, grammar=grammar)]

    async def main():
        return list(await asyncio.gather(*(one(*job) for job in jobs)))

    return asyncio.run(main())


def text_of(events: list[TokenEvent]) -> str:
    return "".join(e.text for e in events)


def prompt(tok, text: str = "What is the weather in Paris? Answer in JSON.") -> list[int]:
    return tok.encode(text)


def test_sampled_constrained_requests_give_valid_json(engine, compiler, smol_tokenizer):
    """Temperature 1, several samples of one prompt (n > 1) and top-k/top-p: each output is a valid
    document (bounded schema, so every request ends with "stop" well within max_tokens)."""
    grammar = compiler.compile(GrammarSpec.json_schema(WEATHER))
    p = prompt(smol_tokenizer)
    jobs = [
        (
            p,
            SamplingParams(max_tokens=300, temperature=1.0, seed=s, top_k=(0, 50)[s % 2], top_p=(1.0, 0.9)[s % 2]),
            grammar,
        )
        for s in range(6)
    ]
    outs = run(engine, jobs)
    texts = set()
    for events in outs:
        assert events[-1].finish_reason == "stop", events[-1]
        doc = json.loads(text_of(events))
        jsonschema.validate(doc, WEATHER)
        texts.add(text_of(events))
    assert len(texts) > 1, "seeded samples should differ"
    assert engine.scheduler.kv_usage == 0.0


def test_unconstrained_greedy_row_is_unchanged_by_constrained_neighbours(engine, compiler, smol_tokenizer):
    p = prompt(smol_tokenizer, "Once upon a time")
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    alone = run(engine, [(p, greedy, None)])[0]
    grammar = compiler.compile(GrammarSpec.json_object())
    mixed = run(
        engine,
        [(p, SamplingParams(max_tokens=24, temperature=50.0, seed=i), grammar) for i in range(3)] + [(p, greedy, None)],
    )
    assert [e.token_id for e in mixed[-1]] == [e.token_id for e in alone]
    assert text_of(mixed[-1]) == text_of(alone)


def test_greedy_constrained_picks_the_argmax_of_the_allowed_tokens(engine, compiler, smol_tokenizer, tiny_model):
    grammar = compiler.compile(GrammarSpec.json_schema(WEATHER))
    p = prompt(smol_tokenizer)
    events = run(engine, [(p, SamplingParams(max_tokens=300, temperature=0.0), grammar)])[0]
    assert events[-1].finish_reason == "stop"
    jsonschema.validate(json.loads(text_of(events)), WEATHER)
    out = [e.token_id for e in events if e.token_id not in smol_tokenizer.eos_token_ids]
    with torch.inference_mode():
        logits = tiny_model(torch.tensor([p + out]))[0, len(p) - 1 :].float()  # (len(out) + 1, V)
    m: GrammarMatcher = grammar.matcher()
    for i, t in enumerate(out):
        row = logits[i : i + 1].clone()
        apply_token_masks(row, [m])
        assert torch.isfinite(row[0, t])
        assert row[0, t] >= row.max() - 1e-3  # the best allowed token (up to cached-vs-full forward rounding)
        assert m.accept(t)
    assert m.is_terminated


def test_grammar_end_overrides_ignore_eos_and_min_tokens(engine, compiler, smol_tokenizer):
    """The request stops as soon as the grammar is complete, whatever min_tokens and ignore_eos say."""
    options = ["yes", "no", "maybe later"]
    grammar = compiler.compile(GrammarSpec.choice(options))
    p = prompt(smol_tokenizer, "Is it raining?")
    jobs = [
        (p, SamplingParams(max_tokens=50, temperature=1.0, seed=s, ignore_eos=s % 2 == 0, min_tokens=20), grammar)
        for s in range(4)
    ]
    for events in run(engine, jobs):
        assert events[-1].finish_reason == "stop"
        assert text_of(events) in options
        assert len(events) < 20


def test_regex_with_eos_when_accepting(engine, compiler, smol_tokenizer):
    """An open-ended grammar: the output stops on EOS (allowed once it matches) or at max_tokens."""
    grammar = compiler.compile(GrammarSpec.regex(r"[0-9]+(\.[0-9]+)?"))
    p = prompt(smol_tokenizer, "Pi is about")
    for events in run(engine, [(p, SamplingParams(max_tokens=12, temperature=1.0, seed=s), grammar) for s in range(4)]):
        text = text_of(events)
        if events[-1].finish_reason == "stop":
            assert re.fullmatch(r"[0-9]+(\.[0-9]+)?", text)  # a complete match
        else:
            assert events[-1].finish_reason == "length" and len(events) == 12
        assert re.fullmatch(r"[0-9]+(\.[0-9]*)?", text)  # a prefix of a match


def test_logprobs_of_constrained_rows_are_the_models(engine, compiler, smol_tokenizer):
    grammar = compiler.compile(GrammarSpec.choice(["yes", "no"]))
    p = prompt(smol_tokenizer, "Is it raining?")
    events = run(engine, [(p, SamplingParams(max_tokens=5, temperature=0.0, logprobs=2), grammar)])[0]
    assert events[-1].finish_reason == "stop" and text_of(events) in ("yes", "no")
    for e in events:
        assert e.logprob is not None and e.logprob <= 0.0 and len(e.top_logprobs) == 2


def test_grammar_for_another_vocab_is_refused(engine, smol_tokenizer):
    other = GrammarCompiler(smol_tokenizer, smol_tokenizer.vocab_size + 32).compile(GrammarSpec.json_object())
    with pytest.raises(EngineError, match="logits"):
        run(engine, [(prompt(smol_tokenizer), SamplingParams(max_tokens=4), other)])


def test_a_grammar_the_vocabulary_cannot_spell_ends_in_an_error(engine, compiler, smol_tokenizer):
    """No SmolLM2 token starts with the byte F1, the lead byte of U+40000: the request fails cleanly (the
    engine's mask then allows a token its matcher rejects) instead of producing text outside the grammar."""
    grammar = compiler.compile(GrammarSpec.choice(["\U00040000"]))
    events = run(engine, [(prompt(smol_tokenizer), SamplingParams(max_tokens=8, temperature=0.0), grammar)])[0]
    err = events[-1].error
    assert events[-1].finish_reason == "error" and err is not None and err.kind is ErrorKind.INVALID_REQUEST
    assert "constrained decoding failed" in err.message
    assert engine.scheduler.kv_usage == 0.0


def test_a_token_the_mask_allows_but_the_parser_refuses_is_resampled(engine, compiler, smol_tokenizer):
    """Choices that split multi-byte UTF-8 characters across byte tokens (found by the API fuzzer): llguidance's
    mask can allow a byte token its parser then refuses. The runner checks each sampled token and samples
    again; where the parser accepts no token at all the request ends with a client error, never with a token
    outside the grammar and never a server error."""
    choices = json.loads(r"""["\udba6\ude29\u00f1", "\u00c3", "\u00cc", "\udbb4\udd0d(\u00bf8",
        "\u009d\u0015\u00a6\ud8b2\ude5c\u00d2", "\u00bb|\u00d1\u0010\u00f1\u00ad\ud99f\ude24P\u0098\u00df",
        "\u00d6M\u00d7h\udb2d\udcdc", "3\udb86\ude57", "\u00da",
        "\u0002\ud937\udd1cM\udb57\udd32.\u009a\u0081\u008a\ud97b\udd88"]""")
    grammar = compiler.compile(GrammarSpec.choice(choices))
    # a high temperature: near-uniform over the allowed tokens, where the refused byte tokens are often drawn
    jobs = [
        (prompt(smol_tokenizer, f"Pick {i}"), SamplingParams(max_tokens=40, temperature=50.0, seed=i), grammar)
        for i in range(32)
    ]
    outcomes = {"stop": 0, "refused": 0}
    for events in run(engine, jobs):
        if events[-1].finish_reason == "stop":
            assert text_of(events) in choices
            outcomes["stop"] += 1
        else:  # where llguidance's parser accepts no token at all: a client error naming why, never a bad token
            err = events[-1].error
            assert err is not None and err.kind is ErrorKind.INVALID_REQUEST and "grammar engine cannot" in err.message
            outcomes["refused"] += 1
    assert outcomes["stop"] > 0, outcomes
