"""The one URI opener: local, file:// and s3:// (moto on loopback) behave alike; containment."""

from __future__ import annotations

import os

import pytest

from timeexpert import storage


@pytest.fixture(params=["local", "file", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    if request.param == "file":
        return "file://" + str(tmp_path / "root")
    server = request.getfixturevalue("s3_server")
    return f"{server.root}/{tmp_path.name}"


def test_read_write_exists_roundtrip(root):
    uri = storage.join_uri(root, "a", "b.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"\x00hello")
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == b"\x00hello"
    with storage.open_uri(storage.join_uri(root, "t.txt"), "w") as f:
        f.write("text")
    assert storage.read_text(storage.join_uri(root, "t.txt")) == "text"
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join_uri(root, "missing.bin"))


def test_upload_download_dir(root, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "model.safetensors").write_bytes(b"w" * 100)
    (src / "sub" / "config.json").write_text("{}")
    storage.upload_dir(str(src), storage.join_uri(root, "ckpt"))
    dst = tmp_path / "dst"
    storage.download_dir(storage.join_uri(root, "ckpt"), str(dst))
    assert (dst / "model.safetensors").read_bytes() == b"w" * 100
    assert (dst / "sub" / "config.json").read_text() == "{}"


def test_s3_endpoint_from_explicit_options(s3_server):
    uri = f"{s3_server.root}/opts/x.bin"
    storage.write_bytes(uri, b"abc", **s3_server.storage_options)
    assert storage.read_bytes(uri, **s3_server.storage_options) == b"abc"


def test_join_uri():
    assert storage.join_uri("s3://b/p/", "x", "/y.mp4") == "s3://b/p/x/y.mp4"
    assert storage.join_uri("/data", "v.mp4") == "/data/v.mp4"


def test_resolve_under_root_accepts_inside(tmp_path):
    root = str(tmp_path)
    assert storage.resolve_under_root("videos/a.mp4", root) == str(tmp_path / "videos/a.mp4")
    assert storage.resolve_under_root(f"file://{tmp_path}/x", root) == str(tmp_path / "x")
    assert storage.resolve_under_root("s3://b/data/v/a.mp4", "s3://b/data") == "s3://b/data/v/a.mp4"
    assert storage.resolve_under_root("v/../a.mp4", "s3://b/data") == "s3://b/data/a.mp4"


@pytest.mark.parametrize(
    "uri, root",
    [
        ("../escape.mp4", "/srv/data"),
        ("/srv/data/../etc/passwd", "/srv/data"),
        ("/srv/database/x.mp4", "/srv/data"),  # a sibling sharing the prefix
        ("file:///etc/passwd", "/srv/data"),
        ("s3://b/data/x.mp4", "/srv/data"),  # another scheme
        ("/srv/data/x.mp4", "s3://b/data"),
        ("s3://other/data/x.mp4", "s3://b/data"),  # another bucket
        ("s3://b/data/../secret/x", "s3://b/data"),
        ("s3://b/database/x", "s3://b/data"),
        ("http://example.com/x.mp4", "/srv/data"),
    ],
)
def test_resolve_under_root_refuses_outside(uri, root):
    with pytest.raises(ValueError, match="outside|unsupported"):
        storage.resolve_under_root(uri, root)


def test_resolve_under_root_refuses_symlink_escape(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    os.symlink("/etc", root / "link")
    with pytest.raises(ValueError, match="outside"):
        storage.resolve_under_root("link/passwd", str(root))
