"""metrics.jsonl after a resume: every step once."""
import json

from dllm import metrics


def _write(path, rows, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_a_resume_drops_the_rows_after_its_checkpoint(tmp_path):
    rows = [{"step": 0, "eval_nelbo": 5.0}] + [{"step": s, "loss": 1.0 / s} for s in range(1, 8)]
    _write(tmp_path / "metrics.jsonl", rows, tail='{"step": 8, "lo')   # killed mid-write
    metrics.drop_rows_after(str(tmp_path), 4)
    assert metrics.read_metrics(str(tmp_path)) == rows[:5]
    metrics.drop_rows_after(str(tmp_path), 4)                          # nothing more to drop
    assert metrics.read_metrics(str(tmp_path)) == rows[:5]
    metrics.drop_rows_after(str(tmp_path), 0)                          # a fresh start
    assert metrics.read_metrics(str(tmp_path)) == []
    metrics.drop_rows_after(str(tmp_path / "none"), 3)                 # no file: nothing to do
