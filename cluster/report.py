"""`elmforge report`: plots and one self-contained HTML page comparing runs (or a sweep's trials).

Input: run dirs (holding metrics.jsonl, summary.json once the run ended, and scheduler_stop.json
when a sweep's scheduler stopped it early) or directories that contain run dirs one to three levels
down (a sweep dir, `${storage_path}/outputs`, or `${storage_path}` itself: its runs and sweep trials).
Output, in out_dir: one PNG per metric vs step, every run overlaid in its own colour (the same
colour in every chart), and report.html with the PNGs embedded as base64 data URIs and a table
of runs. Nothing is fetched from the network; the page opens from disk or an email attachment.

With two runs or more, the table says how their configs differ (run_config.json, which training writes
into every run dir): each run's values of the settings that are not the same in all of them.

Every numeric field of metrics.jsonl is charted: the known ones (loss with val_loss, lr,
tokens/s, MFU, memory, grad norm) first with their own titles, any other under its field name.
NaN and infinite values (a skipped step's grad_norm) are left out of charts and statistics.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainer.summary import RUN_CONFIG_NAME, SUMMARY_NAME, flat_config, read_json

METRICS_NAME = "metrics.jsonl"
# Written by `elmforge sweep` into a trial's run dir when ASHA stops the trial early:
# {"scheduler": "ASHA", "step": <the step it decided at>, "metric": "val_loss", "value": <its value then>}
SCHEDULER_STOP_NAME = "scheduler_stop.json"
HTML_NAME = "report.html"
PLOT_SIZE_IN, PLOT_DPI = (9.0, 5.0), 100
PLOT_SIZE_PX = (int(PLOT_SIZE_IN[0] * PLOT_DPI), int(PLOT_SIZE_IN[1] * PLOT_DPI))  # (width, height) of every PNG

# Charted fields in page order: field -> (title, y-axis label). "loss" also draws val_loss.
KNOWN_CHARTS = {
    "loss": ("Loss (training; validation dashed with markers)", "loss"),
    "lr": ("Learning rate", "learning rate"),
    "tokens_per_s": ("Throughput", "tokens / s"),
    "mfu": ("Model FLOPs utilisation (MFU)", "MFU"),
    "memory_gb": ("Memory", "GB"),
    "grad_norm": ("Gradient norm", "grad norm"),
}
# Not charted on their own: the x axis, bookkeeping, and fields that repeat a charted one.
NOT_CHARTED = {"step", "time", "tokens", "skipped", "ce_loss", "val_loss", "val_perplexity", "step_time_s"}
LEGEND_INSIDE_MAX = 6  # more runs than this: the legend goes beside the axes
# Config groups that name, place or watch a run without changing it: left out of "settings that differ".
NOT_COMPARED = ("run", "storage_path", "submit", "prepare", "sweep", "logger")
SETTINGS_SHOWN = 8  # per run; more are counted


@dataclass
class Run:
    name: str
    dir: Path
    records: list[dict]  # one per step, sorted by step
    summary: dict | None = None
    scheduler_stop: dict | None = None  # see stopped_by_scheduler
    stale_summary: dict | None = None  # an earlier invocation's summary.json, of a run resumed since
    config: dict | None = None  # run_config.json: the config its latest invocation trained with
    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)  # field -> (steps, finite values)


# ---------------------------------------------------------------- finding and reading runs

def find_run_dirs(paths: list[str]) -> list[Path]:
    """Run dirs (holding metrics.jsonl) at each path or one to three levels below it, in argument order."""
    found: list[Path] = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists():
            # `elmforge report outputs storage_path=...`: the other verbs' overrides, taken for a path
            takes = "; report takes run dirs, not overrides" if "=" in p else ""
            raise FileNotFoundError(f"{p}: no such file or directory{takes}")
        if path.is_file():
            if path.name != METRICS_NAME:
                raise ValueError(f"{p}: expected a run dir, a directory of run dirs, or a {METRICS_NAME} file")
            candidates = [path.parent]
        elif (path / METRICS_NAME).is_file():
            candidates = [path]
        else:
            patterns = (f"*/{METRICS_NAME}", f"*/*/{METRICS_NAME}", f"*/*/*/{METRICS_NAME}")
            candidates = sorted({m.parent for pattern in patterns for m in path.glob(pattern) if m.is_file()})
        for c in candidates:
            if c.resolve() not in {f.resolve() for f in found}:
                found.append(c)
    if not found:
        raise FileNotFoundError(
            f"no runs found under {', '.join(paths)}: no {METRICS_NAME} in these directories "
            f"or one to three levels below them"
        )
    return found


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl as records sorted by step (a repeated step keeps its last record); a bad line is an
    error, except a last one without its newline: a write still under way (a run training now) or cut
    short (a kill, a full disk), left out."""
    by_step: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.endswith("\n"):
                break
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}): {line.strip()[:80]!r}") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            step = rec.get("step")
            if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step):
                raise ValueError(f"{path}:{lineno}: no numeric 'step' field")
            by_step[int(step)] = rec
    return [by_step[s] for s in sorted(by_step)]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _series(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    for rec in records:
        for key, v in rec.items():
            if _finite(v):
                steps, values = out.setdefault(key, ([], []))
                steps.append(int(rec["step"]))
                values.append(float(v))
    return out


def _stopped_on_request(summary: dict) -> bool:
    return bool(summary.get("stopped_by") or summary.get("preempted"))  # "preempted": older summaries


def stopped_by_scheduler(run_dir: Path, summary: dict | None) -> dict | None:
    """The sweep scheduler's stop record of a run it stopped early; None when it has none, or when the run
    finished its last step before the stop request reached it (the request is asynchronous)."""
    record = read_json(run_dir / SCHEDULER_STOP_NAME)
    if record is None or (summary is not None and not _stopped_on_request(summary)):
        return None
    return record


def load_runs(paths: list[str]) -> list[Run]:
    runs = []
    for d in find_run_dirs(paths):
        summary, stale = read_json(d / SUMMARY_NAME), None
        records = read_metrics(d / METRICS_NAME)
        if summary and records and _finite(summary.get("steps")) and summary["steps"] < records[-1]["step"]:
            # Written when an earlier invocation stopped; the run was resumed and went past it (a resumed run
            # rewrites summary.json only when it ends), so it tells neither how nor where the run ended.
            summary, stale = None, summary
        name = (summary or stale or {}).get("run_name") or d.name
        runs.append(Run(name=str(name), dir=d, records=records, summary=summary, stale_summary=stale,
                        config=read_json(d / RUN_CONFIG_NAME),
                        scheduler_stop=stopped_by_scheduler(d, summary), series=_series(records)))
    _unique_names(runs)
    return runs


def _unique_names(runs: list[Run]) -> None:
    """Runs sharing a name (one trial name in two sweeps) get as many parent dirs as tell them apart."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.name, []).append(r)
    for name, group in groups.items():
        if len(group) == 1:
            continue
        for depth in range(1, 4):
            labels = ["/".join([*r.dir.resolve().parts[-depth - 1:-1], name]) for r in group]
            if len(set(labels)) == len(labels):
                break
        else:
            labels = [f"{name} #{i}" for i in range(1, len(group) + 1)]
        for r, label in zip(group, labels):
            r.name = label


# ---------------------------------------------------------------- the table of runs

def run_row(run: Run) -> dict:
    """The table's numbers for one run: summary.json where it has them, else metrics.jsonl (None: unknown)."""
    s = run.summary or {}
    steps_s, loss = run.series.get("loss", ([], []))
    val_steps, val = run.series.get("val_loss", ([], []))
    tps = run.series.get("tokens_per_s", ([], []))[1]
    mfu = run.series.get("mfu", ([], []))[1]
    steps = s.get("steps") if _finite(s.get("steps")) else (int(run.records[-1]["step"]) if run.records else None)
    final_loss = s.get("final_loss") if _finite(s.get("final_loss")) else (loss[-1] if loss else None)
    if val:
        i = min(range(len(val)), key=val.__getitem__)
        best_val, best_val_step = val[i], val_steps[i]
    else:
        best_val, best_val_step = None, None
    return {
        "name": run.name,
        "dir": str(run.dir),
        "steps": steps,
        "final_loss": final_loss,
        "best_val_loss": best_val,
        "best_val_step": best_val_step,
        "tokens_per_s_median": statistics.median(tps) if tps else None,
        "mfu_median": statistics.median(mfu) if mfu else None,
        "status": run_status(run),
    }


def differing_settings(runs: list[Run]) -> list[dict | None]:
    """Per run, {setting: value} of the settings whose values are not the same in every run with a
    run_config.json (a setting one run lacks reads "unset"); None for a run without one."""
    flats = [None if r.config is None else
             flat_config({k: v for k, v in r.config.items() if k not in NOT_COMPARED}) for r in runs]
    known = [f for f in flats if f is not None]
    keys = sorted({k for f in known for k in f}, key=lambda k: (not _changes_results(k), k))
    differ = [k for k in keys if len({json.dumps(f.get(k, "unset"), sort_keys=True) for f in known}) > 1]
    return [None if f is None else {k: f.get(k, "unset") for k in differ} for f in flats]


# The batch's factors: the run name hashes their product (the samples per step), not each.
BATCH_KEYS = ("cluster.num_workers", "train.micro_batch_size", "train.grad_accum_steps", "train.global_batch_tokens")


def _changes_results(key: str) -> bool:
    """A setting that changes what a run computes (those that name it: cluster.config's RESULT_KEYS less
    UNHASHED, and the batch's factors), shown before those that change how it ran or was watched."""
    from cluster.config import RESULT_KEYS, UNHASHED

    group, _, name = key.partition(".")
    return key in BATCH_KEYS or group in RESULT_KEYS and name.split(".")[0] not in UNHASHED.get(group, ())


def settings_text(settings: dict | None) -> tuple[str, str] | None:
    """(what the table shows: the first SETTINGS_SHOWN, the rest counted; all of them, for its tooltip)."""
    if settings is None:
        return None
    items = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in settings.items()]
    more = len(items) - SETTINGS_SHOWN
    return ", ".join(items[:SETTINGS_SHOWN]) + (f" (+{more} more)" if more > 0 else ""), ", ".join(items)


def run_status(run: Run) -> str:
    """finished, stopped (<why>), stopped early by the sweep's scheduler, or no summary.json yet."""
    if run.scheduler_stop is not None:
        stop = run.scheduler_stop
        return f"stopped early by {stop['scheduler']} at step {stop['step']} ({stop['metric']} {stop['value']:.4f})"
    if run.stale_summary is not None:
        return f"running or stopped (resumed after step {run.stale_summary['steps']}, no summary.json since)"
    if run.summary is None:
        return "running or stopped (no summary.json)"
    if run.summary.get("stopped_by"):
        return f"stopped ({run.summary['stopped_by']})"
    return "stopped" if run.summary.get("preempted") else "finished"


# ---------------------------------------------------------------- charts

def _colors(n: int) -> list:
    from matplotlib import colormaps

    if n <= 20:  # distinct qualitative colours
        cmap = colormaps["tab10" if n <= 10 else "tab20"]
        return [cmap(i) for i in range(n)]
    cmap = colormaps["turbo"]  # a larger sweep: n colours spread along a continuous map, none repeated
    return [cmap(i / (n - 1)) for i in range(n)]


def _field_title(key: str) -> tuple[str, str]:
    return KNOWN_CHARTS.get(key, (key.replace("_", " "), key))


def _chart_fields(runs: list[Run]) -> list[str]:
    present = {k for r in runs for k in r.series}
    known = [k for k in KNOWN_CHARTS if k in present or (k == "loss" and "val_loss" in present)]
    others = sorted(k for k in present if k not in KNOWN_CHARTS and k not in NOT_CHARTED)
    return known + others


def _plot(runs: list[Run], colors: list, key: str, path: Path) -> None:
    # Imported here: `elmforge sweep` reads run dirs through this module and draws nothing.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=PLOT_SIZE_IN, dpi=PLOT_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    title, ylabel = _field_title(key)
    handles = []
    for run, color in zip(runs, colors):
        steps, values = run.series.get(key, ([], []))
        drawn = False
        if steps:
            ax.plot(steps, values, color=color, linewidth=1.4, marker="." if len(steps) < 2 else None)
            drawn = True
        if key == "loss" and "val_loss" in run.series:
            vs, vv = run.series["val_loss"]
            ax.plot(vs, vv, color=color, linestyle="--", marker="o", markersize=5, linewidth=1.2)
            drawn = True
        if drawn:
            handles.append(Line2D([], [], color=color, linewidth=2, label=run.name))
    if key == "loss" and any("val_loss" in r.series for r in runs):
        handles += [Line2D([], [], color="0.3", linewidth=1.4, label="training loss"),
                    Line2D([], [], color="0.3", linestyle="--", marker="o", markersize=5, label="validation loss")]
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if key == "lr":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    if len(handles) <= LEGEND_INSIDE_MAX + 2:
        ax.legend(handles=handles, loc="best", fontsize="small", framealpha=0.85)
    else:
        fig.legend(handles=handles, loc="outside right upper", fontsize="x-small")
    fig.savefig(path, format="png", metadata={"Software": None})


# ---------------------------------------------------------------- HTML

def _fmt(v, spec: str) -> str:
    return "&ndash;" if v is None else format(v, spec)


def _html(runs: list[Run], rows: list[dict], charts: dict[str, Path], inputs: list[str]) -> str:
    show_mfu = any(r["mfu_median"] is not None for r in rows)
    show_settings = len(rows) > 1 and any(r["settings"] for r in rows)
    head = ["run", "steps", "final loss", "best val loss (step)", "median tokens/s"]
    head += ["median MFU"] if show_mfu else []
    head += ["settings that differ"] if show_settings else []
    head += ["status", "dir"]
    body = []
    for r in rows:
        best = _fmt(r["best_val_loss"], ".4f")
        if r["best_val_loss"] is not None and r["best_val_step"] is not None:
            best += f" ({r['best_val_step']})"
        cells = [
            ("name", html.escape(r["name"])),
            ("steps", _fmt(r["steps"], "d") if isinstance(r["steps"], int) else _fmt(r["steps"], "g")),
            ("final_loss", _fmt(r["final_loss"], ".4f")),
            ("best_val_loss", best),
            ("tokens_per_s_median", _fmt(r["tokens_per_s_median"], ",.0f")),
        ]
        if show_mfu:
            cells.append(("mfu_median", _fmt(r["mfu_median"], ".1%")))  # as the progress line prints it
        if show_settings:
            text = settings_text(r["settings"])
            cells.append(("settings", "&ndash;" if text is None else
                          f'<code title="{html.escape(text[1], quote=True)}">{html.escape(text[0])}</code>'))
        cells += [("status", html.escape(r["status"])), ("dir", f"<code>{html.escape(r['dir'])}</code>")]
        tds = "".join(f'<td class="{c}">{v}</td>' for c, v in cells)
        body.append(f'<tr data-run="{html.escape(r["name"], quote=True)}">{tds}</tr>')
    images = []
    for key, path in charts.items():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        title = html.escape(_field_title(key)[0])
        images.append(f'<figure><img alt="{title}" src="data:image/png;base64,{data}">'
                      f"<figcaption>{title}</figcaption></figure>")
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>elmforge report: {len(runs)} run{'s' if len(runs) != 1 else ''}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 2em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
th {{ background: #f3f3f3; }}
td.name, td.settings, td.status, td.dir {{ text-align: left; }}
figure {{ margin: 0 0 2em 0; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
figcaption {{ color: #666; font-size: small; }}
</style>
</head>
<body>
<h1>elmforge report</h1>
<p>{len(runs)} run{'s' if len(runs) != 1 else ''} from {", ".join(f"<code>{html.escape(p)}</code>" for p in inputs)};
generated {html.escape(generated)}.</p>
<table>
<thead><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr></thead>
<tbody>
{chr(10).join(body)}
</tbody>
</table>
{chr(10).join(images) if images else "<p>No numeric metrics recorded yet.</p>"}
</body>
</html>
"""


def _file_stem(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key)


def build_report(paths: list[str], out_dir: str) -> dict:
    """Write one PNG per metric and report.html into out_dir; return {"html": path, <metric>: png path, ...}."""
    runs = load_runs(paths)
    out = Path(out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # named as the flag it came from; the bare OSError names neither
        raise OSError(f"--out {out_dir}: cannot create this directory ({e.strerror})") from None
    colors = _colors(len(runs))
    charts: dict[str, Path] = {}
    for key in _chart_fields(runs):
        path = out / f"{_file_stem(key)}.png"
        _plot(runs, colors, key, path)
        charts[key] = path
    html_path = out / HTML_NAME
    rows = [{**run_row(r), "settings": settings} for r, settings in zip(runs, differing_settings(runs))]
    html_path.write_text(_html(runs, rows, charts, list(paths)), encoding="utf-8")
    return {"html": str(html_path), **{k: str(p) for k, p in charts.items()}}
