"""What a reader copies from the documentation works: dotted API names resolve, the plugin registration example
registers and trains, the options in the documented command lines exist in the scripts they call, the examples'
``--help`` prints their docstring, and the README's count of host reads in a training step holds."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch

import modeling_deepseek_v3
from modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_reads import PYTHON_READS, HostReads  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]
_FENCE = re.compile(r"```(\w*)\n(.*?)```", re.DOTALL)
_FILE_SUFFIXES = {"py", "md", "json", "txt", "sh", "toml", "yaml", "safetensors", "jsonl", "csv", "png"}


def _modules() -> dict[str, list[str]]:
    """Last name -> full import names of the package's modules, from the source folders (an editable install
    maps plugins/ and quantization/ through a finder that pkgutil does not walk)."""
    folders = {"modeling_deepseek_v3": "modeling_deepseek_v3", "plugins": "modeling_deepseek_v3.plugins",
               "quantization": "modeling_deepseek_v3.quantization"}
    found: dict[str, list[str]] = {"modeling_deepseek_v3": ["modeling_deepseek_v3"]}
    for folder, package in folders.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            if name != "modeling_deepseek_v3.modeling_deepseek_v3":  # `modeling_deepseek_v3.x` reads as the package's
                found.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    return found


def _resolves(module: str, attributes: list[str]) -> bool:
    parts = module.split(".") + attributes
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for name in parts[i:]:
                obj = getattr(obj, name)
        except AttributeError:
            return False
        return True
    return False


def test_dotted_names_in_the_docs_resolve():
    """`checkpoint.validate_checkpoint_files`, `modeling_deepseek_v3.CheckpointError`, ...: the first name is a module
    of the package, the rest attributes (`modeling_deepseek_v3.sum_losses` once named a function of the package that
    only its modeling module has)."""
    modules = _modules()
    bad = []
    for page in PAGES:
        for match in re.finditer(r"`([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)", page.read_text(encoding="utf-8")):
            first, *rest = match.group(1).split(".")
            if first not in modules or rest[-1] in _FILE_SUFFIXES:
                continue
            if not any(_resolves(module, rest) for module in modules[first]):
                bad.append(f"{page.relative_to(REPO)}: {match.group(1)}")
    assert not bad, f"names the package does not have: {sorted(set(bad))}"


def _tiny_fields(**overrides) -> dict:
    fields = json.loads(resources.files(modeling_deepseek_v3).joinpath("defaults/tiny_config.json").read_text())
    fields.update(overrides)
    return fields


def test_the_plugin_registration_example_registers_and_trains():
    page = (REPO / "docs" / "plugins.md").read_text(encoding="utf-8")
    section = page.split("## Registering a plugin", 1)[1]
    code = next(body for lang, body in _FENCE.findall(section) if lang == "python")
    namespace: dict = {}
    exec(compile(code, "docs/plugins.md", "exec"), namespace)  # refused at registration if it lacks a forward
    name = next(iter(re.findall(r'register_plugin\("router", "(\w+)"\)', code)))
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**_tiny_fields(topk_method=name))).train()
    gates = [layer.mlp.gate for layer in model.model.decoder_layers if hasattr(layer.mlp, "gate")]
    assert gates and all(type(gate).plugin_name == name for gate in gates)
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and gates[0].weight.grad is not None
    assert float(gates[0].tokens_per_expert.sum()) > 0
    model.update_expert_bias()


def _command_lines():
    """(page, script, line) for each documented command that runs a script of the repository."""
    sources = [(page, body) for page in PAGES for lang, body in _FENCE.findall(page.read_text(encoding="utf-8"))
               if lang in ("bash", "")]
    sources += [(page, page.read_text(encoding="utf-8").split('"""')[1]) for page in sorted((REPO / "examples").glob("*.py"))]
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    sources.append((REPO / "README.md", " ".join(readme.split())))  # the multi-node line is inline text
    for page, text in sources:
        for line in text.splitlines():
            line = line.split(" # ")[0]
            for segment in line.split("&&"):
                script = re.search(r"((?:examples|benchmarks)/\w+\.(?:py|sh)|deepseek-v3-convert)\b", segment)
                if script:
                    yield page, script.group(1), segment[script.end():]


def test_the_options_of_documented_commands_exist():
    """Each ``--option`` after a script in the docs (commands in code blocks, the examples' usage lines, the README's
    multi-node line) is one the script defines."""
    missing, seen = [], 0
    for page, script, rest in _command_lines():
        path = REPO / ("quantization/converter.py" if script == "deepseek-v3-convert" else script)
        source = path.read_text(encoding="utf-8")
        for option in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest.split("`")[0]):
            seen += 1
            if f'"{option}"' not in source and f"{option})" not in source:
                missing.append(f"{page.relative_to(REPO)}: {script} {option}")
    assert seen > 20, "the command lines were not found"
    assert not missing, f"options the scripts do not define: {missing}"


EXAMPLES = ["sft_lora", "dpo", "grpo", "finetune_trainer", "train_accelerate", "train_distributed",
            "convert_bf16_fp8", "load_official_checkpoint", "push_to_hub"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_an_examples_help_prints_its_docstring(name, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "examples"))
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        (module.parse_args if hasattr(module, "parse_args") else module.main)()
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert module.__doc__.strip() in printed, f"--help of examples/{name}.py does not print its docstring"


@pytest.mark.parametrize("mtp_layers,reads", [(0, 2), (1, 3)])
def test_a_training_step_reads_the_host_as_the_readme_says(mtp_layers, reads):
    """README, Decoding: twice (our input check, our labels check); with MTP modules transformers' mask builder
    once more."""
    torch.manual_seed(0)
    config = DeepseekV3Config(**_tiny_fields(experts_backend="grouped_mm", num_nextn_predict_layers=mtp_layers))
    model = DeepseekV3ForCausalLM(config).train()
    ids = torch.randint(3, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with HostReads() as host:
        model(ids, labels=ids).loss.backward()
    python_reads = sum(host.counts[name] for name in PYTHON_READS)
    assert python_reads == reads, host.where
