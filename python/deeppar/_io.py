"""Output files: one policy for every file deeppar writes.

- An output is written whole or not at all: into a temporary file in the target's folder,
  flushed to disk (``fsync``), then renamed over the target (``os.replace``). If the writer
  fails, or the disk is full, the temporary file is removed and the previous file is intact.
- ``-`` means standard output; character devices (``/dev/null``) and FIFOs are written
  directly (never renamed over); symbolic links are followed, the file they point to is
  replaced and the link kept; a directory, a block device or a socket is refused. A file with
  other hard links is replaced by a new file under this name (the other names keep the old
  content), as any atomic replacement does.
- Missing parent folders are created (:data:`OUTPUT_POLICY`, shown in every ``--help``).
- Inside a command (:func:`command_scope`), an output may not be one of the command's inputs
  (compared with :func:`os.path.samefile`: symbolic and hard links count), nor another output
  of the same command: :func:`declare_files` refuses before any work is done, and every write
  checks again.
- JSON is standard JSON only (:func:`dumps_json`): NaN and infinities are an error, never
  ``NaN`` or ``Infinity`` in a file.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import json
import math
import os
import secrets
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

StrPath = str | os.PathLike[str]

#: the output name that means standard output
STDOUT = "-"

#: one sentence on output files, the epilog of every command that writes some
OUTPUT_POLICY = (
    "Output files are written whole or not at all (a temporary file renamed into place; the "
    "previous file survives a failure); missing folders are created; '-' writes to standard "
    "output; an output may not be one of the command's inputs."
)

#: what to install for pictures
PLOT_EXTRA = "pip install 'deeppar[plot]'"

# Inputs of the command running in this context (None outside a command).
_INPUTS: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "deeppar_command_inputs", default=None)


class OutputError(ValueError):
    """An output path that deeppar refuses to write (an input, a directory, ...)."""


# ------------------------------------------------------------------------------ declaring
@contextlib.contextmanager
def command_scope() -> Iterator[None]:
    """Run a command: the inputs it declares are protected from its writes until it ends."""
    token = _INPUTS.set(())
    try:
        yield
    finally:
        _INPUTS.reset(token)


def declare_files(inputs: Iterable[StrPath | None] = (),
                  outputs: Iterable[StrPath | None] = ()) -> None:
    """Check a command's output paths against its inputs before it does any work.

    ``None`` entries (options not given) are ignored. Raises :class:`OutputError` when an
    output is an existing directory or special file that cannot be written, is the same file
    as an input, or is given twice. Inside :func:`command_scope` the inputs are remembered, so
    that every later :func:`write_atomic` of the command refuses them too.
    """
    ins = [os.fspath(p) for p in inputs if p is not None]
    outs = [os.fspath(p) for p in outputs if p is not None]
    known = _INPUTS.get()
    if known is not None:
        _INPUTS.set(known + tuple(ins))
    for i, out in enumerate(outs):
        if out == STDOUT:
            if STDOUT in outs[:i]:
                raise OutputError("standard output ('-') is given as more than one output")
            continue
        _kind(out)  # refuses directories and unusable special files
        for other in outs[:i]:
            if other != STDOUT and _same_file(out, other):
                raise OutputError(f"output {out} is given twice (also as {other})")
        _check_not_input(out, ins)


def _same_file(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` name the same file (links followed); False if one is missing.
    Names of files that do not exist yet are compared after resolving their folders."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _check_not_input(path: str, inputs: Iterable[str]) -> None:
    for source in inputs:
        if source != STDOUT and _same_file(path, source):
            raise OutputError(
                f"refusing to overwrite {path}: it is the input {source} of this command "
                "(choose another output path)")


# --------------------------------------------------------------------------------- writing
def _kind(path: str) -> str:
    """``"new"``, ``"regular"`` or ``"stream"`` (character device, FIFO) for the file that
    ``path`` names after following links; :class:`OutputError` for anything else."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "new"
    except NotADirectoryError:
        raise OutputError(f"cannot write {path}: a part of its folder is not a folder") from None
    if stat.S_ISREG(st.st_mode):
        return "regular"
    if stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
        return "stream"
    what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
    raise OutputError(f"cannot write {path}: it is {what} (give a file path)")


def write_atomic(path: StrPath, write: Callable[[str], None], suffix: str = ".tmp") -> None:
    """Call ``write(tmp_path)`` on a temporary file, then put its content at ``path``.

    ``suffix`` ends the temporary name, for writers that choose a format from it (``.json.gz``).
    A regular file (or a new one) is replaced atomically after ``fsync``, keeping its
    permissions (a new file gets 0666 less the umask); a failed write leaves the previous file
    and no temporary file. ``-`` (standard output), character devices and FIFOs receive the
    bytes directly once the writer has succeeded. See the module docstring for the policy.
    """
    path = os.fspath(path)
    if path == STDOUT:
        _write_to_stream(None, write, suffix)
        return
    inputs = _INPUTS.get()
    if inputs:
        _check_not_input(path, inputs)
    kind = _kind(path)
    if kind == "stream":
        _write_to_stream(path, write, suffix)
        return
    target = os.path.realpath(path)  # follow links: replace the file, keep the link
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    mode = stat.S_IMODE(os.stat(target).st_mode) if kind == "regular" else None
    tmp = _new_temp_file(folder, os.path.basename(target), suffix)
    try:
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        _fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where possible
        _fsync_path(folder, directory=True)


def _new_temp_file(folder: str, name: str, suffix: str) -> str:
    """Create an empty file ``.<name>.<random><suffix>`` in ``folder`` with the default
    permissions (0666 less the umask) and return its path."""
    for _ in range(100):
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}{suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", os.path.join(folder, name))


def _fsync_path(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_to_stream(path: str | None, write: Callable[[str], None], suffix: str) -> None:
    """Run the writer on a private temporary file, then copy its bytes to ``path`` (a
    character device or FIFO, opened without truncation or renaming) or to standard output."""
    with tempfile.TemporaryDirectory(prefix="deeppar-") as tmpdir:
        tmp = os.path.join(tmpdir, "output" + suffix)
        write(tmp)
        with open(tmp, "rb") as src:
            if path is None:
                sys.stdout.flush()
                out = getattr(sys.stdout, "buffer", None)
                if out is None:  # a text-only stream (e.g. captured output)
                    sys.stdout.write(src.read().decode("utf-8", errors="replace"))
                else:
                    shutil.copyfileobj(src, out)
                    out.flush()
            else:
                with open(path, "wb", buffering=0) as dst:
                    shutil.copyfileobj(src, dst)


def write_text(path: StrPath, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` under the output policy."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomic(path, write, suffix=".tmp")


# ------------------------------------------------------------------------------------ JSON
def dumps_json(data: Any, indent: int | None = None, what: str = "the result") -> str:
    """``json.dumps`` that only produces standard JSON: ValueError naming ``what`` when the
    data holds NaN or an infinity (which ``json`` would write as ``NaN``/``Infinity``)."""
    try:
        return json.dumps(data, indent=indent, allow_nan=False)
    except ValueError as exc:
        if "Out of range float" not in str(exc):
            raise
        raise ValueError(f"{what} holds a non-finite number ({_first_non_finite(data)}), "
                         "which standard JSON cannot represent") from None


def _first_non_finite(data: Any, where: str = "") -> str:
    """A description of where the first NaN or infinity in ``data`` is."""
    if isinstance(data, float) and not math.isfinite(data):
        return f"{data} at {where or 'top level'}"
    items: Iterable[tuple[Any, Any]] = ()
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, (list, tuple)):
        items = enumerate(data)
    for key, value in items:
        found = _first_non_finite(value, f"{where}[{key!r}]")
        if found:
            return found
    return ""


def write_json(path: StrPath, data: Any, indent: int | None = None,
               what: str = "the result") -> None:
    """Write ``data`` as standard JSON (see :func:`dumps_json`) to ``path``, atomically."""
    write_text(path, dumps_json(data, indent=indent, what=what) + "\n")


# -------------------------------------------------------------------------------- pictures
def require_matplotlib(what: str = "pictures") -> None:
    """Raise a one-line ``ModuleNotFoundError`` (name ``matplotlib``) saying how to install it."""
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name != "matplotlib":
            raise
        raise ModuleNotFoundError(f"matplotlib is needed for {what}: {PLOT_EXTRA}",
                                  name="matplotlib") from None


def save_figure(fig: Any, path: StrPath, format: str | None = None, **kwargs: Any) -> None:
    """``fig.savefig`` under the output policy. The format is ``format``, else the suffix of
    ``path`` (``.png``, ``.svg``, ``.pdf``...), else PNG, and is passed to matplotlib
    explicitly (the temporary file's name does not decide it)."""
    name = os.fspath(path)
    if format is None:
        ext = os.path.splitext(name)[1].lstrip(".").lower() if name != STDOUT else ""
        format = ext or "png"
    supported = fig.canvas.get_supported_filetypes()
    if format not in supported:
        raise ValueError(f"cannot write picture {name}: unknown format {format!r} "
                         f"(one of {', '.join(sorted(supported))})")
    write_atomic(path, lambda tmp: fig.savefig(tmp, format=format, **kwargs),
                 suffix="." + format)


__all__ = ["OUTPUT_POLICY", "STDOUT", "OutputError", "command_scope", "declare_files",
           "dumps_json", "require_matplotlib", "save_figure", "write_atomic", "write_json",
           "write_text"]
