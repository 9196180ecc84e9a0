"""Round 4 pilot: steering rules compared on the labelled set + validation set 1."""
import json, sys, time, math
from pathlib import Path
sys.path.insert(0, "."); sys.path.insert(0, "research")
import torch
import quality as B
from steering import generate as G, quality as Q
from steering.loaded import decoder_layers

OUT = Path(sys.argv[1]); SETS = sys.argv[2].split(",")
GRID = {
  "add":     [((L,), c) for L in (12, 15) for c in (0.4, 0.45, 0.5, 0.55, 0.6)],
  "prefill": [((L,), c) for L in (12, 15) for c in (0.75, 1.0, 1.5, 2.0, 3.0)],
  "decode":  [((L,), c) for L in (12, 15) for c in (0.4, 0.5, 0.6, 0.75)],
  "multi":   [((10, 12, 14, 16), c) for c in (0.15, 0.2, 0.25, 0.3)],
}
NR_GRID = [((L,), c) for L in (12, 15) for c in (0.45, 0.5, 0.55, 0.6)]

def rkey(method, layers, c): return f"{method}|{'-'.join(map(str,layers))}|{c:g}"

class Hook:
    def __init__(self, direction, coeffs, method):
        self.d, self.c, self.m = direction, coeffs, method
    def __call__(self, module, args, kwargs):
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        T = h.shape[1]
        rms = torch.sqrt(h[:, -1:, :].float().pow(2).mean(-1, keepdim=True) + 1e-6)
        delta = (self.c * self.d * rms).to(h.dtype)
        if self.m in ("add", "multi"): h += delta
        elif self.m == "prefill":
            if T > 1: h += delta
        elif self.m == "decode":
            if T > 1: h[:, -1:, :] += delta
            else: h += delta

def generate(engine, prompt, rows, no_repeat=0):
    """rows: list of (method, layers, c) or None (baseline)."""
    model, tok = engine.model, engine.tokenizer
    ids = G.prompt_ids(tok, prompt)
    Bn = len(rows)
    hooks = []
    groups = {}
    for b, r in enumerate(rows):
        if r is None: continue
        m, layers, c = r
        for L in layers:
            groups.setdefault((m, L), torch.zeros(Bn, 1, 1))[b] += c
    try:
        for (m, L), coeffs in groups.items():
            d = DIRS[L]
            hooks.append(decoder_layers(model)[L].register_forward_pre_hook(Hook(d, coeffs, m), with_kwargs=True))
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids] * Bn), attention_mask=torch.ones(Bn, len(ids), dtype=torch.long),
                                 max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id or 0,
                                 no_repeat_ngram_size=no_repeat or None)
    finally:
        for h in hooks: h.remove()
    gens = []
    for row in out[:, len(ids):].tolist():
        if tok.eos_token_id in row: row = row[:row.index(tok.eos_token_id)]
        gens.append(row)
    return ids, gens

engine = B.load_engine()
data = json.loads(OUT.read_text()) if OUT.exists() else {}
t0 = time.time()
for setname in SETS:
    path = {"labelled": B.SET_FILE, "fresh": B.FRESH_FILE, "fresh2": B.FRESH2_FILE}[setname]
    topics = json.loads(path.read_text())["topics"]
    for topic in topics:
        DIRS = {L: engine.direction(B.spec_for(topic, L), "contexts") for L in range(9, 19)}
        for p, prompt in enumerate(topic["prompts"]):
            k = f"{setname}|{topic['name']}|{p}"
            if k in data: continue
            res = {}
            for grid, nr in ((GRID, 0), ({"addnr": NR_GRID}, 3)):
                rows = [None] + [(m if m != "addnr" else "add", ls, c) for m, g in grid.items() for ls, c in g]
                names = ["base" if nr == 0 else "basenr"] + [rkey(m, ls, c) for m, g in grid.items() for ls, c in g]
                ids, gens = generate(engine, prompt, rows, nr)
                ppl = Q.output_perplexities(engine, ids, gens)
                for n, g, pp in zip(names, gens, ppl):
                    text = engine.tokenizer.decode(g, skip_special_tokens=True)
                    rep = Q.repetition(g)
                    res[n] = {"text": text, "on": B.on_topic(text, topic["words"]),
                              "fluent": Q.is_fluent(pp, rep, len(g)), "ppl": pp, "rep": rep}
            data[k] = res
            OUT.write_text(json.dumps(data))
            print(k, f"{time.time()-t0:.0f}s", flush=True)
