"""Writing output files whole or not at all."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable


def write_atomic(
    path: str | os.PathLike[str], write: Callable[[str], None], suffix: str = ".tmp"
) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then move it into place.

    ``suffix`` ends the temporary name, for writers that choose a format from it (``.json.gz``).
    Readers never see a half-written file, and a failed write leaves nothing behind. Missing
    parent folders are created. The file gets the usual permissions (0666 less the umask;
    ``mkstemp`` alone would leave 0600).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        write(tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
