"""Command line: `python -m steering plan ...` (more verbs can be added as subcommands).

`plan` probes the GPUs through NVML (or simulated cards), estimates every catalog model in every
sensible quantization, and prints the device reading, the matrix and the choice; `--json` prints
exactly one JSON object instead. A model that does not fit one card is placed across the GPUs and
CPU RAM by accelerate on a meta-device model: only then is torch imported (never CUDA). Bad flags
or sizes: one line, exit 2.

    python -m steering plan --simulate-gpu 8GiB --gui-overhead 0.7GiB
    python -m steering plan --simulate-gpu 8GiB,8GiB --gui-overhead 0.7GiB --simulate-ram 32GiB
    python -m steering plan --model Qwen/Qwen2.5-7B-Instruct --vram-limit 6GiB --json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from steering import catalog, estimate, gpu, planning
from steering.errors import ModelUnavailableError

logger = logging.getLogger(__name__)


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints the whole usage on an error; a one-line message is easier to read in a log."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _size(text: str) -> int:
    try:
        return gpu.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _sizes(text: str) -> list[int]:
    try:
        return gpu.parse_sizes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def add_plan_arguments(plan_parser: argparse.ArgumentParser) -> None:
    plan_parser.add_argument("--model", help="catalog id, cached hub id or local folder to plan for")
    plan_parser.add_argument("--quant", default="auto", choices=("auto",) + estimate.QUANTS)
    plan_parser.add_argument("--context", type=_positive_int, default=2048, help="tokens per row (default 2048)")
    plan_parser.add_argument("--rows", type=_positive_int, default=2, help="rows per batch (default 2)")
    plan_parser.add_argument("--vram-limit", type=_size, metavar="SIZE", help="cap on VRAM the app may use")
    plan_parser.add_argument("--margin", type=_size, metavar="SIZE", default=estimate.MARGIN_DEFAULT_BYTES)
    plan_parser.add_argument("--cuda-index", type=int, default=0, help="CUDA device index (default 0)")
    plan_parser.add_argument(
        "--simulate-gpu", type=_sizes, metavar="SIZE[,SIZE...]", help="plan for simulated cards (8GiB or 8GiB,8GiB)"
    )
    plan_parser.add_argument(
        "--gui-overhead", type=_size, metavar="SIZE", help="desktop VRAM on the (first) simulated card"
    )
    plan_parser.add_argument(
        "--simulate-ram", type=_size, metavar="SIZE", help="plan as if this much system RAM were available (offload)"
    )
    plan_parser.add_argument(
        "--fallback-model",
        metavar="ID",
        default=catalog.FALLBACK_ID,
        help=f"model the app downgrades to, in {catalog.FALLBACK_QUANT} (default {catalog.FALLBACK_ID})",
    )
    plan_parser.add_argument("--json", action="store_true", help="print one JSON object")


def run_plan(args: argparse.Namespace) -> int:
    if args.gui_overhead is not None and args.simulate_gpu is None:
        print("python -m steering plan: error: --gui-overhead needs --simulate-gpu", file=sys.stderr)
        return 2
    backend = None
    if args.simulate_gpu is not None:
        try:
            backend = gpu.simulate_gpu(args.simulate_gpu, args.gui_overhead or 0)
        except ValueError as exc:
            print(f"python -m steering plan: error: {exc}", file=sys.stderr)
            return 2
    with gpu.use_nvml(backend):
        gpus = gpu.probe_all(vram_limit_bytes=args.vram_limit)
        reading = gpu.probe(args.cuda_index, vram_limit_bytes=args.vram_limit)
    ram = gpu.system_ram(args.simulate_ram) if args.simulate_ram is not None else None
    try:
        result = planning.plan(
            reading,
            gpus=gpus,
            ram=ram,
            model=args.model,
            quant=args.quant,
            context_tokens=args.context,
            margin_bytes=args.margin,
            batch_rows=args.rows,
            fallback=(args.fallback_model, catalog.FALLBACK_QUANT),
        )
    except ModelUnavailableError as exc:
        print(f"python -m steering plan: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(render_plan(result, margin_bytes=args.margin, context_tokens=args.context, rows=args.rows))
    return 0


def render_plan(result: dict, *, margin_bytes: int, context_tokens: int, rows: int) -> str:
    """The human-readable plan: device, processes, matrix with breakdown and verdict, choice."""
    fmt = gpu.format_bytes
    device = result["device"]
    others = [g for g in result.get("gpus", []) if g.get("cuda_index") != device.get("cuda_index")]
    lines = [f"Device: {device['name']} [{device['mode']}]"]
    for other in others:
        lines.append(
            f"  also cuda:{other['cuda_index']} {other['name']}: total {fmt(other['total_bytes'])}, "
            f"headroom {fmt(other['headroom_bytes'])}"
        )
    if result.get("ram"):
        lines.append(f"  system RAM available for offloaded layers: {fmt(result['ram']['headroom_bytes'])}")
    if device["reason"]:
        lines.append(f"  {device['reason']}")
    if device["mode"] != "cpu":
        cc = device["compute_capability"]
        lines.append(
            f"  total {fmt(device['total_bytes'])}, used {fmt(device['used_bytes'])}, "
            f"free {fmt(device['free_bytes'])}, driver-reserved {fmt(device['reserved_bytes'])}, "
            f"compute capability {cc[0]}.{cc[1]}" + ("" if device["supports_bf16"] else " (no native bf16)")
        )
        for proc in device["processes"]:
            tag = " desktop" if proc["desktop"] else ""
            lines.append(f"  pid {proc['pid']:>7} {proc['kind']:<8} {fmt(proc['used_bytes']):>11}  {proc['name']}{tag}")
        lines.append(f"  desktop overhead {fmt(device['desktop_overhead_bytes'])}")
    else:
        lines.append(f"  RAM total {fmt(device['total_bytes'])}, available {fmt(device['free_bytes'])}")
    limit = device["vram_limit_bytes"]
    lines.append(
        f"Headroom {fmt(result['headroom_bytes'])}" + (f" (--vram-limit {fmt(limit)})" if limit else "")
        + f"; margin {fmt(margin_bytes)}; {rows} rows x {context_tokens} tokens"
    )  # fmt: skip
    terms = list(dict.fromkeys(t for row in result["models"] for t in row["breakdown"]))
    short = {"weights": "weights", "kv_cache": "kv", "activations": "activ", "load_extra": "load+",
             "steering_capture": "steer", "cuda_context": "context", "scoring": "score"}  # fmt: skip
    header = f"{'model':<36} {'quant':<5} {'need':>10}  " + " ".join(f"{short.get(t, t):>9}" for t in terms)
    header += f"  {'verdict':<9} {'compare':>8} {'sweep':>7}  split"
    lines += ["", header, "-" * len(header)]
    for row in result["models"]:
        cells = " ".join(f"{row['breakdown'].get(t, 0) / gpu.GiB:>9.2f}" for t in terms)
        fit = row.get("fit") or {}
        lines.append(
            f"{row['id']:<36} {row['quant']:<5} {fmt(row['need_bytes']):>10}  {cells}  {row['verdict']:<9} "
            f"{fit.get('compare_max_tokens', '-'):>8} {fit.get('sweep_max_tokens', '-'):>7}  {split_text(row)}"
        )
    lines.append(
        "(breakdown columns in GiB; need = the larger of the compare above and an 8-row sweep of "
        f"{estimate.SWEEP_PLAN_TOKENS} tokens; compare / sweep: the longest prompt + new tokens per row that fit "
        "with the margin; split: layers per device of a model that does not run on one card, and for `offload` "
        "the estimated decoding speed)"
    )
    choice = result["choice"]
    lines += ["", f"Choice: {choice['id']} {choice['quant']}", f"  {choice['reason']}"]
    return "\n".join(lines)


def split_text(row: dict) -> str:
    """'cuda:0 16 + cuda:1 16 layers', or with an offload 'cuda:0 9 + cpu 23 layers, ~1.15 tokens/s'."""
    devices = row.get("devices") or []
    if len(devices) < 2:
        return ""
    text = " + ".join(f"{d['device']} {d['layers']}" for d in devices) + " layers"
    offload = row.get("offload")
    return text + (f", ~{offload['expected_tokens_per_s']} tokens/s (estimate)" if offload else "")


# verb -> (help, add its arguments, run it and return the exit code). A new verb (e.g. `convert`)
# is one more entry here; `main` and the one-line error handling need no change.
VERBS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "plan": ("show which model fits this GPU and why", add_plan_arguments, run_plan),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="python -m steering", description="Steering Lab command-line tools.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens (to stderr)")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=_OneLineParser)
    for name, (help_text, add_arguments, _) in VERBS.items():
        add_arguments(verbs.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a verb; returns the process exit code (2 for bad flags)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on bad flags (2)
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return VERBS[args.verb][2](args)


if __name__ == "__main__":
    sys.exit(main())
