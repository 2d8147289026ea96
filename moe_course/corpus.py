"""The Python standard library as a byte-level text corpus with a token type per byte (notebooks 04-06, 08, 09).

Every Python installation ships its standard library as source, so this corpus needs no download
(Colab and Binder included). The pieces:

* **A frozen snapshot**: by default the corpus is read from ``data/corpus/`` (:mod:`moe_course.snapshot`):
  the bytes of the files below and their token types, as built once from CPython 3.11.7's standard library,
  so every Python (3.10 to 3.13, Colab, Binder) trains on the same text with the same labels. The file and
  its content are checked against the SHA-256 hashes in ``moe_course/data/corpus_snapshots.json``;
  :func:`corpus_sha256` is the hash that stored results carry. ``source="installed"`` builds the same
  corpus from the running Python's own standard library instead (text and labels then differ by version).
* **Files**: the fixed list :data:`STDLIB_FILES` (paths relative to ``sysconfig.get_paths()["stdlib"]``),
  long-lived pure-Python modules present in every CPython 3.10 to 3.13, read with their train/validation
  split from the manifest ``moe_course/data/corpus_manifest.json`` (:data:`MANIFEST_PATH`): the ``course``
  corpus (3.25 MB). The ``large`` corpus (:data:`LARGE_MANIFEST_PATH`, 10.3 MB) adds every other module
  of the standard library but tests, IDLE, lib2to3, turtledemo, ensurepip and pydoc's generated topics; the
  GPU size trains on it. Building from the installed library skips a missing file with a warning; fewer
  than half found is an error.
* **Tokens**: the raw UTF-8 bytes, so the vocabulary is 256 (:data:`VOCAB_SIZE`). Each file is preceded
  by the header ``"\\n# ==== NAME ====\\n\\n"`` (:data:`FILE_HEADER`), a Python comment, so decoded text
  stays readable and a model sees where one file ends and the next begins.
* **Split by file**: the manifest puts a file in validation when ``zlib.crc32(path) % 10 == 0`` (12 of the
  117 files, about 10% of the bytes), so validation text comes from files the model never saw. The rule
  looks at the path only, so it is the same on every machine and does not shift when a file is missing.
* **Token types**: :func:`label_token_types` labels every byte with a :class:`TokenType` using the
  standard :mod:`tokenize` module (and :mod:`ast` to tell docstrings from other strings). The labels let
  the notebooks ask which experts the router sends comments, strings, keywords or numbers to.

:func:`load_corpus` decompresses the snapshot (a fraction of a second) and keeps it for the session; built
from the installed library, the arrays are cached as ``.npz`` in ``$MOE_COURSE_CACHE`` or
``~/.cache/moe_course``, never in the repository. :func:`freeze` writes a snapshot; :func:`get_batch`
samples nanoGPT-style training batches.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import keyword
import os
import sys
import sysconfig
import time
import tokenize
import warnings
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import overload

import numpy as np
import torch

from moe_course import snapshot
from moe_course.validate import check_int, check_tensor

__all__ = [
    "CORPORA",
    "FILE_HEADER",
    "LARGE_MANIFEST_PATH",
    "MANIFEST_PATH",
    "SOURCES",
    "SPLIT",
    "STDLIB_FILES",
    "TOKEN_TYPE_NAMES",
    "VAL_PARTS",
    "VOCAB_SIZE",
    "Corpus",
    "TokenType",
    "cache_path",
    "corpus_files",
    "corpus_sha256",
    "decode",
    "default_cache_dir",
    "encode",
    "freeze",
    "get_batch",
    "is_val_file",
    "label_token_types",
    "load_corpus",
    "make_manifest",
    "read_manifest",
    "split_files",
    "stdlib_dir",
    "train_bytes",
    "val_part_of",
    "write_manifest",
]

VOCAB_SIZE = 256
"""Byte-level vocabulary: token ``i`` is the byte value ``i``."""

FILE_HEADER = "\n# ==== {name} ====\n\n"
"""Separator written before every file (a Python comment, labelled COMMENT and WHITESPACE)."""

_FORMAT_VERSION = 1  # bump when the arrays or labels change meaning, so old caches are not reused

MANIFEST_PATH = Path(__file__).parent / "data" / "corpus_manifest.json"
"""The corpus manifest: which standard-library files, and which of them are validation (see data/README.md).

Package data, so a pip install carries it. It lists pure-Python modules present in CPython 3.10, 3.11, 3.12
and 3.13 (about 3.2 MB in all). Left out on purpose: modules removed in 3.12/3.13 (distutils, asyncore,
imp, smtpd, ...), modules turned into packages (pathlib, zipfile in 3.12/3.13; string in 3.14), tests,
generated tables and the largest files. :func:`write_manifest` rewrites it from a file list.
"""

_SPLIT_RULE = "val when zlib.crc32(path.encode('utf-8')) % 10 == 0, else train"


def _crc_is_val(name: str) -> bool:
    """The rule that assigns a file to validation, from its path only (the same on every machine)."""
    return zlib.crc32(name.encode("utf-8")) % 10 == 0


def make_manifest(names: Iterable[str]) -> dict[str, object]:
    """The manifest of ``names``: sorted, each with its split ("train" or "val") by the crc32 rule."""
    names = sorted(set(names))
    return {
        "about": "Files of the byte-level corpus (moe_course.corpus), relative to sysconfig.get_paths()['stdlib'],"
        " with the split each belongs to. Made by moe_course.corpus.write_manifest; see data/README.md.",
        "split_rule": _SPLIT_RULE,
        "files": {name: "val" if _crc_is_val(name) else "train" for name in names},
    }


def write_manifest(names: Iterable[str], path: str | Path = MANIFEST_PATH) -> Path:
    """Write :func:`make_manifest` of ``names`` as JSON to ``path`` (by default the packaged manifest)."""
    path = Path(path)
    path.write_text(json.dumps(make_manifest(names), indent=2) + "\n", encoding="utf-8")
    return path


def read_manifest(path: str | Path = MANIFEST_PATH) -> dict[str, str]:
    """The manifest's ``{file: "train" | "val"}``, sorted by file; raises ValueError naming a bad entry."""
    path = Path(path)
    files = json.loads(path.read_text(encoding="utf-8")).get("files")
    if not isinstance(files, dict) or not files:
        raise ValueError(f"{path.name}: expected a non-empty \"files\" object mapping each path to its split")
    for name, split in files.items():
        if split not in ("train", "val"):
            raise ValueError(f"{path.name}: {name} has split {split!r}; use \"train\" or \"val\"")
        if not name.endswith(".py") or name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"{path.name}: {name!r} must be a .py path relative to the standard library")
    if list(files) != sorted(files):
        raise ValueError(f"{path.name}: files must be sorted (write it with write_manifest)")
    return dict(files)


SPLIT: dict[str, str] = read_manifest()
"""``SPLIT[path]`` is ``"train"`` or ``"val"``, read from :data:`MANIFEST_PATH`."""

STDLIB_FILES: tuple[str, ...] = tuple(SPLIT)
"""The corpus files (sorted), paths relative to ``sysconfig.get_paths()["stdlib"]``."""

LARGE_MANIFEST_PATH = Path(__file__).parent / "data" / "corpus_manifest_large.json"
"""The ``large`` corpus's files: every module of CPython 3.11's standard library but tests, IDLE, lib2to3,
turtledemo, ensurepip and the generated pydoc topics (the ``course`` files included, with the same split)."""

CORPORA = ("course", "large")
"""The corpora: ``course`` (:data:`STDLIB_FILES`, the CPU sizes) and ``large`` (the GPU size)."""

SOURCES = ("snapshot", "installed")
"""Where :func:`load_corpus` reads: the frozen snapshot in ``data/corpus/``, or the installed standard library."""


def corpus_files(name: str = "course") -> tuple[str, ...]:
    """The files of corpus ``name`` (sorted), from its manifest."""
    _check_name(name)
    return STDLIB_FILES if name == "course" else tuple(read_manifest(LARGE_MANIFEST_PATH))


def _check_name(name: str) -> None:
    if name not in CORPORA:
        raise ValueError(f"corpus name must be one of {', '.join(CORPORA)}; got {name!r}")


def train_bytes(name: str = "course") -> int:
    """Training bytes of the frozen corpus ``name`` (from the snapshot index, without reading the corpus)."""
    _check_name(name)
    return int(snapshot.read_index()[name]["train_bytes"])


def corpus_sha256(name: str = "course") -> str:
    """SHA-256 of the frozen corpus ``name`` (its text and labels): what stored results are fingerprinted with."""
    _check_name(name)
    return snapshot.read_index()[name]["corpus_sha256"]


class TokenType(IntEnum):
    """The Python token type a byte belongs to (see :func:`label_token_types`)."""

    OTHER = 0  # line-continuation backslashes, stray characters, a BOM, every byte of an untokenizable file
    WHITESPACE = 1  # spaces, tabs, newlines and indentation outside any other token
    COMMENT = 2  # "# ..." up to (not including) the newline
    STRING = 3  # string literals, bytes, f-strings (all of it, including the {expressions} inside)
    DOCSTRING = 4  # a string that is the first statement of a module, class or function
    NAME = 5  # identifiers, including soft keywords (match, case, type, _)
    KEYWORD = 6  # keyword.iskeyword: def, return, if, None, True, ...
    NUMBER = 7  # numeric literals
    OPERATOR = 8  # tokenize OP tokens: punctuation, brackets, operators


TOKEN_TYPE_NAMES: list[str] = [t.name for t in TokenType]
"""``TOKEN_TYPE_NAMES[i]`` is the name of label ``i`` (for plot legends)."""


# ---------------------------------------------------------------------------------------------------------
# Byte labels
# ---------------------------------------------------------------------------------------------------------

_WHITESPACE_BYTES = np.zeros(256, dtype=bool)
_WHITESPACE_BYTES[list(b" \t\n\r\f")] = True

# Tokens that open/close an f-string (3.12+) or t-string (3.14+); the whole literal is labelled STRING,
# as older Pythons do, so labels do not depend on the version's tokenizer.
_FSTRING_START = {getattr(tokenize, n) for n in ("FSTRING_START", "TSTRING_START") if hasattr(tokenize, n)}
_FSTRING_END = {getattr(tokenize, n) for n in ("FSTRING_END", "TSTRING_END") if hasattr(tokenize, n)}


class _Positions:
    """Converts tokenize's (row, character column) and ast's (row, UTF-8 column) to byte offsets."""

    def __init__(self, text: str, encoding: str, base: int) -> None:
        self.lines = text.split("\n")  # the same physical lines that io.StringIO.readline yields
        self.encoding = encoding
        self.starts: list[int] = []  # byte offset of the start of each line
        self.ascii: list[bool] = []
        offset = base
        for line in self.lines:
            self.starts.append(offset)
            is_ascii = line.isascii()
            self.ascii.append(is_ascii)
            offset += (len(line) if is_ascii else len(line.encode(encoding))) + 1

    def byte(self, row: int, col: int) -> int:
        """Byte offset of character ``col`` of line ``row`` (1-based, as tokenize counts)."""
        i = row - 1
        if i >= len(self.lines):  # ENDMARKER sits one line past the end
            return self.starts[-1] + len(self.lines[-1].encode(self.encoding))
        if self.ascii[i]:
            return self.starts[i] + col
        return self.starts[i] + len(self.lines[i][:col].encode(self.encoding))

    def byte_from_utf8(self, row: int, col: int) -> int:
        """Byte offset of UTF-8 byte column ``col`` of line ``row`` (ast's convention)."""
        i = row - 1
        if self.ascii[i]:
            return self.starts[i] + col
        chars = len(self.lines[i].encode("utf-8")[:col].decode("utf-8", errors="ignore"))
        return self.byte(row, chars)


def _token_spans(text: str, pos: _Positions) -> tuple[list[int], list[int], list[int]]:
    """(starts, ends, labels) in bytes of every labelled token; raises what tokenize raises."""
    starts: list[int] = []
    ends: list[int] = []
    labels: list[int] = []
    fstring_depth = 0
    fstring_start = (0, 0)
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        kind = tok.type
        if kind in _FSTRING_START:
            if fstring_depth == 0:
                fstring_start = tok.start
            fstring_depth += 1
            continue
        if fstring_depth:
            if kind in _FSTRING_END:
                fstring_depth -= 1
                if fstring_depth == 0:
                    starts.append(pos.byte(*fstring_start))
                    ends.append(pos.byte(*tok.end))
                    labels.append(TokenType.STRING)
            continue
        if kind == tokenize.NAME:
            label = TokenType.KEYWORD if keyword.iskeyword(tok.string) else TokenType.NAME
        elif kind == tokenize.OP:
            label = TokenType.OPERATOR
        elif kind == tokenize.STRING:
            label = TokenType.STRING
        elif kind == tokenize.COMMENT:
            label = TokenType.COMMENT
        elif kind == tokenize.NUMBER:
            label = TokenType.NUMBER
        else:  # NEWLINE, NL, INDENT, DEDENT, ENDMARKER, ERRORTOKEN: left to the whitespace/other pass
            continue
        starts.append(pos.byte(*tok.start))
        ends.append(pos.byte(*tok.end))
        labels.append(label)
    return starts, ends, labels


def _docstring_spans(text: str, pos: _Positions) -> list[tuple[int, int]]:
    """Byte spans of module, class and function docstrings (empty if ``ast`` cannot parse the text)."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    spans: list[tuple[int, int]] = []
    owners = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    stack: list[ast.AST] = [tree]
    while stack:  # visit statements only (much cheaper than ast.walk over every expression)
        node = stack.pop()
        body = getattr(node, "body", None)
        if isinstance(node, owners) and body:
            first = body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                v = first.value
                if v.end_lineno is not None and v.end_col_offset is not None:
                    start = pos.byte_from_utf8(v.lineno, v.col_offset)
                    spans.append((start, pos.byte_from_utf8(v.end_lineno, v.end_col_offset)))
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            children = getattr(node, field, None)
            if isinstance(children, list):
                stack.extend(c for c in children if isinstance(c, ast.AST))
    return spans


def label_token_types(source: bytes) -> np.ndarray:
    """Return a uint8 array, one :class:`TokenType` per byte of the Python ``source``.

    Bytes outside tokens are WHITESPACE (space, tab, newline, CR, form feed) or OTHER. If ``tokenize``
    rejects the source (a syntax error it detects, an unterminated bracket or string, a bad encoding),
    every byte is OTHER.
    """
    source = bytes(source)
    n = len(source)
    out = np.full(n, TokenType.OTHER, dtype=np.uint8)
    if n == 0:
        return out
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(source).readline)
        base = 0
        if encoding == "utf-8-sig":
            encoding, base = "utf-8", 3 if source.startswith(b"\xef\xbb\xbf") else 0
        text = source[base:].decode(encoding)
        pos = _Positions(text, encoding, base)
        starts, ends, labels = _token_spans(text, pos)
    except (tokenize.TokenError, SyntaxError, UnicodeError, LookupError, ValueError):
        return out
    out[_WHITESPACE_BYTES[np.frombuffer(source, dtype=np.uint8)]] = TokenType.WHITESPACE
    if starts:
        s = np.asarray(starts, dtype=np.int64)
        lengths = np.asarray(ends, dtype=np.int64) - s
        total = int(lengths.sum())
        # indices of all bytes of all tokens: for each token, s, s+1, ..., e-1 (vectorised)
        idx = np.arange(total, dtype=np.int64) + np.repeat(s - (np.cumsum(lengths) - lengths), lengths)
        out[idx] = np.repeat(np.asarray(labels, dtype=np.uint8), lengths)
    for start, end in _docstring_spans(text, pos):
        segment = out[start:end]
        segment[segment == TokenType.STRING] = TokenType.DOCSTRING
    return out


# ---------------------------------------------------------------------------------------------------------
# Files and split
# ---------------------------------------------------------------------------------------------------------


def stdlib_dir() -> Path:
    """Directory of the running Python's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


VAL_PARTS = ("tune", "test")
"""The two halves of the validation files: settings are chosen on "tune", results reported on "test"."""


def val_part_of(name: str) -> str:
    """"tune" or "test" for a validation file, by the path-hash rule ``(crc32(path) // 10) % 2`` (0: tune).

    The digit after the one that made it a validation file, so the halves are fixed by path alone (course
    corpus: 7 files, 146 KB to tune on; 5 files, 189 KB to report on).
    """
    return "tune" if (zlib.crc32(name.encode("utf-8")) // 10) % 2 == 0 else "test"


def is_val_file(name: str) -> bool:
    """True when ``name`` is a validation file: its split in the manifest, else ``crc32(name) % 10 == 0``.

    The manifest was made with the same rule, so both agree on every listed file (tests check this).
    """
    split = SPLIT.get(name)
    return _crc_is_val(name) if split is None else split == "val"


def split_files(names: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split file names into (train, validation), keeping their order, with :func:`is_val_file`."""
    names = tuple(names)
    return tuple(n for n in names if not is_val_file(n)), tuple(n for n in names if is_val_file(n))


def _read_files(names: Sequence[str]) -> dict[str, bytes]:
    """Read the files that exist; warn about missing ones; fail if fewer than half are there."""
    root = stdlib_dir()
    found: dict[str, bytes] = {}
    missing: list[str] = []
    for name in names:
        try:
            found[name] = (root / name).read_bytes()
        except OSError:
            missing.append(name)
    if missing:
        warnings.warn(
            f"{len(missing)} standard-library file(s) not found under {root} and skipped: " + ", ".join(missing),
            stacklevel=4,
        )
    if len(found) * 2 < len(names):
        raise FileNotFoundError(
            f"only {len(found)} of the {len(names)} corpus files were found under {root}; this Python "
            "installation does not ship its standard library as .py source files"
        )
    return found


# ---------------------------------------------------------------------------------------------------------
# Encoding helpers
# ---------------------------------------------------------------------------------------------------------


def encode(text: str) -> torch.Tensor:
    """Encode text to byte tokens (a uint8 tensor)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}; decode bytes first or use "
                        "torch.tensor(list(data), dtype=torch.uint8)")
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


def decode(tokens: torch.Tensor | np.ndarray | Sequence[int]) -> str:
    """Decode byte tokens to text (invalid UTF-8, e.g. a cut multi-byte character, becomes U+FFFD)."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    if isinstance(tokens, (str, bytes)):
        raise TypeError(f"tokens must be byte tokens (ints in [0, 256)), got {type(tokens).__name__}")
    ids = np.asarray(tokens)
    if ids.size and (ids.dtype.kind not in "iub" or int(ids.min()) < 0 or int(ids.max()) > 255):
        raise ValueError(f"tokens must be byte tokens (ints in [0, 256)), got dtype {ids.dtype}, values "
                         f"{ids.min()}..{ids.max()}")
    return np.asarray(tokens, dtype=np.uint8).tobytes().decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """Train/validation byte tokens (uint8 tensors) and the token type of every byte."""

    train: torch.Tensor
    val: torch.Tensor
    train_types: torch.Tensor
    val_types: torch.Tensor
    files_train: tuple[str, ...]
    files_val: tuple[str, ...]
    vocab_size: int = VOCAB_SIZE
    offsets_val: tuple[int, ...] = ()  # where each validation file (its header) starts in ``val``

    def val_part(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, types) of the validation files in ``part``, "tune" or "test" (:func:`val_part_of`).

        Choosing settings on one half and reporting on the other keeps the reported numbers honest.
        """
        if part not in VAL_PARTS:
            raise ValueError(f"part must be one of {', '.join(map(repr, VAL_PARTS))}; got {part!r}")
        if len(self.offsets_val) != len(self.files_val):
            raise ValueError("this Corpus has no file offsets; load it with load_corpus()")
        ends = (*self.offsets_val[1:], len(self.val))
        spans = [(s, e) for name, s, e in zip(self.files_val, self.offsets_val, ends, strict=True)
                 if val_part_of(name) == part]
        if not spans:
            raise ValueError(f"no validation file of part {part!r} in this corpus (max_bytes too small?)")
        index = torch.cat([torch.arange(s, e) for s, e in spans])
        return self.val[index], self.val_types[index]

    def decode(self, tokens: torch.Tensor | np.ndarray | Sequence[int]) -> str:
        """Decode byte tokens to text."""
        return decode(tokens)

    def __repr__(self) -> str:
        return (
            f"Corpus(train={len(self.train):,} bytes from {len(self.files_train)} files, "
            f"val={len(self.val):,} bytes from {len(self.files_val)} files, vocab_size={self.vocab_size})"
        )


def default_cache_dir() -> Path:
    """``$MOE_COURSE_CACHE`` if set, else ``~/.cache/moe_course``."""
    env = os.environ.get("MOE_COURSE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moe_course"


def _list_hash(names: Sequence[str]) -> str:
    entries = [f"{name} {'val' if is_val_file(name) else 'train'}" for name in names]  # a new split, a new cache
    text = "\n".join([f"v{_FORMAT_VERSION}", FILE_HEADER, *entries])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def cache_path(cache_dir: str | Path | None = None, max_bytes: int | None = None, name: str = "course") -> Path:
    """Where ``load_corpus(source="installed")`` caches its arrays (by Python version and file list)."""
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    version = "{}.{}.{}".format(*sys.version_info[:3])
    suffix = "" if max_bytes is None else f"_max{max_bytes}"
    prefix = "stdlib_corpus" if name == "course" else f"stdlib_{name}_corpus"
    return directory / f"{prefix}_py{version}_{_list_hash(corpus_files(name))}{suffix}.npz"


def _build_part(
    names: Sequence[str], files: dict[str, bytes], cap: int | None
) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """Concatenate (header + file) for each name, with labels, stopping once ``cap`` bytes are reached."""
    tokens: list[bytes] = []
    types: list[np.ndarray] = []
    used: list[str] = []
    offsets: list[int] = []
    size = 0
    for name in names:
        if cap is not None and size >= cap:
            break
        if name not in files:
            continue
        header = FILE_HEADER.format(name=name).encode("utf-8")
        used.append(name)
        offsets.append(size)
        for chunk in (header, files[name]):
            tokens.append(chunk)
            types.append(label_token_types(chunk))
            size += len(chunk)
    data = np.frombuffer(b"".join(tokens), dtype=np.uint8)
    labels = np.concatenate(types) if types else np.zeros(0, dtype=np.uint8)
    if cap is not None:
        data, labels = data[:cap], labels[:cap]
    return data, labels, used, np.array(offsets, dtype=np.int64)


MIN_BYTES = 20
"""The smallest ``max_bytes``: its validation tenth (2 bytes) holds one input byte and its target."""


def _caps(max_bytes: int | None) -> tuple[int | None, int | None]:
    if max_bytes is None:
        return None, None
    check_int("max_bytes", max_bytes, MIN_BYTES, hint=" (the validation tenth needs at least 2 bytes: one input "
              "and its target)")
    val_cap = max(1, max_bytes // 10)
    return max_bytes - val_cap, val_cap


_KEYS = ("train", "val", "train_types", "val_types", "files_train", "files_val", "offsets_train", "offsets_val")


def _load_npz(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in _KEYS}
    except (OSError, KeyError, ValueError, EOFError):
        return None
    if len(arrays["train"]) != len(arrays["train_types"]) or len(arrays["val"]) != len(arrays["val_types"]):
        return None
    return arrays


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically (temporary file, then rename); warn instead of failing if the directory is read-only."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as err:
        warnings.warn(f"could not cache the corpus in {path.parent}: {err}", stacklevel=3)


def _truncate(arrays: dict[str, np.ndarray], max_bytes: int | None) -> dict[str, np.ndarray]:
    """Cut a full build to ``max_bytes``; equal to what ``_build(max_bytes)`` makes."""
    train_cap, val_cap = _caps(max_bytes)
    if train_cap is None:
        return arrays
    out = dict(arrays)
    for key, cap in (("train", train_cap), ("val", val_cap)):
        out[key] = arrays[key][:cap]
        out[f"{key}_types"] = arrays[f"{key}_types"][:cap]
        keep = arrays[f"offsets_{key}"] < cap  # files whose header starts inside the kept bytes
        out[f"files_{key}"] = arrays[f"files_{key}"][keep]
        out[f"offsets_{key}"] = arrays[f"offsets_{key}"][keep]
    return out


def _build(max_bytes: int | None, name: str = "course") -> dict[str, np.ndarray]:
    names = corpus_files(name)
    files = _read_files(names)
    train_names, val_names = split_files(names)
    train_cap, val_cap = _caps(max_bytes)
    train, train_types, used_train, offsets_train = _build_part(train_names, files, train_cap)
    val, val_types, used_val, offsets_val = _build_part(val_names, files, val_cap)
    return {
        "train": train,
        "val": val,
        "train_types": train_types,
        "val_types": val_types,
        "files_train": np.array(used_train, dtype=str),
        "files_val": np.array(used_val, dtype=str),
        "offsets_train": offsets_train,
        "offsets_val": offsets_val,
    }


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=np.uint8, copy=True))  # a writable, contiguous copy


def _load_installed(cache_dir: str | Path | None, max_bytes: int | None, name: str) -> dict[str, np.ndarray]:
    """The corpus built from the running Python's standard library (cached as .npz)."""
    full = cache_path(cache_dir, name=name)
    arrays = _load_npz(full)
    if arrays is not None:
        return _truncate(arrays, max_bytes)
    if max_bytes is None:
        arrays = _build(None, name)
        _save_npz(full, arrays)
        return arrays
    small = cache_path(cache_dir, max_bytes, name)
    arrays = _load_npz(small)
    if arrays is None:
        arrays = _build(max_bytes, name)
        _save_npz(small, arrays)
    return arrays


_SNAPSHOTS: dict[tuple[str, str], dict[str, np.ndarray]] = {}


def _load_snapshot(name: str) -> dict[str, np.ndarray]:
    """The arrays of the frozen snapshot ``name``, checked against the index's hashes (read once per process)."""
    entry = snapshot.read_index()[name]
    path = snapshot.snapshot_path(name)
    key = (str(path), entry["corpus_sha256"])
    if key not in _SNAPSHOTS:
        snap = snapshot.read_snapshot(path, entry["file_sha256"], entry["corpus_sha256"])
        h = snap.header
        arrays = {
            "train": np.frombuffer(snap.train, dtype=np.uint8),
            "val": np.frombuffer(snap.val, dtype=np.uint8),
            "train_types": np.frombuffer(snap.train_types, dtype=np.uint8),
            "val_types": np.frombuffer(snap.val_types, dtype=np.uint8),
            "files_train": np.array(h["files_train"], dtype=str),
            "files_val": np.array(h["files_val"], dtype=str),
            "offsets_train": np.array(h["offsets_train"], dtype=np.int64),
            "offsets_val": np.array(h["offsets_val"], dtype=np.int64),
        }
        _SNAPSHOTS.clear()  # keep one (the course corpus is 6.5 MB of arrays, the large one 21 MB)
        _SNAPSHOTS[key] = arrays
    return _SNAPSHOTS[key]


def load_corpus(
    cache_dir: str | Path | None = None,
    max_bytes: int | None = None,
    *,
    name: str = "course",
    source: str = "snapshot",
) -> Corpus:
    """Load corpus ``name`` ("course" or "large") from the frozen snapshot in ``data/corpus/`` (the default).

    ``source="installed"`` builds it from the running Python's standard library instead, caching the
    arrays in ``cache_dir`` (text and labels then depend on the Python version; stored results were not
    made from it). ``max_bytes`` keeps only the first ``max_bytes`` bytes in all: 90% from the training
    files and 10% from the validation files, in file order (for quick tests and demos).
    """
    _check_name(name)
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(map(repr, SOURCES))}; got {source!r} (\"snapshot\" is "
                         "the frozen corpus every Python reads alike, \"installed\" this Python's standard library)")
    _caps(max_bytes)  # validates max_bytes
    if source == "snapshot":
        arrays = _truncate(_load_snapshot(name), max_bytes)
    else:
        arrays = _load_installed(cache_dir, max_bytes, name)
    return Corpus(
        train=_tensor(arrays["train"]),
        val=_tensor(arrays["val"]),
        train_types=_tensor(arrays["train_types"]),
        val_types=_tensor(arrays["val_types"]),
        files_train=tuple(str(n) for n in arrays["files_train"]),
        files_val=tuple(str(n) for n in arrays["files_val"]),
        offsets_val=tuple(int(n) for n in arrays["offsets_val"]),
    )


def freeze(name: str = "course", folder: str | Path | None = None, index_path: str | Path | None = None) -> Path:
    """Build corpus ``name`` from this Python's standard library and write it as a snapshot (and its index entry).

    The stored results were made from CPython 3.11.7's library: freeze with that Python to keep them valid.
    """
    _check_name(name)
    python = "{}.{}.{}".format(*sys.version_info[:3])
    arrays = _build(None, name)
    folder = Path(folder) if folder is not None else snapshot.DATA_DIR
    path = folder / f"stdlib-{name}-cpython{python}.xz"
    header = {
        "name": name, "python": python, "implementation": sys.implementation.name, "file_header": FILE_HEADER,
        "token_types": TOKEN_TYPE_NAMES, "split_rule": _SPLIT_RULE,
        **{k: [str(v) for v in arrays[k]] for k in ("files_train", "files_val")},
        **{k: [int(v) for v in arrays[k]] for k in ("offsets_train", "offsets_val")},
    }
    hashes = snapshot.write_snapshot(path, header, arrays["train"].tobytes(), arrays["val"].tobytes(),
                                     arrays["train_types"].tobytes(), arrays["val_types"].tobytes())
    index_path = Path(index_path) if index_path is not None else snapshot.INDEX_PATH
    old = json.loads(index_path.read_text(encoding="utf-8")) if index_path.exists() else {}
    index = {"about": "The frozen corpora in data/corpus/ (moe_course.snapshot): the expected SHA-256 of each "
                      "file and of its content. Written by moe_course.corpus.freeze.",
             "snapshots": old.get("snapshots", {})}
    index["snapshots"][name] = {
        "file": path.name, **hashes, "python": python, "train_bytes": int(len(arrays["train"])),
        "val_bytes": int(len(arrays["val"])), "files": len(arrays["files_train"]) + len(arrays["files_val"]),
        "created": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    index["snapshots"] = dict(sorted(index["snapshots"].items()))
    index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------


@overload
def get_batch(
    data: torch.Tensor,
    batch_size: int,
    block_size: int,
    generator: torch.Generator | None = ...,
    device: torch.device | str | None = ...,
    types: None = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def get_batch(
    data: torch.Tensor,
    batch_size: int,
    block_size: int,
    generator: torch.Generator | None = ...,
    device: torch.device | str | None = ...,
    *,
    types: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def get_batch(
    data: torch.Tensor,
    batch_size: int,
    block_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    types: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Sample ``batch_size`` random windows: ``x = data[i:i+T]`` and ``y = data[i+1:i+T+1]`` as long (B, T).

    With ``types`` (the per-byte labels of ``data``) also return the token types of ``y`` (long, B x T).
    ``generator`` must be a CPU generator (start positions are drawn on the CPU); the windows are
    gathered where ``data`` lives, then moved to ``device``.
    """
    check_tensor("data", data, 1, "(n,) byte tokens")
    check_int("batch_size", batch_size, 1)
    check_int("block_size", block_size, 1)
    if len(data) <= block_size:
        raise ValueError(f"data has {len(data)} tokens, need more than block_size={block_size}")
    if types is not None and types.shape != data.shape:
        raise ValueError(f"types has shape {tuple(types.shape)} but data has {tuple(data.shape)}")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    index = (starts[:, None] + torch.arange(block_size + 1)).to(data.device)  # gather where data lives
    window = data[index].long()
    out = [window[:, :-1], window[:, 1:]]
    if types is not None:
        out.append(types[index[:, 1:].to(types.device)].long())
    if device is not None:
        out = [t.to(device) for t in out]
    return tuple(out)
