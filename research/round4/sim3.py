import json, sys
sys.path.insert(0, "."); sys.path.insert(0, "research")
import quality as B
from steering import quality as Q
PROBES = list(Q.PROBE_PROMPTS) + ["What is a good way to spend an evening?", "Give me some advice for the week ahead."]
engine = B.load_engine()
out = {}
for setname, path in (("labelled", B.SET_FILE), ("fresh", B.FRESH_FILE)):
    for topic in json.loads(path.read_text())["topics"]:
        texts = {k: topic[k] for k in ("text", "positive", "negative") if k in topic}
        for i, probe in enumerate(PROBES):
            r = Q.autotune(engine, probe, max_new_tokens=40, layers=[15], coeffs=(0.75, 1.0, 1.25, 1.5), positions="prompt", **texts)
            out[f"{setname}|{topic['name']}|probe{i}"] = [{k: row[k] for k in ("coeff", "relevance", "fluent", "text")} for row in r["rows"]]
            json.dump(out, open("research/results/round4/sim3.json", "w"))
            print(setname, topic["name"], i, r["coeff"], flush=True)
