"""``examples/train_distributed.py`` as the README launches it: Trainer on transformers' distributed engine, CPU
ranks over gloo. After a few optimizer steps (gradient accumulation included), the multi-process run saves, from its
sharded ranks, the official layout with the same parameters (relative error < 1e-5) and the same router biases as
the example run in one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import relative_error
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_distributed.py"
TRAINING = ["--steps", "3", "--grad-accum", "2", "--global-batch-size", "4", "--block-size", "32"]


def run(launcher: list[str], output: Path, *args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([*launcher, str(EXAMPLE), "--output-dir", str(output), *TRAINING, *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    output = tmp_path_factory.mktemp("one")
    run([sys.executable], output)
    return output


def assert_same_training(folder: Path, reference: Path) -> None:
    ours, expected = load_file(folder / "final" / "model.safetensors"), load_file(reference / "final" / "model.safetensors")
    assert ours.keys() == expected.keys()
    assert any(k.endswith(".mlp.experts.15.down_proj.weight") for k in ours)  # every expert, per-expert names
    biases = [k for k in expected if k.endswith("e_score_correction_bias")]
    assert biases and any((expected[k] != 0).any() for k in biases)
    for name in expected:
        if name in biases:
            assert torch.equal(ours[name], expected[name]), name
        else:
            assert relative_error(ours[name], expected[name]) < 1e-5, name


def test_accelerate_launch_ep2_fsdp2_trains_like_one_process(one_process, tmp_path):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "examples" / "accelerate_distributed.yaml"),
                "--main_process_port", "0"]
    run(launcher, tmp_path, "--checkpoint", str(one_process / "init"), "--ep-size", "2", "--fsdp-size", "2")
    assert_same_training(tmp_path, one_process)


@pytest.mark.slow
def test_torchrun_four_ranks_ep2_dp2_trains_like_one_process(one_process, tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4"]
    run(launcher, tmp_path, "--checkpoint", str(one_process / "init"), "--ep-size", "2", "--fsdp-size", "2",
        "--dp-replicate-size", "2")
    assert_same_training(tmp_path, one_process)
