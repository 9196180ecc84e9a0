"""Steering with trained vectors vs the topic's text alone (issue 22), by bench/quality.py's rule.

Run through `python bench/train.py --stage steer`. For every topic of bench/quality_set.json,
quality_fresh.json and quality_fresh2.json, a mean_diff vector is trained at the middle layer from
the topic's 8 example sentences of bench/train_topics.json (against the built-in neutral texts; a
pair topic against its 8 negative sentences); the layer `train(layer=None)` would choose is
recorded. Then on the first PROMPTS of the topic's six prompts, as rows of one greedy 40-token
batch: the unsteered baseline, the topic's own text (or pair) vector at the app's default (middle
layer, coeff 1.0, positions "prompt") and the trained vector at the middle layer x COEFFS.
An output is good when it is on topic (the topic's word list, whole words) and fluent
(`steering.quality.is_fluent`), the rule of docs/quality.md.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETS = ("quality_set.json", "quality_fresh.json", "quality_fresh2.json")
COEFFS = (0.25, 0.5, 0.75)  # a first run at 1 and 2 looped on ocean and music (0 of 6 good)
PROMPTS = 3  # of each topic's six: the 2-core machine is shared (about 15 minutes for 16 topics)
TOKENS = 40


def steering(engine, save=None) -> dict:
    """The report; `save(report)` is called after each topic (a partial run keeps what it did)."""
    from quality import on_topic  # bench/quality.py's rule (this folder is on sys.path)

    from steering import generate as G
    from steering import limits, training
    from steering import quality as Q
    from steering.engine import VectorSpec, parse_vector

    examples = json.loads((HERE / "train_topics.json").read_text())["topics"]
    middle = engine.n_layers // 2
    good: dict[str, dict[str, list[bool]]] = {}
    report: dict = {"coeffs": list(COEFFS), "middle_layer": middle, "max_new_tokens": TOKENS, "topics": {}}
    for set_name in SETS:
        for topic in json.loads((HERE / set_name).read_text())["topics"]:
            started = time.time()
            data = examples[topic["name"]]
            trained_mid = training.train(engine, data["positives"], data.get("negatives", ()), "mean_diff", middle)
            trained_auto = training.train(engine, data["positives"], data.get("negatives", ()), "mean_diff", None)
            own = {k: topic[k] for k in ("text", "positive", "negative") if k in topic}
            rows = {"baseline": [], "text": [(VectorSpec(layer=middle, coeff=1.0, **own), limits.DEFAULT_COEFF)]}
            mid_spec = parse_vector(trained_mid["vector"], 0, engine.n_layers)
            rows.update({f"trained@{middle}x{c:g}": [(mid_spec, c)] for c in COEFFS})
            outputs = []
            for p, prompt in enumerate(topic["prompts"][:PROMPTS]):
                final = G.run_rows(engine, prompt, list(rows.values()), G.Sampling(max_new_tokens=TOKENS))
                ppl = Q.output_perplexities(engine, G.prompt_ids(engine.tokenizer, prompt), final.token_ids)
                for name, text, ids, pp in zip(rows, final.texts, final.token_ids, ppl):
                    rep = Q.repetition(ids)
                    fluent, on = Q.is_fluent(pp, rep, len(ids)), on_topic(text, topic["words"])
                    good.setdefault(set_name, {}).setdefault(name, []).append(fluent and on)
                    outputs.append({"prompt": p, "row": name, "text": text, "on_topic": on, "fluent": fluent,
                                    "perplexity": pp, "repetition": round(rep, 3)})  # fmt: skip
            report["topics"][topic["name"]] = {
                "set": set_name,
                "chosen_layer": trained_auto["layer"],
                "auroc_chosen": trained_auto["auroc"],
                "auroc_middle": trained_mid["auroc"],
                "good": {r: sum(o["on_topic"] and o["fluent"] for o in outputs if o["row"] == r) for r in rows},
                "outputs": outputs,
            }
            if save is not None:
                save({**report, "rates": _rates(good)})
            print(f"  {topic['name']}: {report['topics'][topic['name']]['good']} ({time.time() - started:.0f} s)",
                  file=sys.stderr, flush=True)  # fmt: skip
    report["rates"] = _rates(good)
    return report


def _rates(good: dict) -> dict:
    """On-topic-and-fluent rate and count per set and row, and over every set ("all")."""
    rates = {s: {k: [round(sum(v) / len(v), 3), len(v)] for k, v in rows.items()} for s, rows in good.items()}
    every: dict[str, list[bool]] = {}
    for rows in good.values():
        for k, v in rows.items():
            every.setdefault(k, []).extend(v)
    rates["all"] = {k: [round(sum(v) / len(v), 3), len(v)] for k, v in every.items()}
    return rates
