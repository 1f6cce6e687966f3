"""The training harness and CLI: a layer on top of :mod:`rankwise` (which never imports it)."""

QUANTIZE_CHOICES = ("nf4", "fp4", "int8")  # --quantize: bitsandbytes 4-bit NormalFloat / 4-bit float / LLM.int8

# the files a tokenizer's save_pretrained writes (transformers' names; any tokenizer writes one of them at least)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                   "*.tiktoken", "chat_template.jinja", "chat_template.json")
