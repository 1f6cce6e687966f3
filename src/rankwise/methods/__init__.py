"""One file per method; importing this package registers them all."""

from .dora import DoraConfig, DoraLinear
from .edora import EdoraConfig, EdoraLinear
from .gora import GoraConfig, GoraLinear, RankTable, gora_rank_table, plot_gora_ranks
from .lora import LoraConfig, LoraLinear
from .raclora import RacLoraConfig, RacLoraLinear, compress_chain, end_link

__all__ = [
    "LoraConfig", "LoraLinear", "DoraConfig", "DoraLinear", "EdoraConfig", "EdoraLinear",
    "GoraConfig", "GoraLinear", "RankTable", "gora_rank_table", "plot_gora_ranks",
    "RacLoraConfig", "RacLoraLinear", "end_link", "compress_chain",
]
