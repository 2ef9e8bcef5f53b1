"""Image-folder data sets: ``DIR/<split>/<class>/*.png`` or ``DIR/<class>/*.png``.

Images are decoded with Pillow and converted to RGB, or to 8-bit grayscale ("L") when every
image is grayscale. They must share one size, or be brought to one: ``resize`` scales each so
that its shorter side has that many pixels (bilinear, antialiased), then ``crop`` keeps the
central ``crop`` x ``crop`` pixels (the usual evaluation transform of ImageNet models: resize
256, crop 224).
"""

from __future__ import annotations

import hashlib
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from prunekit.data.dataset import ImageDataset, subset_indices
from prunekit.errors import PrunekitError, PrunekitWarning, worded
from ..errors import warn as warn_ours

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_GRAYSCALE_MODES = ("1", "L", "LA")
_SPLIT_NAMES = ("train", "test")


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _split_root(data_dir: Path, split: str, warn: bool = True) -> Path:
    """``data_dir/split`` if it exists; else ``data_dir`` itself, unless that is split into
    other splits (then asking for a missing split is an error, not a class list). ``warn``: say
    that a folder without splits is the training data and the test set alike (for split "train")."""
    if (data_dir / split).is_dir():
        return data_dir / split
    others = [name for name in _SPLIT_NAMES if (data_dir / name).is_dir()]
    if others:
        found = ", ".join(f"{name}/" for name in others)
        raise PrunekitError(f"{data_dir} has no {split}/ folder (found {found}): put the {split} images in "
                            f"{data_dir}/{split}/<class>/ folders, or read the {others[0]} split instead (the "
                            f"command line's --eval-split {others[0]}, Python's split={others[0]!r})")
    if split == "train" and warn:       # the test split of a folder without splits is the same images
        warn_ours(PrunekitWarning(f"{data_dir} has no train/ and test/ folders: its images are the training "
                                      "data and the test set alike, so accuracy on them is not held out; put them "
                                      f"in {data_dir}/train/<class>/ and {data_dir}/test/<class>/"))
    return data_dir


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def _image_files(class_dir: Path) -> list[Path]:
    """The images of one class, in order (``_walk_images``)."""
    return list(_walk_images(class_dir))


def _walk_images(class_dir: Path):
    """Yields the images of one class, as found (a count may stop early): its .jpg/.jpeg/.png files
    and those of its subfolders at any depth, as torchvision's ``ImageFolder`` reads them (folders in
    sorted order, a folder's own files first, each folder's files in name order; symbolic links
    followed, each folder once; hidden subfolders, ``.name``, left out). Nothing: a class with no images (an empty class folder keeps
    its name, and so its label, for a folder that has none of that class)."""
    seen = set()
    for folder, subfolders, names in os.walk(class_dir, followlinks=True):     # top down: a folder, then
        real = os.path.realpath(folder)                                          # its subfolders in order
        if real in seen:                         # a link back up the tree: read once
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        yield from (p for p in (Path(folder) / name for name in sorted(names)) if _is_image(p))


def _check_layout(root: Path, class_dirs: list[Path]) -> None:
    """Refuse a folder of class folders none of which holds an image of its own: with images in
    their subfolders only, ``root`` is one level above the class folders (``DIR/data/<class>/``, or
    splits named other than train/ and test/), and reading on would make each subfolder tree one
    class; with none at all, there is nothing to read. An empty class folder beside others that
    hold images is a class with no images (its name keeps its label)."""
    if any(any(_is_image(p) for p in d.iterdir()) for d in class_dirs):
        return
    nested = next((d for d in class_dirs if _image_files(d)), None)
    kinds = "/".join(IMAGE_SUFFIXES)
    if nested is None:
        raise PrunekitError(f"the class folders of {root} hold no {kinds} images; add images to them")
    inner = ", ".join(f"{nested.name}/{d.name}/" for d in _subfolders(nested)[:3])
    raise PrunekitError(f"the class folders of {root} hold no {kinds} images of their own, only subfolders "
                        f"({inner}): pass the folder that holds the <class>/ folders (DIR/<class>/ or "
                        "DIR/train/<class>/ and DIR/test/<class>/)")


# The bytes of each image a fingerprint hashes: its first 4 KiB, the block the header scan reads of
# every image already (``Image.open`` reads a file through a buffer of the file system's block
# size, 4 KiB on most; a JPEG's or PNG's header lies in it), so hashing them reads nothing more
# from disk: the pages are cached. Fixed, not the file system's block size: a folder copied to
# another disk keeps its fingerprint.
HEAD_BYTES = 4096


def _head_digest(path: Path) -> bytes:
    """SHA-256 of the first ``HEAD_BYTES`` bytes of ``path`` (the block the scan read: cached)."""
    try:
        with open(path, "rb") as file:
            return hashlib.sha256(file.read(HEAD_BYTES)).digest()
    except OSError as error:
        raise PrunekitError(f"cannot read {path} ({error}); remove the file or make it readable") from error


def folder_fingerprint(ds) -> dict | None:
    """The ``ImageFolderScan.fingerprint`` of the image folder split ``ds`` was scanned from
    (a ``DeferredImageDataset``, or one of a subset of such a split: the whole split's); None for
    other data (decoded already, or not an image folder)."""
    for _ in range(4):                      # a subset's scan leads to its parent split's
        scan = getattr(ds, "scan", None)
        if isinstance(scan, ImageFolderScan):
            return scan.fingerprint() if scan.root is not None else None
        ds = getattr(scan, "parent", None)
        if ds is None:
            return None
    return None


def fingerprint_change(before: dict, now: dict) -> str | None:
    """What changed between two ``ImageFolderScan.fingerprint`` s, in words (None: nothing), e.g.
    "3 images added to class cat, 1 removed from dog, images replaced in class bird"."""
    if not (isinstance(before, dict) and isinstance(now, dict)) or before.get("sha256") == now.get("sha256"):
        return None
    old, new = before.get("classes") or {}, now.get("classes") or {}
    said = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a == b:
            continue
        if a is None:
            said.append(f"class folder {name} added ({b['images']} images)")
        elif b is None:
            said.append(f"class folder {name} removed ({a['images']} images)")
        elif b["images"] > a["images"]:
            said.append(f"{b['images'] - a['images']} images added to class {name}")
        elif b["images"] < a["images"]:
            said.append(f"{a['images'] - b['images']} images removed from class {name}")
        else:
            said.append(f"images replaced, renamed or changed in class {name}")
    if not said:        # (a data set read whole, ``contents_fingerprint``, has no classes to name)
        return "its images changed" if old or new else "its images or labels changed"
    return ", ".join(said[:4]) + (f" and {len(said) - 4} more classes changed" if len(said) > 4 else "")


def _open(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except OSError as error:  # includes UnidentifiedImageError
        raise PrunekitError(f"cannot decode {path} ({error}); remove or re-save the file") from error


@dataclass
class ImageFolderScan:
    """An image folder's split read as far as its file list and its files' headers: what
    ``decode`` returns, known before any pixel is decoded.

    files:   ``(label, path)`` per image, in the order ``decode`` keeps them.
    classes: the class names labels index.
    mode:    "RGB" or "L" (every image grayscale), what images are converted to.
    width, height: one image's size in pixels after ``resize`` and ``crop`` (None: not used).
    """

    files: list[tuple[int, Path]]
    classes: list[str]
    mode: str
    width: int
    height: int
    resize: int | None = None
    crop: int | None = None
    root: Path | None = None       # the folder of class folders scanned (None: not known)
    complete: bool = True          # every image of ``root`` (no ``limit`` left some out)
    _fingerprint: dict | None = field(default=None, init=False, repr=False, compare=False)

    def fingerprint(self) -> dict:
        """The contents of ``root`` as a run folder records them, to tell whether they changed
        before a killed run carries on (``fingerprint_change``): ``{"folder": root, "images": N,
        "sha256": hex, "classes": {name: {"images": n, "sha256": hex}}}`` (``folder`` names it, and
        is not compared: a folder moved with the run keeps its fingerprint), one entry per class folder (an empty one
        too). A class's digest covers each of its images' path (relative to the class folder), size
        in bytes and the SHA-256 of its first ``HEAD_BYTES`` (4,096) bytes: a file added, removed,
        renamed, resized, or rewritten in its first 4 KiB (a JPEG's or PNG's header and first pixels)
        is seen; one changed only past its first 4 KiB keeping its exact size is not (re-encoding an
        image almost always changes its size). Modification times are not used: a copy (``cp -r``
        without ``-p``, a sync to another disk) changes them, not the images. With a ``limit``, the
        first bytes of the images kept are read, the others' sizes only. Computed once, on first
        call (only a run folder that is not finished needs it): it re-lists ``root``, stats every
        image and reads the 4 KiB block of each that the scan read (cached: no more bytes from disk
        than the scan's), some 0.15 s per 2,000 images."""
        if self._fingerprint is None:
            if self.root is None:
                raise ValueError("a scan without its root folder has no fingerprint")
            read = None if self.complete else {path for _, path in self.files}
            classes, total, count = {}, hashlib.sha256(), 0
            for class_dir in _subfolders(self.root):
                digest, n = hashlib.sha256(), 0
                for path in _image_files(class_dir):
                    digest.update(f"{path.relative_to(class_dir).as_posix()}\0{path.stat().st_size}\0".encode())
                    if read is None or path in read:
                        digest.update(_head_digest(path))
                    n += 1
                classes[class_dir.name] = {"images": n, "sha256": digest.hexdigest()}
                total.update(f"{class_dir.name}\0{classes[class_dir.name]['sha256']}\0".encode())
                count += n
            self._fingerprint = {"folder": str(self.root), "images": count, "sha256": total.hexdigest(),
                                 "classes": classes}
        return self._fingerprint

    def __len__(self) -> int:
        return len(self.files)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one decoded image."""
        return (1 if self.mode == "L" else 3), self.height, self.width

    @property
    def labels(self) -> torch.Tensor:
        """int64 ``(N,)``: each image's label."""
        return torch.tensor([label for label, _ in self.files], dtype=torch.int64)

    @property
    def planned_bytes(self) -> int:
        """Bytes of the uint8 ``(N, C, H, W)`` array ``decode`` fills (its ``nbytes``): what
        decoding will add to the memory the process holds (the labels are the scan's)."""
        channels, height, width = self.image_shape
        return len(self.files) * channels * height * width

    def decode(self) -> ImageDataset:
        """Decode the images: ``ImageDataset`` of images ``(N, C, H, W)`` uint8 (``image_shape``),
        labels ``(N,)`` int64 and ``classes``. Each image is decoded and written in place into one
        array of that shape allocated first (``planned_bytes``: the only copy of the pixels held;
        its HWC pixels are transposed as they are written); a file whose pixels do not match its
        header is refused."""
        (channels, height, width), mode = self.image_shape, self.mode
        array = np.empty((len(self.files), channels, height, width), dtype=np.uint8)
        for i, (_, path) in enumerate(self.files):
            with _open(path) as image:
                try:
                    pixels = np.asarray(_fitted(image.convert(mode), self.resize, self.crop))
                except OSError as error:
                    raise PrunekitError(f"cannot decode {path} ({error}); remove or re-save the file") from error
            if pixels.shape[:2] != (height, width) or pixels.dtype != np.uint8:
                raise PrunekitError(f"{path} decodes to {pixels.shape[1]}x{pixels.shape[0]} pixels ({pixels.dtype}), "
                                    f"not the {width}x{height} its header says; remove or re-save the file")
            array[i] = pixels[None] if mode == "L" else pixels.transpose(2, 0, 1)
        return ImageDataset(torch.from_numpy(array), self.labels, list(self.classes))


def scan_image_folder(data_dir: Path, split: str, resize: int | None = None, crop: int | None = None,
                      limit: int | None = None, seed: int | None = None,
                      classes: list[str] | tuple[str, ...] | None = None) -> ImageFolderScan:
    """Scan split ``split`` of an image-folder tree: everything known before decoding (the class
    folders, the files, every file's header: its size after ``resize`` / ``crop`` and its mode, so
    that images of different sizes are refused here), hence the decoded array's shape and bytes
    (``ImageFolderScan.planned_bytes``); ``.decode()`` reads the pixels. Reading headers only, it
    takes a second or two for 10,000 JPEGs where decoding them at 224 takes some 20 s.

    Classes are the sorted subfolder names (of train/, if there is one). Decoded, images are
    ``(N, C, H, W)`` uint8 with ``C=3`` (RGB) or ``C=1`` (all grayscale), ``H, W`` the images' own
    size or, with ``resize`` / ``crop`` (pixels), the size they are brought to; labels ``(N,)``
    int64 index the sorted class names (with a train/ split, its class names for either split: a
    test/ split of fewer classes keeps the training labels, and one with a class train/ lacks is
    refused); within a class, files are in name order. With ``limit`` below the number of images,
    only those ``ImageDataset.subset(limit, seed)`` would keep are kept, in its order: a few
    thousand images of a folder of a million without reading the rest.

    ``classes``: the class names a model was trained on, ``classes[k]`` its output ``k`` (the
    ``class_names`` its sidecar records). Then they, not the folder, name the labels: a folder
    lacking some of them is fine (its images keep the model's indices), one holding a class not in
    the list is refused, naming it."""
    _check_sizes(resize, crop)
    if not data_dir.is_dir():
        raise PrunekitError(f"image folder {data_dir} does not exist; pass the folder that holds <class>/ subfolders")
    root = _split_root(data_dir, split)
    class_dirs = _subfolders(root)
    if not class_dirs:
        raise PrunekitError(f"no class folders in {root}: expected {root}/<class>/*.jpg or *.png")
    names = _class_names(data_dir, root, class_dirs) if classes is None else _known_names(root, class_dirs, classes)
    files = [(names.index(class_dir.name), path) for class_dir in class_dirs for path in _image_files(class_dir)]
    complete = limit is None or limit >= len(files)
    if not complete:
        files = [files[i] for i in subset_indices(len(files), limit, seed)]

    # Headers only: check sizes and pick the mode before decoding pixels.
    sizes, modes = set(), set()
    for _, path in files:
        with _open(path) as image:
            size = _resized(image.size, resize)
            if crop is not None and min(size) < crop:
                raise PrunekitError(f"{path} is {size[0]}x{size[1]}" + (f" after resizing to {resize}" if resize else "")
                                    + f", smaller than the crop of {crop}: crop less or resize to at least {crop}")
            sizes.add((crop, crop) if crop is not None else size)
            modes.add(image.mode)
    if len(sizes) > 1:
        shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:4])
        said = f"images in {root} have different sizes ({shown})"
        if resize:
            raise worded(f"{said}; crop them to one size (crop=N)", f"{said}; crop them to one size (--crop N)")
        raise worded(f"{said}; bring them to one size (resize=N, crop=N)",
                     f"{said}; bring them to one size (--resize N --crop N)")
    mode = "L" if modes <= set(_GRAYSCALE_MODES) else "RGB"
    (width, height), = sizes
    return ImageFolderScan(files, names, mode, width, height, resize, crop, root, complete)


def _listed_classes(data_dir: str | Path, split: str, classes: list[str] | tuple[str, ...] | None
                    ) -> tuple[list[str], list[Path]] | None:
    """(class names, class folders) that ``scan_image_folder(data_dir, split, classes=classes)`` labels,
    from folder names alone; None where the scan would refuse the folder before reading a header (no
    such folder, split or class folders, images only in subfolders, a class the model lacks) or the
    listing fails: its refusal is the scan's to give. Says nothing."""
    data_dir = Path(data_dir).expanduser()
    try:
        if not data_dir.is_dir():
            return None
        root = _split_root(data_dir, split, warn=False)
        class_dirs = _subfolders(root)
        if not class_dirs:
            return None
        names = _class_names(data_dir, root, class_dirs) if classes is None else _known_names(root, class_dirs, classes)
    except (PrunekitError, OSError):
        return None
    return names, class_dirs


def count_images(data_dir: str | Path, split: str, classes: list[str] | tuple[str, ...] | None = None,
                 at_most: int | None = None) -> int | None:
    """The number of images ``scan_image_folder(data_dir, split, classes=classes)`` finds (no
    ``limit``), from the file listing alone: no file is opened (the scan reads every image's header:
    minutes on a huge folder; listing it takes a small part of that). Counting stops once it reaches
    ``at_most`` (then at least that many are there). None where the scan would refuse the folder
    before reading a header (no such folder, split or class folders, images only in subfolders, a
    class the model lacks): its refusal is the scan's to give. Says nothing (a folder without
    train/ and test/ is warned of by the scan)."""
    found = _listed_classes(data_dir, split, classes)
    if found is None:
        return None
    _, class_dirs = found
    count = 0
    for class_dir in class_dirs:
        for _ in _walk_images(class_dir):
            count += 1
            if at_most is not None and count >= at_most:
                return count
    return count


def peek_classes_and_channels(data_dir: str | Path, split: str, classes: list[str] | tuple[str, ...] | None = None,
                              limit: int | None = None, seed: int | None = None,
                              headers: int | None = 8) -> tuple[int, int | None] | None:
    """What ``scan_image_folder(data_dir, split, limit=limit, seed=seed, classes=classes)`` will say
    of the model the images go into, from the file listing and at most ``headers`` image headers:
    ``(number of classes, channels)``, channels 3 (RGB) where one of the first ``headers`` images the
    scan keeps is not grayscale (one such image makes the scan's mode RGB), None where they all are
    (1 only if every image is: the scan reads them all to tell; ``headers=None`` reads on until one
    is not, or to the last image the scan keeps, and says 1 where all are). None where the scan would refuse the
    folder before reading a header (``count_images``' cases) or the listing fails. Says nothing (a
    folder without train/ and test/ is warned of by the scan)."""
    found = _listed_classes(data_dir, split, classes)
    if found is None:
        return None
    names, class_dirs = found
    try:
        paths = (path for class_dir in class_dirs for path in _walk_images(class_dir))
        if limit is not None:           # the scan keeps a seeded subset when limit is below the count
            listed = list(paths)
            kept = listed if limit >= len(listed) else [listed[i] for i in subset_indices(len(listed), limit, seed)]
            paths = iter(kept)
        channels, read = None, 0
        for path in (paths if headers is None else itertools.islice(paths, headers)):
            with Image.open(path) as image:
                read += 1
                if image.mode not in _GRAYSCALE_MODES:
                    channels = 3
                    break
        if channels is None and headers is None and read:       # every image the scan keeps is grayscale
            channels = 1
    except (PrunekitError, OSError):    # (PIL's UnidentifiedImageError is an OSError): the scan's to say
        return None
    return len(names), channels


def _check_sizes(resize, crop) -> None:
    for name, value in (("resize", resize), ("crop", crop)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise PrunekitError(f"{name} must be a positive number of pixels, got {value!r}")


def scans_again(scan, data_dir: Path, split: str, resize: int | None = None, crop: int | None = None,
                classes: list[str] | tuple[str, ...] | None = None) -> bool:
    """Whether ``scan_image_folder(data_dir, split, resize, crop, classes=classes)`` (no ``limit``)
    would find ``scan`` again, so that its images can be shared rather than scanned and decoded a
    second time: ``scan`` is a complete scan (no ``limit``) of the same folder (a folder without
    train/ and test/ is both splits; or the same split asked for twice) with the same ``resize`` and
    ``crop``, whose labels index the class names this call would use. Reads folder names only, no
    file. When True, the warning that scan would give (a folder without splits read as "train") is
    given; when False, nothing is said (the scan that follows says it, or refuses)."""
    if not isinstance(scan, ImageFolderScan) or scan.root is None or not scan.complete:
        return False
    try:
        _check_sizes(resize, crop)
        if (scan.resize, scan.crop) != (resize, crop) or not data_dir.is_dir():
            return False
        root = _split_root(data_dir, split, warn=False)
        if root.resolve() != scan.root.resolve():
            return False
        names = ([str(c) for c in classes] if classes is not None
                 else _class_names(data_dir, root, _subfolders(root)))
    except (PrunekitError, OSError):
        return False            # the scan refuses it, in its own words
    if names != list(scan.classes):
        return False
    _split_root(data_dir, split)        # its warning, as the scan would give it
    return True


def _class_names(data_dir: Path, root: Path, class_dirs: list[Path]) -> list[str]:
    """The class names labels index: the training split's sorted class folders whenever the folder
    has a train/ split (a test/ split holding fewer classes is labelled by name, as the model was
    trained), else ``root``'s own. A test/ class that train/ lacks is refused: the model never
    learnt it, and its images would take some other class's label."""
    _check_layout(root, class_dirs)
    names = [d.name for d in class_dirs]
    train = data_dir / "train"
    if root == train or root == data_dir or not train.is_dir():
        return names
    trained = [d.name for d in _subfolders(train)]
    unknown = [name for name in names if name not in trained]
    if unknown:
        shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise PrunekitError(f"{root} has class folders that {train} lacks ({shown}): a model trained on train/ "
                            f"has no output for them; give both splits the same class folders")
    return trained


def _known_names(root: Path, class_dirs: list[Path], classes) -> list[str]:
    """``classes`` (a model's recorded class names, in label order), refusing a class folder of
    ``root`` that is not among them: the model has no output for it."""
    _check_layout(root, class_dirs)
    names = [str(c) for c in classes]
    unknown = [d.name for d in class_dirs if d.name not in names]
    if unknown:
        shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        known = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        raise PrunekitError(f"{root} has class folder(s) the model was not trained on ({shown}; it knows {known}): "
                            "remove or rename them, or train a model on these classes")
    return names


def _resized(size: tuple[int, int], resize: int | None) -> tuple[int, int]:
    """(width, height) after scaling the shorter side to ``resize`` pixels (unchanged without)."""
    if resize is None:
        return size
    width, height = size
    scale = resize / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _fitted(image: Image.Image, resize: int | None, crop: int | None) -> Image.Image:
    if resize is not None:
        image = image.resize(_resized(image.size, resize), Image.Resampling.BILINEAR)
    if crop is not None:
        left, top = (image.width - crop) // 2, (image.height - crop) // 2
        image = image.crop((left, top, left + crop, top + crop))
    return image
