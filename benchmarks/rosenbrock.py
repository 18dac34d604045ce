"""Rosenbrock toy: M = 256 simulated Adam workers with noisy gradients, one line per averaging scheme.

    python benchmarks/rosenbrock.py                         # writes docs/rosenbrock.png
    python benchmarks/rosenbrock.py --steps 24 --smoke --no-plot

f(x1, x2) = (1 - x1)^2 + 100 (x2 - x1^2)^2, minimum 0 at (1, 1). Each of the M workers sees the exact
gradient plus i.i.d. Gaussian noise of standard deviation ``--sigma`` (1.5) per coordinate and takes
Adam steps (beta1 = 0.9, beta2 = 0.999). The M workers live in one tensor of shape (M, 2) driven by ONE
``torch.optim.Adam``: Adam is element-wise and every worker's step counter is the same, so this is
exactly M independent Adams. Averaging uses the package itself:

* ``SyncSchedule(...).due(step, keys)`` decides what is averaged after each step;
* ``averaged_state_keys(optimizer)`` names the state tensors (``exp_avg``, ``exp_avg_sq``);
* ``average_stacked_`` replaces every worker's row by the mean over workers and records the bytes
  one worker would send in a ``CommLedger``.

Schemes (all with K_x = 192): DES-LOC (K_u = 192, K_v = 692, the paper's toy setting), Local Adam
(K = 192 for everything), keep-local (states never averaged), reset (states zeroed after each
parameter average, as ``DeslocStrategy(state_policy="reset")`` does), and as a reference DDP-style
Adam on the mean gradient of the M workers every step. The curve is f at the workers' mean point.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import REPO, fmt_int, markdown_table, write_json  # noqa: E402
from lightning_desloc.averaging import average_stacked_  # noqa: E402
from lightning_desloc.ledger import CommLedger  # noqa: E402
from lightning_desloc.schedule import SyncSchedule  # noqa: E402
from lightning_desloc.strategy import averaged_state_keys  # noqa: E402

SCHEMES = ("DES-LOC", "Local Adam", "keep-local", "reset", "DDP (reference)")


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., 0], x[..., 1]
    return (1 - x1) ** 2 + 100 * (x2 - x1**2) ** 2


def rosenbrock_grad(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., 0], x[..., 1]
    inner = x2 - x1**2
    return torch.stack((-2 * (1 - x1) - 400 * x1 * inner, 200 * inner), dim=-1)


def schedule_for(scheme: str, k_x: int, k_u: int, k_v: int) -> SyncSchedule | None:
    if scheme == "DES-LOC":
        return SyncSchedule(k_x, {"exp_avg": k_u, "exp_avg_sq": k_v})
    if scheme == "Local Adam":
        return SyncSchedule(k_x, k_x)
    if scheme == "keep-local":
        return SyncSchedule(k_x, state_policy="keep_local")
    if scheme == "reset":
        return SyncSchedule(k_x, state_policy="reset")
    return None  # DDP reference: gradients averaged every step, no schedule


def run(scheme: str, steps: int, lr: float, workers: int, sigma: float, seed: int, x0: tuple[float, float],
        k_x: int, k_u: int, k_v: int, betas: tuple[float, float] = (0.9, 0.999)) -> dict:
    x = torch.nn.Parameter(torch.tensor(x0, dtype=torch.float64).repeat(workers, 1))
    opt = torch.optim.Adam([x], lr=lr, betas=betas)
    schedule = schedule_for(scheme, k_x, k_u, k_v)
    ledger = CommLedger()
    gen = torch.Generator().manual_seed(seed)  # the same noise sequence for every scheme
    keys: list[str] | None = None
    f_mean, dist = [], []
    for step in range(1, steps + 1):
        with torch.no_grad():
            noise = sigma * torch.randn(workers, 2, generator=gen, dtype=torch.float64)
            grad = rosenbrock_grad(x) + noise
            if schedule is None:
                grad = grad.mean(dim=0, keepdim=True).expand_as(grad).clone()
                ledger.record({"gradients": grad[0].numel() * grad.element_size()})
            x.grad = grad
        opt.step()
        if schedule is not None:
            if keys is None:
                keys = sorted(averaged_state_keys(opt))
                schedule.check_keys(keys)
            plan = schedule.due(step, keys)
            due: dict[str, list[torch.Tensor]] = {}
            if plan.params:
                due["params"] = [x]
            for key in plan.states:
                due[f"state/{key}"] = [opt.state[x][key]]
            if due:
                average_stacked_(due, ledger)
            if plan.reset_states:
                for key in keys:
                    opt.state[x][key].zero_()
        with torch.no_grad():
            centre = x.mean(dim=0)
            f_mean.append(rosenbrock(centre).item())
            dist.append(torch.linalg.vector_norm(centre - 1.0).item())
    return {"scheme": scheme, "f": f_mean, "dist": dist, "bytes": dict(ledger.bytes),
            "total_bytes": ledger.total_bytes, "rounds": ledger.rounds, "final_x": x.mean(dim=0).tolist(),
            "spread": x.std(dim=0).mean().item()}


def tail_stats(values: list[float], window: int) -> tuple[float, float, float]:
    tail = values[-window:]
    return min(tail), sum(tail) / len(tail), max(tail)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6144)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--workers", type=int, default=256)
    parser.add_argument("--sigma", type=float, default=1.5)
    parser.add_argument("--beta1", type=float, default=0.9, help="Adam beta1 (the notes do not give it)")
    parser.add_argument("--beta2", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--x0", type=float, nargs=2, default=(-1.5, 2.0))
    parser.add_argument("--k-x", type=int, default=192)
    parser.add_argument("--k-u", type=int, default=192)
    parser.add_argument("--k-v", type=int, default=692)
    parser.add_argument("--smoke", action="store_true", help="tiny periods (K_x=4, K_u=4, K_v=12), 16 workers")
    parser.add_argument("--out", default=str(REPO / "docs" / "rosenbrock.png"))
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--json", help="also write the final numbers here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.k_x, args.k_u, args.k_v, args.workers = 4, 4, 12, 16
    window = max(1, min(args.k_v * 2, args.steps // 4))

    t0 = time.perf_counter()
    results = {s: run(s, args.steps, args.lr, args.workers, args.sigma, args.seed, tuple(args.x0),
                      args.k_x, args.k_u, args.k_v, (args.beta1, args.beta2)) for s in SCHEMES}
    seconds = time.perf_counter() - t0

    rows = []
    for s in SCHEMES:
        r = results[s]
        lo, mean, hi = tail_stats(r["f"], window)
        b = r["bytes"]
        rows.append([
            s, f"{r['f'][-1]:.3g}", f"{r['dist'][-1]:.3g}", f"{lo:.3g} / {mean:.3g} / {hi:.3g}",
            f"({r['final_x'][0]:.3f}, {r['final_x'][1]:.3f})",
            fmt_int(b.get("params", b.get("gradients", 0))), fmt_int(b.get("state/exp_avg", 0)),
            fmt_int(b.get("state/exp_avg_sq", 0)), fmt_int(r["total_bytes"]),
        ])
    print(f"Rosenbrock, M={args.workers} workers, sigma={args.sigma}, Adam lr={args.lr} betas=({args.beta1}, {args.beta2}), "
          f"x0={tuple(args.x0)}, {args.steps} steps; K_x={args.k_x}, DES-LOC K_u={args.k_u} K_v={args.k_v}; "
          f"f at the workers' mean point; tail = last {window} steps; bytes per worker (float64)")
    print(markdown_table(
        ["scheme", "final f", "final |x-(1,1)|", "tail f min / mean / max", "final mean x",
         "bytes params", "bytes exp_avg", "bytes exp_avg_sq", "bytes total"],
        rows,
    ))
    des, la = results["DES-LOC"]["total_bytes"], results["Local Adam"]["total_bytes"]
    if des:
        print(f"\nDES-LOC sends {la / des:.2f}x fewer bytes than Local Adam; "
              f"{results['DDP (reference)']['total_bytes'] / des:.1f}x fewer than DDP.  ({seconds:.1f} s)")

    if not args.no_plot:
        plot(results, args)
        print(f"plot: {args.out}")
    out = {s: {k: v for k, v in r.items() if k not in ("f", "dist")} | {"final_f": r["f"][-1]}
           for s, r in results.items()}
    if args.json:
        write_json(args.json, {"args": vars(args), "schemes": out})
    return out


def plot(results: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    styles = {"DES-LOC": ("C0", "-", 2.2), "Local Adam": ("C1", "--", 1.6), "keep-local": ("C2", "-", 1.0),
              "reset": ("C3", "-", 1.0), "DDP (reference)": ("0.5", ":", 1.2)}
    for s in ("DDP (reference)", "reset", "keep-local", "DES-LOC", "Local Adam"):  # DES-LOC under the dashes
        r = results[s]
        color, ls, lw = styles[s]
        steps = range(1, len(r["f"]) + 1)
        ax.plot(steps, [max(v, 1e-12) for v in r["f"]], color=color, ls=ls, lw=lw, label=s)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("f(mean of workers' x)")
    ax.set_title(f"Rosenbrock, M={args.workers}, noise sigma={args.sigma}, Adam lr={args.lr} "
                 f"betas=({args.beta1}, {args.beta2}); "
                 f"K_x={args.k_x}, DES-LOC K_u={args.k_u}, K_v={args.k_v}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
