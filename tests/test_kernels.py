"""Fused training kernels (``modeling_deepseek_v3.kernels``) against the plain PyTorch path.

The chunked cross-entropy is plain PyTorch and is tested here directly. The Triton kernels (RMSNorm, SwiGLU)
run under ``TRITON_INTERPRET=1``, which must be set before triton is imported; another test module may already
have imported it in this process, so they run in a child pytest process (``test_triton_kernels_under_the_interpreter``),
like ``test_fp8_kernels.py``. Run ``TRITON_INTERPRET=1 pytest tests/test_kernels.py`` to see them one by one.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import build_model, relative_error, run_file_under_triton_interpreter, tiny_config

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def _randn(*shape, seed=0, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


if not INTERPRETING:
    from modeling_deepseek_v3 import kernels

    @pytest.mark.interpreter

    def test_triton_kernels_under_the_interpreter():
        run_file_under_triton_interpreter(__file__)

    # ------------------------------------------------------------------------------------ cross-entropy

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("chunk_rows", [1, 7, 1024])
    def test_chunked_cross_entropy_matches_reference(dtype, chunk_rows):
        logits = _randn(37, 301, seed=1, dtype=dtype, scale=4.0)
        targets = torch.randint(0, 301, (37,), generator=torch.Generator().manual_seed(2))
        targets[[0, 5, 36]] = -100
        a = logits.clone().requires_grad_()
        b = logits.clone().requires_grad_()
        loss = kernels.chunked_cross_entropy(a, targets, chunk_rows=chunk_rows)
        ref = kernels.cross_entropy_reference(b, targets)
        assert loss.dtype == torch.float32
        assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
        (loss * 0.5).backward()
        (ref * 0.5).backward()
        assert a.grad.dtype == dtype
        tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: both round the same fp32 gradient once
        assert relative_error(a.grad, b.grad) < tol
        assert torch.count_nonzero(a.grad[[0, 5, 36]]) == 0

    def test_chunked_cross_entropy_all_ignored_is_zero_with_zero_grad():
        logits = _randn(4, 10, seed=3).requires_grad_()
        loss = kernels.chunked_cross_entropy(logits, torch.full((4,), -100))
        loss.backward()
        assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0

    def _saved_bytes(fn, logits):
        """Bytes autograd saves for backward beyond the logits themselves (which the model returns anyway)."""
        saved = []

        def pack(t):
            if t.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr():
                saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(logits)
        return sum(saved)

    def test_chunked_cross_entropy_saves_no_vocab_sized_fp32_tensor():
        n, v = 256, 4096
        logits = _randn(n, v, seed=4, dtype=torch.bfloat16).requires_grad_()
        targets = torch.randint(0, v, (n,))
        plain = _saved_bytes(lambda x: kernels.cross_entropy_reference(x, targets), logits)
        chunked = _saved_bytes(lambda x: kernels.chunked_cross_entropy(x, targets, chunk_rows=64), logits)
        assert plain >= n * v * 4  # the fp32 log-softmax
        assert chunked <= n * (4 + 8 + 1)  # per row: lse (fp32), target (int64), valid (bool)

    def test_chunked_cross_entropy_peak_temporaries_are_one_chunk(monkeypatch):
        # every fp32 tensor the forward and backward create is at most chunk_rows x V
        n, v, chunk = 96, 512, 16
        logits = _randn(n, v, seed=5, dtype=torch.bfloat16).requires_grad_()
        targets = torch.randint(0, v, (n,))
        seen = []
        original = torch.Tensor.float

        def spy(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            seen.append(out.numel())
            return out

        monkeypatch.setattr(torch.Tensor, "float", spy)
        kernels.chunked_cross_entropy(logits, targets, chunk_rows=chunk).backward()
        monkeypatch.undo()
        assert seen and max(seen) <= chunk * v

    def test_chunked_cross_entropy_rejects_bad_shapes():
        with pytest.raises(ValueError, match="logits"):
            kernels.chunked_cross_entropy(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long))
        with pytest.raises(ValueError, match="chunk_rows"):
            kernels.chunked_cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), chunk_rows=0)

    # ------------------------------------------------------------------------------------ config switch

    def test_fused_kernels_mode_validation():
        assert tiny_config().fused_kernels == "auto"
        with pytest.raises(ValueError, match="fused_kernels"):
            build_model(tiny_config(fused_kernels="fast"))

    def test_auto_mode_keeps_the_plain_path_on_cpu(monkeypatch):
        def fail(*args, **kwargs):
            raise AssertionError("a fused kernel ran on the CPU under fused_kernels='auto'")

        for name in ("rms_norm", "swiglu", "chunked_cross_entropy"):
            monkeypatch.setattr(kernels, name, fail)
        model = build_model(tiny_config(experts_backend="grouped_mm")).train()
        ids = torch.randint(1, 97, (2, 9))
        model(ids, labels=ids).loss.backward()

    def test_on_mode_without_triton_device_says_why():
        model = build_model(tiny_config(fused_kernels="on"))
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            model(torch.randint(1, 97, (1, 5)))

    def test_model_loss_with_chunked_cross_entropy_matches_plain(monkeypatch):
        # the model's CE switch alone (Triton kernels left on the plain path): loss, MTP loss and grads unchanged
        config = dict(num_nextn_predict_layers=1)
        plain = build_model(tiny_config(**config)).train()
        fused = build_model(tiny_config(**config)).train()
        fused.load_state_dict(plain.state_dict())
        monkeypatch.setattr(kernels, "use_fused", lambda mode, x, needs_triton=True: not needs_triton)
        ids = torch.randint(1, 97, (2, 10), generator=torch.Generator().manual_seed(6))
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        out = fused(ids, attention_mask=mask, labels=ids)
        monkeypatch.undo()
        ref = plain(ids, attention_mask=mask, labels=ids)
        assert abs(out.loss.item() - ref.loss.item()) < 1e-5 and abs(out.mtp_loss.item() - ref.mtp_loss.item()) < 1e-5
        out.loss.backward()
        ref.loss.backward()
        ref_params = dict(plain.named_parameters())
        for name, p in fused.named_parameters():
            if p.grad is not None:
                assert torch.allclose(p.grad, ref_params[name].grad, atol=1e-6), name

else:
    import triton  # noqa: F401  (only after TRITON_INTERPRET=1 is set)

    from modeling_deepseek_v3 import kernels

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("shape", [(3, 5, 64), (7, 384), (1, 33)])
    def test_rms_norm_kernel_matches_reference(shape, dtype):
        x = _randn(*shape, seed=1, dtype=dtype, scale=3.0)
        w = _randn(shape[-1], seed=2, dtype=dtype) + 1.0
        a, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
        b, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = kernels.rms_norm(a, wa, 1e-6)
        ref = kernels.rms_norm_reference(b, wb, 1e-6)
        assert out.dtype == ref.dtype and out.shape == ref.shape
        if dtype == torch.float32:
            assert relative_error(out, ref) < 1e-6
        else:  # same roundings in the same order: at most one bf16 ulp apart (rsqrt may differ in the last bit)
            assert (out.float() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max()
        grad = _randn(*shape, seed=3, dtype=dtype)
        out.backward(grad)
        ref.backward(grad)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert relative_error(a.grad, b.grad) < tol
        assert relative_error(wa.grad, wb.grad) < tol

    def test_rms_norm_kernel_on_a_column_slice_and_many_rows():
        # kv_a_layernorm normalises a column slice of kv_a_proj's output; > 8 rows exercises several dw partials
        full = _randn(50, 24, seed=4)
        x = full[:, :16]
        w = _randn(16, seed=5).requires_grad_()
        a = x.clone().requires_grad_()
        out = kernels.rms_norm(x.requires_grad_(False), w, 1e-6)
        assert relative_error(out, kernels.rms_norm_reference(x, w, 1e-6)) < 1e-6
        out2 = kernels.rms_norm(a, w, 1e-6)
        out2.sum().backward()
        w_ref = w.detach().clone().requires_grad_()
        b = x.clone().requires_grad_()
        kernels.rms_norm_reference(b, w_ref, 1e-6).sum().backward()
        assert relative_error(a.grad, b.grad) < 1e-5 and relative_error(w.grad, w_ref.grad) < 1e-5

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("cols", [32, 96, 2500])
    def test_swiglu_kernel_matches_reference(cols, dtype):
        gate_up = _randn(6, 2 * cols, seed=6, dtype=dtype, scale=3.0)
        # gate and up as column slices of one [M, 2I] tensor, as the grouped experts produce them
        a = gate_up.clone().requires_grad_()
        b = gate_up.clone().requires_grad_()
        out = kernels.swiglu(a[:, :cols], a[:, cols:])
        ref = kernels.swiglu_reference(b[:, :cols], b[:, cols:])
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        assert out.dtype == ref.dtype and relative_error(out, ref) < tol
        grad = _randn(6, cols, seed=7, dtype=dtype)
        out.backward(grad)
        ref.backward(grad)
        assert relative_error(a.grad, b.grad) < (1e-5 if dtype == torch.float32 else 2e-2)

    def test_model_with_fused_kernels_matches_plain():
        # grouped experts (fused SwiGLU on the gate|up slices), dense and shared MLPs, every RMSNorm, the MTP module
        config = dict(experts_backend="grouped_mm", num_nextn_predict_layers=1)
        plain = build_model(tiny_config(fused_kernels="off", **config)).train()
        fused = build_model(tiny_config(fused_kernels="on", **config)).train()
        fused.load_state_dict(plain.state_dict())
        calls = {"rms_norm": 0, "swiglu": 0}
        for name in calls:
            original = getattr(kernels, name)

            def counted(*args, _name=name, _original=original):
                calls[_name] += 1
                return _original(*args)

            setattr(kernels, name, counted)
        ids = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(8))
        out = fused(ids, labels=ids)
        ref = plain(ids, labels=ids)
        assert calls["rms_norm"] > 0 and calls["swiglu"] > 0
        assert relative_error(out.logits, ref.logits) < 1e-5
        assert abs(out.loss.item() - ref.loss.item()) < 1e-5
        out.loss.backward()
        ref.loss.backward()
        ref_params = dict(plain.named_parameters())
        for name, p in fused.named_parameters():
            if p.grad is not None:
                assert torch.allclose(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-6), name


def test_fused_kernels_reaches_every_norm_through_its_constructor():
    from modeling_deepseek_v3.layers import DeepseekV3RMSNorm

    for mode in ("on", "off"):
        model = build_model(tiny_config(fused_kernels=mode, num_nextn_predict_layers=1))
        norms = [m for m in model.modules() if isinstance(m, DeepseekV3RMSNorm)]
        # per decoder layer (the MTP module has one) two layer norms and MLA's q_a and kv_a; enorm, hnorm, shared_head.norm; final
        assert len(norms) == (3 + 1) * 4 + 3 + 1 and all(n.fused_kernels == mode for n in norms)
