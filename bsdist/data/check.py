"""`python launch.py CONFIG --check-data [--decode]`: what the data of a config holds, and what is wrong.

Per split: images, classes, largest and smallest class, imbalance factor, and (for training) the many /
medium / few class counts; then every problem: lines that are not `path label`, labels out of range,
duplicate lines, missing files (named up to MAX_NAMED, then counted), classes absent from a split, a
preset's profile that differs. `--decode` opens every image in parallel, with a progress line, and
names each one that cannot be decoded: refused by its header (more pixels than DATASET.max_image_pixels,
a scan too short for them; no decoding is started) or by the decoder, libjpeg's corrupt-data warnings
included. Images are decoded as evaluation decodes them (reduced in the DCT where that allows). Exit
status 0 when all is well, 1 otherwise: the output is what a bug report needs.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from bsdist.config.schema import is_file_list
from bsdist.data import imagelist
from bsdist.data.build import load_splits
from bsdist.data.imagefiles import HeaderRefused, ImageFiles, decoder_message
from bsdist.metrics import shot_groups

if TYPE_CHECKING:
    from bsdist.config import Config

MAX_NAMED = 20
PROGRESS_EVERY_S = 30


def _stats(labels: np.ndarray, num_classes: int) -> str:
    counts = np.bincount(labels, minlength=num_classes)
    present = counts[counts > 0]
    if not len(present):
        return "0 images"
    return (f"{len(labels):,} images, {len(present)} classes, largest {present.max():,}, smallest {present.min():,}, "
            f"imbalance factor {present.max() / present.min():.4g}")


def _problem(path: str, files: ImageFiles) -> str | None:
    """None, or why the image cannot be used: its header's claim, or the decoder's reason in its own words."""
    from torchvision.io import read_file
    try:
        files.pixels(read_file(path), 0, 0)
        return None
    except HeaderRefused as e:
        return f"{path}: {e}"
    except Exception as e:  # corrupt, truncated, not an image
        return f"cannot decode {path}: {decoder_message(e)}"


def check_data(cfg: Config, decode: bool = False, stream=None) -> int:
    """Print the report (to stdout unless a stream is given); return the exit status (0: no problem)."""
    dataset = cfg.DATASET
    say = lambda line: print(line, file=stream or sys.stdout, flush=True)  # noqa: E731
    if not is_file_list(dataset.name):
        loaded = load_splits(cfg)
        say(f"{dataset.name} in {dataset.datadir}: {loaded.num_classes} classes, held in memory "
            f"({dataset.imbalance_type or 'balanced'} profile, factor {dataset.imbalance_factor:g})")
        for split, images in {"train": loaded.train, **loaded.eval}.items():
            say(f"{split}: {_stats(images.targets, loaded.num_classes)}")
        say("problems: none")
        return 0
    splits, num_classes, names = imagelist.listings(dataset)
    sources = ", ".join(f"{split} {listing.source}" for split, listing in splits.items())
    say(f"{dataset.name} in {dataset.datadir}: {num_classes} classes ({sources})")
    problems = [p for listing in splits.values() for p in listing.problems]
    problems += imagelist.profile_problems(dataset, splits)
    for split, listing in splits.items():
        line = f"{split}: {_stats(listing.labels, num_classes)}"
        if split == "train" and len(listing.labels):
            groups = shot_groups(np.bincount(listing.labels, minlength=num_classes).tolist())
            line += (f"; many / medium / few-shot classes: {len(groups['many'])} / {len(groups['medium'])} / "
                     f"{len(groups['few'])}")
        say(line)
        absent = sorted(set(range(num_classes)) - set(listing.labels.tolist()))
        if absent and listing.paths:
            problems.append(f"{split}: {len(absent)} of {num_classes} classes have no image "
                            f"(e.g. {', '.join(map(str, absent[:5]))})")
    paths = [os.path.join(dataset.datadir, p) for listing in splits.values() for p in listing.paths]
    with ThreadPoolExecutor(16) as pool:
        exists = list(pool.map(os.path.isfile, paths, chunksize=256))
    missing = [p for p, ok in zip(paths, exists) if not ok]
    problems += [f"missing file {p}" for p in missing[:MAX_NAMED]]
    if len(missing) > MAX_NAMED:
        problems.append(f"... and {len(missing) - MAX_NAMED:,} more missing files ({len(missing):,} in all)")
    if decode:
        # an evaluation set's decoder: the header checks and reductions of training, no crop draw
        files = ImageFiles(dataset.datadir, [], np.zeros(0), dataset.image_size, random_crop=False, seed=0,
                           max_pixels=dataset.max_image_pixels)
        problems += _decode_all([p for p, ok in zip(paths, exists) if ok], files)
    if not problems:
        say("problems: none")
        return 0
    say(f"problems: {len(problems)}")
    for problem in problems:
        say(f"  {problem}")
    return 1


def _decode_all(paths: list[str], files: ImageFiles) -> list[str]:
    """Decode every image on all CPU cores, with a progress line on stderr; one problem per bad image. The line
    is rewritten in place on a terminal, and written whole every PROGRESS_EVERY_S seconds to a file or a pipe."""
    import multiprocessing
    terminal = sys.stderr.isatty()
    bad, started = [], time.perf_counter()
    last = started  # the first line after a while: a short check writes only its last
    workers = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for done, problem in enumerate(pool.imap(functools.partial(_problem, files=files), paths, chunksize=64), 1):
            if problem:
                bad.append(problem)
            now = time.perf_counter()
            if now - last > (1 if terminal else PROGRESS_EVERY_S) or done == len(paths):
                last = now
                line = (f"decoded {done:,} / {len(paths):,} images ({done / max(now - started, 1e-9):,.0f}/s), "
                        f"{len(bad)} bad")
                end = "\n" if not terminal or done == len(paths) else ""
                print(("\r" if terminal else "") + line, end=end, file=sys.stderr, flush=True)
    return bad
