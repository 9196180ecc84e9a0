import json, sys, collections
data = json.load(open(sys.argv[1]))
sets = sorted({k.split("|")[0] for k in data})
for s in sets:
    keys = [k for k in data if k.startswith(s + "|")]
    settings = [n for n in data[keys[0]]]
    topics = sorted({k.split("|")[1] for k in keys})
    print(f"\n== {s} (n={len(keys)} prompts)")
    agg = {}
    for n in settings:
        rows = [data[k][n] for k in keys]
        on = sum(r["on"] for r in rows)/len(rows); fl = sum(r["fluent"] for r in rows)/len(rows)
        good = sum(r["on"] and r["fluent"] for r in rows)/len(rows)
        per_topic = {t: sum(data[k][n]["on"] and data[k][n]["fluent"] for k in keys if k.split("|")[1]==t) for t in topics}
        agg[n] = (on, fl, good, per_topic)
    by_method = collections.defaultdict(list)
    for n in settings: by_method[n.split("|")[0]].append(n)
    for m, names in by_method.items():
        print(f"-- {m}")
        for n in names:
            on, fl, good, pt = agg[n]
            print(f"   {n:22s} on {on:.2f} fl {fl:.2f} good {good:.2f}  {' '.join(str(v) for v in pt.values())}")
        best = max(names, key=lambda n: agg[n][2])
        oracle = sum(max(agg[n][3][t] for n in names) for t in topics) / len(keys)
        print(f"   best single {best} {agg[best][2]:.3f}; per-topic oracle {oracle:.3f}")
    print("topics:", topics)
