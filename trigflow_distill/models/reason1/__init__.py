"""The Cosmos-Reason1-7B text encoder (Qwen2.5-VL's language model, docs/algorithm.md §11): `qwen2` the network,
`api` loading, tokenising, the FULL_CONCAT embedding and the CLI (`python -m trigflow_distill.models.reason1`).
The package exports `api`'s public names."""

from trigflow_distill.models.reason1.api import (
    DEFAULT_PAD_TOKEN,
    MAX_LENGTH,
    SPECIAL_TOKENS,
    SYSTEM_PROMPT,
    TEMPLATE,
    config_from_json,
    embed,
    load,
    load_tokenizer,
    main,
    normalize,
    render,
    save,
    tokenize,
    write_tiny,
)

__all__ = [
    "DEFAULT_PAD_TOKEN",
    "MAX_LENGTH",
    "SPECIAL_TOKENS",
    "SYSTEM_PROMPT",
    "TEMPLATE",
    "config_from_json",
    "embed",
    "load",
    "load_tokenizer",
    "main",
    "normalize",
    "render",
    "save",
    "tokenize",
    "write_tiny",
]
