"""The examples' command lines: a bad number is an argparse error naming the option, before any model is built
(``--steps -1`` once meant "train whole epochs" and ``--steps 0`` trained nothing without a word)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

from modeling_deepseek_v3.cli import existing_file, non_negative, positive

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # the fine-tuning examples import finetune_common beside them
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BAD = [
    ("sft_lora", ["--steps", "0"], "argument --steps: must be a positive int, got 0"),
    ("dpo", ["--steps", "-1"], "argument --steps: must be a positive int, got -1"),
    ("dpo", ["--learning-rate", "nan"], "argument --learning-rate: must be a positive float, got nan"),
    ("grpo", ["--generations", "0"], "argument --generations: must be a positive int, got 0"),
    ("finetune_trainer", ["--batch-size", "0"], "argument --batch-size: must be a positive int, got 0"),
    ("finetune_trainer", ["--bias-update-speed", "-0.1"], "argument --bias-update-speed: must be a non-negative float"),
    ("train_accelerate", ["--grad-accum", "0"], "argument --grad-accum: must be a positive int, got 0"),
    ("train_accelerate", ["--seq-len", "ten"], "argument --seq-len: invalid int value: 'ten'"),
    ("train_distributed", ["--ep-size", "0"], "argument --ep-size: must be a positive int, got 0"),
    ("train_distributed", ["--bias-update-speed", "inf"], "argument --bias-update-speed: must be a non-negative float"),
    ("convert_bf16_fp8", ["some/folder"], "required with a source (some/folder): destination"),
]


@pytest.mark.parametrize("name,argv,message", BAD, ids=[f"{n}:{' '.join(a)}" for n, a, _ in BAD])
def test_a_bad_argument_is_an_error_naming_the_option(name, argv, message, monkeypatch, capsys):
    module = _example(name, monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name", ["sft_lora", "dpo", "grpo", "finetune_trainer", "train_accelerate", "train_distributed"])
def test_the_defaults_parse(name, monkeypatch):
    args = _example(name, monkeypatch).parse_args([])
    assert args.steps > 0


def test_the_types_accept_the_boundaries():
    assert positive(int)("3") == 3 and positive(float)("1e-3") == 1e-3
    assert non_negative(float)("0") == 0.0 and non_negative(int)("0") == 0
    for parse, text in [(positive(int), "0"), (positive(float), "inf"), (non_negative(float), "-1e-9"),
                        (non_negative(float), "nan")]:
        with pytest.raises(argparse.ArgumentTypeError, match=f"got {text}"):
            parse(text)
    with pytest.raises(argparse.ArgumentTypeError, match="no such file: missing.json"):
        existing_file("missing.json")
