"""The notebooks run top to bottom: their code cells in order, in one fresh Python
process from the repository root (as a Jupyter kernel would run them), with tiny
settings assigned right after each notebook's cell tagged `parameters` (papermill's
convention). The quickstart trains the run the analysis notebook then reads."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")


def notebook_script(name: str, parameters: dict) -> str:
    """The notebook's code, with `parameters` assigned after its parameters cell."""
    with open(os.path.join(NOTEBOOKS, name)) as f:
        cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
    tagged = [c for c in cells if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1, f"{name}: needs exactly one cell tagged 'parameters'"
    source = "".join(tagged[0]["source"])
    unknown = [k for k in parameters if f"\n{k} =" not in "\n" + source]
    assert not unknown, f"{name}: its parameters cell sets no {unknown}"
    assert all(not c["outputs"] for c in cells), f"{name}: committed with outputs"
    parts = []
    for cell in cells:
        parts.append("".join(cell["source"]))
        if cell is tagged[0]:
            parts.append("\n".join(f"{k} = {v!r}" for k, v in parameters.items()))
    return "\n\n".join(parts) + "\n"


def run_notebook(name: str, parameters: dict, tmp_path) -> str:
    script = tmp_path / (name + ".py")
    script.write_text(notebook_script(name, parameters))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quickstart")
    run = str(tmp / "run")
    out = run_notebook("quickstart.ipynb", {"WORKDIR": run, "STEPS": 30, "NEW_TOKENS": 16}, tmp)
    return run, out


@pytest.mark.slow
def test_quickstart_trains_samples_and_measures_ar_ness(quickstart):
    run, out = quickstart
    assert os.path.isdir(os.path.join(run, "checkpoints", "30"))
    assert "backend: cpu" in out and "step 0:" in out
    assert out.count("local@1") == 3  # one line per unmasking rule


@pytest.mark.slow
def test_analysis_notebook_runs_on_the_quickstart_run(quickstart, tmp_path):
    run, _ = quickstart
    out = run_notebook("analysis.ipynb", {
        "RUN": run, "STYLE": "base", "LIMIT": 4, "N": 2, "MAX_NEW_TOKENS": 12,
        "TEMPERATURES": (0.0, 1.0)}, tmp_path)
    assert f"{run}: 4 tasks" in out
