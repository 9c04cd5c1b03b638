"""Where run directories, checkpoints, sweeps, reports and data caches live: a local path or an object
store URI (``gs://BUCKET/...``, ``s3://BUCKET/...``), one door for both: ``etils.epath``.

    root = storage.path("gs://my-bucket/runs/x", "--run-dir")   # epath.Path; local paths too
    storage.write_text(root / "eval.json", text)                  # whole or not at all, either way

What differs on an object store, and what the callers do about it:

- **No rename.** A local file is written to a temporary name and renamed into place; an object write
  is already all-or-nothing (GCS and S3 show a new object whole once its upload finishes), so it is
  written directly. ``write_text`` / ``write_bytes`` do the right one.
- **No append.** ``metrics.MetricsWriter`` appends to a local staging copy and uploads it whole.
- **No flock.** ``RunDir`` locks an object store with a lease object made by exclusive create
  (``create_exclusive``: GCS's ``ifGenerationMatch=0`` precondition), renewed by its holder.
- **No free space.** ``free_bytes`` is None there; the disk-space check is skipped.
- **Not memory-mappable.** Token caches are mirrored into a local directory (``local_mirror``).

orbax and tensorstore speak ``gs://`` natively (tensorstore's own GCS driver); epath reaches it
through fsspec (``gcsfs``, the ``[gcs]`` extra) or TensorFlow's gfile when TensorFlow is installed.
Listing caches are turned off, so a file written by another process (a DONE marker) is seen at once.
``file://`` URIs are local paths. An unknown scheme is an error, never a local folder named ``x:``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket

from etils import epath

from lmu_jax.errors import bad_value

REMOTE_SCHEMES = ("gs", "s3")  # object stores epath, orbax and tensorstore all speak
ALLOWED = "a local path, file://PATH, gs://BUCKET/PATH or s3://BUCKET/PATH"

try:  # a listing cached by fsspec would hide files other processes wrote (DONE, checkpoints)
    import fsspec

    for _protocol in ("gcs", "gs", "s3"):
        fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)
except ImportError:  # remote paths then fail on first use, with fsspec's own message
    pass


def path(value, field: str = "path") -> epath.Path:
    """``value`` as an epath.Path: local (``~`` expanded) or remote; UserError for an unknown scheme."""
    text = os.fspath(value) if not isinstance(value, str) else value
    scheme, sep, rest = text.partition("://")
    if not sep:
        return epath.Path(text).expanduser()
    if scheme == "file":
        return epath.Path(rest or "/").expanduser()
    if scheme not in REMOTE_SCHEMES or not rest.split("/")[0]:
        raise bad_value(field, text, ALLOWED)
    return epath.Path(text)


def is_remote(p) -> bool:
    return os.fspath(p).partition("://")[0] in REMOTE_SCHEMES


def absolute(p: epath.Path) -> epath.Path:
    """Local paths made absolute (orbax wants that); remote ones are already."""
    return p if is_remote(p) else epath.Path(os.path.abspath(os.fspath(p)))


def _temporary_sibling(p: epath.Path) -> epath.Path:
    # per host and process: pod workers and sweep runners may share the directory
    return p.parent / f"{p.name}.{socket.gethostname()}.{os.getpid()}.tmp"


def write_bytes(p: epath.Path, data: bytes) -> None:
    """Replace ``p`` whole: readers see the old content or the new, never part of it."""
    if is_remote(p):
        p.write_bytes(data)  # an object appears whole when its upload completes
        return
    tmp = _temporary_sibling(p)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def write_text(p: epath.Path, text: str) -> None:
    write_bytes(p, text.encode())


def create_exclusive(p: epath.Path, text: str) -> bool:
    """Create ``p`` holding ``text`` unless it exists; False when it already did. Atomic: of two
    racing callers one wins (O_EXCL locally; on GCS a ``ifGenerationMatch=0`` upload)."""
    if not is_remote(p):
        try:
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    import fsspec

    fs, where = fsspec.core.url_to_fs(os.fspath(p))
    try:
        with fs.open(where, "xb") as f:
            f.write(text.encode())
    except FileExistsError:
        return False
    return True


def free_bytes(p: epath.Path) -> int | None:
    """Free bytes where ``p`` lives; None on an object store (it has no such number)."""
    return None if is_remote(p) else shutil.disk_usage(p).free


def local_mirror(p: epath.Path) -> epath.Path:
    """The local directory that mirrors remote ``p`` on this host (for memory-mapped files)."""
    scheme, _, rest = os.fspath(p).partition("://")
    base = os.environ.get("LMU_JAX_MIRROR_DIR") or "~/.cache/lmu_jax/mirror"
    return epath.Path(base).expanduser() / scheme / rest


def copy_tree(source: epath.Path, target: epath.Path) -> None:
    """Copy the files of ``source`` (recursively) into ``target``, local or remote either side."""
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_dir():
            copy_tree(item, target / item.name)
        else:
            write_bytes(target / item.name, item.read_bytes())
