"""Training order and augmentation randomness as pure functions of (seed, epoch, image).

Exact resume and reproduction need every random choice of the data pipeline to be recomputable:

- the shuffled order of epoch ``e`` comes from a generator seeded with (seed, e), not from a
  generator whose state drifts with how many epochs ran in this process;
- each image's augmentation is seeded with (seed, e, image index), so it does not depend on
  which data-loader worker decodes it, how many workers there are, what was prefetched, or
  where a resumed run picked the epoch up. Albumentations 2.x keeps its own random state
  (``Compose(seed=...)``), independent of NumPy's and Python's global ones, so without this
  two runs with the same seed differ from their first batch.

`SeededSampler` yields ``(index, sample_seed)`` pairs and is stateful (``state_dict`` /
``load_state_dict``), so torchdata's `StatefulDataLoader` restores it mid-epoch without replaying
the epoch; `DetectionDataset.__getitem__` takes such a pair.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DistributedSampler


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, well mixed (NumPy's SeedSequence), the same on every machine."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(
        2, dtype=np.uint32
    )
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF


def fresh_seed() -> int:
    """For ``seed=null``: a random base seed (kept in the sampler state, so a resume reuses it)."""
    return random.SystemRandom().randrange(2**62)


#: Tag mixed into the seeds, so the order and the augmentation streams never coincide.
_ORDER, _AUGMENT = 0x0D, 0xA6


class SeededSampler(DistributedSampler):
    """Indices of a dataset of ``size`` items, shuffled per epoch from (seed, epoch) when
    ``shuffle``, each paired with its augmentation seed.

    Under DDP, process ``rank`` of ``num_replicas`` takes every num_replicas-th index of the
    epoch's order (padded to a multiple, as `DistributedSampler` does), and an image's
    augmentation is the same whatever the number of processes. It is a `DistributedSampler`
    so that Lightning uses it as it is, instead of wrapping it.

    Lightning calls `set_epoch` before each epoch. The state (seed, epoch, how many indices of
    the epoch were handed out) goes into every checkpoint through `StatefulDataLoader`."""

    def __init__(
        self,
        size: int,
        seed: int | None,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(
            range(size), num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False
        )
        self.size = int(size)
        self.seed = fresh_seed() if seed is None else int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self.per_replica = math.ceil(self.size / self.num_replicas) if self.size else 0
        self.yielded = 0  # indices of the current epoch handed out so far (by this process)
        self._resume_at: int | None = None

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self._resume_at = None  # a restored position belongs to the restored epoch only
        self.epoch = int(epoch)

    def order(self, epoch: int) -> list[int]:
        """The whole epoch's order (all processes)."""
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(derive_seed(self.seed, _ORDER, epoch))
        return torch.randperm(self.size, generator=g).tolist()

    def indices(self, epoch: int) -> list[int]:
        """This process's share of the epoch's order."""
        order = self.order(epoch)
        total = self.per_replica * self.num_replicas
        while order and len(order) < total:
            order += order[: total - len(order)]
        return order[self.rank : total : self.num_replicas]

    def sample_seed(self, epoch: int, index: int) -> int:
        return derive_seed(self.seed, _AUGMENT, epoch, index)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start, self._resume_at = (self._resume_at or 0), None
        epoch = self.epoch
        indices = self.indices(epoch)
        self.yielded = start
        for index in indices[start:]:
            self.yielded += 1
            yield index, self.sample_seed(epoch, index)

    def __len__(self) -> int:
        return self.per_replica

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.yielded = int(state["yielded"])
        self._resume_at = self.yielded if self.yielded < self.per_replica else None
