"""Trainable tokens: chosen rows of an embedding trained as dense updates (HF PEFT's ``trainable_token_indices``).

For the rows ``I = (i_1 … i_k)`` a config lists, a :class:`TokenRows` layer keeps ``D`` (``k x dim``, zero at attach)
and its module computes with the table::

    W[i_j] = W0[i_j] + D[j]   (j = 1 … k),        W[i] = W0[i]   for every other row i

An ``nn.Embedding`` (``W0``: ``num_embeddings x dim``) returns ``W0[ids] + D[slot(ids)]`` (``slot``: a listed id's place
in ``I``, a zero row for the rest; ``c ·`` both for a scaled embedding); an ``nn.Linear`` output head without bias
(``W0``: ``vocab x dim``, one row per token) returns ``x W0ᵀ`` with ``x D[j]ᵀ`` added to output ``i_j``. A gradient
reaches ``D[j]`` only where token ``i_j`` occurs (none for the module's ``padding_idx``, as ``F.embedding`` gives
none there), and no other row can move: the layer holds no tensor for them. A merge writes ``W0 + D`` into the rows
``I`` alone.

A head whose weight *is* the embedding's (``lm_head`` tied to ``embed_tokens``) follows it, as HF PEFT ties its
head's token adapter to the embedding's: its layer holds the embedding layer's ``D``, the same ``Parameter``, so
the shared rows change together and ``D`` is counted, trained and saved once (:attr:`TokenRows.leader` names the
layer that owns it). A head listed with other rows than the embedding trains rows of its own instead (PEFT's rule
too), unless the config's ``ensure_weight_tying`` asks for the tie.

HF PEFT stores the rows themselves (its ``trainable_tokens_delta`` holds ``W[I]``, starting as a copy of ``W0[I]``);
here the update ``D`` is stored, so an adapter starts at zero as every rankwise layer does, several adapters' rows
add up, and ``disabled()`` / unmerge are the base exactly. Export writes ``W0[I] + D`` and import takes
``D = W[I] − W0[I]`` (:mod:`rankwise.peft_format`). One difference in training remains: decoupled weight decay pulls
``D`` towards zero, i.e. a row towards its base value, where PEFT's pulls the row itself towards zero.
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base_layers import BaseKind, EmbeddingKind, base_kind, scaled
from .config import AdapterConfig
from .layer import AdapterLayer
from .targeting import check_target

ACCEPTED = ("an nn.Embedding (its rows: token ids), or an nn.Linear output head without bias (its rows: the tokens it "
            "scores), as HF PEFT's trainable tokens")


class TokenRows(AdapterLayer):
    """Dense updates ``D`` (``k x dim``) of ``k`` rows of an embedding or output head (the module docstring's
    equations). ``leader``: the module name of the layer whose ``D`` a tied follower shares (``None``: its own)."""

    trainable: tuple[str, ...] = ("token_delta",)
    token_rows: ClassVar[bool] = True
    token_index: Tensor  # k: the rows (a buffer: it moves with the layer)
    token_slot: Tensor  # num_embeddings, an embedding's only: an id's place in D plus one, 0 for the unlisted ids
    token_delta: nn.Parameter

    def __init__(self, base: nn.Module, config: AdapterConfig, indices: tuple[int, ...], *,
                 leader: tuple[str, "TokenRows"] | None = None) -> None:
        check_token_module(base, indices)
        super().__init__(base, config, 1)
        self.rank, self.scale = 0, 1.0  # no low-rank part
        self.dropout = nn.Identity()  # PEFT's trainable tokens apply none
        self.indices: tuple[int, ...] = tuple(indices)
        n_rows, dim = self.table_shape()
        self.register_buffer("token_index", torch.tensor(self.indices, dtype=torch.long, device=self.weight.device),
                             persistent=False)  # k
        if self.kind.index_input:  # an id's place in D, plus one (0: an unlisted id, the zero row of the lookup table)
            slots = torch.zeros(n_rows, dtype=torch.long, device=self.weight.device)
            slots[self.token_index] = torch.arange(1, len(self.indices) + 1, device=self.weight.device)
            self.register_buffer("token_slot", slots, persistent=False)  # num_embeddings
            padding = cast(nn.Embedding, base).padding_idx
            self.padding_slot: int | None = self.indices.index(padding) + 1 if padding in self.indices else None
        self.leader: str | None = None
        if leader is None:
            self.token_delta = nn.Parameter(self.new_tensor(len(self.indices), dim))  # k x dim, zero: W = W0
        else:
            self.leader, owner = leader
            if owner.indices != self.indices or owner.token_delta.shape[1] != dim:
                raise ValueError(f"a tied layer follows {self.leader!r} only with its rows and width")
            self.token_delta = owner.token_delta  # the same Parameter: one tensor, trained and saved once
            self.trainable = ()  # its owner trains it

    def table_shape(self) -> tuple[int, int]:
        """``(rows, dim)`` of the table the rows are taken from: ``(num_embeddings, embedding_dim)``, ``(out, in)``."""
        if self.kind.index_input:
            return self.in_features, self.out_features
        return self.out_features, self.in_features

    # ------------------------------------------------------------------ forward
    def add_rows(self, out: Tensor, x: Tensor) -> Tensor:
        """``out`` (``(..., out)``) plus the rows' update for input ``x``, in ``out``'s dtype."""
        d = self.token_delta  # k x dim
        if self.kind.index_input:
            table = torch.cat([d.new_zeros(1, d.shape[1]), d])  # (k + 1) x dim: row 0 for the unlisted ids
            emb = cast(nn.Embedding, self.kind.module)
            looked = F.embedding(self.token_slot[x], table, self.padding_slot, None, 2.0, emb.scale_grad_by_freq)
            return (out + scaled(looked, cast(EmbeddingKind, self.kind).embed_scale())).to(out.dtype)  # (..., dim)
        scores = x.to(d.dtype) @ d.t()  # (..., k): x D[j]ᵀ
        listed = (out.index_select(-1, self.token_index) + scores).to(out.dtype)  # (..., k): summed wide, rounded once
        return out.index_copy(-1, self.token_index, listed)  # (..., vocab); the rows are distinct (config checks)

    def adapter_forward(self, x: Tensor) -> Tensor:
        return self.add_rows(self.base_forward(x), x)

    def delta_forward(self, x: Tensor) -> Tensor:
        """The rows' update alone (beside other adapters on this module), in ``D``'s dtype."""
        shape = (*x.shape, self.out_features) if self.kind.index_input else (*x.shape[:-1], self.out_features)
        return self.add_rows(torch.zeros(shape, dtype=self.token_delta.dtype, device=self.token_delta.device), x)

    # ------------------------------------------------------------------ weights
    def delta_weight(self) -> Tensor:
        """``ΔW`` (``out x in``, merge dtype): ``D`` in the listed rows' places, zero everywhere else."""
        delta = torch.zeros(self.out_features, self.in_features, dtype=self.merge_dtype, device=self.weight.device)
        d = self.wide(self.token_delta.detach()).to(self.weight.device)  # k x dim
        if self.kind.index_input:  # out x in = dim x num_embeddings: a token is a column
            return delta.index_copy_(1, self.token_index, d.t())
        return delta.index_copy_(0, self.token_index, d)

    def merged_weight(self) -> Tensor:
        return self.wide(self.unmerged_base_weight()) + self.delta_weight()  # out x in

    def rescaled(self, factor: float) -> dict[str, Any]:
        """Nothing: token rows keep their update inside ``rankwise.scaled``, as HF PEFT's ``rescale_adapter_scale``
        leaves its trainable tokens (it rescales LoRA layers only)."""
        return {}

    def base_rows(self) -> Tensor:
        """``W0[I]`` (``k x dim``, merge dtype): the listed rows of the unmerged base table."""
        w0 = self.wide(self.unmerged_base_weight())  # out x in
        return w0[:, self.token_index].t() if self.kind.index_input else w0[self.token_index]

    def row_values(self) -> Tensor:
        """``W[I] = W0[I] + D`` (``k x dim``, merge dtype): the rows as HF PEFT stores them."""
        return self.base_rows() + self.wide(self.token_delta.detach())

    def extra_repr(self) -> str:
        own = f"tied to {self.leader}" if self.leader else f"delta {tuple(self.token_delta.shape)}"
        return f"rows={list(self.indices)[:8]}{' ...' if len(self.indices) > 8 else ''}, {own}, merged={self.merged}, " \
               f"base={self.kind.describe()}"


def check_token_module(module: nn.Module, indices: tuple[int, ...], name: str = "") -> None:
    """Raise (``TypeError`` / ``ValueError``, naming ``name``) unless ``module`` takes trainable rows ``indices``: a kind
    :data:`ACCEPTED` names, every index one of its rows."""
    where = f"trainable_token_indices names {name!r}, " if name else ""
    if isinstance(module, (nn.Embedding, nn.Linear)):
        check_target(name, module)  # its kind's refusals (an embedding with max_norm, a weight recomputed on each call)
    kind = base_kind(module) if isinstance(module, (nn.Embedding, nn.Linear)) else None
    if kind is None or not (kind.index_input or (type(kind) is BaseKind and getattr(module, "bias", None) is None)):
        what = type(module).__name__ + (" with a bias" if isinstance(module, nn.Linear) else "")
        raise TypeError(f"{where}a {what}; trainable tokens train rows of {ACCEPTED}")
    weight = cast(Tensor, module.weight)
    n_rows = int(weight.shape[0])  # an embedding's num_embeddings, a head's out_features
    outside = [i for i in indices if i >= n_rows]
    if outside:
        raise ValueError(f"{where}token indices {outside[:5]} are out of range: the module has {n_rows} rows (ids "
                         f"0-{n_rows - 1}); resize the embeddings (model.resize_token_embeddings) before attach")


def resolve_token_modules(model: nn.Module, config: AdapterConfig, modules: list[tuple[str, nn.Module]]) -> dict[str, tuple[int, ...]]:
    """``{full module name: row indices}`` for ``config.trainable_token_indices`` (``{}`` without it): a list is the
    model's input embedding's (``get_input_embeddings()``, else the one module named ``embed_tokens``), a dict's keys
    are module names or dotted name suffixes, each matching at least one module (``ValueError`` naming it)."""
    wanted = config.trainable_token_indices
    if wanted is None:
        return {}
    if not isinstance(wanted, dict):
        return {input_embedding(model, modules): wanted}
    out: dict[str, tuple[int, ...]] = {}
    for key, rows in wanted.items():
        hits = [n for n, _ in modules if n and (n == key or n.endswith("." + key))]
        if not hits:
            raise ValueError(f"trainable_token_indices names {key!r}, which matches no module of this "
                             f"{type(model).__name__}")
        for hit in hits:
            if hit in out and out[hit] != rows:
                raise ValueError(f"trainable_token_indices gives {hit!r} two lists of rows (keys matching it twice)")
            out[hit] = rows
    return out


def input_embedding(model: nn.Module, modules: list[tuple[str, nn.Module]]) -> str:
    """The name of the model's input embedding: what ``get_input_embeddings()`` returns (a transformers model), else
    the one module whose name is or ends in ``embed_tokens`` (HF PEFT's rule); ``ValueError`` when neither finds it."""
    getter = getattr(model, "get_input_embeddings", None)
    found: Any = None
    if callable(getter):
        try:
            found = getter()
        except (NotImplementedError, AttributeError):
            found = None
    for n, m in modules:
        if found is not None and (m is found or getattr(found, "base_layer", lambda: None)() is m):
            return n
    named = [n for n, _ in modules if n == "embed_tokens" or n.endswith(".embed_tokens")]
    if len(named) == 1:
        return named[0]
    raise ValueError(f"trainable_token_indices is a list, which means the model's input embedding, and this "
                     f"{type(model).__name__} has no get_input_embeddings() and {len(named)} modules named embed_tokens: "
                     "name the module, trainable_token_indices={'<module name>': [ids]}")


def tied_followers(modules: list[tuple[str, nn.Module]], rows: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """``{follower: leader}``: each module (other than the listed ones' owners) whose weight is the very
    ``Parameter`` of a listed embedding's, and so must follow its rows, and each listed module sharing that weight
    with the same rows (PEFT ties those too). A module sharing it with other rows is not a follower: it trains its own."""
    by_name = dict(modules)
    out: dict[str, str] = {}
    for leader in rows:
        if not isinstance(by_name[leader], nn.Embedding) or leader in out:
            continue
        weight = by_name[leader].weight
        for n, m in modules:
            if n != leader and n not in out and getattr(m, "weight", None) is weight and rows.get(n, rows[leader]) == rows[leader]:
                out[n] = leader
    return out


TokenPlan = dict[str, tuple[tuple[int, ...], "str | None"]]  # module -> (rows, the embedding it follows or None)


def plan_token_rows(model: nn.Module, config: AdapterConfig, modules: list[tuple[str, nn.Module]],
                    targets: dict[str, nn.Module], saved: dict[str, nn.Module]) -> TokenPlan:
    """Which modules get :class:`TokenRows` layers for ``config`` (``{}`` without ``trainable_token_indices``), in
    model order: ``{module: (rows, leader)}``, tied heads following their embedding (``leader``). Only checks, nothing
    built or changed; refused (``ValueError`` / ``TypeError``): a module that is not :data:`ACCEPTED`, an index out of
    range, a module (or a tied follower) that this adapter also adapts with a low-rank layer or trains fully."""
    rows = resolve_token_modules(model, config, modules)
    follow = tied_followers(modules, rows)
    by_name = dict(modules)
    apart = [n for n in rows if n not in follow and any(getattr(by_name[n], "weight", 0) is getattr(by_name[e], "weight", 1)
                                                        for e in rows if e != n and isinstance(by_name[e], nn.Embedding))]
    if apart and config.ensure_weight_tying:
        raise ValueError(f"ensure_weight_tying=True, and trainable_token_indices gives the tied {apart[0]!r} other rows "
                         f"than the embedding it shares its weight with ({ {n: list(r) for n, r in rows.items()} }): "
                         "list the same rows for both (or only the embedding's: the head follows), or leave "
                         "ensure_weight_tying out (HF PEFT refuses this too)")
    plan: TokenPlan = {}
    for n, _ in modules:
        if n in rows or n in follow:
            leader = follow.get(n)
            plan[n] = (rows[leader] if leader else rows[n], leader)
            refuse_token_conflicts(n, targets, saved, leader)
            check_token_module(by_name[n], plan[n][0], n)
    return plan


def build_token_layers(plan: TokenPlan, modules: list[tuple[str, nn.Module]], config: AdapterConfig) -> dict[str, TokenRows]:
    """The :class:`TokenRows` layers of a :func:`plan_token_rows` plan (each leader built before its followers)."""
    by_name = dict(modules)
    layers = {n: TokenRows(by_name[n], config, rows) for n, (rows, leader) in plan.items() if leader is None}
    for n, (rows, leader) in plan.items():
        if leader is not None:
            layers[n] = TokenRows(by_name[n], config, rows, leader=(leader, layers[leader]))
    return {n: layers[n] for n in plan}


def refuse_token_conflicts(name: str, targets: dict[str, nn.Module], saved: dict[str, nn.Module], leader: str | None) -> None:
    """``ValueError`` when module ``name`` (with trainable rows; ``leader``: the embedding it is tied to) is also a
    low-rank target of the adapter, or is or lies in a fully-trained module."""
    why = f"is tied to {leader!r}, whose rows trainable_token_indices trains, so it must follow them, and it " if leader \
        else "has trainable rows (trainable_token_indices) and "
    if name in targets:
        raise ValueError(f"{name!r} {why}is a target_modules layer of the same adapter: one module takes one of the two "
                         "(HF PEFT refuses it too). Leave it out of target_modules, or out of trainable_token_indices")
    inside = [s for s in saved if name == s or name.startswith(s + ".")]
    if inside:
        raise ValueError(f"{name!r} {why}is trained fully ({inside[0]!r} in modules_to_save): choose one of the two")


def token_extras(layers: dict[str, TokenRows]) -> dict[str, dict[str, Any]]:
    """The attach report's columns for token layers: how many rows each trains, and whose it follows."""
    return {n: {"token rows": len(layer.indices)} | ({"tied to": layer.leader} if layer.leader else {})
            for n, layer in layers.items()}
