"""prunekit.data.download against a local HTTP server serving tiny fake files."""

from __future__ import annotations

import hashlib
import importlib
import io
import tarfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from prunekit.data import download as download_function
from prunekit.errors import PrunekitError

# The package attribute `prunekit.data.download` is the function, so fetch the module itself.
download_module = importlib.import_module("prunekit.data.download")


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class Server:
    """Serves ``root`` on 127.0.0.1 and records the requested paths."""

    def __init__(self, root: Path) -> None:
        self.requests: list[str] = []
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    server = Server(root)
    yield root, server
    server.close()


@pytest.fixture
def dest(tmp_path):
    return tmp_path / "data"


def use_source(monkeypatch, files: dict[str, str], extracted: tuple[str, ...] = (), mirrors=("http://unused/",)):
    """Replace the file table of "mnist" with ``files`` (name -> md5)."""
    source = download_module.Source(
        mirrors=mirrors,
        files=tuple(download_module.RemoteFile(name, digest) for name, digest in files.items()),
        extracted=extracted,
    )
    monkeypatch.setitem(download_module.SOURCES, "mnist", source)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_good_file_downloads_and_verifies(served, dest, monkeypatch):
    root, server = served
    payload = b"tiny mnist stand-in" * 100
    (root / "a.gz").write_bytes(payload)
    use_source(monkeypatch, {"a.gz": md5(payload)})
    assert download_function("mnist", dest, base_url=server.url, progress=False) == dest
    assert (dest / "a.gz").read_bytes() == payload
    assert leftovers(dest) == ["a.gz"]  # no temporary file remains


def test_corrupt_file_is_refused_and_leaves_nothing(served, dest, monkeypatch):
    root, server = served
    (root / "a.gz").write_bytes(b"corrupted bytes")
    use_source(monkeypatch, {"a.gz": md5(b"the real bytes")})
    with pytest.raises(PrunekitError, match="MD5 .* does not match"):
        download_function("mnist", dest, base_url=server.url, progress=False)
    assert leftovers(dest) == []


def test_present_good_file_is_not_downloaded_again(served, dest, monkeypatch):
    root, server = served
    (root / "a.gz").write_bytes(b"one")
    (root / "b.gz").write_bytes(b"two")
    use_source(monkeypatch, {"a.gz": md5(b"one"), "b.gz": md5(b"two")})
    dest.mkdir()
    (dest / "a.gz").write_bytes(b"one")
    download_function("mnist", dest, base_url=server.url, progress=False)
    assert server.requests == ["/b.gz"]
    download_function("mnist", dest, base_url=server.url, progress=False)
    assert server.requests == ["/b.gz"]


def test_present_bad_file_is_replaced(served, dest, monkeypatch):
    root, server = served
    (root / "a.gz").write_bytes(b"good")
    use_source(monkeypatch, {"a.gz": md5(b"good")})
    dest.mkdir()
    (dest / "a.gz").write_bytes(b"stale")
    download_function("mnist", dest, base_url=server.url, progress=False)
    assert (dest / "a.gz").read_bytes() == b"good"


def test_missing_file_names_the_fix(served, dest, monkeypatch):
    _, server = served
    use_source(monkeypatch, {"absent.gz": md5(b"")})
    with pytest.raises(PrunekitError, match="404.*base_url="):
        download_function("mnist", dest, base_url=server.url, progress=False)
    assert leftovers(dest) == []


def test_falls_back_to_the_next_mirror(served, dest, monkeypatch):
    root, server = served
    (root / "mirror2").mkdir()
    (root / "mirror2" / "a.gz").write_bytes(b"data")
    use_source(monkeypatch, {"a.gz": md5(b"data")}, mirrors=(server.url + "mirror1", server.url + "mirror2/"))
    download_function("mnist", dest, progress=False)
    assert server.requests == ["/mirror1/a.gz", "/mirror2/a.gz"]
    assert (dest / "a.gz").read_bytes() == b"data"


def test_interrupted_download_leaves_nothing(served, dest, monkeypatch):
    root, server = served
    (root / "a.gz").write_bytes(b"x" * 1000)
    use_source(monkeypatch, {"a.gz": md5(b"x" * 1000)})

    class InterruptingBar:
        def __init__(self, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            raise KeyboardInterrupt

    monkeypatch.setattr(download_module, "tqdm", InterruptingBar)
    with pytest.raises(KeyboardInterrupt):
        download_function("mnist", dest, base_url=server.url, progress=False)
    assert leftovers(dest) == []


def tar_bytes(entries: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
            else:
                info = tarfile.TarInfo(entry[0])
                info.size = len(entry[1])
                tar.addfile(info, io.BytesIO(entry[1]))
    return buffer.getvalue()


def test_archive_is_extracted_once(served, dest, monkeypatch):
    root, server = served
    archive = tar_bytes([("batches/one", b"1"), ("batches/two", b"22")])
    (root / "x.tar.gz").write_bytes(archive)
    use_source(monkeypatch, {"x.tar.gz": md5(archive)}, extracted=("batches/one", "batches/two"))
    download_function("mnist", dest, base_url=server.url, progress=False)
    assert (dest / "batches" / "two").read_bytes() == b"22"
    assert leftovers(dest / "batches") == ["one", "two"]
    (dest / "x.tar.gz").unlink()
    download_function("mnist", dest, base_url=server.url, progress=False)  # already unpacked: no request
    assert server.requests == ["/x.tar.gz"]


def symlink_entry() -> tarfile.TarInfo:
    info = tarfile.TarInfo("batches/link")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return info


@pytest.mark.parametrize(
    "entries",
    [[("ok", b"1"), ("../escape", b"2")], [("/abs/path", b"1")], [("ok", b"1"), symlink_entry()]],
)
def test_unsafe_archive_is_refused_before_writing(served, dest, monkeypatch, entries):
    root, server = served
    archive = tar_bytes(entries)
    (root / "x.tar.gz").write_bytes(archive)
    use_source(monkeypatch, {"x.tar.gz": md5(archive)}, extracted=("ok",))
    with pytest.raises(PrunekitError, match="unsafe entry"):
        download_function("mnist", dest, base_url=server.url, progress=False)
    assert leftovers(dest) == ["x.tar.gz"]
    assert not (dest.parent / "escape").exists()


def test_unknown_name():
    with pytest.raises(PrunekitError, match="mnist, fashion-mnist, cifar10"):
        download_function("imagefolder", "unused")


def test_official_tables():
    sources = download_module.SOURCES
    assert [f.md5 for f in sources["mnist"].files] == [
        "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "d53e105ee54ea40749a09fcbcd1e9432",
        "9fb629c4189551a2d022fa330f9573f3",
        "ec29112dd5afa0611ce80d1b7f02629c",
    ]
    assert sources["cifar10"].files[0].md5 == "c58f30108f718f92721af3b95e74349a"
    assert all(len(f.md5) == 32 for source in sources.values() for f in source.files)
