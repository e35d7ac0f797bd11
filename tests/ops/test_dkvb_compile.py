"""The DKVB and embedding-bag kernels compile for an H100 (sm_90), even on a machine without a GPU.

The interpreter runs kernels as NumPy and accepts code that the compiler rejects (type mismatches in
tl.where, loop-carried dtype changes, ...). Compiling to PTX for sm_90 in a fresh process (the
interpreter decorates kernels differently) catches those where no GPU is lent.
"""
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys
    import triton
    from triton.backends import backends
    if "nvidia" not in backends:
        print("no nvidia backend")
        sys.exit(0)
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from memlayers.ops.dkvb import triton as dk
    from memlayers.ops.embedding_bag import triton as eb

    def compile_for_h100(kernel, types, consts):
        sig = {n: ("constexpr" if n in consts else types[n]) for n in kernel.arg_names}
        cst = {(kernel.arg_names.index(n),): v for n, v in consts.items()}
        src = ASTSource(fn=kernel, signature=sig, constexprs=cst)
        asm = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm
        assert "ptx" in asm and len(asm["ptx"]) > 0

    i32 = lambda *names: {n: "i32" for n in names}
    dt = "bf16"
    compile_for_h100(eb.embedding_bag_fwd_kernel, dict(W=f"*{dt}", IDX="*i64", PSW=f"*{dt}", OUT=f"*{dt}", scale="fp32",
        **i32("T", "K", "D", "stride_w", "stride_idx", "stride_psw", "stride_out")), dict(HAS_PSW=True, BLOCK_T=8, BLOCK_D=512))
    for has_psw in (True, False):
        compile_for_h100(eb.embedding_bag_bwd_weight_kernel, dict(GOUT=f"*{dt}", PSW=f"*{dt}" if has_psw else "*i64", PERM="*i64",
            ROWS_SORTED="*i64", STARTS="*i64", NUM_SEGMENTS="*i64", GW=f"*{dt}", scale="fp32",
            **i32("K", "D", "stride_gout", "stride_gw")), dict(HAS_PSW=has_psw, BLOCK_E=4, BLOCK_D=512))
    compile_for_h100(eb.embedding_bag_bwd_weight_atomic_kernel, dict(GOUT="*fp32", IDX="*i64", PSW="*i64", GW="*fp32", scale="fp32",
        **i32("T", "K", "D", "stride_gout", "stride_idx", "stride_psw", "stride_gw")), dict(HAS_PSW=False, BLOCK_T=8, BLOCK_D=16))
    compile_for_h100(eb.embedding_bag_bwd_psw_kernel, dict(GOUT=f"*{dt}", W=f"*{dt}", IDX="*i64", GPSW=f"*{dt}",
        **i32("T", "K", "D", "stride_gout", "stride_w", "stride_idx", "stride_gpsw")), dict(BLOCK_T=8, BLOCK_D=256))
    for topk, mask in ((1, False), (4, True)):
        compile_for_h100(dk.dkvb_fwd_kernel, dict(Q="*fp32", KEYS="*fp32", VALS="*fp32", MASK="*i8", OUT="*fp32", IDX="*i64",
            **i32("B", "N", "DK", "DV", "stride_qb", "stride_qc", "stride_kc", "stride_kn", "stride_vc", "stride_vn",
                  "stride_mc", "stride_ob", "stride_oc", "stride_ib", "stride_ic")),
            dict(TOPK=topk, K_PAD=max(2, topk), HAS_MASK=mask, PREC="tf32x3", UPCAST=False, BLOCK_B=32, BLOCK_N=64, BLOCK_DK=16, BLOCK_DV=16))
    print("compiled")
    """
)


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    if "no nvidia backend" in proc.stdout:
        pytest.skip("this triton build has no NVIDIA backend")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
