"""The frozen corpus (data/corpus/): identical on every CPython, checked by its SHA-256, what the results train on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_course import corpus, snapshot
from moe_course.corpus import CORPORA, FILE_HEADER, STDLIB_FILES, corpus_files, corpus_sha256, load_corpus

ROOT = Path(__file__).resolve().parents[1]
READER = ROOT / "moe_course" / "snapshot.py"
INDEX = snapshot.read_index()
VERSIONS = ("3.10", "3.11", "3.12", "3.13")


def _interpreter(version: str) -> str | None:
    """A CPython ``version`` on this machine: pyenv's, else ``pythonX.Y`` on PATH (None when absent)."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    for candidate in sorted(pyenv.glob(f"{version}.*/bin/python"), reverse=True):
        if candidate.is_file():
            return str(candidate)
    return shutil.which(f"python{version}")


def test_index_lists_every_corpus_with_its_file():
    assert set(INDEX) == set(CORPORA)
    for name, entry in INDEX.items():
        path = snapshot.snapshot_path(name)
        assert path.is_file() and path.parent == ROOT / "data" / "corpus", name
        assert path.name == entry["file"] == f"stdlib-{name}-cpython{entry['python']}.xz"
        assert entry["python"] == "3.11.7"  # the Python the stored results in data/results were trained on
    assert (ROOT / "data" / "corpus" / "LICENSE-PSF.txt").read_text().count("PYTHON SOFTWARE FOUNDATION LICENSE") == 1
    assert sum(snapshot.snapshot_path(n).stat().st_size for n in CORPORA) < 4_000_000  # a fast clone


@pytest.mark.parametrize("name", CORPORA)
def test_snapshot_matches_its_index_and_manifest(name):
    entry = INDEX[name]
    snap = snapshot.read_snapshot(snapshot.snapshot_path(name), entry["file_sha256"], entry["corpus_sha256"])
    h = snap.header
    assert (h["name"], h["python"], h["file_header"]) == (name, entry["python"], FILE_HEADER)
    assert (len(snap.train), len(snap.val)) == (entry["train_bytes"], entry["val_bytes"])
    assert (len(snap.train_types), len(snap.val_types)) == (len(snap.train), len(snap.val))
    assert sorted(h["files_train"] + h["files_val"]) == list(corpus_files(name))
    assert not any(map(corpus.is_val_file, h["files_train"])) and all(map(corpus.is_val_file, h["files_val"]))
    assert max(snap.train_types + snap.val_types) < len(corpus.TokenType)
    c = load_corpus(name=name)
    text = c.decode(c.train)
    assert text.count("\n# ==== ") == len(c.files_train) and c.files_train == tuple(h["files_train"])


def test_snapshot_equals_a_build_from_its_own_python(tmp_path):
    """On the CPython the snapshot was frozen from, building from the installed library gives the same arrays."""
    python = INDEX["course"]["python"]
    if "{}.{}.{}".format(*sys.version_info[:3]) != python:
        pytest.skip(f"the snapshot was frozen from CPython {python}; this is {sys.version.split()[0]}")
    frozen, built = load_corpus(), load_corpus(tmp_path, source="installed")
    for key in ("train", "val", "train_types", "val_types"):
        assert torch.equal(getattr(frozen, key), getattr(built, key)), key
    assert (frozen.files_train, frozen.files_val) == (built.files_train, built.files_val)


def test_large_corpus_holds_the_course_files_with_the_same_bytes_and_labels():
    small, large = load_corpus(), load_corpus(name="large")
    assert set(STDLIB_FILES) <= set(large.files_train + large.files_val)
    assert len(large.train) > 3 * len(small.train)

    def part(c, split, name):
        files, data, types = (c.files_train, c.train, c.train_types) if split == "train" else (
            c.files_val, c.val, c.val_types)
        text = data.numpy().tobytes()
        start = text.index(FILE_HEADER.format(name=name).encode())
        i = files.index(name)
        end = text.index(FILE_HEADER.format(name=files[i + 1]).encode()) if i + 1 < len(files) else len(text)
        return text[start:end], types.numpy()[start:end]

    for name in ("abc.py", "copy.py", "heapq.py", STDLIB_FILES[-1]):
        split = "val" if corpus.is_val_file(name) else "train"
        a, b = part(small, split, name), part(large, split, name)
        assert a[0] == b[0] and np.array_equal(a[1], b[1]), name


@pytest.mark.parametrize("version", VERSIONS)
def test_every_cpython_reads_identical_bytes_labels_and_hash(version):
    """The stdlib-only reader under CPython 3.10 to 3.13 (isolated, no site-packages) gives the same digest."""
    python = _interpreter(version)
    if python is None:
        pytest.skip(f"no CPython {version} on this machine")
    for name in CORPORA:
        path = snapshot.snapshot_path(name)
        done = subprocess.run([python, "-I", "-S", str(READER), "digest", str(path)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        got = json.loads(done.stdout)
        assert got.pop("python").startswith(version + ".")
        here = snapshot.read_snapshot(path).digest()
        assert got == here, name
        assert got["corpus_sha256"] == corpus_sha256(name) == INDEX[name]["corpus_sha256"]


def test_loaded_arrays_hash_to_the_corpus_hash():
    c = load_corpus()
    snap = snapshot.read_snapshot(snapshot.snapshot_path("course"))
    assert c.train.numpy().tobytes() == snap.train and c.val_types.numpy().tobytes() == snap.val_types
    assert snap.corpus_sha256 == corpus_sha256()


def _copy_data(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in CORPORA:
        shutil.copy(snapshot.snapshot_path(name), folder)
    monkeypatch.setenv("MOE_COURSE_DATA", str(tmp_path))
    monkeypatch.setattr(corpus, "_SNAPSHOTS", {})
    return folder / INDEX["course"]["file"]


def test_a_damaged_snapshot_is_refused_naming_the_file_to_restore(tmp_path, monkeypatch):
    path = _copy_data(tmp_path, monkeypatch)
    assert len(load_corpus(max_bytes=1000).train) == 900  # the copy reads
    corpus._SNAPSHOTS.clear()
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(snapshot.SnapshotError, match=rf"{path.name} is damaged or replaced: its SHA-256 is "
                                                     rf"[0-9a-f]{{64}}, expected {INDEX['course']['file_sha256']}"):
        load_corpus()
    with pytest.raises(snapshot.SnapshotError, match="git checkout -- "):
        load_corpus()


def test_a_missing_snapshot_says_how_to_restore_it(tmp_path, monkeypatch):
    path = _copy_data(tmp_path, monkeypatch)
    path.unlink()
    with pytest.raises(snapshot.SnapshotError, match=rf"{path.name} is missing: restore it"):
        load_corpus()


def test_the_repository_restore_hint_names_the_relative_path():
    msg = snapshot._restore_hint(snapshot.snapshot_path("course"))
    assert f"git checkout -- data/corpus/{INDEX['course']['file']}" in msg


def test_content_hash_is_checked_independently_of_the_file(tmp_path):
    header = {"name": "t", "files_train": [], "files_val": [], "offsets_train": [], "offsets_val": []}
    hashes = snapshot.write_snapshot(tmp_path / "t.xz", header, b"ab", b"c", b"\x01\x02", b"\x03")
    snap = snapshot.read_snapshot(tmp_path / "t.xz", hashes["file_sha256"], hashes["corpus_sha256"])
    assert (snap.train, snap.val, snap.train_types, snap.val_types) == (b"ab", b"c", b"\x01\x02", b"\x03")
    with pytest.raises(snapshot.SnapshotError, match="the corpus in .*t.xz has SHA-256"):
        snapshot.read_snapshot(tmp_path / "t.xz", corpus_sha256="0" * 64)
    with pytest.raises(ValueError, match="one token type"):
        snapshot.write_snapshot(tmp_path / "u.xz", header, b"ab", b"", b"\x01", b"")
    (tmp_path / "v.xz").write_bytes(b"not xz")
    with pytest.raises(snapshot.SnapshotError, match="cannot be decompressed"):
        snapshot.read_snapshot(tmp_path / "v.xz")


def test_freeze_round_trips(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "STDLIB_FILES", ("abc.py", "bisect.py", "copy.py"))
    path = corpus.freeze("course", tmp_path, tmp_path / "index.json")
    index = json.loads((tmp_path / "index.json").read_text())["snapshots"]
    snap = snapshot.read_snapshot(path, index["course"]["file_sha256"], index["course"]["corpus_sha256"])
    built = corpus._build(None)
    assert snap.train == built["train"].tobytes() and snap.val_types == built["val_types"].tobytes()
    assert snap.header["files_val"] == ["copy.py"]


def test_bad_arguments_name_the_choices():
    with pytest.raises(ValueError, match="corpus name must be one of course, large; got 'huge'"):
        load_corpus(name="huge")
    with pytest.raises(ValueError, match="source must be one of 'snapshot', 'installed'"):
        load_corpus(source="web")
    with pytest.raises(ValueError, match="max_bytes must be an int >= 20"):
        load_corpus(max_bytes=1)
    assert snapshot.main(["nope"]) == 2


def test_gpu_presets_train_on_the_large_corpus():
    from moe_course.train import PRESETS

    assert {n: p.corpus for n, p in PRESETS.items() if n.startswith("gpu-")} == dict.fromkeys(
        ("gpu-moe", "gpu-dense", "gpu-best"), "large")
    assert all(p.corpus == "course" for n, p in PRESETS.items() if not n.startswith("gpu-"))


def test_epochs_seen_counts_passes_over_each_presets_corpus():
    from moe_course.corpus import train_bytes
    from moe_course.train import PRESETS, epochs_seen

    assert train_bytes("course") == len(load_corpus().train) == INDEX["course"]["train_bytes"]
    for name, preset in PRESETS.items():
        seen = preset.train.steps * preset.train.batch_size * preset.model.block_size
        assert epochs_seen(name) == pytest.approx(seen / train_bytes(preset.corpus)), name
    assert epochs_seen("cpu-best") == pytest.approx(1000 * 16 * 128 / 2_918_954)
    assert epochs_seen("gpu-best") < 1.5  # the large corpus: the GPU runs see most bytes about once
    assert 1500 * 32 * 256 / train_bytes("course") > 4  # what they would have seen of the course corpus
