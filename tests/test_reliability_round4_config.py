"""Careless inputs to the config, the plugin registry, the distributed entry, the demo, the examples and the
benchmarks: each is an error naming the field, option or value, where it used to be accepted and silently ignored or
fail deep and unnamed."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import transformers
from transformers import DistributedConfig

from conftest import YARN, build_model, save_checkpoint, tiny_config
from modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM, register_plugin
from modeling_deepseek_v3 import registry
from modeling_deepseek_v3.registry import ENTRY_POINT_GROUP, load_entry_point_plugins

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ROOT / "tests" / "fixtures" / "deepseek_v3_official_config.json"


# ---------------------------------------------------------------------------------------------------
# config fields
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [2, 0, True, "1"])
def test_config_ep_size_other_than_1_is_named_not_ignored(value):
    # DeepSeek's own inference code reads ep_size; here it would be stored and no expert ever sharded by it
    with pytest.raises(ValueError, match=rf"`ep_size` must be 1 .*got {re.escape(repr(value))}.*DistributedConfig"):
        tiny_config(ep_size=value)
    config = tiny_config()
    config.ep_size = value
    with pytest.raises(ValueError, match=r"`ep_size` must be 1"):
        DeepseekV3ForCausalLM(config)


def test_from_json_file_of_a_list_names_the_file(tmp_path):
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"The config file .*list.json must hold a JSON object, got list"):
        DeepseekV3Config.from_json_file(tmp_path / "list.json")


def test_released_configs_with_ep_size_1_still_load(tmp_path):
    (tmp_path / "config.json").write_text(OFFICIAL.read_text())
    assert transformers.AutoConfig.from_pretrained(tmp_path).ep_size == 1
    assert tiny_config(ep_size=1).ep_size == 1


def test_rope_scaling_and_rope_parameters_that_disagree_are_named(tmp_path):
    # transformers reads rope_scaling when both are set: the rope_parameters given beside it would be dropped
    with pytest.raises(ValueError, match=r"`rope_scaling` and `rope_parameters` disagree \(.*factor: 4.0 vs 8.0"):
        tiny_config(rope_parameters={**YARN, "factor": 8.0})
    # a folder we save writes both blocks; editing only rope_parameters in its config.json is named at load
    build_model(tiny_config()).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["rope_scaling"] and saved["rope_parameters"]
    saved["rope_parameters"]["factor"] = 2.0
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"disagree \(factor: 4.0 vs 2.0\).*edit both, or delete `rope_scaling`"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_rope_blocks_that_agree_are_accepted(tmp_path):
    config = tiny_config(rope_parameters={**YARN, "rope_type": "yarn"})
    assert config.rope_parameters["factor"] == 4.0
    build_model(tiny_config()).save_pretrained(tmp_path)  # both blocks, the same values
    assert transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters["rope_type"] == "yarn"


@pytest.mark.parametrize("value", [[], "", 0])
def test_an_empty_non_dict_rope_scaling_is_named(value):
    # transformers reads `rope_scaling or rope_parameters`: [] silently meant plain RoPE
    with pytest.raises(TypeError, match=rf"Config field `rope_scaling` must be a dict \(or null\), got {re.escape(repr(value))}"):
        tiny_config(rope_scaling=value)


@pytest.mark.parametrize("value", ["no", 0, 1.0])
def test_yarn_truncate_must_be_a_bool(value):
    with pytest.raises(ValueError, match=rf"entry `truncate` must be true or false, got {re.escape(repr(value))}"):
        tiny_config(rope_scaling={**YARN, "truncate": value})
    assert tiny_config(rope_scaling={**YARN, "truncate": False}).rope_parameters["truncate"] is False


# ---------------------------------------------------------------------------------------------------
# plugin registry
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, name", [("attention", "mla"), ("router", "noaux_tc"), ("mtp", "sequential")])
def test_a_built_in_plugin_cannot_be_replaced(kind, name):
    builtin = registry.get_plugin(kind, name)
    replacement = type("Replacement", (builtin,), {})
    field = {"attention": "attention_backend", "router": "topk_method", "mtp": "mtp_backend"}[kind]
    with pytest.raises(ValueError, match=rf"{kind} plugin '{name}' is built in and cannot be replaced.*`{field}`"):
        register_plugin(kind, name)(replacement)
    assert registry.get_plugin(kind, name) is builtin
    register_plugin(kind, name)(builtin)  # the same class again changes nothing and is accepted


@pytest.mark.parametrize("name", ["eager", "grouped_mm", "deepseek_fp8"])
def test_a_built_in_experts_implementation_cannot_be_replaced(name):
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    before = ALL_EXPERTS_FUNCTIONS.get(name)

    def fn(module, hidden_states, top_k_index, top_k_weights):
        return hidden_states

    with pytest.raises(ValueError, match=rf"experts plugin '{name}' is built in and cannot be replaced.*`experts_backend`"):
        register_plugin("experts", name)(fn)
    assert ALL_EXPERTS_FUNCTIONS.get(name) is before


def test_a_plugin_name_of_ones_own_may_be_registered_again():
    builtin = registry.get_plugin("attention", "mha")
    first, second = type("First", (builtin,), {}), type("Second", (builtin,), {})
    register_plugin("attention", "round4_own")(first)
    register_plugin("attention", "round4_own")(second)
    assert registry.get_plugin("attention", "round4_own") is second


def test_a_plugin_name_with_surrounding_whitespace_is_refused():
    builtin = registry.get_plugin("attention", "mha")
    with pytest.raises(ValueError, match=r"plugin name ' mine ' has leading or trailing whitespace; register it as 'mine'"):
        register_plugin("attention", " mine ")(type("Mine", (builtin,), {}))


def test_a_config_naming_a_plugin_this_process_did_not_register_says_how_to_register_it(tmp_path):
    builtin = registry.get_plugin("router", "noaux_tc")
    register_plugin("router", "round4_saved_router")(type("SavedRouter", (builtin,), {}))
    build_model(tiny_config(topk_method="round4_saved_router")).save_pretrained(tmp_path)
    code = f"import modeling_deepseek_v3, transformers; transformers.AutoConfig.from_pretrained({str(tmp_path)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "Unknown router plugin 'round4_saved_router' in config field `topk_method`" in done.stderr
    assert "must be registered in this one too: import the module that registers it" in done.stderr


def test_a_broken_entry_point_neither_hides_the_others_nor_its_own_cause(tmp_path, monkeypatch):
    (tmp_path / "round4_plugins.py").write_text(textwrap.dedent("""
        from modeling_deepseek_v3.registry import RouterPlugin, get_plugin

        class NoConfig(RouterPlugin):
            def __init__(self):
                super().__init__()

            def forward(self, hidden, token_mask=None):
                return hidden

        class Good(get_plugin("router", "noaux_tc")):
            pass

        def not_a_class(config):
            return None
    """))
    info = tmp_path / "round4_plugins-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: round4-plugins\nVersion: 1.0\n")
    # entry points load in file order: the broken ones come first
    (info / "entry_points.txt").write_text(textwrap.dedent(f"""
        [{ENTRY_POINT_GROUP}]
        router.round4_missing = round4_no_such_module:Router
        router.round4_no_config = round4_plugins:NoConfig
        router.round4_function = round4_plugins:not_a_class
        routr.round4_typo = round4_plugins:Good
        router.round4_good = round4_plugins:Good
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    load_entry_point_plugins(reload=True)  # used to raise the NoConfig TypeError and stop before round4_good
    assert type(build_model(tiny_config(topk_method="round4_good")).model.layers[1].mlp.gate).__name__ == "Good"
    for name, cause in [
        ("round4_missing", r"failed to import: ModuleNotFoundError"),
        ("round4_no_config", r"is called as NoConfig\(config\), but its constructor takes \(\)"),
        ("round4_function", r"must be a subclass of RouterPlugin, got <function not_a_class"),
        ("round4_typo", r"'routr' is not a plugin kind"),
    ]:
        with pytest.raises(ValueError, match=rf"Unknown router plugin '{name}' in config field `topk_method`.*entry point .*{cause}"):
            tiny_config(topk_method=name)


# ---------------------------------------------------------------------------------------------------
# DistributedConfig: checked against the model before any process group exists
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "world, sizes, message",
    [
        (2, {"ep_size": "2", "fsdp_size": 2}, r"`ep_size` must be a whole number of processes, got '2' \(str\)"),
        (2, {"ep_size": 2.0, "fsdp_size": 2}, r"`ep_size` must be a whole number of processes, got 2.0 \(float\)"),
        (2, {"ep_size": True, "fsdp_size": 2}, r"`ep_size` must be a whole number of processes, got True \(bool\)"),
        (2, {"fsdp_size": 2, "fsdp_cpu_offload": "no"}, r"`fsdp_cpu_offload` must be true or false, got 'no'"),
        (2, {"tp_size": 2, "tp_plan": "everything"}, r"`tp_plan` must be a dict of rules, 'auto' or None, got 'everything'"),
        (2, {"enable_expert_parallel": True, "fsdp_size": 2}, r"enable_expert_parallel without ep_size resolves to ep_size=1"),
        (3, {"tp_size": 3}, r"tp_size=3 does not divide the model's num_attention_heads=4"),
        (2, {"ep_size": 2, "fsdp_size": 2, "ep_implementation": "alltoall"},
         r"ep_implementation='alltoall' names no registered implementation; the registered ones are \['auto', 'all_to_all'"),
        (2, {"ep_size": 2, "fsdp_size": 2, "ep_plan": {"model.layers.*.mlp.experts": "scatter"}},
         r"ep_plan gives unknown style\(s\) \{'model.layers.\*.mlp.experts': 'scatter'\}"),
        (2, {"fsdp_size": 2, "fsdp_plan": {"model.layers.*": "shard"}}, r"fsdp_plan gives unknown style.*'free_full_weight'"),
    ],
)
def test_bad_distributed_configs_are_named_before_any_communication(tiny_checkpoint, launched_as, world, sizes, message):
    launched_as(world)
    with pytest.raises(ValueError, match=message):
        DeepseekV3ForCausalLM.from_pretrained(tiny_checkpoint, distributed_config=sizes)
    assert not dist.is_initialized()


def test_a_bool_size_in_a_distributed_config_instance_is_named(tiny_checkpoint, launched_as):
    launched_as(2)
    # transformers takes True for a size and then reads it as "no expert parallelism" (True > 1 is false)
    with pytest.raises(ValueError, match=r"`ep_size` must be a whole number of processes, got True"):
        DeepseekV3ForCausalLM.from_pretrained(tiny_checkpoint, distributed_config=DistributedConfig(ep_size=True, fsdp_size=2))
    assert not dist.is_initialized()


def test_the_layout_is_checked_against_the_from_pretrained_overrides(tmp_path, launched_as):
    # the check used to read the file's config: an override of the routing fields escaped the placement check
    folder = save_checkpoint(tiny_config(n_routed_experts=12, n_group=2, topk_group=1), tmp_path / "twelve")
    launched_as(2)
    with pytest.warns(UserWarning, match=r"ep_size=2 and n_group=3: neither divides the other"), \
            pytest.raises(ValueError, match="names"):
        DeepseekV3ForCausalLM.from_pretrained(
            folder, n_group=3, distributed_config=DistributedConfig(ep_size=2, fsdp_size=2, ep_plan={"nothing": "grouped_gemm"})
        )
    assert not dist.is_initialized()


# ---------------------------------------------------------------------------------------------------
# command lines: the demo, the examples and the benchmarks
# ---------------------------------------------------------------------------------------------------


def _script(folder: str, name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / folder))  # the fine-tuning examples import finetune_common beside them
    spec = importlib.util.spec_from_file_location(f"round4_{folder}_{name}", ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _argparse_error(call, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_files")
    (folder / "list.json").write_text("[1, 2]")
    (folder / "broken.json").write_text("{broken")
    (folder / "zero_hidden.json").write_text('{"hidden_size": 0}')
    (folder / "latin1.txt").write_bytes(b"caf\xe9 " * 400)
    (folder / "a_file").write_text("not a folder")
    return folder


@pytest.mark.parametrize("argv, message", [
    # a block of 1 to 3 tokens made the stride 0: range() failed after the model was built
    (["--block-size", "1"], r"argument --block-size: must be at least 2 \(a block predicts each next token\), got 1"),
    (["--block-size", "100000"], r"argument --block-size: 100000 needs a text of more tokens; --text .*tiny_corpus.txt has 2322"),
    (["--config", "{f}/list.json"], r"argument --config: .*list.json: must hold a JSON object of config fields, got a list"),
    (["--config", "{f}/broken.json"], r"argument --config: .*broken.json: not a JSON file: Expecting property name"),
    (["--config", "{f}/zero_hidden.json"], r"argument --config: .*zero_hidden.json: Config field `hidden_size` must be a positive integer, got 0"),
    (["--text", "{f}/latin1.txt"], r"argument --text: .*latin1.txt is not UTF-8 text \(invalid continuation byte at byte 3\)"),
    (["--seed", "-1"], r"argument --seed: must be an int in \[0, 2\*\*32\), got -1"),
    (["--seed", "4294967296"], r"argument --seed: must be an int in \[0, 2\*\*32\), got 4294967296"),
])
def test_demo_names_a_bad_argument_before_building_a_model(argv, message, bad_files, tmp_path, capsys):
    from modeling_deepseek_v3 import demo

    argv = [arg.replace("{f}", str(bad_files)) for arg in argv] + ["--output-dir", str(tmp_path / "out")]
    assert re.search(message, _argparse_error(lambda: demo.parse_args(argv), capsys))


def test_demo_text_blocks_refuse_a_zero_stride():
    from modeling_deepseek_v3.demo import TextBlocks

    with pytest.raises(ValueError, match=r"stride=0: the blocks must advance"):
        TextBlocks(list(range(10)), 3, 0)
    with pytest.raises(ValueError, match=r"block_size=1: a causal LM block needs at least 2 tokens"):
        TextBlocks(list(range(10)), 1, 1)


@pytest.mark.parametrize("name, argv, message", [
    ("train_distributed", ["--global-batch-size", "3", "--fsdp-size", "2"],
     r"argument --global-batch-size: 3 must split evenly over the 2 data-parallel ranks"),
    ("train_distributed", ["--block-size", "1"], r"argument --block-size: must be at least 2"),
    ("train_distributed", ["--block-size", "5000"], r"argument --block-size: .*below the embedded text's 2322 tokens, got 5000"),
    ("train_distributed", ["--output-dir", "{f}/a_file"], r"argument --output-dir: .*a_file is a file, not a folder"),
    ("train_accelerate", ["--seq-len", "1"], r"argument --seq-len: must be at least 2 and below the embedded text's \d+ tokens, got 1"),
    ("finetune_trainer", ["--seq-len", "99999"], r"argument --seq-len: must be at least 2 and below .*got 99999"),
    ("dpo", ["--seed", "-3"], r"argument --seed: must be an int in \[0, 2\*\*32\), got -3"),
    ("grpo", ["--seed", "-3"], r"argument --seed: must be an int"),
    ("sft_lora", ["--seed", "-3"], r"argument --seed: must be an int"),
])
def test_examples_name_a_bad_argument(name, argv, message, bad_files, monkeypatch, capsys):
    module = _script("examples", name, monkeypatch)
    argv = [arg.replace("{f}", str(bad_files)) for arg in argv]
    assert re.search(message, _argparse_error(lambda: module.parse_args(argv), capsys))


def test_train_accelerate_names_a_batch_larger_than_the_text_instead_of_waiting_forever(monkeypatch):
    module = _script("examples", "train_accelerate", monkeypatch)
    with pytest.raises(ValueError, match=r"--batch-size × processes = 1000 sequences, but the embedded text gives only \d+ windows of --seq-len 64"):
        next(module.batches(64, 1000))
    assert next(module.batches(64, 4)).shape == (4, 64)


def test_train_distributed_applies_a_given_bias_update_speed_to_a_checkpoint_of_ones_own(monkeypatch, tmp_path):
    module = _script("examples", "train_distributed", monkeypatch)
    # the flag used to apply only when the embedded model was first built; unset, the checkpoint's own value stays
    assert module.config_overrides(module.parse_args([])) == {}
    overrides = module.config_overrides(module.parse_args(["--bias-update-speed", "0.05"]))
    assert overrides == {"router_bias_update_speed": 0.05}
    folder = save_checkpoint(tiny_config(router_bias_update_speed=0.001), tmp_path / "own")
    assert transformers.AutoConfig.from_pretrained(folder, **overrides).router_bias_update_speed == 0.05


@pytest.mark.parametrize("name, argv, message", [
    ("decode", ["--tiny", "--prompt", "0"], "argument --prompt: must be a positive int, got 0"),  # 0 meant the default
    ("decode", ["--tiny", "--batches", "1", "0"], "argument --batches: must be a positive int, got 0"),
    ("decode", ["--tiny", "--mtp-steps", "-1"], "argument --mtp-steps: must be a non-negative int, got -1"),
    ("step_profile", ["--tiny", "--repeats", "0"], "argument --repeats: must be a positive int, got 0"),
    ("step_profile", ["--tiny", "--seed", "-1"], "argument --seed: must be an int in [0, 2**32), got -1"),
    ("train_step", ["--tiny", "--warmup", "0"], "argument --warmup: must be a positive int, got 0"),  # silently 1
    ("fp8_gemm", ["--rep", "-5"], "argument --rep: must be a positive int, got -5"),
])
def test_benchmarks_with_argv_name_a_bad_flag(name, argv, message, monkeypatch, capsys):
    module = _script("benchmarks", name, monkeypatch)
    assert message in _argparse_error(lambda: module.main(argv), capsys)


@pytest.mark.parametrize("name, argv, message", [
    ("expert_parallel", ["--ep-sizes", "0"], "argument --ep-sizes: must be a positive int, got 0"),  # ZeroDivisionError
    ("expert_parallel", ["--ep-sizes", "2,x"], "argument --ep-sizes: must be comma-separated positive ints (e.g. 1,2,4), got 2,x"),
    ("expert_parallel", ["--warmup", "-1"], "argument --warmup: must be a non-negative int, got -1"),
    ("sharded_loading", ["--ranks", "0,2"], "argument --ranks: must be a positive int, got 0"),
    ("sharded_loading", ["--hidden-size", "-8"], "argument --hidden-size: must be a positive int, got -8"),
    ("lora_memory", ["--steps", "0"], "argument --steps: must be a positive int, got 0"),
])
def test_benchmarks_with_sys_argv_name_a_bad_flag(name, argv, message, monkeypatch, capsys):
    module = _script("benchmarks", name, monkeypatch)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
    assert message in _argparse_error(module.main, capsys)


def test_experts_backend_set_on_a_made_config_becomes_the_experts_implementation():
    # it was mapped onto the experts implementation in __init__ only: set later, it was stored and never read
    config = tiny_config(num_hidden_layers=2)
    config.experts_backend = "batched_mm"
    assert config._experts_implementation == "batched_mm"
    config.experts_backend = "gather"
    assert config.experts_backend == "eager" and config._experts_implementation == "eager"
    with pytest.raises(ValueError, match=r"experts_backend"):
        config.experts_backend = "grouped"
    assert config.experts_backend == "eager"
    model = build_model(config)
    ids = torch.randint(1, 90, (1, 5))
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        model.config.experts_backend = "grouped_mm"
        assert model.model.layers[1].mlp.experts.config._experts_implementation == "grouped_mm"
        assert torch.allclose(model(input_ids=ids).logits, eager, atol=1e-5)
