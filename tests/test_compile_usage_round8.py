"""torch.compile as transformers' own compile path uses it: how often generate's compiled decode step and a compiled
training step are recompiled (never once per step; transformers' class on the same folder is the reference), and
that compiled outputs are the eager ones. Backend "eager" (Dynamo's capture, no code generation) keeps it short."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from conftest import build_model, relative_error, tiny_config
from test_speculative import SEQUENCE, mtp_config
from torch._dynamo.utils import counters
from transformers import CompileConfig


def compile_config():
    config = CompileConfig(backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told (its CPU tests do this)
    return config


# (batch, prompt length, max_new_tokens): a repeat, a longer static cache, then a left-padded batch of 4
CALLS = [(1, 5, 6), (1, 5, 6), (1, 7, 10), (4, 6, 5)]


def prompts(batch, length, seed):
    ids = torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row in range(1, batch):  # rows 1.. left-padded by 1, 2, ...
        ids[row, :row], mask[row, :row] = 0, 0
    return ids, mask


def graphs_per_call(model):
    """Dynamo's graph count after each generate call of CALLS (greedy, static cache, compiled decode steps), and
    whether each compiled output is the eager one."""
    torch._dynamo.reset()
    counters.clear()
    graphs, outputs = [], []
    for seed, (batch, length, new) in enumerate(CALLS):
        ids, mask = prompts(batch, length, seed)
        common = dict(attention_mask=mask, max_new_tokens=new, do_sample=False, cache_implementation="static")
        with torch.no_grad():
            compiled = model.generate(ids, compile_config=compile_config(), **common)
            eager = model.generate(ids, disable_compile=True, **common)
        assert torch.equal(compiled, eager), (batch, length, new)
        graphs.append(counters["stats"]["unique_graphs"])
        outputs.append(compiled)
    torch._dynamo.reset()
    return graphs, outputs


def test_generate_compiles_the_decode_step_as_often_as_transformers_class(tmp_path):
    # Compiled once for the first call (every decode step after it reuses the graph), again with dynamic shapes for
    # a longer static cache, and once more for another batch size. The input checks used to format their error
    # messages with the cache length before checking: under dynamic shapes that is a symbolic int, and formatting it
    # broke the graph (`fullgraph=True` raised at the second cache length; without it, each step ran in pieces).
    build_model(tiny_config(experts_backend="grouped_mm", num_hidden_layers=2)).save_pretrained(tmp_path)
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    assert type(ours) is not type(theirs)
    our_graphs, our_outputs = graphs_per_call(ours)
    their_graphs, their_outputs = graphs_per_call(theirs)
    assert our_graphs == their_graphs == [1, 1, 2, 3]
    for a, b in zip(our_outputs, their_outputs):
        assert torch.equal(a, b)


def test_generation_config_on_the_model_compiles_static_decoding():
    # the static cache and the compile options set once on the model's generation_config, none passed to generate
    model = build_model(tiny_config(experts_backend="batched_mm", mla_mode="absorbed")).eval()
    ids = torch.randint(1, 97, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eager = model.generate(ids, max_new_tokens=5, do_sample=False)
        model.generation_config.cache_implementation = "static"
        model.generation_config.compile_config = compile_config()
        torch._dynamo.reset()
        counters.clear()
        compiled = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(compiled, eager) and hasattr(model, "_compiled_call")
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_compiled_training_step_compiles_once_per_sequence_length():
    # A router used to count its training forwards in a Python int that the graph read: every forward changed it, so
    # every step failed the guard and recompiled, and past torch's recompile limit (8: a gradient accumulation of 8
    # micro-batches, or a loop that never calls update_expert_bias) fell back to eager. transformers' class compiles
    # twice for two lengths. With MTP, the balance loss and a padding mask; losses, gradients and expert loads stay
    # the eager ones.
    config = tiny_config(experts_backend="grouped_mm", num_hidden_layers=2, num_nextn_predict_layers=1,
                         aux_loss_alpha=0.01)
    eager, compiled = build_model(config).train(), build_model(config).train()

    def batch(length, seed):
        ids = torch.randint(1, 97, (2, length), generator=torch.Generator().manual_seed(seed))
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        return ids, mask

    for model in (eager, compiled):  # a first eager step: the loads start counting (a state the graph guards on)
        ids, mask = batch(8, 0)
        model(ids, attention_mask=mask, labels=ids).loss.backward()
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(lambda model, ids, mask: model(ids, attention_mask=mask, labels=ids), fullgraph=True,
                         backend="eager")
    graphs = []
    for seed, length in enumerate([8, 8, 12, 12], start=1):
        ids, mask = batch(length, seed)
        expected, got = eager(ids, attention_mask=mask, labels=ids), step(compiled, ids, mask)
        expected.loss.backward()
        got.loss.backward()
        assert relative_error(got.loss.detach(), expected.loss.detach()) < 1e-6, length
        graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert graphs == [1, 1, 2, 2]  # once per length (the second with dynamic shapes), never per step
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.grad is not None:
            assert relative_error(q.grad, p.grad) < 1e-5, name
    routers = [(a, b) for a, b in zip(eager.modules(), compiled.modules()) if hasattr(a, "tokens_per_expert")]
    assert routers and all(torch.equal(a.tokens_per_expert, b.tokens_per_expert) for a, b in routers)
    # the "bias never updated" count is kept by eager forwards only
    assert {a.forwards_since_update for a, _ in routers} == {5} and {b.forwards_since_update for _, b in routers} == {1}


def test_mtp_static_decoding_compiles_once_for_every_prompt_length():
    # the verification forward passes a prepared 4-D mask as wide as the static cache: its check must not break the
    # graph either when the cache length becomes dynamic
    model = build_model(mtp_config(experts_backend="grouped_mm", mla_mode="absorbed"), seed=2).eval()
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for length, new in [(5, 8), (7, 8), (6, 11)]:
        prompt = SEQUENCE[:, :length]
        common = dict(max_new_tokens=new, do_sample=False, cache_implementation="static")
        with torch.no_grad():
            plain = model.generate(prompt, **common)
            speculative = model.generate(prompt, use_mtp=True, compile_config=compile_config(), **common)
        assert torch.equal(plain, speculative) and model.mtp_draft_stats.drafted > 1
        graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert graphs == [2, 4, 4]  # verification and MTP step, then each once more with a dynamic cache length


@pytest.mark.parametrize("kind", ["FP8Linear", "FP8TrainingLinear"])
def test_fp8_layers_compile_to_one_graph_on_the_cpu_reference(kind):
    # The reference quantizer read its scales on the host to find inf/nan tiles even inside a compiled graph, which
    # cannot hold that read (fullgraph=True raised); compiled graphs skip it, as the GPU kernels' policy does.
    from modeling_deepseek_v3 import quantization

    linear = torch.nn.Linear(160, 200, dtype=torch.bfloat16)
    torch.nn.init.normal_(linear.weight, generator=torch.Generator().manual_seed(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one-time "no FP8 GPU: reference implementation" warning
        layer = getattr(quantization, kind).from_linear(linear)
        x = torch.randn(3, 160, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(5))
        torch._dynamo.reset()
        with torch.no_grad():
            expected = layer(x)
            got = torch.compile(layer, fullgraph=True, backend="eager")(x)
    torch._dynamo.reset()
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="non-finite"):  # eager still checks
        layer(torch.full((3, 160), float("inf"), dtype=torch.bfloat16))
