"""The training harness and CLI: a layer on top of :mod:`rankwise` (which never imports it)."""

QUANTIZE_CHOICES = ("nf4", "fp4", "int8")  # --quantize: bitsandbytes 4-bit NormalFloat / 4-bit float / LLM.int8
