"""Compile the cross-attention kernels ahead of time for a GPU architecture, with no GPU: what the
interpreter cannot check (lowering, tl.dot's shape rules, shared memory per program).

Run as a script, without TRITON_INTERPRET (under it, @triton.jit gives interpreted functions that
cannot be compiled): prints one JSON object per kernel variant, with the shared memory it needs and,
where triton's cuobjdump is found, the registers and stack (spills) per thread.

    python tests/kernels/triton_aot.py [--arch 90] [KERNEL:DTYPE:HEAD_DIM ...]

ARCH: 90 (H100/H200, the default), 80 (A100), ...; without variants, every one in VARIANTS.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fasterase.kernels import cross_attention_triton as kernels

# (kernel, dtype, head dim): SD1.x (40, 80, 160), SD2.x (64), and the largest taken (256)
VARIANTS = [
    (kernel, dtype, dim)
    for kernel in ("fwd", "bwd")
    for dtype, dim in (("fp16", 40), ("bf16", 64), ("fp16", 80), ("fp32", 128), ("bf16", 160), ("fp16", 256))
]
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TEXT = 77
# The kernels' pointer arguments: in q's dtype, float32, or the indices of the watched columns;
# the other arguments are int32 sizes and strides, and the float32 scale.
POINTERS = {
    **dict.fromkeys(("Q", "K", "V", "PK", "PV", "O", "DO", "DQ"), None),
    **dict.fromkeys(("LSE", "ROWS", "PARTIAL", "MAPS", "G_MASS", "G_SQ", "G_MAPS", "DK", "DV", "DPK", "DPV"), "*fp32"),
    "MAP_INDEX": "*i64",
}


def compile_variant(direction: str, dtype: str, dim: int, arch: int):
    """The compiled kernel, with every optional part on (prompt, capture, row weights, maps)."""
    fn = kernels._cross_attention_fwd_kernel if direction == "fwd" else kernels._cross_attention_bwd_kernel
    dim_a, dim_b = kernels._head_dim_tiles(dim)
    flags = ("CAPTURE", "HAS_ROWS", "HAS_MAPS") if direction == "fwd" else ("HAS_G_STATS", "HAS_ROWS", "HAS_G_MAPS")
    options = kernels._kernel_options(torch.empty(0, dim, dtype=TORCH_DTYPES[dtype]), backward=direction == "bwd")
    warps = options.pop("num_warps")
    constants = dict(
        D=dim, DA=dim_a, DB=dim_b, BLOCK_M=kernels.BLOCK_M, BLOCK_T=kernels._text_tile(TEXT), BLOCK_P=kernels.BLOCK_P,
        **{flag: True for flag in flags}, **options,
    )
    signature = {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = POINTERS[name] or "*" + dtype
        else:
            signature[name] = "fp32" if name == "scale" else "i32"
    source = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps}), warps


def resource_usage(cubin: bytes) -> dict:
    """Registers and stack (spilled registers) per thread, from triton's own cuobjdump; {} where
    it is missing."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.is_file():
        return {}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "kernel.cubin")
        path.write_bytes(cubin)
        report = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(path)], capture_output=True, text=True, check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+)", report)
    return {"registers": int(usage.group(1)), "stack_bytes": int(usage.group(2))} if usage else {}


def main(arch: int, variants: list[tuple[str, str, int]]) -> None:
    for direction, dtype, dim in variants:
        compiled, warps = compile_variant(direction, dtype, dim, arch)
        row = {"kernel": direction, "dtype": dtype, "head_dim": dim, "arch": arch, "num_warps": warps, "shared_bytes": compiled.metadata.shared}
        print(json.dumps({**row, **resource_usage(compiled.asm["cubin"])}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("variants", nargs="*", help="KERNEL:DTYPE:HEAD_DIM, e.g. bwd:fp16:40")
    args = parser.parse_args()
    chosen = [(k, d, int(h)) for k, d, h in (v.split(":") for v in args.variants)] or VARIANTS
    main(args.arch, chosen)
