"""A fair test of AREIR's claim on the digit pairs: an ensemble of E members over random meta-classes against
its controls at equal member parameters and equal optimizer steps (issue #24).

    python bench/areir_claim.py --jobs 2 --select-seeds 1 2 3   # every row and sweep, 3 seeds (132 runs, ~4 h)
    python bench/areir_claim.py --rows a b c d e --seeds 1 --lrs 1e-3
    python bench/areir_claim.py --table-only             # the table from the runs already finished
    python bench/areir_claim.py --smoke                  # every run as debug=fast: checks the script itself

Finished runs are appended to ``<out>.runs.jsonl`` (``--cache``): a killed bench loses only the runs in flight,
and any later invocation reuses every run whose overrides it shares. ``--jobs N`` trains N runs at once, each in
its own process with cores / N threads (on 2 cores, 2 x 1 thread gives ~15% more runs per hour than 1 x 2).

Rows (``experiment=digits_areir``: the cnn_small stem, SE members, zero-shot, 40 training classes):

* (a) AREIR: E=16 members of width 32, M=8 (a 128-d embedding, the baseline's size);
* (b) one member (M=8) of the width that spends the same member parameters as (a);
* (c) that one member classifying all 40 training classes (a plain classifier);
* (d) E=16 members of width 32 each classifying all 40 classes (an ensemble without random meta-classes);
* (e) the baseline (normalized softmax on the same stem; its own trunk and parameters, reported);
* (a-norm) - (d-norm) the same four rows with the 2018 code's loss (normalised outputs against one-hot targets,
  scale 16), so the claim is judged under both losses;
* sweeps: E in {1, 4, 8, 16, 32} at (a)'s member parameters, M in {2, 4, 8, 20, 40} at E=16 width 32 (the points
  that are not a main row take (a)'s learning rate), and the M sweep's best (M=20) with the 2018 loss at (a-norm)'s;
* (a-48) the paper's E=48 at (a)'s member parameters (M=5: 12 for ~100 classes is ~1 per 8, 40 / 8 = 5; width 16
  is the narrowest the SE gate allows, so it spends ~1.2x (a)'s member parameters), and (d-48) its control over all
  40 classes. Both take their E=16 row's learning rate. On CPU the member loop is as fast as grouped convolutions
  at E=48 (bench/areir_members.py), so they run with the default ``member_impl=auto`` (the loop on CPU).

Every row trains the preset's epochs (equal optimizer steps) with weight decay ``--weight-decay``; its learning
rate is chosen on validation R@1 from ``--lrs`` (at seed 1, or on the mean over ``--select-seeds``: one seed can
pick a rate that diverges at the others; the grid grows past an edge that wins), then the row runs over the seeds.
The claim holds, for a loss, if (a) beats (b), (c) and (d) on the mean test R@1 by more than (a)'s standard
deviation over seeds. The table (mean +- std over seeds, wall time, parameters, multiply-adds per image) goes to
``bench/results/areir_claim.md``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere without installing
from bench.embedded_benchmark import compose  # noqa: E402

BASE_WIDTH, BASE_MEMBERS, CLASSES = 32, 16, 40
NORMALISED_LOSS = ["model.member_loss=normalized", "model.loss_scale=16"]  # the 2018 code's loss (rows "-norm")


def member_params(members: int, width: int, meta_classes: int) -> int:
    from areir.model import AREIRNet, AREIRNetConfig

    with torch.device("meta"):
        net = AREIRNet(AREIRNetConfig("cnn_small", members, meta_classes, True, member_width=width))
    return sum(p.numel() for p in net.members.parameters())


def width_for(members: int, budget: int, meta_classes: int = 8) -> int:
    """The member width whose E members spend `budget` member parameters (the closest)."""
    # multiples of 8: the SE gate reduces its channels 8-fold
    return min(range(8, 1025, 8), key=lambda w: abs(members * member_params(1, w, meta_classes) - budget))


def areir_row(members: int, width: int, meta_classes: int, assignment: str = "random") -> list[str]:
    return ["experiment=digits_areir", f"model.assignment={assignment}", f"model.members={members}",
            f"model.member_width={width}", f"model.meta_classes={meta_classes}"]


def rows() -> dict[str, list[str]]:
    """Row key -> overrides. Sweep points that are a main row (E=1 is (b), E=16 and M=8 are (a), M=40 is (d): a
    balanced grouping of 40 classes into 40 meta-classes is a relabelling of them) have that row's exact overrides,
    so they are the same runs, not reruns."""
    budget = member_params(BASE_MEMBERS, BASE_WIDTH, 8)
    one, wide48 = width_for(1, budget), width_for(48, budget, 5)
    table = {
        "a": areir_row(BASE_MEMBERS, BASE_WIDTH, 8),
        "b": areir_row(1, one, 8),
        "c": areir_row(1, one, CLASSES, "identity"),
        "d": areir_row(BASE_MEMBERS, BASE_WIDTH, CLASSES, "identity"),
        "e": ["experiment=digits_baseline"],
    }
    for key in "abcd":  # the same four rows with the 2018 code's loss
        table[f"{key}-norm"] = [*table[key], *NORMALISED_LOSS]
    for members in (1, 4, 8, 16, 32):
        table[f"E={members}"] = areir_row(members, width_for(members, budget), 8)
    for groups in (2, 4, 8, 20):
        table[f"M={groups}"] = areir_row(BASE_MEMBERS, BASE_WIDTH, groups)
    table["M=40"] = table["d"]
    table["M=20-norm"] = [*table["M=20"], *NORMALISED_LOSS]  # the M sweep's best, with the 2018 loss
    # last: the costliest runs, so an interrupted bench has every cheaper row first
    table["a-48"] = areir_row(48, wide48, 5)
    table["d-48"] = areir_row(48, wide48, CLASSES, "identity")
    return table


# Rows that take another row's chosen learning rate instead of a grid of their own: the E=48 rows (a grid would
# triple their cost) and the sweep points that are not a main row (the grid for 6 of them is 2.5 h on 2 cores).
LR_FROM = {"a-48": "a", "d-48": "d", "M=20-norm": "a-norm",
           **{k: "a" for k in ("E=4", "E=8", "E=32", "M=2", "M=4", "M=20")}}
MAIN_ROWS = ("a", "b", "c", "d", "e", "a-norm", "b-norm", "c-norm", "d-norm", "a-48", "d-48")
MAX_EXTENSIONS = 2


def cost(overrides: list[str], out: Path) -> tuple[int, int]:
    """(parameters, multiply-adds per 32 px image) of the row's model."""
    from torch.utils.flop_counter import FlopCounterMode

    from irlab.builders import build_datamodule, build_model

    cfg = compose(overrides, out)
    model = build_model(cfg.model, build_datamodule(cfg)).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.embed(torch.zeros(1, 3, 32, 32))
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() // 2


def train(overrides: list[str]) -> dict[str, float]:
    """One training run in this process; its checkpoints go to a temporary folder."""
    from irlab.runner import run

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        metrics = run(compose(overrides, Path(tmp)), "train")
    return {"val": metrics["val/R@1"], "test": metrics["test/R@1"], "wall": time.perf_counter() - start}


def use_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def run_overrides(base: list[str], lr: float, seed: int, args) -> list[str]:
    wd = f"model.optimizer.weight_decay={args.weight_decay}"
    return [*base, wd, f"model.optimizer.lr={lr}", f"seed={seed}"]


class RunCache:
    """Finished runs, one JSON line each, keyed by their exact overrides: an interrupted bench continues where it
    stopped, a second invocation with more rows reuses the runs they share, and the table can be rewritten from
    the file alone (``--table-only``). Lines are appended by the one process that schedules the runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.runs: dict[str, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    self.runs[json.dumps(record["overrides"])] = record

    def get(self, overrides: list[str]) -> dict | None:
        return self.runs.get(json.dumps(overrides))

    def add(self, record: dict) -> None:
        self.runs[json.dumps(record["overrides"])] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def validation(base: list[str], lr: float, cache: RunCache, args) -> float | None:
    """Validation R@1 at `lr`, the mean over `--select-seeds`; None until all of them have run."""
    runs = [cache.get(run_overrides(base, lr, seed, args)) for seed in args.select_seeds]
    return None if any(r is None for r in runs) else statistics.mean(r["val"] for r in runs)


def lr_grid(key: str, table: dict[str, list[str]], cache: RunCache, args) -> list[float]:
    """`--lrs`, extended one step (x2 or /2) at a time while the best validation R@1 falls on the grid's edge: a
    rate chosen at the edge of its grid is not a chosen rate. At most `MAX_EXTENSIONS` steps, so a row costs at
    most that many rates more (a row still best at the last one is chosen there, and the table shows it)."""
    base = [*table[key], *args.extra]
    lrs = sorted(args.lrs)
    for _ in range(MAX_EXTENSIONS):
        val = {lr: validation(base, lr, cache, args) for lr in lrs}
        if len(lrs) < 2 or any(v is None for v in val.values()):
            return lrs
        best = max(val, key=val.get)
        if best == lrs[-1]:
            lrs = [*lrs, lrs[-1] * 2]
        elif best == lrs[0]:
            lrs = [lrs[0] / 2, *lrs]
        else:
            return lrs
    return lrs


def selected_lr(key: str, table: dict[str, list[str]], cache: RunCache, args) -> float | None:
    """The row's learning rate with the best validation R@1 (mean over `--select-seeds`), once every candidate has
    run."""
    if key in LR_FROM:
        return selected_lr(LR_FROM[key], table, cache, args)
    base = [*table[key], *args.extra]
    val = {lr: validation(base, lr, cache, args) for lr in lr_grid(key, table, cache, args)}
    if any(v is None for v in val.values()):
        return None
    return max(val, key=val.get)


def next_run(keys: list[str], table: dict[str, list[str]], cache: RunCache, busy: set[str], args):
    """The first run, in row order, that is neither finished nor running: a row's selection runs (each rate at
    each `--select-seeds`) first, its other seeds once its rate is chosen. None when every startable run is
    finished or running."""
    for key in keys:
        base = [*table[key], *args.extra]
        lr = selected_lr(key, table, cache, args)
        if lr is None and key in LR_FROM:
            continue  # the row it takes its rate from has not chosen yet
        plan = ([(c, s) for c in lr_grid(key, table, cache, args) for s in args.select_seeds] if lr is None
                else [(lr, s) for s in args.seeds])
        for candidate, seed in plan:
            overrides = run_overrides(base, candidate, seed, args)
            if cache.get(overrides) is None and json.dumps(overrides) not in busy:
                return key, candidate, seed, overrides
    return None


def run_all(keys: list[str], table: dict[str, list[str]], cache: RunCache, args) -> None:
    """Runs what the cache lacks, `--jobs` at a time, each in its own process with cores / jobs threads."""
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=use_threads, initargs=(threads,)) as pool:
        running: dict = {}
        while True:
            busy = {json.dumps(overrides) for _, _, _, overrides in running.values()}
            while len(running) < args.jobs and (job := next_run(keys, table, cache, busy, args)) is not None:
                running[pool.submit(train, job[3])] = job
                busy.add(json.dumps(job[3]))
                print(f"started {job[0]} lr {job[1]:g} seed {job[2]}", flush=True)
            if not running:
                return
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                key, lr, seed, overrides = running.pop(future)
                result = future.result()
                cache.add({"row": key, "lr": lr, "seed": seed, "overrides": overrides, **result, "jobs": args.jobs,
                           "threads": threads, "commit": commit(), "date": time.strftime("%Y-%m-%d")})
                print(f"finished {key} lr {lr:g} seed {seed}: val R@1 {result['val']:.4f} test R@1 "
                      f"{result['test']:.4f} ({result['wall']:.0f} s)", flush=True)


def commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def collect(keys: list[str], table: dict[str, list[str]], cache: RunCache, args) -> dict[str, dict]:
    """Every row with a chosen learning rate and at least one finished seed, with its cost (parameters, multiply-
    adds) measured here. A row short of seeds is marked in the table, never left out silently."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key in keys:
            base = [*table[key], *args.extra]
            lr = selected_lr(key, table, cache, args)
            runs = [r for s in args.seeds if lr and (r := cache.get(run_overrides(base, lr, s, args)))]
            if not runs:
                continue
            params, macs = cost(base, Path(tmp) / key)
            grid = [] if key in LR_FROM else lr_grid(key, table, cache, args)
            val = {c: validation(base, c, cache, args) for c in grid}
            results[key] = {"lr": lr, "val": val, "test": [r["test"] for r in runs],
                            "val_runs": [r["val"] for r in runs], "wall": statistics.mean(r["wall"] for r in runs),
                            "params": params, "macs": macs,
                            "parallel": sorted({(r["jobs"], r["threads"]) for r in runs})}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=None, help="row keys (default: all)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[1, 2, 3])
    parser.add_argument("--lrs", nargs="*", type=float, default=[5e-4, 1e-3, 2e-3])
    parser.add_argument("--select-seeds", nargs="*", type=int, default=[1],
                        help="seeds whose mean validation R@1 chooses the learning rate (default: seed 1)")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each with cores / jobs threads")
    parser.add_argument("--smoke", action="store_true", help="debug=fast runs: checks the script, measures nothing")
    parser.add_argument("--table-only", action="store_true", help="write the table from the cached runs, run nothing")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "areir_claim.md"))
    parser.add_argument("--cache", default=None, help="finished runs (JSON lines; default: <out>.runs.jsonl)")
    args = parser.parse_args()
    args.extra = ["debug=fast"] if args.smoke else []
    table = rows()
    keys = args.rows or list(table)
    unknown = sorted(set(keys) - set(table))
    if unknown:
        raise SystemExit(f"unknown --rows {unknown}; the rows are {list(table)}")
    for key in list(keys):  # a row with LR_FROM needs that row's chosen learning rate
        if key in LR_FROM and LR_FROM[key] not in keys:
            keys.insert(0, LR_FROM[key])
    cache = RunCache(Path(args.cache or Path(args.out).with_suffix(".runs.jsonl")))
    if not args.table_only:
        run_all(keys, table, cache, args)
    write_table(collect(keys, table, cache, args), table, keys, args)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def table_lines(keys: list[str], results: dict[str, dict], table: dict[str, list[str]], args) -> list[str]:
    lines = ["| row | overrides | val R@1 per lr (selection) | lr | val R@1 (mean over seeds) | test R@1 (mean +- std) "
             "| per seed | wall s / run (at once x threads) | parameters | multiply-adds / image |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key in keys:
        if key not in results:
            lines.append(f"| {key} | not run yet | | | | | | | | |")
            continue
        r = results[key]
        mean, std = mean_std(r["test"])
        same = [k for k in MAIN_ROWS if k != key and table[k] == table[key]]
        shown = (f"= ({same[0]}) " if same else "") + " ".join(o for o in table[key] if not o.startswith("experiment="))
        val = " / ".join(f"{c:g}: {v:.3f}" for c, v in r["val"].items()) or f"lr of ({LR_FROM[key]})"
        seeds = " / ".join(f"{t:.3f}" for t in r["test"])
        if len(r["test"]) < len(args.seeds):
            seeds += f" ({len(r['test'])} of {len(args.seeds)} seeds)"
        parallel = ", ".join(f"{j}x{t}" for j, t in r["parallel"])
        lines.append(f"| {key} | `{shown or '-'}` | {val} | {r['lr']:g} | {statistics.mean(r['val_runs']):.3f} | "
                     f"{mean:.3f} +- {std:.3f} | {seeds} | "
                     f"{r['wall']:.0f} ({parallel}) | {r['params']:,} | {r['macs']:,} |")
    return lines


def verdict(results: dict[str, dict], args) -> list[str]:
    """One line per loss: the claim holds if (a) beats each control's mean test R@1 by more than (a)'s standard
    deviation over seeds. It fails as soon as one control that ran over every seed is not beaten so; it holds only
    once all of them have run."""
    if len(args.seeds) < 2:
        return ["No verdict: one seed has no standard deviation (the claim is judged over 3 seeds)."]
    def every_seed_ran(key: str) -> bool:
        return key in results and len(results[key]["test"]) == len(args.seeds)

    lines = []
    losses = (("", "raw cross-entropy (the reference's loss)"), ("-norm", "the 2018 code's normalised loss"))
    for suffix, loss in losses:
        a, *controls = [f"{k}{suffix}" for k in "abcd"]
        done = [k for k in controls if every_seed_ran(k)]
        if not every_seed_ran(a) or not done:
            lines.append(f"No verdict yet with {loss}: ({a}) and its controls have not run over every seed.")
            continue
        a_mean, a_std = mean_std(results[a]["test"])
        margins = {k: a_mean - mean_std(results[k]["test"])[0] for k in done}
        fails = any(m <= a_std for m in margins.values())
        missing = [k for k in controls if k not in done]
        if not fails and missing:
            lines.append(f"No verdict yet with {loss}: ({a}) beats the controls that ran; "
                         f"{', '.join(missing)} have not run over every seed.")
            continue
        lines.append(f"With {loss} the claim {'does not hold' if fails else 'holds'}: ({a}) {a_mean:.3f} +- "
                     f"{a_std:.3f} is " + "; ".join(f"{m:+.3f} against ({k}) ({'more' if m > a_std else 'not more'} "
                                                    "than one std)" for k, m in margins.items())
                     + (f"; ({', '.join(missing)}) not run" if missing else "") + ".")
    return lines


def write_table(results: dict[str, dict], table: dict[str, list[str]], keys: list[str], args) -> None:
    lines = ["# AREIR's claim on the digit pairs (bench/areir_claim.py)", "",
             f"Command: `python bench/areir_claim.py {' '.join(sys.argv[1:])}`; seeds {args.seeds}, learning rate "
             f"chosen on validation R@1 (mean over seeds {args.select_seeds}) from {args.lrs} (x2 or /2 further, "
             f"at most {MAX_EXTENSIONS} steps, while the best was at an edge), "
             f"weight decay {args.weight_decay} (every row). "
             "Wall time per run, with how many ran at once and their threads."
             + (" SMOKE RUN (debug=fast): the numbers measure nothing." if args.smoke else "")]
    sections = [("Rows", [k for k in keys if k in MAIN_ROWS]),
                ("E at (a)'s member parameters, M=8", [k for k in keys if k.startswith("E=")]),
                ("M at E=16, width 32", [k for k in keys if k.startswith("M=")])]
    for title, section in sections:
        if section:
            lines += ["", f"## {title}", "", *table_lines(section, results, table, args)]
    if any(k in keys for k in "abcd"):
        lines += ["", *verdict(results, args)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
