"""Where quantkit writes: output paths checked before any work, written beside and renamed into place.

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
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from quantkit.errors import QuantkitError

NATIVE_MARKER = "quant_manifest.json"
EXPORT_MARKER = "quantkit_export.json"
_GGUF_MAGIC = b"GGUF"


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
        return None if _is_quantkit_gguf(path) else "a file quantkit did not write"
    return "something that is neither a file nor a directory"


def _is_quantkit_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            if handle.read(4) != _GGUF_MAGIC:
                return False
        from gguf import GGUFReader

        field = GGUFReader(path).get_field("general.quantized_by")
        return field is not None and str(field.contents()).startswith("quantkit")
    except Exception:  # unreadable or not a GGUF file: not ours
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
