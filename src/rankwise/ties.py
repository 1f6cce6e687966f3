"""Tied low-rank adapters (``ensure_weight_tying``, HF PEFT 0.21's field): a head whose weight *is* the input
embedding's keeps computing with the embedding's adapted table.

An output head tied to an embedding (``lm_head.weight is embed_tokens.weight``: ``vocab x dim``) is the transpose of
the embedding's ``out x in`` map. With the embedding adapted by LoRA (``ΔW = s·B A``, ``A: r x vocab``,
``B: dim x r``; GoRA's layers are LoRA's with their own rank) its table is ``W0 + s·(B A)ᵀ``, and a :class:`TiedHead`
on the head computes with that same table::

    h = x W0ᵀ + s · (dropout(x) B) A          (…, vocab),        ΔW_head = s · Aᵀ Bᵀ = ΔW_embᵀ

from the embedding layer's own ``A`` and ``B``: one set of factors, trained by both uses, counted and saved once,
so the two stay tied through training. This is PEFT's tie (its head's ``lora_A`` is the embedding's
``lora_embedding_B`` transposed, its ``lora_B`` the embedding's ``lora_embedding_A`` transposed), which an export
writes out (with ``ensure_weight_tying: true``) and an import recognises. Only an additive LoRA-form embedding layer
(LoRA, rsLoRA, GoRA) is tied: a DoRA-family layer's magnitude rescales the embedding's rows one way and PEFT's tied
head gets a magnitude of its own, and RAC-LoRA / EDoRA factors have no such form, so ``attach`` refuses those with
``ensure_weight_tying``.

A merge never writes into a tied weight (:meth:`rankwise.layer.AdapterLayer.merge` gives a tied layer a new merged
``Parameter`` and keeps the shared one as its original, so unmerge ties them again exactly). Where every holder of
the shared weight is an adapter layer and all merged to the same table (token rows shared with a tied head, a
:class:`TiedHead` and its embedding: ``W0 + ΔW`` and its transpose's stored form are the same numbers), they then
hold one merged ``Parameter`` (:func:`join_merged_ties`), so a merged model is tied as its base was (HF PEFT's
``merge_and_unload`` keeps the tie too); where the uses differ (the head keeps ``W0``, or trains other rows or its own
factors or magnitude) each keeps its own table and ``detach(merge=True)`` unties them (:func:`merge_parts_ties`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from .config import AdapterConfig
from .layer import AdapterLayer, PeftFactors
from .targeting import check_target, name_matches

TIE_METHODS = ("lora", "gora")  # methods whose embedding layer is LoRA's additive form (LoraLinear): the ones tied


class TiedHead(AdapterLayer):
    """A head tied to an adapted embedding: ``x W0ᵀ + s·(dropout(x) B) A`` with the embedding layer's ``A``, ``B``,
    ``s`` (:attr:`leader` names that layer) and the config's dropout (PEFT's tied head drops its input as every LoRA
    linear does; the embedding's own lookup has none). It owns no tensor."""

    follows_layer: ClassVar[bool] = True
    trainable: tuple[str, ...] = ()

    def __init__(self, base: nn.Module, config: AdapterConfig, leader: tuple[str, AdapterLayer]) -> None:
        super().__init__(base, config, leader[1].rank)
        self.leader: str = leader[0]
        self.scale = leader[1].scale
        self._leader = [leader[1]]  # a list: not a submodule (its tensors are listed, and saved, under the embedding)
        # self.dropout: the config's, on the head's input as on any adapted linear's (PEFT's tied head has it too)

    @property
    def embedding(self) -> Any:
        """The embedding's layer (a LoRA-form layer: ``lora_a`` ``r x vocab``, ``lora_b`` ``dim x r``)."""
        return self._leader[0]

    def adapter_forward(self, x: Tensor) -> Tensor:
        out = self.base_forward(x)  # (..., vocab)
        return self.kind.add_update(out, self.delta_forward(x))  # summed in the wider dtype, rounded once (as PEFT's)

    def delta_forward(self, x: Tensor) -> Tensor:
        """``s · (dropout(x) B) A`` alone (beside other adapters on the head), in the factors' dtype: the update the
        stack adds to the layers before and rounds once (not this layer's rounded output less a second base matmul
        over the vocabulary, review round 61)."""
        emb = self.embedding
        return ((self.dropout(x).to(emb.lora_b.dtype) @ emb.lora_b) @ emb.lora_a) * self.scale  # (..., vocab)

    def delta_weight(self) -> Tensor:
        return cast(Tensor, self.embedding.delta_weight()).t().to(self.weight.device)  # vocab x dim

    def merged_weight(self) -> Tensor:
        return self.wide(self.unmerged_base_weight()) + self.delta_weight()

    def peft_factors(self) -> PeftFactors:
        """PEFT's tied head: ``lora_A = Bᵀ`` (``r x dim``), ``lora_B = Aᵀ`` (``vocab x r``), the embedding's scale."""
        emb = self.embedding
        return PeftFactors(emb.lora_b.detach().t(), emb.lora_a.detach().t(), self.scale)

    def extra_repr(self) -> str:
        return f"tied to {self.leader}, rank={self.rank}, merged={self.merged}"


def tied_heads(modules: list[tuple[str, nn.Module]], embeddings: list[str]) -> dict[str, str]:
    """``{head: embedding}``: each module other than the embeddings whose ``weight`` is the very ``Parameter`` of one
    of ``embeddings`` (an ``nn.Embedding``'s)."""
    by_name = dict(modules)
    out: dict[str, str] = {}
    for emb in embeddings:
        weight = getattr(by_name[emb], "weight", None)
        if not isinstance(by_name[emb], nn.Embedding) or weight is None:
            continue
        for n, m in modules:
            if n and n not in embeddings and getattr(m, "weight", None) is weight:
                out[n] = emb
    return out


def plan_ties(config: AdapterConfig, modules: list[tuple[str, nn.Module]], targets: dict[str, nn.Module]
              ) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """``(targets, ties)`` under ``config.ensure_weight_tying`` (as given without it): a head tied to an embedding is
    not built by the method but follows the embedding's layer (``ties``: ``{head: embedding}``), and an embedding
    whose tied head is targeted is targeted too (PEFT adds it). ``ValueError`` for a method whose embedding layer
    cannot be tied (:data:`TIE_METHODS`), a tied head with a bias, or an embedding the tie would adapt that
    ``exclude_modules`` names (PEFT fails there on an attribute; a head excluded is tied all the same, as PEFT ties
    it: the head *is* the embedding's weight)."""
    if not getattr(config, "ensure_weight_tying", False):
        return targets, {}
    by_name = dict(modules)
    embeddings = [n for n, m in modules if isinstance(m, nn.Embedding)]
    ties = {h: e for h, e in tied_heads(modules, embeddings).items() if h in targets or e in targets}
    if not ties:
        return targets, {}
    if config.method not in TIE_METHODS:
        raise ValueError(f"ensure_weight_tying=True ties {sorted(ties)} to the embedding's adapter, which rankwise does "
                         f"for {', '.join(TIE_METHODS)} only: a {config.method} layer's update of the embedding has no "
                         "form a head can share (a DoRA-family magnitude rescales the embedding's rows; PEFT's tied "
                         "DoRA head keeps a magnitude of its own). Leave ensure_weight_tying out (the two layers "
                         "then train apart), or adapt the embedding alone")
    excluded = {h: e for h, e in ties.items() if name_matches(e, config.exclude_modules)}
    if excluded:
        head, emb = next(iter(excluded.items()))
        raise ValueError(f"ensure_weight_tying=True ties the head {head!r} to {emb!r}'s factors, and exclude_modules "
                         f"names {emb!r}: the tie would adapt a module you excluded. Drop {emb!r} from exclude_modules "
                         "(the pair is then adapted as one), or leave ensure_weight_tying out (the head then trains "
                         "factors of its own)")
    for h in ties:
        check_target(h, by_name[h])  # its kind's refusals (a weight recomputed on each call, ...)
    biased = [h for h in ties if getattr(by_name[h], "bias", None) is not None]
    if biased:
        raise ValueError(f"ensure_weight_tying: the tied head {biased[0]!r} has a bias; rankwise ties bias-free heads")
    order = [n for n, _ in modules]
    chosen = {n for n in targets if n not in ties} | set(ties.values())
    return {n: by_name[n] for n in order if n in chosen}, ties


def tie_saved(config: AdapterConfig, modules: list[tuple[str, nn.Module]], saved: dict[str, nn.Module]
              ) -> dict[str, nn.Module]:
    """``saved`` (the fully-trained modules, ``modules_to_save``) with, under ``config.ensure_weight_tying``, the
    other half of each tied pair one of them is in (a head tied to an embedding and that embedding), in model order:
    both are then trained as copies sharing one copy of the table (:func:`rankwise.slots.copy_module`), as HF PEFT
    0.21 adds the embedding to ``modules_to_save`` and gives the head a module on the embedding copy's weight."""
    if not getattr(config, "ensure_weight_tying", False) or not saved:
        return saved
    pairs = tied_heads(modules, [n for n, m in modules if isinstance(m, nn.Embedding)])
    wanted = set(saved) | {e for h, e in pairs.items() if h in saved} | {h for h, e in pairs.items() if e in saved}
    return {n: m for n, m in modules if n in wanted}


def saved_ties(config: AdapterConfig, modules: list[tuple[str, nn.Module]], saved: Iterable[str]) -> dict[str, str]:
    """``{head: embedding}`` of the tied pairs :func:`tie_saved` trains as one table (empty without the flag)."""
    if not getattr(config, "ensure_weight_tying", False):
        return {}
    names = set(saved)
    pairs = tied_heads(modules, [n for n, m in modules if isinstance(m, nn.Embedding)])
    return {h: e for h, e in pairs.items() if h in names and e in names}


@dataclass(frozen=True)
class TieOutcome:
    """What ``ensure_weight_tying=True`` did on one ``attach``: the one answer to "did it tie anything, and if not, why
    not", recorded in the attach report (:attr:`rankwise.AttachReport.tie`). The library warns from it
    (:meth:`note`, as HF PEFT warns) and the harness refuses from it with its flags' remedies, so the two cannot
    disagree.

    ``tied``: ``{module: embedding}`` for each module this adapter made follow an embedding (a :class:`TiedHead` on
    its factors, token rows sharing its ``D``, or a trained copy sharing its trained copy's table); empty: the flag
    tied nothing. ``heads``: ``{head: embedding}`` for every module of the model sharing an ``nn.Embedding``'s weight,
    as before the attach (empty: the model has no tied head). ``own_rows``: tied heads given token rows of their own
    (``trainable_token_indices`` names the head, not its embedding); ``trained_fully``: heads and their embeddings in
    ``modules_to_save``, which under the flag always come as a pair (:func:`tie_saved`) trained as one table, so each
    such head is a key of ``tied`` (never a reason it tied nothing)."""

    tied: Mapping[str, str]
    heads: Mapping[str, str]
    own_rows: tuple[str, ...] = ()
    trained_fully: tuple[str, ...] = ()

    @property
    def met(self) -> bool:
        """Whether the flag tied anything."""
        return bool(self.tied)

    def subject(self) -> tuple[list[str], str]:
        """``(heads, embedding)``: the tied pair a note that the flag tied nothing speaks of (on a model with tied
        heads): the first head given rows of its own and its embedding, else the model's first tied embedding and
        every head sharing its weight, so each head named shares the weight of the embedding named, also where the
        model ties several embeddings."""
        if self.own_rows:
            return [self.own_rows[0]], self.heads[self.own_rows[0]]
        emb = next(iter(self.heads.values()))
        return sorted(h for h, e in self.heads.items() if e == emb), emb

    def other_pairs(self) -> str:
        """Where no head has rows of its own, the model's tied pairs :meth:`subject` leaves out, as a clause to follow
        it (`` (and ['head2'] that of 'emb2')``; ``""`` on a model with one tied embedding): a note that the flag tied
        nothing names every pair it could have tied."""
        if self.own_rows:
            return ""
        _, first = self.subject()
        rest = {e: sorted(h for h, f in self.heads.items() if f == e) for e in self.heads.values() if e != first}
        return f" (and {'; '.join(f'{hs} that of {e!r}' for e, hs in rest.items())})" if rest else ""

    def note(self) -> str | None:
        """The warning where the flag tied nothing (``None`` where it tied something): the adapter then trains as
        without it, and the note says why and what would tie."""
        if self.met:
            return None
        start = "rankwise: ensure_weight_tying=True tied nothing: "
        if not self.heads:
            return start + ("no head shares an embedding's weight in this model (its config's tie_word_embeddings is "
                            "False, or it has no output head); the adapter trains as without it. Drop the flag")
        heads, emb = self.subject()
        if self.own_rows:
            return start + (f"{heads[0]!r} shares the weight of {emb!r}, and trainable_token_indices gives rows to "
                            f"{heads[0]!r} alone: they train apart from {emb!r}'s. List the rows for {emb!r} (its "
                            "tied head follows them), or drop the flag")
        return start + (f"{heads} share(s) the weight of {emb!r}{self.other_pairs()}, but neither is a target nor has "
                        "trainable_token_indices; the adapter trains as without it. Add the embedding (or the head) "
                        "to target_modules, or list its rows in trainable_token_indices, or drop the flag")


def tie_outcome(config: AdapterConfig, modules: list[tuple[str, nn.Module]], ties: Mapping[str, str],
                rows: Mapping[str, str | None], saved: Iterable[str]) -> TieOutcome | None:
    """The :class:`TieOutcome` of an attach (``None`` where ``ensure_weight_tying`` was not asked): ``modules`` the
    model's as before it (:func:`rankwise.state.base_modules`), ``ties`` :func:`plan_ties`' ``{head: embedding}``,
    ``rows`` the token-row plan's ``{module: the embedding it follows, or None}``, ``saved`` the fully-trained
    modules."""
    if not getattr(config, "ensure_weight_tying", False):
        return None
    heads = tied_heads(modules, [n for n, m in modules if isinstance(m, nn.Embedding)])
    pair = set(heads) | set(heads.values())
    tied = {**ties, **{n: e for n, e in rows.items() if e is not None}, **saved_ties(config, modules, saved)}
    return TieOutcome(tied=tied, heads=heads,
                      own_rows=tuple(n for n, e in rows.items() if e is None and n in heads),
                      trained_fully=tuple(n for n in saved if n in pair))


def build_ties(ties: dict[str, str], modules: list[tuple[str, nn.Module]], config: AdapterConfig,
               layers: dict[str, AdapterLayer]) -> dict[str, TiedHead]:
    """The :class:`TiedHead` layers of ``ties``, each following the embedding's layer in ``layers``."""
    by_name = dict(modules)
    return {h: TiedHead(by_name[h], config, (e, layers[e])) for h, e in ties.items()}


def _merged_tie_groups(layers: Iterable[AdapterLayer]) -> list[list[AdapterLayer]]:
    """The tied host layers (``layer.tied``) of ``layers``, grouped by the shared weight each was merged from (its
    kept original); an unmerged tied layer is a group of its own."""
    groups: dict[int, list[AdapterLayer]] = {}
    for layer in layers:
        if layer.tied and not layer.is_peer:
            key = id(layer._original_weight) if layer.merged else id(layer)
            groups.setdefault(key, []).append(layer)
    return list(groups.values())


def _one_table(group: list[AdapterLayer]) -> bool:
    """Whether every layer of ``group`` is merged and holds the same stored table (shape, dtype and bits)."""
    first = group[0].weight
    return all(layer.merged for layer in group) and all(
        layer.weight.shape == first.shape and layer.weight.dtype == first.dtype and torch.equal(layer.weight, first)
        for layer in group[1:])


@torch.no_grad()
def join_merged_ties(layers: Iterable[AdapterLayer]) -> None:
    """After a merge: the merged tied layers that share one original weight and merged to the same table hold the
    first one's merged ``Parameter`` (the module docstring: a merged tied pair stays one tensor; unmerge puts the
    shared original back into each)."""
    for group in _merged_tie_groups(layers):
        if len(group) > 1 and _one_table(group):
            for layer in group[1:]:
                layer.weight = group[0].weight  # its base module keeps the original: disabled() computes W0


def merge_parts_ties(model: nn.Module, layers: Iterable[AdapterLayer]) -> bool:
    """Whether the merged state of ``layers`` (all of ``model``'s hosts, merged) parts a tie: a tied layer unmerged
    (a base merged elsewhere: a new module), tied layers of one original weight holding different merged tables, or
    the original still held by a module of ``model`` that is no adapter layer (it keeps ``W0``)."""
    held = {id(p) for p in model.parameters()}
    return any(len({id(layer.weight) for layer in group}) > 1 or not group[0].merged
               or id(group[0]._original_weight) in held for group in _merged_tie_groups(layers))
