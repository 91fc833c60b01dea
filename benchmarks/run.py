"""Side-by-side benchmarks: multiprocessing.Pool vs cpool.Pool (and friends).

    python benchmarks/run.py [--repeat N] [--only NAME ...]
                             [--markdown benchmarks/RESULTS.md] [--chart benchmarks/chart.png]

Each workload runs every available pool in the same process, interleaved
(mp, cpool, ..., mp, cpool, ...) for N repetitions; medians are reported with
the ratio mp/cpool (> 1 means cpool is faster).  Timings on shared VMs drift
by ~20%, so only ratios taken within one run are meaningful.
"""

import argparse
import datetime
import importlib.metadata
import os
import platform
import shlex
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import workloads as W  # noqa: E402

COLUMN_TITLES = {"multiprocessing": "mp", "concurrent.futures": "cf"}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=5, metavar="N",
                   help="interleaved repetitions per pool (default 5)")
    p.add_argument("--only", nargs="+", metavar="NAME", choices=list(W.WORKLOADS_BY_NAME),
                   help="run only these workloads: " + ", ".join(W.WORKLOADS_BY_NAME))
    p.add_argument("--pools", nargs="+", metavar="POOL", choices=W.POOL_NAMES,
                   help="restrict to these pools (multiprocessing and cpool are always run)")
    p.add_argument("--markdown", metavar="PATH", help="write a Markdown results file")
    p.add_argument("--chart", metavar="PATH", help="write a PNG bar chart of speed-ups")
    return p.parse_args(argv)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run_workload(wl, backends, repeat):
    """Return {pool name: list of values, or an error string}."""
    active = [b for b in backends if wl.supports(b.name)]
    samples = {b.name: [] for b in active}
    W.drop_inputs()
    for rep in range(repeat):
        shift = rep % len(active)  # rotate the order so no pool always goes first
        for b in active[shift:] + active[:shift]:
            if isinstance(samples[b.name], str):
                continue  # already failed
            try:
                value, ok = W.measure(wl, b, wl.size)
            except Exception as exc:  # keep going: report the failure in the table
                samples[b.name] = f"error: {type(exc).__name__}: {exc}"
                log(f"    {b.name}: {samples[b.name]}")
                continue
            if not ok:
                samples[b.name] = "error: wrong result"
                log(f"    {b.name}: wrong result")
            else:
                samples[b.name].append(value)
    return samples


def median(samples):
    return statistics.median(samples) if isinstance(samples, list) and samples else None


def fmt(value):
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def build_rows(results, pool_names):
    """Rows of cells: workload, unit, one median per pool, mp/cpool."""
    rows = []
    for wl, samples in results:
        meds = {name: median(samples.get(name)) for name in pool_names}
        cells = [wl.label, wl.unit]
        for name in pool_names:
            s = samples.get(name)
            cells.append("ERR" if isinstance(s, str) else fmt(meds[name]))
        mp, cp = meds["multiprocessing"], meds["cpool"]
        cells.append(f"{mp / cp:.2f}x" if mp and cp else "-")
        rows.append(cells)
        serial = median(samples.get("serial"))
        if serial:
            speedups = [fmt(serial / meds[n]) + "x" if meds[n] else "-" for n in pool_names]
            rows.append([f"  speed-up over serial ({fmt(serial)} ms)", "x", *speedups, ""])
        floor = median(samples.get("fork floor"))
        if floor:
            # Each pool's time in floors; the last cell is the best mp/cpool
            # ratio any pool that forks could reach in this run.
            times = [fmt(meds[n] / floor) + "x" if meds[n] else "-" for n in pool_names]
            best = f"≤ {mp / floor:.2f}x" if mp else "-"
            rows.append([f"  over a bare fork running the task ({fmt(floor)} ms)", "x",
                         *times, best])
    return rows


def render_text(header, rows):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(  # noqa: E731
        str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def render_markdown_table(header, rows):
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    out += ["| " + " | ".join(str(c).strip() for c in r) + " |" for r in rows]
    return "\n".join(out)


def machine_info():
    def run(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
        except OSError:
            return "?"

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        pass
    return {
        "machine": run(["uname", "-srm"]),
        "CPU": cpu,
        "cores": str(os.cpu_count()),
        "Python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }


def cpu_ticks():
    """(stolen, total) CPU ticks of the machine so far (/proc/stat), or None.

    Steal is time the hypervisor ran something else while this guest had
    work: on a shared VM, the one reading that says how quiet a run was."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:9]]     # user .. steal (guest is in user)
    return ticks[7], sum(ticks)


def steal_share(before, after):
    """Percentage of CPU time stolen between two cpu_ticks() readings."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return 100.0 * (after[0] - before[0]) / (after[1] - before[1])


def versions(pool_names):
    out = []
    for dist in ["numpy", "loky", "mpire"]:
        if dist in ("loky", "mpire") and dist not in pool_names:
            continue
        try:
            out.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join(out) or "-"


def command_line():
    env = "CPOOL_BENCH_FAKE=1 " if W.FAKE_CPOOL else ""
    return env + "python " + " ".join(shlex.quote(a) for a in sys.argv)


def write_markdown(path, header, rows, pool_names, skipped, repeat, steal):
    info = machine_info()
    if steal["all"] is not None:
        worst = max(((v, k) for k, v in steal.items() if k != "all" and v is not None),
                    default=None)
        info["CPU steal"] = f"{steal['all']:.1f}% of CPU time over the run" + (
            f" (most: {worst[0]:.1f}% during {worst[1]})" if worst else "")
    info.update({
        "command": f"`{command_line()}`",
        "workers": str(W.WORKERS),
        "repetitions": f"{repeat}, interleaved; medians shown",
        "versions": versions(pool_names),
    })
    lines = ["# cpool benchmark results", ""]
    if W.FAKE_CPOOL:
        lines += ["**CPOOL_BENCH_FAKE=1: the cpool column is multiprocessing.Pool "
                  "(harness check only, not a result).**", ""]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in info.items()] + [""]
    lines += [render_markdown_table(header, rows), ""]
    lines += [
        "Notes:",
        "",
        "- Lower is better for times; `mp/cpool` is the multiprocessing median divided "
        "by the cpool median (> 1 means cpool is faster).",
        "- Every pool has 2 workers (fork start method where there is a choice; loky "
        "uses its own start method) and is started and warmed up outside the timed "
        "region, except in the start-up and terminate rows. Those two are measured in a "
        "fresh Python process per repetition (numpy imported, one untimed run first), "
        "since what other pools' libraries leave in the benchmark process slows every "
        "pool's fork.",
        "- The other large-payload rows use a new pool per repetition in the benchmark "
        "process, which has had pools before: cpool's new pool takes over the warm "
        "shared memory of its last pool there (at most 256 MiB, `CPOOL_ARENA_CARRY`). "
        "The \"first pool of a process\" rows are measured in a fresh process per "
        "repetition whose untimed first run is a few tiny `apply()` calls, so their "
        "transfer is the process's first and every page it touches is new.",
        "- Each repetition starts from a collected heap (`gc.collect()`), and a "
        "workload's inputs are dropped before the next workload; collection stays on.",
        "- The map and starmap rows use each pool's default chunk size: cpool cuts 16 "
        "chunks per worker of at most 4096 items, multiprocessing 4 per worker. cf "
        "(concurrent.futures) and loky default to chunksize=1 in `map`, so these rows "
        "give them the chunksize multiprocessing would choose. mpire picks its own.",
        "- The start-up row's second line divides each pool's time by a floor measured "
        "beside it, in the same kind of fresh process: no pool, a bare `os.fork()` whose "
        "child runs the task and writes the pickled result to a pipe. Its last cell, "
        "multiprocessing's time over the floor, is the largest mp/cpool ratio any pool "
        "that forks its workers could show in this run.",
        "- `ERR` means the pool failed or returned a wrong result; `-` means the "
        "workload does not fit that pool's API or the pool is not installed.",
    ]
    for name, why in skipped.items():
        lines.append(f"- {name} skipped: {why}.")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_chart(path, results, pool_names):
    try:
        import matplotlib
    except ImportError:
        log("matplotlib not installed: no chart")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    others = [n for n in pool_names if n != "multiprocessing"]
    labels, bars = [], {n: [] for n in others}
    for wl, samples in results:
        mp = median(samples.get("multiprocessing"))
        if not mp:
            continue
        labels.append(wl.label)
        for n in others:
            m = median(samples.get(n))
            bars[n].append(mp / m if m else float("nan"))

    width = 0.8 / max(1, len(others))
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(labels) + 4), 5.5))
    for i, n in enumerate(others):
        xs = [x + (i - (len(others) - 1) / 2) * width for x in range(len(labels))]
        # Bars grow from 1x: up when faster than multiprocessing, down when slower.
        ax.bar(xs, [v - 1 for v in bars[n]], width, bottom=1, label=n)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.set_ylabel("speed-up over multiprocessing.Pool (log scale)")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    title = f"Speed-up over multiprocessing.Pool, {W.WORKERS} workers (higher is better)"
    if W.FAKE_CPOOL:
        title += "\nCPOOL_BENCH_FAKE=1: cpool is multiprocessing.Pool"
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None):
    args = parse_args(argv)
    names = None if args.pools is None else {"multiprocessing", "cpool", *args.pools}
    backends, skipped = W.make_backends(names)
    selected = [W.WORKLOADS_BY_NAME[n] for n in args.only] if args.only else W.WORKLOADS
    if not W.numpy_available():
        skipped["numpy workloads"] = "numpy not installed"
        selected = [wl for wl in selected if not wl.needs_numpy]

    pool_names = [b.name for b in backends]
    if W.FAKE_CPOOL:
        log("CPOOL_BENCH_FAKE=1: 'cpool' is multiprocessing.Pool")
    log(f"pools: {', '.join(pool_names)}; skipped: {skipped or 'none'}; "
        f"{W.WORKERS} workers, {args.repeat} repetitions")

    results = []
    start = cpu_ticks()
    steal = {}
    for wl in selected:
        log(f"  {wl.name} ...")
        pools = backends + [W.make_backend(name) for name, wanted in
                            (("serial", wl.with_serial), ("fork floor", wl.with_floor))
                            if wanted]
        before = cpu_ticks()
        results.append((wl, run_workload(wl, pools, args.repeat)))
        steal[wl.name] = steal_share(before, cpu_ticks())
        if steal[wl.name] is not None:
            log(f"    CPU steal {steal[wl.name]:.1f}%")
    steal["all"] = steal_share(start, cpu_ticks())

    header = ["workload", "unit", *(COLUMN_TITLES.get(n, n) for n in pool_names), "mp/cpool"]
    rows = build_rows(results, pool_names)
    print(render_text(header, rows))

    if args.markdown:
        write_markdown(args.markdown, header, rows, pool_names, skipped, args.repeat,
                       steal)
        log(f"wrote {args.markdown}")
    if args.chart and write_chart(args.chart, results, pool_names):
        log(f"wrote {args.chart}")
    failed = any(isinstance(s, str) for _, res in results for s in res.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
