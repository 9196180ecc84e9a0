"""Issue 9's measurement: which score picks a steering setting that is on topic AND fluent?

    python research/quality.py            # full run: generations cached in research/out/
    python research/quality.py --quick    # smoke test: 2 topics x 2 prompts, 1 layer, 16 tokens
    python research/quality.py --stage fresh  # round 3: the validation set (research/data/quality_fresh.json)

Stage 1 (generate): for every topic of `research/data/quality_set.json` (6 topics x 6 neutral prompts),
greedy 40-token outputs of the embedded SmolLM2-135M at every (layer, coefficient) of the grid,
one `run_rows` batch per (prompt, layer) with all coefficients as rows, plus the unsteered
baseline of each prompt. Cached in research/out/quality_generations.json (resumable).

Stage 2 (score): per output, perplexity (unsteered model), repetition, fluency by the rule of
`steering.quality.is_fluent`, on-topic by the topic's word list, and every candidate relevance
score; `effect` (generate.effect_scores) per (topic, layer, coeff). Cached in
research/out/quality_scores.json.

Stage 3 (evaluate): for each candidate score, how well it ranks settings against the label
"on topic and fluent" (Spearman, picked = best), and the on-topic-and-fluent rate of
(a) the fixed default, (b) autotune tuned on one prompt per topic and applied to the other five,
(c) the largest-effect setting. Written to research/out/quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from steering import limits  # noqa: E402  (plain Python: no torch)

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"  # the labelled set, both validation sets, the by-eye labels
# Where a run writes (and caches, resumably) its outputs: research/out/ (gitignored) unless --results names
# another folder; `--results research/results` reuses the committed caches that docs/quality.md cites.
RESULTS = HERE / "out"
SET_FILE = DATA / "quality_set.json"

LAYERS = (9, 12, 15, 18)
COEFFS = (0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.75)  # rounds 1-2 ("bos-neutral" capture)
COEFFS_BY_MODE = {"contexts": (0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.75)}  # round 3
# The capture mode of the run (--capture-mode); "bos-neutral" runs keep rounds 1-2's file names.
CAPTURE_MODE = "contexts"
# Where vectors are added. Rounds 1-3 measured llm-steer's rule, "all" (their cached outputs stay
# valid under `--positions all`); round 4 measures "prompt", the app's default since then.
POSITIONS = "prompt"
COEFFS_BY_POSITIONS = {"prompt": (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)}  # round 4's largest-effect grid
MAX_NEW_TOKENS = 40
PROBE_LAYERS = (15, 18)  # autotune's probe prompts are generated at these layers only (time)


def load_set(quick: bool, path: Path = SET_FILE) -> list[dict]:
    topics = json.loads(path.read_text())["topics"]
    if quick:
        topics = [dict(t, prompts=t["prompts"][:2]) for t in topics[:2]]
    return topics


def load_engine():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steering import embedded
    from steering.engine import SteeringEngine

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    folder = embedded.ensure_converted()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
    return SteeringEngine(model, AutoTokenizer.from_pretrained(folder), "bench-quality")


def spec_for(topic: dict, layer: int):
    from steering.engine import VectorSpec

    if "positive" in topic:
        return VectorSpec(
            layer=layer, coeff=1.0, positive=topic["positive"], negative=topic["negative"], positions=POSITIONS
        )
    return VectorSpec(layer=layer, coeff=1.0, text=topic["text"], positions=POSITIONS)


def tuning() -> dict:
    """autotune's arguments for this round: rounds 1-3 (positions "all") tuned on the user's prompt
    alone; round 4 uses the app's default, the prompt and four probe prompts."""
    return {"positions": POSITIONS, "probes": ()} if POSITIONS == "all" else {"positions": POSITIONS}


def key(topic: str, prompt_index: int, layer: int | None = None, coeff: float | None = None) -> str:
    return f"{topic}|{prompt_index}|base" if layer is None else f"{topic}|{prompt_index}|{layer}|{coeff:g}"


def _save(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def generate_all(engine, topics, layers, coeffs, tokens, path: Path) -> dict:
    """Every output of the grid, from the cache where present (saved after each batch)."""
    from steering import generate as G

    data = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    data["meta"] = {"layers": list(layers), "coeffs": list(coeffs), "max_new_tokens": tokens}
    rows = data["rows"]
    sampling = G.Sampling(max_new_tokens=tokens)
    started = time.time()
    for topic in topics:
        for p, prompt in enumerate(topic["prompts"]):
            jobs = [(None, [(None, [[]])])] if key(topic["name"], p) not in rows else []
            for layer in layers:
                wanted = [c for c in coeffs if key(topic["name"], p, layer, c) not in rows]
                if wanted:
                    spec = spec_for(topic, layer)
                    jobs.append((layer, [(c, [[(spec, c)]]) for c in wanted]))
            for layer, batch in jobs:
                final = G.run_rows(
                    engine, prompt, [r for _, rs in batch for r in rs], sampling, capture_mode=CAPTURE_MODE
                )
                for (coeff, _), text, ids in zip(batch, final.texts, final.token_ids):
                    rows[key(topic["name"], p, layer, coeff)] = {"text": text, "ids": ids}
                _save(path, data)
            print(f"  generated {topic['name']} prompt {p} ({time.time() - started:.0f} s)", flush=True)
    return data


METHODS = ("logprob", "logprob-plain", "hidden", "embed")  # candidate relevance scores
# The app's fixed default: the middle layer (15 of 30), limits' default coefficient, no decay.
DEFAULT_SETTING = (15, limits.DEFAULT_COEFF)  # positions "prompt"
DEFAULT_SETTING_ALL = (15, 0.45)  # rounds 1-3's default, positions "all"


def on_topic(text: str, words: list[str]) -> bool:
    """Any word or phrase of the list, whole-word, case-insensitive."""
    import re

    low = text.lower()
    return any(re.search(r"(?<![a-z])" + re.escape(w.lower()) + r"(?![a-z])", low) for w in words)


def score_all(engine, topics, gens, layers, coeffs, path: Path) -> dict:
    """Per output: perplexity, repetition, on-topic, every candidate relevance; effect per setting."""
    import metrics  # research/metrics.py: this folder is on sys.path when run as a script

    from steering import generate as G
    from steering import quality as Q

    data = json.loads(path.read_text()) if path.exists() else {"rows": {}, "effect": {}}
    rows, effects = data["rows"], data["effect"]
    started = time.time()
    for topic in topics:
        name = topic["name"]
        for layer in layers:
            if f"{name}|{layer}" not in effects:
                spec = spec_for(topic, layer)
                values = G.effect_scores(
                    engine, [[(spec, c)] for c in coeffs], topic.get("text") or topic["positive"], CAPTURE_MODE
                )
                effects[f"{name}|{layer}"] = dict(zip((f"{c:g}" for c in coeffs), values))
        for p, prompt in enumerate(topic["prompts"]):
            keys = [key(name, p)] + [key(name, p, layer, c) for layer in layers for c in coeffs]
            if all(k in rows for k in keys):
                continue
            context = G.prompt_ids(engine.tokenizer, prompt)
            ids = [gens["rows"][k]["ids"] for k in keys]
            out = {
                k: {
                    "n": len(i),
                    "repetition": Q.repetition(i),
                    "on_topic": on_topic(gens["rows"][k]["text"], topic["words"]),
                }
                for k, i in zip(keys, ids)
            }
            out[keys[0]].update({m: 0.0 for m in METHODS})
            texts = {k: topic.get(k, "") for k in ("text", "positive", "negative")}
            for method, connector in (("logprob", Q.CONNECTOR), ("logprob-plain", "")):  # + perplexity, one pass
                values, ppl = Q.logprob_scores(engine, context, ids[1:], ids[0], connector=connector, **texts)
                for k, v, pp in zip(keys[1:], values, ppl):
                    out[k].update({method: v, "perplexity": pp})
            out[keys[0]]["perplexity"] = G.context_perplexities(engine, context, ids[:1])[0]
            for method in ("hidden", "embed"):  # only "hidden" depends on the layer (its direction)
                for layer in layers if method == "hidden" else layers[:1]:
                    picked = [
                        i for i, k in enumerate(keys[1:], 1) if method != "hidden" or k.split("|")[2] == str(layer)
                    ]
                    values = metrics.relevance_scores(
                        engine, context, [ids[i] for i in picked], ids[0], spec_for(topic, layer), method=method,
                        capture_mode=CAPTURE_MODE,
                    )  # fmt: skip
                    for i, v in zip(picked, values):
                        out[keys[i]][method] = v
            rows.update(out)
            _save(path, data)
        print(f"  scored {name} ({time.time() - started:.0f} s)", flush=True)
    return data


def score_probes(engine, topics, gens, layers, coeffs, scores: dict, path: Path) -> None:
    """Perplexity, repetition and the chosen relevance of the probe prompts' outputs."""
    from steering import generate as G
    from steering import quality as Q

    rows = scores["rows"]
    for topic in topics:
        name = topic["name"]
        texts = {k: topic.get(k, "") for k in ("text", "positive", "negative")}
        for j, prompt in enumerate(Q.PROBE_PROMPTS):
            keys = [key(name, f"probe{j}")] + [key(name, f"probe{j}", layer, c) for layer in layers for c in coeffs]
            if all(k in rows for k in keys) or not all(k in gens["rows"] for k in keys):
                continue
            context = G.prompt_ids(engine.tokenizer, prompt)
            ids = [gens["rows"][k]["ids"] for k in keys]
            values, ppl = Q.logprob_scores(engine, context, ids[1:], ids[0], **texts)
            for k, i, v, pp in zip(keys[1:], ids[1:], values, ppl):
                rows[k] = {
                    "n": len(i),
                    "repetition": Q.repetition(i),
                    "perplexity": pp,
                    "logprob": v,
                    "on_topic": on_topic(gens["rows"][k]["text"], topic["words"]),
                }
            rows[keys[0]] = {
                "n": len(ids[0]),
                "repetition": Q.repetition(ids[0]),
                "logprob": 0.0,
                "on_topic": False,
                "perplexity": G.context_perplexities(engine, context, ids[:1])[0],
            }
            _save(path, scores)


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None when either side is constant."""

    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / (sxx * syy) ** 0.5


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def build_table(topics, scores, layers, coeffs, rule) -> dict:
    """table[topic][prompt][(layer, coeff)] = row with fluent / on_topic / good / scores / effect."""
    table = {}
    for topic in topics:
        name = topic["name"]
        table[name] = []
        for p in range(len(topic["prompts"])):
            cells = {}
            for setting in [(None, 0.0)] + [(layer, c) for layer in layers for c in coeffs]:
                row = dict(scores["rows"][key(name, p, *(() if setting[0] is None else setting))])
                row["fluent"] = rule(row)
                row["good"] = row["fluent"] and row["on_topic"]
                row["effect"] = (
                    0.0 if setting[0] is None else scores["effect"][f"{name}|{setting[0]}"][f"{setting[1]:g}"]
                )
                cells[setting] = row
            table[name].append(cells)
    return table


def good_rate(table, picks: dict, prompts_of) -> tuple[float, int]:
    """Share of outputs on topic and fluent when topic t uses setting picks[t] on prompts_of(t)."""
    hits = [table[t][p][picks[t]]["good"] for t in table for p in prompts_of(t)]
    return sum(hits) / len(hits), len(hits)


def pick_for(cells: dict, method: str, grid, n_layers: int):
    """The setting autotune's rule (`quality.choose`) picks from one prompt's rows, by `method`."""
    from steering import quality as Q

    rows = [dict(layer=s[0], coeff=s[1], relevance=cells[s][method], fluent=cells[s]["fluent"]) for s in grid]
    best, _ = Q.choose(rows, n_layers)
    return best["layer"], best["coeff"]


def rule_fluent(row) -> bool:
    from steering import quality as Q

    return Q.is_fluent(row["perplexity"], row["repetition"], row["n"])


def candidate_report(table, grid, n_layers) -> dict:
    """How well each candidate score ranks settings against "on topic and fluent"."""
    out = {}
    for method in METHODS + ("effect", "effect-any"):
        rows_rho, set_rho, picked_best, picked_good, transfer = [], [], [], [], []
        for _name, prompts in table.items():
            rates = {s: _mean(prompts[p][s]["good"] for p in range(len(prompts))) for s in grid}
            best_rate = max(rates.values())
            gated = {s: [] for s in grid}
            for p, cells in enumerate(prompts):
                score = "effect" if method.startswith("effect") else method
                rows_rho.append(spearman([cells[s][score] for s in grid], [cells[s]["on_topic"] for s in grid]))
                for s in grid:
                    gated[s].append(cells[s][score] if cells[s]["fluent"] else -1e9)
                if method == "effect-any":  # the largest effect, fluent or not
                    pick = max(grid, key=lambda s: cells[s]["effect"])
                else:
                    pick = pick_for(cells, score, grid, n_layers)
                picked_best.append(rates[pick] == best_rate)
                picked_good.append(cells[pick]["good"])
                others = [q for q in range(len(prompts)) if q != p]
                transfer.append(_mean(prompts[q][pick]["good"] for q in others))
            medians = {s: sorted(v)[len(v) // 2] for s, v in gated.items()}
            set_rho.append(spearman([medians[s] for s in grid], [rates[s] for s in grid]))
        out[method] = {
            "spearman_rows_vs_on_topic": _mean(rows_rho),
            "spearman_settings_vs_good_rate": _mean(set_rho),
            "picked_is_best": _mean(picked_best),
            "picked_row_good": _mean(picked_good),
            "transfer_good_rate": _mean(transfer),
        }
    return out


def settings_report(table, layers, coeffs) -> dict:
    """Per setting over every topic and prompt: on-topic, fluent and on-topic-and-fluent rates."""
    out = {}
    for setting in [(None, 0.0)] + [(layer, c) for layer in layers for c in coeffs]:
        cells = [prompts[p][setting] for prompts in table.values() for p in range(len(prompts))]
        out[setting] = {k: _mean(c[k] for c in cells) for k in ("on_topic", "fluent", "good")}
    return out


def pick_across(table, probes, topic, tune, grid, n_layers, with_probes=True):
    """The setting autotune picks for `topic` tuned on prompt `tune` (+ the probe prompts)."""
    from steering import quality as Q

    contexts = [table[topic][tune]] + (probes[topic] if with_probes else [])
    rows = [
        [dict(layer=s[0], coeff=s[1], relevance=c[s][Q.RELEVANCE], fluent=c[s]["fluent"]) for s in grid]
        for c in contexts
    ]
    best, _, _ = Q.choose_across(rows, n_layers)
    return best["layer"], best["coeff"]


def probe_table(topics, scores, layers, coeffs, rule) -> dict:
    """probes[topic] = [cells of probe 0, cells of probe 1] like `build_table`'s."""
    from steering import quality as Q

    out = {}
    for topic in topics:
        out[topic["name"]] = []
        for j in range(len(Q.PROBE_PROMPTS)):
            cells = {}
            wanted = [(layer, c) for layer in layers for c in coeffs]
            if not all(key(topic["name"], f"probe{j}", *s) in scores["rows"] for s in wanted):
                continue  # not generated for this capture mode (round 1 ran them for bos-neutral)
            for s in wanted:
                row = dict(scores["rows"][key(topic["name"], f"probe{j}", *s)])
                row["fluent"] = rule(row)
                cells[s] = row
            out[topic["name"]].append(cells)
    return out


def headline(table, probes, samples, layers, coeffs, n_layers) -> dict:
    """(a) fixed default, (b) autotune's default search tuned on prompt 0 and applied to prompts
    1-5, (c) largest effect; the searches compared, and the bounds."""
    full_grid = [(layer, c) for layer in layers for c in coeffs]
    first_round = [(layer, c) for layer in PROBE_LAYERS for c in SEARCHES["first round (layers 15, 18 x 0.35-0.5)"][1]]
    missing = [s for s in first_round + [DEFAULT_SETTING] if s not in full_grid]
    assert not missing, f"the searched settings must lie inside the bench grid: {missing}"
    rest = lambda t: range(1, len(table[t]))  # noqa: E731
    out = {"default": good_rate(table, {t: DEFAULT_SETTING for t in table}, rest)}
    out["searches"] = compare_searches(table, samples, n_layers)
    tuned = out["searches"]["autotune"]
    out["autotune"] = [tuned["tuned_on_prompt_0"], sum(len(table[t]) - 1 for t in table)]
    out["autotune_picks"] = tuned["picks"]
    out["autotune_every_tuning_prompt"] = tuned["every_tuning_prompt"]
    picks = {t: pick_across(table, probes, t, 0, first_round, n_layers, True) for t in table}
    out["first_round_with_probes"] = good_rate(table, picks, rest)
    effect_picks = {t: max(full_grid, key=lambda s: table[t][0][s]["effect"]) for t in table}
    out["largest_effect"] = good_rate(table, effect_picks, rest)
    out["largest_effect_picks"] = {t: list(s) for t, s in effect_picks.items()}
    # The default the data supports, chosen on five topics and tested on the sixth.
    held = []
    for t in table:
        train = [u for u in table if u != t]
        best = max(full_grid, key=lambda s: sum(table[u][p][s]["good"] for u in train for p in range(len(table[u]))))
        held.append((best, _mean(table[t][p][best]["good"] for p in range(len(table[t])))))
    out["default_leave_one_topic_out"] = {"rate": _mean(r for _, r in held), "picks": [list(b) for b, _ in held]}
    out["bounds"] = bounds(table)
    return out


EYE_FILE = DATA / "quality_eye_labels.json"


def print_sample(topics, gens, scores, n: int, seed: int) -> None:
    """n random steered outputs with their automatic labels, for reading by eye."""
    import random

    keys = sorted(k for k in scores["rows"] if not k.endswith("|base"))
    words = {t["name"]: t["words"] for t in topics}
    for k in random.Random(seed).sample(keys, min(n, len(keys))):
        row = scores["rows"][k]
        print(
            f"{k}  topic={row['on_topic']} fluent={rule_fluent(row)} ppl={row['perplexity'] or 0:.1f} "
            f"rep={row['repetition']:.2f} n={row['n']} words={words[k.split('|')[0]][:3]}\n    {gens['rows'][k]['text']!r}"  # noqa: E501
        )


def fit_fluency(scores) -> dict | None:
    """Agreement of fluency rules with the by-eye labels (quality_eye_labels.json, "fluent")."""
    if not EYE_FILE.exists() or CAPTURE_MODE != "bos-neutral":  # the rule was fitted on round 1's outputs
        return None
    eye = json.loads(EYE_FILE.read_text()).get("fluent", {})
    rows = [(scores["rows"][k], v) for k, v in eye.items() if k in scores["rows"]]
    if not rows:
        return None

    def accuracy(rep, ppl, tokens):
        ok = [((r["perplexity"] or 1e9) <= ppl and r["repetition"] <= rep and r["n"] >= tokens) == v for r, v in rows]
        return sum(ok) / len(ok)

    grid = [
        (rep, ppl, tok)
        for rep in (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 1.0)
        for ppl in (15, 20, 30, 40, 60, 80, 120, 1e9)
        for tok in (1, 4, 8, 12)
    ]
    ranked = sorted(grid, key=lambda g: (-accuracy(*g), -g[0], -g[1], g[2]))  # ties: the loosest rule
    agree_rule = sum(rule_fluent(r) == v for r, v in rows) / len(rows)
    agree_ppl_only = max(accuracy(1.0, ppl, 1) for ppl in (15, 20, 30, 40, 60, 80, 120))
    agree_rep_only = max(accuracy(rep, 1e9, 1) for rep in (0.1, 0.15, 0.2, 0.25, 0.3, 0.4))
    return {
        "n_labelled": len(rows),
        "eye_fluent_share": sum(v for _, v in rows) / len(rows),
        "rule_agreement": agree_rule,
        "best_perplexity_only": agree_ppl_only,
        "best_repetition_only": agree_rep_only,
        "top_rules": [
            {"max_repetition": a, "max_perplexity": b, "min_tokens": c, "agreement": accuracy(a, b, c)}
            for a, b, c in ranked[:5]
        ],
    }


def eye_check(scores) -> dict | None:
    """The automatic labels (word list, fluency rule) against by-eye labels of a random sample."""
    if not EYE_FILE.exists():
        return None
    # the labels belong to one capture mode's outputs (their keys say only topic|prompt|layer|coeff)
    section = "check" if CAPTURE_MODE == "bos-neutral" else f"check_{CAPTURE_MODE}"
    check = json.loads(EYE_FILE.read_text()).get(section, {})
    rows = [(scores["rows"][k], v) for k, v in check.items() if k in scores["rows"]]
    if not rows:
        return None
    return {
        "n": len(rows),
        "on_topic_changed": sum(r["on_topic"] != v["on_topic"] for r, v in rows),
        "fluent_changed": sum(rule_fluent(r) != v["fluent"] for r, v in rows),
        "good_changed": sum((r["on_topic"] and rule_fluent(r)) != (v["on_topic"] and v["fluent"]) for r, v in rows),
    }


def timed_autotune(engine, topics, tokens) -> list[dict]:
    """The real `quality.autotune` on prompt 0 of each topic, at its default search, timed."""
    from steering import quality as Q

    out = []
    for topic in topics:
        texts = {k: topic[k] for k in ("text", "positive", "negative") if k in topic}
        started = time.time()
        result = Q.autotune(
            engine, topic["prompts"][0], max_new_tokens=tokens, capture_mode=CAPTURE_MODE, **tuning(), **texts
        )
        out.append(
            {
                "topic": topic["name"],
                "layer": result["layer"],
                "coeff": result["coeff"],
                "decay": result["decay"],
                "seconds": round(time.time() - started, 1),
                "reason": result["reason"],
            }
        )
        print(
            f"  autotune {topic['name']}: layer {result['layer']} coeff {result['coeff']} decay {result['decay']}"
            f" in {out[-1]['seconds']} s",
            flush=True,
        )
    return out


def evaluate_all(engine, topics, gens, layers, coeffs, args, suffix) -> None:
    scores = score_all(engine, topics, gens, layers, coeffs, RESULTS / f"quality_scores{suffix}.json")
    if args.sample:
        print_sample(topics, gens, scores, args.sample, args.seed)
        return
    table = build_table(topics, scores, layers, coeffs, rule_fluent)
    full_grid = [(layer, c) for layer in layers for c in coeffs]
    report = {
        "fluency_fit": fit_fluency(scores),
        "eye_check": eye_check(scores),
        "candidates": candidate_report(table, full_grid, engine.n_layers),
        "settings": {f"{s[0]}|{s[1]:g}": v for s, v in settings_report(table, layers, coeffs).items()},
    }
    if not args.quick:
        score_probes(engine, topics, gens, PROBE_LAYERS, coeffs, scores, RESULTS / f"quality_scores{suffix}.json")
        probes = probe_table(topics, scores, PROBE_LAYERS, coeffs, rule_fluent)
        for name in ("decay", "seeds"):  # round 2 (generated by --stage decay / seeds)
            path = RESULTS / f"quality_generations_{name}.json"
            if path.exists() and CAPTURE_MODE == "bos-neutral":
                extra = json.loads(path.read_text())
                score_extra(engine, topics, extra, gens, scores, RESULTS / f"quality_scores{suffix}.json")
        table, samples = extend_table(table, scores, rule_fluent)
        report["settings_round2"] = {
            f"{s[0]}|{s[1]:g}|d{s[2]:g}": {
                k: _mean(c[p][s][k] for c in table.values() for p in range(len(c)) if s in c[p])
                for k in ("on_topic", "fluent", "good")
            }
            for s in DECAY_SETTINGS
        }
        report["headline"] = headline(table, probes, samples, layers, coeffs, engine.n_layers)
    if not args.no_timing:
        report["autotune_runs"] = timed_autotune(engine, topics, gens["meta"]["max_new_tokens"])
    print_report(report, layers, coeffs)
    (RESULTS / f"quality{suffix}.json").write_text(json.dumps(report, indent=1) + "\n")


def print_report(report, layers, coeffs) -> None:
    if report["fluency_fit"]:
        print("\nfluency rule vs by-eye labels:", json.dumps(report["fluency_fit"], indent=1))
    if report["eye_check"]:
        print("automatic labels vs by-eye check:", report["eye_check"])
    print("\ncandidate scores (means over topics/prompts):")
    print(
        f"  {'score':14s} {'rho rows~topic':>14s} {'rho settings':>12s} {'picked=best':>11s} {'picked good':>11s} {'transfer':>8s}"  # noqa: E501
    )
    for m, v in report["candidates"].items():
        cells = [
            v["spearman_rows_vs_on_topic"],
            v["spearman_settings_vs_good_rate"],
            v["picked_is_best"],
            v["picked_row_good"],
            v["transfer_good_rate"],
        ]
        print(
            f"  {m:14s}"
            + "".join(f" {'-' if c is None else f'{c:.3f}':>{w}s}" for c, w in zip(cells, (14, 12, 11, 11, 8)))
        )
    print("\non-topic / fluent / both, per setting (all topics and prompts):")
    print("  layer " + "".join(f"{c:>15g}" for c in coeffs))
    for layer in layers:
        cells = [report["settings"][f"{layer}|{c:g}"] for c in coeffs]
        print(f"  {layer:5d} " + "".join(f"  {v['on_topic']:.2f}/{v['fluent']:.2f}/{v['good']:.2f}" for v in cells))
    base = report["settings"]["None|0"]
    print(f"  baseline (coeff 0): {base['on_topic']:.2f}/{base['fluent']:.2f}/{base['good']:.2f}")
    for s, v in report.get("settings_round2", {}).items():
        if None in v.values():  # not generated in this run (round 2 ran with bos-neutral)
            continue
        print(f"  {s:14s} {v['on_topic']:.2f}/{v['fluent']:.2f}/{v['good']:.2f}")
    if "headline" in report:
        h = report["headline"]
        print("\non-topic-and-fluent rate on the 5 held-out prompts of each topic:")
        layer, coeff = DEFAULT_SETTING
        print(f"  (a) fixed default, layer {layer} coeff {coeff:g}: {h['default'][0]:.3f} (n={h['default'][1]})")
        print(f"  (b) autotune tuned on prompt 0: {h['autotune'][0]:.3f}  picks {h['autotune_picks']}")
        print(f"      (tuned on each prompt in turn, mean: {h['autotune_every_tuning_prompt']:.3f})")
        print(f"  (c) largest effect: {h['largest_effect'][0]:.3f}  picks {h['largest_effect_picks']}")
        print("  searches (tuned on prompt 0 / mean over tuning prompts [how many]):")
        for name, v in h["searches"].items():
            first, every = v["tuned_on_prompt_0"], v["every_tuning_prompt"]
            shown = ["-" if x is None else f"{x:.3f}" for x in (first, every)]
            print(f"    {name:48s} {shown[0]} / {shown[1]} [{v['tuning_prompts']}]")
        print(f"  first round with the two probe prompts: {h['first_round_with_probes'][0]:.3f}")
        print(f"  best fixed default, leave-one-topic-out: {h['default_leave_one_topic_out']}")
        for k, v in h["bounds"].items():
            print(f"  {k}: {v}")
    for run in report.get("autotune_runs", []):
        print(
            f"  autotune {run['topic']}: layer {run['layer']} coeff {run['coeff']} decay {run.get('decay')}"
            f" {run['seconds']} s"
        )


def generate_probes(engine, topics, layers, coeffs, tokens, path: Path) -> dict:
    """The grid's outputs on autotune's probe prompts (keys "topic|probeJ|layer|coeff")."""
    from steering import generate as G
    from steering import quality as Q

    data = json.loads(path.read_text())
    rows = data["rows"]
    sampling = G.Sampling(max_new_tokens=tokens)
    for topic in topics:
        for j, prompt in enumerate(Q.PROBE_PROMPTS):
            pk = f"probe{j}"
            jobs = [(None, [[]])] if key(topic["name"], pk) not in rows else []
            jobs += [
                ((layer, c), [(spec_for(topic, layer), c)])
                for layer in layers
                for c in coeffs
                if key(topic["name"], pk, layer, c) not in rows
            ]
            for first in range(0, len(jobs), 8):
                batch = jobs[first : first + 8]
                final = G.run_rows(
                    engine, prompt, [r if r != [[]] else [] for _, r in batch], sampling, capture_mode=CAPTURE_MODE
                )
                for (setting, _), text, ids in zip(batch, final.texts, final.token_ids):
                    rows[key(topic["name"], pk, *(setting or ()))] = {"text": text, "ids": ids}
                _save(path, data)
        print(f"  probes of {topic['name']} generated", flush=True)
    return data


# -- round 2: decaying schedules and sampled tuning outputs ----------------------------------------
# A setting is (layer, coeff, decay); decay < 1 multiplies the coefficient by decay**step at each
# decoding step (the prompt, step 0, gets it whole). Generated for every prompt at layer 15:
DECAY_SETTINGS = tuple((15, c, 0.95) for c in (0.45, 0.5, 0.55, 0.6)) + tuple(
    (15, c, 0.9) for c in (0.5, 0.55, 0.6, 0.7)
)
# Sampled outputs (temperature quality.SAMPLE_TEMPERATURE, these seeds) of every prompt at these
# settings: what autotune(samples=N) sees on the prompt it tunes on.
SAMPLE_SETTINGS = tuple((15, c, 1.0) for c in (0.4, 0.45, 0.5)) + DECAY_SETTINGS[:4]
SAMPLE_SEEDS = (1, 2, 3)
# Searches compared in the headline: (layers, coefficients, decays, samples). "autotune" is
# quality.autotune's default search (read from steering/quality.py).
SEARCHES = {
    "first round (layers 15, 18 x 0.35-0.5)": ((15, 18), (0.35, 0.4, 0.45, 0.5), (1.0,), 0),
    "layer 15 x 0.4-0.5": ((15,), (0.4, 0.45, 0.5), (1.0,), 0),
    "layer 15 x 0.4-0.5, 3 samples": ((15,), (0.4, 0.45, 0.5), (1.0,), 3),
    "layer 15 x 0.45-0.6 x decay 0.95": ((15,), (0.45, 0.5, 0.55, 0.6), (0.95,), 0),
    "layer 15 x 0.45-0.6 x decay 0.95, 1 sample": ((15,), (0.45, 0.5, 0.55, 0.6), (0.95,), 1),
    "layer 15 x 0.45-0.6 x decay 0.95, 2 samples": ((15,), (0.45, 0.5, 0.55, 0.6), (0.95,), 2),
    "layer 15 x 0.45-0.6 x decay 0.95, 3 samples": ((15,), (0.45, 0.5, 0.55, 0.6), (0.95,), 3),
    "layer 15 x 0.5-0.7 x decay 0.9": ((15,), (0.5, 0.55, 0.6, 0.7), (0.9,), 0),
    # round 3 ("contexts" capture; its grid has 0.55)
    "layer 15 x 0.45-0.55": ((15,), (0.45, 0.5, 0.55), (1.0,), 0),
    "layer 15 x 0.4-0.55": ((15,), (0.4, 0.45, 0.5, 0.55), (1.0,), 0),
    "layers 12, 15 x 0.4-0.5": ((12, 15), (0.4, 0.45, 0.5), (1.0,), 0),
}


def xkey(topic: str, p: int, setting=None, seed: int | None = None) -> str:
    """Key of the decay / sample caches: topic|p|[s{seed}|](layer|coeff|d{decay} or base)."""
    head = f"{topic}|{p}|" + ("" if seed is None else f"s{seed}|")
    return head + ("base" if setting is None else f"{setting[0]}|{setting[1]:g}|d{setting[2]:g}")


def generate_extra(engine, topics, settings, seeds, tokens, path: Path) -> dict:
    """Outputs of `settings` for every prompt: greedy when `seeds` is (None,), else sampled at each
    seed (with a sampled baseline per seed). Cached in `path`, saved after each batch."""
    from llm_steer import DecaySchedule

    from steering import generate as G
    from steering import quality as Q

    data = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    rows = data["rows"]
    started = time.time()
    for topic in topics:
        for p, prompt in enumerate(topic["prompts"]):
            for seed in seeds:
                jobs = [
                    s
                    for s in ([] if seed is None else [None]) + list(settings)
                    if xkey(topic["name"], p, s, seed) not in rows
                ]
                sampling = G.Sampling(tokens, *((0.0, 1.0, 0) if seed is None else (Q.SAMPLE_TEMPERATURE, 1.0, seed)))
                for first in range(0, len(jobs), 8):
                    batch = jobs[first : first + 8]
                    batch_rows = [
                        []
                        if s is None
                        else [
                            (
                                replace(spec_for(topic, s[0]), decay=None if s[2] == 1 else DecaySchedule(rate=s[2])),
                                s[1],
                            )
                        ]
                        for s in batch
                    ]
                    final = G.run_rows(engine, prompt, batch_rows, sampling, capture_mode=CAPTURE_MODE)
                    for s, text, ids in zip(batch, final.texts, final.token_ids):
                        rows[xkey(topic["name"], p, s, seed)] = {"text": text, "ids": ids}
                    _save(path, data)
            print(f"  generated {path.stem} {topic['name']} prompt {p} ({time.time() - started:.0f} s)", flush=True)
    return data


def score_extra(engine, topics, extra: dict, gens: dict, scores: dict, path: Path) -> None:
    """Perplexity, repetition, on-topic and `logprob` relevance of every cached extra output, against
    the greedy baseline (decay cache) or the same seed's sampled baseline (sample cache)."""
    from steering import generate as G
    from steering import quality as Q

    rows = scores["rows"]
    groups: dict[tuple, list[str]] = {}
    for k in extra["rows"]:
        parts = k.split("|")
        if parts[-1] != "base" and k not in rows:
            groups.setdefault((parts[0], int(parts[1]), parts[2][1:] if parts[2].startswith("s") else None), []).append(
                k
            )
    by_name = {t["name"]: t for t in topics}
    for (name, p, seed), keys in groups.items():
        topic = by_name.get(name)
        base_key = key(name, p) if seed is None else xkey(name, p, None, int(seed))
        base = (gens["rows"] if seed is None else extra["rows"]).get(base_key)
        if topic is None or base is None:
            continue
        context = G.prompt_ids(engine.tokenizer, topic["prompts"][p])
        texts = {k: topic.get(k, "") for k in ("text", "positive", "negative")}
        ids = [extra["rows"][k]["ids"] for k in keys]
        values, ppl = Q.logprob_scores(engine, context, ids, base["ids"], **texts)
        for k, i, v, pp in zip(keys, ids, values, ppl):
            text = extra["rows"][k]["text"]
            rows[k] = {"n": len(i), "repetition": Q.repetition(i), "perplexity": pp, "logprob": v,
                       "on_topic": on_topic(text, topic["words"])}  # fmt: skip
        _save(path, scores)


def extend_table(table, scores, rule) -> tuple[dict, dict]:
    """Add the decay settings (layer, coeff, decay) to `table` (constant ones also under decay 1.0);
    return samples[topic][p] = [{setting: row} per seed] for the prompts whose samples exist."""
    samples: dict = {}
    for name, prompts in table.items():
        samples[name] = {}
        for p, cells in enumerate(prompts):
            for s in [s for s in list(cells) if s[0] is not None and len(s) == 2]:
                cells[(s[0], s[1], 1.0)] = cells[s]
            for s in DECAY_SETTINGS:
                row = scores["rows"].get(xkey(name, p, s))
                if row is not None:
                    row = dict(row, fluent=rule(row))
                    cells[s] = dict(row, good=row["fluent"] and row["on_topic"])
            per_seed = []
            for seed in SAMPLE_SEEDS:
                got = {s: scores["rows"].get(xkey(name, p, s, seed)) for s in SAMPLE_SETTINGS}
                if all(got.values()):
                    per_seed.append({s: dict(r, fluent=rule(r)) for s, r in got.items()})
            samples[name][p] = per_seed
    return table, samples


def pick_search(table, samples, topic, tune, search, n_layers):
    """The setting quality.autotune's rule picks for `topic` tuned on prompt `tune` with `search`
    (layers, coeffs, decays, samples): its greedy rows plus the first `samples` sampled ones."""
    from steering import quality as Q

    layers, coeffs, decays, n_samples = search
    grid = [(layer, c, d) for layer in layers for d in decays for c in coeffs]
    if n_samples > len(samples[topic][tune]):
        return None
    contexts = [table[topic][tune]] + samples[topic][tune][:n_samples]
    rows = [
        [dict(layer=s[0], coeff=s[1], decay=s[2], relevance=c[s][Q.RELEVANCE], fluent=c[s]["fluent"]) for s in grid]
        for c in contexts
    ]
    best, _, _ = Q.choose_across(rows, n_layers)
    return best["layer"], best["coeff"], best["decay"]


def compare_searches(table, samples, n_layers) -> dict:
    """Per search: the good rate on prompts 1-5 tuned on prompt 0, and the mean over every tuning
    prompt whose samples exist (each time applied to the other five prompts of its topic)."""
    from steering import quality as Q

    searches = dict(SEARCHES)
    searches["autotune"] = (tuple(Q.default_layers(n_layers)), Q.COEFFS, Q.DECAYS, Q.SAMPLES)
    out = {}
    for name, search in searches.items():
        layers, coeffs, decays, _ = search
        wanted = [(layer, c, d) if d != 1.0 else (layer, c) for layer in layers for c in coeffs for d in decays]
        if not all(s in cells for prompts in table.values() for cells in prompts for s in wanted):
            continue  # a search over settings this run did not generate
        rates = []
        for tune in range(min(len(v) for v in table.values())):
            picks = {t: pick_search(table, samples, t, tune, search, n_layers) for t in table}
            if None in picks.values():
                continue
            others = lambda t, tune=tune: [q for q in range(len(table[t])) if q != tune]  # noqa: E731
            rates.append((tune, good_rate(table, picks, others)[0], picks))
        first = next((r for r in rates if r[0] == 0), None)
        out[name] = {
            "search": list(search),
            "tuned_on_prompt_0": None if first is None else first[1],
            "picks": None if first is None else {t: list(s) for t, s in first[2].items()},
            "every_tuning_prompt": _mean(r for _, r, _ in rates),
            "tuning_prompts": len(rates),
        }
    return out


def bounds(table) -> dict:
    """What no per-topic choice can beat, and how little one prompt says about the next."""
    constant = [s for s in next(iter(table.values()))[0] if len(s) == 2 and s[0] is not None]
    decayed = [s for s in DECAY_SETTINGS if all(s in c for v in table.values() for c in v)]
    rest = lambda t: range(1, len(table[t]))  # noqa: E731
    out = {}
    for label, space in (("constant grid", constant), ("constant grid + decays", constant + decayed)):
        picks = {t: max(space, key=lambda s, t=t: sum(table[t][p][s]["good"] for p in rest(t))) for t in table}
        out[f"per_topic_oracle_{label}"] = good_rate(table, picks, rest)[0]
    grid = [(15, c) for c in (0.35, 0.4, 0.45, 0.5)] + decayed
    seen = {"good": [0, 0, 0, 0], "fluent_and_relevant": [0, 0, 0, 0]}
    for prompts in table.values():
        for s in grid:
            for p, q in ((p, q) for p in range(len(prompts)) for q in range(len(prompts)) if p != q):
                cell, other = prompts[p][s], prompts[q][s]["good"]
                for label, flag in (
                    ("good", cell["good"]),
                    ("fluent_and_relevant", cell["fluent"] and cell["logprob"] > 0),
                ):
                    seen[label][0 if flag else 2] += other
                    seen[label][1 if flag else 3] += 1
    for label, (a, na, b, nb) in seen.items():
        out[f"P(good on another prompt | {label} on the tuning prompt)"] = [a / na, b / nb]
    return out


FRESH_FILE = DATA / "quality_fresh.json"
FRESH2_FILE = DATA / "quality_fresh2.json"  # round 4's second validation set
# Round 4 (positions "prompt"): the same search tuned on the user's prompt alone, beside the default
# (the user's prompt and four neutral probes).
ROUND4_SEARCHES = {"autotune_prompt_alone": {"probes": ()}}


def fresh_check(engine, tokens: int, set_file: Path = FRESH_FILE, out: Path | None = None) -> dict:
    """Round 3's validation set (round 4: any set, `--check-set`): the real `quality.autotune`
    (default search) on prompt 0 of each topic, then on prompts 1-5 the unsteered baseline,
    (a) the fixed default, (b) autotune's pick and (c) the largest-effect setting of the bench
    grid, as rows of one batch; labelled by the same word-list and fluency rules. Written to
    research/out/quality_fresh_results.json (_bos-neutral.json for that mode), or `out`."""
    from steering import generate as G
    from steering import quality as Q

    topics = json.loads(set_file.read_text())["topics"]
    coeffs = COEFFS_BY_POSITIONS.get(POSITIONS) or COEFFS_BY_MODE.get(CAPTURE_MODE, COEFFS)
    good: dict[str, list[bool]] = {"baseline": [], "default": [], "autotune": [], "largest_effect": []}
    report: dict = {"capture_mode": CAPTURE_MODE, "positions": POSITIONS, "set": set_file.name,
                    "max_new_tokens": tokens, "topics": {}}  # fmt: skip
    for topic in topics:
        texts = {k: topic[k] for k in ("text", "positive", "negative") if k in topic}
        started = time.time()
        first = topic["prompts"][0]
        tuned = Q.autotune(engine, first, max_new_tokens=tokens, capture_mode=CAPTURE_MODE, **tuning(), **texts)
        seconds = time.time() - started
        others = {}
        for name, search in ROUND4_SEARCHES.items() if POSITIONS == "prompt" else ():
            other = Q.autotune(
                engine, topic["prompts"][0], max_new_tokens=tokens, capture_mode=CAPTURE_MODE, positions=POSITIONS,
                **search, **texts,
            )  # fmt: skip
            others[name] = (other["layer"], other["coeff"])
            good.setdefault(name, [])
        effect = {}
        for layer in LAYERS:
            values = G.effect_scores(
                engine, [[(spec_for(topic, layer), c)] for c in coeffs], topic.get("text") or topic["positive"],
                CAPTURE_MODE,
            )  # fmt: skip
            effect.update({(layer, c): v for c, v in zip(coeffs, values)})
        settings = {
            "baseline": None,
            "default": DEFAULT_SETTING,
            "autotune": (tuned["layer"], tuned["coeff"]),
            "largest_effect": max(effect, key=effect.get),
            **others,
        }
        rows = [[] if s is None else [(spec_for(topic, s[0]), s[1])] for s in settings.values()]
        outputs = []
        for p, prompt in enumerate(topic["prompts"][1:], 1):
            final = G.run_rows(engine, prompt, rows, G.Sampling(max_new_tokens=tokens), capture_mode=CAPTURE_MODE)
            ppl = G.context_perplexities(engine, G.prompt_ids(engine.tokenizer, prompt), final.token_ids)
            for name, text, ids, pp in zip(settings, final.texts, final.token_ids, ppl):
                rep = Q.repetition(ids)
                fluent, on = Q.is_fluent(pp, rep, len(ids)), on_topic(text, topic["words"])
                good[name].append(fluent and on)
                outputs.append({"prompt": p, "setting": name, "text": text, "on_topic": on, "fluent": fluent,
                                "perplexity": pp, "repetition": rep})  # fmt: skip
        report["topics"][topic["name"]] = {
            "autotune": {
                "layer": tuned["layer"],
                "coeff": tuned["coeff"],
                "seconds": round(seconds, 1),
                "reason": tuned["reason"],
            },  # fmt: skip
            "settings": {k: None if v is None else list(v) for k, v in settings.items()},
            "good": {k: sum(o["on_topic"] and o["fluent"] for o in outputs if o["setting"] == k) for k in settings},
            "outputs": outputs,
        }
        print(f"  fresh {topic['name']}: autotune {settings['autotune']} in {seconds:.1f} s, good "
              f"{report['topics'][topic['name']]['good']}", flush=True)  # fmt: skip
    report["rates"] = {k: [sum(v) / len(v), len(v)] for k, v in good.items()}
    out = out or RESULTS / f"quality_fresh_results{'' if CAPTURE_MODE == 'contexts' else '_' + CAPTURE_MODE}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{set_file.name}, positions {POSITIONS}: on-topic-and-fluent rate on prompts 1-5 of each topic "
          "(autotune tuned on prompt 0):")  # fmt: skip
    for name, (rate, n) in report["rates"].items():
        print(f"  {name:15s} {rate:.3f} (n={n})")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: small set, 1 layer, 16 tokens")
    parser.add_argument("--stage", choices=("generate", "probes", "decay", "seeds", "fresh", "all"), default="all")
    parser.add_argument("--sample", type=int, default=0, help="print N random outputs with their labels and stop")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sample")
    parser.add_argument("--no-timing", action="store_true", help="skip the timed autotune runs")
    parser.add_argument(
        "--capture-mode", default="contexts", choices=("contexts", "bos-neutral", "bos"),
        help="how texts become vectors (default: the app's default, contexts; rounds 1-2 used bos-neutral)",
    )  # fmt: skip
    parser.add_argument(
        "--set", choices=("labelled", "fresh"), default="labelled",
        help="fresh: the whole grid on round 3's validation set (quality_fresh.json), for its bounds",
    )  # fmt: skip
    parser.add_argument(
        "--positions", default="prompt", choices=("prompt", "all"),
        help="where vectors are added (default: the app's default, prompt; rounds 1-3 used all)",
    )  # fmt: skip
    parser.add_argument(
        "--check-set", choices=("labelled", "fresh", "fresh2"), default=None,
        help="round 4: --stage fresh on this set (default: fresh; with --positions all, round 3's rule on it)",
    )  # fmt: skip
    parser.add_argument(
        "--results", type=Path, default=None,
        help="outputs and caches (default research/out/, gitignored; research/results/ holds the cited ones)",
    )  # fmt: skip
    args = parser.parse_args()
    global CAPTURE_MODE, POSITIONS, DEFAULT_SETTING, RESULTS
    RESULTS = args.results or RESULTS
    CAPTURE_MODE, POSITIONS = args.capture_mode, args.positions
    if POSITIONS == "all":
        DEFAULT_SETTING = DEFAULT_SETTING_ALL
    elif args.stage != "fresh":
        parser.error("positions prompt (round 4) is measured with --stage fresh --check-set ...; "
                     "the whole grid of rounds 1-3 needs --positions all")  # fmt: skip
    topics = load_set(args.quick, FRESH_FILE if args.set == "fresh" else SET_FILE)
    grid = COEFFS_BY_MODE.get(CAPTURE_MODE, COEFFS)
    layers, coeffs, tokens = ((15,), (0.3, 0.5), 16) if args.quick else (LAYERS, grid, MAX_NEW_TOKENS)
    suffix = ("_quick" if args.quick else "") + ("" if CAPTURE_MODE == "bos-neutral" else f"_{CAPTURE_MODE}")
    suffix += "_fresh" if args.set == "fresh" else ""
    if CAPTURE_MODE != "bos-neutral" and args.stage in ("probes", "decay", "seeds"):
        parser.error(f"--stage {args.stage} is round 2's, measured with --capture-mode bos-neutral")
    RESULTS.mkdir(parents=True, exist_ok=True)
    engine = load_engine()
    if args.stage == "fresh" and (POSITIONS == "prompt" or args.check_set):  # round 4: any set
        name = args.check_set or "fresh"
        set_file = {"labelled": SET_FILE, "fresh": FRESH_FILE, "fresh2": FRESH2_FILE}[name]
        suffix = "" if POSITIONS == "prompt" else f"_{POSITIONS}"  # "all": round 3's rule, for comparison
        fresh_check(engine, tokens, set_file, RESULTS / f"quality_round4_{name}{suffix}.json")
        return
    if args.stage == "fresh":  # round 3's validation set: nothing of the labelled set's grid is needed
        fresh_check(engine, tokens)
        return
    gens = generate_all(engine, topics, layers, coeffs, tokens, RESULTS / f"quality_generations{suffix}.json")
    if args.stage == "probes":
        generate_probes(engine, topics, PROBE_LAYERS, coeffs, tokens, RESULTS / f"quality_generations{suffix}.json")
        return
    if args.stage == "decay":
        generate_extra(engine, topics, DECAY_SETTINGS, (None,), tokens, RESULTS / "quality_generations_decay.json")
        return
    if args.stage == "seeds":
        generate_extra(
            engine, topics, SAMPLE_SETTINGS, SAMPLE_SEEDS, tokens, RESULTS / "quality_generations_seeds.json"
        )
        return
    if args.stage == "generate":
        return
    evaluate_all(engine, topics, gens, layers, coeffs, args, suffix)


if __name__ == "__main__":
    main()
