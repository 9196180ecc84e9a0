"""Issue 24: real peers. A repeng vector steers here exactly as in repeng, and our exported GGUF
steers a real llama.cpp built from source.

    python bench/interop.py --json                 # both halves (what `make interop` runs)
    python bench/interop.py --json --part repeng   # the repeng round trip only (no C++ build)
    python bench/interop.py --json --part llama_cpp

Everything comes from the package registries, into the gitignored `.interop/` folder:

* repeng 0.4.0 with `pip install --no-deps --target .interop/repeng` (its metadata pins
  numpy < 2; its code runs with our numpy 2), beside the scikit-learn its `extract` module
  imports (also `--no-deps`: their numpy is ours). Never on sys.path of the app itself.
* llama.cpp from the `llama-cpp-python` sdist (it vendors llama.cpp's source): `pip download
  --no-binary :all: --no-deps`, unpacked, configured with cmake (CPU only, no network features)
  and only the `llama-completion` target built with ninja.

repeng half: `ControlVector.train` (repeng's own PCA of last-token differences) on a small
persona dataset of its kind on the embedded SmolLM2-135M in fp32, `export_gguf`, then the file
goes through the lab's import (`api.import_vectors`, what `/import_vectors` serves) and steers
through `api.steer` (and `generate.run_rows` for the token ids); repeng's own `ControlModel`
(a second copy of the model, wrapped) generates greedy with the same prompt ids. The JSON says
whether every prompt's tokens are identical.

llama.cpp half: for 12 prompts (6 topics x 2 neutral prompts of `bench/quality_set.json`), a text
vector of the topic (layer 15, positions "all") is exported with `api.export_vectors`; llama.cpp
runs the wheel's own Q4_1 GGUF greedy without and with the file, with the command line of
docs/llama-cpp-control-vectors.md. Baseline agreement calibrates (fp32 transformers vs llama.cpp's
quantised kernels); on-topic is the word-list rule of bench/quality.py, fluency
`steering.quality.is_fluent` (perplexity under the unsteered model, repetition, length).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
sys.path.insert(0, str(ROOT / "bench"))

INTEROP = ROOT / ".interop"
os.environ.setdefault("STEERING_CACHE_DIR", str(INTEROP / "models"))  # the converted embedded model
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPENG_DIR = INTEROP / "repeng"
# repeng and what its modules import that our requirements do not have; versions that run with
# our numpy 2 / torch / transformers (all --no-deps: nothing of ours is replaced).
REPENG_PINS = ("repeng==0.4.0", "scikit-learn==1.9.1", "scipy==1.17.1", "joblib==1.6.0", "threadpoolctl==3.8.0")
LLAMA_SDIST = "llama-cpp-python==0.3.36"  # vendors llama.cpp ggml 0.25.3 (commit 0c1e570)
LLAMA_SRC = INTEROP / "llama-src"
LLAMA_BUILD = INTEROP / "llama-build"
LLAMA_TARGET = "llama-completion"
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=ON",
    "-DGGML_CUDA=OFF",
    "-DGGML_METAL=OFF",
    "-DGGML_VULKAN=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
)

# -- repeng half ----------------------------------------------------------------------------------
# A dataset of repeng's kind (its notebooks: a persona instruction, then the truncated starts of
# replies, positive and negative differing only in the persona).
PERSONAS = ("happy, joyful and full of delight", "sad, gloomy and full of sorrow")
SUFFIXES = (
    "I",
    "Today I",
    "The weather",
    "When I think about",
    "My friends",
    "Honestly,",
    "The best part of",
    "Let me tell you about",
    "This morning",
    "Every time I",
    "Life is",
    "I feel",
)
REPENG_LAYERS = tuple(range(8, 20))  # repeng's ControlModel layer ids = HF blocks whose output it changes
REPENG_COEFF = 6.0  # repeng's coefficient on its unit-norm PCA directions
REPENG_PROMPTS = (
    "Tell me about your weekend.",
    "What do you think of rainy days?",
    "Describe your morning.",
    "How was the party?",
    "Write a sentence about your job.",
)
REPENG_TOKENS = 32

# -- llama.cpp half ----------------------------------------------------------------------------------
LLAMA_LAYER = 15  # ours: added to the input of layer 15 = llama.cpp's direction.14 (after block 14)
LLAMA_COEFF = 0.45  # positions "all": the measured default of that rule (docs/quality.md, rounds 1-3)
PROMPTS_PER_TOPIC = 2
LLAMA_TOKENS = 40
THREADS = 1  # llama.cpp: on a shared 2-core machine -t 2 ran 8x slower (spinning threads) than -t 1


def _log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def _pip(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True, stdout=sys.stderr
    )


def ensure_repeng() -> dict:
    """Install repeng (and scikit-learn) into .interop/repeng unless there; put it on sys.path."""
    started = time.time()
    fresh = not (REPENG_DIR / "repeng" / "__init__.py").is_file()
    if fresh:
        _log("installing", " ".join(REPENG_PINS), "into", REPENG_DIR)
        _pip("install", "--no-deps", "--target", str(REPENG_DIR), *REPENG_PINS)
    if str(REPENG_DIR) not in sys.path:
        sys.path.append(str(REPENG_DIR))  # after ours: our numpy, torch, transformers, gguf win
    import numpy as np

    # repeng 0.4.0's only numpy-2 break: `np.float_` in the type hints of ControlVector.__mul__ and
    # friends, evaluated when the class is defined. The alias (removed in numpy 2.0) is what it
    # meant; nothing in repeng computes with it.
    if not hasattr(np, "float_"):
        np.float_ = np.float64
    return {"installed_now": fresh, "install_s": round(time.time() - started, 1)}


def ensure_llama_cpp() -> dict:
    """Download the sdist, unpack llama.cpp, build `llama-completion` (CPU); timings of each step."""
    out: dict = {"sdist": LLAMA_SDIST, "target": LLAMA_TARGET}
    binary = LLAMA_BUILD / "bin" / LLAMA_TARGET
    if binary.is_file():
        out.update(built_now=False, binary=str(binary))
        return out
    started = time.time()
    source = LLAMA_SRC / "llama.cpp"
    if not (source / "CMakeLists.txt").is_file():
        download = INTEROP / "dl"
        download.mkdir(parents=True, exist_ok=True)
        package, version = LLAMA_SDIST.split("==")
        name = f"{package.replace('-', '_')}-{version}"  # llama_cpp_python-0.3.36
        archives = sorted(download.glob(f"{name}.tar.gz"))
        if not archives:
            _pip("download", "--no-deps", "--no-binary", ":all:", "-d", str(download), LLAMA_SDIST)
            archives = sorted(download.glob(f"{name}.tar.gz"))
        out["download_s"] = round(time.time() - started, 1)
        unpack = tempfile.mkdtemp(dir=INTEROP, prefix="unpack-")
        with tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name + "/"]
            tar.extractall(unpack, members=members, filter="data")
        (vendored,) = Path(unpack).glob("*/vendor/llama.cpp")
        shutil.rmtree(LLAMA_SRC, ignore_errors=True)
        LLAMA_SRC.mkdir(parents=True)
        vendored.rename(source)
        shutil.rmtree(unpack)
        out["unpack_s"] = round(time.time() - started - out["download_s"], 1)
    step = time.time()
    nice = ["nice", "-n", "10"] if shutil.which("nice") else []
    subprocess.run(
        [*nice, "cmake", "-S", str(source), "-B", str(LLAMA_BUILD), "-G", "Ninja", *CMAKE_FLAGS],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    out["configure_s"] = round(time.time() - step, 1)
    step = time.time()
    jobs = str(min(2, os.cpu_count() or 1))
    subprocess.run(
        [*nice, "cmake", "--build", str(LLAMA_BUILD), "--target", LLAMA_TARGET, "-j", jobs],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    out["build_s"] = round(time.time() - step, 1)
    out.update(built_now=True, binary=str(binary), jobs=int(jobs))
    return out


def llama_command(
    binary: str, model: str, prompt: str, tokens: int, vector: str | None, layer: int | None, no_repack: bool = False
) -> list:
    """The llama.cpp command line (greedy, no chat template of its own: the prompt is already the
    chat-formatted text). With a control vector of ours: `--control-vector FILE` and the layer
    range of its one tensor, `direction.{layer-1}`."""
    command = [
        binary, "-m", model, "-p", prompt, "-n", str(tokens),
        "--temp", "0", "--top-k", "1", "--seed", "0",
        "-no-cnv", "--no-display-prompt", "--no-escape", "--no-warmup",
        "-t", str(THREADS), "-c", "512", "--simple-io",
    ]  # fmt: skip
    if no_repack:
        command.append("--no-repack")
    if vector:
        command += ["--control-vector", vector]
        if layer is not None:
            command += ["--control-vector-layer-range", str(layer - 1), str(layer - 1)]
    return command


def needs_no_repack(binary: str, model: str) -> bool:
    """True when llama.cpp crashes with its weight repacking on (here: the AMX kernel that a native
    build picks on a CPU with AMX segfaults under this machine's kernel) but runs without it."""
    probe = [binary, "-m", model, "-p", "Hello", "-n", "2", "--temp", "0", "-no-cnv", "-t", "1", "-c", "64"]
    if subprocess.run(probe, capture_output=True, timeout=120, stdin=subprocess.DEVNULL).returncode == 0:
        return False
    run_llama([*probe, "--no-repack"])  # raises when that fails too
    return True


def run_llama(command: list) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp failed ({done.returncode}): {done.stderr[-2000:]}")
    # A control vector llama.cpp cannot read is logged and skipped: it answers unsteered, exit 0.
    if "--control-vector" in command and "control vector" in done.stderr and "failed" in done.stderr:
        raise RuntimeError(f"llama.cpp did not load the control vector: {done.stderr[-2000:]}")
    return done.stdout


# -- the lab -------------------------------------------------------------------------------------
def load_lab():
    """The embedded model through the app's own manager (fp32 on CPU), as the server serves it."""
    import torch

    from steering import catalog
    from steering.loader import get_manager

    torch.set_num_threads(THREADS)
    manager = get_manager()
    manager.configure(lock_model=False)
    if manager.current is None or manager.current.model_id != catalog.EMBEDDED_ID:
        manager.load(catalog.EMBEDDED_ID, "auto", user=False)
    return manager.current


def repeng_dataset(tokenizer) -> list:
    from repeng import DatasetEntry

    def chat(persona: str) -> str:
        messages = [{"role": "user", "content": f"Act as if you are {persona}."}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    return [DatasetEntry(positive=chat(PERSONAS[0]) + s, negative=chat(PERSONAS[1]) + s) for s in SUFFIXES]


def repeng_half(loaded, out_dir: Path, prompts=REPENG_PROMPTS, tokens=REPENG_TOKENS, coeff=REPENG_COEFF) -> dict:
    import torch
    from repeng import ControlModel, ControlVector
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steering import api, embedded, generate
    from steering import engine as eng

    timings: dict = {}
    step = time.time()
    # repeng wraps (mutates) the model it is given: its own copy, same weights, fp32.
    folder = embedded.ensure_converted()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:  # repeng pads its batches
        tokenizer.pad_token = tokenizer.eos_token
    timings["load_copy_s"] = round(time.time() - step, 1)

    step = time.time()
    vector = ControlVector.train(model, tokenizer, repeng_dataset(tokenizer), hidden_layers=list(REPENG_LAYERS))
    path = out_dir / "repeng.gguf"
    vector.export_gguf(str(path))
    timings["train_export_s"] = round(time.time() - step, 1)

    step = time.time()
    imported = api.import_vectors(str(path))  # what /import_vectors answers
    vectors = [dict(v, coeff=coeff) for v in imported["vectors"]]  # repeng's coeff = ours on a raw direction
    timings["import_s"] = round(time.time() - step, 1)

    control = ControlModel(model, list(REPENG_LAYERS))
    eos = generate._eos_ids(loaded.model, loaded.tokenizer)
    engine = eng.engine_for(loaded)
    specs = [eng.parse_vector(v, i, loaded.n_layers) for i, v in enumerate(vectors)]
    rows, step = [], time.time()
    for prompt in prompts:
        ids = generate.prompt_ids(loaded.tokenizer, prompt)

        def theirs(c: float, ids=ids) -> list[int]:
            if c:
                control.set_control(vector, c)
            else:
                control.reset()
            with torch.inference_mode():
                out = control.generate(
                    torch.tensor([ids]), max_new_tokens=tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos[0]
                )
            new = out[0, len(ids) :].tolist()
            return new[: next((i for i, t in enumerate(new) if t in eos), len(new))]

        repeng_steered, repeng_plain = theirs(coeff), theirs(0.0)
        final = generate.run_rows(
            engine, prompt, generate.compare_rows(specs, True), generate.Sampling(max_new_tokens=tokens)
        )
        lab = api.steer(prompt, vectors, max_new_tokens=tokens, temperature=0.0, compare=False)  # the endpoint
        rows.append(
            {
                "prompt": prompt,
                "identical": final.token_ids[0] == repeng_steered,
                "baseline_identical": final.token_ids[1] == repeng_plain,
                "api_text_identical": lab["steered"]
                == loaded.tokenizer.decode(repeng_steered, skip_special_tokens=True),
                "steered_differs": repeng_steered != repeng_plain,
                "repeng": loaded.tokenizer.decode(repeng_steered, skip_special_tokens=True),
                "ours": lab["steered"],
                "baseline": loaded.tokenizer.decode(final.token_ids[1], skip_special_tokens=True),
            }
        )
        _log(f"repeng {prompt!r}: identical={rows[-1]['identical']} differs={rows[-1]['steered_differs']}")
    timings["generate_s"] = round(time.time() - step, 1)
    control.unwrap()
    return {
        "tokens_identical": all(r["identical"] and r["api_text_identical"] for r in rows),
        "prompts": len(rows),
        "baseline_identical": all(r["baseline_identical"] for r in rows),
        "steered_differs": sum(r["steered_differs"] for r in rows),
        "layers_trained": list(REPENG_LAYERS),
        "coeff": coeff,
        "max_new_tokens": tokens,
        "dataset_pairs": len(SUFFIXES),
        "file_tensors": sorted(imported["metadata"]["tensors"], key=lambda n: int(n.split(".")[1])),
        "mapping": imported["metadata"].get("mapping"),
        "imported_layers": [v["layer"] for v in vectors],
        "rows": rows,
        "timings": timings,
    }


def _common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def llama_half(loaded, build: dict, out_dir: Path, tokens=LLAMA_TOKENS, per_topic=PROMPTS_PER_TOPIC) -> dict:
    from quality import load_set, on_topic

    from steering import api, embedded, generate
    from steering import engine as eng
    from steering import quality as Q

    model_file = str(embedded.gguf_path())
    tokenizer = loaded.tokenizer
    engine = eng.engine_for(loaded)
    timings = {"ours_s": 0.0, "llama_cpp_s": 0.0, "export_s": 0.0, "score_s": 0.0}
    rows, example, started = [], None, time.time()
    no_repack = needs_no_repack(build["binary"], model_file)
    for topic in load_set(False):
        what = {"text": topic["text"]} if topic.get("text") else {k: topic[k] for k in ("positive", "negative")}
        vector = {**what, "coeff": LLAMA_COEFF, "layer": LLAMA_LAYER, "positions": "all"}
        step = time.time()
        exported = api.export_vectors([vector], "gguf")
        # Our own copy: the app's export folder keeps only its newest files (other processes too).
        file = str(shutil.copy(exported["path"], out_dir / f"{topic['name']}.gguf"))
        timings["export_s"] += time.time() - step
        for prompt in topic["prompts"][:per_topic]:
            step = time.time()
            ours = api.steer(prompt, [vector], max_new_tokens=tokens, temperature=0.0)
            timings["ours_s"] += time.time() - step
            ids = generate.prompt_ids(tokenizer, prompt)
            text_prompt = tokenizer.decode(ids)  # the chat-formatted prompt; llama.cpp parses its special tokens
            step = time.time()
            plain_cmd = llama_command(build["binary"], model_file, text_prompt, tokens, None, None, no_repack)
            steered_cmd = llama_command(build["binary"], model_file, text_prompt, tokens, file, LLAMA_LAYER, no_repack)
            llama_plain, llama_steered = run_llama(plain_cmd), run_llama(steered_cmd)
            timings["llama_cpp_s"] += time.time() - step
            if example is None:
                example = [Path(c).name if c in (build["binary"],) else c for c in steered_cmd]
            step = time.time()
            texts = {"ours": ours["steered"], "ours_baseline": ours["baseline"], "llama_cpp": llama_steered,
                     "llama_cpp_baseline": llama_plain}  # fmt: skip
            row = {"topic": topic["name"], "prompt": prompt, **texts}
            token_ids = {k: tokenizer.encode(v, add_special_tokens=False) for k, v in texts.items()}
            ppl = Q.output_perplexities(engine, ids, list(token_ids.values()))
            for (k, t), p in zip(token_ids.items(), ppl):
                row[f"on_topic_{k}"] = on_topic(texts[k], topic["words"])
                row[f"fluent_{k}"] = Q.is_fluent(p, Q.repetition(t), len(t), tokens)
            a, b = token_ids["ours_baseline"], token_ids["llama_cpp_baseline"]
            row["baseline_prefix_agreement"] = _common_prefix(a, b) / max(len(a), len(b), 1)
            row["baseline_position_agreement"] = sum(x == y for x, y in zip(a, b)) / max(len(a), len(b), 1)
            row["steered_differs"] = llama_steered != llama_plain
            timings["score_s"] += time.time() - step
            rows.append(row)
            _log(f"llama.cpp {topic['name']} {prompt!r}: differs={row['steered_differs']} "
                 f"topic ours={row['on_topic_ours']} llama={row['on_topic_llama_cpp']} "
                 f"fluent ours={row['fluent_ours']} llama={row['fluent_llama_cpp']} "
                 f"agree={row['baseline_prefix_agreement']:.2f} ({time.time() - started:.0f} s)")  # fmt: skip

    def share(key: str) -> float:
        return round(sum(bool(r[key]) for r in rows) / len(rows), 3)

    return {
        "prompts": len(rows),
        "baseline_agreement": round(sum(r["baseline_prefix_agreement"] for r in rows) / len(rows), 3),
        "baseline_position_agreement": round(sum(r["baseline_position_agreement"] for r in rows) / len(rows), 3),
        "baseline_identical": round(sum(r["ours_baseline"] == r["llama_cpp_baseline"] for r in rows) / len(rows), 3),
        "steered_differs": all(r["steered_differs"] for r in rows),
        "steered_differs_share": share("steered_differs"),
        "on_topic_ours": share("on_topic_ours"),
        "on_topic_llama_cpp": share("on_topic_llama_cpp"),
        "on_topic_baseline_ours": share("on_topic_ours_baseline"),
        "on_topic_baseline_llama_cpp": share("on_topic_llama_cpp_baseline"),
        "fluent_ours": share("fluent_ours"),
        "fluent_llama_cpp": share("fluent_llama_cpp"),
        "vector": {
            "layer": LLAMA_LAYER,
            "coeff": LLAMA_COEFF,
            "positions": "all",
            "capture_mode": eng.DEFAULT_CAPTURE_MODE,
        },
        "max_new_tokens": tokens,
        "no_repack": no_repack,
        "command": example,
        "build": build,
        "rows": rows,
        "timings": {k: round(v, 1) for k, v in timings.items()},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object (the default prints it too)")
    parser.add_argument("--part", choices=("all", "repeng", "llama_cpp"), default="all")
    parser.add_argument("--rows", action="store_true", help="keep every prompt's texts in the JSON")
    args = parser.parse_args(argv)

    started = time.time()
    result: dict = {"timings": {}}
    INTEROP.mkdir(exist_ok=True)
    out_dir = Path(tempfile.mkdtemp(prefix="interop-", dir=INTEROP))
    if args.part in ("all", "repeng"):
        result["repeng_install"] = ensure_repeng()
        result["timings"]["repeng_install_s"] = result["repeng_install"]["install_s"]
    build = None
    if args.part in ("all", "llama_cpp"):
        step = time.time()
        build = ensure_llama_cpp()
        result["timings"]["llama_cpp_build_total_s"] = round(time.time() - step, 1)
    step = time.time()
    loaded = load_lab()
    result["timings"]["model_load_s"] = round(time.time() - step, 1)
    result["model"] = {"id": loaded.model_id, "dtype": str(loaded.model.dtype), "device": str(loaded.model.device)}
    if args.part in ("all", "repeng"):
        step = time.time()
        result["repeng"] = repeng_half(loaded, out_dir)
        result["timings"]["repeng_s"] = round(time.time() - step, 1)
    if build is not None:
        step = time.time()
        result["llama_cpp"] = llama_half(loaded, build, out_dir)
        result["timings"]["llama_cpp_s"] = round(time.time() - step, 1)
    result["timings"]["total_s"] = round(time.time() - started, 1)
    if not args.rows:
        for part in ("repeng", "llama_cpp"):
            if part in result:
                result[part]["rows"] = [
                    {k: v for k, v in r.items() if not isinstance(v, str) or k in ("prompt", "topic")}
                    for r in result[part]["rows"]
                ]
    shutil.rmtree(out_dir, ignore_errors=True)
    print(json.dumps(result, indent=2))
    ok = True
    if "repeng" in result:
        ok &= result["repeng"]["tokens_identical"] and result["repeng"]["steered_differs"] > 0
    if "llama_cpp" in result:
        lc = result["llama_cpp"]
        ok &= lc["steered_differs"] and lc["on_topic_llama_cpp"] >= 0.8 * lc["on_topic_ours"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
