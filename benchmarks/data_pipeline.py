"""Data-pipeline throughput: decoding + preprocessing versus reading the on-disk cache.

Generates a synthetic EN+ES set (PNG and DICOM) in a temporary folder, then times:
- decode: read_image + Med-UniC preprocessing (what an uncached epoch pays);
- cache miss: the same through ImageCache, which also writes the .npy entry;
- cache hit: ImageCache.get on a warm cache (every later epoch and every Flower message);
- training item: cache hit + the weak and strong views, one image at a time, and as the
  training loader makes them (the per-image draw and crops, then warp, autocontrast and
  normalisation once per batch of ``train.batch_size``).

    python benchmarks/data_pipeline.py [--images 200] [--size 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from medunic_core.config import load_config
from medunic_core.data.manifest import read_manifest
from medunic_core.data.preprocess import ImageCache, preprocess_image
from medunic_core.data.readers import read_image
from medunic_core.data.synthetic.generator import generate
from medunic_core.data.transforms import TwoViewTransform


def timed(fn, items) -> float:
    t0 = time.perf_counter()
    for i, item in enumerate(items):
        fn(i, item)
    return len(items) / (time.perf_counter() - t0)


def timed_batches(views: TwoViewTransform, cache: ImageCache, paths: list, batch_size: int) -> float:
    t0 = time.perf_counter()
    for start in range(0, len(paths), batch_size):
        drawn = [views.draw(cache.get(p), torch.Generator().manual_seed(start + i))
                 for i, p in enumerate(paths[start : start + batch_size])]
        views.finish({key: torch.stack([d[key] for d in drawn]) for key in drawn[0]})
    return len(paths) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=256, help="side of the generated images")
    parser.add_argument("--preset", default="tiny")
    args = parser.parse_args()
    cfg = load_config(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        half = args.images // 2
        sites = f"[{{name: en-1, lang: en, n: {half}}}, {{name: es-1, lang: es, n: {half}, profile: portable}}]"
        synth = load_config(args.preset, [f"synth.sites={sites}", f"synth.image_size={args.size}"]).synth
        manifest = generate(synth, Path(tmp) / "data", progress=False)
        paths = [r.image_path for r in read_manifest(manifest)]
        cache = ImageCache(Path(tmp) / "cache", cfg.model.image.cache_size)
        views = TwoViewTransform(cfg.model.image.size, cfg.model.image.mean, cfg.model.image.std)
        rows = [
            ("decode + preprocess", timed(lambda i, p: preprocess_image(read_image(p)[0], cache.cache_size), paths)),
            ("cache miss (decode + write)", timed(lambda i, p: cache.get(p), paths)),
            ("cache hit", timed(lambda i, p: cache.get(p), paths)),
            ("cache hit + two views, one image at a time",
             timed(lambda i, p: views(cache.get(p), torch.Generator().manual_seed(i)), paths)),
            (f"cache hit + two views, batches of {cfg.train.batch_size} (training)",
             timed_batches(views, cache, paths, cfg.train.batch_size)),
        ]
    base = rows[0][1]
    print(f"{len(paths)} images ({args.size} px source, {cfg.model.image.cache_size} px cache, "
          f"{cfg.model.image.size} px views), one process")
    print("\n| stage | images/s | vs decoding |\n|---|---:|---:|")
    for name, rate in rows:
        print(f"| {name} | {rate:.0f} | {rate / base:.1f}x |")


if __name__ == "__main__":
    main()
