"""Shared fixtures: tiny DeepSeek-V3 configs and official-layout checkpoint folders built on the spot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import transformers  # noqa: E402

import modeling_deepseek_v3  # noqa: E402,F401
from modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


def tiny_config(**overrides) -> DeepseekV3Config:
    """A DeepSeek-V3 with every feature switched on (q-LoRA, 2 expert groups, YaRN, a dense first layer)."""
    fields = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=12,
        v_head_dim=10,
        n_routed_experts=8,
        n_group=2,
        topk_group=1,
        num_experts_per_tok=3,
        first_k_dense_replace=1,
        n_shared_experts=1,
        num_nextn_predict_layers=0,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
        rope_scaling=dict(YARN),
        rope_theta=10000.0,
    )
    if "rope_parameters" in overrides and "rope_theta" not in overrides:
        del fields["rope_theta"]  # the block carries its own theta
    fields.update(overrides)
    return DeepseekV3Config(**fields)


@pytest.fixture
def launched_as(monkeypatch):
    """Pretend to be one of ``n`` processes of a launch (torchrun's environment), with no process group."""

    def set_world(n: int):
        monkeypatch.setenv("WORLD_SIZE", str(n))
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("LOCAL_RANK", "0")

    return set_world


def edit_tensors(path, edit):
    """Rewrite the safetensors file ``path`` after ``edit(tensors)`` changed its dict of tensors in place."""
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_json(path, edit):
    """Rewrite the JSON file ``path`` (a pathlib.Path) after ``edit(content)`` changed it in place."""
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))


def build_model(config: DeepseekV3Config, seed: int = 0) -> DeepseekV3ForCausalLM:
    """A randomly initialised fp32 model whose router biases are non-zero (so tests exercise them)."""
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.2)
    return model


def save_checkpoint(config: DeepseekV3Config, folder, seed: int = 0) -> str:
    build_model(config, seed).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Folder of an official-layout tiny checkpoint (fp32)."""
    return save_checkpoint(tiny_config(), tmp_path / "tiny")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


# Test files whose tests also run in a child pytest under the Triton interpreter (their `interpreter`-marked test
# asks for it), as collected in this session; the children start together when the first one is asked for, since
# each is one single-threaded process (the interpreter executes every tile in Python).
_INTERPRETED_FILES: list[str] = []
_INTERPRETER_RUNS: dict[str, tuple[subprocess.Popen, object]] = {}


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        if item.get_closest_marker("interpreter") and str(item.path) not in _INTERPRETED_FILES:
            _INTERPRETED_FILES.append(str(item.path))


def _start_under_triton_interpreter(test_file: str) -> None:
    output = tempfile.TemporaryFile("w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
        env=dict(os.environ, TRITON_INTERPRET="1"), stdout=output, stderr=subprocess.STDOUT, text=True,
        cwd=os.path.dirname(test_file),
    )
    _INTERPRETER_RUNS[test_file] = (process, output)


def run_file_under_triton_interpreter(test_file: str) -> None:
    """Run ``test_file``'s tests in a child pytest with ``TRITON_INTERPRET=1`` (it must be set before triton is
    imported, which this process already did) and fail unless all of them ran and passed."""
    pytest.importorskip("triton")
    for path in dict.fromkeys([*_INTERPRETED_FILES, test_file]):
        if path not in _INTERPRETER_RUNS:
            _start_under_triton_interpreter(path)
    process, output = _INTERPRETER_RUNS[test_file]
    try:
        process.wait(timeout=900)
    finally:
        process.kill()
    output.seek(0)
    log = output.read()
    print("interpreter run:", *log.strip().splitlines()[-1:])
    assert process.returncode == 0, log[-12000:]
    assert " passed" in log and " skipped" not in log, log[-2000:]


# Each phase's report ("setup", "call", "teardown") of a test, kept on its item so that a fixture's teardown can see
# how the test itself went (pytest's documented recipe; tests/test_transformers_conformance.py reads it).
PHASE_REPORTS = pytest.StashKey[dict]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    item.stash.setdefault(PHASE_REPORTS, {})[report.when] = report
    return report


@pytest.fixture(scope="module")
def padded_batch():
    """Two prompts of 6 tokens (ids below the tiny vocabulary of 97), the second left-padded by 2 (pad id 0)."""
    ids = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return ids.masked_fill(mask == 0, 0), mask
