"""`elmforge report`: charts and a self-contained HTML page from real metrics.jsonl files on disk."""

import base64
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from cluster.report import PLOT_SIZE_PX, build_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, steps: int, *, seed: float, val_every: int | None = None, extra: tuple = (),
              nan_at: tuple = (), summary: bool = False) -> list[dict]:
    """A run dir with a real metrics.jsonl (as MetricsLogger writes it); returns the records."""
    run_dir.mkdir(parents=True)
    records = []
    for step in range(1, steps + 1):
        rec = {
            "step": step, "time": 1.7e9 + step, "loss": 9.0 - seed - 3 * math.log1p(step) / math.log1p(steps)
            + 0.05 * math.sin(step * seed), "ce_loss": 8.9 - seed, "lr": 3e-3 * min(1.0, step / 3),
            "grad_norm": 1.0 + 0.1 * step, "tokens_per_s": 1000.0 * (1 + seed) + 37 * (step % 5),
            "step_time_s": 0.5, "tokens": 1024 * step, "skipped": 0,
        }
        if "mfu" in extra:
            rec["mfu"] = 0.3 + 0.01 * seed + 0.001 * step
        if "memory_gb" in extra:
            rec["memory_gb"] = 10.0 + seed
        if step in nan_at:
            rec["loss"] = rec["grad_norm"] = float("nan")
            rec["skipped"] = 1
        if val_every and (step % val_every == 0 or step == steps):
            rec["val_loss"] = 8.0 - seed - 0.01 * step + 0.3 * (step == steps)  # the last one is not the best
            rec["val_perplexity"] = math.exp(rec["val_loss"])
        records.append(rec)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")  # NaN written as NaN, as json.dumps does in the logger
    if summary:
        losses = [r["loss"] for r in records]
        (run_dir / "summary.json").write_text(json.dumps({
            "run_name": run_dir.name, "steps": steps, "stopped_by": None, "final_loss": losses[-1],
            "final_val_loss": records[-1].get("val_loss"), "losses": losses,
        }))
    return records


def expected_row(records: list[dict]) -> dict:
    losses = [r["loss"] for r in records if math.isfinite(r["loss"])]
    vals = [(r["val_loss"], r["step"]) for r in records if "val_loss" in r]
    best = min(vals) if vals else None
    return {
        "steps": str(records[-1]["step"]),
        "final_loss": f"{losses[-1]:.4f}",
        "best_val_loss": f"{best[0]:.4f} ({best[1]})" if best else "\u2013",
    }


class _Page(HTMLParser):
    """The run table (data-run -> {cell class: text}) and every src/href of the page."""

    def __init__(self):
        super().__init__()
        self.rows, self.links, self._row, self._cell = {}, [], None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [attrs[k] for k in ("src", "href") if k in attrs]
        if tag == "tr" and "data-run" in attrs:
            self._row = self.rows.setdefault(attrs["data-run"], {})
        elif tag == "td" and self._row is not None:
            self._cell = attrs.get("class")
            self._row[self._cell] = ""

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data):
        if self._row is not None and self._cell:
            self._row[self._cell] += data


def parse_page(path: str) -> _Page:
    page = _Page()
    page.feed(Path(path).read_text(encoding="utf-8"))
    return page


def assert_png(data_or_path) -> Image.Image:
    data = Path(data_or_path).read_bytes() if isinstance(data_or_path, (str, Path)) else data_or_path
    assert len(data) > 0 and data.startswith(PNG_MAGIC)
    import io

    img = Image.open(io.BytesIO(data))
    img.load()  # decodes the whole image: a truncated file fails here
    assert img.format == "PNG" and img.size == PLOT_SIZE_PX and img.size[0] >= 400 and img.size[1] >= 300
    darkest, lightest = img.convert("L").getextrema()
    assert darkest < 100 and lightest > 200  # something was drawn on the canvas
    return img


@pytest.fixture
def sweep_and_run(tmp_path):
    """A sweep dir with 3 trials (val loss, MFU, memory, a NaN step) and a separate single run without val loss."""
    sweep = tmp_path / "sweep"
    trials = {
        "trial_lr1e-3": write_run(sweep / "trial_lr1e-3", 30, seed=0.0, val_every=10, extra=("mfu", "memory_gb"),
                                  summary=True),
        "trial_lr3e-3": write_run(sweep / "trial_lr3e-3", 30, seed=0.4, val_every=10, extra=("mfu", "memory_gb"),
                                  nan_at=(7,)),
        "trial_lr1e-2": write_run(sweep / "trial_lr1e-2", 12, seed=0.8, val_every=5, extra=("mfu",),
                                  nan_at=(12,)),  # stopped early; its last loss is NaN
    }
    single = {"lonely_run": write_run(tmp_path / "runs" / "lonely_run", 8, seed=0.2)}
    return sweep, tmp_path / "runs" / "lonely_run", {**trials, **single}


def test_report_of_a_sweep_and_a_run(sweep_and_run, tmp_path):
    sweep, run_dir, all_records = sweep_and_run
    out = build_report([str(sweep), str(run_dir)], str(tmp_path / "report"))

    for key in ("loss", "lr", "tokens_per_s", "mfu", "memory_gb", "grad_norm"):
        assert Path(out[key]) == tmp_path / "report" / f"{key}.png"
        assert_png(out[key])
    assert not any(k in out for k in ("time", "step", "tokens", "skipped", "val_loss", "ce_loss"))

    text = Path(out["html"]).read_text(encoding="utf-8")
    for name in all_records:
        assert name in text
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == len(out) - 1
    for b64 in images:
        assert_png(base64.b64decode(b64, validate=True))
    page = parse_page(out["html"])
    assert page.links and all(link.startswith("data:image/png;base64,") for link in page.links)
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", text, re.IGNORECASE)
    assert "http://" not in text and "https://" not in text

    assert list(page.rows) == ["trial_lr1e-2", "trial_lr1e-3", "trial_lr3e-3", "lonely_run"]
    for name, records in all_records.items():
        row = page.rows[name]
        for key, want in expected_row(records).items():
            assert row[key] == want, (name, key)
    assert page.rows["trial_lr1e-3"]["status"] == "finished"
    assert page.rows["lonely_run"]["status"].startswith("running")
    tps = sorted(r["tokens_per_s"] for r in all_records["lonely_run"])  # 8 steps: the mean of the middle two
    assert page.rows["lonely_run"]["tokens_per_s_median"] == f"{(tps[3] + tps[4]) / 2:,.0f}"
    mfu = sorted(r["mfu"] for r in all_records["trial_lr1e-3"])  # 30 steps
    assert page.rows["trial_lr1e-3"]["mfu_median"] == f"{(mfu[14] + mfu[15]) / 2:.1%}"
    assert page.rows["lonely_run"]["mfu_median"] == "\u2013"


def test_the_table_shows_the_settings_in_which_runs_differ(tmp_path):
    base = {"model": {"name": "openelm_tiny", "num_layers": 4}, "train": {"lr": 3e-4, "betas": [0.9, 0.95]},
            "run": {"name": "x"}, "logger": {"project": "p"}, "storage_path": "/s"}
    configs = {
        "a": base,
        "b": {**base, "train": {"lr": 1e-3, "betas": [0.9, 0.95]}, "run": {"name": "y"}, "storage_path": "/t"},
        "c": {**base, "model": {"name": "openelm_tiny", "num_layers": 6}, "train": {"betas": [0.9, 0.99]}},
        "old": None,  # trained before runs recorded their config
    }
    for name, config in configs.items():
        write_run(tmp_path / name, 4, seed=0.1)
        if config is not None:
            (tmp_path / name / "run_config.json").write_text(json.dumps(config))
    rows = parse_page(build_report([str(tmp_path)], str(tmp_path / "report"))["html"]).rows
    assert rows["a"]["settings"] == "model.num_layers=4, train.betas=[0.9, 0.95], train.lr=0.0003"
    assert rows["b"]["settings"] == "model.num_layers=4, train.betas=[0.9, 0.95], train.lr=0.001"
    assert rows["c"]["settings"] == "model.num_layers=6, train.betas=[0.9, 0.99], train.lr=unset"
    assert rows["old"]["settings"] == "\u2013"


def test_settings_that_change_what_a_run_computes_come_first_and_all_are_in_the_tooltip(tmp_path):
    # Eight that change how a run went or was watched, and the warmup, which changes its result.
    watched = {"train": {"log_every": 1, "checkpoint_every": 2, "eval_batches": 3, "keep_checkpoints": 4,
                         "warmup_steps": 5}, "cluster": {"launcher": "ray", "num_cpus": 4, "dashboard": False},
               "data": {"workers": 1}}
    other = {"train": {"log_every": 9, "checkpoint_every": 9, "eval_batches": 9, "keep_checkpoints": 9,
                       "warmup_steps": 50}, "cluster": {"launcher": "local", "num_cpus": 9, "dashboard": True},
             "data": {"workers": 9}}
    for name, config in (("a", watched), ("b", other)):
        write_run(tmp_path / name, 4, seed=0.1)
        (tmp_path / name / "run_config.json").write_text(json.dumps(config))
    page = build_report([str(tmp_path)], str(tmp_path / "report"))["html"]
    shown = parse_page(page).rows["b"]["settings"]
    assert shown.startswith("train.warmup_steps=50, ") and shown.endswith(" (+1 more)"), shown
    assert 'title="train.warmup_steps=50, cluster.dashboard=true, cluster.launcher=local, ' in Path(page).read_text()
    # The batch's factors change the result too: their product names the run.
    for name, workers in (("a", 1), ("b", 2)):
        config = json.loads((tmp_path / name / "run_config.json").read_text())
        config["cluster"]["num_workers"] = workers
        (tmp_path / name / "run_config.json").write_text(json.dumps(config))
    page = build_report([str(tmp_path)], str(tmp_path / "report"))["html"]
    assert parse_page(page).rows["b"]["settings"].startswith("cluster.num_workers=2, train.warmup_steps=50, ")


def test_summary_json_wins_over_metrics(tmp_path):
    records = write_run(tmp_path / "r", 5, seed=0.1, summary=True)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    summary.update(run_name="named-in-summary", final_loss=1.2345, steps=99)
    (tmp_path / "r" / "summary.json").write_text(json.dumps(summary))
    row = parse_page(build_report([str(tmp_path / "r")], str(tmp_path / "out"))["html"]).rows["named-in-summary"]
    assert row["final_loss"] == "1.2345" and row["steps"] == "99"
    assert records[-1]["loss"] != 1.2345


@pytest.mark.parametrize("summary, scheduler_stop, status", [
    ({"stopped_by": None}, None, "finished"),
    ({"stopped_by": "SIGTERM"}, None, "stopped (SIGTERM)"),
    ({"stopped_by": "STOP file"}, None, "stopped (STOP file)"),
    ({"preempted": True}, None, "stopped"),  # an older summary.json
    ({"preempted": False}, None, "finished"),
    (None, None, "running or stopped (no summary.json)"),
    ({"stopped_by": "stopped early by ASHA at step 4"}, 4, "stopped early by ASHA at step 4 (val_loss 6.2500)"),
    (None, 4, "stopped early by ASHA at step 4 (val_loss 6.2500)"),  # still saving its last checkpoint
    ({"stopped_by": None}, 4, "finished"),  # it ran its last step before the stop request reached it
    # Stopped at step 4 and resumed: that summary.json is the stopped invocation's, not how the run ended.
    ({"stopped_by": "SIGTERM", "steps": 4}, None, "running or stopped (resumed after step 4, no summary.json since)"),
])
def test_status_says_how_the_run_ended(tmp_path, summary, scheduler_stop, status):
    write_run(tmp_path / "trial", 6, seed=0.1, val_every=2)
    if summary is not None:
        (tmp_path / "trial" / "summary.json").write_text(json.dumps({"steps": 6, **summary}))
    if scheduler_stop is not None:
        record = {"scheduler": "ASHA", "step": scheduler_stop, "metric": "val_loss", "value": 6.25}
        (tmp_path / "trial" / "scheduler_stop.json").write_text(json.dumps(record))
    row = parse_page(build_report([str(tmp_path / "trial")], str(tmp_path / "out"))["html"]).rows["trial"]
    assert row["status"] == status and row["steps"] == "6"  # as far as metrics.jsonl goes, at least


def test_runs_found_up_to_three_levels_down_deduplicated_and_same_names_told_apart(tmp_path):
    write_run(tmp_path / "a" / "outputs" / "run", 3, seed=0.0)
    write_run(tmp_path / "b" / "outputs" / "run", 3, seed=0.5)
    metrics_file = tmp_path / "a" / "outputs" / "run" / "metrics.jsonl"
    out = build_report([str(tmp_path / "a"), str(tmp_path / "b" / "outputs"), str(metrics_file)],
                       str(tmp_path / "out"))
    assert list(parse_page(out["html"]).rows) == ["a/outputs/run", "b/outputs/run"]
    # A storage path takes in its runs and every sweep's trials, three levels down.
    write_run(tmp_path / "a" / "sweeps" / "lr" / "_trial_1", 3, seed=0.2)
    out = build_report([str(tmp_path / "a")], str(tmp_path / "out2"))
    assert list(parse_page(out["html"]).rows) == ["run", "_trial_1"]


def test_many_runs_keep_the_image_size(tmp_path):
    for i in range(12):
        write_run(tmp_path / "sweep" / f"trial_{i:02d}", 6, seed=i / 12, val_every=3)
    out = build_report([str(tmp_path / "sweep")], str(tmp_path / "out"))
    assert_png(out["loss"])
    assert len(parse_page(out["html"]).rows) == 12


def test_run_with_only_a_few_fields(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0, "note": "text is ignored"}\n\n'
                                       '{"step": 2, "loss": NaN}\n')
    out = build_report([str(run)], str(tmp_path / "out"))
    assert set(out) == {"html", "loss"}
    row = parse_page(out["html"]).rows["bare"]
    assert row["final_loss"] == "5.0000" and row["best_val_loss"] == "\u2013" and row["steps"] == "2"


def test_empty_metrics_file_is_a_run_without_charts(tmp_path):
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "metrics.jsonl").write_text("")
    out = build_report([str(tmp_path / "new")], str(tmp_path / "out"))
    assert set(out) == {"html"} and "new" in parse_page(out["html"]).rows


def test_bad_line_names_file_and_line(tmp_path):
    records = write_run(tmp_path / "sweep" / "t1", 4, seed=0.0)
    path = tmp_path / "sweep" / "t1" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:25]  # a truncated record on line 3
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: not valid JSON")):
        build_report([str(tmp_path / "sweep")], str(tmp_path / "out"))
    path.write_text(json.dumps(records[0]) + "\n" + json.dumps({"loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: no numeric 'step'")):
        build_report([str(tmp_path / "sweep")], str(tmp_path / "out"))
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: expected a JSON object")):
        build_report([str(tmp_path / "sweep")], str(tmp_path / "out"))


def test_a_last_line_still_being_written_is_left_out(tmp_path):
    write_run(tmp_path / "sweep" / "t1", 4, seed=0.0)
    with open(tmp_path / "sweep" / "t1" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 2.')  # a run training now, or one a full disk cut short
    out = build_report([str(tmp_path / "sweep")], str(tmp_path / "out"))
    assert parse_page(out["html"]).rows["t1"]["steps"] == "4"


def test_no_runs_names_the_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "deep" / "a" / "b" / "c" / "d").mkdir(parents=True)
    (tmp_path / "deep" / "a" / "b" / "c" / "d" / "metrics.jsonl").write_text("")  # four levels down: not searched
    with pytest.raises(FileNotFoundError, match="no runs found under .*empty.*, .*deep"):
        build_report([str(tmp_path / "empty"), str(tmp_path / "deep")], str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="missing: no such file"):
        build_report([str(tmp_path / "missing")], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_report_names_an_override_and_an_out_dir_it_cannot_create(tmp_path, capsys):
    from cluster.cli import main

    write_run(tmp_path / "run", 3, seed=0.0)
    assert main(["report", str(tmp_path / "run"), "storage_path=/x"]) == 1
    assert "elmforge report: storage_path=/x: no such file or directory; report takes run dirs, not overrides" in (
        capsys.readouterr().err)
    (tmp_path / "file").write_text("")
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "file" / "out")]) == 1
    assert f"elmforge report: --out {tmp_path}/file/out: cannot create this directory (Not a directory)" in (
        capsys.readouterr().err)


@pytest.mark.integration
def test_report_of_a_real_training_run(tiny_dataset, tmp_path):
    from cluster.config import compose_config
    from trainer.train_loop import train

    overrides = [
        "model.num_layers=2", "model.model_dim=64", "model.head_dim=16", "model.ffn_dim_divisor=16",
        "tokenizer.vocab_size=300", "data.seq_len=32", f"data.dir={tiny_dataset}", f"storage_path={tmp_path}",
        "train.max_steps=4", "train.warmup_steps=1", "train.micro_batch_size=4", "train.eval_every=2",
        "train.eval_batches=2", "logger=none",
    ]
    cfg = compose_config(overrides)
    result = train(cfg)
    out = build_report([str(tmp_path / "outputs")], str(tmp_path / "report"))
    for key in ("loss", "lr", "tokens_per_s"):
        assert_png(out[key])
    records = [json.loads(line) for line in open(result["metrics"])]
    page = parse_page(out["html"])
    row = page.rows[cfg["run"]["name"]]
    assert row["final_loss"] == f"{result['final_loss']:.4f}" and row["status"] == "finished"
    assert "val_loss" in records[1] and row["best_val_loss"] == expected_row(records)["best_val_loss"]
    assert "settings" not in row  # one run: nothing to tell apart

    # A second run of another learning rate and logging: the table names the setting that changes the result.
    other = compose_config([*overrides, "train.lr=0.01", "train.log_every=2", "logger.project=elsewhere"])
    train(other)
    page = parse_page(build_report([str(tmp_path / "outputs")], str(tmp_path / "report"))["html"])
    assert page.rows[cfg["run"]["name"]]["settings"] == f"train.lr={cfg['train']['lr']}, train.log_every={cfg['train']['log_every']}"
    assert page.rows[other["run"]["name"]]["settings"] == "train.lr=0.01, train.log_every=2"


@pytest.mark.parametrize("n", [3, 10, 20, 25, 64])
def test_every_run_of_a_sweep_gets_a_colour_of_its_own(n):
    from cluster.report import _colors

    assert len(set(_colors(n))) == n
