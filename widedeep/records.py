"""Run folders: resolved config, report, per-epoch history and probe rows, marked complete last.

A run folder is written into a temporary sibling and renamed into place only once every
file is on disk, then ``COMPLETE`` is the last file written: an interrupted run never
leaves a folder that looks finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from widedeep.errors import UserError

COMPLETE = "COMPLETE"


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, newline: str | None = None, binary: bool = False):
    """A text (or ``binary``) file to write ``path`` through: written beside it, flushed to
    disk and renamed into place on leaving the block; removed instead if the block raises,
    so that an interrupted write leaves no partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", newline=newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as f:
        json.dump(obj, f, indent=1, allow_nan=False)
        f.write("\n")


def make_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` and its parents (if absent) and check that it takes files; one error
    line naming the problem if not."""
    folder = Path(folder)
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"cannot create folder {str(folder)!r}: {str(blocker)!r} is a file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(dir=folder).cleanup()
    except OSError as e:
        raise UserError(f"cannot write into folder {str(folder)!r}: {e.strerror or e}") from None
    return folder


def check_run_folder(out: str | os.PathLike) -> Path:
    """``out`` as a Path, once it is known that a run folder can be written there (``out``
    absent or an empty folder, in a folder that takes files): checked before training too,
    so that a long run is not lost to a bad --out."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output folder {str(out)!r} is a file")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"output folder {str(out)!r} already exists and is not empty")
    make_folder(out.parent)
    return out


def write_run_folder(out: str | os.PathLike, *, config: dict, summary: dict,
                     history: list[dict], probes: list[dict], environment: dict) -> Path:
    """Write a complete run folder at ``out``; refuse to overwrite an existing one."""
    out = check_run_folder(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        write_json(tmp / "config.json", config)
        write_json(tmp / "report.json", summary)
        write_json(tmp / "environment.json", environment)
        write_json(tmp / "history.json", history)
        write_json(tmp / "probes.json", probes)
        (tmp / COMPLETE).write_text("ok\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def is_complete(folder: str | os.PathLike) -> bool:
    return (Path(folder) / COMPLETE).exists()


def read_run_folder(folder: str | os.PathLike) -> dict:
    """The records of a complete run folder, as {"config", "report", ...}."""
    folder = Path(folder)
    if not is_complete(folder):
        raise UserError(f"run folder {str(folder)!r} is incomplete (no {COMPLETE} marker)")
    names = ("config", "report", "environment", "history", "probes")
    return {n: json.loads((folder / f"{n}.json").read_text()) for n in names}
