"""The frozen corpus files under ``data/corpus/`` behind notebooks 04-09: write, read and verify them (stdlib only).

A snapshot is one xz-compressed file holding the corpus bytes and the Python token type of every byte,
exactly as :mod:`moe_course.corpus` built them from one CPython release's standard library. Reading it
needs no tokenizer, no numpy and no torch, so every Python >= 3.10 sees the same text and the same labels
(``tests/test_corpus_snapshot.py`` runs this file under each CPython it finds). The layout, after
decompression::

    MAGIC                          b"MOE-COURSE-CORPUS\\n"
    header                         one line of JSON (UTF-8), then b"\\n": name, python, files, offsets, sizes
    train bytes | val bytes        the byte tokens (header["n_train"] + header["n_val"] bytes)
    train types | val types        one TokenType (uint8) per byte, same lengths

The *corpus hash* is the SHA-256 of all of that (decompressed), so it names the text and labels, not the
compression. The *file hash* is the SHA-256 of the ``.xz`` file; both are recorded in
``moe_course/data/corpus_snapshots.json`` (:data:`INDEX_PATH`) and checked on every read.

Command line (no third-party package needed)::

    python moe_course/snapshot.py digest data/corpus/stdlib-course-cpython3.11.7.xz   # hashes, as JSON
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DATA_DIR",
    "INDEX_PATH",
    "MAGIC",
    "Snapshot",
    "SnapshotError",
    "digest",
    "read_index",
    "read_snapshot",
    "snapshot_path",
    "write_snapshot",
]

MAGIC = b"MOE-COURSE-CORPUS\n"
FORMAT = 1
INDEX_PATH = Path(__file__).resolve().parent / "data" / "corpus_snapshots.json"
"""Which snapshots exist, where, and their SHA-256 hashes (package data, the expected values)."""

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data" / "corpus"
"""Where the snapshot files live: the repository's top-level ``data/corpus/``."""


class SnapshotError(ValueError):
    """A snapshot file is missing, damaged or not the one the index names."""


@dataclass(frozen=True)
class Snapshot:
    """A decompressed snapshot: its header and its four byte strings."""

    header: dict[str, Any]
    train: bytes
    val: bytes
    train_types: bytes
    val_types: bytes
    corpus_sha256: str

    def digest(self) -> dict[str, Any]:
        """Hashes and sizes of every part (what the cross-version test compares)."""
        parts = {"train": self.train, "val": self.val, "train_types": self.train_types, "val_types": self.val_types}
        return {
            "name": self.header["name"],
            "corpus_sha256": self.corpus_sha256,
            **{f"{k}_sha256": hashlib.sha256(v).hexdigest() for k, v in parts.items()},
            **{f"{k}_bytes": len(v) for k, v in parts.items()},
            "files_train": len(self.header["files_train"]),
            "files_val": len(self.header["files_val"]),
        }


def read_index(path: str | Path = INDEX_PATH) -> dict[str, dict[str, Any]]:
    """``{name: entry}`` of :data:`INDEX_PATH`: each entry has file, file_sha256, corpus_sha256, python, ..."""
    path = Path(path)
    try:
        index = json.loads(path.read_text(encoding="utf-8"))["snapshots"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise SnapshotError(f"{path} is not a snapshot index (a JSON object with \"snapshots\"): "
                            f"{type(err).__name__}: {err}") from None
    if not isinstance(index, dict) or not all(isinstance(e, dict) for e in index.values()):
        raise SnapshotError(f"{path} is not a snapshot index: \"snapshots\" must map names to entries")
    return index


def snapshot_path(name: str, index: dict[str, dict[str, Any]] | None = None) -> Path:
    """The file of snapshot ``name`` (``$MOE_COURSE_DATA/corpus/`` if set, else ``data/corpus/``)."""
    index = read_index() if index is None else index
    if name not in index:
        raise ValueError(f"unknown corpus {name!r}; the snapshots are {', '.join(sorted(index))}")
    if not isinstance(index[name].get("file"), str):
        raise SnapshotError(f"the index entry of {name!r} names no file (its \"file\" is missing); restore the "
                            "index moe_course/data/corpus_snapshots.json")
    root = os.environ.get("MOE_COURSE_DATA")
    folder = Path(root).expanduser() / "corpus" if root else DATA_DIR
    return folder / index[name]["file"]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _restore_hint(path: Path) -> str:
    try:
        rel = path.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        rel = str(path)
    return (f"restore it from the course repository with `git checkout -- {rel}` (run in the repository root), "
            "or clone the repository again")


def write_snapshot(path: str | Path, header: dict[str, Any], train: bytes, val: bytes, train_types: bytes,
                   val_types: bytes) -> dict[str, str]:
    """Write a snapshot file; return its ``file_sha256`` and ``corpus_sha256`` (for the index)."""
    for arg, value in (("train", train), ("val", val), ("train_types", train_types), ("val_types", val_types)):
        if not isinstance(value, (bytes, bytearray)):
            raise TypeError(f"{arg} must be bytes, got {type(value).__name__}")
    if not isinstance(header, dict):
        raise TypeError(f"header must be a dict, got {type(header).__name__}")
    if len(train) != len(train_types) or len(val) != len(val_types):
        raise ValueError("every byte needs one token type: the tokens and types lengths differ")
    header = {**header, "format": FORMAT, "n_train": len(train), "n_val": len(val)}
    raw = b"".join([MAGIC, json.dumps(header, sort_keys=True).encode("utf-8"), b"\n",
                    train, val, train_types, val_types])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                                   preset=9 | lzma.PRESET_EXTREME))
    return {"file_sha256": _sha256_file(path), "corpus_sha256": hashlib.sha256(raw).hexdigest()}


def _header(raw: bytes, path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header after MAGIC and where it ends; SnapshotError if it is malformed."""
    end = raw.find(b"\n", len(MAGIC))
    try:
        header = json.loads(raw[len(MAGIC):end].decode("utf-8")) if end >= 0 else None
    except (UnicodeDecodeError, ValueError):
        header = None
    if not isinstance(header, dict):
        raise SnapshotError(f"{path} has a malformed header (not one line of JSON after {MAGIC!r}); "
                            f"{_restore_hint(path)}")
    if header.get("format") != FORMAT:
        raise SnapshotError(f"{path} has header format {header.get('format')}, this code reads format {FORMAT}")
    sizes = [header.get("n_train"), header.get("n_val")]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in sizes):
        raise SnapshotError(f"{path} has a malformed header: n_train and n_val must be ints >= 0, got {sizes}")
    return header, end


def read_snapshot(path: str | Path, file_sha256: str | None = None, corpus_sha256: str | None = None) -> Snapshot:
    """Read and decompress a snapshot; with the expected hashes, raise :class:`SnapshotError` on a mismatch."""
    path = Path(path)
    if not path.is_file():
        raise SnapshotError(f"the corpus snapshot {path} is missing: {_restore_hint(path)}")
    if file_sha256 is not None:
        found = _sha256_file(path)
        if found != file_sha256:
            raise SnapshotError(
                f"the corpus snapshot {path} is damaged or replaced: its SHA-256 is {found}, expected "
                f"{file_sha256}; {_restore_hint(path)}")
    try:
        raw = lzma.decompress(path.read_bytes())
    except lzma.LZMAError as err:
        hint = _restore_hint(path)
        raise SnapshotError(f"the corpus snapshot {path} cannot be decompressed ({err}); {hint}") from None
    if not raw.startswith(MAGIC):
        raise SnapshotError(f"{path} is not a corpus snapshot (it does not start with {MAGIC!r})")
    header, end = _header(raw, path)
    n_train, n_val = header["n_train"], header["n_val"]
    body = raw[end + 1:]
    if len(body) != 2 * (n_train + n_val):
        raise SnapshotError(f"{path} holds {len(body)} bytes after its header, expected {2 * (n_train + n_val)}")
    found_corpus = hashlib.sha256(raw).hexdigest()
    if corpus_sha256 is not None and found_corpus != corpus_sha256:
        raise SnapshotError(f"the corpus in {path} has SHA-256 {found_corpus}, expected {corpus_sha256}; "
                            f"{_restore_hint(path)}")
    n = n_train + n_val
    return Snapshot(header=header, train=body[:n_train], val=body[n_train:n],
                    train_types=body[n:n + n_train], val_types=body[n + n_train:], corpus_sha256=found_corpus)


def digest(path: str | Path) -> dict[str, Any]:
    """:meth:`Snapshot.digest` of the file at ``path``, with the reading Python's version."""
    out = read_snapshot(path).digest()
    out["python"] = "{}.{}.{}".format(*sys.version_info[:3])
    return out


def main(argv: list[str] | None = None) -> int:
    """``python moe_course/snapshot.py digest PATH``: print the snapshot's hashes as JSON."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "digest":
        print("usage: python moe_course/snapshot.py digest PATH", file=sys.stderr)
        return 2
    try:
        print(json.dumps(digest(argv[1]), sort_keys=True))
    except (SnapshotError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
