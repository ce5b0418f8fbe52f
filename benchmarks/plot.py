"""PNG plots of a benchmark run: output throughput and TTFT p50 against concurrency, one line per system.

python -m benchmarks.plot benchmarks/results/<timestamp>.json [--out-dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _concurrency_levels(levels: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The closed-loop levels (no Poisson rate), sorted by concurrency."""
    pts = [lv for lv in levels if lv.get("request_rate") is None and lv.get("max_concurrency")]
    return sorted(pts, key=lambda lv: lv["max_concurrency"])


def _plot(
    systems: Mapping[str, Sequence[Mapping[str, Any]]],
    key: str,
    ylabel: str,
    title: str,
    path: str,
    scale: float = 1.0,
    logy: bool = False,
) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ticks: set[int] = set()
    for name, levels in systems.items():
        pts = [lv for lv in _concurrency_levels(levels) if lv.get(key) is not None and lv.get("completed")]
        ticks.update(lv["max_concurrency"] for lv in pts)
        if pts:
            ax.plot([lv["max_concurrency"] for lv in pts], [lv[key] * scale for lv in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    if logy:
        ax.set_yscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_lines():
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_run(run: Mapping[str, Any], out_dir: str) -> list[str]:
    """Write throughput.png and ttft.png for a run dict (as written by benchmarks.run); return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    systems = {name: s["levels"] for name, s in run["systems"].items() if s.get("levels")}
    meta = run.get("meta", {})
    sub = (
        f"{meta.get('prompt_set', '')}, {meta.get('output_len', '?')} output tokens, {meta.get('threads', '?')} threads"
    )
    return [
        _plot(
            systems,
            "output_throughput",
            "output tokens/s",
            f"Output throughput ({sub})",
            os.path.join(out_dir, "throughput.png"),
        ),
        _plot(
            systems,
            "median_ttft_ms",
            "TTFT p50 (s)",
            f"Time to first token ({sub})",
            os.path.join(out_dir, "ttft.png"),
            scale=1e-3,
            logy=True,
        ),
    ]


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.split("\n")[0])
    ap.add_argument("results", help="a results JSON written by benchmarks.run")
    ap.add_argument("--out-dir", default=None, help="default: the JSON's folder")
    a = ap.parse_args(argv)
    with open(a.results) as f:
        run = json.load(f)
    for p in plot_run(run, a.out_dir or os.path.dirname(os.path.abspath(a.results))):
        print(p)


if __name__ == "__main__":
    main()
