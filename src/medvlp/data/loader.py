"""From samples to :class:`~medvlp.data.sample.Batch` objects: dataset, order, collation.

Training order is a pure function of (seed, epoch): each epoch is a seeded permutation
cut into full batches (the last partial batch is dropped), split across ranks so each
sample of an epoch goes to exactly one rank. A run resumed at (epoch, batch) therefore
sees exactly the batches the uninterrupted run would have seen.

A sample whose image cannot be read is skipped and reported in ``Batch.skipped``
(the training loop counts and lists them); a missing file is an error up front,
because it nearly always means a wrong dataset root.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from medvlp.data.sample import MISSING, Batch, Sample
from medvlp.data.transforms import Preprocess, augment, load_image, normalize, to_tensor
from medvlp.errors import DataError


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + index) % (2**63 - 1)


class ImageTextDataset(Dataset):
    """Returns ``(index, image tensor or None, error or None)`` for each sample."""

    def __init__(self, samples: Sequence[Sample], pre: Preprocess, *, train: bool, augment: bool, seed: int = 0):
        self.samples = list(samples)
        self.pre = pre
        self.train = train
        self.augment = augment and train
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        try:
            x = to_tensor(load_image(sample.image), self.pre)
        except DataError as exc:
            return index, None, str(exc)
        if self.augment:
            gen = torch.Generator().manual_seed(_sample_seed(self.seed, self.epoch, index))
            x = augment(x, gen)
        return index, normalize(x, self.pre), None


class Collator:
    """Stacks images, tokenises reports and encodes labels and per-sample flags."""

    def __init__(self, samples: Sequence[Sample], tokenizer, classes: Sequence[str], *, max_length: int,
                 sections: Sequence[str] = ("findings", "impression")):
        self.samples = samples
        self.tokenizer = tokenizer
        self.classes = list(classes)
        self.max_length = max_length
        self.sections = tuple(sections)

    def __call__(self, items) -> Batch:
        from medvlp.data.tokenize import encode_texts

        kept = [(i, x) for i, x, err in items if x is not None]
        skipped = [err for _, x, err in items if x is None]
        if not kept:
            raise DataError("every image of a batch was unreadable:\n  " + "\n  ".join(skipped))
        samples = [self.samples[i] for i, _ in kept]
        texts = [s.text(self.sections) for s in samples]
        enc = encode_texts(self.tokenizer, texts, self.max_length)
        labels = torch.tensor([s.label_vector(self.classes) for s in samples], dtype=torch.long).reshape(len(samples), -1)
        has_text = torch.tensor([bool(t) for t in texts])
        batch = Batch(
            images=torch.stack([x for _, x in kept]),
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            word_ids=enc["word_ids"],
            labels=labels,
            has_text=has_text,
            has_labels=(labels != MISSING).any(dim=1),
            paired=has_text.clone(),
            ids=[s.id for s in samples],
            subject_ids=[s.subject_id for s in samples],
            texts=texts,
            skipped=skipped,
        )
        return batch


def check_images_exist(samples: Sequence[Sample], limit: int = 5) -> None:
    missing = [s.image for s in samples if not s.image or not os.path.isfile(s.image)]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(samples)} image files are missing, e.g. {', '.join(map(str, missing[:limit]))}. "
            "Check data.manifest points at the folder that holds the images (paths are relative to the manifest)."
        )


def epoch_batches(n: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """This rank's batches of one epoch: a seeded permutation cut into global batches of
    ``batch_size * world`` samples (last partial batch dropped), each split across ranks."""
    global_bs = batch_size * world
    if n < global_bs:
        raise DataError(
            f"the training split has {n} samples, fewer than one global batch ({batch_size} x {world} ranks); "
            "lower data.batch_size or add data"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(_sample_seed(seed, epoch, 0))).tolist()
    n_batches = n // global_bs
    return [perm[b * global_bs + rank * batch_size : b * global_bs + (rank + 1) * batch_size] for b in range(n_batches)]


@dataclass
class StreamPosition:
    epoch: int = 0
    batch: int = 0  # index of the next batch within the epoch


class TrainStream:
    """Endless, resumable stream of training batches."""

    def __init__(self, dataset: ImageTextDataset, collate: Collator, batch_size: int, *, seed: int, num_workers: int = 0,
                 rank: int = 0, world: int = 1, position: Optional[StreamPosition] = None):
        self.dataset, self.collate = dataset, collate
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.rank, self.world = rank, world
        self.position = position or StreamPosition()
        self.batches_per_epoch = len(epoch_batches(len(dataset), batch_size, seed=seed, epoch=0, rank=rank, world=world))

    def __iter__(self) -> Iterator[Batch]:
        while True:
            pos = self.position
            self.dataset.epoch = pos.epoch
            batches = epoch_batches(len(self.dataset), self.batch_size, seed=self.seed, epoch=pos.epoch,
                                    rank=self.rank, world=self.world)[pos.batch:]
            loader = DataLoader(self.dataset, batch_sampler=batches, collate_fn=self.collate,
                                num_workers=self.num_workers, persistent_workers=False)
            for batch in loader:
                pos.batch += 1
                yield batch
            self.position = StreamPosition(pos.epoch + 1, 0)


def make_loader(samples: Sequence[Sample], cfg, tokenizer, classes: Sequence[str], *, train: bool = False,
                batch_size: Optional[int] = None) -> DataLoader:
    """A plain in-order loader (evaluation); no augmentation, no dropped samples."""
    check_images_exist(samples)
    pre = Preprocess.from_config(cfg)
    ds = ImageTextDataset(samples, pre, train=train, augment=cfg.data.augment, seed=cfg.train.seed)
    collate = Collator(samples, tokenizer, classes, max_length=cfg.model.text.max_length, sections=cfg.data.sections)
    return DataLoader(ds, batch_size=batch_size or cfg.data.batch_size, shuffle=False, collate_fn=collate,
                      num_workers=cfg.data.num_workers)
