"""The plan: where each model fits on this machine, and which one to load.

`plan()` runs every catalog model in every sensible quantization against one `DeviceReading`
(plus, with several cards, the others and the CPU RAM) and picks one: the requested model when
it is stable, else the largest stable model, else the fallback (Qwen2.5-1.5B-Instruct in 4-bit).
`choose_quant()` / `resolve_quant()` serve the loader's "auto"; `placement()` says where a model
runs a workload: on one card, split across cards, or with layers offloaded to CPU RAM
(steering/devices.py, through accelerate). The memory need itself is steering/estimate.py's.
Plain Python at import: torch, transformers and accelerate load only inside devices' functions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from steering import devices
from steering.catalog import CATALOG, EMBEDDED_ID, FALLBACK_ID, FALLBACK_QUANT, ModelSpec, gated_message, get_spec
from steering.errors import ModelUnavailableError
from steering.estimate import (
    MARGIN_DEFAULT_BYTES,
    SWEEP_PLAN_TOKENS,
    SWEEP_ROWS,
    Estimate,
    check_quant,
    estimate,
    fit_limits,
    request_estimate,
    verdict,
)
from steering.gpu import DeviceReading, format_bytes, system_ram

logger = logging.getLogger(__name__)

SMALL_MODEL_PARAMS = 500_000_000  # below this, fp32 is a sensible choice even on a GPU


def sensible_quants(spec: ModelSpec, reading: DeviceReading) -> list[str]:
    """Quantizations worth listing for `spec` on `reading`, highest precision first."""
    if not reading.is_gpu:
        return ["fp32", "bf16", "8bit", "4bit"]
    sixteen = ["bf16"] if reading.supports_bf16 else ["fp16", "bf16"]  # fp16 is native below 8.0
    wide = ["fp32"] if spec.n_params < SMALL_MODEL_PARAMS else []
    return wide + sixteen + ["8bit", "4bit"]


def workload_estimate(
    spec: ModelSpec, quant: str, reading: DeviceReading, context_tokens: int = 2048, batch_rows: int = 2
) -> tuple[Estimate, str]:
    """The plan's standard workload: the larger of a `batch_rows`-row compare at the planned
    context and an 8-row sweep of SWEEP_PLAN_TOKENS tokens per row (with its scoring passes);
    returns it and which of the two it is ("compare" or "sweep")."""
    device = dict(on_gpu=reading.is_gpu, compute_capability=reading.compute_capability)
    compare = estimate_for(spec, quant, reading, context_tokens, batch_rows)
    sweep = request_estimate(spec, quant, SWEEP_ROWS, SWEEP_PLAN_TOKENS, **device)
    return (sweep, "sweep") if sweep.need_bytes > compare.need_bytes else (compare, "compare")


def estimate_for(
    spec: ModelSpec, quant: str, reading: DeviceReading, context_tokens: int = 2048, batch_rows: int = 2
) -> Estimate:
    """`estimate()` with the device facts (GPU or CPU, compute capability) taken from `reading`."""
    return estimate(
        spec,
        quant,
        context_tokens,
        batch_rows,
        on_gpu=reading.is_gpu,
        compute_capability=reading.compute_capability,
    )


def choose_quant(
    spec: ModelSpec,
    reading: DeviceReading,
    *,
    context_tokens: int = 2048,
    margin_bytes: int = MARGIN_DEFAULT_BYTES,
    batch_rows: int = 2,
) -> str | None:
    """The highest-precision quantization of `spec` that is stable on `reading`; None if none is."""
    for quant in sensible_quants(spec, reading):
        need = estimate_for(spec, quant, reading, context_tokens, batch_rows).need_bytes
        if verdict(need, reading.headroom_bytes, margin_bytes) == "stable":
            return quant
    return None


def resolve_quant(
    spec: ModelSpec,
    quant: str,
    reading: DeviceReading,
    *,
    context_tokens: int = 2048,
    margin_bytes: int = MARGIN_DEFAULT_BYTES,
    batch_rows: int = 2,
) -> str:
    """`quant` itself, or for "auto" the best stable one (4bit when nothing is stable)."""
    if quant != "auto":
        check_quant(quant)
        return quant
    chosen = choose_quant(
        spec, reading, context_tokens=context_tokens, margin_bytes=margin_bytes, batch_rows=batch_rows
    )
    return chosen or "4bit"


def placement(
    spec: ModelSpec,
    quant: str,
    est: Estimate,
    gpus: Sequence[DeviceReading],
    ram: DeviceReading | Callable[[], DeviceReading] | None,
    margin_bytes: int = MARGIN_DEFAULT_BYTES,
):
    """Where `spec` in `quant` runs the workload `est` (a `steering.devices.Placement`): the whole
    model on the first device when that is stable; otherwise, through accelerate, split across
    the GPUs (`stable` when each keeps its margin) or, for what is `wont_fit` on one card, with
    layers left in CPU RAM (`offload`). A `fragile` single card stays fragile: a split is tried
    only with several GPUs. `ram` may be a callable, read only when an offload is considered."""
    first = gpus[0]
    single = verdict(est.need_bytes, first.headroom_bytes, margin_bytes)
    if single == "stable" or not first.is_gpu:
        return replace_verdict(devices.single_card(spec, est, first), single)
    if len(gpus) > 1 or single == "wont_fit":
        placed = devices.place(spec, quant, est, gpus, ram() if callable(ram) else ram, margin_bytes=margin_bytes)
        if placed.verdict == "stable" or (placed.verdict == "offload" and single == "wont_fit"):
            return placed
        if single == "wont_fit":
            return devices.Placement(verdict="wont_fit", note=placed.note)
    return replace_verdict(devices.single_card(spec, est, first), single)


def replace_verdict(placed, new_verdict: str):
    placed.verdict = new_verdict
    return placed


def plan_row(
    spec: ModelSpec,
    quant: str,
    gpus: Sequence[DeviceReading],
    ram: DeviceReading | Callable[[], DeviceReading] | None,
    *,
    context_tokens: int = 2048,
    margin_bytes: int = MARGIN_DEFAULT_BYTES,
    batch_rows: int = 2,
) -> tuple[dict, object]:
    """One row of the plan (need, breakdown, verdict, devices, offload, fitted limits) and its
    `Placement` (with accelerate's device map, for the loader)."""
    from steering import devices

    first = gpus[0]
    est, workload = workload_estimate(spec, quant, first, context_tokens, batch_rows)
    placed = placement(spec, quant, est, gpus, ram, margin_bytes)
    if len(placed.bytes) > 1:
        fit = devices.split_fit(spec, quant, placed, gpus, margin_bytes=margin_bytes, loaded=False)
    else:
        fit = fit_limits(spec, quant, first, margin_bytes=margin_bytes, loaded=False)
    row = {
        "id": spec.id,
        "quant": quant,
        "need_bytes": est.need_bytes,
        "breakdown": dict(est.breakdown),
        "verdict": placed.verdict,
        "workload": workload,
        "fit": fit,
        "devices": placed.devices() if placed.verdict != "wont_fit" else [],
        "offload": placed.offload(),
    }
    if placed.note:
        row["note"] = placed.note
    return row, placed


def plan(
    reading: DeviceReading,
    *,
    model: str | None = None,
    quant: str = "auto",
    context_tokens: int = 2048,
    margin_bytes: int = MARGIN_DEFAULT_BYTES,
    batch_rows: int = 2,
    fallback: tuple[str, str] = (FALLBACK_ID, FALLBACK_QUANT),
    gpus: Sequence[DeviceReading] | None = None,
    ram: DeviceReading | None = None,
) -> dict:
    """The `python -m steering plan --json` object: device, headroom, matrix and choice.

    `reading` is the first device; `gpus` every visible GPU (default: `reading` alone) and `ram`
    the system RAM that offloaded layers would use (default: read when first needed).
    `fallback` is the (model, quantization) the app downgrades to (`--fallback-model`): the
    choice names it when the requested model, or every catalog model, is not stable.
    Raises `ModelUnavailableError` (from `get_spec`) when `model` cannot be resolved offline.
    """
    if quant != "auto":
        check_quant(quant)
    check_quant(fallback[1])
    headroom = reading.headroom_bytes
    gpus = list(gpus) if gpus else [reading]
    ram_reading: list[DeviceReading] = [ram] if ram is not None else []

    def read_ram() -> DeviceReading:
        if not ram_reading:
            ram_reading.append(system_ram())
        return ram_reading[0]

    requested = get_spec(model) if model else None
    try:
        fallback_spec: ModelSpec | str = get_spec(fallback[0])
    except ModelUnavailableError as exc:  # the plan still answers; the choice says why
        fallback_spec = f"the fallback {fallback[0]} cannot be had ({exc})"
    specs = list(CATALOG)
    for extra in (requested, fallback_spec):
        if isinstance(extra, ModelSpec) and extra not in specs:
            specs.append(extra)

    rows: list[dict] = []
    for spec in specs:
        quants = sensible_quants(spec, reading)
        for extra_quant, owner in ((quant, requested), (fallback[1], fallback_spec)):
            if spec is owner and extra_quant != "auto" and extra_quant not in quants:
                quants.append(extra_quant)
        for q in quants:
            row, _ = plan_row(
                spec, q, gpus, read_ram, context_tokens=context_tokens, margin_bytes=margin_bytes, batch_rows=batch_rows
            )
            rows.append(row)
    verdicts = {(r["id"], r["quant"]): r for r in rows}
    choice = _choose(reading, requested, quant, verdicts, margin_bytes, (fallback_spec, fallback[1]))
    result = {
        "device": reading.to_dict(),
        "gpus": [gpu_reading.to_dict() for gpu_reading in gpus] if reading.is_gpu else [],
        "headroom_bytes": headroom,
        "margin_bytes": margin_bytes,
        "models": rows,
        "choice": choice,
    }
    if ram_reading:
        result["ram"] = ram_reading[0].to_dict()
    return result


def _fits_text(row: dict, headroom: int, margin: int) -> str:
    split = row.get("devices") or []
    if len(split) > 1:
        parts = ", ".join(f"{d['device']} {d['layers']} layers {format_bytes(d['bytes'])}" for d in split)
        return f"split across {len(split)} GPUs ({parts}), each keeping a {format_bytes(margin)} margin"
    return f"needs {format_bytes(row['need_bytes'])} + {format_bytes(margin)} margin, headroom {format_bytes(headroom)}"


def _choose(
    reading: DeviceReading,
    requested: ModelSpec | None,
    quant: str,
    rows: dict,
    margin: int,
    fallback: tuple[ModelSpec | str, str],
) -> dict:
    headroom = reading.headroom_bytes

    def best(spec: ModelSpec) -> dict | None:
        order = [quant] if quant != "auto" else sensible_quants(spec, reading)
        for q in order:
            row = rows.get((spec.id, q))
            if row is not None and row["verdict"] == "stable":
                return row
        return None

    if requested is not None:
        row = best(requested)
        gated = gated_message(requested)
        if row is not None and gated is None:
            return {
                "id": requested.id,
                "quant": row["quant"],
                "reason": f"requested; stable: {_fits_text(row, headroom, margin)}",
            }
        why = gated or _why_not_stable(requested, quant, rows, headroom, margin)
        return _fallback(reading, rows, margin, why, fallback)

    if not reading.is_gpu:
        return {
            "id": EMBEDDED_ID,
            "quant": "fp32",
            "reason": f"CPU mode ({reading.reason}): the embedded model runs on the CPU",
        }
    skipped: list[str] = []
    for spec in sorted(CATALOG, key=lambda s: s.n_params, reverse=True):
        row = best(spec)
        if row is None:
            continue
        if gated_message(spec) is not None:
            skipped.append(f"{spec.id} is gated and HF_TOKEN is not set")
            continue
        note = f" ({'; '.join(skipped)})" if skipped else ""
        return {
            "id": spec.id,
            "quant": row["quant"],
            "reason": f"largest stable model of the matrix: {_fits_text(row, headroom, margin)}{note}",
        }
    return _fallback(reading, rows, margin, "no catalog model is stable here", fallback)


def _why_not_stable(spec: ModelSpec, quant: str, rows: dict, headroom: int, margin: int) -> str:
    # for "auto" the lowest-memory quantization (4bit) says by how much even the best case misses
    row = rows[(spec.id, "4bit" if quant == "auto" else quant)]
    what = (
        f"{spec.id} is not stable here in any quantization" if quant == "auto" else f"{spec.id} {quant} is not stable"
    )
    return f"{what} ({row['quant']} is {row['verdict']}: {_fits_text(row, headroom, margin)})"


def _fallback(reading: DeviceReading, rows: dict, margin: int, why: str, fallback: tuple[ModelSpec | str, str]) -> dict:
    spec, quant = fallback
    embedded = {"id": EMBEDDED_ID, "quant": "fp32"}
    if isinstance(spec, str):  # the configured fallback cannot be resolved here
        return {**embedded, "reason": f"{why}; {spec}, so the embedded model runs on the CPU"}
    row = rows.get((spec.id, quant))
    if row is not None and row["verdict"] == "stable":
        # The plan is about memory: a gated fallback is still named, with what it needs to load.
        gated = gated_message(spec)
        return {
            "id": spec.id,
            "quant": quant,
            "reason": f"{why}; falling back to {spec.id} {quant}: {_fits_text(row, reading.headroom_bytes, margin)}"
            + (f" ({gated})" if gated else ""),
        }
    return {
        **embedded,
        "reason": f"{why}; the fallback {spec.id} {quant} does not fit with the margin either, "
        "so the embedded model runs on the CPU",
    }
