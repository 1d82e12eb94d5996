"""Results as a printed/markdown table, JSON and a PNG chart of speed-ups over stock PyTorch."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

from vkernels.bench.case import BASELINE
from vkernels.bench.runner import Result
from vkernels.triton_kernels.autotuning import picked_configs

NO_CHART = "speedup.png not drawn: matplotlib is not installed (pip install matplotlib, or the [bench] extra, draws it)"

IMPLS_LEGEND = (
    f"`{BASELINE}` = stock eager PyTorch (reference and speed-up baseline); `torch.compile` = stock "
    "PyTorch under Inductor; `vk.<backend>` = the vkernels public function with `backend=<backend>`. "
    "GB/s = bytes an ideal implementation moves / median time; % copy = that over the measured "
    "copy bandwidth (device-to-device on GPUs); % mm peak = TFLOP/s over the measured bf16 8192³ matmul "
    "rate; images/s = images per call / median time; peak mem = "
    "most memory allocated during one call beyond what was allocated before it (CUDA only)."
)


def format_time(ms: float | None) -> str:
    if ms is None:
        return "—"
    if ms < 1:
        return f"{ms * 1e3:.1f} µs"
    if ms < 1000:
        return f"{ms:.3f} ms"
    return f"{ms / 1e3:.2f} s"


def _number(value: float | None, suffix: str = "") -> str:
    """Whole numbers from 100 up, else two or three significant digits (CPU runs are slow)."""
    if value is None:
        return "—"
    return (f"{value:.0f}" if value >= 100 else f"{value:.3g}" if value >= 1 else f"{value:.2g}") + suffix


def _check(result: Result, footnotes: dict[str, int]) -> str:
    if result.status == "ok":
        return "reference" if result.impl == BASELINE else f"ok ({result.rel_error:.1e})"
    if result.status == "skipped":  # the same reason recurs on every case: say it once, below
        return f"skipped [{footnotes.setdefault(f'{result.impl}: {result.note}', len(footnotes) + 1)}]"
    return f"**{result.status.upper()}** {result.note}"


def format_table(results: list[Result]) -> str:
    """Markdown tables, one per op family, padded so they read as plain text too."""
    with_flops = any(r.tflops is not None for r in results)
    with_peak = any(r.matmul_fraction is not None for r in results)
    sections = []
    for family in dict.fromkeys(r.family for r in results):
        # Throughput and memory columns only in the families whose cases count images (models).
        with_items = any(r.items_per_s is not None for r in results if r.family == family)
        header = ["case", "impl", "median", "min", "IQR", "GB/s", "% copy"]
        header += ["TFLOP/s"] if with_flops else []
        header += ["% mm peak"] if with_peak else []
        header += ["images/s", "peak mem"] if with_items else []
        header += [f"vs {BASELINE}", "check"]
        rows, footnotes = [], {}
        for r in (r for r in results if r.family == family):
            row = [r.case, r.impl, format_time(r.median_ms), format_time(r.min_ms), format_time(r.iqr_ms),
                   _number(r.gbps), _number(None if r.copy_fraction is None else 100 * r.copy_fraction, "%")]
            row += [_number(r.tflops)] if with_flops else []
            row += [_number(None if r.matmul_fraction is None else 100 * r.matmul_fraction, "%")] if with_peak else []
            row += [_number(r.items_per_s), _number(r.peak_mib, " MiB")] if with_items else []
            row += [_number(r.speedup, "×"), _check(r, footnotes)]
            rows.append([cell.replace("|", "\\|") for cell in row])
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = [header, ["-" * w for w in widths], *rows]
        table = "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines)
        notes = "".join(f"\n\n[{number}] skipped {text}" for text, number in footnotes.items())
        sections.append(f"### {family}\n\n{table}{notes}")
    return "\n\n".join(sections)


def result_problems(results: list[Result]) -> list[str]:
    """The implementations that erred or disagreed with PyTorch, one line each."""
    return [f"{r.case} [{r.impl}]: {r.status.upper()} {r.note}" for r in results if r.status in ("mismatch", "error")]


def machine_lines(machine: dict) -> list[str]:
    capability = f" (compute capability {machine['capability']})" if machine.get("capability") else ""
    lines = [
        f"- date: {machine['date']}",
        f"- device: {machine['device']}{capability}",
        f"- versions: Python {machine['python']}, torch {machine['torch']}, Triton {machine['triton']}, "
        f"CUDA {machine.get('cuda')}",
        f"- commit: {machine.get('commit', 'unknown')}",
        f"- command: `{machine['command']}`",
        f"- copy bandwidth (one large tensor copy, bytes read + written): {_number(machine['copy_gbps'])} GB/s",
    ]
    if machine.get("matmul_tflops"):
        lines.append(f"- bf16 matmul 8192³: {machine['matmul_tflops']:.0f} TFLOP/s")
    lines += [f"- backend {name}: {status}" for name, status in machine["backends"].items()]
    return lines


def results_markdown(results: list[Result], problems: list[str], autotuned: list[dict]) -> str:
    """The legend, one table per family, the problems and the autotuner's picks."""
    markdown = [IMPLS_LEGEND, "", format_table(results)]
    if problems:
        markdown += ["", "**Problems:**", "", *[f"- {p}" for p in problems]]
    if autotuned:
        markdown += ["", "**Triton autotuner picks** (kernel, tuning key: config, how it was picked):", "",
                     *[f"- `{a['kernel']}` {a['key']}: {a['config']} ({a['picked']})" for a in autotuned]]
    return "\n".join(markdown)


class Earlier(NamedTuple):
    """What an earlier run left in results.json, for --merge."""
    machine: dict
    problems: list[str]
    results: list[Result]
    extra: dict  # its autotuner picks and any other sections (first-call latencies)


def earlier_results(out_dir: Path) -> Earlier | None:
    path = out_dir / "results.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    results = [Result(**result) for result in data.pop("results")]
    derived = set(result_problems(results))  # recomputed at the end of the run
    problems = [problem for problem in data.pop("problems") if problem not in derived]
    return Earlier(data.pop("machine"), problems, results, data)


def write_outputs(out_dir: Path, machine: dict, results: list[Result], problems: list[str],
                  earlier: Earlier | None = None, chart: bool = True) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path, chart_path = out_dir / "results.json", out_dir / "results.md", out_dir / "speedup.png"
    extra = dict(earlier.extra) if earlier else {}
    # The config Triton's autotuner picked for each kernel and tuning key (GPU runs only: interpreted
    # kernels have one config): python -m vkernels.verify ships them; compare with compile_check's spills.
    picks = {json.dumps([p["kernel"], p["key"]], sort_keys=True): p for p in [*extra.pop("autotuned", []), *picked_configs()]}
    autotuned = list(picks.values())
    json_path.write_text(json.dumps(
        {"machine": machine, "problems": problems, "results": [dataclasses.asdict(r) for r in results],
         "autotuned": autotuned, **extra},
        indent=1, ensure_ascii=False))
    markdown_path.write_text("\n".join(["## " + machine["title"], "", *machine_lines(machine), "",
                                         results_markdown(results, problems, autotuned)]) + "\n")
    if not chart:
        return [json_path, markdown_path]
    try:
        import matplotlib  # noqa: F401  the chart is optional: the [bench] extra installs it
    except ImportError:
        print(NO_CHART)
        return [json_path, markdown_path]
    draw_speedups(chart_path, machine["title"], results)
    return [json_path, markdown_path, chart_path]


def draw_speedups(path: Path, title: str, results: list[Result]) -> None:
    """Horizontal bars, one group per case, one bar per timed implementation other than BASELINE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in results if r.speedup is not None and r.impl != BASELINE]
    cases = list(dict.fromkeys(r.case for r in timed))
    impls = list(dict.fromkeys(r.impl for r in timed))
    bar = 0.8 / max(len(impls), 1)
    figure, axes = plt.subplots(figsize=(10, 1.2 + 0.22 * max(len(timed), 1) + 0.15 * len(cases)))
    for k, impl in enumerate(impls):
        rows = [(cases.index(r.case), r) for r in timed if r.impl == impl]
        positions = [i + (k - (len(impls) - 1) / 2) * bar for i, _ in rows]
        bars = axes.barh(positions, [r.speedup for _, r in rows], height=bar, label=impl)
        for rectangle, (_, r) in zip(bars, rows):
            if r.status != "ok":  # a wrong answer's speed means nothing: say so on the bar
                rectangle.set_hatch("xx")
                axes.text(rectangle.get_width(), rectangle.get_y() + bar / 2, f" {r.status.upper()}",
                          va="center", fontsize=7, color="red")
    axes.axvline(1.0, color="black", linewidth=0.8)
    speedups = [r.speedup for r in timed]
    if speedups and max(speedups) / min(speedups) > 20:  # e.g. interpreted Triton on a CPU
        axes.set_xscale("log")
        axes.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes.set_yticks(range(len(cases)), cases, fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel("speed-up over stock PyTorch (×, ratio of median times; > 1 is faster)")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a bar
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
