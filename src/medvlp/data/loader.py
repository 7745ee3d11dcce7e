"""From samples to :class:`~medvlp.data.sample.Batch` objects: dataset and collation.

The training order (which samples make each batch, on which rank) lives in
:mod:`medvlp.data.mixed`; this module reads images and collates. The collator applies
each sample's *kind* (paired / unpaired / labeled): what an unpaired or label-only
sample may not carry (its report, its labels) is withheld here, in one place, and the
per-sample flags of the batch say what is left.

A sample whose image cannot be read is skipped and reported in ``Batch.skipped``
(the training loop counts and lists them); a missing file is an error up front,
because it nearly always means a wrong dataset root.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from medvlp.data.sample import MISSING, Batch, Sample
from medvlp.data.shard_access import check_readable, image_ref
from medvlp.data.transforms import IMAGE_CACHE, Preprocess, augment, normalize
from medvlp.errors import DataError


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + index) % (2**63 - 1)


class ImageTextDataset(Dataset):
    """Returns ``(index, image tensor or None, error or None)`` for each sample.

    A key is a sample index, or ``(index, epoch)`` from a training stream: augmentation is
    seeded by (seed, epoch, index), so it differs between epochs and repeats on resume.
    """

    def __init__(self, samples: Sequence[Sample], pre: Preprocess, *, train: bool, augment: bool, seed: int = 0,
                 kinds: Sequence[str] | None = None):
        self.samples = list(samples)
        self.pre = pre
        self.train = train
        self.augment = augment and train
        self.seed = seed
        self.epoch = 0
        self.kinds = kinds  # aligned with samples; "report" samples get a zero image, never read

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]):
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        sample = self.samples[index]
        if self.kinds is not None and self.kinds[index] == "report":
            return index, torch.zeros(self.pre.in_chans, self.pre.image_size, self.pre.image_size), None
        try:
            x = IMAGE_CACHE.get(image_ref(sample), self.pre)  # a file or a shard member
        except DataError as exc:
            return index, None, str(exc)
        if self.augment:
            gen = torch.Generator().manual_seed(_sample_seed(self.seed, epoch, index))
            x = augment(x, gen)
        return index, normalize(x, self.pre), None


class Collator:
    """Stacks images, tokenises reports and encodes labels and per-sample flags.

    ``kinds`` (aligned with ``samples``; default all ``paired``) withholds what a sample's
    source may not carry: ``unpaired`` samples lose report and labels, ``labeled`` samples
    their report, ``report`` samples their image (``has_image`` False, a zero image);
    ``paired_labels="none"`` also drops the labels of paired samples (``"labeler"`` keeps them:
    :func:`medvlp.data.mixed.read_sources` set them from the reports).
    """

    def __init__(self, samples: Sequence[Sample], tokenizer, classes: Sequence[str], *, max_length: int,
                 sections: Sequence[str] = ("findings", "impression"), kinds: Sequence[str] | None = None,
                 paired_labels: str = "manifest"):
        self.samples = samples
        self.tokenizer = tokenizer
        self.classes = list(classes)
        self.max_length = max_length
        self.sections = tuple(sections)
        self.kinds = kinds
        self.paired_labels = paired_labels

    def _kind(self, index: int) -> str:
        return self.kinds[index] if self.kinds is not None else "paired"

    def __call__(self, items) -> Batch:
        from medvlp.data.tokenize import encode_texts

        kept = [(i, x) for i, x, err in items if x is not None]
        skipped = [err for _, x, err in items if x is None]
        if not kept:
            raise DataError("every image of a batch was unreadable:\n  " + "\n  ".join(skipped))
        samples = [self.samples[i] for i, _ in kept]
        kinds = [self._kind(i) for i, _ in kept]
        texts = [s.text(self.sections) if k in ("paired", "report") else "" for s, k in zip(samples, kinds)]
        enc = encode_texts(self.tokenizer, texts, self.max_length)
        no_labels = [MISSING] * len(self.classes)
        # "labeler": the labels were replaced by the report labeler's when the sources were read
        keep_labels = [k in ("labeled", "report") or (k == "paired" and self.paired_labels != "none") for k in kinds]
        has_image = torch.tensor([k != "report" for k in kinds])
        labels = torch.tensor([s.label_vector(self.classes) if keep else no_labels
                               for s, keep in zip(samples, keep_labels)], dtype=torch.long).reshape(len(samples), -1)
        has_text = torch.tensor([bool(t) for t in texts])
        return Batch(
            images=torch.stack([x for _, x in kept]),
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            word_ids=enc["word_ids"],
            labels=labels,
            has_text=has_text,
            has_labels=(labels != MISSING).any(dim=1),
            paired=has_text & has_image,
            has_image=None if bool(has_image.all()) else has_image,
            ids=[s.id for s in samples],
            subject_ids=[s.subject_id for s in samples],
            texts=texts,
            skipped=skipped,
        )


def check_images_exist(samples: Sequence[Sample], limit: int = 5) -> None:
    """Stop when an image file or shard member is missing (see :func:`medvlp.data.shard_access.check_readable`)."""
    check_readable(samples, limit)


def make_loader(samples: Sequence[Sample], cfg, tokenizer, classes: Sequence[str], *, train: bool = False,
                batch_size: int | None = None) -> DataLoader:
    """A plain in-order loader (evaluation); no augmentation, no dropped samples."""
    check_images_exist(samples)
    IMAGE_CACHE.configure(cfg.data.image_cache_mb)
    pre = Preprocess.from_config(cfg)
    ds = ImageTextDataset(samples, pre, train=train, augment=cfg.data.augment, seed=cfg.train.seed)
    collate = Collator(samples, tokenizer, classes, max_length=cfg.model.text.max_length, sections=cfg.data.sections)
    return DataLoader(ds, batch_size=batch_size or cfg.data.batch_size, shuffle=False, collate_fn=collate,
                      num_workers=cfg.data.num_workers)
