"""A device-resident loader: the whole split lives on the training device as uint8 NCHW.

Each batch is gathered by index, augmented as a batch (one callable, per-sample random, on the device),
converted to float and normalised on the device. No DataLoader workers, no per-image Python.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from .datasets import Split

BatchAugment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # uint8 NCHW -> uint8 NCHW


class DeviceLoader:
    """Iterate ``(images float NCHW normalised, labels)`` batches of a split held on ``device``.

    ``augment(images_uint8, generator)`` runs once per batch (e.g. PBA policy + crop/flip/cutout);
    it may be swapped between epochs (``loader.augment = ...``). The shuffling and augmentation
    randomness comes from one ``torch.Generator`` on the device, saved in :meth:`state_dict`.
    """

    def __init__(self, split: Split, batch_size: int, mean, std, device: str | torch.device = "cpu",
                 shuffle: bool = True, drop_last: bool = False, augment: BatchAugment | None = None,
                 seed: int = 0, channels_last: bool = False):
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.channels_last = channels_last
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        # (x/255 - mean)/std  ==  x * scale + shift
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -mean_t / std_t

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() * self._scale + self._shift
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.num_samples
        if self.shuffle:
            order = torch.randperm(n, device=self.device, generator=self.generator)
        else:
            order = torch.arange(n, device=self.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.images.index_select(0, idx)
            if self.augment is not None:
                x = self.augment(x, self.generator)
            yield self.normalize(x), self.labels.index_select(0, idx)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
