"""Steering Lab: activation steering (llm-steer) on one consumer GPU without out-of-memory crashes.

Importing this package sets the CUDA allocator options *before* torch is imported anywhere in the
process: `expandable_segments:True` lets PyTorch grow memory segments instead of leaving
reserved-but-unusable fragments on an 8 GB card, and `CUDA_DEVICE_ORDER=PCI_BUS_ID` makes CUDA's
device indices agree with NVML's, which the headroom probe relies on.

torch >= 2.9 reads `PYTORCH_ALLOC_CONF` and falls back to the older `PYTORCH_CUDA_ALLOC_CONF`
only when the new name is unset, so a value the user gives under either name is copied to the
other: whichever name this torch reads, it sees the user's choice, never ours. Nothing here
imports torch (`log_expandable_segments_status` does, lazily, once CUDA is in use).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping

__all__ = ["ALLOCATOR_SETTINGS", "configure_allocator", "log_expandable_segments_status"]

logger = logging.getLogger(__name__)

ALLOC_CONF_NAMES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # torch's order of preference
EXPANDABLE = "expandable_segments:True"
ALLOCATOR_SETTINGS = {
    "PYTORCH_ALLOC_CONF": EXPANDABLE,
    "PYTORCH_CUDA_ALLOC_CONF": EXPANDABLE,
    "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
}


def configure_allocator(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the allocator variables unless the user chose values; return what is now in force.

    Args:
        environ: the environment to change (default: `os.environ`).
    """
    env = os.environ if environ is None else environ
    user = {name: env[name] for name in ALLOC_CONF_NAMES if env.get(name)}
    if not user:
        for name in ALLOC_CONF_NAMES:
            env[name] = EXPANDABLE
    else:
        in_force = user.get("PYTORCH_ALLOC_CONF") or user["PYTORCH_CUDA_ALLOC_CONF"]
        if len(set(user.values())) > 1:
            logger.warning(
                "PYTORCH_ALLOC_CONF=%s and PYTORCH_CUDA_ALLOC_CONF=%s differ; torch uses PYTORCH_ALLOC_CONF",
                user["PYTORCH_ALLOC_CONF"],
                user["PYTORCH_CUDA_ALLOC_CONF"],
            )
        for name in ALLOC_CONF_NAMES:
            env.setdefault(name, in_force)  # mirror the user's value, never a conflicting one
        logger.info("allocator setting from the user kept: %s", in_force)
        if "expandable_segments:true" not in in_force.replace(" ", "").lower():
            logger.info("expandable segments are off by the user's allocator setting")
    order = env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    if order != "PCI_BUS_ID":
        logger.info("CUDA_DEVICE_ORDER=%s set by the user; kept (GPU probe indices may differ)", order)
    if "torch" in sys.modules:
        logger.warning("torch was imported before steering: allocator settings may come too late")
    return {name: env[name] for name in ALLOCATOR_SETTINGS}


def log_expandable_segments_status() -> bool | None:
    """Whether the CUDA allocator really uses expandable segments; call after the first allocation.

    Reads the allocator's memory snapshot, whose segments carry `is_expandable`; falls back to the
    settings string torch parsed. Returns None when CUDA is not in use or nothing is allocated yet.
    """
    if "torch" not in sys.modules:
        return None
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    try:
        segments = torch.cuda.memory.memory_snapshot(include_traces=False)
    except Exception as exc:  # the snapshot API moved between torch versions; the string is enough
        logger.debug("memory snapshot unavailable: %s", exc)
        segments = []
    flags = [bool(s["is_expandable"]) for s in segments if "is_expandable" in s]
    if flags:
        active = any(flags)
    elif segments:
        settings = torch._C._accelerator_getAllocatorSettings().replace(" ", "").lower()
        active = "expandable_segments:true" in settings
    else:
        logger.info("expandable segments: unknown (nothing allocated on CUDA yet)")
        return None
    logger.info("expandable segments %s", "active" if active else "NOT active (fragmentation risk on small cards)")
    return active


configure_allocator()
