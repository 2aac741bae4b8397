"""``benchmarks/expert_parallel.py`` on two CPU ranks (EP 2, a few tokens): the rows are there for ours and
transformers' class, the bytes the all-to-all sent (from its split sizes) equal the formula ``top_k·H·bytes·2``, and
no token's experts lie on more ranks than group-limited routing allows. It checks the script, not the speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_expert_parallel_benchmark_runs_and_its_exchange_matches_the_formula(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "expert_parallel.py"), "--ep-sizes", "2", "--batch", "2",
               "--seq-len", "16", "--steps", "1", "--warmup", "0", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    rows = json.loads((tmp_path / "expert_parallel.json").read_text())["rows"]
    assert {(r["implementation"], r["ep_size"]) for r in rows} == {
        (name, 2) for name in ("ours", "ours, no MTP", "transformers")
    }
    for row in rows:
        hist = row["fan_out_histogram"]
        assert sum(hist) > 0 and all(n == 0 for n in hist[row["fan_out_bound"] + 1 :])
        assert row["measured_bytes_per_token"] == row["formula_bytes_per_token"] == 4 * 256 * 4 * 2
        assert 0 < row["measured_off_rank_bytes_per_token"] < row["measured_bytes_per_token"]
    assert "| ours | 2 |" in (tmp_path / "expert_parallel.md").read_text()
