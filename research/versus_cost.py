"""What auto-tune's prompted comparison (issue 23, `quality.versus_prompted`) adds to one search.

    python research/versus_cost.py

Three searches on the embedded SmolLM2-135M (fp32, CPU, the defaults: the middle layer x three
coefficients on the prompt and four probes, 40 tokens), each with prompted=True; the comparison
is timed inside the same call, so load from other processes between calls does not enter the share.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import load_engine  # noqa: E402  (research/quality.py)

from steering import quality as Q  # noqa: E402

CASES = (
    ("Give me a tip for staying organised at work.", "the ocean"),
    ("Tell me about your weekend.", "music"),
    ("What should I cook tonight?", "space"),
)


def main() -> None:
    engine = load_engine()
    original, spent = Q.versus_prompted, []

    def timed(*args, **kwargs):
        started = time.perf_counter()
        result = original(*args, **kwargs)
        spent.append(time.perf_counter() - started)
        return result

    Q.versus_prompted = timed
    Q.autotune(engine, "Hi", text="dogs", max_new_tokens=4, probes=())  # warm up
    for prompt, text in CASES:
        started = time.perf_counter()
        result = Q.autotune(engine, prompt, text=text, prompted=True)
        total = time.perf_counter() - started
        search = total - spent[-1]
        print(
            f"{text}: search {search:.1f} s, prompted comparison {spent[-1]:.1f} s (+{spent[-1] / search:.0%}); "
            f"{result['versus_prompted']['verdict']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
