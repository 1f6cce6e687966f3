"""Where EDoRA's frozen factors let the update go, against where fine-tuning actually moved the weights.

EDoRA trains only the ``r x r`` core ``R`` between frozen ``B`` and ``A``, so its update ``s·B R A`` lies in
``span(B) x span(A)``: for the method's SVD factors the top-r singular subspaces of ``W0``, for the
ablation's random factors a random pair of subspaces. This script measures, on the packaged MiniLM and
EDoRA's paper target set (query, value, attention output, FFN output), for both kinds of factors:

* **capture**: the share of a reference update's energy inside that space, ``‖P_B ΔW P_A‖²_F / ‖ΔW‖²_F``
  (``P`` the orthogonal projectors), for two reference updates read from finished runs: full fine-tuning's
  ``W_ft − W0`` and DoRA-16's directional update ``s·B A``. The rank-r best possible is the update's own
  top-r energy (Eckart–Young), an update with no preferred direction would put ``r²/(out·in)`` inside,
  and, for comparison, the space a trained DoRA-16 adapter found (``span(B) x span(A)``) is measured too;
* **step**: ``‖s·B E A‖_F`` for a core step ``E`` of ±1 entries, i.e. how far one Adam step of size lr moves
  ``W`` per unit lr, so the two factor kinds can be compared at equal learning rates;
* the spectrum of ``W0``: the top-r energy share and ``σ_r / σ_{r+1}`` (a gap the SVD subspace relies on).

    python bench/edora_subspace.py --full runs/quality/sst2/full-seed0 \\
        --dora runs/quality-r16-1000/sst2/dora-seed0        # writes docs/bench/edora-subspace.md

Cheap (no training); the runs come from ``bench/quality.py`` (sections 3 and 3b of docs/evidence/minilm-quality.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from rankwise.methods.edora import random_factors, svd_factors

ROOT = Path(__file__).resolve().parents[1]
MODULE_TYPES = {"query": "attention.self.query", "value": "attention.self.value",
                "attention output": "attention.output.dense", "FFN output": "output.dense"}


def projector(basis: Tensor) -> Tensor:
    """Orthogonal projector onto the column space of ``basis`` (``n x r``)."""
    q, _ = torch.linalg.qr(basis)  # n x r, orthonormal columns
    return q @ q.t()  # n x n


def capture(delta: Tensor, b: Tensor, a: Tensor) -> float:
    """Share of ``delta``'s energy in ``span(b) x span(aᵀ)``: ``‖P_b Δ P_a‖² / ‖Δ‖²``."""
    inside = projector(b) @ delta @ projector(a.t())  # out x in
    return (inside.norm() ** 2 / delta.norm() ** 2).item()


def top_energy(delta: Tensor, r: int) -> float:
    s = torch.linalg.svdvals(delta)
    return ((s[:r] ** 2).sum() / (s**2).sum()).item()


def layer_rows(w0: Tensor, refs: dict[str, Tensor], learned: tuple[Tensor, Tensor], r: int, alpha: float,
               seed: int) -> dict[str, float]:
    """All measurements for one layer (``w0``: ``out x in``, fp64; ``learned``: DoRA's trained ``(B, A)``)."""
    b_svd, a_svd, _ = svd_factors(w0, r, "exact", 0, torch.Generator())  # EDoRA's own init: out x r, r x in
    s = torch.linalg.svdvals(w0)  # the whole spectrum, for the energy share and the gap at r
    b_rnd, a_rnd = (t.double() for t in random_factors(w0.shape[0], w0.shape[1], r, torch.Generator().manual_seed(seed)))
    step = torch.sign(torch.randn(r, r, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))  # r x r
    row = {"top_r_energy_W0": ((s[:r] ** 2).sum() / (s**2).sum()).item(), "gap": (s[r - 1] / s[r]).item(),
           "step_svd": (alpha / r * b_svd @ step @ a_svd).norm().item(),
           "step_random": (alpha / r * b_rnd @ step @ a_rnd).norm().item(),
           "isotropic": r * r / (w0.shape[0] * w0.shape[1])}
    for ref, delta in refs.items():
        row[f"{ref}_svd"] = capture(delta, b_svd, a_svd)
        row[f"{ref}_random"] = capture(delta, b_rnd, a_rnd)
        row[f"{ref}_best"] = top_energy(delta, r)
    row["full_learned"] = capture(refs["full"], *learned)  # the space DoRA's training found
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", required=True, help="a full fine-tuning run folder (model.safetensors)")
    ap.add_argument("--dora", required=True, help="a DoRA run folder (adapter/) on the same model and targets")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--seed", type=int, default=0, help="seed of the random factors and the core step")
    ap.add_argument("--name", default="edora-subspace")
    args = ap.parse_args()
    from transformers import AutoModel

    from rankwise_harness.models import minilm_path

    base = {f"bert.{k}": v.detach().double() for k, v in AutoModel.from_pretrained(minilm_path()).state_dict().items()}
    dora_dir = Path(args.dora) / "adapter"
    for need in (Path(args.full) / "model.safetensors", dora_dir / "adapter.safetensors", dora_dir / "adapter_config.json"):
        if not need.is_file():
            raise SystemExit(f"{need} not found: pass a finished full fine-tuning run (--full) and DoRA run (--dora)")
    full = load_file(str(Path(args.full) / "model.safetensors"))
    dora, meta = load_file(str(dora_dir / "adapter.safetensors")), json.loads((dora_dir / "adapter_config.json").read_text())
    if meta["method"] != "dora":
        raise SystemExit(f"{args.dora} holds a {meta['method']} adapter, not DoRA")

    rows: dict[str, list[dict[str, float]]] = {t: [] for t in MODULE_TYPES}
    for name, info in meta["layers"].items():
        # first match wins: "attention.output.dense" is tried before the FFN's "output.dense"
        kind = next((t for t, suffix in MODULE_TYPES.items() if name.endswith(suffix)), None)
        if kind is None:
            continue
        w0 = base[f"{name}.weight"]  # out x in
        b, a = dora[f"{name}.lora_b"].double(), dora[f"{name}.lora_a"].double()  # out x r, r x in
        refs = {"full": full[f"{name}.weight"].double() - w0, "dora": info["scale"] * b @ a}
        rows[kind].append(layer_rows(w0, refs, (b, a), args.r, args.alpha, args.seed))

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[kind])

    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    lines = [f"Measured {date} with `python bench/edora_subspace.py --full {args.full} --dora {args.dora}`: packaged "
             f"MiniLM, r = {args.r}, medians over the {sum(map(len, rows.values()))} target layers' per-type groups "
             "(6 layers each). Capture = share of a reference update's energy (‖·‖²_F) that EDoRA's update space "
             "span(B) × span(A) contains; 'best rank-r' is the reference's own top-r energy, 'isotropic' what an "
             "update without preferred directions would put inside, 'DoRA's learned' the space span(B) × span(A) of "
             "the trained DoRA-16 adapter. Step = ‖s·B E A‖_F for a ±1 core step E "
             "(how far one unit-lr Adam step moves W).", "",
             "| module | W0 top-r energy | σ_r/σ_r+1 | full FT: SVD | random | DoRA's learned | best rank-r "
             "| DoRA-16: SVD | random | isotropic | step SVD | step random |",
             "|---|" + "---:|" * 11]
    for kind in MODULE_TYPES:
        pct = lambda k: f"{100 * med(kind, k):.2f}%"  # noqa: E731
        lines.append(f"| {kind} | {pct('top_r_energy_W0')} | {med(kind, 'gap'):.3f} | {pct('full_svd')} | "
                     f"{pct('full_random')} | {pct('full_learned')} | {pct('full_best')} | {pct('dora_svd')} | "
                     f"{pct('dora_random')} | {pct('isotropic')} | {med(kind, 'step_svd'):.1f} | {med(kind, 'step_random'):.1f} |")
    out = ROOT / "docs" / "bench" / f"{args.name}.md"
    out.write_text("\n".join(lines) + "\n")
    (out.with_suffix(".json")).write_text(json.dumps({"command": "python bench/edora_subspace.py " + " ".join(sys.argv[1:]), "rows": rows}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
