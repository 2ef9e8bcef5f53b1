"""Write the MNIST sample bundled for `prunekit demo` (run once; the output is committed).

    python tools/make_demo_data.py ../shared/data/mnist src/prunekit/assets/mnist

Copies the official 10,000-image test files and writes the first 2,000 official training
images and labels as standard IDX files (.gz). MNIST is CC BY-SA 3.0 (Y. LeCun, C. Cortes,
C. J. C. Burges); see src/prunekit/assets/README.md.
"""

import gzip
import shutil
import struct
import sys
from pathlib import Path

TRAIN_IMAGES = 2000


def write_idx_prefix(src: Path, dst: Path, count: int, item_bytes: int, header_dims: int) -> None:
    """Keep the first ``count`` items of an IDX file, fixing the count in its header."""
    with gzip.open(src, "rb") as f:
        data = f.read()
    header_len = 4 + 4 * header_dims
    dims = list(struct.unpack(f">{header_dims}I", data[4:header_len]))
    dims[0] = count
    body = data[header_len:header_len + count * item_bytes]
    with gzip.GzipFile(dst, "wb", mtime=0) as f:
        f.write(data[:4] + struct.pack(f">{header_dims}I", *dims) + body)


def main(src_dir: str, out_dir: str) -> None:
    src, out = Path(src_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copyfile(src / name, out / name)
    write_idx_prefix(src / "train-images-idx3-ubyte.gz", out / "train-images-idx3-ubyte.gz",
                     TRAIN_IMAGES, 28 * 28, 3)
    write_idx_prefix(src / "train-labels-idx1-ubyte.gz", out / "train-labels-idx1-ubyte.gz",
                     TRAIN_IMAGES, 1, 1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
