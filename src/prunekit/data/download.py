"""Download MNIST, Fashion-MNIST and CIFAR-10 from their official mirrors.

Each file streams into a temporary file next to its destination, is checked against its
published MD5, and only then renamed into place (``os.replace``), so an interrupted or
corrupt download never leaves a file under the final name. Files already present with the
right MD5 are not fetched again. The CIFAR-10 tarball is unpacked with path checks (regular
files and folders only, nothing outside ``data_dir``).
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from tqdm import tqdm

from prunekit.atomic import atomic_output
from prunekit.errors import PrunekitError

_CHUNK = 1 << 20
_TIMEOUT_S = 60


@dataclass(frozen=True)
class RemoteFile:
    """A file on a mirror and the hex MD5 of its exact bytes."""

    name: str
    md5: str


@dataclass(frozen=True)
class Source:
    """Where a data set lives. ``mirrors`` are base URLs tried in order. If ``extracted``
    is non-empty, every file is a tar archive unpacked into ``data_dir``, and ``extracted``
    lists paths (relative to ``data_dir``) whose presence means it was unpacked already."""

    mirrors: tuple[str, ...]
    files: tuple[RemoteFile, ...]
    extracted: tuple[str, ...] = ()


SOURCES: dict[str, Source] = {
    "mnist": Source(
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        files=(
            RemoteFile("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            RemoteFile("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
            RemoteFile("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
            RemoteFile("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
        ),
    ),
    "fashion-mnist": Source(
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        files=(
            RemoteFile("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            RemoteFile("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
            RemoteFile("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
            RemoteFile("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
        ),
    ),
    "cifar10": Source(
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        files=(RemoteFile("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),
        extracted=tuple(
            f"cifar-10-batches-py/{name}"
            for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                         "test_batch", "batches.meta")
        ),  # fmt: skip
    ),
}


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_from(url: str, path: Path, md5: str, progress: bool) -> None:
    """Stream ``url`` into ``path`` if its bytes have MD5 ``md5``; else raise and write nothing."""
    request = urllib.request.Request(url, headers={"User-Agent": "prunekit"})
    with atomic_output(path, suffix=".part") as out, urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
        size = int(response.headers.get("Content-Length") or 0) or None
        digest = hashlib.md5(usedforsecurity=False)
        with tqdm(total=size, unit="B", unit_scale=True, desc=path.name, disable=not progress) as bar:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        if digest.hexdigest() != md5:
            raise PrunekitError(f"MD5 {digest.hexdigest()} does not match the published {md5}")


def _fetch(remote: RemoteFile, mirrors: tuple[str, ...], path: Path, progress: bool) -> None:
    """Download ``remote`` to ``path`` from the first mirror that serves the right bytes."""
    failures = []
    for mirror in mirrors:
        url = f"{mirror.rstrip('/')}/{remote.name}"
        try:
            _fetch_from(url, path, remote.md5, progress)
            return
        except (OSError, PrunekitError) as error:  # URLError, HTTPError and timeouts are OSErrors
            failures.append(f"{url}: {error}")
    raise PrunekitError(
        f"could not download {remote.name} ({'; '.join(failures)}); check the network, pass "
        f"base_url= a mirror that has the file, or copy the official file into {path.parent}"
    )


def _safe_members(archive: Path, tar: tarfile.TarFile, dest: Path) -> list[tuple[tarfile.TarInfo, Path]]:
    """Every member with its destination; refuses links, devices and paths leaving ``dest``."""
    root = dest.resolve()
    members = []
    for member in tar.getmembers():
        target = (root / member.name).resolve()
        if not (member.isfile() or member.isdir()) or (target != root and root not in target.parents):
            raise PrunekitError(
                f"{archive} holds an unsafe entry {member.name!r} (a link or a path outside {dest}); "
                "delete the archive and download it again"
            )
        members.append((member, target))
    return members


def _extract_tar(archive: Path, dest: Path) -> None:
    """Unpack ``archive`` into ``dest``, each file written atomically."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member, target in _safe_members(archive, tar, dest):
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                source = cast(BinaryIO, tar.extractfile(member))  # a regular file: never None
                with source, atomic_output(target, suffix=".part") as out:
                    shutil.copyfileobj(source, out, _CHUNK)
    except (tarfile.TarError, EOFError, zlib.error) as error:
        raise PrunekitError(f"cannot unpack {archive} ({error}); delete it and download it again") from error


def download(name: str, data_dir: str | Path, base_url: str | None = None, progress: bool = True) -> Path:
    """Fetch the official files of ``name`` ("mnist", "fashion-mnist" or "cifar10") into
    ``data_dir`` (created if needed) and return ``data_dir``, ready for ``load_dataset``.

    ``base_url`` replaces the official mirrors. ``progress`` shows a tqdm bar per file.
    Raises :class:`PrunekitError` if no mirror serves a file with the published MD5.
    """
    if name not in SOURCES:
        raise PrunekitError(f"cannot download {name!r}; downloadable data sets are {', '.join(SOURCES)}")
    source = SOURCES[name]
    target = Path(data_dir).expanduser()
    target.mkdir(parents=True, exist_ok=True)
    if source.extracted and all((target / path).is_file() for path in source.extracted):
        return target
    mirrors = (base_url,) if base_url else source.mirrors
    for remote in source.files:
        path = target / remote.name
        if not (path.is_file() and _md5(path) == remote.md5):
            _fetch(remote, mirrors, path, progress)
        if source.extracted:
            _extract_tar(path, target)
    return target
