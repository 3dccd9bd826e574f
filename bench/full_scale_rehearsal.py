"""The flagship presets at the benchmarks' real image counts on 2 gloo ranks (CPU), with tiny compute: what each
stage costs and which rank does the work.

    python bench/full_scale_rehearsal.py                      # both jobs; the fake datasets are made once
    python bench/full_scale_rehearsal.py --jobs isc_irgen --repo /path/to/other/checkout   # e.g. an older commit

Data: fake copies of In-shop (52,712 images of 7,982 items: 25,882 train, 14,218 query, 12,612 gallery) and
Stanford Online Products (59,551 train images of 11,318 classes, 60,502 test images of 11,316), in the official
layouts, under ``--cache`` (default ``data/rehearsal``). Every record is a hard link to one of 512 photo-like
JPEG templates (In-shop 256x256 as in the official low-resolution archive, SOP 500x375), so the copies take
~20 MB of disk (templates and annotation files) and minutes to make, yet every image is really decoded.

Jobs: ``experiment=isc_irgen`` (tokenizer + generator, the preset's 4 x 256 codes, beam 30, K = 1/10/20/30,
closed-set with validation) and ``experiment=sop_areir`` (E=48 members; M=12 here to keep the all-vs-all test
search to a minute on 2 cores -- the memory of E x M = 24,000 is `bench/ddp_eval_memory.py`'s), both with
``trainer=ddp_cpu``, the embedded benchmark's small CNN at 32 px and 4 training steps per epoch, one epoch per
stage. The real code paths run at the real counts: sharded identifier and codebook passes, gathers, k-means,
trie, beam search, evaluation.

Output: per rank and stage -- the interval from the event named in the row to the next event of that rank
(`bench/rehearsal_probe.py`: Lightning hooks and irlab's log lines; e.g. "codebook fit: rank ..." covers the
sharded feature pass and the k-means on rank 0, "val: ranking ..." the search on rank 0): wall seconds, CPU
seconds, peak resident memory; ``wait`` flags a stage where a rank waited (wall - CPU) longer than the busiest
rank worked (CPU). Written to ``bench/results/rehearsal-<date>.md`` and printed.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere without installing

from bench.data_loading import photo_like  # noqa: E402  the same photo-like JPEG content as the loading bench

TEMPLATES = 512
INSHOP_TOP = "In-shop Clothes Retrieval Benchmark"
SOP_TOP = "Stanford_Online_Products"
SOP_CATEGORIES = ["bicycle", "cabinet", "chair", "coffee_maker", "fan", "kettle", "lamp", "mug", "sofa",
                  "stapler", "table", "toaster"]


def templates(folder: Path, size: tuple[int, int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(TEMPLATES):
        path = folder / f"{i:04d}.jpg"
        if not path.exists():
            photo_like(size, i).save(path, quality=90)
        paths.append(path)
    return paths


def link(template: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        os.link(template, target)


def split_counts(total: int, groups: int, rng: np.random.Generator, minimum: int) -> np.ndarray:
    """`groups` sizes >= minimum summing to `total` (a multinomial on top of the minimum)."""
    extra = rng.multinomial(total - minimum * groups, np.full(groups, 1 / groups))
    return extra + minimum


def scaled(count: int, scale: float) -> int:
    return max(1, round(count * scale))


def make_inshop(root: Path, scale: float = 1.0) -> Path:
    base = root / INSHOP_TOP
    done = base / "Eval" / "list_eval_partition.txt"
    if done.exists():
        return root
    rng = np.random.default_rng(0)
    tpl = templates(root / "_templates", (256, 256))
    partition, boxes, index = [], [], 0
    train = split_counts(scaled(25_882, scale), scaled(3_997, scale), rng, 2)
    queries = split_counts(scaled(14_218, scale), scaled(3_985, scale), rng, 1)
    gallery = split_counts(scaled(12_612, scale), scaled(3_985, scale), rng, 1)
    items = [(n, 0, 0) for n in train] + [(0, q, g) for q, g in zip(queries, gallery, strict=True)]
    for k, (n_train, n_query, n_gallery) in enumerate(items):
        item = f"id_{7 * k + 2:08d}"
        gender, category = ("WOMEN", "Dresses") if k % 2 == 0 else ("MEN", "Denim")
        statuses = ["train"] * n_train + ["query"] * n_query + ["gallery"] * n_gallery
        for j, status in enumerate(statuses):
            name = f"img/{gender}/{category}/{item}/{j + 1:02d}_{j % 4 + 1}_front.jpg"
            link(tpl[index % TEMPLATES], base / "Img" / name)
            partition.append(f"{name:<71}{item:<12}{status}")
            boxes.append(f"{name:<71}{1:<3}{j % 4 + 1:<3}{20:03d}  {10:03d}  {236:03d}  {250:03d}")
            index += 1
    (base / "Anno").mkdir(parents=True, exist_ok=True)
    header = "image_name  clothes_type  pose_type  x_1  y_1  x_2  y_2"
    (base / "Anno" / "list_bbox_inshop.txt").write_text("\n".join([str(len(boxes)), header, *boxes]) + "\n")
    done.parent.mkdir(parents=True, exist_ok=True)
    tmp = done.with_suffix(".tmp")
    tmp.write_text("\n".join([str(len(partition)), "image_name item_id evaluation_status", *partition]) + "\n")
    tmp.replace(done)  # written last: its presence means the copy is complete
    return root


def make_sop(root: Path, scale: float = 1.0) -> Path:
    base = root / SOP_TOP
    if (base / "Ebay_test.txt").exists():
        return root
    rng = np.random.default_rng(1)
    tpl = templates(root / "_templates", (500, 375))
    header = "image_id class_id super_class_id path"
    files = {"Ebay_train.txt": [header], "Ebay_test.txt": [header]}
    index, class_id = 0, 0
    for name, images, classes in (("Ebay_train.txt", 59_551, 11_318), ("Ebay_test.txt", 60_502, 11_316)):
        for n in split_counts(scaled(images, scale), scaled(classes, scale), rng, 2):
            class_id += 1
            super_class = class_id % len(SOP_CATEGORIES) + 1
            for j in range(n):
                relpath = f"{SOP_CATEGORIES[super_class - 1]}_final/{111085122800 + class_id}_{j}.JPG"
                link(tpl[index % TEMPLATES], base / relpath)
                files[name].append(f"{len(files[name])} {class_id} {super_class} {relpath}")
                index += 1
    for name in ("Ebay_train.txt", "Ebay_test.txt"):  # the test file last: its presence means complete
        (base / name).write_text("\n".join(files[name]) + "\n")
    return root


COMMON = ["trainer=ddp_cpu", "dataset.image_size=32", "dataset.resize_size=32", "dataset.batch_size=32",
          "dataset.eval_batch_size=256", "dataset.num_workers=0", "trainer.max_epochs=1",
          "trainer.limit_train_batches=4", "torch_threads=1"]
JOBS = {
    "isc_irgen": ["experiment=isc_irgen", "irgen.tokenizer.encoder.arch=cnn_small",
                  "irgen.tokenizer.encoder.pretrained=false", "irgen.tokenizer.kmeans_niter=10",
                  "irgen.generator.width=64", "irgen.generator.layers=1", "irgen.generator.heads=2",
                  "irgen.stage_trainer.generator.max_epochs=1"],
    "sop_areir": ["experiment=sop_areir", "model.arch=cnn_small", "model.pretrained=false", "model.members=48",
                  "model.meta_classes=12"],
}


# one GPU (bench/gpu_check.sh): the paper's encoder size and resolution, so that GPU utilisation means something
GPU = ["trainer=gpu", "dataset.image_size=224", "dataset.resize_size=256", "dataset.batch_size=64",
       "dataset.eval_batch_size=256", "dataset.num_workers=auto", "trainer.max_epochs=1",
       "trainer.limit_train_batches=20"]
GPU_JOBS = {"isc_irgen": ["irgen.tokenizer.encoder.arch=clip_vit_b_16", "irgen.tokenizer.encoder.pretrained=false",
                          "irgen.stage_trainer.generator.max_epochs=1", "irgen.tokenizer.min_points_per_code=1"]}


def job_command(name: str, gpu: bool) -> list[str]:
    if gpu:
        return ["train.py", JOBS[name][0], *GPU_JOBS[name], *GPU]
    return ["train.py", *JOBS[name], *COMMON]


class GpuSampler:
    """`nvidia-smi` utilisation samples (timestamp, percent) every 200 ms while a job runs; none without it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=timestamp,utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", "200"], stdout=open(path, "w"), stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()


def read_samples(path: Path) -> list[tuple[float, float]]:
    """(unix time, GPU utilisation %) of a `GpuSampler` file."""
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        stamp, _, util = line.partition(",")
        try:
            when = datetime.datetime.strptime(stamp.strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
            out.append((when, float(util)))
        except ValueError:
            continue
    return out


def run_job(name: str, repo: Path, data: Path, out: Path, gpu: bool = False) -> float:
    shutil.rmtree(out / name, ignore_errors=True)  # a fresh run: no artifacts of an earlier one to reuse
    probe = out / name / "probe"
    probe.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, *job_command(name, gpu), f"paths.data_dir={data}",
               f"paths.log_dir={out / name / 'logs'}", f"hydra.run.dir={out / name / 'run'}",
               "+callbacks.rehearsal_probe._target_=bench.rehearsal_probe.StageProbe",
               f"+callbacks.rehearsal_probe.out={probe}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # the probe, also for another --repo
    start = time.time()
    sampler = GpuSampler(out / name / "gpu_utilisation.csv")
    try:
        proc = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
    finally:
        sampler.stop()
    (out / name / "output.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise SystemExit(f"{name} failed ({proc.returncode}); see {out / name / 'output.txt'}:\n{proc.stderr[-3000:]}")
    return time.time() - start


def label(event: dict) -> str:
    if event["kind"] == "start" or event["model"] == "?":  # before the first trainer's setup
        return "start-up (rank 0 launches rank 1, which imports and builds the job)"
    what = event["what"]
    if event["kind"] == "hook":
        what = what.replace(" start", "").replace(" end", " (end)")
    what = re.sub(r"/\S+", "<path>", what)
    what = re.sub(r"\d+(\.\d+)?", "#", what)
    return f"{event['model']}: {what}"


def stages(events: list[dict]) -> list[tuple[str, float, float, float, float, float]]:
    """(label of the interval's first event, wall s, CPU s, peak MB at its end, start, end) for consecutive
    events."""
    events = sorted(events, key=lambda e: e["t"])
    return [(label(a), b["t"] - a["t"], b["cpu"] - a["cpu"], b["peak_mb"], a["t"], b["t"])
            for a, b in zip(events, events[1:], strict=False)]


def mean_utilisation(samples: list[tuple[float, float]], start: float, end: float) -> str:
    inside = [u for t, u in samples if start <= t <= end]
    return f"{sum(inside) / len(inside):.0f}%" if inside else "n/a"


def table(probe: Path, min_seconds: float = 1.0, gpu_samples: list[tuple[float, float]] | None = None
          ) -> list[str]:
    per_rank = {}
    for path in sorted(probe.glob("rank*.jsonl")):
        events = [json.loads(line) for line in path.read_text().splitlines()]
        per_rank[events[0]["rank"]] = events
    keyed: dict[int, dict[tuple[str, int], tuple[float, ...]]] = {}
    order: list[tuple[str, int]] = []
    for rank, events in sorted(per_rank.items()):
        seen: collections.Counter = collections.Counter()
        keyed[rank] = {}
        for name, wall, cpu, peak, start, end in stages(events):
            key = (name, seen[name])
            seen[name] += 1
            keyed[rank][key] = (wall, cpu, peak, start, end)
            if key not in order:
                order.append(key)
    ranks = sorted(keyed)
    head = "| stage | " + " | ".join(f"rank {r} wall s | rank {r} CPU s | rank {r} peak MB" for r in ranks)
    gpu = gpu_samples is not None
    lines = [head + " | wait |" + (" GPU util |" if gpu else ""), "|" + "---|" * (2 + 3 * len(ranks) + gpu)]
    for key in order:
        cells = [keyed[r].get(key) for r in ranks]
        if max((c[0] for c in cells if c), default=0) < min_seconds:
            continue
        work = max((c[1] for c in cells if c), default=0)
        waited = max(((c[0] - c[1]) for c in cells if c), default=0)
        flag = "**yes**" if waited > max(work, 1.0) and not key[0].startswith("start-up") else ""
        body = " | ".join(f"{c[0]:.1f} | {c[1]:.1f} | {c[2]:.0f}" if c else "- | - | -" for c in cells)
        util = f" {mean_utilisation(gpu_samples, cells[0][3], cells[0][4])} |" if gpu and cells[0] else ""
        lines.append(f"| {key[0]} | {body} | {flag} |{util}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", nargs="+", default=list(JOBS), choices=list(JOBS))
    parser.add_argument("--cache", type=Path, default=REPO / "data" / "rehearsal")
    parser.add_argument("--out", type=Path, default=Path("/tmp/irlab_rehearsal"))
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose train.py runs")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the real image counts")
    parser.add_argument("--gpu", action="store_true", help="one GPU, CLIP ViT-B/16 at 224 px, GPU utilisation")
    args = parser.parse_args()
    start = time.time()
    suffix = "" if args.scale == 1 else f"_x{args.scale:g}"
    if "isc_irgen" in args.jobs:
        make_inshop(args.cache / f"isc{suffix}", args.scale)
    if "sop_areir" in args.jobs:
        make_sop(args.cache / f"sop{suffix}", args.scale)
    made = time.time() - start
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.repo, capture_output=True,
                            text=True).stdout.strip()
    report = [f"# Full-scale rehearsal, {datetime.date.today()} (commit {commit}, 2 gloo ranks, "
              f"load average {os.getloadavg()[0]:.2f})", "",
              f"`python bench/full_scale_rehearsal.py` (datasets ready in {made:.0f} s)", ""]
    for name in args.jobs:
        data = args.cache
        if suffix:  # the job reads <data>/<dataset name>: a folder of links to the scaled copies
            data = args.cache / f"scaled{suffix}"
            data.mkdir(parents=True, exist_ok=True)
            for dataset in ("isc", "sop"):
                if (args.cache / f"{dataset}{suffix}").exists() and not (data / dataset).exists():
                    (data / dataset).symlink_to(args.cache / f"{dataset}{suffix}")
        wall = run_job(name, args.repo, data, args.out, gpu=args.gpu)
        samples = read_samples(args.out / name / "gpu_utilisation.csv") if args.gpu else None
        rows = table(args.out / name / "probe", gpu_samples=samples)
        report += [f"## {name}: {wall:.0f} s end to end", "", *rows, ""]
        print("\n".join([f"{name}: {wall:.0f} s end to end", *rows]), flush=True)  # no heading: gpu_check nests it
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"rehearsal-{datetime.date.today()}-{commit}.md"
    path.write_text("\n".join(report) + "\n")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
