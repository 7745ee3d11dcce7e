"""A datasheet for a generated SynthCXR dataset: statistics, co-occurrence, contact sheet.

``write_datasheet(dataset, out)`` reads a dataset folder and writes ``datasheet.md`` (class
frequencies per split, co-occurrence of findings, report length and vocabulary statistics,
VQA answer balance) plus ``contact_sheet.png`` (example images with their templated
reports and finding boxes) and returns the statistics as a dict. Only templated text is
shown: real (IU) reports are never copied into a datasheet.
"""
from __future__ import annotations

import re
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np

from medvlp.data.manifest import read_info, read_manifest
from medvlp.data.sample import POSITIVE, Sample

_WORD = re.compile(r"[a-z]+")


def statistics(samples: list[Sample], classes: list[str]) -> dict:
    splits = sorted({s.split for s in samples})
    freq = {sp: {c: 0 for c in classes} for sp in splits}
    n_split = Counter(s.split for s in samples)
    co = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for s in samples:
        pos = np.array([s.labels.get(c) == POSITIVE for c in classes])
        co += np.outer(pos, pos)
        for c, p in zip(classes, pos):
            freq[s.split][c] += int(p)
    reported = [s for s in samples if s.has_text and s.meta.get("report_source", "template") == "template"]
    lengths = np.array([len(_WORD.findall(s.text().lower())) for s in reported]) if reported else np.zeros(1)
    vocab: Counter = Counter(w for s in reported for w in _WORD.findall(s.text().lower()))
    vqa = Counter((q["type"], q["answer"]) for s in samples for q in s.meta.get("vqa", []))
    findings_per_image = Counter(len(s.meta.get("findings", [])) for s in samples)
    return {
        "images": len(samples), "subjects": len({s.subject_id for s in samples}),
        "split_images": dict(n_split), "class_positive": freq, "co_occurrence": co.tolist(),
        "findings_per_image": {str(k): v for k, v in sorted(findings_per_image.items())},
        "report_words": {"mean": float(lengths.mean()), "median": float(np.median(lengths)),
                         "p5": float(np.percentile(lengths, 5)), "p95": float(np.percentile(lengths, 95))},
        "vocabulary": {"size": len(vocab), "top": vocab.most_common(25)},
        "vqa_answers": {f"{t}:{a}": n for (t, a), n in sorted(vqa.items())},
        "unique_reports": len({s.text() for s in reported}), "reports": len(reported),
    }


def contact_sheet(samples: list[Sample], path: Path, *, n: int = 12, seed: int = 0) -> None:
    """A grid of example images (test split first, varied findings) with reports and boxes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from PIL import Image

    rng = np.random.default_rng(seed)
    pool = [s for s in samples if s.has_text and s.meta.get("report_source", "template") == "template"]
    by_count: dict[int, list[Sample]] = {}
    for s in pool:
        by_count.setdefault(min(len(s.meta.get("findings", [])), 3), []).append(s)
    picks: list[Sample] = []
    while len(picks) < min(n, len(pool)):
        for k in sorted(by_count):
            if by_count[k] and len(picks) < n:
                picks.append(by_count[k].pop(int(rng.integers(len(by_count[k])))))
    cols = 4
    rows = (len(picks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 4.2, rows * 6.0), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, s in zip(axes.ravel(), picks):
        img = np.asarray(Image.open(s.image))
        ax.imshow(img, cmap="gray", vmin=0, vmax=255)
        for f in s.meta.get("findings", []):
            if "bbox" in f:
                x0, y0, x1, y1 = f["bbox"]
                ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color="tab:orange", lw=1))
        names = ", ".join(f["name"] for f in s.meta.get("findings", [])) or "No Finding"
        caption = textwrap.fill(s.text(), 58)
        ax.set_title(f"{s.study_id} ({s.view}): {names}", fontsize=7)
        ax.text(0, 1.0, caption, transform=ax.transAxes, fontsize=5.5, va="top", ha="left",
                position=(0.0, -0.02), wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_datasheet(dataset: str | Path, out: str | Path, *, examples: int = 12) -> dict:
    dataset, out = Path(dataset), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = read_info(dataset)
    classes = list(info["classes"])
    samples = read_manifest(dataset)
    stats = statistics(samples, classes)
    contact_sheet(samples, out / "contact_sheet.png", n=examples)
    splits = sorted(stats["split_images"])
    lines = [f"# SynthCXR datasheet: {info.get('benchmark') or info.get('preset') or 'custom'} "
             f"(generator {info['version']}, manifest {info['manifest_sha256'][:12]})", "",
             f"{stats['images']} images of {stats['subjects']} subjects, {info['image_size']} px, seed {info['seed']}.", "",
             "## Positive images per class and split", "",
             "| class | " + " | ".join(f"{sp} (n={stats['split_images'][sp]})" for sp in splits) + " | all % |",
             "|---" * (len(splits) + 2) + "|"]
    for c in classes:
        total = sum(stats["class_positive"][sp][c] for sp in splits)
        lines.append(f"| {c} | " + " | ".join(str(stats["class_positive"][sp][c]) for sp in splits)
                     + f" | {100 * total / stats['images']:.1f} |")
    lines += ["", "## Co-occurrence (images positive for both)", "",
              "| | " + " | ".join(c[:10] for c in classes[1:]) + " |", "|---" * len(classes) + "|"]
    co = stats["co_occurrence"]
    for i, c in enumerate(classes[1:], start=1):
        lines.append(f"| {c} | " + " | ".join(str(co[i][j]) for j in range(1, len(classes))) + " |")
    fpi = ", ".join(f"{k}: {v}" for k, v in stats["findings_per_image"].items())
    rw = stats["report_words"]
    lines += ["", f"Findings per image: {fpi}.", "",
              "## Reports (templated)", "",
              f"{stats['reports']} reports, {stats['unique_reports']} distinct; words per report: mean {rw['mean']:.1f}, "
              f"median {rw['median']:.0f}, 5-95 % {rw['p5']:.0f}-{rw['p95']:.0f}; vocabulary {stats['vocabulary']['size']} "
              "words. Most frequent: " + ", ".join(f"{w} ({n})" for w, n in stats["vocabulary"]["top"][:15]) + ".", "",
              "## VQA answers", "",
              ", ".join(f"{k} {v}" for k, v in stats["vqa_answers"].items()) + ".", "",
              "![contact sheet](contact_sheet.png)", ""]
    (out / "datasheet.md").write_text("\n".join(lines))
    return stats


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Write a SynthCXR datasheet (markdown + contact sheet PNG).")
    ap.add_argument("dataset", help="a generated SynthCXR folder")
    ap.add_argument("out", help="output folder for datasheet.md and contact_sheet.png")
    ap.add_argument("--examples", type=int, default=12)
    args = ap.parse_args()
    write_datasheet(args.dataset, args.out, examples=args.examples)
    print(f"wrote {Path(args.out) / 'datasheet.md'}")
