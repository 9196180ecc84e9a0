import json
exec(open("research/round4/eval2.py").read().split("RULES = {")[0])
probes = json.load(open("research/results/round4/sim3.json"))
def r_count(rows_list, S, d=1.0, tie="anchor"):
    score = {}
    for c in S:
        n = sum(ok(next(r for r in rows if r["coeff"] == c)) for rows in rows_list)
        rel = sum(next(r for r in rows if r["coeff"] == c)["relevance"] for rows in rows_list)
        score[c] = (n, -abs(c - d) if tie == "anchor" else rel, -c)
    return max(S, key=lambda c: score[c])
RULES = {}
for S in ((0.75, 1.0, 1.25), (0.75, 1.0, 1.25, 1.5), (1.0, 1.25), (0.75, 1.0)):
    for npro in (2, 4):
        for tie in ("anchor", "rel"):
            RULES[f"count{S} probes{npro} {tie}"] = (S, npro, tie)
for s in ("labelled", "fresh"):
    keys = [k for k in sim if k.startswith(s + "|")]
    print(f"== {s}")
    print(f"  {'default':40s}", end="")
    for name, (S, npro, tie) in [("default", None)] + list(RULES.items()) if False else []: pass
    res = {}
    for name, (S, npro, tie) in RULES.items():
        p0, every = [], []
        for k in keys:
            _, t, tune = k.split("|"); tune = int(tune)
            rl = [sim[k]] + [probes[f"{s}|{t}|probe{i}"] for i in range(npro)]
            c = r_count(rl, S, tie=tie)
            g = [good(s, t, p, c) for p in range(6) if p != tune]
            every += g
            if tune == 0: p0 += g
        print(f"\n  {name:48s} prompt0 {sum(p0)/len(p0):.3f} every {sum(every)/len(every):.3f}", end="")
    print()
print("picks at prompt 0, probes4 anchor (0.75,1,1.25):")
for s in ("labelled", "fresh"):
    for k in [k for k in sim if k.startswith(s + "|") and k.endswith("|0")]:
        _, t, _ = k.split("|")
        rl = [sim[k]] + [probes[f"{s}|{t}|probe{i}"] for i in range(4)]
        print("  ", k, r_count(rl, (0.75, 1.0, 1.25)))
