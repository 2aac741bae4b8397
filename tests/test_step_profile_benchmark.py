"""Smoke tests of ``benchmarks/step_profile.py`` and ``benchmarks/gpu_suite.sh`` (functional: they check the rows,
the files and that the numbers parse, never speed)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
SCRIPT = os.path.join(ROOT, "benchmarks", "step_profile.py")
SUITE = os.path.join(ROOT, "benchmarks", "gpu_suite.sh")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def load_script():
    spec = importlib.util.spec_from_file_location("step_profile_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table(markdown: str) -> tuple[list[str], dict[str, list[str]]]:
    """Header and rows (by first cell) of the main table: the first Markdown table with an 'implementation' column."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| implementation | experts |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells
    return header, rows


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The tiny step profile and the suite's dry run, started together: each is one mostly single-threaded process,
    so on a 2-core machine the pair takes about as long as the longer one. Their output goes to files (a full pipe
    would stall a process until the test reading it comes along)."""
    folder = tmp_path_factory.mktemp("step_profile")
    commands = {
        "profile": ([sys.executable, SCRIPT, "--tiny", "--out", str(folder / "profile.json")], ENV, folder / "profile.json"),
        "suite": (["bash", SUITE, str(folder / "suite"), "--dry-run"], dict(ENV, PYTHON=sys.executable), folder / "suite"),
    }
    runs = {}
    for name, (command, env, out) in commands.items():
        streams = [open(folder / f"{name}.{stream}", "w+") for stream in ("stdout", "stderr")]
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=streams[0], stderr=streams[1], text=True)
        runs[name] = (process, streams, out)
    yield runs
    for process, streams, _ in runs.values():
        process.kill()
        process.wait()
        for stream in streams:
            stream.close()


def finished(run, timeout=900):
    """(exit status, stdout, stderr, output path) of a launched run, once it has ended."""
    process, streams, out = run
    process.wait(timeout=timeout)
    stdout, stderr = (stream.seek(0) or stream.read() for stream in streams)
    return process.returncode, stdout, stderr, out


@pytest.fixture(scope="module")
def tiny_run(launched):
    returncode, stdout, stderr, out = finished(launched["profile"])
    assert returncode == 0, stdout[-4000:] + stderr[-4000:]
    return stdout, out


def test_tiny_table_has_both_models_and_numbers(tiny_run):
    stdout, out = tiny_run
    header, rows = table(stdout)
    assert "transformers" in rows and "ours experts=eager" in rows and "ours experts=grouped_mm" in rows
    assert "ours mla_mode=expanded" in rows and "ours mla_mode=absorbed" in rows
    assert "device: " in stdout and "torch " in stdout and "transformers " in stdout and "triton " in stdout
    column = {name: i for i, name in enumerate(header)}
    integer = ["decode ATen ops", "decode host syncs", "train host syncs", "compiled decode graphs", "graph breaks"]
    real = ["KV bytes/token", "train step ms", "train / transformers", "decode step ms @64", "decode / transformers"]
    gpu = [name for name in header if name.startswith("GPU decode tok/s")]
    assert gpu == ["GPU decode tok/s b1", "GPU decode tok/s b32"]
    profiled = []
    for name, cells in rows.items():
        assert len(cells) == len(header), cells
        if name != "transformers" and cells[1].startswith("unavailable: "):
            continue  # the model code does not support these kwargs (yet): said in the row, not a crash
        profiled.append(name)
        for field in integer:
            assert re.fullmatch(r"\d+", cells[column[field]]), (name, field, cells[column[field]])
        for field in real:
            assert float(cells[column[field]]) > 0, (name, field)
        assert int(cells[column["decode ATen ops"]]) > 0 and int(cells[column["compiled decode graphs"]]) >= 1
        for field in gpu:
            assert cells[column[field]] in ("skipped (--tiny)", "n/a (no GPU)"), cells[column[field]]
    assert "transformers" in profiled and any(name.startswith("ours") for name in profiled)
    assert rows["transformers"][column["train / transformers"]] == "1.00"
    assert rows["transformers"][column["decode / transformers"]] == "1.00"
    # the per-op table of host syncs and the graph-break list follow the main table
    assert "Host-synchronising ops per op name" in stdout and "Graph breaks of the compiled static-cache decode step" in stdout

    report = json.loads(out.read_text())
    assert out.with_suffix(".md").read_text() in stdout
    assert {"torch", "transformers", "triton", "python", "cpu", "gpu"} <= set(report["env"])
    assert report["settings"]["tiny"] is True and report["settings"]["batch"] == 1
    by_name = {r["name"]: r for r in report["rows"]}
    config = report["config"]
    latent_bytes = (config["kv_lora_rank"] + config["qk_rope_head_dim"]) * 4 * config["num_hidden_layers"]  # fp32
    for name in profiled:
        row = by_name[name]
        assert isinstance(row["decode"]["syncs"], dict) and isinstance(row["train"]["syncs"], dict)
        assert sum(s["count"] for s in row["decode"]["sync_sites"]) == sum(row["decode"]["syncs"].values())
        if name.startswith("ours"):
            assert row["kv_bytes_per_token"] == latent_bytes  # MLA caches c_kv and k_rope only


def test_counter_sees_host_synchronising_ops():
    module = load_script()
    x = torch.tensor([0, 2, 2, 1])
    original_tolist = torch.Tensor.tolist
    counter = module.StepCounter()
    with counter:
        x.sum().item()
        x.nonzero()
        x.tolist()
        x[x > 0]
        torch.bincount(x)
        torch.unique(x)
        torch.repeat_interleave(x)
        x + 1
    assert counter.syncs == {"aten._local_scalar_dense": 1, "aten.nonzero": 1, "Tensor.tolist": 1,
                             "aten.index (bool mask)": 1, "aten.bincount": 1, "aten._unique2": 1,
                             "aten.repeat_interleave": 1}
    assert counter.ops >= 8  # sum, item, nonzero, gt, index, bincount, unique, repeat_interleave, add
    assert torch.Tensor.tolist is original_tolist  # restored on exit
    assert x.tolist() == [0, 2, 2, 1]


def test_gpu_suite_dry_run_writes_every_table(launched):
    returncode, stdout, stderr, out = finished(launched["suite"])
    log = (out / "log.txt").read_text() if (out / "log.txt").exists() else ""
    assert returncode == 0, stdout[-3000:] + stderr[-3000:] + log[-4000:]
    for name in ("log.txt", "pytest_gpu.txt", "train_step.md", "train_step.json", "decode.md", "decode.json",
                 "step_profile.md", "step_profile.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for step in ("pytest_gpu", "fp8_gemm", "train_step", "decode", "step_profile"):
        assert re.search(rf"\] {step}: .*\n    (ok|skipped)", log), step
        assert (out / f"{step}.log").is_file()
    assert "## versions" in log and "torch " in log and "transformers " in log and "triton" in log
    assert "## device" in log and "all steps ok or skipped" in log
    assert "| transformers |" in (out / "step_profile.md").read_text()


def test_gpu_suite_goes_on_past_failing_steps_and_exits_non_zero(tmp_path):
    out = tmp_path / "suite"
    result = subprocess.run(["bash", SUITE, str(out)], cwd=ROOT, env=dict(ENV, PYTHON="false"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    log = (out / "log.txt").read_text()
    for step in ("pytest_gpu", "fp8_gemm", "train_step", "decode", "step_profile"):
        assert re.search(rf"\] {step}: .*\n    FAILED \(exit 1\)", log), step
    assert "failed: pytest_gpu fp8_gemm train_step decode step_profile" in log
