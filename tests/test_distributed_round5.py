"""Ordinary distributed use that was refused without a reason or went silently wrong (round 5 of the distributed
probes). Layout checks run without a launch (they must fail before any process group exists); the multi-process
tests share one ``torchrun`` of 2 gloo ranks (``launched``), which runs the scenario of each."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import save_checkpoint, tiny_config
from transformers import AutoModelForCausalLM, DistributedConfig

from modeling_deepseek_v3.quantization.converter import DeepseekV3FP8Converter

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import _distributed_round5_worker as worker  # noqa: E402


def launch(out: Path, scenarios: dict[str, list[str]]) -> dict[str, list[dict]]:
    """The worker's results for each of ``scenarios`` ({name: [checkpoint, *args]}) on 2 gloo ranks, one dict per
    rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(HERE / "_distributed_round5_worker.py"), str(out),
               *(f"{name}={','.join(arguments)}" for name, arguments in scenarios.items())]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    return {name: [torch.load(out / f"{name}.rank{r}.pt", weights_only=False) for r in range(2)] for name in scenarios}


@pytest.fixture(scope="module")
def mtp_eos(tmp_path_factory):
    """An MTP checkpoint, an EOS id per rank that stops rank 0 early and not rank 1, and one process's sequences."""
    checkpoint = save_checkpoint(tiny_config(num_nextn_predict_layers=1), tmp_path_factory.mktemp("mtp") / "tiny")
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    free = [worker.generate(model, rank, eos=0)[0, 6:].tolist() for rank in range(2)]  # eos 0 (the pad id) is not drawn here
    eos = [free[0][2], next(t for t in range(1, 97) if t not in free[1])]  # rank 0 stops after 3 tokens, rank 1 runs on
    return checkpoint, eos, [worker.generate(model, rank, eos[rank]) for rank in range(2)]


@pytest.fixture(scope="module")
def launched(mtp_eos, tmp_path_factory):
    checkpoint, eos, _ = mtp_eos
    plain = save_checkpoint(tiny_config(), tmp_path_factory.mktemp("plain") / "tiny")
    # the head first: its ranks start from the random state of fresh processes, as in a launch of its own
    return launch(tmp_path_factory.mktemp("ranks"), {"new_head_tp2": [plain],
                                                     "mtp_generate_eos": [checkpoint, *map(str, eos)]})


@pytest.mark.parametrize("sizes", [dict(ep_size=2, fsdp_size=2), dict(tp_size=2)])
def test_an_fp8_folder_loaded_sharded_is_refused_before_any_process_group(tmp_path, launched_as, sizes):
    # The released checkpoints are FP8. Sharded, the quantizer's scale check stacked DTensors of two meshes (EP/FSDP)
    # or read a DTensor to the host (TP), after the process group and the whole load; the bf16 conversion shards.
    bf16 = save_checkpoint(tiny_config(), tmp_path / "bf16")
    DeepseekV3FP8Converter.from_pretrained(bf16).quantize(tmp_path / "fp8", progress=False)
    launched_as(2)
    with pytest.raises(ValueError, match=r"stored in FP8 .*deepseek-v3-convert SRC DST --to bf16"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", distributed_config=DistributedConfig(**sizes))
    assert not dist.is_initialized()


@pytest.mark.parametrize("config", [dict(ep_size=2, tp_size=2, tp_plan={}), dict(enable_expert_parallel=True, tp_size=2)])
def test_an_empty_tp_plan_with_a_tp_size_is_refused_before_any_process_group(tiny_checkpoint, launched_as, config):
    # transformers documents tp_plan={} as "no TP rule" (and the deprecated flag resolves to it), but its engine then
    # failed after the process group: "`tp_size=2` was requested, but `DeepseekV3ForCausalLM` has no `tp_plan`"
    launched_as(2)
    with pytest.warns(FutureWarning) if "enable_expert_parallel" in config else contextlib.nullcontext():
        distributed_config = DistributedConfig(**config)
    with pytest.raises(ValueError, match=r"tp_size=2 with an empty tp_plan .* fsdp_size=2 instead of tp_size"):
        AutoModelForCausalLM.from_pretrained(tiny_checkpoint, distributed_config=distributed_config)
    assert not dist.is_initialized()


def _train_distributed_example():
    path = Path(__file__).resolve().parents[1] / "examples" / "train_distributed.py"
    spec = importlib.util.spec_from_file_location("example_train_distributed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_distributed_refuses_tp_on_cpu_processes_by_name(monkeypatch, capsys):
    # Trainer gives accelerate a ParallelismConfig for a TP model, which accelerate refuses on CPU processes
    # ("only compatible DistributedType.FSDP ... but got DistributedType.MULTI_CPU") after the sharded load
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    example = _train_distributed_example()
    with pytest.raises(SystemExit):
        example.parse_args(["--tp-size", "2"])
    assert "argument --tp-size: 2 needs GPUs here" in capsys.readouterr().err
    assert example.parse_args(["--ep-size", "2", "--fsdp-size", "2"]).tp_size == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert example.parse_args(["--tp-size", "2"]).tp_size == 2


def test_mtp_decoding_on_a_sharded_model_stops_at_each_ranks_eos(mtp_eos, launched):
    # generate turns synced_gpus on for an FSDP-managed model; transformers' assisted loop then kept appending the
    # accepted tokens of the rank that had reached its EOS while the other rank went on: it returned tokens past EOS
    _, _, expected = mtp_eos
    assert expected[0].shape[1] <= 6 + 3 < expected[1].shape[1] == 6 + worker.MAX_NEW_TOKENS
    for rank, result in enumerate(launched["mtp_generate_eos"]):
        assert torch.equal(result["sequences"], expected[rank]), rank
        assert torch.equal(result["dict_sequences"], expected[rank]), rank


def test_a_head_initialised_at_load_is_the_same_on_every_tensor_parallel_rank(launched):
    # A classification head over a causal-LM checkpoint is initialised by from_pretrained; under TP it stays whole on
    # each rank, and each rank drew its own values: two ranks sharing a batch gave it different logits
    ranks = launched["new_head_tp2"]
    assert torch.equal(ranks[0]["score"], ranks[1]["score"])
    assert torch.equal(ranks[0]["logits"], ranks[1]["logits"])
