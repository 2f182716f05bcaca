"""The tokenizer as llama.cpp reads it from a GGUF file: the tokens by id with their types, and the name
of the pre-tokenizer (the regex split before BPE) that llama.cpp implements for it.

llama.cpp does not run tokenizer.json's pre-tokenizer: it keeps its own implementation of each one it
knows, chosen by ``tokenizer.ggml.pre``. Its converter picks the name by hashing the tokenization of a
test string against a table of known models; here the name comes from the pre-tokenizer's own structure
(:data:`PRE_TOKENIZERS`), each entry checked by llama.cpp tokenizing 100,000 characters exactly as we do
(``benchmarks/gguf_check.py``). A structure without a name is refused: the file would load, and then
split text differently from the model's training.
"""

from __future__ import annotations

from typing import Any

from quantdeploy.errors import CheckpointError

#: the GPT-2 split regex that byte-level BPE applies (ByteLevel with use_regex)
GPT2_SPLIT = "ByteLevel(use_regex)"
#: the split regex of Llama 3's tokenizer.json
LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
#: llama.cpp's pre-tokenizer name for each pre-tokenizer structure of tokenizer.json it implements
PRE_TOKENIZERS = {
    (GPT2_SPLIT,): "gpt-2",
    ("Digits(individual)", GPT2_SPLIT): "smollm",
    (f"Split({LLAMA3_SPLIT})", "ByteLevel"): "llama-bpe",
}


def pre_tokenizer(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer; CheckpointError when it has none."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    key = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            key.append(GPT2_SPLIT if step.get("use_regex", True) else "ByteLevel")
        elif kind == "Digits":
            key.append("Digits(individual)" if step.get("individual_digits") else "Digits")
        elif kind == "Split":
            key.append(f"Split({step.get('pattern', {}).get('Regex', '')})")
        else:
            key.append(str(kind))
    name = PRE_TOKENIZERS.get(tuple(key))
    if name is None:
        raise CheckpointError(f"the tokenizer's pre-tokenizer ({' + '.join(key) or 'none'}) is not one llama.cpp "
                              f"names ({', '.join(PRE_TOKENIZERS.values())}): its text would split differently")
    return name


def vocabulary(tokenizer_json: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their GGUF types (control for special added tokens, user-defined for other added
    ones, unused for the padding up to the model's vocabulary size)."""
    import gguf

    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tokenizer_json.get("decoder") or {}).get("type") != "ByteLevel":
        raise CheckpointError("the GGUF export takes byte-level BPE tokenizers (tokenizer.json); this one is not")
    tokens: dict[int, str] = {i: tok for tok, i in model["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in tokens}
    for added in tokenizer_json.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if max(tokens) >= vocab_size:
        raise CheckpointError(f"the tokenizer has token id {max(tokens)} but the model only {vocab_size} embeddings")
    for i in range(vocab_size):
        if i not in tokens:
            tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    return [tokens[i] for i in range(vocab_size)], [int(types[i]) for i in range(vocab_size)]
