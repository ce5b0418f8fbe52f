"""The `grounded` prompt set's material: small Python files to rewrite and prose passages to quote, each longer
than a benchmark's usual 128 output tokens, so that an answer copies from its prompt for as long as it runs (what
prompt-lookup speculative decoding is for: code edits, quoting, extraction).

The functions and paragraphs are written for this benchmark (no downloads) and distinct from one another, as
files and documents are: a lookup of the last few tokens finds the one place they came from, not one of many
sentences built from the same fragments.
"""

from __future__ import annotations

import itertools

# (name, source): ordinary helpers, one concept each, ~40-70 tokens
FUNCTIONS = (
    (
        "mean",
        'def mean(values):\n    """Return the arithmetic mean of values."""\n    if not values:\n'
        '        raise ValueError("values must not be empty")\n    return sum(values) / len(values)\n',
    ),
    (
        "clamp",
        'def clamp(x, low, high):\n    """Limit x to the closed interval [low, high]."""\n    if low > high:\n'
        '        raise ValueError("low must not exceed high")\n    return max(low, min(x, high))\n',
    ),
    (
        "chunked",
        'def chunked(items, size):\n    """Split items into lists of at most size elements."""\n'
        "    return [items[i : i + size] for i in range(0, len(items), size)]\n",
    ),
    (
        "word_counts",
        'def word_counts(text):\n    """Count how often each lower-case word occurs in text."""\n    counts = {}\n'
        "    for word in text.lower().split():\n        counts[word] = counts.get(word, 0) + 1\n    return counts\n",
    ),
    (
        "is_palindrome",
        'def is_palindrome(s):\n    """Tell whether s reads the same backwards, ignoring case and spaces."""\n'
        '    cleaned = "".join(ch.lower() for ch in s if not ch.isspace())\n    return cleaned == cleaned[::-1]\n',
    ),
    (
        "flatten",
        'def flatten(nested):\n    """Return the elements of a list of lists as one list."""\n    out = []\n'
        "    for inner in nested:\n        out.extend(inner)\n    return out\n",
    ),
    (
        "parse_pairs",
        'def parse_pairs(line):\n    """Parse "key=value" pairs separated by commas into a dict."""\n    result = {}\n'
        '    for part in line.split(","):\n        key, _, value = part.partition("=")\n'
        "        result[key.strip()] = value.strip()\n    return result\n",
    ),
    (
        "fahrenheit",
        'def fahrenheit(celsius):\n    """Convert a temperature from degrees Celsius to Fahrenheit."""\n'
        "    return celsius * 9 / 5 + 32\n",
    ),
    (
        "median",
        'def median(values):\n    """Return the middle value of values (for an even count, the mean of two)."""\n'
        "    ordered = sorted(values)\n    mid = len(ordered) // 2\n    if len(ordered) % 2:\n"
        "        return ordered[mid]\n    return (ordered[mid - 1] + ordered[mid]) / 2\n",
    ),
    (
        "retry",
        'def retry(action, attempts=3):\n    """Call action until it succeeds, at most attempts times."""\n'
        "    for attempt in range(attempts):\n        try:\n            return action()\n"
        "        except OSError:\n            if attempt == attempts - 1:\n                raise\n",
    ),
)

# prose paragraphs on unrelated subjects, ~70-90 tokens each
PARAGRAPHS = (
    "The old lighthouse on the northern cape was built in 1871 from granite quarried two miles inland. Its keeper "
    "lived in a small cottage beside the tower with his wife and three children, and every evening he climbed one "
    "hundred and twelve steps to light the lamp.",
    "When the light was automated in 1962, the cottage stood empty for almost twenty years. A group of volunteers "
    "from the nearby village then restored the roof, repainted the walls and opened a small museum that is still "
    "run by their grandchildren.",
    "Sourdough bread rises without any added yeast. A starter of flour and water, fed every day, collects wild "
    "yeasts and lactic bacteria from the air and the grain; they make the dough sour, give it a chewy crust and "
    "let it keep for several days.",
    "The committee met on a rainy Thursday to decide how the new library should be heated. After two hours of "
    "discussion they chose ground-source heat pumps, which cost more to install but less to run, and asked the "
    "architect for revised drawings by March.",
    "Honey bees tell each other where to find flowers by dancing. A forager returning to the hive walks a figure "
    "of eight, and the angle of the straight part against the vertical shows the direction of the food relative "
    "to the sun.",
    "Our train left the coast at dawn and climbed slowly through pine forests and narrow tunnels. By noon the "
    "valleys were white with snow, and the conductor brought hot chocolate to every compartment while we waited "
    "for the line to be cleared.",
    "Glaciers move because ice deforms under its own weight. Near the bed the pressure melts a thin film of "
    "water, and the whole mass slides downhill a few centimetres a day, carving wide valleys shaped like the "
    "letter U.",
    "The museum's new exhibition shows maps drawn between the fifteenth and the eighteenth centuries. Visitors "
    "can compare how the coastline of Africa was imagined by sailors from Lisbon, Venice and Amsterdam, and see "
    "the errors slowly disappear.",
    "To repot a cactus, wear thick gloves or wrap it in folded newspaper. Tip the old pot, loosen the roots "
    "gently, set the plant at the same depth in a slightly larger pot of gritty soil, and wait a week before "
    "watering it.",
    "The orchestra rehearsed the symphony for six weeks before the opening night. The conductor asked the "
    "strings to play the slow movement almost in a whisper, so that the entrance of the horns in the last bars "
    "would fill the whole hall.",
    "Tides are raised mainly by the Moon's gravity, which pulls the oceans slightly towards it on the near side "
    "of the Earth and leaves a second bulge on the far side. Most coasts therefore see two high tides a day.",
    "The football club's youth team trained three evenings a week on a muddy pitch behind the school. Their coach, "
    "a retired postman, taught them to pass the ball quickly and to thank the referee after every match, win or "
    "lose.",
)

_NEW_NAMES = ("compute", "helper", "process", "transform", "calculate", "handle")


def code_file(i: int) -> tuple[str, str, str]:
    """The i-th small Python file (four of FUNCTIONS, ~200-280 tokens), the name of one of its functions and a new
    name for it: distinct for i < 5040."""
    orders = list(itertools.permutations(range(len(FUNCTIONS)), 4))
    chosen = [FUNCTIONS[k] for k in orders[(i * 7919) % len(orders)]]
    old = chosen[i % 4][0]
    new = f"{_NEW_NAMES[i % len(_NEW_NAMES)]}_{old}"
    return "\n\n".join(src for _, src in chosen), old, new


def passage(i: int) -> str:
    """The i-th passage: three of PARAGRAPHS (~220-270 tokens), distinct for i < 1320."""
    orders = list(itertools.permutations(range(len(PARAGRAPHS)), 3))
    return "\n\n".join(PARAGRAPHS[k] for k in orders[(i * 7919) % len(orders)])
