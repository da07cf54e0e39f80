"""Files on local disk (the os module) or object storage (s3://, gs://, any URL scheme: tf.io.gfile).

Local paths never import TensorFlow, so commands check their inputs before paying for it.
tensorflow-io registers the s3:// filesystem when imported; it is imported here,
only when such a path is used. Credentials come from the environment only.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys

from medtl.errors import MedtlError

REMOTE_SCHEMES = ("s3://", "gs://")


def is_remote(path: str) -> bool:
    return str(path).startswith(REMOTE_SCHEMES)


def _local(path) -> bool:
    return "://" not in str(path)


def _gfile():
    from medtl.tf import tf

    return tf.io.gfile


def ensure_filesystem(path: str) -> None:
    """Register the filesystem for `path` (tensorflow-io for s3://)."""
    if str(path).startswith("s3://") and "tensorflow_io" not in sys.modules:
        try:
            import tensorflow_io  # noqa: F401  (registers s3://)
        except Exception as exc:
            raise MedtlError(f"s3:// paths need tensorflow-io, which failed to import: {exc}") from None


def join(base: str, *parts: str) -> str:
    base = str(base)
    return "/".join([base.rstrip("/"), *parts]) if is_remote(base) else os.path.join(base, *parts)


def exists(path: str) -> bool:
    if _local(path):
        return os.path.exists(path)
    ensure_filesystem(path)
    return _gfile().exists(path)


def makedirs(path: str) -> None:
    if _local(path):
        os.makedirs(path, exist_ok=True)
        return
    ensure_filesystem(path)
    _gfile().makedirs(path)


def listdir(path: str) -> list[str]:
    if _local(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    ensure_filesystem(path)
    return [p.rstrip("/") for p in _gfile().listdir(path)] if _gfile().exists(path) else []


def size(path: str) -> int:
    if _local(path):
        return int(os.stat(path).st_size)
    ensure_filesystem(path)
    return int(_gfile().stat(path).length)


def rename(src: str, dst: str) -> None:
    """Atomic on local disk; copy-then-delete on object stores (still never a partial final name)."""
    if _local(src) and _local(dst):
        os.replace(src, dst)
        return
    ensure_filesystem(src)
    _gfile().rename(src, dst, overwrite=True)


def remove(path: str) -> None:
    if _local(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        return
    ensure_filesystem(path)
    if _gfile().exists(path):
        if _gfile().isdir(path):
            _gfile().rmtree(path)
        else:
            _gfile().remove(path)


def read_text(path: str) -> str:
    if _local(path):
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    ensure_filesystem(path)
    with _gfile().GFile(path, "r") as fh:
        return fh.read()


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Readers see the old file or the new one, never a partial one. Local files are also synced
    to disk before the rename, so a crash cannot leave the new name over an empty file."""
    if is_remote(path):
        ensure_filesystem(path)
        with _gfile().GFile(path + ".tmp", "wb") as fh:
            fh.write(data)
        rename(path + ".tmp", path)
        return
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_text_atomic(path: str, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_path(path: str, tmp: str | None = None):
    """A temporary name for a writer that must create the file itself (Keras weights, np.savez);
    renamed over `path` when the block ends without an error, removed when it fails."""
    tmp = tmp or path + ".tmp"
    try:
        yield tmp
    except BaseException:
        if not is_remote(tmp) and os.path.exists(tmp):
            os.remove(tmp)
        raise
    if is_remote(path):
        rename(tmp, path)
    else:
        os.replace(tmp, path)


def copy_atomic(src: str, dst: str) -> None:
    """Copy a file; readers of `dst` see the old file or the whole new one (local copies are synced)."""
    if is_remote(src) or is_remote(dst):
        ensure_filesystem(dst if is_remote(dst) else src)
        _gfile().copy(src, dst + ".tmp", overwrite=True)
        rename(dst + ".tmp", dst)
        return
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    if not _local(path):
        ensure_filesystem(path)
    with (open(path, "rb") if _local(path) else _gfile().GFile(path, "rb")) as fh:
        while True:
            chunk = fh.read(1 << 22)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()
