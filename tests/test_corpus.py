"""Tests for moe_course.corpus: the standard-library byte corpus, its token-type labels, cache and batches."""

from __future__ import annotations

import json
import keyword
import sys
import zlib

import numpy as np
import pytest
import torch

from moe_course import corpus
from moe_course.corpus import (
    FILE_HEADER,
    MANIFEST_PATH,
    SPLIT,
    STDLIB_FILES,
    TOKEN_TYPE_NAMES,
    TokenType,
    decode,
    encode,
    get_batch,
    is_val_file,
    label_token_types,
    load_corpus,
    make_manifest,
    read_manifest,
    split_files,
    write_manifest,
)

T = TokenType
# A few small files, one of them (copy.py) a validation file, for quick "full" builds.
SMALL_FILES = ("abc.py", "bisect.py", "colorsys.py", "copy.py", "fnmatch.py", "glob.py")


def _pieces(pieces: list[tuple[str, TokenType]], encoding: str = "utf-8") -> tuple[bytes, np.ndarray]:
    """Source bytes and the expected label of every byte, from (text, type) pieces."""
    source = b"".join(text.encode(encoding) for text, _ in pieces)
    expected = np.concatenate([np.full(len(text.encode(encoding)), t, dtype=np.uint8) for text, t in pieces])
    return source, expected


def _names(labels: np.ndarray) -> list[str]:
    return [TOKEN_TYPE_NAMES[i] for i in labels]


def _assert_labels(source: bytes, expected: np.ndarray) -> None:
    got = label_token_types(source)
    assert got.dtype == np.uint8 and got.shape == (len(source),)
    wrong = np.flatnonzero(got != expected)
    if len(wrong):
        i = int(wrong[0])
        pytest.fail(
            f"byte {i} ({source[i : i + 1]!r} in {source[max(0, i - 10) : i + 10]!r}): "
            f"got {TOKEN_TYPE_NAMES[got[i]]}, expected {TOKEN_TYPE_NAMES[expected[i]]}"
        )


# ---------------------------------------------------------------------------------------------------------
# file list and split
# ---------------------------------------------------------------------------------------------------------


def test_file_list_is_fixed_sorted_and_present():
    assert 60 <= len(STDLIB_FILES) <= 120
    assert list(STDLIB_FILES) == sorted(set(STDLIB_FILES))
    assert not any(part.startswith("test") for name in STDLIB_FILES for part in name.split("/"))
    assert all(name.endswith(".py") for name in STDLIB_FILES)
    root = corpus.stdlib_dir()
    missing = [name for name in STDLIB_FILES if not (root / name).is_file()]
    if (3, 10) <= sys.version_info[:2] <= (3, 13):
        assert missing == []


def test_split_is_by_file_deterministic_and_disjoint():
    train, val = split_files(STDLIB_FILES)
    assert set(train).isdisjoint(val)
    assert sorted(train + val) == sorted(STDLIB_FILES)
    assert 0.05 <= len(val) / len(STDLIB_FILES) <= 0.2
    # crc32 is the same on every machine: these are fixed facts, not properties of this run
    assert is_val_file("calendar.py") and is_val_file("copy.py")
    assert not is_val_file("argparse.py") and not is_val_file("json/decoder.py")
    assert split_files(reversed(STDLIB_FILES)) == tuple(tuple(reversed(part)) for part in (train, val))


def test_manifest_is_package_data_and_what_the_corpus_reads():
    assert MANIFEST_PATH.parent.name == "data" and MANIFEST_PATH.parents[1].name == "moe_course"
    manifest = json.loads(MANIFEST_PATH.read_text(encoding="utf-8"))
    assert tuple(manifest["files"]) == STDLIB_FILES and manifest["files"] == SPLIT == read_manifest()
    train, val = split_files(STDLIB_FILES)
    assert list(val) == [name for name, split in manifest["files"].items() if split == "val"]
    assert list(train) == [name for name, split in manifest["files"].items() if split == "train"]


def test_manifest_is_exactly_what_write_manifest_makes(tmp_path):
    # the assignment is the crc32 rule, so the file can be regenerated and reviewed as a diff
    assert MANIFEST_PATH.read_text(encoding="utf-8") == write_manifest(STDLIB_FILES, tmp_path / "m.json").read_text()
    assert all((split == "val") == (zlib.crc32(name.encode()) % 10 == 0) for name, split in SPLIT.items())
    assert make_manifest(reversed(STDLIB_FILES)) == make_manifest(STDLIB_FILES)
    assert (len(SPLIT), sum(split == "val" for split in SPLIT.values())) == (117, 12)


def test_build_follows_the_manifest(monkeypatch):
    # what corpus builds: every manifest file, in manifest order, on the manifest's side of the split
    monkeypatch.setattr(corpus, "_read_files", lambda names: {name: b"x = 1\n" for name in names})
    arrays = corpus._build(None)
    assert tuple(arrays["files_train"]) == tuple(n for n, s in SPLIT.items() if s == "train")
    assert tuple(arrays["files_val"]) == tuple(n for n, s in SPLIT.items() if s == "val")
    assert corpus.decode(arrays["val"]).startswith(FILE_HEADER.format(name=arrays["files_val"][0]))


def test_manifest_split_is_authoritative(monkeypatch):
    # a file's split comes from the manifest; the crc32 rule only for files it does not list
    monkeypatch.setitem(corpus.SPLIT, "abc.py", "val")
    assert is_val_file("abc.py") and "abc.py" in split_files(STDLIB_FILES)[1]
    unlisted = [f"extra_{i}.py" for i in range(30)]
    rule = [zlib.crc32(name.encode()) % 10 == 0 for name in unlisted]
    assert [is_val_file(name) for name in unlisted] == rule and any(rule) and not all(rule)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"files": {"abc.py": "test"}}, "abc.py has split 'test'"),
        ({"files": {"b.py": "train", "a.py": "val"}}, "files must be sorted"),
        ({"files": {"../etc/x.py": "train"}}, "must be a .py path relative"),
        ({"files": {"abc.txt": "train"}}, "must be a .py path relative"),
        ({"files": {}}, "non-empty \"files\" object"),
        ({"names": ["abc.py"]}, "non-empty \"files\" object"),
    ],
)
def test_bad_manifest_is_rejected(tmp_path, content, message):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        read_manifest(path)



# ---------------------------------------------------------------------------------------------------------
# token-type labels
# ---------------------------------------------------------------------------------------------------------


def test_labels_byte_by_byte_with_non_ascii_before_other_tokens():
    source, expected = _pieces([
        ('"""Modülé docstring."""', T.DOCSTRING), ("\n", T.WHITESPACE),
        ("x", T.NAME), (" ", T.WHITESPACE), ("=", T.OPERATOR), (" ", T.WHITESPACE),
        ('"é€"', T.STRING), (" ", T.WHITESPACE), ("+", T.OPERATOR), (" ", T.WHITESPACE),
        ("'ß'", T.STRING), ("*", T.OPERATOR), ("10", T.NUMBER), ("  ", T.WHITESPACE),
        ("# çà va", T.COMMENT), ("\n", T.WHITESPACE),
        ("if", T.KEYWORD), (" ", T.WHITESPACE), ("x", T.NAME), (":", T.OPERATOR), ("\n", T.WHITESPACE),
        ("    ", T.WHITESPACE), ("y", T.NAME), (" ", T.WHITESPACE), ("=", T.OPERATOR),
        (" ", T.WHITESPACE), ("None", T.KEYWORD), ("\n", T.WHITESPACE),
    ])  # fmt: skip
    _assert_labels(source, expected)


def test_labels_docstrings_fstrings_and_soft_keywords():
    source, expected = _pieces([
        ("def", T.KEYWORD), (" ", T.WHITESPACE), ("f", T.NAME), ("(", T.OPERATOR), ("match", T.NAME),
        ("=", T.OPERATOR), ("0.5", T.NUMBER), (")", T.OPERATOR), (":", T.OPERATOR), ("\n", T.WHITESPACE),
        ("    ", T.WHITESPACE), ("'ünï doc'", T.DOCSTRING), ("\n", T.WHITESPACE),
        ("    ", T.WHITESPACE), ('"not a docstring"', T.STRING), ("\n", T.WHITESPACE),
        ("    ", T.WHITESPACE), ("return", T.KEYWORD), (" ", T.WHITESPACE),
        ('f"{match!r:>{4}} é {f\'{match}\'}"', T.STRING), (" ", T.WHITESPACE), ("or", T.KEYWORD),
        (" ", T.WHITESPACE), ("b'\\x00'", T.STRING), ("\n", T.WHITESPACE),
        ("class", T.KEYWORD), (" ", T.WHITESPACE), ("A", T.NAME), (":", T.OPERATOR), ("\n", T.WHITESPACE),
        ("    ", T.WHITESPACE), ('"""Doc\n    ü\n    """', T.DOCSTRING), ("\n", T.WHITESPACE),
    ])  # fmt: skip
    _assert_labels(source, expected)


def test_labels_line_continuation_and_bom():
    source, expected = _pieces([
        ("\ufeff", T.OTHER), ("x", T.NAME), (" ", T.WHITESPACE), ("=", T.OPERATOR), (" ", T.WHITESPACE),
        ("1", T.NUMBER), (" ", T.WHITESPACE), ("+", T.OPERATOR), (" ", T.WHITESPACE), ("\\", T.OTHER),
        ("\n", T.WHITESPACE), ("    ", T.WHITESPACE), ("2", T.NUMBER), ("\n", T.WHITESPACE),
    ])  # fmt: skip
    assert source.startswith(b"\xef\xbb\xbf")
    _assert_labels(source, expected)


def test_labels_respect_a_latin1_coding_cookie():
    source, expected = _pieces(
        [
            ("# -*- coding: latin-1 -*-", T.COMMENT), ("\n", T.WHITESPACE),
            ("s", T.NAME), ("=", T.OPERATOR), ("'é'", T.STRING), (";", T.OPERATOR), ("n", T.NAME),
            ("\n", T.WHITESPACE),
        ],
        encoding="latin-1",
    )  # fmt: skip
    assert source.endswith(b"s='\xe9';n\n")  # é is one byte in latin-1
    _assert_labels(source, expected)


@pytest.mark.parametrize(
    "source",
    [b"x = (1,\n", b"s = '''never closed\n", b"\xff\xfe = 1\n", b"# coding: no-such-codec\nx = 1\n"],
    ids=["open-bracket", "open-string", "bad-utf8", "bad-cookie"],
)
def test_untokenizable_source_is_all_other(source):
    labels = label_token_types(source)
    assert labels.shape == (len(source),)
    assert (labels == T.OTHER).all()


def test_empty_source_and_names():
    assert label_token_types(b"").shape == (0,)
    assert TOKEN_TYPE_NAMES == [t.name for t in TokenType]
    assert TOKEN_TYPE_NAMES[T.COMMENT] == "COMMENT"


# ---------------------------------------------------------------------------------------------------------
# encode/decode
# ---------------------------------------------------------------------------------------------------------


def test_encode_decode_round_trip():
    text = "def f():\n    return 'héllo ü €'\n"
    tokens = encode(text)
    assert tokens.dtype == torch.uint8 and len(tokens) == len(text.encode("utf-8"))
    assert decode(tokens) == text
    assert decode(tokens.numpy()) == text
    assert decode(list(tokens.tolist())) == text
    assert decode(tokens.long()) == text
    assert decode(encode("é")[:1]) == "\ufffd"  # a cut multi-byte character does not raise


# ---------------------------------------------------------------------------------------------------------
# load_corpus and the cache
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    return load_corpus(tmp_path_factory.mktemp("cache"), max_bytes=200_000)


def test_small_corpus_shapes_and_split(small_corpus):
    c = small_corpus
    assert len(c.train) == 180_000 and len(c.val) == 20_000
    for data, types in ((c.train, c.train_types), (c.val, c.val_types)):
        assert data.dtype == torch.uint8 and types.dtype == torch.uint8
        assert data.shape == types.shape
        assert int(types.max()) < len(TokenType)
    assert c.vocab_size == 256
    assert set(c.files_train).isdisjoint(c.files_val)
    assert all(not is_val_file(n) for n in c.files_train) and all(is_val_file(n) for n in c.files_val)
    assert c.files_train[0] == STDLIB_FILES[0]
    assert c.decode(c.train[: len(FILE_HEADER.format(name="abc.py"))]) == FILE_HEADER.format(name="abc.py")
    # every file header is in the text, and only those of the listed files
    text = c.decode(c.train)
    assert text.count("\n# ==== ") == len(c.files_train)
    assert all(FILE_HEADER.format(name=n) in text for n in c.files_train)


def test_small_corpus_labels_look_like_python(small_corpus):
    types = torch.cat([small_corpus.train_types, small_corpus.val_types]).numpy()
    frac = np.bincount(types, minlength=len(TokenType)) / len(types)
    assert frac[T.OTHER] < 0.01
    for t in (T.WHITESPACE, T.COMMENT, T.STRING, T.DOCSTRING, T.NAME, T.KEYWORD, T.NUMBER, T.OPERATOR):
        assert frac[t] > 0.001, TOKEN_TYPE_NAMES[t]
    # the labels line up with the bytes: every KEYWORD run decodes to Python keywords
    data = small_corpus.train.numpy()
    edges = np.flatnonzero(np.diff(np.r_[0, small_corpus.train_types.numpy() == T.KEYWORD, 0].astype(int)))
    runs = [data[s:e].tobytes().decode() for s, e in zip(edges[0::2], edges[1::2], strict=True)]
    assert len(runs) > 100
    assert all(keyword.iskeyword(w) for w in runs)


def test_cache_hit_returns_identical_arrays(tmp_path, monkeypatch):
    first = load_corpus(tmp_path, max_bytes=30_000, source="installed")
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"
    assert f"py{sys.version_info[0]}.{sys.version_info[1]}." in files[0].name

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(corpus, "_build", no_rebuild)
    second = load_corpus(tmp_path, max_bytes=30_000, source="installed")
    for key in ("train", "val", "train_types", "val_types"):
        assert torch.equal(getattr(first, key), getattr(second, key)), key
    assert (first.files_train, first.files_val) == (second.files_train, second.files_val)


def test_truncating_a_full_cache_equals_a_small_build(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "STDLIB_FILES", SMALL_FILES)
    full = load_corpus(tmp_path / "a", source="installed")
    assert full.files_val == ("copy.py", "glob.py")
    assert len(full.train) + len(full.val) > 20_000
    cut = load_corpus(tmp_path / "a", max_bytes=12_000, source="installed")  # from the full cache
    assert len(list((tmp_path / "a").iterdir())) == 1
    built = load_corpus(tmp_path / "b", max_bytes=12_000, source="installed")  # built directly
    for key in ("train", "val", "train_types", "val_types"):
        assert torch.equal(getattr(cut, key), getattr(built, key)), key
        assert torch.equal(getattr(cut, key), getattr(full, key)[: len(getattr(cut, key))]), key
    assert (cut.files_train, cut.files_val) == (built.files_train, built.files_val)
    assert cut.files_train == full.files_train[: len(cut.files_train)]


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_COURSE_CACHE", str(tmp_path))
    assert corpus.default_cache_dir() == tmp_path
    assert corpus.cache_path().parent == tmp_path
    assert corpus.cache_path() != corpus.cache_path(max_bytes=1000)


def test_cache_name_depends_on_file_list(tmp_path, monkeypatch):
    before = corpus.cache_path(tmp_path)
    monkeypatch.setattr(corpus, "STDLIB_FILES", SMALL_FILES)
    after = corpus.cache_path(tmp_path)
    assert before != after and before.parent == after.parent == tmp_path


def test_missing_files_are_skipped_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "STDLIB_FILES", (*SMALL_FILES, "no_such_module_xyz.py"))
    with pytest.warns(UserWarning, match="no_such_module_xyz.py"):
        c = load_corpus(tmp_path, source="installed")
    assert "no_such_module_xyz.py" not in c.files_train + c.files_val
    assert len(c.files_train) + len(c.files_val) == len(SMALL_FILES)


def test_too_few_files_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "STDLIB_FILES", ("abc.py", "nope1.py", "nope2.py"))
    with pytest.warns(UserWarning), pytest.raises(FileNotFoundError, match="only 1 of the 3"):
        load_corpus(tmp_path, source="installed")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------------------------------------


def test_get_batch_shapes_and_shift():
    data = torch.arange(200, dtype=torch.uint8)
    x, y = get_batch(data, batch_size=5, block_size=16, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 16)
    assert x.dtype == y.dtype == torch.long
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(y, x + 1)  # data[i] == i, so the next token is always one more
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(5, 15, dtype=torch.long))  # contiguous windows
    assert int(x.min()) >= 0 and int(y.max()) <= 199


def test_get_batch_is_deterministic_with_a_generator_and_covers_the_data():
    data = torch.arange(50, dtype=torch.uint8)
    a = get_batch(data, 8, 4, generator=torch.Generator().manual_seed(1))
    b = get_batch(data, 8, 4, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(s, t) for s, t in zip(a, b, strict=True))
    x, y = get_batch(data, 2000, 4, generator=torch.Generator().manual_seed(2))
    assert int(x[:, 0].min()) == 0 and int(y[:, -1].max()) == 49  # first and last windows reachable


def test_get_batch_with_types():
    data = torch.arange(100, dtype=torch.uint8)
    types = (torch.arange(100) % len(TokenType)).to(torch.uint8)
    x, y, ty = get_batch(data, 4, 10, generator=torch.Generator().manual_seed(0), device="cpu", types=types)
    assert ty.shape == y.shape and ty.dtype == torch.long
    assert torch.equal(ty, y % len(TokenType))  # the types of the targets, not of the inputs


def test_get_batch_rejects_bad_input():
    with pytest.raises(ValueError, match="block_size"):
        get_batch(torch.zeros(10, dtype=torch.uint8), 2, 10)
    with pytest.raises(ValueError, match="types"):
        get_batch(torch.zeros(10, dtype=torch.uint8), 2, 4, types=torch.zeros(9, dtype=torch.uint8))
