"""Importing `steering` sets the CUDA allocator variables before torch, and respects the user's."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import steering

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "CUDA_DEVICE_ORDER")

# Import steering, then torch, and report what the environment and torch's allocator config say.
PROBE = """
import json, os, sys
NAMES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "CUDA_DEVICE_ORDER")
import steering
before_torch = 'torch' in sys.modules
import torch
print(json.dumps({
    "torch_imported_by_steering": before_torch,
    "env": {name: os.environ.get(name) for name in NAMES},
    "torch_allocator_settings": torch._C._accelerator_getAllocatorSettings(),
}))
"""


def run_probe(**user_env: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in NAMES}
    env.update(user_env)
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_sets_expandable_segments_before_torch():
    seen = run_probe()
    assert seen["torch_imported_by_steering"] is False
    assert seen["env"] == {
        "PYTORCH_ALLOC_CONF": "expandable_segments:True",
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
    }
    assert seen["torch_allocator_settings"] == "expandable_segments:True"  # torch parsed our value


def test_user_value_under_the_old_name_is_respected_and_mirrored():
    seen = run_probe(PYTORCH_CUDA_ALLOC_CONF="max_split_size_mb:128")
    assert seen["env"]["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
    # torch >= 2.9 prefers the new name: it must carry the user's value, not ours
    assert seen["env"]["PYTORCH_ALLOC_CONF"] == "max_split_size_mb:128"
    assert seen["torch_allocator_settings"] == "max_split_size_mb:128"


def test_user_value_under_the_new_name_is_respected_and_mirrored():
    seen = run_probe(PYTORCH_ALLOC_CONF="expandable_segments:False", CUDA_DEVICE_ORDER="FASTEST_FIRST")
    assert seen["env"]["PYTORCH_ALLOC_CONF"] == "expandable_segments:False"
    assert seen["env"]["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:False"
    assert seen["env"]["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"
    assert seen["torch_allocator_settings"] == "expandable_segments:False"


def test_configure_allocator_on_a_given_environment(caplog):
    caplog.set_level(logging.INFO, logger="steering")
    env = {"PYTORCH_ALLOC_CONF": "garbage_collection_threshold:0.6", "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"}
    in_force = steering.configure_allocator(env)
    assert in_force["PYTORCH_ALLOC_CONF"] == "garbage_collection_threshold:0.6"  # both user values kept
    assert in_force["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:64"
    assert in_force["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert "differ" in caplog.text and "expandable segments are off" in caplog.text


def test_expandable_status_is_unknown_without_cuda():
    import torch  # noqa: F401  (the status needs torch imported to say anything)

    assert steering.log_expandable_segments_status() is None
