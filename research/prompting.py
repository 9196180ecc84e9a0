"""Issue 23's measurement: steering (the defaults) beside simply asking (the prompted row).

    python research/prompting.py --stage generate   # outputs + scores of every prompt, all three sets
    python research/prompting.py --sample 72        # print a seeded sample to label by eye
    python research/prompting.py --stage report     # agreement with the eye labels + the table
    python research/prompting.py --stage away       # steering away vs asking not to, where the prompt asks

Stage generate: for every prompt of `research/data/quality_set.json`, `quality_fresh.json` and
`quality_fresh2.json` (16 topics x 6 prompts), the app's own `/steer(prompted=True)` rows as one
batch on the embedded SmolLM2-135M (fp32, greedy, 40 new tokens, the defaults: layer 15 = the middle,
coefficient `limits.DEFAULT_COEFF`, positions "prompt", capture "contexts"): steered, baseline and
prompted, each scored by `steering.quality.compare_scores` (raw values kept, so the bins can be
re-chosen without generating again), plus the word-list label (`research/quality.py` on_topic)
and one alternative instruction proxy ("prompt_after": the prompt's log-prob per token read after
the output and "\\n\\nThe question this answers:"). Written to research/out/prompting_outputs.json.

Stage report: each proxy's bins against the eye labels of `research/data/prompting_eye_labels.json`
(exact agreement and within-one, and the 0-vs-nonzero agreement that decides the aggregate), and per
set and row: on-topic-and-fluent rate and mean aggregate score. Written to research/results/prompting.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import DATA, RESULTS, load_engine, on_topic  # noqa: E402  (research/quality.py)

from steering import limits  # noqa: E402

SETS = {"labelled": "quality_set.json", "fresh": "quality_fresh.json", "fresh2": "quality_fresh2.json"}
ROWS = ("steered", "baseline", "prompted")
LAYER = 15  # the embedded model's default layer (30 layers // 2)
TOKENS = 40
OUTPUTS = RESULTS / "prompting_outputs.json"
LABELS = DATA / "prompting_eye_labels.json"
REPORT = Path(__file__).resolve().parent / "results" / "prompting.json"
CONNECTOR_Q = "\n\nThe question this answers:"


def _vector(topic: dict, coeff: float) -> dict:
    texts = {k: topic[k] for k in ("text", "positive", "negative") if k in topic}
    return {**texts, "coeff": coeff, "layer": LAYER, "positions": "prompt"}


def generate_all(coeff: float = limits.DEFAULT_COEFF) -> dict:
    from steering import generate as G
    from steering import quality as Q
    from steering.engine import parse_vector

    engine = load_engine()
    out: dict = {"coeff": coeff, "layer": LAYER, "max_new_tokens": TOKENS, "outputs": []}
    if OUTPUTS.exists():  # resumable: topics already written are kept
        out = json.loads(OUTPUTS.read_text())
    done = {(o["set"], o["topic"]) for o in out["outputs"]}
    sampling = G.Sampling(max_new_tokens=TOKENS)
    started = time.time()
    for set_name, file in SETS.items():
        for topic in json.loads((DATA / file).read_text())["topics"]:
            if (set_name, topic["name"]) in done:
                continue
            spec = parse_vector(_vector(topic, coeff), 0, engine.n_layers)
            instruction = G.prompt_instruction([spec])
            for p, prompt in enumerate(topic["prompts"]):
                rows = G.compare_rows([spec], True, True)
                row_ids = G.compare_row_ids(engine.tokenizer, prompt, instruction, len(rows))
                final = G.run_rows(engine, prompt, rows, sampling, row_ids=row_ids)
                context = G.prompt_ids(engine.tokenizer, prompt)
                scores = Q.compare_scores(engine, context, final.token_ids, [spec], TOKENS)
                after, _ = Q.text_logprob_after(engine, context, final.token_ids, prompt, CONNECTOR_Q)
                for name, text, ids, score, alt in zip(ROWS, final.texts, final.token_ids, scores, after):
                    out["outputs"].append({
                        "id": f"{set_name}|{topic['name']}|{p}|{name}", "set": set_name, "topic": topic["name"],
                        "prompt": prompt, "row": name, "instruction": instruction if name == "prompted" else None,
                        "text": text, "n": len(ids), "on_topic": on_topic(text, topic["words"]),
                        "prompt_after": round(alt, 4), **score,
                    })  # fmt: skip
            RESULTS.mkdir(exist_ok=True)
            OUTPUTS.write_text(json.dumps(out, indent=1) + "\n")
            print(f"  {set_name} {topic['name']}: {time.time() - started:.0f} s", flush=True)
    return out


AWAY = Path(__file__).resolve().parent / "results" / "prompting_away.json"
AWAY_COEFFS = (-1.0, -2.0)


def steer_away() -> dict:
    """Where the prompt asks for the topic ("Tell me about {topic}."), steer away from it (negative
    coefficients) or ask not to talk about it ("In your answer, do not talk about {topic}."):
    the on-topic rate (word list) and fluency of each row, one batch per topic of the labelled set."""
    from steering import generate as G
    from steering import quality as Q
    from steering.engine import parse_vector

    engine = load_engine()
    sampling = G.Sampling(max_new_tokens=TOKENS)
    names = ["baseline", "prompted_away"] + [f"steered_{c:g}" for c in AWAY_COEFFS]
    rows_out: dict = {name: [] for name in names}
    for topic in json.loads((DATA / SETS["labelled"]).read_text())["topics"]:
        text = topic.get("text") or topic["positive"]
        prompt = f"Tell me about {text}."
        spec = parse_vector({"text": text, "coeff": -1.0, "layer": LAYER, "positions": "prompt"}, 0, engine.n_layers)
        instruction = G.prompt_instruction([spec])  # "In your answer, do not talk about {text}."
        rows = [[], []] + [[(spec, c)] for c in AWAY_COEFFS]
        ids = G.prompt_ids(engine.tokenizer, prompt)
        row_ids = [ids, G.prompt_ids(engine.tokenizer, G.prompted_prompt(prompt, instruction))] + [ids] * len(
            AWAY_COEFFS
        )
        final = G.run_rows(engine, prompt, rows, sampling, row_ids=row_ids)
        ppl = G.context_perplexities(engine, ids, final.token_ids)
        for name, out, tok, p in zip(names, final.texts, final.token_ids, ppl):
            fluent = Q.is_fluent(p, Q.repetition(tok), len(tok))
            rows_out[name].append({"topic": topic["name"], "prompt": prompt, "text": out,
                                   "on_topic": on_topic(out, topic["words"]), "fluent": fluent})  # fmt: skip
        print(f"  away {topic['name']}", flush=True)
    summary = {
        name: {
            "on_topic": round(sum(r["on_topic"] for r in rows) / len(rows), 3),
            "fluent": round(sum(r["fluent"] for r in rows) / len(rows), 3),
            "off_topic_and_fluent": round(sum((not r["on_topic"]) and r["fluent"] for r in rows) / len(rows), 3),
            "n": len(rows),
        }
        for name, rows in rows_out.items()
    }
    result = {"summary": summary, "instruction": "In your answer, do not talk about {text}.", "rows": rows_out}
    AWAY.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return result


def print_sample(n: int, seed: int) -> None:
    outputs = json.loads(OUTPUTS.read_text())["outputs"]
    prompts = sorted({o["id"].rsplit("|", 1)[0] for o in outputs})
    chosen = random.Random(seed).sample(prompts, n // 3)
    for o in outputs:
        if o["id"].rsplit("|", 1)[0] in chosen:
            print(f"\n## {o['id']}  [prompt: {o['prompt']}]\n{o['text']!r}")


def _bins(o: dict) -> dict:
    """The bins of an output under the current thresholds of steering/quality.py."""
    from steering import quality as Q

    return {
        "concept": 0 if o["row"] == "baseline" else Q._bin(o["concept"], Q.CONCEPT_BINS),
        "instruction": Q._bin(o["instruction"], Q.INSTRUCTION_BINS),
        "fluency": Q.fluency_bin(o["perplexity"], o["repetition"], o["n"], TOKENS),
    }


def _agreement(pairs: list[tuple[int, int]]) -> dict:
    n = len(pairs)
    return {
        "n": n,
        "exact": round(sum(a == b for a, b in pairs) / n, 3),
        "within_one": round(sum(abs(a - b) <= 1 for a, b in pairs) / n, 3),
        "zero_vs_nonzero": round(sum((a == 0) == (b == 0) for a, b in pairs) / n, 3),
    }


def _spearman(x, y):
    from quality import spearman

    return None if len(x) < 3 else round(spearman(x, y), 3)


FIT_TOPICS = ("ocean", "music")  # the bins' thresholds are fitted on these topics' labels ...
# ... and judged on the other labelled topics' (held out)


def _proxy(o: dict, what: str):
    return o["concept"] if what == "concept" else o[what] if o[what] is not None else float("-inf")


def fit_bins(outputs: dict, labels: dict, what: str) -> dict:
    """The (bin 1, bin 2) thresholds of `what` ("concept": relevance; "instruction" or
    "prompt_after": the two instruction proxies) that agree best with the eye labels of
    FIT_TOPICS (exact agreement, then 0-vs-nonzero), and their agreement on the held-out topics."""
    from steering import quality as Q

    target = "concept" if what == "concept" else "instruction"
    rows = [
        (outputs[i], lab) for i, lab in labels.items() if not (what == "concept" and outputs[i]["row"] == "baseline")
    ]
    fit = [(o, lab) for o, lab in rows if o["topic"] in FIT_TOPICS]
    held = [(o, lab) for o, lab in rows if o["topic"] not in FIT_TOPICS]
    values = sorted({round(_proxy(o, what), 2) for o, _ in rows if math.isfinite(_proxy(o, what))})
    grid = [(a, b) for a in values for b in values if a <= b]

    def score(pairs, edges):
        agreed = [(Q._bin(_proxy(o, what), edges), lab[target]) for o, lab in pairs]
        return (sum(a == b for a, b in agreed), sum((a == 0) == (b == 0) for a, b in agreed))

    best = max(grid, key=lambda e: (score(fit, e), -e[0]))

    def agreement(pairs, edges):
        return _agreement([(Q._bin(_proxy(o, what), edges), lab[target]) for o, lab in pairs]) if pairs else None

    chosen = {"concept": Q.CONCEPT_BINS, "instruction": Q.INSTRUCTION_BINS}.get(what)
    out = {"fitted": list(best), "fit": agreement(fit, best), "held_out": agreement(held, best)}
    if chosen is not None:  # the thresholds steering/quality.py uses (rounded from, or tied with, the fit)
        out["app"] = {"bins": list(chosen), "fit": agreement(fit, chosen), "held_out": agreement(held, chosen)}
    return out


def report() -> dict:
    from steering import quality as Q

    outputs = {o["id"]: o for o in json.loads(OUTPUTS.read_text())["outputs"]}
    labels = json.loads(LABELS.read_text())["labels"]
    agree: dict = {}
    for what in ("concept", "instruction", "fluency"):
        pairs = [(_bins(outputs[i])[what], lab[what]) for i, lab in labels.items()]
        agree[what] = _agreement(pairs)
    agg_pairs = [
        (
            Q.aggregate(list(_bins(outputs[i]).values())),
            Q.aggregate([lab[k] for k in ("concept", "instruction", "fluency")]),
        )
        for i, lab in labels.items()
    ]  # noqa: E501
    agree["aggregate"] = {
        "zero_vs_nonzero": round(sum((a == 0) == (b == 0) for a, b in agg_pairs) / len(agg_pairs), 3),
        "mean_proxy": round(sum(a for a, _ in agg_pairs) / len(agg_pairs), 3),
        "mean_eye": round(sum(b for _, b in agg_pairs) / len(agg_pairs), 3),
    }
    agree["fitted_bins"] = {
        what: fit_bins(outputs, labels, what) for what in ("concept", "instruction", "prompt_after")
    }
    ids = list(labels)
    agree["rank"] = {
        "concept_vs_eye (spearman, steered+prompted)": _spearman(
            [outputs[i]["concept"] for i in ids if outputs[i]["row"] != "baseline"],
            [labels[i]["concept"] for i in ids if outputs[i]["row"] != "baseline"],
        ),
        "instruction_pmi_vs_eye (spearman)": _spearman(
            [outputs[i]["instruction"] or 0.0 for i in ids], [labels[i]["instruction"] for i in ids]
        ),
        "instruction_prompt_after_vs_eye (spearman)": _spearman(
            [outputs[i]["prompt_after"] for i in ids], [labels[i]["instruction"] for i in ids]
        ),
    }
    table: dict = {}
    for set_name in list(SETS) + ["all"]:
        for row in ROWS:
            rows = [o for o in outputs.values() if o["row"] == row and set_name in ("all", o["set"])]
            if not rows:  # a set not generated (yet)
                continue
            good = [o["on_topic"] and Q.is_fluent(o["perplexity"], o["repetition"], o["n"]) for o in rows]
            aggs = [Q.aggregate(list(_bins(o).values())) for o in rows]
            table.setdefault(set_name, {})[row] = {
                "n": len(rows),
                "on_topic_and_fluent": round(sum(good) / len(rows), 3),
                "mean_aggregate": round(sum(aggs) / len(aggs), 3),
                "eye_mean_aggregate": _eye_mean(labels, row, set_name, outputs),
            }
    result = {
        "settings": {"layer": LAYER, "coeff": limits.DEFAULT_COEFF, "positions": "prompt", "max_new_tokens": TOKENS},
        "bins": {"concept": Q.CONCEPT_BINS, "instruction": Q.INSTRUCTION_BINS, "near_fluent": Q.NEAR_FLUENT},
        "agreement": agree,
        "table": table,
    }
    REPORT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


def _eye_mean(labels, row, set_name, outputs):
    from steering import quality as Q

    values = [
        Q.aggregate([lab[k] for k in ("concept", "instruction", "fluency")])
        for i, lab in labels.items()
        if outputs[i]["row"] == row and set_name in ("all", outputs[i]["set"])
    ]
    return None if not values else round(sum(values) / len(values), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("generate", "report", "away"), default=None)
    parser.add_argument("--sample", type=int, default=0, help="print N outputs (N/3 prompts x 3 rows) and stop")
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--coeff", type=float, default=limits.DEFAULT_COEFF)
    args = parser.parse_args()
    if args.sample:
        return print_sample(args.sample, args.seed)
    if args.stage == "away":
        steer_away()
        return
    if args.stage in (None, "generate"):
        generate_all(args.coeff)
    if args.stage in (None, "report"):
        report()


if __name__ == "__main__":
    main()
