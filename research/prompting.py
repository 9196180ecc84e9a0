"""Issue 23's measurement: steering (the defaults) beside simply asking (the prompted row).

    python research/prompting.py --stage generate   # outputs + scores of every prompt, all three sets
    python research/prompting.py --sample 72        # print a seeded sample to label by eye
    python research/prompting.py --stage report     # agreement with the eye labels + the table
    python research/prompting.py --stage away       # steering away vs asking not to, where the prompt asks
    python research/prompting.py --stage more       # auto-tune (per topic) and trained-vector rows, all sets
    python research/prompting.py --stage report-more  # the five columns: research/results/prompting_more.json

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


MORE_OUTPUTS = RESULTS / "prompting_more_outputs.json"  # research/out/: every output and its raw scores
MORE = Path(__file__).resolve().parent / "results" / "prompting_more.json"  # the compact, committed file
TRAIN_TOPICS = Path(__file__).resolve().parent.parent / "bench" / "train_topics.json"
MORE_ROWS = ("autotuned", "baseline", "trained")
TUNE_PROMPT = 0  # the prompt of each topic auto-tune is tuned on; the setting is applied to all six


def generate_more() -> dict:
    """Two more columns for the table, on the same prompts as stage generate: per topic, the real
    auto-tune (`steering.quality.autotune`, the app's defaults: middle layer, its coefficients,
    positions "prompt", the prompt and four probes) tuned on prompt TUNE_PROMPT, and a `mean_diff`
    vector trained from the topic's 8 example sentences of bench/train_topics.json (built-in
    neutral negatives; a pair topic against its negatives) at the middle layer and
    `training.TRAINED_COEFF`, the setting bench/steer_trained.py measured. Then on every prompt of
    the topic, one greedy 40-token batch: the auto-tuned setting's row, the baseline, the trained
    vector's row; every row scored by `compare_scores` against the topic's text (so the concept
    score reads the same text for both). Resumable per topic; writes MORE_OUTPUTS."""
    from steering import generate as G
    from steering import quality as Q
    from steering import training
    from steering.engine import parse_vector

    engine = load_engine()
    examples = json.loads(TRAIN_TOPICS.read_text())["topics"]
    out: dict = {"layer": LAYER, "max_new_tokens": TOKENS, "tune_prompt": TUNE_PROMPT, "topics": {}, "outputs": []}
    if MORE_OUTPUTS.exists():
        out = json.loads(MORE_OUTPUTS.read_text())
    sampling = G.Sampling(max_new_tokens=TOKENS)
    started = time.time()
    for set_name, file in SETS.items():
        for topic in json.loads((DATA / file).read_text())["topics"]:
            if f"{set_name}|{topic['name']}" in out["topics"]:
                continue
            t0 = time.time()
            texts = {k: topic[k] for k in ("text", "positive", "negative") if k in topic}
            tuned = Q.autotune(engine, topic["prompts"][TUNE_PROMPT], **texts)
            t_tune = time.time() - t0
            data = examples[topic["name"]]
            trained = training.train(engine, data["positives"], data.get("negatives", ()), "mean_diff", LAYER)
            t_train = time.time() - t0 - t_tune
            reference = parse_vector(_vector(topic, limits.DEFAULT_COEFF), 0, engine.n_layers)
            tuned_spec = parse_vector(
                {**texts, "coeff": tuned["coeff"], "layer": tuned["layer"], "positions": tuned["positions"]},
                0,
                engine.n_layers,
            )
            trained_spec = parse_vector(trained["vector"], 0, engine.n_layers)
            rows = [[(tuned_spec, tuned_spec.coeff)], [], [(trained_spec, trained_spec.coeff)]]
            for p, prompt in enumerate(topic["prompts"]):
                final = G.run_rows(engine, prompt, rows, sampling)
                context = G.prompt_ids(engine.tokenizer, prompt)
                scores = Q.compare_scores(engine, context, final.token_ids, [reference], TOKENS)
                for name, text, ids, score in zip(MORE_ROWS, final.texts, final.token_ids, scores):
                    out["outputs"].append({
                        "id": f"{set_name}|{topic['name']}|{p}|{name}", "set": set_name, "topic": topic["name"],
                        "prompt": prompt, "row": name, "tuned_on": p == TUNE_PROMPT, "text": text, "n": len(ids),
                        "on_topic": on_topic(text, topic["words"]), **score,
                    })  # fmt: skip
            out["topics"][f"{set_name}|{topic['name']}"] = {
                "autotune": {k: tuned[k] for k in ("layer", "coeff", "decay", "positions", "score", "reason")},
                "trained": {"layer": trained["layer"], "coeff": trained["coeff"], "auroc": trained["auroc"]},
                "seconds": {"autotune": round(t_tune, 1), "train": round(t_train, 1),
                            "generate": round(time.time() - t0 - t_tune - t_train, 1)},
            }  # fmt: skip
            RESULTS.mkdir(exist_ok=True)
            OUTPUTS_TMP = MORE_OUTPUTS.with_suffix(".tmp")
            OUTPUTS_TMP.write_text(json.dumps(out, indent=1) + "\n")
            OUTPUTS_TMP.replace(MORE_OUTPUTS)
            print(f"  {set_name} {topic['name']}: coeff {tuned['coeff']} ({time.time() - started:.0f} s)", flush=True)
    return out


def _committed_outputs() -> dict:
    """Stage generate's outputs: research/out/ when a run wrote them there, else the committed copy."""
    path = OUTPUTS if OUTPUTS.exists() else REPORT.parent / OUTPUTS.name
    return {o["id"]: o for o in json.loads(path.read_text())["outputs"]}


def _rates(rows: list[dict]) -> dict:
    from steering import quality as Q

    good = [o["on_topic"] and Q.is_fluent(o["perplexity"], o["repetition"], o["n"]) for o in rows]
    aggs = [Q.aggregate(list(_bins(o).values())) for o in rows]
    return {
        "n": len(rows),
        "on_topic_and_fluent": round(sum(good) / len(rows), 3),
        "mean_aggregate": round(sum(aggs) / len(aggs), 3),
    }


def report_more() -> dict:
    """The five columns per set: steered (defaults), steered (auto-tune), trained vector,
    prompted, baseline: on-topic-and-fluent rate and mean aggregate, the bins of stage report.
    "autotuned_held_out" leaves out each topic's tuning prompt. Writes MORE (compact: no raw
    log-probs), with each topic's chosen setting and the time each part took."""
    base = _committed_outputs()
    more = json.loads(MORE_OUTPUTS.read_text())
    outputs = list(base.values()) + more["outputs"]
    table: dict = {}
    for set_name in list(SETS) + ["all"]:
        for row in ("steered", "autotuned", "autotuned_held_out", "trained", "prompted", "baseline"):
            name = "autotuned" if row == "autotuned_held_out" else row
            pool = base.values() if row == "baseline" else outputs  # stage generate's baseline (the same rows)
            rows = [o for o in pool if o["row"] == name and set_name in ("all", o["set"])]
            if row == "autotuned_held_out":
                rows = [o for o in rows if not o["tuned_on"]]
            if rows:
                table.setdefault(set_name, {})[row] = _rates(rows)
    same_baseline = sum(
        o["text"] == base[o["id"]]["text"] for o in more["outputs"] if o["row"] == "baseline" and o["id"] in base
    )
    coeffs = [t["autotune"]["coeff"] for t in more["topics"].values()]
    seconds = {
        k: round(sum(t["seconds"][k] for t in more["topics"].values()), 1) for k in ("autotune", "train", "generate")
    }
    result = {
        "settings": {
            "steered": {"layer": LAYER, "coeff": limits.DEFAULT_COEFF, "positions": "prompt"},
            "autotuned": f"autotune's defaults, tuned on prompt {TUNE_PROMPT} of each topic, applied to all six",
            "trained": {
                "method": "mean_diff",
                "layer": LAYER,
                "coeff": more["topics"] and next(iter(more["topics"].values()))["trained"]["coeff"],
                "examples": "bench/train_topics.json (8 per topic; neutral negatives, a pair its 8 negatives)",
            },
            "max_new_tokens": TOKENS,
            "decoding": "greedy",
        },  # fmt: skip
        "table": table,
        "autotune_coeffs": {c: coeffs.count(c) for c in sorted(set(coeffs))},
        "baseline_rows_identical_to_stage_generate": f"{same_baseline} of {len(more['outputs']) // len(MORE_ROWS)}",
        "seconds": seconds,
        "topics": more["topics"],
        "outputs": [
            {k: o[k] for k in ("id", "row", "on_topic", "fluent", "bins", "aggregate", "text")}
            | {"tuned_on": o["tuned_on"]}
            for o in more["outputs"]
            if o["row"] != "baseline"
        ],  # fmt: skip
    }
    MORE.write_text(json.dumps(result, indent=1) + "\n")
    print(
        json.dumps(
            {
                k: result[k]
                for k in ("table", "autotune_coeffs", "baseline_rows_identical_to_stage_generate", "seconds")
            },
            indent=1,
        )
    )  # noqa: E501
    return result


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

    outputs = _committed_outputs()
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
    parser.add_argument("--stage", choices=("generate", "more", "report-more", "report", "away"), default=None)
    parser.add_argument("--sample", type=int, default=0, help="print N outputs (N/3 prompts x 3 rows) and stop")
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--coeff", type=float, default=limits.DEFAULT_COEFF)
    args = parser.parse_args()
    if args.sample:
        return print_sample(args.sample, args.seed)
    if args.stage == "away":
        steer_away()
        return
    if args.stage == "more":
        generate_more()
        return
    if args.stage == "report-more":
        report_more()
        return
    if args.stage in (None, "generate"):
        generate_all(args.coeff)
    if args.stage in (None, "report"):
        report()


if __name__ == "__main__":
    main()
