"""python -m fused_cel.bench on the CPU: rows, columns, files and accuracy. Times are never asserted."""

import csv
import json
import math

import pytest
import torch

from fused_cel import bench

METHODS = ["plain", "fused_cel", "fused_cel[chunk_size=16]"]
TOKENS = [32, 64]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One small benchmark run shared by the tests: (output directory, returned rows)."""
    out = tmp_path_factory.mktemp("bench")
    argv = ["--device", "cpu", "--dtype", "fp32", "--shape", "64,32,500", "--tokens", "32", "--tokens", "64"]
    argv += ["--methods", ",".join(METHODS), "--reps", "2", "--warmup", "1", "--error-tokens", "32"]
    rows = bench.main(argv + ["--profile", "--out", str(out)])
    return out, rows


def test_csv_and_json_have_one_row_per_shape_and_method(run):
    out, rows = run
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == bench.COLUMNS
        csv_rows = list(reader)
    json_rows = json.loads((out / "results.json").read_text())
    expected = [(n, m) for n in TOKENS for m in METHODS]
    assert [(int(r["N"]), r["method"]) for r in csv_rows] == expected
    assert [(r["N"], r["method"]) for r in json_rows] == expected
    assert json_rows == rows
    for r in json_rows:
        assert set(r) == set(bench.COLUMNS)
        assert (r["status"], r["gpu"], r["dtype"], r["mode"]) == ("ok", "CPU", "fp32", "fwd+bwd")
        assert (r["D"], r["V"], r["softcap"]) == (32, 500, None)
        assert r["torch"] and r["triton"] and r["date"]
        for key in ("ms", "floor_ms", "ratio_to_floor", "tflops"):  # present, not judged
            assert isinstance(r[key], float) and math.isfinite(r[key]), (r["method"], key, r[key])
        assert r["extra_mib"] is None  # CUDA only


def test_errors_against_fp64_are_small_in_fp32(run):
    _, rows = run
    for r in rows:
        for key in ("loss_err", "dx_err", "dw_err"):
            assert math.isfinite(r[key]) and r[key] < 1e-4, (r["method"], r["N"], key, r[key])


def test_plots_and_profile_traces_are_written(run):
    out, _ = run
    names = [f"custom-D32-V500-N{n}.png" for n in TOKENS] + ["scaling-custom-D32-V500.png"]
    for name in names:
        assert (out / name).stat().st_size > 0, name
    for method in ("fused_cel", "fused_cel_chunk_size_16"):  # --profile: the first shape only
        trace = json.loads((out / f"trace-{method}.json").read_text())
        assert trace["traceEvents"]


def test_unavailable_peers_are_skipped_with_a_note(tmp_path):
    argv = ["--device", "cpu", "--dtype", "fp32", "--shape", "16,8,50", "--methods", "plain,liger,cce"]
    rows = bench.main(argv + ["--reps", "1", "--warmup", "0", "--error-tokens", "8", "--out", str(tmp_path)])
    assert [r["status"] for r in rows] == ["ok", "skipped", "skipped"]
    assert all(r["note"] for r in rows[1:])


def test_unknown_method_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--shape", "16,8,50", "--methods", "plain,flash_ce", "--out", str(tmp_path)])
    assert "flash_ce" in capsys.readouterr().err
    with pytest.raises(ValueError, match="chunk_sise"):
        bench.parse_methods("fused_cel[chunk_sise=16]")


def test_fused_settings_are_parsed():
    assert bench.fused_kwargs("fused_cel") == {}
    assert bench.fused_kwargs("fused_cel[chunk_size=4096; backend=torch]") == {"chunk_size": 4096, "backend": "torch"}
    assert bench.fused_kwargs("fused_cel[softcap=30.0;check_labels=False]") == {"softcap": 30.0, "check_labels": False}


def test_out_of_memory_is_recorded_not_raised(tmp_path, monkeypatch):
    def oom(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    build = bench.build_method
    monkeypatch.setattr(bench, "build_method", lambda spec, *a: oom if spec == "plain" else build(spec, *a))
    argv = ["--device", "cpu", "--dtype", "fp32", "--shape", "16,8,50", "--methods", "plain,fused_cel"]
    rows = bench.main(argv + ["--reps", "1", "--warmup", "0", "--error-tokens", "8", "--out", str(tmp_path)])
    assert [r["status"] for r in rows] == ["OOM", "ok"]
    assert rows[0]["ms"] is None and rows[0]["loss_err"] is None and "OutOfMemoryError" in rows[0]["note"]
    assert (tmp_path / "results.csv").exists() and (tmp_path / "custom-D8-V50-N16.png").stat().st_size > 0
