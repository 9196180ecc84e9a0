"""`python -m steering plan`: one JSON object with the right verdicts, a readable table, exit 2 on bad flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from steering.__main__ import main
from steering.catalog import FALLBACK_ID, get_spec

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ["--simulate-gpu", "8GiB", "--gui-overhead", "0.7GiB"]


@pytest.fixture(autouse=True)
def _all_devices_visible(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # simulated cards obey it like real ones


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    return subprocess.run(
        [sys.executable, "-m", "steering", *args],
        cwd=ROOT,
        env={**env, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_plan_json_on_the_reference_card_is_one_object_with_the_required_verdicts():
    done = run_cli("plan", *REFERENCE, "--json")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1  # exactly one line: one JSON object
    result = json.loads(done.stdout)
    assert {"device", "gpus", "headroom_bytes", "margin_bytes", "models", "choice"} <= set(result)
    verdicts = {(row["id"], row["quant"]): row["verdict"] for row in result["models"]}
    assert verdicts[(FALLBACK_ID, "4bit")] == "stable"
    assert verdicts[(FALLBACK_ID, "bf16")] == "stable"
    assert verdicts[("meta-llama/Llama-3.2-1B-Instruct", "bf16")] == "stable"
    assert verdicts[("Qwen/Qwen2.5-7B-Instruct", "4bit")] != "stable"
    assert result["device"]["mode"] == "simulated"
    assert result["device"]["desktop_overhead_bytes"] == int(0.7 * 1024**3)
    assert set(result["choice"]) == {"id", "quant", "reason"}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--simulate-gpu", "80GiB"], ["0", "False", "False"]),  # everything fits one card: no torch
        (["--simulate-gpu", "8GiB"], ["0", "True", "False"]),  # accelerate places the 7B models: no CUDA
    ],
)
def test_plan_imports_torch_only_to_place_models_and_never_starts_cuda(args, expected):
    code = (
        "import sys, contextlib, io\n"
        "from steering.__main__ import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    rc = main(['plan', *{args!r}, '--json'])\n"
        "torch = sys.modules.get('torch')\n"
        "print(rc, torch is not None, torch is not None and torch.cuda.is_initialized())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == expected, done.stderr


def test_vram_limit_becomes_the_headroom(capsys):
    assert main(["plan", *REFERENCE, "--vram-limit", "3GiB", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["headroom_bytes"] == 3 * 1024**3
    assert result["device"]["vram_limit_bytes"] == 3 * 1024**3
    verdicts = {(row["id"], row["quant"]): row["verdict"] for row in result["models"]}
    assert verdicts[("mistralai/Mistral-7B-Instruct-v0.3", "4bit")] == "wont_fit"


def test_margin_and_context_change_the_verdicts(capsys):
    assert main(["plan", *REFERENCE, "--margin", "0", "--json"]) == 0
    no_margin = json.loads(capsys.readouterr().out)
    verdicts = {(row["id"], row["quant"]): row["verdict"] for row in no_margin["models"]}
    assert verdicts[("Qwen/Qwen2.5-7B-Instruct", "4bit")] == "stable"  # fits without the 1 GiB margin
    assert main(["plan", *REFERENCE, "--context", "16384", "--json"]) == 0
    long = json.loads(capsys.readouterr().out)
    verdicts = {(row["id"], row["quant"]): row["verdict"] for row in long["models"]}
    assert verdicts[("mistralai/Mistral-7B-Instruct-v0.3", "4bit")] == "wont_fit"


def test_human_table_shows_device_matrix_and_choice(capsys):
    assert main(["plan", *REFERENCE]) == 0  # in-process: a subprocess would import torch again
    out = capsys.readouterr().out
    assert "Simulated NVIDIA GeForce RTX 2070 SUPER" in out
    assert "gnome-shell" in out and "firefox" in out and "desktop overhead 716.80 MiB" in out
    for model in ("Mistral-7B-Instruct-v0.3", "Qwen2.5-7B-Instruct", "Llama-3.2-1B-Instruct", "SmolLM2-135M"):
        assert model in out
    assert "wont_fit" in out and "fragile" in out and "stable" in out
    assert "\nChoice: " in out


def test_model_flag_picks_that_model(capsys):
    assert main(["plan", *REFERENCE, "--model", FALLBACK_ID, "--quant", "4bit", "--json"]) == 0
    choice = json.loads(capsys.readouterr().out)["choice"]
    assert (choice["id"], choice["quant"]) == (FALLBACK_ID, "4bit")


def test_fallback_model_flag_is_the_plans_fallback(capsys, monkeypatch):
    # Qwen2.5-7B is only fragile on the reference card, so the plan names the configured fallback.
    monkeypatch.delenv("HF_TOKEN", raising=False)
    args = ["plan", "--model", "Qwen/Qwen2.5-7B-Instruct", *REFERENCE, "--json"]
    assert main([*args, "--fallback-model", "meta-llama/Llama-3.2-1B-Instruct"]) == 0
    choice = json.loads(capsys.readouterr().out)["choice"]
    assert (choice["id"], choice["quant"]) == ("meta-llama/Llama-3.2-1B-Instruct", "4bit")
    assert "falling back to meta-llama/Llama-3.2-1B-Instruct" in choice["reason"]
    assert main(args) == 0  # without the flag: the default fallback
    assert json.loads(capsys.readouterr().out)["choice"]["id"] == FALLBACK_ID
    assert main([*args, "--fallback-model", "nobody/not-cached"]) == 0  # unresolvable: the embedded model
    choice = json.loads(capsys.readouterr().out)["choice"]
    assert choice["id"] == "SmolLM2-135M-Instruct" and "nobody/not-cached cannot be had" in choice["reason"]


@pytest.mark.parametrize(
    "args",
    [
        ["plan", "--quant", "3bit"],
        ["plan", "--simulate-gpu", "8XB"],
        ["plan", "--vram-limit", "lots"],
        ["plan", "--context", "0"],
        ["plan", "--bogus"],
        ["plan", "--gui-overhead", "1GiB"],
        ["plan", "--simulate-gpu", "1GiB", "--gui-overhead", "2GiB"],
        ["plan", "--simulate-gpu", "8GiB,"],
        ["plan", "--simulate-ram", "lots"],
        ["plan", "--model", "nobody/no-such-model"],
        ["frobnicate"],
        [],
    ],
)
def test_bad_flags_exit_2_with_one_line(args):
    done = run_cli(*args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and "error" in done.stderr, done.stderr


def _plan(capsys, *args: str) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_an_8gb_card_offloads_what_does_not_fit_and_says_how_fast(capsys):
    result = _plan(capsys, *REFERENCE, "--simulate-ram", "32GiB")
    rows = {(row["id"], row["quant"]): row for row in result["models"]}
    offloaded = [row for row in result["models"] if row["verdict"] == "offload"]
    assert rows[("Qwen/Qwen2.5-7B-Instruct", "fp16")] in offloaded
    for row in offloaded:
        split, devices = row["offload"], {d["device"]: d for d in row["devices"]}
        assert split["gpu_layers"] + split["cpu_layers"] == get_spec(row["id"]).n_layers and split["cpu_layers"] > 0
        assert set(devices) == {"cuda:0", "cpu"} and split["cpu_bytes"] == devices["cpu"]["bytes"]
        assert devices["cuda:0"]["bytes"] + result["margin_bytes"] <= result["headroom_bytes"]
        assert devices["cpu"]["bytes"] + result["margin_bytes"] <= 32 * 1024**3
        assert 0.1 < split["expected_tokens_per_s"] < 10 and "estimate" in split["basis"]
        assert row["quant"] in ("fp16", "bf16") and row["fit"]["compare_max_tokens"] >= 2048
    # more of the model in RAM, slower: Mistral bf16 (math attention leaves less room on a 7.5 card) vs fp16
    mistral = [rows[("mistralai/Mistral-7B-Instruct-v0.3", q)]["offload"] for q in ("fp16", "bf16")]
    assert mistral[1]["cpu_layers"] > mistral[0]["cpu_layers"]
    assert mistral[1]["expected_tokens_per_s"] < mistral[0]["expected_tokens_per_s"]
    eight_bit = rows[("mistralai/Mistral-7B-Instruct-v0.3", "8bit")]  # bitsandbytes cannot offload it quantized
    assert eight_bit["verdict"] == "wont_fit" and "bitsandbytes" in eight_bit["note"] and eight_bit["devices"] == []
    assert rows[(result["choice"]["id"], result["choice"]["quant"])]["verdict"] == "stable"  # never chosen by itself
    little_ram = _plan(capsys, *REFERENCE, "--simulate-ram", "4GiB")
    assert not [row for row in little_ram["models"] if row["verdict"] == "offload"]
    assert little_ram["ram"]["headroom_bytes"] == 4 * 1024**3


def test_two_8gb_cards_run_a_model_that_does_not_fit_one(capsys):
    one = {(r["id"], r["quant"]): r["verdict"] for r in _plan(capsys, *REFERENCE, "--simulate-ram", "32GiB")["models"]}
    two = _plan(capsys, "--simulate-gpu", "8GiB,8GiB", "--gui-overhead", "0.7GiB", "--simulate-ram", "32GiB")
    headroom = {f"cuda:{g['cuda_index']}": g["headroom_bytes"] for g in two["gpus"]}
    assert headroom["cuda:1"] > headroom["cuda:0"]  # the desktop is on the first card only
    split = [r for r in two["models"] if r["verdict"] == "stable" and one[(r["id"], r["quant"])] != "stable"]
    assert ("Qwen/Qwen2.5-7B-Instruct", "8bit") in {(r["id"], r["quant"]) for r in split}
    for row in split:
        assert [d["device"] for d in row["devices"]] == ["cuda:0", "cuda:1"] and row["offload"] is None
        assert sum(d["layers"] for d in row["devices"]) == get_spec(row["id"]).n_layers
        assert all(d["bytes"] + two["margin_bytes"] <= headroom[d["device"]] for d in row["devices"])
        assert row["fit"]["compare_max_tokens"] >= 2048 and row["fit"]["sweep_max_tokens"] >= 256
    choice = two["choice"]  # the largest stable model, now across both cards
    assert choice["id"] == "Qwen/Qwen2.5-7B-Instruct" and "split across 2 GPUs" in choice["reason"]
    assert main(["plan", "--simulate-gpu", "8GiB,8GiB", "--gui-overhead", "0.7GiB"]) == 0
    table = capsys.readouterr().out
    assert "also cuda:1" in table and " + cuda:1 " in table and "tokens/s (estimate)" in table
