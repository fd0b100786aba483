"""`python -m bench.compare`: two real tiny CPU runs side by side, the comparability check, the CI gate,
older schemas, repeats over seeds, suite folders, and bad input."""
import csv
import json
import shutil
from pathlib import Path

import pytest

from bench.compare import main
from bench.run import main as run_main

# Two variants, 4 steps each on 32 px synthetic images: about 5 s a run on 2 cores.
TINY = ["--profile", "smoke", "--device", "cpu", "--train-size", "128", "--val-size", "64", "--batch-size", "32",
        "--workers", "1", "--epochs", "1", "--unfreeze", "1,3", "--no-evaluate-best"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two real runs that differ in the loader only: comparable, with different figures."""
    root = tmp_path_factory.mktemp("runs")
    assert run_main([*TINY, "--out", str(root / "dali")]) == 0
    assert run_main([*TINY, "--loader", "torch", "--out", str(root / "torch")]) == 0
    return root / "dali", root / "torch"


def results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def edited_copy(source: Path, target: Path, edit) -> Path:
    """A copy of a run folder's results.json, passed through `edit(doc)` first."""
    doc = results(source)
    edit(doc)
    target.mkdir(parents=True)
    (target / "results.json").write_text(json.dumps(doc))
    return target


def row(doc: dict, variant: str) -> dict:
    return next(r for r in doc["rows"] if r["variant"] == variant)


def aggregates(doc: dict, variant: str) -> list[dict]:
    """The variant's aggregate over seeds, in a list (empty where the run has none)."""
    return [a for a in doc.get("aggregates") or [] if a["variant"] == variant]


def scale(doc: dict, variant: str, figure: str, factor: float) -> None:
    """`figure` of `variant` times `factor`, in its row and in its aggregate over seeds."""
    row(doc, variant)[figure] *= factor
    for agg in aggregates(doc, variant):
        agg[figure].update({k: agg[figure][k] * factor for k in ("mean", "min", "max")})


def fail(doc: dict, variant: str, status: str) -> None:
    """`variant` did not finish: its row says why, and its aggregate has no seed and no figure."""
    row(doc, variant).update(status=status, error=status)
    for agg in aggregates(doc, variant):
        agg.update({k: None for k, v in agg.items() if isinstance(v, dict) and k != "failed"})
        agg.update(n=0, seeds=[], failed={str(row(doc, variant).get("seed")): status})


def rename(doc: dict) -> None:
    for r in [*doc["rows"], *doc.get("aggregates", [])]:
        r["variant"] = "other-" + r["variant"]


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def value(rows: list[dict], item: str, figure: str, folder: Path) -> dict:
    return next(r for r in rows if (r["item"], r["figure"], r["folder"]) == (item, figure, str(folder)))


def test_two_runs_side_by_side_with_ratios_and_a_csv(runs, tmp_path, capsys, monkeypatch):
    a, b = runs
    monkeypatch.chdir(tmp_path)
    assert main([str(a), str(b)]) == 0
    assert list(tmp_path.iterdir()) == []  # without --csv nothing is written
    out = capsys.readouterr().out
    for text in (f"A: {a} (", f"B: {b} (", "torch 2.", "B/A", "unfreeze-1", "unfreeze-3", "img/s", "peak mem",
                 "top-1 %"):
        assert text in out, text
    ra, rb = row(results(a), "unfreeze-1"), row(results(b), "unfreeze-1")
    assert f"{rb['images_per_s'] / ra['images_per_s']:.2f}×" in out

    assert main([str(a), str(b), "--csv", str(tmp_path / "out" / "compare.csv")]) == 0
    table = read_csv(tmp_path / "out" / "compare.csv")
    assert list(table[0]) == ["item", "figure", "folder", "value", "ratio_to_first"]
    assert {r["item"] for r in table} == {"unfreeze-1", "unfreeze-3"}
    assert {r["folder"] for r in table} == {str(a), str(b)}
    assert all(float(r["ratio_to_first"]) == 1.0 for r in table if r["folder"] == str(a))
    speed = value(table, "unfreeze-1", "images_per_s", b)
    assert float(speed["value"]) == rb["images_per_s"]
    assert float(speed["ratio_to_first"]) == pytest.approx(rb["images_per_s"] / ra["images_per_s"])
    assert {"images_per_s", "eval_images_per_s", "step_ms_median", "peak_mem_bytes", "mfu", "top1",
            "acc_per_gpu_hour"} <= {r["figure"] for r in table}


@pytest.mark.parametrize("setting, edit", [
    ("precision", {"precision": "bf16"}),
    ("batch_size", {"batch_size": 64}),
    ("model", {"model": "resnet50", "models": ["resnet50"]}),
    ("image_size", {"image_size": 224, "image_sizes": [224]}),
])
def test_incomparable_runs_are_refused_unless_forced(runs, tmp_path, capsys, setting, edit):
    a, _ = runs
    other = edited_copy(a, tmp_path / "other", lambda doc: doc["run"].update(edit))
    assert main([str(a), str(other)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert f"{other}: {setting} " in captured.err and str(a) in captured.err and "--force" in captured.err

    assert main([str(a), str(other), "--force"]) == 0
    captured = capsys.readouterr()
    assert "warning" in captured.err and setting in captured.err
    assert "unfreeze-1" in captured.out and "B/A" in captured.out


def test_fail_below_gates_on_training_and_evaluation_speed(runs, tmp_path, capsys):
    a, _ = runs

    def halve(figure):
        return lambda doc: scale(doc, "unfreeze-1", figure, 0.5)
    slow = edited_copy(a, tmp_path / "slow", halve("images_per_s"))
    assert main([str(a), str(slow), "--fail-below", "0.9"]) == 1
    out = capsys.readouterr().out
    assert "0.50×" in out and "regression: B unfreeze-1 img/s: 0.50× A's (--fail-below 0.9)" in out
    assert "unfreeze-3 img/s" not in out  # the unedited variant is not an offender
    assert main([str(a), str(slow), "--fail-below", "0.4"]) == 0
    assert main([str(a), str(slow)]) == 0  # no gate without the flag
    assert main([str(slow), str(a), "--fail-below", "0.9"]) == 0  # faster than the first is fine

    assert main([str(a), str(edited_copy(a, tmp_path / "slow-eval", halve("eval_images_per_s"))),
                 "--fail-below", "0.9"]) == 1
    assert "eval img/s: 0.50×" in capsys.readouterr().out
    # half the step time is a ratio of 0.5 too, but lower is better there: not gated
    assert main([str(a), str(edited_copy(a, tmp_path / "quick", halve("step_ms_median"))), "--fail-below", "0.9"]) == 0


def test_a_schema_3_run_is_read(runs, tmp_path_factory, capsys):
    # Under tmp_path_factory, not tmp_path: conftest checks every results.json in tmp_path against schema 4.
    a, _ = runs

    def to_schema_3(doc):
        doc["schema_version"], doc["depths"] = 3, doc.pop("rows")
        doc.pop("aggregates", None)
    old = edited_copy(a, tmp_path_factory.mktemp("old") / "schema3", to_schema_3)
    csv_path = tmp_path_factory.mktemp("csv") / "compare.csv"
    assert main([str(a), str(old), "--csv", str(csv_path)]) == 0
    table = read_csv(csv_path)
    assert {r["item"] for r in table} == {"unfreeze-1", "unfreeze-3"}
    assert all(float(r["ratio_to_first"]) == 1.0 for r in table)  # the same figures, read from `depths`
    assert "1.00×" in capsys.readouterr().out


def test_repeats_are_averaged_and_aggregates_win(runs, tmp_path, capsys):
    a, _ = runs
    base = row(results(a), "unfreeze-1")["images_per_s"]

    def two_seeds(doc):  # a second unfreeze-1 row (another seed) at 3x, no aggregates (as before schema 5): 2x
        doc["rows"].append({**row(doc, "unfreeze-1"), "images_per_s": 3 * base, "seed": 1})
        doc["aggregates"] = []
    seeds = edited_copy(a, tmp_path / "seeds", two_seeds)
    assert main([str(a), str(seeds), "--csv", str(tmp_path / "seeds.csv")]) == 0
    assert float(value(read_csv(tmp_path / "seeds.csv"), "unfreeze-1", "images_per_s", seeds)["ratio_to_first"]) \
        == pytest.approx(2.0)
    assert "(n=2)" in capsys.readouterr().out

    def aggregated(doc):  # three seeds' mean at 4x; the aggregate has images/s only, so top-1 comes from the row
        spread = {"mean": 4 * base, "std": 1.0, "min": 3 * base, "max": 5 * base, "n": 3, "ci95": [base, 7 * base]}
        doc["aggregates"] = [a for a in doc.get("aggregates", []) if a["variant"] != "unfreeze-1"] + [
            {"variant": "unfreeze-1", "n": 3, "runs": 3, "seeds": [0, 1, 2], "failed": {}, "images_per_s": spread}]
    agg = edited_copy(a, tmp_path / "agg", aggregated)
    assert main([str(a), str(agg), "--csv", str(tmp_path / "agg.csv")]) == 0
    table = read_csv(tmp_path / "agg.csv")
    assert float(value(table, "unfreeze-1", "images_per_s", agg)["ratio_to_first"]) == pytest.approx(4.0)
    assert float(value(table, "unfreeze-1", "top1", agg)["ratio_to_first"]) == 1.0  # not aggregated: the rows
    assert "(n=3)" in capsys.readouterr().out


def test_unfinished_and_unshared_variants_are_listed_after_the_table(runs, tmp_path, capsys):
    a, _ = runs

    failed = edited_copy(a, tmp_path / "oom", lambda doc: fail(doc, "unfreeze-3", "oom"))
    assert main([str(a), str(failed), "--csv", str(tmp_path / "c.csv")]) == 0
    assert "only in A: unfreeze-3 (B: oom)" in capsys.readouterr().out
    assert {r["item"] for r in read_csv(tmp_path / "c.csv")} == {"unfreeze-1"}
    # a variant that finished before and not after fails the gate, whatever the ratios
    assert main([str(a), str(failed), "--fail-below", "0.01"]) == 1
    assert "regression: B unfreeze-3: oom, where A finished it" in capsys.readouterr().out
    assert main([str(failed), str(a), "--fail-below", "0.01"]) == 0  # a variant that now finishes is fine


def make_suite(folder: Path, steps: dict[str, Path]) -> Path:
    """A suite-shaped folder: suite.json (the steps in the order given) and runs/<step>/results.json."""
    folder.mkdir()
    (folder / "suite.json").write_text(json.dumps({"steps": [{"name": step} for step in steps]}))
    for step, run in steps.items():
        (folder / "runs" / step).mkdir(parents=True)
        shutil.copy(run / "results.json", folder / "runs" / step / "results.json")
    return folder


def test_suite_folders_compare_step_by_step(runs, tmp_path, capsys):
    a, b = runs
    first = make_suite(tmp_path / "gpu1", {"throughput": a, "nchw": a})
    second = make_suite(tmp_path / "gpu2", {"throughput": b})
    assert main([str(first), str(second), "--csv", str(tmp_path / "suite.csv")]) == 0
    out = capsys.readouterr().out
    assert "throughput/unfreeze-1" in out and "step/variant" in out
    assert "only in A: nchw/unfreeze-1, nchw/unfreeze-3" in out
    table = read_csv(tmp_path / "suite.csv")
    assert {r["item"] for r in table} == {"throughput/unfreeze-1", "throughput/unfreeze-3"}
    ra, rb = row(results(a), "unfreeze-1"), row(results(b), "unfreeze-1")
    assert float(value(table, "throughput/unfreeze-1", "images_per_s", second)["ratio_to_first"]) == \
        pytest.approx(rb["images_per_s"] / ra["images_per_s"])

    # items follow the suite's order of steps (here not alphabetical)
    assert main([str(first), str(first), "--csv", str(tmp_path / "self.csv")]) == 0
    order = list(dict.fromkeys(r["item"] for r in read_csv(tmp_path / "self.csv")))
    assert order == ["throughput/unfreeze-1", "throughput/unfreeze-3", "nchw/unfreeze-1", "nchw/unfreeze-3"]
    # a suite.json without steps: every runs/<step>/results.json, by name
    (first / "suite.json").write_text("{}")
    assert main([str(first), str(second)]) == 0

    # settings are compared step by step; mixing a suite and a run is refused
    bf16 = edited_copy(b, tmp_path / "bf16", lambda doc: doc["run"].update(precision="bf16"))
    third = make_suite(tmp_path / "gpu3", {"throughput": bf16})
    assert main([str(first), str(third)]) == 2
    assert f"{third} throughput: precision bf16" in capsys.readouterr().err
    assert main([str(first), str(a)]) == 2
    err = capsys.readouterr().err
    assert f"{a} is a run folder" in err and len(err.strip().splitlines()) == 1


BAD_INPUT = {
    "one folder": (lambda a, t: [str(a)], "two or more"),
    "no such folder": (lambda a, t: [str(a), str(t / "missing")], "no such folder"),
    "no results.json": (lambda a, t: [str(a), str(t)], "no readable results.json"),
    "corrupt results.json": (lambda a, t: [str(a), str(write(t / "bad", "results.json", "{"))], "no readable"),
    "not a run": (lambda a, t: [str(a), str(write(t / "bad", "results.json", '{"rows": []}'))], "not a bench.run"),
    "corrupt suite.json": (lambda a, t: [str(write(t / "s1", "suite.json", "[")), str(write(t / "s2", "suite.json",
                                                                                          "["))], "suite.json"),
    "suite without runs": (lambda a, t: [str(write(t / "s1", "suite.json", "{}")), str(write(t / "s2", "suite.json",
                                                                                            "{}"))], "runs/"),
    "nothing shared": (lambda a, t: [str(a), str(edited_copy(a, t / "renamed", rename))], "no variant finished"),
    "unwritable --csv": (lambda a, t: [str(a), str(a), "--csv", str(write(t, "file", "") / "x.csv")], "--csv"),
    "--fail-below 0": (lambda a, t: [str(a), str(a), "--fail-below", "0"], "positive"),
    "--fail-below junk": (lambda a, t: [str(a), str(a), "--fail-below", "fast"], "--fail-below"),
    "unknown flag": (lambda a, t: [str(a), str(a), "--bogus"], "--bogus"),
}


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder / name if name == "file" else folder


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_and_exit_2(runs, tmp_path_factory, capsys, case):
    make_argv, expected = BAD_INPUT[case]
    a, _ = runs
    scratch = tmp_path_factory.mktemp("bad")  # not tmp_path: some of these files are not valid results on purpose
    argv = make_argv(a, scratch)
    before = sorted(a.iterdir())
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1, captured.err
    assert expected in captured.err
    assert sorted(a.iterdir()) == before
    assert not list(scratch.rglob("*.csv"))  # nothing written
