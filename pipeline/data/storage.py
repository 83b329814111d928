"""Treat a local folder and an ``s3://bucket/prefix`` URL the same way, through fsspec.

S3 settings come from the environment: the standard AWS variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_DEFAULT_REGION / AWS_REGION) and an optional
endpoint from ``S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL`` (MinIO, moto, ...). Credentials are
read into the filesystem object so that it can be pickled to Ray workers whose environment
lacks them; they are never logged and never put into messages (paths and URLs only).

Failures of the store itself (a 5xx, a throttle, a dropped connection) are retried a bounded
number of times: botocore's "standard" retry mode, ``S3_MAX_ATTEMPTS`` attempts in all (default
5, exponential backoff with jitter), each with ``S3_CONNECT_TIMEOUT`` / ``S3_READ_TIMEOUT``
seconds (10 / 60); s3fs's own retry loop is turned off so that the two do not multiply (they
did: 250 requests over three minutes for one unreachable image). What still fails raises
``StorageError`` naming the URL: never a bad record, so ``data.on_bad=skip`` cannot drop records
for a network fault.
"""

from __future__ import annotations

import json
import os
import posixpath
import stat
from contextlib import contextmanager
from typing import Any, Iterator

import fsspec

_REMOTE_SCHEMES = ("s3://", "s3a://")


class StorageError(RuntimeError):
    """The store failed to serve ``url`` after its bounded retries (not a problem of the data)."""

    def __init__(self, url: str, detail: str) -> None:
        super().__init__(f"{url}: could not be read from storage after its retries ({detail})")
        self.url, self.detail = url, detail

    def __reduce__(self):  # across Ray's pickling
        return (StorageError, (self.url, self.detail))


def is_remote(root: str) -> bool:
    """True for object-store URLs (``s3://``), False for local paths."""
    return root.startswith(_REMOTE_SCHEMES)


def s3_storage_options() -> dict[str, Any]:
    """s3fs constructor options from the environment (secrets included: do not print them)."""
    opts: dict[str, Any] = {}
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        opts["key"] = env["AWS_ACCESS_KEY_ID"]
        opts["secret"] = env["AWS_SECRET_ACCESS_KEY"]
        if env.get("AWS_SESSION_TOKEN"):
            opts["token"] = env["AWS_SESSION_TOKEN"]
    client: dict[str, Any] = {}
    endpoint = env.get("S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        client["endpoint_url"] = endpoint
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        client["region_name"] = region
    if client:
        opts["client_kwargs"] = client
    opts["config_kwargs"] = {
        "retries": {"mode": "standard", "max_attempts": int(env.get("S3_MAX_ATTEMPTS", "5"))},
        "connect_timeout": float(env.get("S3_CONNECT_TIMEOUT", "10")),
        "read_timeout": float(env.get("S3_READ_TIMEOUT", "60")),
    }
    return opts


def _bounded_s3() -> type:
    """s3fs's filesystem with one try in its own retry loop (botocore's bounded retries do the
    retrying; see the module docstring). Importable as ``pipeline.data.storage.BoundedS3FileSystem``
    (module ``__getattr__``), so that it pickles to Ray workers; s3fs is imported on first use."""
    global _BOUNDED
    if _BOUNDED is None:
        from s3fs import S3FileSystem

        class BoundedS3FileSystem(S3FileSystem):
            retries = 1

        BoundedS3FileSystem.__module__ = __name__
        BoundedS3FileSystem.__qualname__ = "BoundedS3FileSystem"
        _BOUNDED = BoundedS3FileSystem
    return _BOUNDED


_BOUNDED: type | None = None


def __getattr__(name: str):
    if name == "BoundedS3FileSystem":
        return _bounded_s3()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolve(root: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for a local folder or an ``s3://`` URL.

    The path is in the filesystem's own form: absolute POSIX for local roots,
    ``bucket/prefix`` (no scheme) for S3.
    """
    if is_remote(root):
        fs = _bounded_s3()(**s3_storage_options())
        path = fs._strip_protocol(root)
    else:
        fs, path = fsspec.core.url_to_fs(os.path.abspath(os.path.expanduser(root)))
    return fs, path.rstrip("/") or path


def join(base: str, *parts: str) -> str:
    """Join path parts with "/" (works for local POSIX paths and ``bucket/prefix`` paths)."""
    return posixpath.join(base, *parts)


def display(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A human-readable location for messages: ``s3://bucket/key`` or the local path."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return path
    return f"{protocol}://{path}"


@contextmanager
def _store_errors(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[None]:
    """An object store's failure (after its retries) as ``StorageError`` naming the URL; a missing
    file stays ``FileNotFoundError``; local errors pass as they are."""
    try:
        yield
    except FileNotFoundError:
        raise
    except Exception as e:
        if not is_remote(display(fs, path)):
            raise
        raise StorageError(display(fs, path), f"{type(e).__name__}: {e}") from e


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """The whole content of one file (``FileNotFoundError`` if there is none; ``StorageError``
    if the store fails to serve it)."""
    with _store_errors(fs, path):
        return fs.cat_file(path)


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    """Parse one JSON file (``json.JSONDecodeError`` / ``FileNotFoundError`` propagate)."""
    return json.loads(read_bytes(fs, path).decode("utf-8"))


def exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether a file exists (a fresh check, not a cached listing)."""
    fs.invalidate_cache(path)
    return fs.exists(path)


def list_files(fs: fsspec.AbstractFileSystem, root: str) -> set[str]:
    """Every file below ``root``, as paths relative to it ("a/b.png"), in one recursive listing."""
    fs.invalidate_cache()
    prefix = root.rstrip("/") + "/"
    out = set()
    with _store_errors(fs, root):
        found = fs.find(root)
    for full in found:
        full = full.rstrip("/")
        if full.startswith(prefix):
            out.add(full[len(prefix):])
    return out


# ---- keeping record paths inside their root ----------------------------------------------------


def lexical_escape(rel: str) -> str | None:
    """Why the record path ``rel`` is not a plain relative path below its root, or None.

    Refused on every storage: absolute forms ("/x", "\\x", "C:x", "s3://..."), any ".." segment
    (object-store keys included: an HTTP client may collapse "a/../b"), and NUL characters.
    """
    if "\x00" in rel:
        return f"path {rel!r} contains a NUL character"
    if rel.startswith(("/", "\\")) or "://" in rel or (len(rel) > 1 and rel[1] == ":"):
        return f"absolute path {rel!r} escapes the image root"
    if ".." in rel.replace("\\", "/").split("/"):
        return f"path {rel!r} contains '..' and escapes the image root"
    return None


class Confinement:
    """Decides whether a record's relative path stays inside ``root`` (a path of ``fs``).

    Local roots: the path is resolved, symbolic links included, and the result must lie inside
    the resolved root; a link inside the root that points outside it (to a file or a folder) is
    refused. Object stores have no links: the key, normalised, must stay under the root prefix.
    The resolved folders are cached, so a check costs one ``lstat`` per file.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        self.local = protocol in ("file", "local")
        self.root = root.rstrip("/") or root
        self._real_root = os.path.realpath(self.root) if self.local else self.root
        self._dirs: dict[str, str] = {}

    def _inside(self, path: str, sep: str) -> bool:
        base = self._real_root.rstrip(sep)
        return path == self._real_root or path.startswith(base + sep)

    def escape(self, rel: str) -> str | None:
        """None when ``rel`` stays inside the root, else the reason (for a ``BadRecord``)."""
        why = lexical_escape(rel)
        if why is not None:
            return why
        if not self.local:
            key = posixpath.normpath(join(self.root, rel))
            return None if self._inside(key, "/") else f"path {rel!r} leaves the root prefix {self.root!r}"
        full = os.path.join(self.root, rel)
        parent, name = os.path.split(full)
        try:
            real_parent = self._dirs.get(parent)
            if real_parent is None:
                real_parent = self._dirs[parent] = os.path.realpath(parent)
            real = os.path.join(real_parent, name)
            try:
                if stat.S_ISLNK(os.lstat(real).st_mode):
                    real = os.path.realpath(real)
            except FileNotFoundError:
                pass  # reported as missing by the caller's listing
        except (OSError, ValueError) as e:
            return f"path {rel!r} cannot be resolved: {type(e).__name__}: {e}"
        if self._inside(real, os.sep):
            return None
        return (f"path {rel!r} resolves to {real!r}, outside the image root {self._real_root!r} "
                "(a symbolic link leads out of it)")
