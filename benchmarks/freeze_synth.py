"""Freeze SynthCXR presets: record generator version, seed and manifest hash in
``src/medvlp/data/synth/frozen.json``.

Run once when a preset's definition or the generator changes on purpose (after bumping
``GENERATOR_VERSION``); a frozen name (``standard-v1``) is never redefined: a new generator
version gets a new name (``standard-v2``). ``medvlp synth --preset NAME`` then labels its
output with the frozen name only if the manifest hash matches.

    python benchmarks/freeze_synth.py --presets small standard
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from medvlp.data.manifest import read_info
from medvlp.data.synth import generator as G

FROZEN = Path(G.__file__).with_name("frozen.json")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["small", "standard"], choices=sorted(G.PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args(argv)
    frozen = json.loads(FROZEN.read_text()) if FROZEN.is_file() else {}
    for preset in args.presets:
        taken = [int(k.rsplit("-v", 1)[1]) for k, v in frozen.items() if v["preset"] == preset]
        same = [k for k, v in frozen.items() if v["preset"] == preset and v["generator_version"] == G.GENERATOR_VERSION
                and v["seed"] == args.seed]
        if same:
            print(f"{same[0]} already frozen for generator {G.GENERATOR_VERSION}; bump the version to freeze anew")
            continue
        name = f"{preset}-v{max(taken, default=0) + 1}"
        with tempfile.TemporaryDirectory() as tmp:
            G.generate(tmp, preset=preset, seed=args.seed, workers=args.workers)
            info = read_info(tmp)
        p = G.PRESETS[preset]
        frozen[name] = {"preset": preset, "seed": args.seed, "generator_version": G.GENERATOR_VERSION,
                        "manifest_sha256": info["manifest_sha256"], "images": sum(info["split_counts"].values()),
                        "subjects": p.subjects, "image_size": p.image_size, "split_counts": info["split_counts"]}
        print(f"froze {name}: {info['manifest_sha256']}")
    FROZEN.write_text(json.dumps(frozen, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
