import json
pilot = json.load(open("research/results/round4/pilot.json")); pilot2 = json.load(open("research/results/round4/pilot2.json"))
sim = json.load(open("research/results/round4/sim2.json"))
def good(s, t, p, c):
    for d in (pilot, pilot2):
        r = d[f"{s}|{t}|{p}"].get(f"prefill|15|{c:g}")
        if r: return r["on"] and r["fluent"]
    raise KeyError
def ok(r): return r["fluent"] and r["relevance"] > 0
def r_max(rows, S):
    rows = [r for r in rows if r["coeff"] in S]
    g = [r for r in rows if ok(r)]
    if g: return max(g, key=lambda r: (r["relevance"], -r["coeff"]))["coeff"]
    f = [r for r in rows if r["fluent"]]
    return min((f or rows), key=lambda r: r["coeff"])["coeff"]
def r_anchor(rows, S, d=1.0):
    by = {r["coeff"]: r for r in rows}
    if ok(by[d]): return d
    lower = [c for c in sorted(S, reverse=True) if c < d and ok(by[c])]
    if lower: return lower[0]
    higher = [c for c in sorted(S) if c > d and ok(by[c])]
    if higher: return higher[0]
    return d
def r_updown(rows, S, d=1.0):
    by = {r["coeff"]: r for r in rows}
    if ok(by[d]): return d
    if not by[d]["fluent"]:
        lower = [c for c in sorted(S, reverse=True) if c < d and by[c]["fluent"]]
        return lower[0] if lower else d
    higher = [c for c in sorted(S) if c > d and ok(by[c])]  # fluent but not relevant: go up
    return higher[0] if higher else d
RULES = {
  "default 1.0": lambda rows: 1.0,
  "max {.75,1,1.25}": lambda rows: r_max(rows, (0.75, 1.0, 1.25)),
  "max {.75,1}": lambda rows: r_max(rows, (0.75, 1.0)),
  "max {1,1.25}": lambda rows: r_max(rows, (1.0, 1.25)),
  "anchor {.75,1,1.25}": lambda rows: r_anchor(rows, (0.75, 1.0, 1.25)),
  "anchor {.75,1}": lambda rows: r_anchor(rows, (0.75, 1.0)),
  "updown {.75,1,1.25}": lambda rows: r_updown(rows, (0.75, 1.0, 1.25)),
  "updown {.75,1,1.25,1.5}": lambda rows: r_updown(rows, (0.75, 1.0, 1.25, 1.5)),
}
for s in ("labelled", "fresh"):
    keys = [k for k in sim if k.startswith(s + "|")]
    topics = sorted({k.split("|")[1] for k in keys})
    print(f"== {s}: {len(keys)} tuning prompts")
    for name, rule in RULES.items():
        p0, every = [], []
        for k in keys:
            _, t, tune = k.split("|"); tune = int(tune)
            c = rule(sim[k])
            g = [good(s, t, p, c) for p in range(6) if p != tune]
            every += g
            if tune == 0: p0 += g
        print(f"  {name:26s} prompt0 {sum(p0)/max(1,len(p0)):.3f} (n={len(p0)})  every {sum(every)/max(1,len(every)):.3f} (n={len(every)})")
