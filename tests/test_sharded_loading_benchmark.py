"""``benchmarks/sharded_loading.py`` on two CPU ranks over a 15-shard checkpoint: each of two EP × FSDP ranks
keeps half the model, and while loading it neither holds (peak anonymous memory) nor reads (file pages mapped) much
more than that — a rank that materialised or read the whole checkpoint would be at 1× or above."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_each_rank_loads_about_its_share_of_a_many_shard_checkpoint(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "sharded_loading.py"), "--ranks", "2",
               "--implementations", "ours", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    result = json.loads((tmp_path / "sharded_loading.json").read_text())
    checkpoint, shards = result["environment"]["checkpoint_bytes"], result["environment"]["shards"]
    assert shards >= 10
    (row,) = result["rows"]
    for rank in row["per_rank"]:
        assert rank["kept"] <= 0.5 * checkpoint, rank  # half the experts and half of every FSDP-sharded tensor
        assert rank["peak_anon"] <= 0.8 * checkpoint, rank
        assert rank["peak_file"] <= 0.85 * checkpoint, rank
    assert "| ours | 2 |" in (tmp_path / "sharded_loading.md").read_text()
