"""The benchmark scripts keep working: `bench/gpu_check.py --dry-run` end to end (toy models of the
catalog's architectures, the real loader, a simulated NVML reference card, CPU), and the JSON
contract of `bench/run.py` in `--smoke` mode (the embedded model, tiny counts).

Both run as subprocesses, as `make bench` and `make gpu-check` run them: the model manager is one
per process, and the scripts' stdout is part of what is checked. No mocks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MATRIX = {"Mistral-7B-Instruct-v0.3", "Qwen2.5-7B-Instruct", "Qwen2.5-1.5B-Instruct", "Llama-3.2-1B-Instruct"}
RUN_KEYS = {
    "steer_overhead_ratio",
    "stock_steer_overhead_ratio",
    "compare_ratio",
    "plain_compare_ratio",
    "compare_minus_plain",
    "sweep_ratio",
    "plain_sweep_ratio",
    "stock_capture_ratio",
    "cold_start_s",
    "warm_start_s",
    "start_ratio",
    "peak_rss_bytes",
    "compare_tokens_identical",
    "sweep_tokens_identical",
}


def _script(args: list[str], timeout_s: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("OUT", None)  # the device machine's output folder must not redirect the JSON
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)


def test_gpu_check_dry_run_reports_every_step(tmp_path, embedded_dir):
    out = tmp_path / "gpu_check.json"
    proc = _script(["bench/gpu_check.py", "--dry-run", "--out", str(out)], timeout_s=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())

    assert result["mode"] == "dry-run" and result["skipped"] == []
    assert result["device"]["mode"] == "simulated"
    assert result["card"]["vram_limit_bytes"] == 8 * 1024**3
    # Estimated vs measured, per term, for every model of the matrix in 4bit and bf16.
    rows = [r for r in result["models"] if "measured_total_bytes" in r]
    assert {(r["model"], r["quant"]) for r in rows} == {(m, q) for m in MATRIX for q in ("4bit", "bf16")}
    for row in rows:
        core_terms = {"weights", "kv_cache", "activations", "steering_capture", "cuda_context"}
        assert set(row["measured"]) >= core_terms and set(row["estimate"]) >= core_terms
        assert row["estimate_need_bytes"] == sum(row["estimate"].values()) > 0
        assert row["measured"]["kv_cache"] == row["estimate"]["kv_cache"]  # read off the real cache
        assert row["ratio"] > 0
    assert {(e["model"], e["quant"]) for e in result["extrapolated"]} == {
        (m, q) for m in ("Mistral-7B-Instruct-v0.3", "Qwen2.5-7B-Instruct") for q in ("4bit", "bf16")
    }
    # The 7B model in bf16 cannot fit the simulated 8 GiB card: the manager downgraded, with an event.
    (down,) = result["downgrades"]
    assert down["plan_verdict"] == "wont_fit" and down["downgraded"]
    event = down["event"]
    assert event["stage"] == "plan" and event["asked"]["quant"] == "bf16"
    assert event["loaded"]["quant"] == "4bit" and "Qwen2.5-1.5B" in event["loaded"]["model"]
    assert result["switches"]["switches"] == 5 and len(result["switches"]["loads"]) == 6
    assert [d["quant"] for d in result["decode"]] == ["4bit", "bf16"]
    # An 8-row sweep at the limit the manager fitted after loading (issue 10).
    sweep = result["sweep_at_fit"]
    assert sweep["rows"] == 8 and sweep["fit"]["basis"] == "simulated" and sweep["fallback"] is None
    assert 0 < sweep["tokens_per_row"] <= sweep["fit"]["sweep_max_tokens"] <= sweep["fit"]["compare_max_tokens"]
    assert sweep["estimated_request_bytes"] > 0 and sweep["oom_retry"].startswith("skipped")
    assert all(d["tokens_per_s"] > 0 and d["bound_tokens_per_s"] > 0 for d in result["decode"])
    # The short table comes last.
    assert proc.stdout.strip().splitlines()[-1].startswith("dry-run run on Simulated")


def test_bench_run_prints_one_json_object(tmp_path, embedded_dir):
    out = tmp_path / "latest.json"
    proc = _script(["bench/run.py", "--smoke", "--json", "--out", str(out)], timeout_s=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout[:2000]
    result = json.loads(lines[0])

    assert RUN_KEYS <= set(result)
    for key in ("steer_overhead_ratio", "stock_steer_overhead_ratio", "compare_ratio", "plain_compare_ratio",
                "sweep_ratio", "plain_sweep_ratio", "stock_capture_ratio", "warm_start_s"):  # fmt: skip
        assert isinstance(result[key], float) and result[key] > 0, key
    assert result["compare_minus_plain"] == result["compare_ratio"] - result["plain_compare_ratio"]
    assert result["cold_start_s"] is None and result["start_ratio"] is None  # --smoke skips the cold start
    assert result["peak_rss_bytes"] > 100 * 1024**2
    # Batched rows must give the same tokens as separate runs, ours and plain transformers' alike.
    assert result["compare_tokens_identical"] is True
    assert result["sweep_tokens_identical"] is True
    assert result["details"]["compare"]["plain"]["tokens_identical"] is True
    assert result["details"]["sweep"]["plain"]["tokens_identical"] is True
    assert set(result["targets"]) == {
        "steer_overhead_ratio", "compare_ratio", "compare_minus_plain", "sweep_ratio", "cold_start_s"
    }  # fmt: skip
    assert result["targets"]["cold_start_s"]["met"] is None  # not measured in --smoke
    assert json.loads(out.read_text()) == result


def test_cpu_speed_prints_each_quantizations_speed_and_4bit_is_the_slowest():
    """bench/cpu_speed.py, where the Memory tab's CPU speeds come from: one JSON object with a row
    per quantization; bitsandbytes' NF4 dequantizes every weight each step, so on a CPU it is the
    slowest per token (measured 4.3x fp32's time; the check leaves room for a noisy machine)."""
    done = _script(["bench/cpu_speed.py", "--threads", "1", "--repeats", "1"], timeout_s=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    rows = result["rows"]
    assert set(rows) == {"fp32", "bf16", "4bit"} and rows["fp32"]["time_vs_fp32"] == 1.0
    assert all(row["tokens_per_s"] > 0 and row["seconds_per_weight_gb"] > 0 for row in rows.values())
    assert rows["4bit"]["time_vs_fp32"] > 1.5
