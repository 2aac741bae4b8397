"""Smoke test of ``benchmarks/train_step.py`` (a functional test: it checks the rows and files, never speed)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

BENCHMARK = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "train_step.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_step_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_prints_ours_and_transformers(bench, tmp_path, capsys):
    threads = torch.get_num_threads()
    assert bench.main(["--tiny", "--steps", "1", "--variants", "ours grouped_mm", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert any(r.startswith("| transformers |") for r in rows) and any(r.startswith("| ours grouped_mm |") for r in rows)
    assert "device: " in out and "torch " in out and "shapes: batch 2, seq_len 16" in out
    with open(tmp_path / "train_step.json") as f:
        result = json.load(f)
    assert [r["name"] for r in result["rows"]] == ["transformers", "ours grouped_mm"]
    theirs, ours = result["rows"]
    assert ours["tokens_per_s"] > 0 and theirs["tokens_per_s"] > 0
    # the same weights and batch: the first training losses agree (ours adds the tiny α-weighted balance loss)
    assert abs(ours["first_loss"] - theirs["first_loss"]) < 1e-2
    assert (tmp_path / "train_step.md").read_text().count("| ours grouped_mm |") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_without_cuda_and_tiny_it_exits_with_a_message(bench, capsys):
    assert bench.main([]) == 2
    assert "CUDA GPU" in capsys.readouterr().err
