"""From rows to results: derived figures (ratio, bandwidth, fraction of copy), the verdicts
against the issue's targets, and the outputs (markdown report, dated results file, CSV,
PNG)."""

from __future__ import annotations

import csv
from pathlib import Path

from . import ours, theirs
from .case import Row
from .machine import Environment

GPU_NOTE = "GPU figures need a GPU: none measured in this run"
CPU_TARGET = 1.10  # the target: ours no more than 10% slower than torch's foreach
SMALL_TARGET = 1.2  # the target: many small tensors at most 1.2x one flat tensor
HOST_TARGET_S = 100e-6  # the target: host time per step at 10,000 tensors


# ------------------------------------------------------------------ derived figures
def add_derived(rows: list[Row]) -> None:
    """Fill ratio (time / time of ``vs`` at the same size), effective bandwidth (bytes/param
    x size / time) and its fraction of the copy bandwidth, all from this run's rows."""
    times = {(r.key, r.size): r.time_s for r in rows if r.time_s}
    for r in rows:
        base = times.get((r.vs, r.size))
        if r.time_s and base:
            r.ratio = r.time_s / base
        if r.time_s and r.bytes_per_param:
            r.bandwidth = r.bytes_per_param * r.size / r.time_s
    copy = next((r.bandwidth for r in rows if r.key == "copy" and r.bandwidth), None)
    for r in rows:
        if r.bandwidth and copy and r.key != "copy":
            r.frac_of_copy = r.bandwidth / copy


def cpu_verdicts(rows: list[Row]) -> list[str]:
    """One line per CPU comparison: ours / torch against the issue's 10% target."""
    lines = []
    for r in rows:
        if r.section == "cpu" and r.key.startswith("torch-") and r.ratio:
            slowdown = 1.0 / r.ratio  # r.ratio = torch / ours
            verdict = "met" if slowdown <= CPU_TARGET else "NOT met"
            name = r.key.removeprefix("torch-")
            lines.append(
                f"{name}, {r.size:,} params: ours / torch = {slowdown:.3f} "
                f"(target <= {CPU_TARGET:.2f}): {verdict}"
            )
    return lines


def small_tensor_checks(rows: list[Row]) -> list[str]:
    """Many small tensors against one flat tensor (GPU) and host time per step (GPU, or CPU
    with launches stubbed), against the issue's targets."""
    lines = []
    times = {r.key: r.time_s for r in rows if r.section == "small" and r.time_s}
    for key in ("ours-many", "ours-flatbuf"):
        if key in times and "ours-flat" in times:
            ratio = times[key] / times["ours-flat"]
            verdict = "met" if ratio <= SMALL_TARGET else "NOT met"
            lines.append(
                f"{key} / ours-flat step time = {ratio:.2f} (target <= {SMALL_TARGET}): {verdict}"
            )
    for r in rows:
        if r.section in ("small", "host") and r.host_s and r.n_tensors >= 10_000:
            if r.key.startswith("torch"):
                continue
            verdict = "met" if r.host_s < HOST_TARGET_S else "NOT met"
            where = "launches stubbed, CPU" if r.section == "host" else "GPU"
            lines.append(
                f"{r.key}: host time per step at {r.n_tensors:,} tensors = "
                f"{r.host_s * 1e6:.0f} us ({where}; target < {HOST_TARGET_S * 1e6:.0f} us): "
                f"{verdict}"
            )
    return lines


def launch_checks(rows: list[Row]) -> list[str]:
    """Whether ours launches the same number of kernels per step whatever the tensor count."""
    lines = []
    for section in ("launches", "small"):
        by_key: dict[str, set[int]] = {}
        for r in rows:
            if r.section == section and r.triton_launches is not None:
                family = "ours" if section == "small" else r.key
                by_key.setdefault(family, set()).add(r.triton_launches)
        for key, counts in by_key.items():
            state = "constant" if len(counts) == 1 else "NOT constant"
            lines.append(f"{key}: Triton launches per step {sorted(counts)}: {state}")
    return lines


# --------------------------------------------------------------------------- markdown
SECTION_TITLES = {
    "large": "Large model: one optimizer step",
    "cpu": "CPU: reference backend (backend='torch') against torch's foreach optimizers",
    "small": "Many small tensors against one flat tensor",
    "launches": "Launches per step (Triton interpreter on the CPU)",
    "host": "Host time per step of the Triton path (CPU, kernel launches stubbed)",
    "copy": "Copy bandwidth (the yardstick of 'of copy')",
}
COLUMNS = [  # (header, Row -> text); empty columns are dropped per section
    ("key", lambda r: r.key),
    ("case", lambda r: r.case),
    ("params", lambda r: f"{r.size:,}"),
    ("tensors", lambda r: f"{r.n_tensors:,}"),
    ("median ms", lambda r: num(r.time_s, 1e3)),
    ("ratio", lambda r: num(r.ratio, 1, ".3f")),
    ("vs", lambda r: r.vs if r.ratio is not None and r.vs != r.key else ""),
    ("B/param (model)", lambda r: num(r.bytes_per_param, 1, "g")),
    ("GB/s (eff.)", lambda r: num(r.bandwidth, 1e-9, ".1f")),
    ("of copy", lambda r: f"{r.frac_of_copy:.0%}" if r.frac_of_copy else ""),
    ("Triton launches", lambda r: num(r.triton_launches, 1, "d")),
    ("GPU ops (profiler)", lambda r: num(r.device_ops, 1, "d")),
    ("host ms", lambda r: num(r.host_s, 1e3)),
    ("note", lambda r: r.note),
]


def num(value, scale: float, spec: str = ".4g") -> str:
    """``value * scale`` formatted with ``spec``; empty for a missing value."""
    return "" if value is None else format(value * scale, spec)


def markdown(rows: list[Row], env: Environment, command: str = "") -> str:
    """The report: environment, models, one table per section, verdicts."""
    models = "; ".join(ours.models() + theirs.MODELS)
    lines = [
        "# fp16_triton optimizer-step benchmark",
        "",
        f"- device: {env.device}; driver: {env.driver}",
        f"- torch {env.torch}, triton {env.triton}, python {env.python}, "
        f"{env.cpu_threads} CPU threads; {env.date}",
        f"- commit {env.commit}" + (f"; command: `{command}`" if command else ""),
        "- medians; ratio = median time / median time of the `vs` row at the same size "
        "(above 1: the `vs` case is faster), both from this run",
        f"- effective bandwidth = B/param (model) x params / time; {models}",
    ]
    if not env.gpu:
        lines += ["", f"**{GPU_NOTE}.**"]
    for section, title in SECTION_TITLES.items():
        selected = [r for r in rows if r.section == section]
        if not selected:
            continue
        columns = [(h, f) for h, f in COLUMNS if any(f(r) for r in selected)]
        lines += ["", f"## {title}", ""]
        lines.append("| " + " | ".join(h for h, _ in columns) + " |")
        lines.append("|" + "|".join(" --- " for _ in columns) + "|")
        for r in selected:
            lines.append("| " + " | ".join(f(r) for _, f in columns) + " |")
    checks = cpu_verdicts(rows) + launch_checks(rows) + small_tensor_checks(rows)
    if checks:
        lines += ["", "## Checks", ""] + [f"- {line}" for line in checks]
    return "\n".join(lines) + "\n"


def results_name(env: Environment) -> str:
    """The dated results file's name, ``<YYYY-MM-DD>-<machine>.md`` (the date is UTC)."""
    return f"{env.date[:10]}-{env.slug}.md"


# ------------------------------------------------------------------------- other outputs
CSV_FIELDS = [
    "device", "driver", "torch", "triton", "date", "section", "key", "case", "size",
    "n_tensors", "median_ms", "ratio_to_ours", "vs", "bytes_per_param", "bandwidth_GBps",
    "frac_of_copy", "triton_launches", "gpu_ops", "host_ms", "note",
]  # fmt: skip


def write_csv(rows: list[Row], env: Environment, path: Path) -> None:
    """One line per row, with the environment on every line (files from several machines
    can be concatenated)."""

    def opt(value, scale=1.0):
        """A scaled number, or an empty cell."""
        return "" if value is None else value * scale

    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow(
                {
                    "device": env.device,
                    "driver": env.driver,
                    "torch": env.torch,
                    "triton": env.triton,
                    "date": env.date,
                    "section": r.section,
                    "key": r.key,
                    "case": r.case,
                    "size": r.size,
                    "n_tensors": r.n_tensors,
                    "median_ms": opt(r.time_s, 1e3),
                    "ratio_to_ours": opt(r.ratio),
                    "vs": r.vs,
                    "bytes_per_param": opt(r.bytes_per_param),
                    "bandwidth_GBps": opt(r.bandwidth, 1e-9),
                    "frac_of_copy": opt(r.frac_of_copy),
                    "triton_launches": opt(r.triton_launches),
                    "gpu_ops": opt(r.device_ops),
                    "host_ms": opt(r.host_s, 1e3),
                    "note": r.note,
                }
            )


def plot(rows: list[Row], env: Environment, path: Path) -> None:
    """Median step time and ratio against size for the size sweeps (log scales)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = [r for r in rows if r.section in ("large", "cpu") and r.time_s]
    fig, (ax_time, ax_ratio) = plt.subplots(1, 2, figsize=(13, 5))
    for key in dict.fromkeys(r.key for r in swept):
        mine = sorted((r for r in swept if r.key == key), key=lambda r: r.size)
        ax_time.plot([r.size for r in mine], [r.time_s * 1e3 for r in mine], "o-", label=key)
        ratios = [r for r in mine if r.ratio is not None and r.vs != r.key]
        if ratios:
            label = f"{key} / {ratios[0].vs}"
            ax_ratio.plot([r.size for r in ratios], [r.ratio for r in ratios], "o-", label=label)
    ax_time.set(xscale="log", yscale="log", xlabel="params", ylabel="median ms per step")
    ax_ratio.set(xscale="log", xlabel="params", ylabel="time / time of vs (above 1: vs faster)")
    ax_ratio.axhline(1.0, color="grey", lw=0.8)
    for ax in (ax_time, ax_ratio):
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no timings", ha="center", va="center", transform=ax.transAxes)
        ax.grid(True, which="both", alpha=0.3)
    title = f"{env.device} | torch {env.torch} | triton {env.triton} | {env.date}"
    if not env.gpu:
        title += f"\n{GPU_NOTE}"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(report: str, rows: list[Row], env: Environment, out: Path) -> list[Path]:
    """Write the report as ``results.md`` and as the dated results file (the one to commit
    under ``bench/results/``: it names the machine, versions, commit, date and command), the
    CSV and the plot to ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.md", out / results_name(env), out / "results.csv"]
    paths.append(out / "results.png")
    for path in paths[:2]:
        path.write_text(report)
    write_csv(rows, env, paths[2])
    plot(rows, env, paths[3])
    return paths
