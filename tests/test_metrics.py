"""dllm.metrics: metrics.jsonl and TensorBoard events in a local or gs:// workdir
(tests/conftest.py: fake_gcs); after a resume, every step once."""
import json
import struct

import pytest
from tensorboardX.proto import event_pb2

from dllm import fs, metrics


def read_scalars(path: str) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in a TFRecord event file, parsed by hand:
    records are [u64 length][u32 crc][payload][u32 crc]."""
    data, out, pos = fs.read_bytes(path), [], 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
        out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
        pos += 12 + n + 4
    return out


@pytest.mark.parametrize("where", ["local", "gs"])
def test_metrics_writer_appends_across_runs(where, tmp_path, request):
    if where == "gs":
        request.getfixturevalue("fake_gcs")
    workdir = str(tmp_path / "run") if where == "local" else "gs://bucket/run"
    writer = metrics.MetricsWriter(workdir)
    writer.write(1, {"loss": 2.5, "accuracy": 0.25})
    writer.write(2, {"loss": 2.0, "accuracy": 0.5})
    writer.close()
    resumed = metrics.MetricsWriter(workdir)       # a resumed run appends
    resumed.write(3, {"loss": 1.5, "accuracy": 0.75})
    resumed.close()

    assert metrics.read_metrics(workdir) == [
        {"step": 1, "loss": 2.5, "accuracy": 0.25}, {"step": 2, "loss": 2.0, "accuracy": 0.5},
        {"step": 3, "loss": 1.5, "accuracy": 0.75}]
    events = fs.listdir(f"{workdir}/tensorboard")
    assert len(events) == 2 and all(e.startswith("events.out.tfevents.") for e in events)
    scalars = sorted(s for e in events for s in read_scalars(f"{workdir}/tensorboard/{e}"))
    assert scalars == [(1, "accuracy", 0.25), (1, "loss", 2.5), (2, "accuracy", 0.5),
                       (2, "loss", 2.0), (3, "accuracy", 0.75), (3, "loss", 1.5)]


def test_a_resume_drops_the_rows_after_its_checkpoint(tmp_path):
    rows = [{"step": 0, "eval_nelbo": 5.0}] + [{"step": s, "loss": 1.0 / s} for s in range(1, 8)]
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "lo')   # killed mid-write
    metrics.drop_rows_after(str(tmp_path), 4)
    assert metrics.read_metrics(str(tmp_path)) == rows[:5]
    metrics.drop_rows_after(str(tmp_path), 4)                          # nothing more to drop
    assert metrics.read_metrics(str(tmp_path)) == rows[:5]
    metrics.drop_rows_after(str(tmp_path), 0)                          # a fresh start
    assert metrics.read_metrics(str(tmp_path)) == []
    metrics.drop_rows_after(str(tmp_path / "none"), 3)                 # no file: nothing to do
