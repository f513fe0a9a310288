"""bench/quality.py at a tiny size, so the quality benchmark of the trained model cannot rot."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import pytest  # noqa: E402
import quality  # noqa: E402
import torch  # noqa: E402


def test_every_table_runs_on_the_trained_model(capsys):
    threads = torch.get_num_threads()  # the benchmark fixes its own; the rest of the suite keeps ours
    try:
        quality.main(["--starts", "1", "--sections", "2", "--steps", "3", "--teacache", "0.1", "--magcache", "0.1",
                      "--speed-modes", "inverted"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "### 1. Modes" in out and "### 2. History budgets" in out and "### 3. Speed and memory" in out
    assert "### 4. One step at sigma" in out
    rows = [line.split(" | ")[1] for line in out.splitlines() if line.startswith("| inverted | ")]
    assert {"plain", "TeaCache 0.1", "MagCache 0.1", "MagCache 0.1, K=3", "fp8 weights (e4m3fn)", "CFG 2, sequential",
            "CFG 2, batched"} <= set(rows)
    assert "nan" not in out


def test_zero_starts_is_an_error_not_an_empty_table(capsys):
    with pytest.raises(SystemExit) as stop:
        quality.main(["--starts", "0"])
    assert stop.value.code == 2 and "--starts: must be 1 or more, got 0" in capsys.readouterr().err
