"""One file per method; importing this package registers them all."""

from .dora import DoraConfig, DoraLinear
from .edora import EdoraConfig, EdoraLinear
from .lora import LoraConfig, LoraLinear

__all__ = ["LoraConfig", "LoraLinear", "DoraConfig", "DoraLinear", "EdoraConfig", "EdoraLinear"]
