"""Fixed, deterministic prompt sets for serving benchmarks (no downloads).

Every request gets a distinct prompt (so no system wins by caching one repeated prompt), yet the
set is the same on every run and for every system:

- ``short_chat``: ChatML-formatted short questions (~30-45 prompt tokens).
- ``long_prompt``: a ~1,000-token document followed by a question about it (prefill-heavy).
- ``shared_system``: one long (~500-token) system prompt shared by all requests, then a short
  question (rewards prefix caching, where a server has it).
- ``grounded``: input-grounded requests whose answers copy from the prompt (~250-300 prompt tokens): a
  small Python file to show again with a function renamed, or a passage to quote word for word, each
  longer than 128 output tokens (what n-gram speculative decoding is for; ``benchmarks/grounded.py``).

Prompts are plain text for the completions endpoint; ChatML special tokens written in the text are
parsed as special tokens by all three systems under test.
"""

from __future__ import annotations

import random

from benchmarks.grounded import code_file, passage

PROMPT_SETS = ("short_chat", "long_prompt", "shared_system", "grounded")

_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

_TOPICS = (
    "photosynthesis",
    "the water cycle",
    "volcanoes",
    "black holes",
    "the Roman Empire",
    "bread baking",
    "electric cars",
    "honey bees",
    "the human heart",
    "ocean tides",
    "the printing press",
    "rainbows",
    "chess openings",
    "compound interest",
    "vaccines",
    "plate tectonics",
    "jazz music",
    "the Moon landing",
    "recycling plastic",
    "solar panels",
    "migrating birds",
    "coffee roasting",
    "glaciers",
    "the internet",
    "earthquakes",
    "penguins",
    "the Olympic games",
    "wind turbines",
    "sourdough starters",
    "coral reefs",
    "the Great Wall of China",
    "lightning",
)

_QUESTIONS = (
    "Explain {t} to a ten-year-old.",
    "What are three surprising facts about {t}?",
    "Write a short poem about {t}.",
    "Why is {t} important?",
    "Give me a one-paragraph history of {t}.",
    "What is a common misconception about {t}?",
    "How would you teach a class about {t}?",
    "Summarise what scientists know about {t}.",
)

_SUBJECTS = (
    "The committee",
    "A small team of engineers",
    "The old harbour town",
    "Our research group",
    "The city council",
    "A travelling musician",
    "The village library",
    "The mountain observatory",
    "A local farmer",
    "The night-shift nurse",
    "The museum curator",
    "A young inventor",
)
_VERBS = (
    "reviewed",
    "discovered",
    "rebuilt",
    "questioned",
    "documented",
    "celebrated",
    "measured",
    "repaired",
    "described",
    "planned",
    "compared",
    "explained",
)
_OBJECTS = (
    "the annual budget",
    "an unusual pattern in the data",
    "the bridge over the river",
    "the results of the long experiment",
    "a forgotten manuscript",
    "the new irrigation system",
    "the schedule for the coming winter",
    "the causes of the flood",
    "a map of the northern coast",
    "the design of a quieter engine",
    "the history of the market square",
    "the cost of the repairs",
)
_TAILS = (
    "after a long debate.",
    "with great care.",
    "before the storm arrived.",
    "despite the cold weather.",
    "for the first time in decades.",
    "to everyone's surprise.",
    "in less than a week.",
    "using only simple tools.",
    "while the town slept.",
    "as the season changed.",
)

_SHARED_RULES = (
    "Answer in clear, plain English and keep the tone friendly and professional.",
    "If a question is ambiguous, state the most reasonable interpretation and answer that.",
    "Prefer short paragraphs; use a bulleted list when you enumerate more than three items.",
    "Never invent citations, statistics, names or dates; say so when you are not sure.",
    "When you explain a process, describe the steps in order and say why each step matters.",
    "Use metric units first, and give imperial units in brackets when they help the reader.",
    "Do not give medical, legal or financial advice; suggest consulting a qualified professional.",
    "When asked for code, give a short runnable example and explain what it does.",
    "Keep answers under two hundred words unless the user explicitly asks for more detail.",
    "Be kind to beginners: define technical terms the first time you use them.",
    "If the user writes in another language, answer in that language.",
    "End with one follow-up question only when it would genuinely help the user.",
)


def chatml(user: str, system: str = _SYSTEM) -> str:
    """A ChatML conversation ready for the assistant's turn (SmolLM2's template)."""
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def question(i: int) -> str:
    """The i-th of a fixed list of short questions."""
    t = _TOPICS[i % len(_TOPICS)]
    q = _QUESTIONS[(i // len(_TOPICS)) % len(_QUESTIONS)]
    n = i // (len(_TOPICS) * len(_QUESTIONS))
    return q.format(t=t) + (f" (variant {n})" if n else "")


def document(i: int, n_sentences: int) -> str:
    """A fixed pseudo-report of n_sentences sentences (about 20 tokens each), the same for the same i."""
    rng = random.Random(1000 + i)
    sentences = [
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
        for _ in range(n_sentences)
    ]
    paragraphs = [" ".join(sentences[k : k + 6]) for k in range(0, n_sentences, 6)]
    return "\n\n".join(paragraphs)


def shared_system_prompt(long: bool = False) -> str:
    """The help desk's system prompt: about 540 tokens, or with `long` about 1,600."""
    rules = "\n".join(f"{k + 1}. {r}" for k, r in enumerate(_SHARED_RULES))
    return (
        f"{_SYSTEM}. You work for a public library's help desk and answer visitors' questions.\n"
        f"Follow these rules in every answer:\n{rules}\n"
        f"Background for the help desk:\n{document(-1, 86 if long else 16)}"
    )


def grounded(i: int) -> str:
    """The i-th input-grounded request: even i, a small Python file to repeat with a function renamed; odd i, a
    passage to copy word for word (benchmarks/grounded.py: both longer than 128 output tokens)."""
    if i % 2 == 0:
        code, old, new = code_file(i // 2)
        # (phrasings where this asks first and shows the file after, the 135M model mostly explains the code)
        return f"```python\n{code}```\n\nRepeat the code above in full, with the function `{old}` renamed to `{new}`."
    return f"Copy the following passage exactly, word for word:\n\n{passage(i // 2)}"


def make_prompts(name: str, n: int) -> list[str]:
    """`n` distinct prompts of prompt set `name` (one of PROMPT_SETS); the same on every call."""
    if n < 0:
        raise ValueError("n must be >= 0")
    if name == "short_chat":
        return [chatml(question(i)) for i in range(n)]
    if name == "long_prompt":
        return [
            chatml(
                f"Read the following report.\n\n{document(i, 64)}\n\nWhat is the main theme of the report? "
                f"({question(i)})"
            )
            for i in range(n)
        ]
    if name == "shared_system":
        system = shared_system_prompt()
        return [chatml(question(i), system=system) for i in range(n)]
    if name == "grounded":
        return [chatml(grounded(i)) for i in range(n)]
    raise ValueError(f"unknown prompt set {name!r}; expected one of {', '.join(PROMPT_SETS)}")
