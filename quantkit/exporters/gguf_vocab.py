"""The tokenizer of a checkpoint directory as GGUF ``tokenizer.*`` metadata.

Two kinds, as llama.cpp names them in ``tokenizer.ggml.model``:
  gpt2   byte-level BPE from ``tokenizer.json``: tokens in id order, token types, merges, and the
         pre-tokenizer name (``tokenizer.ggml.pre``) recognised from the pre-tokenizer's structure;
  llama  SentencePiece from ``tokenizer.model``: pieces, scores, types, add_space_prefix.
Token types (gguf.TokenType): NORMAL 1, UNKNOWN 2, CONTROL 3 (special added tokens), USER_DEFINED 4
(other added tokens), UNUSED 5 (``[PAD{id}]`` fillers up to the model's vocab_size), BYTE 6.
Special token ids, add_bos/add_eos flags, merges and the chat template come from gguf-py's
`SpecialVocab` (tokenizer.json, tokenizer_config.json, chat_template.jinja, config.json).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from quantkit.errors import QuantkitError, first_line

PAD_SCORE = -1000.0

# Pre-tokenizer regexes (tokenizer.json ``Split`` patterns) -> llama.cpp's name for them.
_SPLIT_PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}


@dataclass
class GGUFVocab:
    model: str                                   # "gpt2" | "llama"
    tokens: list[str]
    token_types: list[int]
    pre: str | None = None                       # gpt2 only
    scores: list[float] | None = None            # llama only
    add_space_prefix: bool | None = None         # llama only
    special: object = None                       # gguf.SpecialVocab
    notes: list[str] = field(default_factory=list)

    def add_to(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        self.special.add_to_gguf(writer, quiet=True)


def read_vocab(directory: Path, vocab_size: int, for_gguf: bool = True) -> GGUFVocab:
    """The GGUF vocabulary of the tokenizer files in ``directory``, padded to ``vocab_size`` tokens.
    ``for_gguf`` False (llama2.c's tokenizer.bin): no llama.cpp pre-tokenizer name is needed or checked."""
    directory = Path(directory)
    target = "GGUF" if for_gguf else "llama2.c's tokenizer.bin"
    tokenizer_json = _load_json(directory / "tokenizer.json")
    if tokenizer_json is not None and _is_byte_level_bpe(tokenizer_json):
        return _byte_level_vocab(directory, tokenizer_json, vocab_size, for_gguf)
    if (directory / "tokenizer.model").is_file():
        return _sentencepiece_vocab(directory, tokenizer_json, vocab_size)
    kind = (tokenizer_json or {}).get("model", {}).get("type") if tokenizer_json else "missing"
    raise QuantkitError(f"the tokenizer in {directory} ({kind}) cannot be written to {target}; supported: byte-level "
                        "BPE (tokenizer.json) and SentencePiece (tokenizer.model)")


def _load_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise QuantkitError(f"corrupt tokenizer file {path}: {error}") from None


def _steps(pre_tokenizer: dict | None) -> list[dict]:
    if not pre_tokenizer:
        return []
    return list(pre_tokenizer.get("pretokenizers", [])) if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]


def _is_byte_level_bpe(tokenizer_json: dict) -> bool:
    return tokenizer_json.get("model", {}).get("type") == "BPE" and any(
        step.get("type") == "ByteLevel" for step in _steps(tokenizer_json.get("pre_tokenizer")))


def pre_tokenizer_name(pre_tokenizer: dict | None) -> str:
    """llama.cpp's name for a byte-level pre-tokenizer, recognised from its structure:
    ByteLevel(regex) -> gpt-2; Digits(individual) + ByteLevel(regex) -> smollm;
    Split(known regex) + ByteLevel(no regex) -> llama-bpe / qwen2."""
    steps = _steps(pre_tokenizer)
    kinds = [step.get("type") for step in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is not None and byte_level.get("add_prefix_space", False):
        raise QuantkitError("the tokenizer's ByteLevel pre-tokenizer adds a prefix space, which GGUF's byte-level "
                            "BPE cannot express")
    uses_regex = byte_level is not None and byte_level.get("use_regex", True)
    if kinds == ["ByteLevel"] and uses_regex:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and uses_regex:
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not uses_regex:
        pattern = steps[0].get("pattern", {}).get("Regex")
        if pattern in _SPLIT_PRE_TOKENIZERS and steps[0].get("behavior") == "Isolated":
            return _SPLIT_PRE_TOKENIZERS[pattern]
    raise QuantkitError(f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) has no llama.cpp "
                        "pre-tokenizer name this exporter knows (gpt-2, smollm, llama-bpe, qwen2)")


def _special_vocab(directory: Path, n_vocab: int, load_merges: bool):
    import gguf

    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)
    try:
        return gguf.SpecialVocab(directory, load_merges=load_merges, n_vocab=n_vocab)
    except (ValueError, KeyError, TypeError) as error:
        raise QuantkitError(f"cannot read the special tokens of {directory}: {first_line(error)}") from None


def _pad(tokens: list[str | None], types: list[int], vocab_size: int, directory: Path) -> None:
    """Fill unused ids below vocab_size with [PAD{id}] (UNUSED), as llama.cpp's converter does."""
    from gguf import TokenType

    if len(tokens) > vocab_size:
        raise QuantkitError(f"the tokenizer in {directory} has {len(tokens)} tokens but the model's vocab_size is "
                            f"{vocab_size}")
    tokens.extend([None] * (vocab_size - len(tokens)))
    types.extend([TokenType.UNUSED] * (vocab_size - len(types)))
    for index, token in enumerate(tokens):
        if token is None:
            tokens[index] = f"[PAD{index}]"
            types[index] = TokenType.UNUSED


def _byte_level_vocab(directory: Path, tokenizer_json: dict, vocab_size: int, for_gguf: bool = True) -> GGUFVocab:
    from gguf import TokenType

    pre = pre_tokenizer_name(tokenizer_json.get("pre_tokenizer")) if for_gguf else None
    by_id: dict[int, tuple[str, int]] = {index: (token, TokenType.NORMAL)
                                         for token, index in tokenizer_json["model"]["vocab"].items()}
    for added in tokenizer_json.get("added_tokens", []):
        kind = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    size = max(vocab_size, max(by_id) + 1)
    tokens: list[str | None] = [None] * size
    types = [TokenType.UNUSED] * size
    for index, (token, kind) in by_id.items():
        tokens[index], types[index] = token, kind
    _pad(tokens, types, vocab_size, directory)
    special = _special_vocab(directory, vocab_size, load_merges=True)
    if not special.merges:
        raise QuantkitError(f"the byte-level BPE tokenizer in {directory} has no merges")
    special.add_special_token.setdefault("bos", _template_adds_bos(tokenizer_json))
    return GGUFVocab("gpt2", tokens, [int(t) for t in types], pre=pre, special=special)


def _template_adds_bos(tokenizer_json: dict) -> bool:
    """Whether the post-processor puts a special token before the text (llama.cpp's add_bos)."""
    post = tokenizer_json.get("post_processor") or {}
    for processor in post.get("processors", [post]):
        if processor.get("type") == "TemplateProcessing":
            single = processor.get("single", [])
            return bool(single) and "SpecialToken" in single[0]
    return False


def _sentencepiece_vocab(directory: Path, tokenizer_json: dict | None, vocab_size: int) -> GGUFVocab:
    from gguf import TokenType
    from sentencepiece import SentencePieceProcessor

    try:
        processor = SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    except (OSError, RuntimeError) as error:
        raise QuantkitError(f"cannot read {directory / 'tokenizer.model'}: {first_line(error)}") from None
    tokens: list[str | None] = []
    types: list[int] = []
    scores: list[float] = []
    for index in range(processor.vocab_size()):
        tokens.append(processor.id_to_piece(index))
        scores.append(processor.get_score(index))
        types.append(TokenType.UNKNOWN if processor.is_unknown(index) else TokenType.CONTROL
                     if processor.is_control(index) else TokenType.UNUSED if processor.is_unused(index)
                     else TokenType.BYTE if processor.is_byte(index) else TokenType.NORMAL)
    for added in (tokenizer_json or {}).get("added_tokens", []):
        index = added["id"]
        if index >= len(tokens):
            tokens.extend([None] * (index + 1 - len(tokens)))
            types.extend([TokenType.UNUSED] * (index + 1 - len(types)))
            tokens[index] = added["content"]
            types[index] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    _pad(tokens, types, vocab_size, directory)
    scores.extend([PAD_SCORE] * (len(tokens) - len(scores)))
    special = _special_vocab(directory, vocab_size, load_merges=False)
    for kind, index in (("bos", processor.bos_id()), ("eos", processor.eos_id()), ("unk", processor.unk_id()),
                        ("pad", processor.pad_id())):
        if index >= 0:
            special.special_token_ids.setdefault(kind, index)
    special.add_special_token.setdefault("bos", True)      # SentencePiece Llama tokenizers add <s>
    # The model adds a dummy "▁" prefix exactly when the piece for a lone word starts with it.
    add_space_prefix = processor.encode("a", out_type=str)[0].startswith("\u2581")
    return GGUFVocab("llama", tokens, [int(t) for t in types], scores=scores, add_space_prefix=add_space_prefix,
                     special=special)
