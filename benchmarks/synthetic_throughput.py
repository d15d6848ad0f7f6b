"""Throughput of the synthetic generator: images per second, rendering alone and with files.

    python benchmarks/synthetic_throughput.py [--n 400] [--size 256] [--workers 1 2]

Target (issue): at least 50 images/s on 2 cores at 256 px, file writing included.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from medunic_core.config import SiteConfig, SynthConfig
from medunic_core.data.synthetic import PROFILES, generate, render_image, sample_findings, write_report


def _render_only(job: tuple[int, int]) -> float:
    """Findings, film and report of one record, nothing written (what files add is the rest)."""
    index, size = job
    r_find, r_img, r_report = np.random.default_rng([0, index]).spawn(3)
    profile = PROFILES["default" if index % 2 else "portable"]
    findings = sample_findings(profile, r_find)
    img = render_image(findings, profile, r_img, size)
    write_report(findings, "en" if index % 2 else "es", r_report)
    return float(img[0, 0])


def _time_render(n: int, size: int, workers: int) -> float:
    jobs = [(i, size) for i in range(n)]
    start = time.perf_counter()
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_render_only, jobs, chunksize=max(1, n // (4 * workers))))
    else:
        for job in jobs:
            _render_only(job)
    return time.perf_counter() - start


def _time_generate(n: int, size: int, workers: int, dicom_fraction: float) -> float:
    cfg = SynthConfig(
        image_size=size,
        dicom_fraction=dicom_fraction,
        sites=[SiteConfig("en-1", "en", n // 2, "default"), SiteConfig("es-1", "es", n - n // 2, "portable")],
    )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        generate(cfg, Path(tmp), progress=False, workers=workers)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400, help="images per measurement")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="process counts to measure")
    args = parser.parse_args()

    print(f"{'mode':<16}{'workers':>8}{'images':>8}{'seconds':>9}{'images/s':>10}")
    for workers in args.workers:
        rows = [
            ("render", _time_render(args.n, args.size, workers)),
            ("render+PNG", _time_generate(args.n, args.size, workers, dicom_fraction=0.0)),
            ("render+DICOM", _time_generate(args.n, args.size, workers, dicom_fraction=1.0)),
        ]
        for mode, seconds in rows:
            print(f"{mode:<16}{workers:>8}{args.n:>8}{seconds:>9.2f}{args.n / seconds:>10.1f}")


if __name__ == "__main__":
    main()
