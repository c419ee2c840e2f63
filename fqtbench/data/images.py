"""8-bit RGB image datasets: any ImageFolder tree (train/ and test/ class folders) and CIFAR-10.

An ImageFolder tree is decoded once (PIL, RGB) into uint8 tensors that are cached with torch.save,
keyed by the absolute root and the file list with sizes and mtimes; later runs load the cache in
about a second instead of decoding tens of thousands of images. CIFAR-10 reads such a tree when
data.root holds one (e.g. a JPEG copy), else torchvision's pickled batches.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import re
import tempfile
import warnings
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from fqtbench.data.base import (DatasetSpec, FQTDataModule, assemble, cfg_get, check_common_cfg,
                                default_cache_dir, random_crop_flip)
from fqtbench.errors import ConfigError, DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
CACHE_FORMAT = 1  # bump when the cached dict changes, so old caches are not read
PIXEL_MAX = 255
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_CHUNK = 512  # images per decode task: large enough to amortise pickling, small enough for a smooth bar


class ImageTree(NamedTuple):
    """Decoded train and test splits of an image tree: uint8 (N, 3, H, W) pixels and int64 labels."""

    classes: tuple[str, ...]
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


# --------------------------------------------------------------------------- scanning


def is_imagefolder_tree(root: Path) -> bool:
    """True when root has train/ and test/ folders (the ImageFolder layout this module reads)."""
    return (root / "train").is_dir() and (root / "test").is_dir()


def _list_dir(path: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"cannot read folder {path}: {exc.strerror or exc}") from None


def _scan_split(root: Path, split: str) -> tuple[list[str], list[tuple[str, int, int, int]]]:
    """Class names and (path, label, size, mtime_ns) of every image under root/split/<class>/, sorted."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir} is missing: an image folder root needs train/ and test/ folders "
                        f"with one subfolder per class")
    classes = [e.name for e in _list_dir(split_dir) if e.is_dir()]
    if not classes:
        raise DataError(f"{split_dir} has no class subfolders: expected {split_dir}/<class>/<image files>")
    files: list[tuple[str, int, int, int]] = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        found = []
        stack = [class_dir]
        while stack:  # walk the class folder recursively, in sorted order
            folder = stack.pop()
            entries = _list_dir(folder)
            for e in entries:
                if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                    st = e.stat()
                    found.append((e.path, label, st.st_size, st.st_mtime_ns))
            stack.extend(Path(e.path) for e in reversed(entries) if e.is_dir())
        if not found:
            raise DataError(f"{class_dir} has no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
        files.extend(sorted(found))
    return classes, files


def _scan_tree(root: Path) -> tuple[tuple[str, ...], list, list]:
    train_classes, train_files = _scan_split(root, "train")
    test_classes, test_files = _scan_split(root, "test")
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise DataError(f"train/ and test/ under {root} must hold the same class folders; "
                        f"only in train: {only_train or 'none'}, only in test: {only_test or 'none'}")
    return tuple(train_classes), train_files, test_files


def _cache_key(root: Path, image_size: int | None, files: list[tuple[str, int, int, int]]) -> str:
    """Hash of everything the decoded tensors depend on: root, target size, and each file's path/size/mtime."""
    h = hashlib.sha256(f"fqtbench-imagefolder-{CACHE_FORMAT}\0{root}\0{image_size}\n".encode())
    h.update("".join(f"{path}\0{label}\0{size}\0{mtime}\n" for path, label, size, mtime in files).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- decoding


def _image_size_of(path: str) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception as exc:  # PIL raises many types for broken files
        raise DataError(f"cannot read image {path}: {exc}") from None


def _decode_chunk(job: tuple[list[str], tuple[int, int], bool]):
    """Decode a chunk of files to (n, H, W, 3) uint8; on the first bad file return what went wrong instead.

    Runs in pool workers, so it returns errors as values rather than raising across processes.
    """
    from PIL import Image

    paths, (w, h), resize = job
    out = np.empty((len(paths), h, w, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.size != (w, h):
                    if not resize:
                        return ("mismatch", path, im.size)
                    im = im.resize((w, h), Image.BILINEAR)
                out[i] = np.asarray(im)
        except Exception as exc:
            return ("unreadable", path, str(exc))
    return ("ok", out)


def _decode_workers(n: int) -> int:
    """Worker processes for decoding: all usable cores for big trees, none for small ones or without fork."""
    if n < 2 * _CHUNK or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 8))


def _decode_files(paths: list[str], image_size: int | None, what: str = "images") -> torch.Tensor:
    """Decode image files (PIL, RGB) into one uint8 (N, 3, H, W) tensor, with a progress bar.

    Without image_size every image must have the size of the first; with it, all are resized to
    image_size x image_size. Uses a forked process pool when there are many files (PIL decoding is
    CPU-bound, so this scales with cores); the pool is created before the bar so no thread is forked.
    """
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    if image_size is not None:
        size, resize = (image_size, image_size), True
    else:
        size, resize = _image_size_of(paths[0]), False
    w, h = size
    out = np.empty((len(paths), h, w, 3), dtype=np.uint8)
    jobs = [(paths[i : i + _CHUNK], size, resize) for i in range(0, len(paths), _CHUNK)]
    workers = _decode_workers(len(paths))
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_decode_chunk, jobs) if pool is not None else map(_decode_chunk, jobs)
        progress = Progress(TextColumn("[bold]decoding {task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                            auto_refresh=False, transient=False)
        with progress:
            task = progress.add_task(what, total=len(paths))
            pos = 0
            for result in results:
                if result[0] == "mismatch":
                    _, path, (bad_w, bad_h) = result
                    raise DataError(f"images differ in size: {path} is {bad_w}x{bad_h} but {paths[0]} is {w}x{h}; "
                                    f"set data.image_size=N to resize every image to NxN")
                if result[0] == "unreadable":
                    raise DataError(f"cannot read image {result[1]}: {result[2]}")
                arr = result[1]
                out[pos : pos + len(arr)] = arr
                pos += len(arr)
                progress.update(task, advance=len(arr), refresh=True)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------- cache


def _cache_path(cache_dir: Path, root: Path, image_size: int | None, key: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", root.name or "root")[:40]
    root_hash = hashlib.sha256(str(root).encode()).hexdigest()[:10]
    return cache_dir / "imagefolder" / f"{slug}-{root_hash}-{image_size or 'native'}-{key[:24]}.pt"


def _load_cache(path: Path, classes: tuple[str, ...]) -> ImageTree | None:
    """The cached tree, or None when absent or unusable (then it is decoded again and rewritten)."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        tree = ImageTree(tuple(blob["classes"]), blob["train_x"], blob["train_y"], blob["test_x"], blob["test_y"])
        if blob.get("format") != CACHE_FORMAT or tree.classes != classes or tree.train_x.dtype != torch.uint8:
            return None
        return tree
    except Exception as exc:
        warnings.warn(f"ignoring unreadable image cache {path} ({exc}); decoding again", stacklevel=2)
        return None


def _write_cache(path: Path, tree: ImageTree, root: Path) -> None:
    """Write atomically (temp file + os.replace) so a crash or a parallel run never sees half a file;
    then drop older caches of the same root and size. A failed write only costs a re-decode next time."""
    blob = {"format": CACHE_FORMAT, "root": str(root), "classes": list(tree.classes),
            "train_x": tree.train_x, "train_y": tree.train_y, "test_x": tree.test_x, "test_y": tree.test_y}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-" + path.stem, suffix=".pt", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(blob, f)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache is as shareable as the images it came from
        os.replace(tmp, path)
        tmp = None
        prefix = path.name.rsplit("-", 1)[0] + "-"
        for old in path.parent.glob(prefix + "*.pt"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError as exc:
        warnings.warn(f"could not write image cache {path} ({exc}); the next run will decode again", stacklevel=2)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def load_imagefolder(root: str | os.PathLike, image_size: int | None, cache_dir: Path) -> ImageTree:
    """Scan root/{train,test}/<class>/ and return the decoded tree, from the cache when it is current."""
    root = Path(root).expanduser().resolve()
    if not root.exists():
        raise DataError(f"data.root {root} does not exist: expected a folder with train/ and test/ class folders")
    if not root.is_dir():
        raise DataError(f"data.root {root} is not a folder: expected a folder with train/ and test/ class folders")
    classes, train_files, test_files = _scan_tree(root)
    files = train_files + test_files
    path = _cache_path(cache_dir, root, image_size, _cache_key(root, image_size, files))
    tree = _load_cache(path, classes)
    if tree is not None:
        return tree
    x = _decode_files([f[0] for f in files], image_size, what=f"{len(files)} images of {root.name}")
    y = torch.tensor([f[1] for f in files], dtype=torch.int64)
    n = len(train_files)
    tree = ImageTree(classes, x[:n].clone(), y[:n].clone(), x[n:].clone(), y[n:].clone())
    _write_cache(path, tree, root)
    return tree


# --------------------------------------------------------------------------- datasets


def _augmentation(cfg: Any, image_hw: tuple[int, int]):
    """Crop (zero padding of 1/8 of the side: 4 for 32x32) + flip when data.augment, else None."""
    if not cfg_get(cfg, "augment", True):
        return None
    return partial(random_crop_flip, padding=max(1, min(image_hw) // 8))


def _n_val(cfg: Any, n_train: int) -> int:
    return int(round(float(cfg_get(cfg, "val_fraction", 0.0)) * n_train))


def build_imagefolder(cfg: Any, seed: int) -> FQTDataModule:
    """Any train/ + test/ class-folder tree; mean/std from the training split (after the val hold-out)."""
    check_common_cfg(cfg)
    root = cfg_get(cfg, "root", None)
    if not root:
        raise ConfigError("data.root is required for imagefolder: set data.root to a folder with train/ and "
                          "test/ class folders")
    tree = load_imagefolder(root, cfg_get(cfg, "image_size", None), default_cache_dir(cfg))
    hw = (int(tree.train_x.shape[2]), int(tree.train_x.shape[3]))
    return assemble(cfg, seed, name=cfg_get(cfg, "name", None) or "imagefolder", classes=tree.classes,
                    pixel_max=PIXEL_MAX, train=(tree.train_x, tree.train_y), test=(tree.test_x, tree.test_y),
                    n_val=_n_val(cfg, len(tree.train_y)), augment=_augmentation(cfg, hw))


def _cifar_root(cfg: Any) -> Path:
    """data.root, else $FQTBENCH_DATA/cifar10, else ~/.cache/fqtbench/data/cifar10."""
    root = cfg_get(cfg, "root", None)
    if root:
        return Path(root).expanduser().resolve()
    if os.environ.get("FQTBENCH_DATA"):
        return Path(os.environ["FQTBENCH_DATA"]).expanduser().resolve() / "cifar10"
    return Path.home() / ".cache" / "fqtbench" / "data" / "cifar10"


def _resize_uint8(x: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of a uint8 batch, in chunks to bound the float copy."""
    if tuple(x.shape[2:]) == (size, size):
        return x
    parts = []
    for start in range(0, len(x), 2048):
        part = torch.nn.functional.interpolate(x[start : start + 2048].float(), size=(size, size),
                                               mode="bilinear", antialias=True, align_corners=False)
        parts.append(part.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(parts)


def _load_torchvision_cifar10(root: Path, download: bool, image_size: int | None) -> ImageTree:
    """torchvision's CIFAR10 pickles under root/cifar-10-batches-py, downloaded only when asked."""
    from torchvision.datasets import CIFAR10

    splits = []
    for train in (True, False):
        try:
            ds = CIFAR10(str(root), train=train, download=download)
        except RuntimeError:  # torchvision: "Dataset not found or corrupted"
            raise DataError(
                f"CIFAR-10 not found under {root} (looked for {root / 'cifar-10-batches-py'} and for an ImageFolder "
                f"tree {root / 'train'} + {root / 'test'}); pass --set data.download=true to download it (needs "
                f"network) or point data.root at an ImageFolder tree with train/ and test/ class folders"
            ) from None
        except OSError as exc:  # download failures (no network, unwritable root)
            raise DataError(f"could not download CIFAR-10 into {root}: {exc}; point data.root at a local copy "
                            f"(pickled batches or an ImageFolder tree)") from None
        x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        if image_size is not None:
            x = _resize_uint8(x, image_size)
        splits.append((x, torch.tensor(ds.targets, dtype=torch.int64)))
    return ImageTree(tuple(ds.classes), splits[0][0], splits[0][1], splits[1][0], splits[1][1])


def build_cifar10(cfg: Any, seed: int) -> FQTDataModule:
    """CIFAR-10 from an ImageFolder tree at the root when there is one, else torchvision's files.

    val_fraction of the training set is held out (stratified, fixed); with val_fraction 0 there is
    no validation split and val_dataloader serves the test split. Mean/std are the standard values.
    """
    check_common_cfg(cfg)
    root = _cifar_root(cfg)
    image_size = cfg_get(cfg, "image_size", None)
    if is_imagefolder_tree(root):
        tree = load_imagefolder(root, image_size, default_cache_dir(cfg))
        if len(tree.classes) != 10:
            raise DataError(f"data.root {root} has {len(tree.classes)} class folders but cifar10 needs 10; "
                            f"use data.name=imagefolder for other trees")
    else:
        tree = _load_torchvision_cifar10(root, bool(cfg_get(cfg, "download", False)), image_size)
    hw = (int(tree.train_x.shape[2]), int(tree.train_x.shape[3]))
    return assemble(cfg, seed, name="cifar10", classes=tree.classes, pixel_max=PIXEL_MAX,
                    train=(tree.train_x, tree.train_y), test=(tree.test_x, tree.test_y),
                    n_val=_n_val(cfg, len(tree.train_y)), mean=CIFAR10_MEAN, std=CIFAR10_STD,
                    augment=_augmentation(cfg, hw))


CIFAR10_SPEC = DatasetSpec(
    name="cifar10",
    version="1",
    description="CIFAR-10 (32x32 RGB, 10 classes) from an ImageFolder tree at data.root or torchvision's files",
    build=build_cifar10,
)

IMAGEFOLDER_SPEC = DatasetSpec(
    name="imagefolder",
    version="1",
    description="any data.root with train/ and test/ class folders, decoded once to a cached uint8 tensor",
    build=build_imagefolder,
)
