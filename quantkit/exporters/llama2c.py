"""llama2.c's int8 model file (karpathy/llama2.c ``export.py --version 2``, run by ``runq.c``) and its
tokenizer.bin, from a quantkit output directory or a float checkpoint of a Llama-family model.

File layout (little-endian, every field packed without alignment):
  header, 256 bytes: uint32 magic 0x616b3432 ("ak42"), int32 version 2, int32 dim, hidden_dim, n_layers,
      n_heads, n_kv_heads, vocab_size, max_seq_len, uint8 shared_classifier, int32 group_size (at byte 37),
      zeros to byte 256 (quantkit writes `MARKER` at byte 64 there, which runq.c never reads)
  float32: every layer's attention norm, every layer's ffn norm, the final norm
  Q8 tensors, each as all its int8 values (row-major) then its float32 scales, one per ``group_size``
      consecutive values: token embeddings; wq of every layer, then wk, wv, wo, w1 (gate), w2 (down), w3 (up);
      the classifier unless shared with the embeddings
  w = q * s; llama2.c's own quantizer takes s = max|w| / 127 and q = round(w / s) per group (`quantize_q80`).

runq.c's fixed constants bound what it runs correctly: RoPE with theta 10000 rotating adjacent pairs (so q and k
rows are permuted from the Hugging Face halves layout, as llama2.c's and llama.cpp's converters do), RMSNorm
epsilon 1e-5, SwiGLU, no biases, head size dim / n_heads, BOS id 1, and dim and hidden_dim multiples of the
group size. Weights are carried exactly where a Linear is int8 symmetric in groups of ``group_size`` along
its rows; everything else is requantized as llama2.c does, and the result says which and why.

tokenizer.bin (runq.c ``build_tokenizer``): uint32 max_token_length, then per token id: float32 score,
int32 byte length, the bytes (no terminator); quantkit appends `TOKENIZER_TRAILER`, which runq.c never
reads. The pieces are the token's bytes (byte-level BPE tokens decoded to raw bytes, SentencePiece's U+2581
as a space, byte tokens kept as <0xNN> as runq.c expects, ids the tokenizer does not use as their [PAD<id>]
filler), so runq.c prints generated ids as the tokenizer decodes them, but for its own printing rules (no
space after BOS, a lone non-printable byte skipped).
runq.c's prompt encoder is SentencePiece-style (dummy space prefix, merges by score, byte fallback at id
byte + 3): SentencePiece scores are written as they are and prompts encode as llama2.c's own export does;
for byte-level BPE the score of a merged token is minus its merge rank, and prompts encode only
approximately (no pre-tokenizer split, no byte-level fallback). Generation from BOS and decoding are exact.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quantkit.errors import QuantkitError
from quantkit.exporters.gguf import rotary_permutations
from quantkit.exporters.source import ExportSource
from quantkit.files import LLAMA2C_MAGIC as MAGIC
from quantkit.files import LLAMA2C_MARKER as MARKER
from quantkit.files import LLAMA2C_MARKER_OFFSET as MARKER_OFFSET
from quantkit.files import LLAMA2C_TOKENIZER_TRAILER as TOKENIZER_TRAILER
from quantkit.files import check_output_path, json_safe, staged_file
from quantkit.formats import primitives

VERSION = 2
HEADER_BYTES = 256
DEFAULT_GROUP_SIZE = 64                  # llama2.c export.py's default
RUNQ_ROPE_THETA = 10000.0
RUNQ_NORM_EPS = 1e-5
SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM")
# runq.c's weight order: (our Linear in a block, llama2.c's name)
PROJECTIONS = (("self_attn.q_proj", "wq"), ("self_attn.k_proj", "wk"), ("self_attn.v_proj", "wv"),
               ("self_attn.o_proj", "wo"), ("mlp.gate_proj", "w1"), ("mlp.down_proj", "w2"), ("mlp.up_proj", "w3"))


@dataclass
class Llama2cTensor:
    """One Q8 tensor of the file: carried (quantkit's codes and scales as they are) or requantized."""

    name: str
    status: str
    reason: str
    weight_sqnr_db: float | None      # of the written weights against the input's (inf: carried exactly)


@dataclass
class Llama2cExportResult:
    out: Path
    tokenizer: Path
    group_size: int
    shared_classifier: bool
    tensors: list[Llama2cTensor]
    notes: list[str] = field(default_factory=list)
    size_bytes: int = 0

    def describe(self) -> list[tuple[str, int, str, float | None]]:
        """(status, tensor count, reason, min weight SQNR) per distinct status and reason."""
        groups: dict[tuple[str, str], list[float]] = {}
        for tensor in self.tensors:
            groups.setdefault((tensor.status, tensor.reason), []).append(tensor.weight_sqnr_db)
        return [(status, len(values), reason, min(values)) for (status, reason), values in groups.items()]

    def to_dict(self) -> dict:
        return {"out": str(self.out), "tokenizer": str(self.tokenizer), "format": "llama2c", "version": VERSION,
                "group_size": self.group_size, "shared_classifier": self.shared_classifier,
                "size_bytes": self.size_bytes, "notes": self.notes,
                "tensors": [{"name": t.name, "status": t.status, "reason": t.reason,
                             "weight_sqnr_db": json_safe(t.weight_sqnr_db)} for t in self.tensors]}


def quantize_q80(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """llama2.c's Q8_0: ``weight`` (any shape, numel a multiple of ``group_size``) in consecutive groups of
    ``group_size`` values; s = max|w| / 127, q = round(w / s) (half to even, as torch.round in export.py).

    Returns (q int8 [numel], s float32 [numel / group_size]); an all-zero group gets s = 0 and q = 0
    (llama2.c's export would write NaN codes there)."""
    groups = weight.detach().float().reshape(-1, group_size)
    scale = groups.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(groups / safe[:, None]).clamp(-127, 127).to(torch.int8)
    return codes.reshape(-1), scale


def dequantize_q80(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """w = q * s per group: codes int8 [numel], scales float32 [numel / group_size] -> float32 [numel]."""
    return (codes.float().reshape(-1, group_size) * scales[:, None]).reshape(-1)


def carried_q80(quant, group_size: int) -> tuple[torch.Tensor, torch.Tensor] | str:
    """A quantkit `QuantTensor` as llama2.c's (codes [out, in] int8, scales [out, in / group_size] float32)
    when it is int8 symmetric with one scale over every ``group_size`` consecutive values of a row (its own
    groups, rows or tensor a multiple of that: each scale is repeated); else the reason it is not."""
    spec = quant.spec
    if spec.format != "int" or spec.bits != 8 or not spec.symmetric:
        return f"{spec.format}{spec.bits if spec.format == 'int' else ''} {'sym' if spec.symmetric else 'asym'} " \
               "grid: llama2.c holds int8 symmetric"
    if quant.g_idx is not None:
        return "act-order groups (g_idx): llama2.c's groups are consecutive"
    if quant.global_scale is not None or quant.super_scale is not None:
        return "two-level scales: llama2.c has one scale per group"
    if quant.group_size % group_size:
        return f"groups of {quant.group_size}: not a multiple of the file's {group_size}"
    scales = primitives.expand_params(quant.scale.float(), quant.shape, quant.group_size, None, quant.row_block)
    return quant.codes, scales[:, ::group_size].expand(quant.shape[0], -1).contiguous()   # per-tensor: one row


def choose_group_size(source: ExportSource, dim: int, hidden_dim: int) -> int:
    """The group size that carries every int8 symmetric Linear exactly: the greatest common divisor of dim,
    hidden_dim and their group sizes (a per-channel grid's is its row length), at least 8; without such a
    Linear, llama2.c's 64 halved until it divides dim and hidden_dim (its export backs off the same way)."""
    size = math.gcd(dim, hidden_dim)
    carried = False
    if source.manifest is not None:
        for entry in source.manifest.layers.values():
            spec = entry.scheme.weight
            if spec.format == "int" and spec.bits == 8 and spec.symmetric and spec.super_group is None:
                size, carried = math.gcd(size, primitives.group_size_for(spec, entry.shape[1])), True
    if carried and size >= 8:
        return size
    size = DEFAULT_GROUP_SIZE
    while dim % size or hidden_dim % size:
        size //= 2
    return size


def export_llama2c(source_dir, out, *, overwrite: bool = False) -> Llama2cExportResult:
    """Write ``source_dir`` as llama2.c's version-2 int8 file ``out`` and ``<out stem>.tokenizer.bin``."""
    out = Path(out)
    source = ExportSource.open(source_dir, require_manifest=False)
    if out.is_dir():
        raise QuantkitError(f"output {out} is a directory; give the path of the .bin file to write")
    tokenizer_out = out.with_name(f"{out.stem}.tokenizer.bin")
    for path in (out, tokenizer_out):
        check_output_path(path, overwrite, [source.path])
    config, notes = source.config, _check_model(source)
    dim, hidden_dim = config.hidden_size, config.intermediate_size
    group_size = choose_group_size(source, dim, hidden_dim)
    shared = _shared_classifier(source)
    pieces, scores, vocab_notes = tokenizer_pieces(source)
    tensors: list[Llama2cTensor] = []
    # both files staged beside their outputs; the tokenizer is renamed into place just before the model
    with staged_file(out, overwrite) as staging, open(staging, "wb") as handle:
        handle.write(_header(config, shared, group_size))
        for norm in _norm_names(source):
            handle.write(source.tensor(norm).float().contiguous().numpy().tobytes())
        permutations = rotary_permutations(source)
        for name, weight in _q8_sources(source, shared):
            codes, scales, record = _q8_tensor(source, name, weight, group_size, permutations.get(weight))
            handle.write(codes.numpy().tobytes())
            handle.write(scales.contiguous().numpy().tobytes())
            tensors.append(record)
        handle.flush()
        write_tokenizer(pieces, scores, tokenizer_out, overwrite)
    return Llama2cExportResult(out.resolve(), tokenizer_out.resolve(), group_size, shared, tensors,
                               notes + vocab_notes, out.stat().st_size)


def _shared_classifier(source: ExportSource) -> bool:
    """Tied and not stored, or stored (float) equal to the embeddings, as llama2.c's export decides."""
    lm_head = source.arch.lm_head
    if lm_head not in source.linear_names():
        return True
    if source.is_quantized(lm_head):
        return False
    return torch.equal(source.tensor(lm_head + ".weight"), source.tensor(source.arch.embeddings + ".weight"))


def _check_model(source: ExportSource) -> list[str]:
    """Refuse what runq.c cannot run; notes for what it runs with its own constants."""
    config, arch = source.config, source.arch
    if arch.name not in SUPPORTED:
        raise QuantkitError(f"llama2.c runs Llama-family models ({', '.join(SUPPORTED)}); this is {arch.name}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise QuantkitError("the model's Linears have biases; llama2.c's format has none")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise QuantkitError(f"runq.c runs SwiGLU (silu); this model's activation is {config.hidden_act}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        raise QuantkitError(f"runq.c takes head size = dim / n_heads = {config.hidden_size // config.num_attention_heads}; "
                            f"this model's head_dim is {head_dim}")
    if getattr(config, "sliding_window", None):
        raise QuantkitError(f"the model attends in a sliding window of {config.sliding_window}; runq.c attends to "
                            "every position")
    from quantkit.exporters.gguf import rope_theta, rope_type

    if rope_type(config) != "default":
        raise QuantkitError(f"the model uses {rope_type(config)} rope scaling; runq.c has plain RoPE only")
    notes = []
    theta = rope_theta(config)
    if theta is not None and not math.isclose(float(theta), RUNQ_ROPE_THETA, rel_tol=1e-6):
        notes.append(f"the model's RoPE theta is {theta:g} but runq.c hard-codes {RUNQ_ROPE_THETA:g} (the format "
                     f"has no field for it): change 10000.0f in runq.c's RoPE loop to {theta:g} before running")
    eps = getattr(config, "rms_norm_eps", RUNQ_NORM_EPS)
    if not math.isclose(float(eps), RUNQ_NORM_EPS, rel_tol=1e-6):     # configs may hold float32's 1e-5
        notes.append(f"the model's RMSNorm epsilon is {eps:g}; runq.c uses 1e-5 (outputs differ slightly)")
    if getattr(config, "bos_token_id", 1) not in (1, None):
        notes.append(f"the model's BOS id is {config.bos_token_id}; runq.c starts every sequence with id 1")
    if source.manifest is not None and any(e.scheme.activation is not None for e in source.manifest.layers.values()):
        notes.append("activation grids are dropped: runq.c quantizes every matmul's input to int8 in groups of "
                     "the file's group size at run time")
    return notes


def _header(config, shared: bool, group_size: int) -> bytes:
    n_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    header = struct.pack("<Ii7iBi", MAGIC, VERSION, config.hidden_size, config.intermediate_size,
                         config.num_hidden_layers, config.num_attention_heads, n_kv_heads, config.vocab_size,
                         config.max_position_embeddings, int(shared), group_size)
    header = header + b"\0" * (MARKER_OFFSET - len(header)) + MARKER
    return header + b"\0" * (HEADER_BYTES - len(header))


def _norm_names(source: ExportSource) -> list[str]:
    blocks, (attention_norm, ffn_norm) = source.arch.blocks, source.arch.block_norms
    layers = range(source.num_blocks)
    return ([f"{blocks}.{i}.{attention_norm}.weight" for i in layers] + [f"{blocks}.{i}.{ffn_norm}.weight" for i in layers]
            + [f"{source.arch.final_norm}.weight"])


def _q8_sources(source: ExportSource, shared: bool):
    """(file name, our Linear or tensor name) in runq.c's order."""
    yield "tok_embeddings", source.arch.embeddings + ".weight"
    for linear, short in PROJECTIONS:
        for index in range(source.num_blocks):
            yield f"layers.{index}.{short}", f"{source.arch.blocks}.{index}.{linear}"
    if not shared:
        yield "output", source.arch.lm_head


def _q8_tensor(source: ExportSource, name: str, weight: str, group_size: int, permutation: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, Llama2cTensor]:
    """One tensor's int8 codes and float32 scales, rows in ``permutation``'s order (q/k: runq.c's interleaved
    RoPE pairs)."""
    if source.is_quantized(weight):
        quant = source.record(weight).quant
        carried = carried_q80(quant, group_size)
        if not isinstance(carried, str):
            codes, scales = carried
            if permutation is not None:
                codes, scales = codes[permutation], scales[permutation]
            return codes.reshape(-1), scales.reshape(-1), Llama2cTensor(name, "carried", "int8 sym codes", math.inf)
        values, reason = quant.dequantize().float(), carried
    else:
        tensor_name = weight if weight.endswith(".weight") else weight + ".weight"
        values = source.tensor(tensor_name).float()
        reason = "float in the input"
    if values.shape[-1] % group_size:
        raise QuantkitError(f"{weight} has rows of {values.shape[-1]}, not a multiple of the group size {group_size}")
    if permutation is not None:
        values = values[permutation]
    codes, scales = quantize_q80(values, group_size)
    sqnr = primitives.sqnr_db(values, dequantize_q80(codes, scales, group_size).reshape(values.shape))
    return codes, scales, Llama2cTensor(name, "requantized", reason, sqnr)


def tokenizer_pieces(source: ExportSource) -> tuple[list[bytes], list[float], list[str]]:
    """Every token id's bytes and score for runq.c (see the module docstring), and notes."""
    from gguf import TokenType

    from quantkit.exporters.gguf_vocab import read_vocab

    vocab = read_vocab(source.path, source.config.vocab_size, for_gguf=False)
    pieces: list[bytes] = []
    if vocab.model == "gpt2":
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
        ranks = {"".join(merge.split(" ")): rank for rank, merge in enumerate(vocab.special.merges)} \
            if vocab.special.merges and isinstance(vocab.special.merges[0], str) else \
            {"".join(merge): rank for rank, merge in enumerate(vocab.special.merges)}
        scores = []
        for token, kind in zip(vocab.tokens, vocab.token_types):
            if kind == TokenType.NORMAL and all(char in to_byte for char in token):
                pieces.append(bytes(to_byte[char] for char in token))
            else:
                pieces.append(token.encode("utf-8"))
            scores.append(-float(ranks.get(token, len(ranks))))
        notes = ["byte-level BPE vocabulary: runq.c prints generated ids as the tokenizer decodes them but encodes "
                 "prompts only approximately (it has no pre-tokenizer and falls back to id byte + 3)"]
        return _non_empty(pieces), scores, notes
    for token in vocab.tokens:
        pieces.append(token.replace("\u2581", " ").encode("utf-8"))
    return _non_empty(pieces), [float(s) for s in vocab.scores], []


def _non_empty(pieces: list[bytes]) -> list[bytes]:
    """runq.c cannot read a zero-length piece (its fread of 0 bytes reports a failed read): such an id
    (none in practice) gets its number as text."""
    return [piece or f"[{index}]".encode() for index, piece in enumerate(pieces)]


def write_tokenizer(pieces: list[bytes], scores: list[float], out: Path, overwrite: bool) -> None:
    """runq.c's tokenizer.bin: uint32 max_token_length, then per id float32 score, int32 length, bytes."""
    with staged_file(out, overwrite) as staging, open(staging, "wb") as handle:
        handle.write(struct.pack("<I", max((len(p) for p in pieces), default=0)))
        for piece, score in zip(pieces, scores):
            handle.write(struct.pack("<fi", score, len(piece)) + piece)
        handle.write(TOKENIZER_TRAILER)
