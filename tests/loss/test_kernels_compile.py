"""The Triton kernels (InfoNCE's, the sigmoid loss's, the LayerNorm's) compile for a Hopper
GPU, on a machine without one.

CI runs the kernels in Triton's interpreter, which executes their Python and so accepts things
the GPU compiler refuses (a global that is not a ``tl.constexpr`` instance, say). This test asks
Triton's real compiler for sm_90 machine code of every kernel, with the tile shapes the GPU
path uses, in a subprocess without TRITON_INTERPRET."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

COMPILE = textwrap.dedent(
    """
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from retriever.model import layer_norm
    from retriever.loss import sigmoid_triton as sigmoid, tile_configs, triton_tiles as tiles

    target = GPUTarget("cuda", 90, 32)

    def build(fn, types, constants):
        signature = {**types, **{name: "constexpr" for name in constants}}
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants), target=target)

    for torch_dtype, dtype in ((torch.bfloat16, "*bf16"), (torch.float32, "*fp32")):
        meta = tile_configs.tile_config(torch_dtype)
        blocks = {k: v for k, v in meta.items() if k.startswith("BLOCK")}
        common = dict(q_ptr=dtype, c_ptr=dtype, scale_ptr="*fp32")
        build(tiles._row_lse_kernel,
              dict(**common, labels_ptr="*i64", row_ids_ptr="*i64", col_ids_ptr="*i64",
                   lse2_ptr="*fp32", pos_ptr="*fp32", n_rows="i32", n_cols="i32", dim="i32",
                   cols_per_split="i32", stride_q="i32", stride_c="i32"),
              dict(HAS_IDS=True, UPCAST=False, **blocks))
        build(tiles._softmax_grad_kernel,
              dict(**common, lse2_ptr="*fp32", w_ptr="*fp32", labels_ptr="*i64",
                   row_ids_ptr="*i64", col_ids_ptr="*i64", g_ptr=dtype, n_rows="i32",
                   n_cols="i32", dim="i32", stride_q="i32", stride_c="i32", stride_g="i32"),
              dict(HAS_IDS=True, UPCAST=False, **blocks))
        build(sigmoid._sigmoid_row_kernel,
              dict(q_ptr=dtype, c_ptr=dtype, params_ptr="*fp32", labels_ptr="*i64",
                   row_ids_ptr="*i64", col_ids_ptr="*i64", out_ptr="*fp32", n_rows="i32",
                   n_cols="i32", dim="i32", cols_per_split="i32", stride_q="i32",
                   stride_c="i32"),
              dict(HAS_IDS=True, UPCAST=False, **blocks))
        build(sigmoid._sigmoid_grad_kernel,
              dict(q_ptr=dtype, c_ptr=dtype, params_ptr="*fp32", w_ptr="*fp32",
                   labels_ptr="*i64", row_ids_ptr="*i64", col_ids_ptr="*i64", g_ptr=dtype,
                   n_rows="i32", n_cols="i32", dim="i32", stride_q="i32", stride_c="i32",
                   stride_g="i32"),
              dict(HAS_IDS=True, UPCAST=False, **blocks))
    for kernel, types in (
        (layer_norm._forward_kernel,
         dict(x_ptr="*bf16", y_ptr="*bf16", w_ptr="*bf16", b_ptr="*bf16", mean_ptr="*fp32",
              rstd_ptr="*fp32", M="i32", N="i32", eps="fp32")),
        (layer_norm._backward_kernel,
         dict(x_ptr="*bf16", dy_ptr="*bf16", dx_ptr="*bf16", w_ptr="*bf16", mean_ptr="*fp32",
              rstd_ptr="*fp32", dw_partial_ptr="*fp32", db_partial_ptr="*fp32", M="i32",
              N="i32")),
    ):
        build(kernel, types, dict(HAS_WEIGHT=True, HAS_BIAS=True, BLOCK_M=8, BLOCK_N=512))
    print("compiled")
    """
)


def test_triton_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run(
        [sys.executable, "-c", COMPILE], capture_output=True, text=True, env=env, timeout=600
    )
    if "ptxas" in done.stderr and "not found" in done.stderr:
        pytest.skip("this Triton wheel ships no ptxas")
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


def test_a_tile_config_applies_within_its_block_only(monkeypatch):
    pytest.importorskip("triton")
    import torch

    from retriever.loss import tile_configs as tiles

    monkeypatch.setattr(tiles, "interpreting", lambda: False)  # the GPU tables, not the CPU one
    before = tiles.tile_config(torch.float16)
    tuned = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=2)
    with tiles.use_tile_config(torch.float16, tuned):
        assert tiles.tile_config(torch.bfloat16) == tuned  # one table for 16-bit inputs
        assert tiles.tile_config(torch.float32) != tuned
    assert tiles.tile_config(torch.float16) == before
    for bad, message in [
        ({**tuned, "BLOCK_N": 512}, "BLOCK_N must divide 256"),
        ({**tuned, "BLOCK_K": 48}, "BLOCK_K must be a power of two"),
        ({"BLOCK_M": 64}, "exactly the keys"),
    ]:
        with pytest.raises(ValueError, match=message), tiles.use_tile_config(torch.float16, bad):
            pass
