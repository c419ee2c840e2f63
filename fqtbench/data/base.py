"""Shared pieces of every dataset: DataInfo, the in-memory batched loaders, splits and augmentation.

Every split lives in memory as one uint8 tensor (N, C, H, W) of integer pixels in [0, pixel_max].
Batches are cut from it by index tensors and augmented as a whole, so no per-sample Python or PIL
work happens during training: integer-only methods read the pixels as they are, float models
normalise with DataInfo.mean/std themselves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fqtbench.errors import ConfigError

# Fixed random_state for every split and ordering that must NOT depend on the run seed,
# so that every run and method sees the same train/val/test examples.
SPLIT_RANDOM_STATE = 0

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about the data (shapes, pixel range, normalisation, split sizes)."""

    name: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    pixel_max: int  # batches hold integer pixels 0..pixel_max (16 for digits, 255 for 8-bit images)
    mean: tuple[float, ...]  # per channel, in units of pixel/pixel_max
    std: tuple[float, ...]
    train_size: int
    val_size: int  # 0 when val_fraction is 0 (val_dataloader then serves the test split)
    test_size: int
    classes: tuple[str, ...]


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: `build(cfg, seed)` returns a ready FQTDataModule."""

    name: str
    version: str
    description: str
    build: Callable[[Any, int], "FQTDataModule"]


# --------------------------------------------------------------------------- augmentation


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop (same size, zero padding `padding`) plus random horizontal flip of a uint8 batch.

    Each sample gets its own offset and flip, all drawn from `generator`, and the whole batch is
    done by one gather so augmentation costs about as much as a copy of the batch.
    """
    b, c, h, w = x.shape
    p = int(padding)
    hp, wp = h + 2 * p, w + 2 * p
    padded = x.new_zeros((b, c, hp, wp))
    padded[:, :, p : p + h, p : p + w] = x
    oy = torch.randint(0, 2 * p + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * p + 1, (b,), generator=generator)
    flip = torch.randint(0, 2, (b,), generator=generator).bool()
    rows = oy[:, None] + torch.arange(h)  # (B, H) source row of each output row
    cols = ox[:, None] + torch.arange(w)  # (B, W) source column of each output column
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return torch.gather(padded.reshape(b, c, hp * wp), 2, index).reshape(b, c, h, w)


# --------------------------------------------------------------------------- seeds and orders


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (run seed, epoch, batch, stream tag)."""
    state = np.random.SeedSequence([int(p) % (1 << 63) for p in parts]).generate_state(2, dtype=np.uint64)
    return int(state[0]) & ((1 << 63) - 1)


def stratified_order(y: np.ndarray, random_state: int = SPLIT_RANDOM_STATE) -> np.ndarray:
    """A fixed permutation of positions 0..len(y)-1 whose every prefix is class-balanced.

    Each class is shuffled on its own, then the classes are interleaved by fractional rank, so the
    first N entries hold each class in proportion (within one example). Used for train_subset and
    as the fixed order of the training split (calibration batches then see every class).
    """
    y = np.asarray(y)
    rng = np.random.default_rng(random_state)
    positions, keys = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        positions.append(idx)
        keys.append((np.arange(len(idx)) + rng.random(len(idx))) / len(idx))
    if not positions:
        return np.zeros(0, dtype=np.int64)
    pos, key = np.concatenate(positions), np.concatenate(keys)
    return pos[np.argsort(key, kind="stable")].astype(np.int64)


def stratified_split(y: np.ndarray, n_holdout: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified split of positions into (kept, held out); n_holdout 0 holds nothing out."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    if n_holdout <= 0:
        return idx, np.zeros(0, dtype=np.int64)
    try:
        kept, held = train_test_split(idx, test_size=n_holdout, stratify=y, random_state=SPLIT_RANDOM_STATE)
    except ValueError as exc:
        raise ConfigError(f"cannot hold out {n_holdout} of {len(y)} examples for {what}: {exc}") from None
    return np.sort(kept), np.sort(held)


def channel_stats(x: torch.Tensor, pixel_max: int, chunk: int = 8192) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std of a uint8 (N, C, H, W) tensor in pixel/pixel_max units.

    Counts pixel values per channel (256 bins) instead of converting to float: exact and about ten
    times faster on CIFAR-sized splits, with no large temporary.
    """
    c = x.shape[1]
    counts = torch.zeros((c, 256), dtype=torch.int64)
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk]
        for ch in range(c):
            counts[ch] += torch.bincount(part[:, ch].reshape(-1), minlength=256)
    values = torch.arange(256, dtype=torch.float64) / pixel_max
    total = counts.sum(dim=1).clamp_min(1).to(torch.float64)
    mean = (counts * values).sum(dim=1) / total
    var = (counts * (values - mean[:, None]) ** 2).sum(dim=1) / total
    std = var.sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant channel must not divide by zero
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


# --------------------------------------------------------------------------- config helpers


def cfg_get(cfg: Any, name: str, default: Any = None) -> Any:
    """Attribute access with a default, so simple stand-ins (SimpleNamespace) may leave options out."""
    return getattr(cfg, name, default)


def check_common_cfg(cfg: Any) -> None:
    """Reject loader options that no dataset can honour, naming the value and what is allowed."""
    for key in ("batch_size", "eval_batch_size"):
        value = cfg_get(cfg, key, 1)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"data.{key}={value!r} is not allowed: it must be an integer >= 1")
    workers = cfg_get(cfg, "num_workers", 0)
    if not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"data.num_workers={workers!r} is not allowed: it must be an integer >= 0")
    vf = cfg_get(cfg, "val_fraction", 0.0)
    if not isinstance(vf, (int, float)) or not 0.0 <= float(vf) < 1.0:
        raise ConfigError(f"data.val_fraction={vf!r} is not allowed: it must be a number in [0, 1)")
    subset = cfg_get(cfg, "train_subset", None)
    if subset is not None and (not isinstance(subset, int) or subset < 1):
        raise ConfigError(f"data.train_subset={subset!r} is not allowed: it must be null or an integer >= 1")
    size = cfg_get(cfg, "image_size", None)
    if size is not None and (not isinstance(size, int) or size < 1):
        raise ConfigError(f"data.image_size={size!r} is not allowed: it must be null or an integer >= 1")


def default_cache_dir(cfg: Any) -> Path:
    """cfg.cache_dir, else $FQTBENCH_CACHE, else ~/.cache/fqtbench."""
    configured = cfg_get(cfg, "cache_dir", None) or os.environ.get("FQTBENCH_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "fqtbench"


# --------------------------------------------------------------------------- loaders


class _BatchRef(NamedTuple):
    """What the sampler hands the dataset: the sample indices of one batch, its augmentation seed,
    and under data parallelism this process's share (rank, world): samples rank, rank+world, ..."""

    indices: torch.Tensor
    aug_seed: int | None
    shard: tuple[int, int] | None = None


class _BatchSampler(Sampler):
    """Yields whole batches (_BatchRef) so the dataset cuts each batch with one index_select.

    Shuffling uses a torch.Generator seeded from (run seed, epoch); the augmentation seed of each
    batch is derived from (run seed, epoch, batch number), so batches are identical for a given seed
    whatever num_workers is. The epoch advances on every pass and Lightning's set_epoch overrides it.

    With ``shard=(rank, world)`` (data-parallel training) every process walks the same global
    batches and keeps its own share of each, so the global batch of a step is exactly the
    single-process batch: `batch_size` stays the global batch size.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, shuffle: bool = False,
                 augment: bool = False, drop_small_last: bool = False, limit: int | None = None,
                 shard: tuple[int, int] | None = None):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.shuffle, self.augment, self.limit = shuffle, augment, limit
        self.shard = shard if shard is not None and shard[1] > 1 else None
        self.epoch = 0
        full, rest = divmod(n, batch_size)
        # Drop a final batch smaller than half a batch (noisy, tiny gradient step), but never all batches.
        keep_rest = rest > 0 and (not drop_small_last or 2 * rest >= batch_size or full == 0)
        self.num_batches = full + int(keep_rest)
        if limit is not None:
            self.num_batches = min(self.num_batches, limit)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        if self.shuffle and not (self.num_batches == 1 and self.batch_size >= self.n):
            # (one batch holding the whole split has nothing to shuffle; its fixed order lets a
            # gradient-free search recognise the batch and reuse its work across steps)
            gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0))
            order = torch.randperm(self.n, generator=gen)
        else:
            order = torch.arange(self.n)
        for b in range(self.num_batches):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size].clone()  # own storage: cheap to send to workers
            yield _BatchRef(idx, mix_seed(self.seed, epoch, b, 1) if self.augment else None, self.shard)


class TensorDataset(Dataset):
    """An in-memory split that returns whole batches (x uint8, y int64) for a _BatchRef."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, augment: Augment | None = None):
        assert x.dtype == torch.uint8 and x.ndim == 4 and len(x) == len(y)
        self.x, self.y, self.augment = x, y.to(torch.int64), augment

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, ref: _BatchRef) -> tuple[torch.Tensor, torch.Tensor]:
        augmenting = ref.aug_seed is not None and self.augment is not None
        indices = ref.indices
        if ref.shard is not None and not augmenting:
            indices = indices[ref.shard[0] :: ref.shard[1]]
        x = self.x.index_select(0, indices)
        y = self.y.index_select(0, indices)
        if augmenting:  # augment the whole global batch, then cut the share: the same crops as one process
            x = self.augment(x, torch.Generator().manual_seed(ref.aug_seed))
            if ref.shard is not None:
                x, y = x[ref.shard[0] :: ref.shard[1]], y[ref.shard[0] :: ref.shard[1]]
        return x, y


def _identity(batch):
    """collate_fn: the dataset already returns a whole batch (module level so workers can pickle it)."""
    return batch


class FQTDataModule(pl.LightningDataModule):
    """In-memory uint8 splits with fast batched loaders; `info` is ready right after construction.

    - train_dataloader: shuffled per (seed, epoch), augmented if an augmentation is given; the last
      batch is dropped only when it is smaller than half a batch.
    - val_dataloader / test_dataloader: fixed order, eval_batch_size, no augmentation. Without a
      validation split (val_fraction 0) val_dataloader returns the test loader.
    - calib_dataloader(n): the first n training batches of the fixed (class-interleaved) training order.
    - train_eval_dataloader: the training split in fixed order at eval_batch_size, no augmentation.
    """

    def __init__(self, info: DataInfo, train: tuple[torch.Tensor, torch.Tensor],
                 val: tuple[torch.Tensor, torch.Tensor] | None, test: tuple[torch.Tensor, torch.Tensor], *,
                 seed: int, batch_size: int, eval_batch_size: int, num_workers: int = 0,
                 augment: Augment | None = None):
        super().__init__()
        self.info = info
        self.seed = int(seed)
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.train_set = TensorDataset(*train, augment=augment)
        self.train_plain = TensorDataset(*train)
        self.val_set = TensorDataset(*val) if val is not None and len(val[0]) > 0 else None
        self.test_set = TensorDataset(*test)

    def _loader(self, dataset: TensorDataset, sampler: _BatchSampler) -> DataLoader:
        return DataLoader(dataset, batch_size=None, sampler=sampler, collate_fn=_identity,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        sampler = _BatchSampler(len(self.train_set), self.batch_size, seed=self.seed, shuffle=True,
                                augment=self.train_set.augment is not None, drop_small_last=True,
                                shard=self._shard())
        return self._loader(self.train_set, sampler)

    def _shard(self) -> tuple[int, int] | None:
        """(rank, world size) of the Trainer this module is attached to, under data parallelism."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size <= 1:
            return None
        return int(trainer.global_rank), int(trainer.world_size)

    def _eval_loader(self, dataset: TensorDataset) -> DataLoader:
        return self._loader(dataset, _BatchSampler(len(dataset), self.eval_batch_size))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set if self.val_set is not None else self.test_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)

    def train_eval_dataloader(self) -> DataLoader:
        return self._eval_loader(self.train_plain)

    def calib_dataloader(self, num_batches: int) -> DataLoader:
        if not isinstance(num_batches, int) or num_batches < 1:
            raise ConfigError(f"calibration num_batches={num_batches!r} is not allowed: it must be an integer >= 1")
        sampler = _BatchSampler(len(self.train_plain), self.batch_size, limit=num_batches)
        return self._loader(self.train_plain, sampler)


# --------------------------------------------------------------------------- assembling splits


def assemble(cfg: Any, seed: int, *, name: str, classes: tuple[str, ...], pixel_max: int,
             train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
             n_val: int, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
             augment: Augment | None = None) -> FQTDataModule:
    """Hold out a fixed stratified val split of `n_val` from `train`, order/subset the rest, build the module.

    The remaining training split is stored in the fixed stratified order (seed-independent) and
    `train_subset` keeps its first N. Mean/std, when not given, come from the training split
    before subsetting, so they do not change with train_subset.
    """
    x, y = train
    y_np = y.numpy()
    kept, held = stratified_split(y_np, n_val, f"the validation split of {name} (data.val_fraction)")
    order = kept[stratified_order(y_np[kept])]
    if mean is None or std is None:
        mean, std = channel_stats(x[torch.from_numpy(kept)], pixel_max)
    subset = cfg_get(cfg, "train_subset", None)
    if subset is not None:
        if subset > len(order):
            raise ConfigError(f"data.train_subset={subset} is too large: {name} has {len(order)} training "
                              f"examples after the validation split; use at most {len(order)} or null")
        order = order[:subset]
    order_t, held_t = torch.from_numpy(order), torch.from_numpy(held)
    train_xy = (x.index_select(0, order_t).contiguous(), y.index_select(0, order_t).contiguous())
    val_xy = (x.index_select(0, held_t).contiguous(), y.index_select(0, held_t).contiguous()) if len(held) else None
    info = DataInfo(
        name=name, num_classes=len(classes), in_channels=int(x.shape[1]),
        image_size=(int(x.shape[2]), int(x.shape[3])), pixel_max=pixel_max,
        mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
        train_size=len(order), val_size=len(held), test_size=len(test[0]), classes=tuple(classes),
    )
    return FQTDataModule(
        info, train_xy, val_xy, test, seed=seed, batch_size=cfg_get(cfg, "batch_size", 128),
        eval_batch_size=cfg_get(cfg, "eval_batch_size", 256), num_workers=cfg_get(cfg, "num_workers", 0),
        augment=augment,
    )
