"""(b) Convex problems: least squares and logistic regression on a linear model adapted by rankwise.

RAC-LoRA (one projected gradient step per link: ``link_steps=1``, the analysed setting) reaches the
full fine-tuning optimum — the gap f(W_T) − f* falls at a linear rate, faster for larger r/n — while
Asymmetric LoRA (one link) stalls at the best it can do in its fixed random subspace.
f* comes from full fine-tuning (closed form for least squares; L-BFGS for logistic regression).
Run: ``python experiments/raclora/convex.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rankwise  # noqa: E402
from common import config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def problem(kind: str, n: int, c: int, samples: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, n, generator=g, dtype=torch.float64)
    w_true = torch.randn(c, n, generator=g, dtype=torch.float64)
    if kind == "least squares":
        y = x @ w_true.t() + 0.1 * torch.randn(samples, c, generator=g, dtype=torch.float64)
        loss = lambda out: 0.5 * ((out - y) ** 2).sum(1).mean()  # noqa: E731
        lip = float(torch.linalg.eigvalsh(x.t() @ x / samples).max())
    else:
        y = torch.multinomial(torch.softmax(x @ w_true.t(), 1), 1, generator=g).squeeze(1)
        loss = lambda out: nn.functional.cross_entropy(out, y)  # noqa: E731
        lip = 0.5 * float(torch.linalg.eigvalsh(x.t() @ x / samples).max())
    return x, loss, lip


def optimum(x: torch.Tensor, loss, c: int) -> float:
    w = torch.zeros(c, x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        f = loss(x @ w.t())
        f.backward()
        return f

    for _ in range(5):
        opt.step(closure)
    return float(loss(x @ w.t()).detach())


def run(kind: str, method: str, r: int, steps: int, n: int, c: int, seed: int) -> list[float]:
    x, loss, lip = problem(kind, n, c, 500, 0)
    f_star = optimum(x, loss, c)
    model = nn.Sequential(nn.Linear(n, c, bias=False)).double()
    with torch.no_grad():
        model[0].weight.zero_()
    rankwise.attach(model, config(method, r=r, alpha=float(r), link_steps=1, target_modules=["0"], seed=seed, frozen="A"))
    opt = torch.optim.SGD(rankwise.trainable_parameters(model).values(), lr=1.0 / lip)
    gaps = []
    for _ in range(steps):
        f = loss(model(x))
        gaps.append(max(float(f.detach()) - f_star, 1e-16))
        f.backward()
        opt.step()
        opt.zero_grad()
        rankwise.step(model, opt)
    return gaps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n, c, steps = (20, 4, 300) if args.quick else (40, 10, 1500)
    ranks = [1, 2] if args.quick else [1, 2, 4, 8]
    results: dict[str, dict[str, list[float]]] = {}
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for kind in ("least squares", "logistic regression"):
        for method in ("RAC-LoRA", "Asymmetric LoRA"):
            for r in ranks if method == "RAC-LoRA" else [max(ranks)]:
                gaps = run(kind, method, r, steps, n, c, seed=0)
                key = f"{method} r={r} (r/n={r / n:.3g})"
                results.setdefault(kind, {})[key] = gaps
                hit = next((i for i, v in enumerate(gaps) if v <= 1e-6 * gaps[0]), None)  # steps to a 1e-6 relative gap
                end = hit if hit else steps - 1
                rate = (math.log(gaps[end]) - math.log(gaps[0])) / max(end, 1)  # mean log-gap slope per step until then
                summary.setdefault(kind, {})[key] = {"gap_start": gaps[0], "gap_end": gaps[-1], "steps_to_1e-6": hit, "log_gap_slope": rate}
                print(f"{kind:20s} {key:34s} gap {gaps[0]:.3g} -> {gaps[-1]:.3g}  steps to 1e-6 rel. gap: {hit}  slope(log gap)/step {rate:.4f}")
    out = ROOT / "docs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "raclora-convex.json").write_text(json.dumps({"command": "python experiments/raclora/convex.py " + " ".join(sys.argv[1:]), "n": n, "c": c, "steps": steps, "summary": summary}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (kind, r) in zip(axes, results.items()):
        for key, gaps in r.items():
            ax.semilogy(gaps, label=key)
        ax.set_title(f"{kind}, W: {c} x {n}, γ = 1/L, 1 step per link")
        ax.set_xlabel("step = link")
        ax.set_ylabel("f(W) − f* (full FT optimum)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "raclora-convex.png", dpi=110)


if __name__ == "__main__":
    main()
