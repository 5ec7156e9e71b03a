"""Checkpoint files that cannot lie: written atomically, listed with their sizes and hashes in a
manifest written last, verified before any byte of them is read (what goes in them:
``checkpoint.py``).

``manifest.json`` in a checkpoint's directory: ``{"format", "hash", "files": {relative path:
{"size", "sha256"}}, "version", "config"}``.

Why a manifest: ``torch.load`` does not check the CRCs its zip records carry, so flipped bytes
inside a stored tensor (a disk, copy or network fault) load without error as wrong numbers. The
hash is sha256 (``hashlib``), the faster of its strong hashes where we measured (sha256 and
blake2b: ``bench/results/``); files are hashed as they are written, so a save reads nothing
back, and verified in one streamed read at load.

Client state travels in the states file, read back with ``torch.load(weights_only=True)``: only
tensors, numbers, strings, containers of them and the RNG states people save (Python's
``random.getstate()``, numpy's ``get_state()`` and ``bit_generator.state``, torch's generator
states) load. Anything else is refused at save (``check_client_state``), naming the key.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "FileRecord",
    "atomic_write",
    "check_client_state",
    "hash_file",
    "load_states",
    "read_manifest",
    "remove_leftovers",
    "verify",
    "write_manifest",
]

MANIFEST_FILE = "manifest.json"
HASH = "sha256"
MANIFEST_FORMAT = 1
_CHUNK = 8 << 20  # bytes per read when hashing


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded (missing, damaged, or for another model/run)."""


@dataclass
class FileRecord:
    """A file's size and hash, as the manifest lists them."""

    size: int
    digest: str

    def as_dict(self) -> dict[str, Any]:
        return {"size": self.size, HASH: self.digest}


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes and counts what goes through it."""

    def __init__(self, file):
        self._file = file
        self.hasher = hashlib.new(HASH)
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.hasher.update(view)
        self.size += len(view)
        return self._file.write(view)

    def flush(self) -> None:
        self._file.flush()


def atomic_write(path: Path, write: Callable[[Any], None]) -> FileRecord:
    """Write ``path`` through a temporary file beside it (hashed as written), fsync, then
    rename: the old file stays intact until the new one is complete. A temporary file left by
    a killed process is removed by the next save (``remove_leftovers``)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f)
            write(writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return FileRecord(writer.size, writer.hasher.hexdigest())


def hash_file(path: Path) -> FileRecord:
    """Size and hash of a file on disk, in one streamed read."""
    hasher = hashlib.new(HASH)
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    return FileRecord(size, hasher.hexdigest())


def write_manifest(
    directory: Path, files: dict[str, FileRecord], version: str, config: dict
) -> None:
    """Write ``directory/manifest.json`` atomically: the checkpoint's last file, so a reader
    that finds it knows every file it lists was complete."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "hash": HASH,
        "files": {name: record.as_dict() for name, record in sorted(files.items())},
        "version": version,
        "config": json.loads(json.dumps(config, default=str)),
    }
    manifest["checksum"] = _checksum(manifest)
    text = json.dumps(manifest, indent=1, sort_keys=True).encode()
    atomic_write(directory / MANIFEST_FILE, lambda f: f.write(text))


def _checksum(manifest: dict) -> str:
    """The manifest's own hash, over everything but itself (canonical JSON)."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.new(HASH, text).hexdigest()


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path} does not exist: {directory} is not a complete checkpoint (its save was "
            "interrupted, or it was written by a version without manifests)"
        )
    try:
        manifest = json.loads(path.read_bytes().decode())
        files, hash_name, checksum = manifest["files"], manifest["hash"], manifest["checksum"]
    except (ValueError, KeyError, TypeError) as e:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{path} is damaged: {e}") from e
    if checksum != _checksum(manifest):
        raise CheckpointError(f"{path} is damaged: its contents do not match its checksum")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{path} has manifest format {manifest.get('format')!r}")
    if hash_name != HASH or not isinstance(files, dict):
        raise CheckpointError(f"{path} lists files hashed with {hash_name!r}; expected {HASH}")
    return manifest


def verify(directory: Path, names: Iterable[str] | None = None) -> dict[str, Any]:
    """Check the files of the checkpoint in ``directory`` (all that its manifest lists, or
    ``names``) against the manifest: sizes first, then hashes. Raises ``CheckpointError``
    naming the file and what differs; returns the manifest."""
    manifest = read_manifest(directory)
    files = manifest["files"]
    for name in sorted(files) if names is None else names:
        if name not in files:
            raise CheckpointError(f"{directory / MANIFEST_FILE} does not list {name}")
        expected = files[name]
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (the manifest lists it)")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(
                f"{path} has {size} bytes, the manifest says {expected['size']}: truncated or "
                "replaced"
            )
        found = hash_file(path).digest
        if found != expected[HASH]:
            raise CheckpointError(
                f"{path} is corrupt: its {HASH} is {found[:16]}..., the manifest says "
                f"{expected[HASH][:16]}... (the bytes changed after the save)"
            )
    return manifest


def remove_leftovers(*directories: Path) -> None:
    """Remove the temporary files of interrupted saves (``.<name>.<random>.tmp``)."""
    for directory in directories:
        if directory.is_dir():
            for path in directory.glob(".*.tmp"):
                with contextlib.suppress(OSError):
                    path.unlink()


def _numpy_globals() -> list:
    """What a numpy array or RNG state pickles through (numpy 1 and 2 spell it differently)."""
    try:
        import numpy as np
    except ImportError:
        return []
    core = getattr(np, "_core", None) or np.core
    found = [np.ndarray, np.dtype, core.multiarray._reconstruct]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25: dtypes pickle through their classes
    if dtypes is not None:
        found += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType")]
    return found


def _allow_listed():
    safe = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    if safe is not None:
        return safe(_numpy_globals())
    torch.serialization.add_safe_globals(_numpy_globals())  # torch 2.4: process-wide
    return contextlib.nullcontext()


def load_states(file) -> Any:
    """``torch.load(file, weights_only=True)`` with numpy arrays allowed (RNG states)."""
    with _allow_listed():
        return torch.load(file, map_location="cpu", weights_only=True)


def check_client_state(client_state: Any) -> dict:
    """``client_state`` as saved, or ``ValueError`` naming the first key whose value could not
    be read back safely (``weights_only=True``), before anything is written."""
    if client_state is None:
        return {}
    if type(client_state) is not dict:
        raise ValueError(
            f"client_state must be a plain dict, got a {type(client_state).__name__}; pass "
            "dict(client_state)"
        )
    for key in client_state:
        if not isinstance(key, (str, int, float, bool)) and key is not None:
            raise ValueError(
                f"client_state key {key!r} is a {type(key).__name__}; keys must be strings or "
                "numbers (the checkpoint is read back with weights_only=True)"
            )
    for key, value in client_state.items():
        buffer = io.BytesIO()
        try:
            torch.save(value, buffer)
            buffer.seek(0)
            load_states(buffer)
        except Exception:
            buffer.seek(0)
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(buffer)
            except Exception:  # torch < 2.5, or not a checkpoint at all
                unsafe = []
            raise ValueError(
                f"client_state[{key!r}] (a {type(value).__name__}) could not be read back "
                "safely: checkpoints load with torch.load(weights_only=True), which takes "
                "tensors, numbers, strings, containers of them and RNG states (random, numpy, "
                "torch). Convert it to those first"
                + (f" (it pickles {', '.join(unsafe)})" if unsafe else "")
            ) from None
    return client_state
