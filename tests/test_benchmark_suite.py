"""`pytest --benchmark-only --benchmark-json` on a tiny selection writes what a baseline needs."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_only_writes_json_with_names_and_images_per_s(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_benchmarks.py"),
         "--benchmark-only", f"--benchmark-json={out}", "-k", "freeze_plan or (loader_batch and cpu-torch]) or eval_step"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    benchmarks = {b["name"]: b for b in json.loads(out.read_text())["benchmarks"]}
    assert set(benchmarks) == {"test_freeze_plan_resnet50", "test_loader_batch[cpu-torch]", "test_eval_step[cpu]"}
    for name in ("test_loader_batch[cpu-torch]", "test_eval_step[cpu]"):
        assert benchmarks[name]["extra_info"]["images_per_s"] > 0
        assert benchmarks[name]["stats"]["rounds"] >= 10  # timed rounds, warm-up excluded
    assert benchmarks["test_freeze_plan_resnet50"]["stats"]["median"] > 0


def test_plain_pytest_runs_benchmarks_once_untimed(pytestconfig):
    # conftest.py turns timing off unless --benchmark-only/--benchmark-enable is given
    if pytestconfig.getoption("benchmark_only") or pytestconfig.getoption("benchmark_enable"):
        return
    assert pytestconfig.getoption("benchmark_disable") is True
