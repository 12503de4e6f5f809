"""dllm.fs on a local directory and on a fake gs:// bucket (tests/conftest.py: fake_gcs)."""
import gzip
import json

import pytest

from dllm import fs


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
    """A run directory: local, or gs://bucket/run on the in-memory fake."""
    if request.param == "local":
        return str(tmp_path / "run")
    request.getfixturevalue("fake_gcs")
    return "gs://bucket/run"


def test_write_read_exists_list_copy_remove(root, tmp_path):
    assert not fs.exists(root)
    fs.makedirs(root)
    text = "naïve λ\r\nsecond line\n"            # bytes as stored: no newline translation
    fs.write_text(f"{root}/b.txt", text)
    fs.write_bytes(f"{root}/a.bin", b"\x00\xff")
    assert fs.read_text(f"{root}/b.txt") == text
    assert fs.read_bytes(f"{root}/b.txt") == text.encode("utf-8")
    assert fs.read_bytes(f"{root}/a.bin") == b"\x00\xff"
    assert fs.exists(f"{root}/b.txt") and fs.isdir(root) and not fs.isdir(f"{root}/b.txt")
    assert fs.listdir(root) == ["a.bin", "b.txt"]        # no temporary files left behind

    local = str(tmp_path / "copy.txt")
    fs.copy(f"{root}/b.txt", local)                       # to local, and back in
    fs.copy(local, f"{root}/c.txt")
    assert fs.read_text(f"{root}/c.txt") == text
    fs.remove(f"{root}/b.txt")
    assert fs.listdir(root) == ["a.bin", "c.txt"]
    with pytest.raises(FileNotFoundError, match="b.txt"):
        fs.read_bytes(f"{root}/b.txt")


def test_open_write_then_append(root):
    """"a" continues an existing file (a resumed run's metrics.jsonl), also where the
    store cannot append (the fake, like GCS, refuses "a")."""
    fs.makedirs(root)
    path = f"{root}/metrics.jsonl"
    with fs.open(path, "w") as f:
        f.write('{"step": 1}\n')
    with fs.open(path, "a") as f:
        f.write('{"step": 2}\n')
    with fs.open(path, "ab") as f:
        f.write(b'{"step": 3}\n')
    with fs.open(path) as f:
        assert f.read() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
    with pytest.raises(ValueError, match="mode 'r\\+'"):
        fs.open(path, "r+")


def test_read_jsonl_plain_and_gzip(root):
    fs.makedirs(root)
    rows = [{"text": "def f():\n    return 1\n"}, {"text": "ü"}]
    body = "\n".join(json.dumps(r) for r in rows[:1]) + "\n\n" + json.dumps(rows[1]) + "\n"
    fs.write_text(f"{root}/d.jsonl", body)
    fs.write_bytes(f"{root}/d.jsonl.gz", gzip.compress(body.encode()))
    for name in ("d.jsonl", "d.jsonl.gz"):
        got = list(fs.read_jsonl(f"{root}/{name}"))
        assert got == [(f"{root}/{name}:1", rows[0]), (f"{root}/{name}:3", rows[1])]
    fs.write_text(f"{root}/bad.jsonl", '{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a JSON object, got list"):
        list(fs.read_jsonl(f"{root}/bad.jsonl"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        list(fs.read_jsonl(f"{root}/missing.jsonl"))


def test_object_uploads_whole_on_flush_at_most_every_interval_and_on_close(fake_gcs, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(fs.time, "monotonic", lambda: clock[0])
    path = "gs://bucket/run/metrics.jsonl"
    f = fs.open(path, "a")
    f.write("1\n")
    f.flush()                                   # first flush: uploaded
    assert fs.read_text(path) == "1\n"
    f.write("2\n")
    clock[0] += fs.UPLOAD_EVERY_S - 1
    f.flush()                                   # too soon: the object is unchanged
    assert fs.read_text(path) == "1\n"
    clock[0] += 1
    f.write("3\n")
    f.flush()
    assert fs.read_text(path) == "1\n2\n3\n"
    f.write("4\n")
    f.close()                                   # close always uploads
    assert fs.read_text(path) == "1\n2\n3\n4\n"


def test_is_remote():
    assert fs.is_remote("gs://bucket/run") and not fs.is_remote("/tmp/run")
    assert not fs.is_remote("runs/x")
