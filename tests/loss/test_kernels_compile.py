"""The Triton kernels (InfoNCE's, the sigmoid loss's, the LayerNorm's, the fused layers')
compile for a Hopper GPU, on a machine without one.

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
    import sys
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from retriever.model import layer_norm
    from retriever.loss import sigmoid_triton as sigmoid, tile_configs, triton_tiles as tiles

    target = GPUTarget("cuda", 90, 32)
    wanted = sys.argv[1].split(",")  # which InfoNCE variants (below)

    def build(fn, types, constants, meta=None):
        signature = {**types, **{name: "constexpr" for name in constants}}
        options = {k: meta[k] for k in ("num_warps", "num_stages")} if meta else None
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants),
                       target=target, options=options)

    # InfoNCE's options, one constexpr flag each: plain; the symmetric loss (column statistics,
    # ids); every flag at one prefix (also owners, the own-group mask, hardness, the margin,
    # counts, a self pass); Matryoshka over 5 prefixes; and every flag over 5 prefixes.
    ALL_FLAGS = dict(HAS_KEYS=True, HAS_OWNERS=True, OWN_MASK=True, HARDNESS=1, MARGIN=True,
                     COUNTS=True, COL_STATS=True, SELF=True)
    VARIANTS = {
        "plain": {},
        "symmetric": dict(HAS_KEYS=True, COL_STATS=True),
        "options": ALL_FLAGS,
        "matryoshka": dict(NP=5, NORMALIZE=True),
        "everything": dict(NP=5, NORMALIZE=True, **ALL_FLAGS),
    }
    for torch_dtype, dtype in ((torch.bfloat16, "*bf16"), (torch.float32, "*fp32")):
        meta = tile_configs.tile_config(torch_dtype)
        blocks = {k: v for k, v in meta.items() if k.startswith("BLOCK")}
        side = dict(dims_ptr="*i32", target_ptr="*i64", row_key_ptr="*i64",
                    col_key_ptr="*i64", row_owner_ptr="*i64", col_owner_ptr="*i64",
                    row_thresh_ptr="*fp32", col_thresh_ptr="*fp32", row_norm_ptr="*fp32",
                    col_norm_ptr="*fp32")
        common = dict(r_ptr=dtype, c_ptr=dtype, scale_ptr="*fp32", **side)
        # fp32 changes the loads and the dot's precision only: its plain kernels suffice.
        names = [n for n in wanted if n in VARIANTS and (dtype == "*bf16" or n == "plain")]
        for name in names:
            flags = dict(NP=1, HAS_KEYS=False, HAS_OWNERS=False, OWN_MASK=False, HARDNESS=0,
                         MARGIN=False, NORMALIZE=False, COL_STATS=False, SELF=False,
                         UPCAST=False, **blocks)
            flags.update(VARIANTS[name])
            counts = flags.pop("COUNTS", False)
            build(tiles._pass_stats_kernel,
                  dict(**common, col_ref_ptr="*fp32", lse2_ptr="*fp32", pos_ptr="*fp32",
                       count_ptr="*fp32", lsum_ptr="*fp32", col_sum_ptr="*fp32",
                       col_count_ptr="*fp32", col_lsum_ptr="*fp32", n_rows="i32",
                       n_cols="i32", cols_per_split="i32", n_stats="i32", self_cols="i32",
                       alpha="fp32", stride_r="i32", stride_c="i32"),
                  dict(COUNTS=counts, **flags), meta)
            build(tiles._pass_grad_kernel,
                  dict(**common, row_lse_ptr="*fp32", row_p_ptr="*fp32", row_u_ptr="*fp32",
                       row_y_ptr="*fp32", col_lse_ptr="*fp32", col_p_ptr="*fp32",
                       col_u_ptr="*fp32", g_ptr=dtype, r0="i32", r1="i32", c0="i32",
                       c1="i32", n_rows="i32", n_cols="i32", n_stats="i32", self_cols="i32",
                       alpha="fp32", stride_r="i32", stride_c="i32", stride_g="i32",
                       stride_gp="i32"),
                  flags, meta)
        if "plain" not in wanted:
            continue
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
    if "plain" in wanted:
        for kernel, types in (
            (layer_norm._forward_kernel,
             dict(x_ptr="*bf16", y_ptr="*bf16", w_ptr="*bf16", b_ptr="*bf16", mean_ptr="*fp32",
                  rstd_ptr="*fp32", M="i32", N="i32", eps="fp32")),
            (layer_norm._backward_kernel,
             dict(x_ptr="*bf16", dy_ptr="*bf16", dx_ptr="*bf16", w_ptr="*bf16",
                  mean_ptr="*fp32", rstd_ptr="*fp32", dw_partial_ptr="*fp32",
                  db_partial_ptr="*fp32", M="i32", N="i32")),
        ):
            build(kernel, types, dict(HAS_WEIGHT=True, HAS_BIAS=True, BLOCK_M=8, BLOCK_N=512))
    if "layers" in wanted:  # the fused layer kernels: a bf16 network, and autocast's dtypes
        from retriever.model import bias_gelu as gelu, residual_norm as norm

        for act, par in (("*bf16", "*bf16"), ("*fp32", "*fp32")):  # residual / parameters
            blocks = dict(BLOCK_M=gelu.FORWARD_TILE // gelu.BLOCK_N, BLOCK_N=gelu.BLOCK_N)
            warps = dict(num_warps=gelu.FORWARD_WARPS, num_stages=3)
            build(gelu._bias_gelu_forward, dict(y_ptr="*bf16", b_ptr=par, out_ptr="*bf16",
                                             M="i32", N="i32"), blocks, warps)
            build(gelu._bias_gelu_backward, dict(dout_ptr="*bf16", y_ptr="*bf16", b_ptr=par,
                                              dy_ptr="*bf16", partial_ptr="*fp32", M="i32",
                                              N="i32"), blocks, warps)
            blocks = dict(BLOCK_M=norm.FORWARD_TILE // 512, BLOCK_N=512)
            weights = dict(b_ptr=par, w_ptr=par)
            for dropout in (False, True):
                build(norm._residual_norm_forward,
                      dict(y_ptr="*bf16", r_ptr=act, **weights, beta_ptr=par, out_ptr=act,
                           mean_ptr="*fp32", rstd_ptr="*fp32", seed_ptr="*i64", M="i32",
                           N="i32", eps="fp32", p="fp32", scale="fp32"),
                      dict(DROPOUT=dropout, **blocks),
                      dict(num_warps=norm.FORWARD_WARPS, num_stages=3))
                build(norm._residual_norm_backward,
                      dict(dout_ptr=act, y_ptr="*bf16", r_ptr=act, **weights,
                           mean_ptr="*fp32", rstd_ptr="*fp32", seed_ptr="*i64", dr_ptr=act,
                           dy_ptr="*bf16", partial_ptr="*fp32", M="i32", N="i32", p="fp32",
                           scale="fp32"),
                      dict(DROPOUT=dropout, WRITE_DY=dropout or act != "*bf16", **blocks),
                      dict(num_warps=norm.BACKWARD_WARPS, num_stages=3))
        build(norm._dropout_mask_kernel, dict(seed_ptr="*i64", keep_ptr="*i8", M="i32", N="i32",
                                      p="fp32"), dict(BLOCK_M=8, BLOCK_N=512))
    print("compiled")
    """
)


def _compile(variants: str) -> None:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run(
        [sys.executable, "-c", COMPILE, variants],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if "ptxas" in done.stderr and "not found" in done.stderr:
        pytest.skip("this Triton wheel ships no ptxas")
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


def test_triton_kernels_compile_for_sm90():
    _compile("plain,symmetric,matryoshka")


def test_fused_layer_kernels_compile_for_sm90():
    _compile("layers")


@pytest.mark.slow  # every flag, on 1 and 5 prefixes: about 3 minutes of compiling on 2 cores
def test_triton_kernels_with_every_option_compile_for_sm90():
    _compile("options,everything")


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
