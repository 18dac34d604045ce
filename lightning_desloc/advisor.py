"""Period advisor, ``python -m lightning_desloc periods ...``: ``K_x`` and each optimizer state's period
for a model size, link and step time, by the policy of ``param_sync_every="auto"``
(:func:`~lightning_desloc.adaptive.choose_periods`, :func:`~lightning_desloc.adaptive.period_cap`).

**Round-time model.** ``"auto"`` *measures* a parameter average; the advisor has no run to time, so it
*models* one as a ring all-reduce of ``B`` bytes over ``M`` ranks: each rank sends (and receives)
``2(M-1)/M * B`` bytes in ``2(M-1)`` latency-bound steps::

    t_round [s] = 2(M-1)/M * B [bytes] / bandwidth [bytes/s] + 2(M-1) * latency [s]
    B [bytes]   = params * bytes_per_param

A state is as large as the parameters and its period is a multiple of ``K_x``, so it rides in a
parameter round and adds only its bytes, ``2(M-1)/M * B / bandwidth``. With blocking rounds (no overlap)
the expected time per step is ``t_step + t_round / K_x + sum_k 2(M-1)/M * B / bandwidth / K_k``; DDP
all-reduces ``B`` bytes of gradients every step (``t_step + t_round``); Local Adam averages the
parameters and every state every ``K_x`` steps.

Example (1M fp32 parameters, 2 ranks, 100 Mbit/s, 100 ms steps)::

    >>> advice = advise(params=1_000_000, bandwidth_Bps=parse_bandwidth("100mbit"), step_time_s=0.1)
    >>> round(advice["model"]["round_time_s"], 3), advice["recommendation"]
    (0.32, {'param_sync_every': 64, 'state_sync_every': {'exp_avg': 192, 'exp_avg_sq': 704}})
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

from lightning_desloc.adaptive import choose_periods, half_life, period_cap
from lightning_desloc.schedule import FIRST_MOMENT_FACTOR, SECOND_MOMENT_FACTOR, SECOND_MOMENT_KEYS

#: the bounds ``choose_periods`` clips ``K_x`` to by default (steps); the table's candidates lie within
MIN_PERIOD, MAX_PERIOD = 8, 1024
MAX_ROWS = 8
_SI = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_COUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbgt]?)\s*$", re.IGNORECASE)
# <number> <SI prefix>[i] <bit|b = bits; byte|B = bytes> [/s|ps]; "MiB" is 2**20 bytes
_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(bits?|bytes?|b)(/s|ps)?\s*$", re.IGNORECASE)


def parse_count(text: str) -> int:
    """A parameter count: ``"124M"`` -> 124_000_000, ``"1.3B"`` (billions), ``"350k"``, ``"1000000"``."""
    match = _COUNT.match(str(text))
    if not match:
        raise ValueError(f"not a parameter count: {text!r}")
    suffix = match.group(2).lower().replace("b", "g")  # B(illion) = G
    return int(round(float(match.group(1)) * _SI[suffix]))


def parse_bandwidth(text: str) -> float:
    """A link rate in bytes/s: ``"1gbit"``/``"1Gbps"`` -> 125e6, ``"25MB/s"`` -> 25e6 (``b``, ``bit``: bits;
    ``B``, ``byte``: bytes; ``Ki``/``Mi``/...: powers of 1024)."""
    match = _RATE.match(str(text))
    if not match:
        raise ValueError(f"not a bandwidth: {text!r}")
    number, prefix, binary, unit = match.group(1), match.group(2).lower(), match.group(3), match.group(4)
    scale = 1024.0 ** ("kmgt".index(prefix) + 1) if binary and prefix else _SI[prefix]
    is_bits = unit.lower().startswith("bit") or unit == "b"
    return float(number) * scale / (8.0 if is_bits else 1.0)


def ring_round_time(nbytes: float, workers: int, bandwidth_Bps: float, latency_s: float = 0.0) -> float:
    """Seconds of a ring all-reduce of ``nbytes`` bytes over ``workers`` ranks (model in the docstring)."""
    return 2 * (workers - 1) / workers * nbytes / bandwidth_Bps + 2 * (workers - 1) * latency_s


def optimizer_state_betas(optimizer: str, beta1: float = 0.9, beta2: float = 0.999,
                          momentum: float = 0.9) -> dict[str, float]:
    """The averaged state keys of ``"adam"`` or ``"sgd"`` and the decay rate behind each."""
    return {"exp_avg": beta1, "exp_avg_sq": beta2} if optimizer == "adam" else {"momentum_buffer": momentum}


def advise(params: int, bandwidth_Bps: float, step_time_s: float, bytes_per_param: float = 4.0,
           workers: int = 2, latency_s: float = 0.0, betas: Optional[Mapping[str, float]] = None,
           comm_budget: float = 0.05, total_steps: Optional[int] = None, min_param_syncs: int = 32) -> dict[str, Any]:
    """The inputs echoed, the recommendation, the model's numbers and the table of candidate ``K_x`` (times
    in seconds, bytes sent per rank), as a JSON-ready dict; ``latency_s`` one-way, seconds."""
    betas = dict(optimizer_state_betas("adam") if betas is None else betas)
    param_bytes = params * bytes_per_param
    round_s = ring_round_time(param_bytes, workers, bandwidth_Bps, latency_s)
    wire_bytes = 2 * (workers - 1) / workers * param_bytes  # sent per rank per round of one tensor set
    state_round_s = wire_bytes / bandwidth_Bps  # a state riding in a parameter round: bytes, no latency
    cap = period_cap(total_steps, min_param_syncs, MIN_PERIOD, MAX_PERIOD)
    k_x, periods = choose_periods(step_time_s, round_s, betas, comm_budget, MIN_PERIOD, cap)

    def row(k: int) -> dict[str, Any]:
        # the policy's state periods at this K_x: force it by clipping to [k, k]
        state_periods = choose_periods(step_time_s, round_s, betas, comm_budget, k, k)[1]
        rounds_per_step = 1 / k + sum(1 / p for p in state_periods.values())  # tensor sets sent per step
        return {"param_sync_every": k, "state_sync_every": state_periods,
                "link_share": round_s / (k * step_time_s + round_s),
                "time_per_step_s": step_time_s + round_s / k + sum(state_round_s / p for p in state_periods.values()),
                "bytes_per_step": wire_bytes * rounds_per_step,
                "vs_ddp": 1 / rounds_per_step, "vs_local": (1 + len(betas)) / k / rounds_per_step,
                "recommended": k == k_x, "over_cap": k > cap}

    candidates = [2 ** e for e in range(int(math.log2(MIN_PERIOD)), int(math.log2(MAX_PERIOD)) + 1)]
    first = min(max(candidates.index(k_x) - MAX_ROWS // 2 + 1, 0), max(len(candidates) - MAX_ROWS, 0))
    return {
        "inputs": {"params": params, "bytes_per_param": bytes_per_param, "link_Bps": bandwidth_Bps,
                   "latency_ms": latency_s * 1e3, "workers": workers, "step_time_s": step_time_s,
                   "comm_budget": comm_budget, "steps": total_steps, "min_param_syncs": min_param_syncs},
        "recommendation": {"param_sync_every": k_x, "state_sync_every": periods},
        "half_lives": {key: half_life(beta) for key, beta in betas.items()},
        "betas": betas,
        "model": {"param_bytes": param_bytes, "round_time_s": round_s, "state_round_time_s": state_round_s,
                  "ideal_param_sync_every": round_s / (comm_budget * step_time_s), "max_period": cap},
        "ddp": {"time_per_step_s": step_time_s + round_s, "bytes_per_step": wire_bytes},
        "table": [row(k) for k in candidates[first:first + MAX_ROWS]],
    }


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def format_report(advice: Mapping[str, Any]) -> str:
    """The text report: the model's numbers, the policy's reasoning step by step, the table."""
    inp, model, rec = advice["inputs"], advice["model"], advice["recommendation"]
    m, ms = inp["workers"], lambda s: f"{s * 1e3:.1f} ms"
    k_x, cap = rec["param_sync_every"], model["max_period"]
    local = "Local Adam" if "exp_avg_sq" in advice["betas"] else "Local SGD"
    budget_k = 2 ** max(0, math.ceil(math.log2(max(model["ideal_param_sync_every"], 1.0))))  # before clipping
    lines = [
        f"Model: {inp['params']:,} params x {inp['bytes_per_param']:g} B = {_si(model['param_bytes'], 'B')} per "
        f"round, {m} workers, link {_si(inp['link_Bps'], 'B/s')} ({_si(inp['link_Bps'] * 8, 'bit/s')}), "
        f"latency {inp['latency_ms']:g} ms",
        f"Round (ring all-reduce model): 2(M-1)/M * B / bw + 2(M-1) * latency = {2 * (m - 1) / m:.3g} * "
        f"{_si(model['param_bytes'], 'B')} / {_si(inp['link_Bps'], 'B/s')} + {2 * (m - 1)} * {inp['latency_ms']:g} ms"
        f" = {ms(model['round_time_s'])}",
        f"K_x: round / (budget * step) = {ms(model['round_time_s'])} / ({inp['comm_budget']:g} * "
        f"{ms(inp['step_time_s'])}) = {model['ideal_param_sync_every']:.1f} -> power of two "
        f"{budget_k}, clipped to [{MIN_PERIOD}, {cap}]: {k_x}",
        (f"     cap: --steps {inp['steps']} / --min-param-syncs {inp['min_param_syncs']} -> K_x <= {cap}"
         if inp["steps"] else "     cap: run length unknown (pass --steps to keep >= --min-param-syncs averages)"),
        "States: K_k = K_x * ceil(max(m * K_x, half-life) / K_x), m = 3 first moment, 6 second",
    ]
    for key, beta in advice["betas"].items():
        factor = SECOND_MOMENT_FACTOR if key in SECOND_MOMENT_KEYS else FIRST_MOMENT_FACTOR
        tau = advice["half_lives"][key]
        lines.append(f"  {key:<16} beta {beta:<7g} half-life {tau:7.1f} steps   max({factor} x {k_x}, {tau:.1f})"
                     f" -> {rec['state_sync_every'][key]}")
    if model["round_time_s"] > inp["comm_budget"] * k_x * inp["step_time_s"]:
        lines.append(f"  note: the cap wins over the budget; parameter rounds take "
                     f"{model['round_time_s'] / (k_x * inp['step_time_s']):.0%} of the compute time at K_x = {k_x}")
    lines += [f"Recommended: param_sync_every={k_x}, state_sync_every={rec['state_sync_every']}", ""]
    keys = list(advice["betas"])
    header = ["", "K_x", *keys, "link share", "ms/step", "MB/step", "vs DDP", f"vs {local}"]
    rows = [["*" if r["recommended"] else (">" if r["over_cap"] else ""), str(r["param_sync_every"]),
             *(str(r["state_sync_every"][k]) for k in keys), f"{r['link_share']:.1%}",
             f"{r['time_per_step_s'] * 1e3:.1f}", f"{r['bytes_per_step'] / 1e6:.3g}",
             f"{r['vs_ddp']:.1f}x", f"{r['vs_local']:.2f}x"] for r in advice["table"]]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header, *rows]]
    lines += [
        f"DDP (gradient all-reduce every step, blocking): {advice['ddp']['time_per_step_s'] * 1e3:.1f} ms/step, "
        f"{advice['ddp']['bytes_per_step'] / 1e6:.3g} MB/step per rank",
        "* recommended, > above the cap; link share: round / (K_x * step + round); "
        "ms/step adds the state rounds' bytes",
        f"vs DDP, vs {local}: their bytes per step over DES-LOC's (higher: DES-LOC sends less)",
    ]
    return "\n".join(lines)


def _checked(flag: str, example: str, parse: Callable[[str], Any], ok: Callable[[Any], bool], what: str):
    """An argparse type: ``parse`` then ``ok``; the error names ``flag``, the rule and a valid example."""
    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"{what}, got {text!r}; e.g. {flag} {example}")
        return value
    return convert


class _OneLineErrors(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # one line naming the flag; the usage block argparse adds would bury it
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(prog: str = "python -m lightning_desloc periods") -> argparse.ArgumentParser:
    pos, unit = (lambda v: v > 0), (lambda v: 0 < v < 1)
    parser = _OneLineErrors(prog=prog, description="Recommend DES-LOC periods K_x, K_u, K_v for a setting "
                                                   "(the policy of param_sync_every='auto', modelled round time).")

    def flag(name: str, example: str, parse: Callable[[str], Any], ok: Callable[[Any], bool], what: str,
             metavar: str, help_text: str, **kwargs: Any) -> None:
        parser.add_argument(name, type=_checked(name, example, parse, ok, what), metavar=metavar, help=help_text, **kwargs)

    flag("--params", "124M", parse_count, pos, "a parameter count > 0 (k, M, B)", "COUNT",
         "model size in parameters: 350k, 124M, 1.3B or an integer", required=True)
    flag("--bytes-per-param", "2", float, pos, "bytes > 0", "BYTES",
         "bytes per value on the wire: 4 fp32 (default), 2 bf16", default=4.0)
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam",
                        help="adam: exp_avg, exp_avg_sq; sgd: momentum_buffer")
    for name, default, key in (("--beta1", 0.9, "exp_avg"), ("--beta2", 0.999, "exp_avg_sq"),
                               ("--momentum", 0.9, "SGD's momentum_buffer")):
        flag(name, str(default), float, unit, "a decay rate in (0, 1)", "BETA",
             f"decay rate of {key} (default {default})", default=default)
    flag("--link", "1gbit", parse_bandwidth, pos, "a bandwidth > 0 with a unit", "RATE",
         "per-rank bandwidth: 100mbit, 10Gbps (bits) or 25MB/s (bytes)", required=True)
    flag("--latency-ms", "0.5", float, lambda v: v >= 0, "milliseconds >= 0", "MS",
         "one-way latency per message, ms (default 0)", default=0.0)
    flag("--workers", "8", int, lambda v: v >= 2, "an integer >= 2", "M", "ranks M that average (default 2)", default=2)
    flag("--step-time", "0.25", float, pos, "seconds > 0", "SECONDS",
         "seconds of one local optimizer step, computation only", required=True)
    flag("--comm-budget", "0.05", float, unit, "a fraction in (0, 1)", "FRACTION",
         "fraction of the step time the parameter rounds may take (default 0.05)", default=0.05)
    flag("--steps", "20000", int, pos, "an integer > 0", "STEPS",
         "optimizer steps of the run; caps K_x to keep --min-param-syncs averages", default=None)
    flag("--min-param-syncs", "32", int, pos, "an integer > 0", "N",
         "parameter averages the run keeps at least when --steps is given (default 32)", default=32)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv``, print the report (or JSON); 0 on success, 2 on invalid input."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse has printed the error (or --help)
        return int(exit_.code or 0)
    betas = optimizer_state_betas(args.optimizer, args.beta1, args.beta2, args.momentum)
    advice = advise(args.params, args.link, args.step_time, args.bytes_per_param, args.workers,
                    args.latency_ms / 1e3, betas, args.comm_budget, args.steps, args.min_param_syncs)
    advice["inputs"].update(optimizer=args.optimizer, latency_ms=args.latency_ms)  # echo as given
    print(json.dumps(advice, indent=2) if args.json else format_report(advice))
    return 0
