"""One file per method; importing this package registers them all."""

from .dora import DoraConfig, DoraLinear
from .lora import LoraConfig, LoraLinear
from .raclora import RacLoraConfig, RacLoraLinear, compress_chain, end_link

__all__ = ["LoraConfig", "LoraLinear", "DoraConfig", "DoraLinear", "RacLoraConfig", "RacLoraLinear", "end_link", "compress_chain"]
