"""(a) The rank-1 quadratic counterexample: f(W) = ½ Σ_j M_jj ‖(W − W*)_j‖², M = diag(10, 1, …, 1).

One ``nn.Linear(n, n)`` adapted by rankwise (attach + step), rank 1, scale 1, plain gradient descent
(SGD, full batch) on the adapter with step γ ∈ {1/L, 0.1/L} (L = 10). The optimum f* = 0 needs a
full-rank update: LoRA and Asymmetric LoRA can only reach rank 1; COLA and RAC-LoRA chain links
(one step per link, the analysed setting). Run: ``python experiments/raclora/quadratic.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rankwise  # noqa: E402
from common import SETTINGS, config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def run(method: str, gamma: float, steps: int, n: int, seed: int, sketch_scale: float, link_steps: int) -> list[float]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n, n, bias=False))
    with torch.no_grad():
        model[0].weight.zero_()
    target = torch.randn(n, n, generator=torch.Generator().manual_seed(seed + 1))  # W*, out x in
    m = torch.ones(n)
    m[0] = 10.0
    rankwise.attach(model, config(method, r=1, alpha=1.0, link_steps=link_steps, target_modules=["0"], seed=seed, sketch_scale=sketch_scale))
    opt = torch.optim.SGD(rankwise.trainable_parameters(model).values(), lr=gamma)
    eye = torch.eye(n)

    def loss() -> torch.Tensor:
        w = model(eye).t()  # out x in: row j of W
        return 0.5 * ((w - target) ** 2 * m[:, None]).sum()

    out = []
    for _ in range(steps):
        f = loss()
        out.append(float(f.detach()))
        if not torch.isfinite(f) or float(f.detach()) > 1e12:
            out += [float("inf")] * (steps - len(out))
            break
        f.backward()
        opt.step()
        opt.zero_grad()
        rankwise.step(model, opt)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sketch-scale", type=float, default=1.0, help="rankwise default 1 (std 1/√n); √n = unit variance")
    ap.add_argument("--link-steps", type=int, default=20, help="GD steps per link (COLA, RAC-LoRA); with 1, COLA = RAC-LoRA")
    args = ap.parse_args()
    n, steps, seeds = (6, 300, [0]) if args.quick else (10, 3000, [0, 1, 2])
    results: dict[str, dict[str, list[float]]] = {}
    for gamma_name, gamma in (("1/L", 0.1), ("0.1/L", 0.01)):
        for method in SETTINGS:
            curves = [run(method, gamma, steps, n, s, args.sketch_scale, args.link_steps) for s in seeds]
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(steps)]
            results.setdefault(gamma_name, {})[method] = mean
            print(f"γ={gamma_name:6s} {method:16s} f(W_0)={mean[0]:.4g}  f(W_T)={mean[-1]:.4g}")
    out = ROOT / "docs" / "bench"
    tag = "" if args.sketch_scale == 1.0 else f"-scale{args.sketch_scale:g}"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"raclora-quadratic-ls{args.link_steps}{tag}.json").write_text(json.dumps({"command": "python experiments/raclora/quadratic.py " + " ".join(sys.argv[1:]), "n": n, "steps": steps, "seeds": seeds, "final": {g: {k: v[-1] for k, v in r.items()} for g, r in results.items()}}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (g, r) in zip(axes, results.items()):
        for method, curve in r.items():
            ax.semilogy([min(v, 1e12) for v in curve], label=method)
        ax.set_title(f"rank-1 quadratic, M=diag(10,1,…), n={n}, γ={g}")
        ax.set_xlabel("GD step")
        ax.set_ylabel("f(W) − f*")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"raclora-quadratic-ls{args.link_steps}{tag}.png", dpi=110)


if __name__ == "__main__":
    main()
