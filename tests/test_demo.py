"""The main job's two demos run end to end on a tiny scale (their numbers are not asserted)."""

import pytest

from fused_cel import demo

pytest.importorskip("transformers")


def test_training_demo(tmp_path, capsys):
    png = tmp_path / "loss.png"
    argv = ["--size", "tiny", "--steps", "4", "--seq", "32", "--batch", "2", "--plot", str(png), "--device", "cpu"]
    results = demo.main(argv)
    out = capsys.readouterr().out
    assert "max |diff| vs stock" in out and "fused_cel against stock: losses equal to" in out
    assert png.stat().st_size > 0
    stock, fused = results["stock"]["losses"], results["fused_cel"]["losses"]
    assert len(stock) == 4 and max(abs(a - b) for a, b in zip(stock, fused)) < 1e-4  # fp32, same batches


def test_training_demo_rejects_unknown_method():
    with pytest.raises(SystemExit):
        demo.main(["--methods", "stock,foo", "--device", "cpu"])


def test_head_demo(capsys):
    demo.main(["head", "--tokens", "256", "--hidden", "64", "--vocab", "2000", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "plain PyTorch" in out and "fused_cel" in out
