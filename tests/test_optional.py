"""Optional dependencies stay optional: with hypothesis, DALI, timm, selenium and torch-tb-profiler all
missing (the GPU machine has none of the first, fourth and fifth, and DALI only once staged), pytest
still collects every test module, and the tests that need one skip with the reason instead of stopping
collection for the whole suite. `.ci/run` also collects and runs a part of the suite in a venv shaped
like that machine; this test keeps the rule on every machine that runs the suite."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = ("hypothesis", "nvidia.dali", "timm", "selenium", "torch_tb_profiler")

# A meta-path finder in front of every other one: a blocked module (or a submodule of one) is found, so
# that code which only looks for it (torch's dynamo probes third-party packages with find_spec) goes on,
# but importing it raises ModuleNotFoundError, exactly what a missing package does.
BLOCK = f"""
import importlib.abc, importlib.machinery, sys
BLOCKED = {OPTIONAL!r}
class Missing(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            return importlib.machinery.ModuleSpec(name, self)
        return None
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {{spec.name!r}}", name=spec.name)
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, Missing())
import pytest
# hypothesis's pytest plugin is an entry point of the hypothesis package: absent with it
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "tests"]))
"""


def test_every_test_module_is_collected_without_the_optional_dependencies():
    proc = subprocess.run([sys.executable, "-c", BLOCK], cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "error" not in out.splitlines()[-1].lower(), out[-3000:]
    collected = {line.split("::")[0] for line in out.splitlines() if "::" in line}
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")}
    # A module may be skipped whole (it needs the missing package and says so); none may fail to import.
    skipped = {m for m in modules if f"SKIPPED [1] {m}:" in out}
    assert modules - skipped <= collected, sorted(modules - skipped - collected)
    assert {"tests/test_fuzz.py", "tests/test_dali.py"} <= skipped
