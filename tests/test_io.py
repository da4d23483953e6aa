"""The output-file policy of ``deeppar._io``: atomic writes, special files, links, inputs."""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
import threading
from pathlib import Path

import pytest

from deeppar import _io
from deeppar._io import (
    OutputError,
    command_scope,
    declare_files,
    dumps_json,
    require_matplotlib,
    save_figure,
    write_atomic,
    write_json,
    write_text,
)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_new_file_gets_default_permissions_and_missing_folders(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    write_text(target, "hello")
    assert target.read_text() == "hello"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert _leftovers(target.parent) == []


def test_existing_file_keeps_its_permissions(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    target.chmod(0o640)
    write_text(target, "new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_writer_that_fails_midway_keeps_the_previous_file(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("previous")

    def failing(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        write_atomic(target, failing)
    assert target.read_text() == "previous"
    assert _leftovers(tmp_path) == []


class _FullDisk:
    """A text file whose ``write`` stores part of the data, then fails as a full disk does."""

    def __init__(self, path: str, mode: str = "r", **kwargs) -> None:
        self._f = open(path, mode, **kwargs)  # noqa: SIM115

    def write(self, text: str) -> int:
        self._f.write(text[: len(text) // 2])
        self._f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def test_full_disk_during_write_leaves_no_truncated_file(tmp_path, monkeypatch):
    target = tmp_path / "plan.json"
    target.write_text('{"previous": true}\n')
    monkeypatch.setattr(_io, "open", _FullDisk, raising=False)
    with pytest.raises(OSError) as info:
        write_json(target, {"x": list(range(1000))})
    assert info.value.errno == errno.ENOSPC
    assert json.loads(target.read_text()) == {"previous": True}
    assert _leftovers(tmp_path) == []
    # a new file is not created at all
    with pytest.raises(OSError):
        write_json(tmp_path / "new.json", {"x": 1})
    assert not (tmp_path / "new.json").exists()


def test_full_disk_at_fsync_leaves_the_previous_file(tmp_path, monkeypatch):
    """Delayed allocation reports ENOSPC at fsync: the file must not be renamed into place."""
    target = tmp_path / "out.txt"
    target.write_text("previous")

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_io.os, "fsync", fsync)
    with pytest.raises(OSError, match="No space"):
        write_text(target, "new content")
    assert target.read_text() == "previous"
    assert _leftovers(tmp_path) == []


def test_character_device_is_written_not_replaced():
    before = os.stat("/dev/null")
    write_text("/dev/null", "discarded")
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_full_device_reports_enospc_and_stays_a_device():
    with pytest.raises(OSError) as info:
        write_text("/dev/full", "x" * 10000)
    assert info.value.errno == errno.ENOSPC
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_fifo_is_written_directly(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    write_json(fifo, {"a": 1})
    reader.join(timeout=30)
    assert json.loads(received[0]) == {"a": 1}
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_dash_is_standard_output(capfd):
    write_json("-", {"b": 2})
    assert json.loads(capfd.readouterr().out) == {"b": 2}


def test_symlink_is_followed_and_kept(tmp_path):
    real = tmp_path / "data" / "real.txt"
    real.parent.mkdir()
    real.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    write_text(link, "new")
    assert link.is_symlink() and real.read_text() == "new"
    assert _leftovers(real.parent) == [] and _leftovers(tmp_path) == []
    dangling = tmp_path / "dangling.txt"
    dangling.symlink_to(tmp_path / "data" / "later.txt")
    write_text(dangling, "created")
    assert dangling.is_symlink() and (tmp_path / "data" / "later.txt").read_text() == "created"


def test_directory_is_refused(tmp_path):
    with pytest.raises(OutputError, match="is a directory"):
        write_text(tmp_path, "x")
    with pytest.raises(OutputError, match="is a directory"):
        declare_files(outputs=[tmp_path])


def test_path_below_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        write_text(tmp_path / "file" / "out.txt", "x")


@pytest.mark.parametrize("spelling", ["same", "relative", "symlink", "hardlink"])
def test_output_that_is_an_input_is_refused(tmp_path, monkeypatch, spelling):
    source = tmp_path / "in.json"
    source.write_text("{}")
    monkeypatch.chdir(tmp_path)
    out: str | Path = source
    if spelling == "relative":
        out = "./sub/../in.json"
        (tmp_path / "sub").mkdir()
    elif spelling == "symlink":
        out = tmp_path / "link.json"
        out.symlink_to(source)
    elif spelling == "hardlink":
        out = tmp_path / "hard.json"
        os.link(source, out)
    with pytest.raises(OutputError, match="refusing to overwrite"):
        declare_files(inputs=[source], outputs=[out])
    assert source.read_text() == "{}"


def test_declared_inputs_are_protected_for_the_whole_command(tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("keep")
    with command_scope():
        declare_files(inputs=[source], outputs=[tmp_path / "out.txt"])
        write_text(tmp_path / "out.txt", "fine")
        with pytest.raises(OutputError, match="refusing to overwrite"):
            write_text(source, "lost")
    assert source.read_text() == "keep"
    write_text(source, "outside a command nothing is declared")


def test_the_same_output_twice_is_refused(tmp_path):
    with pytest.raises(OutputError, match="given twice"):
        declare_files(outputs=[tmp_path / "a.png", tmp_path / "x" / ".." / "a.png"])
    with pytest.raises(OutputError, match="more than one output"):
        declare_files(outputs=["-", "-"])
    declare_files(inputs=[None], outputs=[None, "-", tmp_path / "a", tmp_path / "b"])


def test_json_is_standard(tmp_path):
    with pytest.raises(ValueError, match=r"non-finite number \(nan at \['rows'\]\[1\]\['x'\]\)"):
        dumps_json({"rows": [{"x": 1.0}, {"x": float("nan")}]})
    target = tmp_path / "out.json"
    with pytest.raises(ValueError, match="the plan holds a non-finite number"):
        write_json(target, {"load": float("inf")}, what="the plan")
    assert not target.exists() and _leftovers(tmp_path) == []
    assert dumps_json({"a": [1, 2.5]}) == '{"a": [1, 2.5]}'


def test_picture_format_is_explicit(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(1, 1))
    try:
        save_figure(fig, tmp_path / "a.svg")
        save_figure(fig, tmp_path / "b.png")
        save_figure(fig, tmp_path / "c.bin", format="png")
        with pytest.raises(ValueError, match="unknown format 'xyz'"):
            save_figure(fig, tmp_path / "d.xyz")
    finally:
        plt.close(fig)
    assert (tmp_path / "a.svg").read_text().lstrip().startswith("<?xml")
    for name in ("b.png", "c.bin"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "d.xyz").exists() and _leftovers(tmp_path) == []


def test_missing_matplotlib_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ModuleNotFoundError, match=r"deeppar\[plot\]") as info:
        require_matplotlib()
    assert info.value.name == "matplotlib"
