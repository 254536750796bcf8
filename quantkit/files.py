"""Every file quantkit writes goes through here: output paths checked before any work, files and
directories written beside and renamed into place, atomic JSON/safetensors, sharded safetensors
with their index, and JSON-safe numbers.

Rules (docs/bad-inputs.md):
  - an output never overlaps an input (the input is only read);
  - an existing output is replaced only with ``overwrite``, and only when quantkit wrote it: a native
    output (``quant_manifest.json``), a compressed-tensors export (``quantkit_export.json``), a GGUF
    file whose ``general.quantized_by`` names quantkit, or an empty directory. Anything else is
    refused, naming what is there, and never deleted;
  - an unwritable location (a regular file on the path, a read-only filesystem, no permission, a
    pseudo-filesystem such as /proc) is one line naming the path and the OS's reason, before any work;
  - writes go to a staging path beside the output and are renamed into place; an OS error while
    writing (disk full, ...) becomes one line naming the file and the reason.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from quantkit.errors import QuantkitError

NATIVE_MARKER = "quant_manifest.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
EXPORT_MARKER = "quantkit_export.json"
_GGUF_MAGIC = b"GGUF"
_GGUF_HEAD_BYTES = 1 << 16
# a little-endian GGUF key-value entry's start: the key's u64 length, the key, the value type u32 8 (string)
_QUANTIZED_BY_KEY = len(b"general.quantized_by").to_bytes(8, "little") + b"general.quantized_by" + \
    (8).to_bytes(4, "little")
_QUANTKIT = b"quantkit"


def os_reason(error: BaseException, path: Path | None = None) -> str:
    """The OS's words for an error: ``strerror`` of an OSError, or the text of a safetensors I/O error
    ("... No space left on device (os error 28)") reduced to its reason. A short write without an
    errno (numpy's ``tofile``: "4352 requested and 1632 written") on a full filesystem says so."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = " ".join(str(error).split())
    if isinstance(error, OSError) and "requested and" in text and path is not None and _disk_full(path):
        return f"{os.strerror(errno.ENOSPC)} ({text})"
    if "I/O error:" in text:
        text = text.split("I/O error:", 1)[1].strip()
    return text.split(" (os error")[0] or type(error).__name__


def _disk_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(nearest_existing(Path(path))).free < 1024 * 1024
    except (OSError, QuantkitError):
        return False


def _is_write_error(error: BaseException) -> bool:
    if isinstance(error, OSError):
        return True
    # safetensors reports I/O failures as its own exception type, with the OS text inside
    return type(error).__name__ == "SafetensorError" and "I/O error" in str(error)


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an OS error raised while writing under ``path`` into one line naming the file and reason."""
    try:
        yield
    except QuantkitError:
        raise
    except Exception as error:
        if not _is_write_error(error):
            raise
        where = getattr(error, "filename", None) or path
        raise QuantkitError(f"cannot write {where}: {os_reason(error, Path(where))}") from None


def describe_existing(path: Path) -> str | None:
    """None when quantkit may replace ``path`` (it wrote it, or it is an empty directory); else a short
    description of what is there."""
    path = Path(path)
    if path.is_dir():
        entries = sorted(p.name for p in path.iterdir())
        if not entries or NATIVE_MARKER in entries or EXPORT_MARKER in entries:
            return None
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        return f"a directory quantkit did not write (it holds {shown})"
    if path.is_file():
        ours = _is_quantkit_gguf(path) or _is_quantkit_llama2c(path) or _is_quantkit_report(path)
        return None if ours else "a file quantkit did not write"
    return "something that is neither a file nor a directory"


def _is_quantkit_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(_GGUF_HEAD_BYTES)
        if head[:4] != _GGUF_MAGIC:
            return False
        # The exporter writes general.quantized_by among the first keys: found in the head, its value decides
        # without parsing the whole file (gguf-py reads every key, the vocabulary's too: seconds on a large one).
        at = head.find(_QUANTIZED_BY_KEY)
        start = at + len(_QUANTIZED_BY_KEY) + 8           # past the value's u64 length
        if at >= 0 and len(head) >= start + len(_QUANTKIT):
            length = int.from_bytes(head[start - 8:start], "little")
            return length >= len(_QUANTKIT) and head[start:start + len(_QUANTKIT)] == _QUANTKIT
        from gguf import GGUFReader

        field = GGUFReader(path).get_field("general.quantized_by")
        return field is not None and str(field.contents()).startswith("quantkit")
    except Exception:  # unreadable or not a GGUF file: not ours
        return False


# llama2.c files quantkit writes (`quantkit.exporters.llama2c`): the model file carries the marker in its
# header's zero padding, the tokenizer.bin ends with the trailer (runq.c reads neither).
LLAMA2C_MAGIC = 0x616B3432                  # "ak42", llama2.c's version-2 header
LLAMA2C_MARKER, LLAMA2C_MARKER_OFFSET = b"written by quantkit", 64
LLAMA2C_TOKENIZER_TRAILER = b"\0quantkit llama2c tokenizer"


def _is_quantkit_llama2c(path: Path) -> bool:
    marker, trailer = LLAMA2C_MARKER, LLAMA2C_TOKENIZER_TRAILER
    try:
        with open(path, "rb") as handle:
            head = handle.read(256)
            if head[:4] == LLAMA2C_MAGIC.to_bytes(4, "little") and \
                    head[LLAMA2C_MARKER_OFFSET:LLAMA2C_MARKER_OFFSET + len(marker)] == marker:
                return True
            handle.seek(max(0, path.stat().st_size - len(trailer)))
            return handle.read() == trailer
    except OSError:
        return False


REPORT_MARKER = b'<meta name="generator" content="quantkit inspect">'


def _is_quantkit_report(path: Path) -> bool:
    """An HTML report `quantkit inspect` wrote: its head carries `REPORT_MARKER`."""
    try:
        with open(path, "rb") as handle:
            return REPORT_MARKER in handle.read(512)
    except OSError:
        return False


def check_output_path(out: Path, overwrite: bool, protected: list[Path]) -> None:
    """Before any work: ``out`` overlaps no input, may be replaced, and its location is writable."""
    out = Path(out).absolute()
    for path in protected:
        path = Path(path).resolve()
        resolved = out.resolve()
        if resolved == path or path.is_relative_to(resolved) or resolved.is_relative_to(path):
            raise QuantkitError(f"output {out} overlaps the input {path}; the input is never modified")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise QuantkitError(f"output {out} already exists; pass --overwrite to replace it")
        what = describe_existing(out)
        if what is not None:
            raise QuantkitError(f"refusing to replace {out}: it is {what}; --overwrite only replaces a quantkit "
                                "output or an empty directory (remove it yourself or choose another --out)")
    check_writable(out)


def nearest_existing(path: Path) -> Path:
    """The closest existing ancestor of ``path``; a regular file on the way is an error."""
    parent = Path(path).absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise QuantkitError(f"cannot write {path}: {parent} is a file, not a directory")
    return parent


def check_writable(out: Path) -> None:
    """Create and remove a probe file where ``out``'s staging copy will go (its nearest existing
    ancestor): a read-only filesystem, missing permission or a pseudo-filesystem fails here."""
    parent = nearest_existing(out)
    try:
        handle, probe = tempfile.mkstemp(prefix=".quantkit-probe-", dir=parent)
    except OSError as error:
        # an existing directory that refuses new files with ENOENT is a pseudo-filesystem (/proc)
        reason = "not a writable directory" if error.errno == errno.ENOENT else os_reason(error)
        raise QuantkitError(f"cannot write to {parent}: {reason}") from None
    os.close(handle)
    os.unlink(probe)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def replace_into_place(staging: Path, out: Path, overwrite: bool) -> None:
    """Rename ``staging`` (a file or directory beside ``out``) onto ``out``. An existing output is
    moved aside first and removed only once the new one is in place, so a failure leaves the old one."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise QuantkitError(f"output {out} appeared while working; pass --overwrite to replace it")
        what = describe_existing(out)
        if what is not None:
            raise QuantkitError(f"refusing to replace {out}: it became {what} while working")
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        try:
            os.rename(staging, out)
        except OSError:
            os.rename(old, out)
            raise
        _remove(old)
    else:
        os.rename(staging, out)


@contextmanager
def _staged(out: Path, overwrite: bool, directory: bool) -> Iterator[Path]:
    """A staging path beside ``out`` (created empty when ``directory``); on success it is flushed and
    renamed onto ``out``, on any error removed, so ``out`` is never half-written."""
    out = Path(out).absolute()
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        if directory:
            staging.mkdir()
    try:
        with writing(staging):
            yield staging
            fsync_tree(staging) if directory else _fsync(staging)
            replace_into_place(staging, out, overwrite)
    finally:
        if staging.exists():
            _remove(staging)


def staged_directory(out: Path, overwrite: bool):
    """A fresh staging directory beside ``out``, renamed to ``out`` on success."""
    return _staged(out, overwrite, directory=True)


def staged_file(out: Path, overwrite: bool):
    """A temporary file path beside ``out``, renamed onto it on success."""
    return _staged(out, overwrite, directory=False)


def _fsync(path: Path) -> None:
    """Flush a written file to the disk before it is renamed into place (a crash then leaves the old
    output or the complete new one, never a renamed but empty file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.EROFS):  # filesystems without fsync
            raise
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    for path in Path(directory).rglob("*"):
        if path.is_file():
            _fsync(path)


# ------------------------------------------------------------------------------- atomic small files


def json_safe(value):
    """JSON has no Infinity/NaN: exact (infinite SQNR) or undefined values are written as null;
    tuples become lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, tuple):
        return list(value)
    return value


def _temporary(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def atomic_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary name beside ``path`` and rename it into place."""
    path = Path(path)
    temporary = _temporary(path)
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def atomic_json(path: Path, data) -> None:
    atomic_text(path, json.dumps(data, indent=2) + "\n")


def atomic_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    temporary = _temporary(path)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(temporary), metadata={"format": "pt"})
    os.replace(temporary, path)


# ------------------------------------------------------------------------------- sharded safetensors


def name_shards(directory: Path, parts: list[tuple[Path, list[str]]]) -> list[str]:
    """Rename written parts (each a safetensors file and its tensor names) to their final names: one
    ``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``."""
    directory = Path(directory)
    if len(parts) == 1:
        os.replace(parts[0][0], directory / SINGLE_FILE)
        return [SINGLE_FILE]
    weight_map, files = {}, []
    for i, (path, names) in enumerate(parts):
        final = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        os.replace(path, directory / final)
        files.append(final)
        weight_map.update({name: final for name in names})
    index = {"metadata": {"total_size": sum((directory / f).stat().st_size for f in files)}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return files


class ShardedWriter:
    """Writes tensors as they come in shards of at most ``max_shard_bytes``; `finish` names them."""

    def __init__(self, directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.parts: list[tuple[Path, list[str]]] = []
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            assert name not in self.buffer, name
            self.buffer[name] = tensor.detach().contiguous()
            self.buffer_bytes += tensor.numel() * tensor.element_size()
        if self.buffer_bytes >= self.max_shard_bytes:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buffer:
            return
        path = self.directory / f"part-{len(self.parts):05d}.safetensors"
        save_file(self.buffer, str(path), metadata={"format": "pt"})
        self.parts.append((path, list(self.buffer)))
        self.buffer, self.buffer_bytes = {}, 0

    def finish(self) -> list[str]:
        self.flush()
        return name_shards(self.directory, self.parts)


def tensor_bytes(paths: list[Path]) -> dict[str, int]:
    """{tensor name: its data bytes} of safetensors files, from their headers alone (data_offsets)."""
    sizes = {}
    for path in paths:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length))
        for name, info in header.items():
            if name != "__metadata__":
                start, end = info["data_offsets"]
                sizes[name] = end - start
    return sizes
