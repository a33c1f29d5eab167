"""`benchmarks.asked_texts` runs as `make bench` runs it: its last line is one JSON object with
the timings of both paths, and the shared vision-tower pass answers exactly as one per text."""

from __future__ import annotations

import json
import subprocess
import sys


def test_asked_texts_benchmark_prints_both_paths_and_their_answers_agree():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.asked_texts", "--json", "--texts", "4",
         "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["shared_seconds"] > 0 and out["per_text_seconds"] > 0
    assert out["speedup"] == round(out["per_text_seconds"] / out["shared_seconds"], 2)
    assert out["max_abs_diff"] < 1e-5
