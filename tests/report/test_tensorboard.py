"""TensorBoard export without TensorBoard: event files are TFRecords of hand-encoded Event protobufs.

The reader below is written independently of the writer (a generic protobuf wire-format walker and a
bitwise CRC-32C), so the round trip checks the encoding rather than restating it."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from mlaudit.report.tensorboard import crc32c, masked_crc, write_tensorboard


def _crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
    return crc ^ 0xFFFFFFFF


def _fields(buf: bytes) -> list[tuple[int, int, object]]:
    """(field number, wire type, value) of a protobuf message: varint, fixed64, bytes, fixed32."""
    out, i = [], 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 1:
            v, i = buf[i:i + 8], i + 8
        elif wt == 2:
            n, i = _varint(buf, i)
            v, i = buf[i:i + n], i + n
        elif wt == 5:
            v, i = buf[i:i + 4], i + 4
        else:
            raise AssertionError(f"wire type {wt}")
        out.append((num, wt, v))
    return out


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, i


def _read(path: Path) -> list[dict]:
    data, i, events = path.read_bytes(), 0, []
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        (lcrc,) = struct.unpack("<I", data[i + 8:i + 12])
        assert lcrc == masked_crc(data[i:i + 8])
        body = data[i + 12:i + 12 + n]
        (dcrc,) = struct.unpack("<I", data[i + 12 + n:i + 16 + n])
        assert dcrc == masked_crc(body)
        i += 16 + n
        ev: dict = {"scalars": {}}
        for num, _wt, v in _fields(body):
            if num == 1:
                ev["wall_time"] = struct.unpack("<d", v)[0]
            elif num == 2:
                ev["step"] = v
            elif num == 3:
                ev["file_version"] = v.decode()
            elif num == 5:
                for _n, _w, value in _fields(v):
                    parts = dict((f, x) for f, _w2, x in _fields(value))
                    ev["scalars"][parts[1].decode()] = struct.unpack("<f", parts[2])[0]
        events.append(ev)
    return events


@pytest.mark.parametrize("data", [b"", b"123456789", bytes(range(256)) * 3])
def test_crc32c_matches_the_bitwise_definition(data: bytes) -> None:
    assert crc32c(data) == _crc32c_bitwise(data)
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value


def test_run_metrics_and_trials_round_trip(tmp_path: Path) -> None:
    run = {"id": "abc", "metrics": {"test_accuracy.mean": 0.875, "test_accuracy.se": 0.01, "name": "x",
                                    "bad": float("nan"), "flag": True},
           "trials": [{"trial_id": "m0", "status": "done", "result": {"metrics": {"test_accuracy": 0.5, "steps": 3}}},
                      {"trial_id": "m1", "status": "failed", "result": None},
                      {"trial_id": "m2", "status": "done", "result": {"metrics": {"test_accuracy": 0.75}}}]}
    path = write_tensorboard(run, tmp_path / "tb")
    events = _read(path)
    assert events[0]["file_version"] == "brain.Event:2"
    assert events[1]["scalars"] == {"metrics/test_accuracy/mean": 0.875, "metrics/test_accuracy/se": pytest.approx(0.01)}
    assert [(e["step"], e["scalars"]) for e in events[2:]] == [
        (0, {"trials/test_accuracy": 0.5, "trials/steps": 3.0}), (1, {"trials/test_accuracy": 0.75})]


def test_tensorboard_itself_reads_the_file_when_installed(tmp_path: Path) -> None:
    """TensorBoard's own record reader and Event protobuf (checked here on 2026-12-02 with tensorboard 2.21
    installed beside the venv; skipped where it is not installed)."""
    loader = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")
    from tensorboard.compat.proto import event_pb2

    path = write_tensorboard({"id": "a", "metrics": {"auc": 0.75}, "trials": []}, tmp_path)
    events = [event_pb2.Event.FromString(raw) for raw in loader.RawEventFileLoader(str(path)).Load()]
    assert events[0].file_version == "brain.Event:2"
    values = [(v.tag, v.simple_value) for e in events for v in e.summary.value]
    assert values == [("metrics/auc", 0.75)]


def test_cli_exports_a_run_to_tensorboard(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mlaudit.cli import app
    from mlaudit.store import RunStore

    store = RunStore(tmp_path / "s.db")
    exp = store.create_experiment(kind="train", name="t", config={}, out_dir=tmp_path / "o")
    store.commit_trial(exp, "m0", {"metrics": {"test_accuracy": 0.9}}, wall_s=1.0)
    store.put_metrics(exp, {"test_accuracy": {"mean": 0.9, "se": 0.0}})
    res = CliRunner().invoke(app, ["runs", "export", exp, "--format", "tensorboard", "--out", str(tmp_path / "tb"),
                                   "--store", str(tmp_path / "s.db")])
    assert res.exit_code == 0, res.output
    (path,) = (tmp_path / "tb").iterdir()
    events = _read(path)
    assert events[1]["scalars"]["metrics/test_accuracy/mean"] == pytest.approx(0.9)
    res = CliRunner().invoke(app, ["runs", "export", exp, "--format", "csv", "--store", str(tmp_path / "s.db")])
    assert res.exit_code == 2 and "json, tensorboard or mlflow" in res.output
    assert json.loads(CliRunner().invoke(app, ["runs", "export", exp, "--store", str(tmp_path / "s.db")]).stdout)["id"] == exp
