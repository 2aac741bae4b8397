"""Step profile: what one decode step and one training step cost, ours against transformers' own
``DeepseekV3ForCausalLM`` on the same weights, in one process.

    python benchmarks/step_profile.py --out benchmarks/out/step_profile.json   # 4 layers, 16 experts (CPU: minutes)
    python benchmarks/step_profile.py --tiny                                  # tiny config, seconds: a smoke test

One random-weight checkpoint is written once in the official layout; transformers' class and ours (once per
``--experts`` name, passed as ``experts_implementation=`` to ``from_pretrained``, and once per ``--mla-modes``
value, passed as ``mla_mode=``, with the first of those experts implementations that reads nothing on the host)
all load that folder. Per row, on the CPU in fp32 (so the counts do not depend on
the machine):

* ATen ops dispatched by one decode step (``--batch`` sequences after a ``--prompt``-token prefill into a
  ``transformers.StaticCache``), counted with a ``TorchDispatchMode``;
* host-synchronising ops in that decode step and in one training step (forward + backward with ``labels``): ops
  that read device data on the host or whose output size depends on it (``_local_scalar_dense`` = ``.item()`` /
  ``bool()`` / ``int()``, ``nonzero``, ``equal``, ``is_nonzero``, ``allclose``, ``bincount``, ``unique``,
  ``masked_select``, ``repeat_interleave.Tensor``, boolean-mask indexing) plus ``Tensor.tolist`` / ``Tensor.numpy``
  (on the CPU those dispatch no ATen op, so they are caught at the Python level), per op name;
* graphs and graph breaks when Dynamo captures one static-cache decode step (``torch._dynamo.explain``, backend
  "eager": capture only, no code generation; the break count is ``torch._dynamo.utils.counters["graph_break"]``),
  with the reasons and where they happen;
* KV-cache bytes per token, all layers, from the cache tensors after a prefill;
* wall-clock time of one training step and of one decode step at ``--context`` tokens, the best of ``--repeats``
  rounds that interleave the rows (so machine noise hits all of them alike; medians go to the JSON), and their
  ratios to transformers' (< 1: faster than transformers');
* on a CUDA machine, decode tokens/s at batch 1 and 32 (``--gpu-batches``) with
  ``generate(..., cache_implementation="static", compile_config=CompileConfig(mode="reduce-overhead"))``, i.e.
  a compiled, CUDA-graph-replayed decode step, in bf16 ("n/a (no GPU)" without one).

A row whose ``from_pretrained`` kwargs this model code does not support yet says "unavailable: <error>"; an
``experts_implementation`` that ``from_pretrained`` accepts but no experts-interface module of the model honours
counts as unavailable too. ``--out PATH`` writes the JSON report to PATH and the Markdown next to it (``.md``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from modeling_deepseek_v3.cli import positive, seed

# 4 layers (1 dense + 3 MoE), 16 routed experts: the shapes of train_step.py's full-size config, short enough for a CPU.
DEFAULT_CONFIG = dict(
    vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_hidden_layers=4,
    num_attention_heads=16, num_key_value_heads=16, q_lora_rank=384, kv_lora_rank=256, qk_rope_head_dim=32,
    qk_nope_head_dim=64, v_head_dim=64, n_routed_experts=16, num_experts_per_tok=6, n_shared_experts=1, n_group=8,
    topk_group=4, first_k_dense_replace=1, num_nextn_predict_layers=0, max_position_embeddings=4096,
    rope_scaling=None, rope_theta=10000.0, bos_token_id=None, eos_token_id=None, pad_token_id=0,
)
TINY_CONFIG = dict(
    DEFAULT_CONFIG, vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8,
    qk_nope_head_dim=12, v_head_dim=10, n_routed_experts=8, num_experts_per_tok=3, n_group=2, topk_group=1,
    max_position_embeddings=256, initializer_range=0.1,
)

# ATen ops that read device data on the host (a device->host synchronisation on an accelerator), or whose output
# size depends on the data (which needs the same read). Keyed by overload packet; `repeat_interleave` only in its
# data-dependent `.Tensor` overload (without `output_size`).
SYNC_OPS = {
    "aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.argwhere", "aten.equal", "aten.is_nonzero",
    "aten.allclose", "aten.bincount", "aten.unique", "aten._unique", "aten._unique2", "aten.unique_dim",
    "aten.unique_consecutive", "aten.unique_dim_consecutive", "aten.masked_select", "aten.repeat_interleave",
}
# Python-level host reads that dispatch no ATen op on the CPU (on CUDA they copy to the host first)
HOST_READ_METHODS = ("tolist", "numpy")


class StepCounter(TorchDispatchMode):
    """Counts every ATen op dispatched while active, and the host-synchronising ones by name. ``Tensor.tolist``
    and ``Tensor.numpy`` are patched for the duration, since they read CPU tensors without dispatching anything.

    Ops inside a custom (non-ATen) operator run below this mode: the operator counts as one op (listed in
    ``custom_ops``), and only its ``tolist``/``numpy`` calls are seen."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.syncs: Counter = Counter()
        self.custom_ops: Counter = Counter()
        self.sites: Counter = Counter()  # (op, "file:line" of the innermost caller outside torch) -> count
        self._saved = {}

    def _sync(self, name: str) -> None:
        self.syncs[name] += 1
        self.sites[(name, call_site())] += 1

    def __enter__(self):
        for name in HOST_READ_METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                self._sync(f"Tensor.{_name}")
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        try:
            return super().__enter__()
        except BaseException:
            self._restore()
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._restore()

    def _restore(self):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        packet = str(func.overloadpacket)
        namespace = packet.split(".", 1)[0]
        if namespace not in ("aten", "prims"):
            self.custom_ops[packet] += 1
        if packet in SYNC_OPS:
            if packet != "aten.repeat_interleave" or (func._overloadname == "Tensor" and kwargs.get("output_size") is None):
                self._sync(packet)
        elif packet in ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()):
                self._sync(f"{packet} (bool mask)")
        return func(*args, **kwargs)


_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_THIS_FILE = os.path.abspath(__file__)


def call_site() -> str:
    """``file:line`` of the innermost frame on the stack that is neither torch's nor this script's."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith(_TORCH_DIR) and filename != _THIS_FILE and not filename.startswith("<"):
            return f"{short_path(filename)}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


def versions() -> dict:
    import transformers

    info = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine() or "cpu",
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
    return info


def short_error(error: BaseException, limit: int = 160) -> str:
    text = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    text = text.replace("|", "/").replace("`", "'")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_path(path: str) -> str:
    """``path`` relative to site-packages, to the package's checkout, or to this repository, when under one."""
    if "site-packages" + os.sep in path:
        return path.split("site-packages" + os.sep, 1)[1]
    import modeling_deepseek_v3

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(modeling_deepseek_v3.__file__)))
    for root in (package_root, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))):
        if path.startswith(root + os.sep):
            return path[len(root) + 1:]
    return path


# --- loading ---------------------------------------------------------------------------------------------------------


def row_specs(args) -> list[tuple[str, dict | None]]:
    specs: list[tuple[str, dict | None]] = [("transformers", None)]
    specs += [(f"ours experts={name}", {"experts_implementation": name}) for name in args.experts]
    specs += [(f"ours mla_mode={mode}", {"mla_mode": mode}) for mode in args.mla_modes]
    return specs


def has_experts_interface(model) -> bool:
    """Whether a module of ``model`` dispatches through transformers' experts interface (the attributes that
    ``transformers.integrations.use_experts_implementation`` sets)."""
    return any(hasattr(m, "is_concatenated") and hasattr(m, "has_gate") for m in model.modules())


def load(kwargs: dict | None, folder: str, dtype: torch.dtype, device: torch.device):
    import transformers

    from modeling_deepseek_v3 import DeepseekV3ForCausalLM

    if kwargs is None:  # transformers' own implementation, as shipped
        model = transformers.DeepseekV3ForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa", **kwargs)
        if not isinstance(model, DeepseekV3ForCausalLM):
            raise TypeError(f"AutoModelForCausalLM built {type(model).__module__}.{type(model).__name__}, not ours")
        name = kwargs.get("experts_implementation")
        if name is not None and not has_experts_interface(model):
            raise RuntimeError(
                f"experts_implementation={name!r} is accepted by from_pretrained but no experts-interface module of this "
                f"model honours it (experts run by experts_backend={getattr(model.config, 'experts_backend', None)!r})"
            )
        mode = kwargs.get("mla_mode")
        if mode is not None and getattr(model.config, "mla_mode", None) != mode:
            raise RuntimeError(f"mla_mode={mode!r} was not applied (config says {getattr(model.config, 'mla_mode', None)!r})")
    return model.to(device)


def describe(model, is_ours: bool) -> dict:
    config = model.config
    experts = config._experts_implementation if (not is_ours or has_experts_interface(model)) else None
    if experts is None and is_ours:
        experts = f"experts_backend={getattr(config, 'experts_backend', '?')}"
    return {"experts": experts, "mla_mode": getattr(config, "mla_mode", None) if is_ours else "expanded (theirs)"}


# --- measurements ----------------------------------------------------------------------------------------------------


def prefilled_static_cache(model, prompt: torch.Tensor, max_cache_len: int):
    import transformers

    cache = transformers.StaticCache(config=model.config, max_cache_len=max_cache_len)
    with torch.no_grad():
        model(input_ids=prompt, past_key_values=cache, use_cache=True)
    return cache


def count_decode_step(model, prompt, step_ids) -> dict:
    model.eval()
    cache = prefilled_static_cache(model, prompt, prompt.shape[1] + 4)
    counter = StepCounter()
    with torch.no_grad(), counter:
        logits = model(input_ids=step_ids, past_key_values=cache, use_cache=True).logits
    return {"ops": counter.ops, "syncs": dict(counter.syncs), "sync_sites": sites(counter), "custom_ops": dict(counter.custom_ops),
            "logits": logits[:, -1].float().clone()}


def training_step(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.detach()


def count_training_step(model, ids) -> dict:
    model.train()
    training_step(model, ids)  # one uncounted step first: lazy initialisation is not part of a step
    counter = StepCounter()
    with counter:
        loss = training_step(model, ids)
    model.eval()
    return {"ops": counter.ops, "syncs": dict(counter.syncs), "sync_sites": sites(counter), "custom_ops": dict(counter.custom_ops),
            "loss": float(loss)}


def sites(counter: StepCounter) -> list[dict]:
    return [{"op": op, "at": at, "count": n} for (op, at), n in counter.sites.most_common()]


def graph_breaks(model, prompt, step_ids) -> dict:
    """Dynamo capture of one static-cache decode step (backend "eager": no code generation)."""
    from torch._dynamo.utils import counters

    model.eval()
    cache = prefilled_static_cache(model, prompt, prompt.shape[1] + 4)
    torch._dynamo.reset()
    counters.clear()
    try:
        with torch.no_grad():
            explanation = torch._dynamo.explain(model.forward)(input_ids=step_ids, past_key_values=cache, use_cache=True)
        breaks = int(sum(counters["graph_break"].values()))
    finally:
        torch._dynamo.reset()
    reasons = Counter()
    for reason in explanation.break_reasons:
        lines = [line.strip() for line in reason.reason.splitlines() if line.strip()]
        context = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Developer debug context:")), "")
        where = f" at {short_path(reason.user_stack[-1].filename)}:{reason.user_stack[-1].lineno}" if reason.user_stack else ""
        reasons[f"{lines[0] if lines else '?'}{f' ({context})' if context else ''}{where}"] += 1
    return {"graphs": explanation.graph_count, "breaks": breaks, "explain_breaks": explanation.graph_break_count,
            "reasons": dict(reasons.most_common())}


def kv_bytes_per_token(model, prompt) -> float:
    """Bytes of all cache tensors (every layer) after a prefill of ``prompt``, per token."""
    model.eval()
    with torch.no_grad():
        cache = model(input_ids=prompt, use_cache=True).past_key_values
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total / prompt.numel()


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return 1000 * (time.perf_counter() - start)


def time_rows(models: dict, train_ids, context_prompt, step_ids, repeats: int) -> dict:
    """Best (minimum) and median ms of one training step and one decode step per row; rounds interleave the rows.
    The minimum is what the table reports: on a shared machine, interference only ever adds time."""
    times = {name: {"train": [], "decode": []} for name in models}
    sync = lambda: None  # noqa: E731  (profiles run on the CPU)
    caches = {}
    for name, model in models.items():
        model.train()
        training_step(model, train_ids)  # warm-up
        model.eval()
        caches[name] = prefilled_static_cache(model, context_prompt, context_prompt.shape[1] + repeats + 2)
        with torch.no_grad():
            model(input_ids=step_ids, past_key_values=caches[name], use_cache=True)  # warm-up (advances by one token)
    for _ in range(repeats):
        for name, model in models.items():
            model.train()
            times[name]["train"].append(timed(lambda: training_step(model, train_ids), sync))
            model.eval()
        for name, model in models.items():
            with torch.no_grad():
                times[name]["decode"].append(
                    timed(lambda: model(input_ids=step_ids, past_key_values=caches[name], use_cache=True), sync))
    return {name: {"train_ms": min(t["train"]), "decode_ms": min(t["decode"]),
                   "train_ms_median": statistics.median(t["train"]), "decode_ms_median": statistics.median(t["decode"]),
                   "train_ms_all": t["train"], "decode_ms_all": t["decode"]}
            for name, t in times.items()}


class StepClock:
    """A logits processor that timestamps each generated position (after the prefill), synchronising the GPU."""

    def __init__(self, device: torch.device):
        self.device, self.marks = device, []

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.marks.append((time.perf_counter(), input_ids.shape[1]))
        return scores

    def tokens_per_second(self, batch: int) -> float:
        (t0, n0), (t1, n1) = min(self.marks), max(self.marks)
        return batch * (n1 - n0) / max(t1 - t0, 1e-9)


def gpu_decode(kwargs, folder, vocab, batches, prompt_len, new_tokens, seed, device=None) -> dict:
    """Decode tokens/s per batch size: generate with a static cache, compiled (reduce-overhead: CUDA graphs), bf16.
    The first generate of each batch size compiles and captures; the second is timed."""
    from transformers import CompileConfig, LogitsProcessorList

    device = torch.device(device or "cuda")
    model = load(kwargs, folder, torch.bfloat16, device).eval()
    compile_config = CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead")
    result = {}
    try:
        for batch in batches:
            gen = torch.Generator().manual_seed(seed)
            prompt = torch.randint(1, vocab, (batch, prompt_len), generator=gen).to(device)
            try:
                for _ in range(2):
                    clock = StepClock(device)
                    with torch.no_grad():
                        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                       cache_implementation="static", compile_config=compile_config, pad_token_id=0,
                                       logits_processor=LogitsProcessorList([clock]))
                result[str(batch)] = clock.tokens_per_second(batch)
            except Exception as error:  # noqa: BLE001  (reported in the row)
                result[str(batch)] = f"error: {short_error(error)}"
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()
    return result


# --- report ----------------------------------------------------------------------------------------------------------


def fmt(value, digits=1) -> str:
    if value is None:
        return "error"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def sync_list(syncs: dict | None) -> str:
    if syncs is None:
        return "error"
    return ", ".join(f"{name} ×{n}" for name, n in sorted(syncs.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


def site_list(step: dict) -> str:
    if not step or "syncs" not in step:
        return "error"
    return ", ".join(f"{s['op']} ×{s['count']} at {s['at']}" for s in step.get("sync_sites", [])) or "none"


def markdown(report: dict) -> str:
    env, s = report["env"], report["settings"]
    gpu_cols = [f"GPU decode tok/s b{b}" for b in s["gpu_batches"]]
    header = (["implementation", "experts", "mla_mode", "decode ATen ops", "decode host syncs", "train host syncs",
               "compiled decode graphs", "graph breaks", "KV bytes/token", "decode max abs dlogits",
               "train step ms", "train / transformers", f"decode step ms @{s['context']}", "decode / transformers"]
              + gpu_cols)
    lines = [
        f"### step_profile ({'tiny CPU smoke config' if s['tiny'] else '4-layer, 16-expert config'}) — {report['date']}",
        "",
        f"device: CPU {env['cpu']} ({s['threads']} threads); GPU {env['gpu'] or 'none'} · torch {env['torch']}, "
        f"transformers {env['transformers']}, triton {env['triton']}, python {env['python']}"
        + (f", CUDA {env['cuda']}" if env.get("cuda") else ""),
        "",
        f"profile: CPU, float32; decode step = batch {s['batch']} after a {s['prompt']}-token prefill into a StaticCache; "
        f"training step = forward + backward with labels, batch {s['train_batch']} x {s['train_seq']}; timings: best of "
        f"{s['repeats']} interleaved rounds (medians in the JSON), decode at context {s['context']}; ratios are time / transformers' time "
        f"(< 1: faster). GPU: bf16 generate with a static cache, compiled (reduce-overhead), {s['gpu_prompt']}-token prompt, "
        f"{s['gpu_new_tokens']} new tokens.",
        "",
        "config: " + ", ".join(f"{k}={v}" for k, v in report["config"].items() if v is not None),
        "",
        "| " + " | ".join(header) + " |",
        "|---|---|---|" + "---:|" * (len(header) - 3),
    ]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['error']} |" + " |" * (len(header) - 2))
            continue
        decode, train, graph = r.get("decode") or {}, r.get("train") or {}, r.get("graph") or {}
        gpu = r.get("gpu_tokens_per_s")
        gpu_cells = [fmt(gpu.get(str(b))) if isinstance(gpu, dict) else str(gpu) for b in s["gpu_batches"]]
        cells = [
            r["name"], str(r.get("experts")), str(r.get("mla_mode")), fmt(decode.get("ops")),
            fmt(sum(decode["syncs"].values()) if "syncs" in decode else None),
            fmt(sum(train["syncs"].values()) if "syncs" in train else None),
            fmt(graph.get("graphs")), fmt(graph.get("breaks")), fmt(r.get("kv_bytes_per_token"), 0),
            fmt(r.get("decode_logits_max_abs_diff"), 7) if r.get("decode_logits_max_abs_diff") is not None else "-",
            fmt(r.get("train_ms"), 2), fmt(r.get("train_ratio"), 2), fmt(r.get("decode_ms"), 2), fmt(r.get("decode_ratio"), 2),
            *gpu_cells,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Host-synchronising ops per op name (one decode step; one training step):", "",
              "| implementation | decode step | training step | custom ops (decode; train) |", "|---|---|---|---|"]
    for r in report["rows"]:
        if "error" not in r:
            decode, train = r.get("decode") or {}, r.get("train") or {}
            custom = "; ".join(sync_list(d.get("custom_ops")) if d else "error" for d in (decode, train))
            lines.append(f"| {r['name']} | {site_list(decode)} | {site_list(train)} | {custom} |")
    lines += ["", "Graph breaks of the compiled static-cache decode step (torch._dynamo.explain, backend eager):", ""]
    for r in report["rows"]:
        graph = r.get("graph") or {}
        if "error" in r or not graph.get("reasons"):
            continue
        lines.append(f"- {r['name']}: " + "; ".join(f"{reason} ×{n}" for reason, n in graph["reasons"].items()))
    errors = [(r["name"], k, v) for r in report["rows"] for k, v in (r.get("errors") or {}).items()]
    if errors:
        lines += ["", "Measurements that failed:", ""] + [f"- {name}, {what}: {why}" for name, what, why in errors]
    return "\n".join(lines) + "\n"


# --- main ------------------------------------------------------------------------------------------------------------


def names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--tiny", action="store_true", help="tiny config, one CPU thread, no GPU part: a smoke test")
    parser.add_argument("--out", help="write the JSON report to this path and the Markdown next to it (.md)")
    parser.add_argument("--experts", type=names, default=names("eager,grouped_mm"),
                        help="comma-separated experts_implementation names for our rows (default: eager,grouped_mm)")
    parser.add_argument("--mla-modes", type=names, default=names("expanded,absorbed"),
                        help="comma-separated mla_mode values for extra rows of ours ('' for none; default: expanded,absorbed)")
    parser.add_argument("--batch", type=positive(int), default=1, help="sequences in the profiled decode step (default 1)")
    parser.add_argument("--prompt", type=positive(int), default=None, help="prefill length before the profiled decode step (32; tiny 8)")
    parser.add_argument("--context", type=positive(int), default=None, help="context of the timed decode step (1024; tiny 64)")
    parser.add_argument("--train-batch", type=positive(int), default=1)
    parser.add_argument("--train-seq", type=positive(int), default=None, help="training-step sequence length (256; tiny 16)")
    parser.add_argument("--repeats", type=positive(int), default=None, help="timed rounds, best reported (5; tiny 2)")
    parser.add_argument("--gpu-batches", type=positive(int), nargs="+", default=[1, 32], help="GPU decode batch sizes (1 32)")
    parser.add_argument("--gpu-prompt", type=positive(int), default=128, help="GPU decode prompt length (128)")
    parser.add_argument("--gpu-new-tokens", type=positive(int), default=64, help="GPU decode tokens per timing (64)")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU decode part even on a CUDA machine")
    parser.add_argument("--seed", type=seed, default=0)
    args = parser.parse_args(argv)

    import transformers

    import modeling_deepseek_v3
    from modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    fields = dict(TINY_CONFIG if args.tiny else DEFAULT_CONFIG)
    prompt_len = args.prompt or (8 if args.tiny else 32)
    context = args.context or (64 if args.tiny else 1024)
    train_seq = args.train_seq or (16 if args.tiny else 256)
    repeats = args.repeats or (2 if args.tiny else 5)
    fields["max_position_embeddings"] = max(fields["max_position_embeddings"], context + repeats + 8, prompt_len + 8,
                                            train_seq, args.gpu_prompt + args.gpu_new_tokens + 8)
    gpu_state = ("skipped (--tiny)" if args.tiny else "skipped (--no-gpu)" if args.no_gpu
                 else None if torch.cuda.is_available() else "n/a (no GPU)")

    threads = torch.get_num_threads()
    if args.tiny:
        torch.set_num_threads(1)  # tiny CPU ops only lose to thread hand-offs
    cpu, dtype = torch.device("cpu"), torch.float32
    vocab = fields["vocab_size"]
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(1, vocab, (args.batch, prompt_len), generator=gen)
    step_ids = torch.randint(1, vocab, (args.batch, 1), generator=gen)
    train_ids = torch.randint(1, vocab, (args.train_batch, train_seq), generator=gen)
    context_prompt = torch.randint(1, vocab, (args.batch, context), generator=gen)

    started = time.perf_counter()
    rows, models = [], {}
    folder = tempfile.mkdtemp(prefix="step_profile_")
    try:
        torch.manual_seed(args.seed)
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**fields)).to(dtype)
        num_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(folder)
        del model

        loaded_experts = []  # the experts rows that loaded, in order
        for name, kwargs in row_specs(args):
            if kwargs is not None and "mla_mode" in kwargs and loaded_experts:
                # the MLA rows run the first experts implementation that reads nothing on the host (not `eager`),
                # so their counts show the attention mode alone
                mla_experts = next((n for n in loaded_experts if n != "eager"), loaded_experts[0])
                kwargs = dict(kwargs, experts_implementation=mla_experts)
            row = {"name": name, "kwargs": kwargs}
            rows.append(row)
            try:
                model = load(kwargs, folder, dtype, cpu).eval()
            except Exception as error:  # noqa: BLE001  (the model code may not support these kwargs yet)
                row["error"] = f"unavailable: {short_error(error)}"
                print(f"  {name}: {row['error']}", file=sys.stderr)
                continue
            if kwargs is not None and "experts_implementation" in kwargs and "mla_mode" not in kwargs:
                loaded_experts.append(kwargs["experts_implementation"])
            row.update(describe(model, kwargs is not None))
            errors = {}
            for key, fn in (("decode", lambda: count_decode_step(model, prompt, step_ids)),
                            ("train", lambda: count_training_step(model, train_ids)),
                            ("graph", lambda: graph_breaks(model, prompt, step_ids)),
                            ("kv_bytes_per_token", lambda: kv_bytes_per_token(model, prompt))):
                try:
                    row[key] = fn()
                except Exception as error:  # noqa: BLE001  (reported in the row, the others still run)
                    row[key] = None
                    errors[key] = short_error(error)
            row["errors"] = errors
            models[name] = model
            print(f"  {name}: profiled ({time.perf_counter() - started:.0f} s)", file=sys.stderr)

        reference = next((r for r in rows if r["name"] == "transformers" and "error" not in r), None)
        ref_logits = (reference.get("decode") or {}).get("logits") if reference else None
        for r in rows:
            logits = (r.get("decode") or {}).pop("logits", None) if r.get("decode") else None
            if r is not reference and logits is not None and ref_logits is not None:
                r["decode_logits_max_abs_diff"] = float((logits - ref_logits).abs().max())

        try:
            timings = time_rows(models, train_ids, context_prompt, step_ids, repeats)
        except Exception as error:  # noqa: BLE001
            timings = {}
            for r in rows:
                if "error" not in r:
                    r["errors"]["timing"] = short_error(error)
        for r in rows:
            if r["name"] in timings:
                r.update(timings[r["name"]])
        ref_t = timings.get("transformers")
        for r in rows:
            if ref_t and r["name"] in timings:
                r["train_ratio"] = r["train_ms"] / ref_t["train_ms"]
                r["decode_ratio"] = r["decode_ms"] / ref_t["decode_ms"]
        models.clear()
        gc.collect()

        for r in rows:
            if "error" in r:
                continue
            if gpu_state is not None:
                r["gpu_tokens_per_s"] = gpu_state
                continue
            try:
                r["gpu_tokens_per_s"] = gpu_decode(r["kwargs"], folder, vocab, args.gpu_batches, args.gpu_prompt,
                                                   args.gpu_new_tokens, args.seed)
            except Exception as error:  # noqa: BLE001
                r["gpu_tokens_per_s"] = f"error: {short_error(error)}"
            print(f"  {r['name']}: GPU decode {r['gpu_tokens_per_s']}", file=sys.stderr)
    finally:
        torch.set_num_threads(threads)
        import shutil

        shutil.rmtree(folder, ignore_errors=True)

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "env": versions(),
        "package": modeling_deepseek_v3.__name__,
        "settings": {"tiny": args.tiny, "threads": 1 if args.tiny else threads, "batch": args.batch, "prompt": prompt_len,
                     "context": context, "train_batch": args.train_batch, "train_seq": train_seq, "repeats": repeats,
                     "gpu_batches": args.gpu_batches, "gpu_prompt": args.gpu_prompt, "gpu_new_tokens": args.gpu_new_tokens,
                     "parameters": num_params, "seconds": round(time.perf_counter() - started, 1),
                     "command": "python benchmarks/step_profile.py " + " ".join(argv if argv is not None else sys.argv[1:])},
        "config": fields,
        "rows": rows,
    }
    md = markdown(report)
    print(md)
    if args.out:
        directory = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(directory, exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, default=str)
        md_path = (args.out[: -len(".json")] if args.out.endswith(".json") else args.out) + ".md"
        with open(md_path, "w", encoding="utf-8") as f:
            f.write(md)
        print(f"wrote {args.out} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
