"""rankwise: low-rank adapters smarter than plain LoRA.

The public surface::

    import rankwise
    cfg = rankwise.LoraConfig(r=8, alpha=16, target_modules=["query", "value"])
    report = rankwise.attach(model, cfg)          # adapters on, everything else frozen
    rankwise.step(model, optimizer)               # after each optimizer step (RAC-LoRA uses it)
    rankwise.merge(model); rankwise.unmerge(model)
    rankwise.save(model, "out/"); rankwise.load(base_model, "out/")
    rankwise.export_peft(model, "peft_out/"); rankwise.import_peft(base_model, "peft_out/")
    with rankwise.disabled(model): ...            # the base model, exactly (e.g. DPO's reference)
    with rankwise.per_example(model, ["a", None]): ...  # a mixed batch: row i with its own adapter (None: the base)
    with rankwise.scaled(model, 0.5): ...          # every adapter's update at half strength
    rankwise.combine(model, {"a": 0.7, "b": 0.3}, "ab")  # a new LoRA adapter: 0.7 ΔW_a + 0.3 ΔW_b
    rankwise.attach(model, cfg2, name="b"); rankwise.set_active(model, ["b", "default"])
    rankwise.active_adapters(model)               # ("b", "default"): the adapters that compute, in order
    rankwise.delete(model, "b")

``__all__`` is the core API, which every method works through. One method's extras live in its module
(``from rankwise.methods.raclora import end_link``; ``rankwise.methods.gora.plot_gora_ranks``); the four
that were once top-level names still are, for old code, but are not in ``__all__``.
"""

import re
from typing import Any

import torch


_TORCH_FLOOR = (2, 8)  # pyproject.toml's torch>=2.8: the oldest with every torch API rankwise calls (reliability.md)


def _check_torch(version: str) -> None:
    """Refuse a torch older than ``_TORCH_FLOOR`` at import, naming the fix. Below it an import fails anyway,
    on a call torch lacks (``torch.compiler.disable(reason=...)`` is 2.8's, ``register_state_dict_post_hook``
    2.5's, ``nn.RMSNorm`` 2.4's), with an error that names neither torch nor the version; ``pip install
    --no-deps`` or a pinned environment can hold such a torch. Compares release numbers, not strings
    (``"2.10" < "2.8"`` as text)."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None or (int(found[1]), int(found[2])) >= _TORCH_FLOOR:
        return  # an unparsable local build is given the benefit of the doubt
    need = ".".join(map(str, _TORCH_FLOOR))
    raise ImportError(f"rankwise needs torch>={need}, and this is torch {version}: "
                      f"pip install --upgrade 'torch>={need}'")


_check_torch(torch.__version__)

from ._version import __version__  # after the torch check: the modules below need its torch
from .config import AdapterConfig
from .io import AdapterFileError, load, read_adapter, save
from .layer import AdapterLayer
from .methods import DoraConfig, EdoraConfig, GoraConfig, LoraConfig, RacLoraConfig
from .methods.gora import gora_rank_table, plot_gora_ranks  # noqa: F401  (method extras, kept for old code)
from .methods.raclora import compress_chain, end_link  # noqa: F401  (method extras, kept for old code)
from .lifecycle import (
    AttachReport,
    adapter_layers,
    attach,
    check_finite_grads,
    count_parameters,
    detach,
    lora_plus_param_groups,
    merge,
    step,
    trainable_parameters,
    unmerge,
)
from .peft_format import export_peft, import_peft
from .adapters import active_adapters, delete, disabled, per_example, set_active
from .weighting import combine, scaled
from .registry import all_methods, config_from_dict
from .state import adapter_config, set_step_count, step_count

__all__ = [
    "__version__",
    "AdapterConfig",
    "LoraConfig",
    "DoraConfig",
    "GoraConfig",
    "EdoraConfig",
    "RacLoraConfig",
    "attach",
    "detach",
    "merge",
    "unmerge",
    "disabled",
    "per_example",
    "scaled",
    "combine",
    "set_active",
    "active_adapters",
    "delete",
    "step",
    "check_finite_grads",
    "save",
    "load",
    "read_adapter",
    "export_peft",
    "import_peft",
    "AttachReport",
    "AdapterFileError",
    "AdapterLayer",
    "adapter_layers",
    "adapter_config",
    "step_count",
    "set_step_count",
    "trainable_parameters",
    "count_parameters",
    "lora_plus_param_groups",
    "all_methods",
    "config_from_dict",
]

_SUBPACKAGES = ("integrations",)  # imported on first use: ``rankwise.integrations.hf.RankwiseCallback`` works after
# a bare ``import rankwise`` without it importing a training framework


def __getattr__(name: str) -> Any:
    """PEP 562: the subpackages in ``_SUBPACKAGES`` on first attribute access."""
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """PEP 562: the module's names and the subpackages it imports on first use (so ``dir`` and completion list them)."""
    return sorted({*globals(), *_SUBPACKAGES})
