"""Tests of fqtbench.data: fixed splits, deterministic batched loaders, augmentation, the image cache."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fqtbench.data import CIFAR10_SPEC, DIGITS_SPEC, IMAGEFOLDER_SPEC, DataInfo, DatasetSpec, FQTDataModule
from fqtbench.data import images as images_mod
from fqtbench.data.base import _BatchSampler, random_crop_flip, stratified_order
from fqtbench.errors import ConfigError, DataError, UserError

CIFAR_ROOT = Path(os.environ.get("FQTBENCH_CIFAR_ROOT") or Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg")


def make_cfg(**overrides) -> SimpleNamespace:
    base = dict(name="digits", root=None, download=False, batch_size=64, eval_batch_size=256, val_fraction=0.1,
                train_subset=None, augment=True, num_workers=0, cache_dir=None, image_size=None)
    base.update(overrides)
    return SimpleNamespace(**base)


def collect(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def rows(x: torch.Tensor, y: torch.Tensor) -> list[bytes]:
    """Each example as bytes (label + pixels), to compare splits as multisets."""
    return sorted(bytes([int(label)]) + img.numpy().tobytes() for img, label in zip(x, y))


# --------------------------------------------------------------------------- specs


def test_specs_are_exported():
    for spec, name in ((DIGITS_SPEC, "digits"), (CIFAR10_SPEC, "cifar10"), (IMAGEFOLDER_SPEC, "imagefolder")):
        assert isinstance(spec, DatasetSpec)
        assert spec.name == name and spec.version == "1" and "\n" not in spec.description
        assert callable(spec.build)


# --------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_pair():
    return DIGITS_SPEC.build(make_cfg(), 0), DIGITS_SPEC.build(make_cfg(), 1)


def test_digits_info(digits_pair):
    info = digits_pair[0].info
    assert isinstance(info, DataInfo)
    assert (info.num_classes, info.in_channels, info.image_size, info.pixel_max) == (10, 1, (8, 8), 16)
    assert info.train_size + info.val_size + info.test_size == 1797
    assert info.test_size == round(0.2 * 1797) and info.val_size == round(0.1 * 1797)
    assert len(info.mean) == len(info.std) == 1 and 0 < info.mean[0] < 1 and 0 < info.std[0] < 1
    assert info.classes == tuple(str(i) for i in range(10))


def test_digits_says_it_ignores_a_data_root():
    with pytest.warns(UserWarning, match="data.root='/elsewhere' is not used"):
        DIGITS_SPEC.build(make_cfg(root="/elsewhere"), 0)


def test_digits_split_fixed_disjoint_and_stratified(digits_pair):
    from sklearn.datasets import load_digits

    a, b = digits_pair
    splits_a = [collect(a.train_eval_dataloader()), collect(a.val_dataloader()), collect(a.test_dataloader())]
    splits_b = [collect(b.train_eval_dataloader()), collect(b.val_dataloader()), collect(b.test_dataloader())]
    for (xa, ya), (xb, yb) in zip(splits_a, splits_b):  # independent of the run seed, order included
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    again = DIGITS_SPEC.build(make_cfg(), 0)
    assert torch.equal(collect(again.test_dataloader())[0], splits_a[2][0])

    # Disjoint and complete: the three splits together are exactly the dataset, as a multiset.
    bunch = load_digits()
    full_x = torch.from_numpy(bunch.images.astype(np.uint8)).unsqueeze(1)
    all_x = torch.cat([s[0] for s in splits_a])
    all_y = torch.cat([s[1] for s in splits_a])
    assert rows(all_x, all_y) == rows(full_x, torch.from_numpy(bunch.target))

    overall = np.bincount(bunch.target, minlength=10) / len(bunch.target)
    for _, y in splits_a:
        frac = np.bincount(y.numpy(), minlength=10) / len(y)
        assert np.abs(frac - overall).max() < 0.01


def test_digits_batches_uint8_and_seeded(digits_pair):
    a, b = digits_pair
    x, y = next(iter(a.train_dataloader()))
    assert x.dtype == torch.uint8 and y.dtype == torch.int64 and x.shape == (64, 1, 8, 8)
    assert int(x.min()) >= 0 and int(x.max()) <= 16 and int(x.max()) == 16
    same = DIGITS_SPEC.build(make_cfg(), 0)
    for (x1, y1), (x2, y2) in zip(a.train_dataloader(), same.train_dataloader()):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    ya = collect(a.train_dataloader())[1]
    yb = collect(b.train_dataloader())[1]
    assert not torch.equal(ya, yb)  # a different seed gives a different order ...
    assert sorted(ya.tolist()) == sorted(yb.tolist())  # ... of the same training split


def test_epochs_differ_and_set_epoch_replays(digits_pair):
    loader = digits_pair[0].train_dataloader()
    first, second = collect(loader)[1], collect(loader)[1]
    assert not torch.equal(first, second)
    loader.sampler.set_epoch(0)
    assert torch.equal(collect(loader)[1], first)


def test_digits_val_fraction_zero_serves_test():
    dm = DIGITS_SPEC.build(make_cfg(val_fraction=0.0), 0)
    assert dm.info.val_size == 0 and dm.info.train_size + dm.info.test_size == 1797
    assert torch.equal(collect(dm.val_dataloader())[0], collect(dm.test_dataloader())[0])


def test_digits_train_subset_is_stratified_prefix():
    full = DIGITS_SPEC.build(make_cfg(), 0)
    sub = DIGITS_SPEC.build(make_cfg(train_subset=200), 0)
    assert sub.info.train_size == 200 and sub.info.test_size == full.info.test_size
    x_sub, y_sub = collect(sub.train_eval_dataloader())
    x_full, y_full = collect(full.train_eval_dataloader())
    assert torch.equal(x_sub, x_full[:200]) and torch.equal(y_sub, y_full[:200])
    assert np.bincount(y_sub.numpy(), minlength=10).min() >= 18  # ~20 per class
    assert sub.info.mean == full.info.mean  # stats do not move with the subset


def test_calib_loader_is_fixed_prefix(digits_pair):
    dm = digits_pair[0]
    calib = list(dm.calib_dataloader(3))
    assert len(calib) == 3 and all(x.shape[0] == dm.batch_size for x, _ in calib)
    x_train = collect(dm.train_eval_dataloader())[0]
    assert torch.equal(torch.cat([x for x, _ in calib]), x_train[: 3 * dm.batch_size])
    assert len(np.unique(calib[0][1].numpy())) == 10  # the fixed order interleaves the classes
    assert len(list(dm.calib_dataloader(10_000))) == len(dm.calib_dataloader(10_000))
    with pytest.raises(ConfigError):
        dm.calib_dataloader(0)


def test_drop_small_last_batch_rule():
    assert len(_BatchSampler(1258, 100, drop_small_last=True)) == 13  # 58 left >= half a batch: kept
    assert len(_BatchSampler(1258, 200, drop_small_last=True)) == 6  # 58 left < half a batch: dropped
    assert len(_BatchSampler(1258, 200)) == 7  # eval loaders keep everything
    assert len(_BatchSampler(30, 100, drop_small_last=True)) == 1  # never drops the only batch
    sizes = [len(ref.indices) for ref in _BatchSampler(1258, 200, shuffle=True, drop_small_last=True)]
    assert sizes == [200] * 6


def test_one_batch_holding_the_whole_split_keeps_its_order():
    """Shuffled batches change from epoch to epoch; a batch that holds the whole split (CC-EA's
    fitness set on digits) stays in one order, so that the search can recognise it."""
    sampler = _BatchSampler(100, 32, shuffle=True)
    assert [r.indices.tolist() for r in sampler] != [r.indices.tolist() for r in sampler]
    whole = _BatchSampler(100, 2048, shuffle=True)
    assert [r.indices.tolist() for r in whole] == [r.indices.tolist() for r in whole] == [list(range(100))]


@pytest.mark.parametrize("augment", [False, True])
def test_rank_shards_add_up_to_the_single_process_batch(augment):
    """Data parallelism: rank r of N gets samples r, r+N, ... of exactly the single-process batch
    (augmented as a whole, so the crops match too)."""
    from fqtbench.data.base import TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (203, 3, 8, 8), dtype=torch.uint8, generator=g)
    ds = TensorDataset(x, torch.arange(203), augment=random_crop_flip if augment else None)
    kw = dict(seed=5, shuffle=True, augment=augment, drop_small_last=True)
    whole = [ds[ref] for ref in _BatchSampler(203, 64, **kw)]
    shards = [[ds[ref] for ref in _BatchSampler(203, 64, shard=(r, 2), **kw)] for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(whole) == 3
    for b, (wx, wy) in enumerate(whole):
        for r in range(2):
            sx, sy = shards[r][b]
            assert torch.equal(sy, wy[r::2]) and torch.equal(sx, wx[r::2])


def test_num_workers_gives_same_batches():
    cfg = make_cfg(num_workers=2, train_subset=512, batch_size=128)
    with_workers = collect(DIGITS_SPEC.build(cfg, 3).train_dataloader())
    in_process = collect(DIGITS_SPEC.build(make_cfg(train_subset=512, batch_size=128), 3).train_dataloader())
    assert torch.equal(with_workers[0], in_process[0]) and torch.equal(with_workers[1], in_process[1])


def test_bad_options_raise_config_error():
    for bad in (dict(val_fraction=1.5), dict(val_fraction=0.85), dict(batch_size=0), dict(train_subset=100_000),
                dict(image_size=32), dict(num_workers=-1)):
        with pytest.raises(ConfigError) as info:
            DIGITS_SPEC.build(make_cfg(**bad), 0)
        key = next(iter(bad))
        assert key in str(info.value) and "\n" not in str(info.value)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader`")
def test_lightning_fit_sets_epochs():
    """Lightning drives the loaders: one order per epoch via set_epoch, batches arrive as uint8."""
    import pytorch_lightning as pl

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(64, 10)
            self.first = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            assert x.dtype == torch.uint8
            if batch_idx == 0:
                self.first.append(y.clone())
            return torch.nn.functional.cross_entropy(self.lin(x.float().flatten(1) / 16), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = DIGITS_SPEC.build(make_cfg(), 0)
    assert isinstance(dm, FQTDataModule)
    probe = Probe()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0)
    trainer.fit(probe, datamodule=dm)
    assert len(probe.first) == 2 and not torch.equal(probe.first[0], probe.first[1])
    loader = dm.train_dataloader()
    assert torch.equal(next(iter(loader))[1], probe.first[0])  # epoch 0 replays


def test_stratified_order_prefixes_balanced():
    y = np.repeat(np.arange(4), [100, 50, 30, 20])
    order = stratified_order(y)
    assert sorted(order.tolist()) == list(range(200))
    counts = np.bincount(y[order[:100]], minlength=4)
    assert np.abs(counts - np.array([50, 25, 15, 10])).max() <= 1


# --------------------------------------------------------------------------- augmentation


def _match_crop_flip(out: torch.Tensor, src: torch.Tensor, pad: int) -> set[tuple[int, int, bool]]:
    """All (oy, ox, flip) that explain `out` as a zero-padded crop (then optional flip) of `src`."""
    c, h, w = src.shape
    padded = torch.zeros((c, h + 2 * pad, w + 2 * pad), dtype=src.dtype)
    padded[:, pad : pad + h, pad : pad + w] = src
    found = set()
    for oy in range(2 * pad + 1):
        for ox in range(2 * pad + 1):
            crop = padded[:, oy : oy + h, ox : ox + w]
            for flip in (False, True):
                if torch.equal(crop.flip(-1) if flip else crop, out):
                    found.add((oy, ox, flip))
    return found


def test_random_crop_flip_is_a_padded_crop_and_flip():
    h = w = 8
    pixel = (torch.arange(h * w, dtype=torch.int64) + 1).reshape(1, h, w)  # unique non-zero value per position
    src = torch.cat([pixel, pixel + 100, pixel + 180]).to(torch.uint8)  # 3 channels, still unique, <= 244
    batch = src.expand(64, 3, h, w).contiguous()
    out = random_crop_flip(batch, torch.Generator().manual_seed(0), padding=2)
    assert out.shape == batch.shape and out.dtype == torch.uint8
    seen = [_match_crop_flip(o, src, 2) for o in out]
    assert all(len(s) == 1 for s in seen)  # each sample is exactly one offset/flip, zeros where padding shows
    params = [next(iter(s)) for s in seen]
    assert any(f for _, _, f in params) and not all(f for _, _, f in params)
    assert len({(oy, ox) for oy, ox, _ in params}) > 5  # each sample its own offset
    assert any((out[i] == 0).any() for i in range(64))  # the padding region shows up as zeros

    again = random_crop_flip(batch, torch.Generator().manual_seed(0), padding=2)
    other = random_crop_flip(batch, torch.Generator().manual_seed(1), padding=2)
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_random_crop_flip_without_padding_only_flips():
    x = torch.randint(0, 256, (32, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = random_crop_flip(x, torch.Generator().manual_seed(2), padding=0)
    flipped = [torch.equal(o, s.flip(-1)) for o, s in zip(out, x)]
    assert all(f or torch.equal(o, s) for f, o, s in zip(flipped, out, x)) and any(flipped) and not all(flipped)


# --------------------------------------------------------------------------- imagefolder


def _write_image(path: Path, value: int, size: tuple[int, int] = (8, 8)) -> np.ndarray:
    rng = np.random.default_rng(value)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return arr


def make_tree(root: Path, per_class_train: int = 4, per_class_test: int = 2) -> dict[str, np.ndarray]:
    """Two classes: 'cat' as lossless PNG, 'dog' as JPEG."""
    written = {}
    for split, count in (("train", per_class_train), ("test", per_class_test)):
        for cls, ext in (("cat", "png"), ("dog", "jpg")):
            for i in range(count):
                path = root / split / cls / f"{i:03d}.{ext}"
                written[str(path)] = _write_image(path, len(written))
    return written


def folder_cfg(root: Path, cache: Path, **overrides) -> SimpleNamespace:
    options = dict(name="imagefolder", root=str(root), cache_dir=str(cache), val_fraction=0.0, batch_size=4,
                   eval_batch_size=4)
    return make_cfg(**{**options, **overrides})


class DecodeCounter:
    """Wraps images._decode_files to count real decodes."""

    def __init__(self, monkeypatch):
        self.calls = 0
        self.real = images_mod._decode_files
        monkeypatch.setattr(images_mod, "_decode_files", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.real(*args, **kwargs)


def test_imagefolder_decodes_once_then_loads_cache(tmp_path, monkeypatch):
    root, cache = tmp_path / "tree", tmp_path / "cache"
    written = make_tree(root)
    counter = DecodeCounter(monkeypatch)
    dm = IMAGEFOLDER_SPEC.build(folder_cfg(root, cache), 0)
    assert counter.calls == 1
    assert len(list((cache / "imagefolder").glob("*.pt"))) == 1
    info = dm.info
    assert (info.num_classes, info.in_channels, info.image_size, info.pixel_max) == (2, 3, (8, 8), 255)
    assert (info.train_size, info.val_size, info.test_size, info.classes) == (8, 0, 4, ("cat", "dog"))
    assert len(info.mean) == 3 and all(0 < m < 1 for m in info.mean)

    x_test, y_test = collect(dm.test_dataloader())  # test split in file order: cat pngs first, lossless
    assert x_test.dtype == torch.uint8 and y_test.tolist() == [0, 0, 1, 1]
    png = written[str(root / "test" / "cat" / "001.png")]
    assert torch.equal(x_test[1], torch.from_numpy(png).permute(2, 0, 1))

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded although the cache is current")

    monkeypatch.setattr(images_mod, "_decode_files", no_decode)
    dm2 = IMAGEFOLDER_SPEC.build(folder_cfg(root, cache), 5)
    assert dm2.info == info and torch.equal(collect(dm2.test_dataloader())[0], x_test)


def test_imagefolder_cache_invalidated_by_touch_and_add(tmp_path, monkeypatch):
    root, cache = tmp_path / "tree", tmp_path / "cache"
    make_tree(root)
    counter = DecodeCounter(monkeypatch)
    IMAGEFOLDER_SPEC.build(folder_cfg(root, cache), 0)
    IMAGEFOLDER_SPEC.build(folder_cfg(root, cache), 0)
    assert counter.calls == 1

    target = root / "train" / "dog" / "000.jpg"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    IMAGEFOLDER_SPEC.build(folder_cfg(root, cache), 0)
    assert counter.calls == 2

    _write_image(root / "train" / "cat" / "extra.png", 77)
    dm = IMAGEFOLDER_SPEC.build(folder_cfg(root, cache), 0)
    assert counter.calls == 3 and dm.info.train_size == 9
    assert len(list((cache / "imagefolder").glob("*.pt"))) == 1  # stale caches of the root are removed


def test_imagefolder_sizes_must_match_unless_resized(tmp_path):
    root, cache = tmp_path / "tree", tmp_path / "cache"
    make_tree(root)
    odd = root / "train" / "dog" / "002.jpg"
    _write_image(odd, 5, size=(10, 12))
    with pytest.raises(DataError) as info:
        IMAGEFOLDER_SPEC.build(folder_cfg(root, cache), 0)
    assert str(odd) in str(info.value) and "data.image_size" in str(info.value)
    dm = IMAGEFOLDER_SPEC.build(folder_cfg(root, cache, image_size=6), 0)
    assert dm.info.image_size == (6, 6)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (3, 6, 6) and x.dtype == torch.uint8


def test_imagefolder_path_errors(tmp_path):
    cache = tmp_path / "cache"
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        IMAGEFOLDER_SPEC.build(folder_cfg(missing, cache), 0)
    assert str(missing) in str(info.value)
    with pytest.raises(ConfigError):
        IMAGEFOLDER_SPEC.build(make_cfg(name="imagefolder", root=None, cache_dir=str(cache)), 0)

    root = tmp_path / "tree"
    make_tree(root)
    (root / "test" / "dog").rename(root / "test" / "wolf")
    with pytest.raises(DataError, match="only in train: \\['dog'\\]"):
        IMAGEFOLDER_SPEC.build(folder_cfg(root, cache), 0)
    (root / "test" / "wolf").rename(root / "test" / "dog")

    bad = root / "train" / "cat" / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError) as info:
        IMAGEFOLDER_SPEC.build(folder_cfg(root, cache), 0)
    assert str(bad) in str(info.value)
    bad.unlink()

    for path in sorted((root / "test").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (root / "test").rmdir()
    with pytest.raises(DataError) as info:
        IMAGEFOLDER_SPEC.build(folder_cfg(root, cache), 0)
    assert str(root / "test") in str(info.value)
    assert issubclass(DataError, UserError)


def test_imagefolder_train_loader_augments_deterministically(tmp_path):
    root, cache = tmp_path / "tree", tmp_path / "cache"
    make_tree(root, per_class_train=8)
    a = IMAGEFOLDER_SPEC.build(folder_cfg(root, cache), 1)
    b = IMAGEFOLDER_SPEC.build(folder_cfg(root, cache), 1)
    plain = IMAGEFOLDER_SPEC.build(folder_cfg(root, cache, augment=False), 1)
    xa, ya = collect(a.train_dataloader())
    xb, yb = collect(b.train_dataloader())
    xp, yp = collect(plain.train_dataloader())
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(ya, yp) and not torch.equal(xa, xp)  # same order, augmented pixels
    assert xa.shape == xp.shape and xa.dtype == torch.uint8


# --------------------------------------------------------------------------- cifar10


def test_cifar10_missing_files_raise_data_error(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as info:
        CIFAR10_SPEC.build(make_cfg(name="cifar10", root=str(empty)), 0)
    assert str(empty) in str(info.value) and "data.download=true" in str(info.value)
    monkeypatch.setenv("FQTBENCH_DATA", str(tmp_path / "store"))
    with pytest.raises(DataError) as info:
        CIFAR10_SPEC.build(make_cfg(name="cifar10", root=None), 0)
    assert str(tmp_path / "store" / "cifar10") in str(info.value)


@pytest.mark.cifar
@pytest.mark.skipif(not (CIFAR_ROOT / "train").is_dir(), reason=f"CIFAR-10 ImageFolder copy not found at {CIFAR_ROOT} "
                    "(set FQTBENCH_CIFAR_ROOT to its folder)")
def test_cifar10_from_imagefolder(monkeypatch, capsys):
    cfg = make_cfg(name="cifar10", root=str(CIFAR_ROOT), batch_size=128, eval_batch_size=1000, val_fraction=0.1)
    start = time.perf_counter()
    dm = CIFAR10_SPEC.build(cfg, 0)  # decodes 60k JPEGs the first time (about 10 s on 2 cores), else loads the cache
    first = time.perf_counter() - start
    info = dm.info
    assert (info.train_size, info.val_size, info.test_size) == (45_000, 5_000, 10_000)
    assert (info.num_classes, info.in_channels, info.image_size, info.pixel_max) == (10, 3, (32, 32), 255)
    assert info.mean == (0.4914, 0.4822, 0.4465) and info.classes[0] == "airplane"

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded although the cache is current")

    monkeypatch.setattr(images_mod, "_decode_files", no_decode)
    start = time.perf_counter()
    sub = CIFAR10_SPEC.build(make_cfg(**{**vars(cfg), "train_subset": 1000}), 0)
    cached = time.perf_counter() - start
    assert (sub.info.train_size, sub.info.val_size) == (1000, 5000)
    y_sub = collect(sub.train_eval_dataloader())[1]
    assert np.bincount(y_sub.numpy(), minlength=10).tolist() == [100] * 10
    assert torch.equal(collect(sub.val_dataloader())[0][:50], collect(dm.val_dataloader())[0][:50])

    loader = dm.train_dataloader()
    assert len(loader) == 352  # 351 full batches + 72 left over (>= half a batch, kept)
    x, y = next(iter(loader))
    assert x.shape == (128, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    with capsys.disabled():
        print(f"\ncifar10: first build {first:.1f}s, build from cache {cached:.1f}s")
