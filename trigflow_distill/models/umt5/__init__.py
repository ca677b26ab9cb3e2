"""The umT5-XXL text encoder of Wan2.1 (docs/models.md): `network` the encoder as pure functions, `names` the
transformers and Wan tensor names, `api` loading, tokenising, Wan's context rule and the CLI
(`python -m trigflow_distill.models.umt5`). The package exports `api`'s public names and the configs."""

from trigflow_distill.models.umt5.api import (
    EOS_TOKEN,
    NEGATIVE_PROMPT,
    PAD_TOKEN,
    TEXT_LEN,
    Tokenizer,
    clean,
    embed,
    load,
    load_tokenizer,
    main,
    save,
    save_wan,
    state_dict,
    tiny_tokenizer,
    tokenize,
    write_tiny,
)
from trigflow_distill.models.umt5.network import PRESETS, UMT5_TINY, UMT5_XXL, UMT5Config, encode

__all__ = [
    "EOS_TOKEN",
    "NEGATIVE_PROMPT",
    "PAD_TOKEN",
    "PRESETS",
    "TEXT_LEN",
    "UMT5Config",
    "UMT5_TINY",
    "UMT5_XXL",
    "Tokenizer",
    "clean",
    "embed",
    "encode",
    "load",
    "load_tokenizer",
    "main",
    "save",
    "save_wan",
    "state_dict",
    "tiny_tokenizer",
    "tokenize",
    "write_tiny",
]
