"""The compile lane: every Triton kernel specialization egnn launches, compiled ahead of time for a
GPU target on any machine (no GPU, no driver), with its resource use.

    from egnn.kernels import resources
    rows = [resources.compile_spec(s) for s in resources.specs(archs=(90,), lmaxes=(4,))]

`specs()` enumerates what the ops launch (egnn.kernels.ops: forward and backward kernels, every
dtype the backend accepts, the launch parameters of ops.gpu_config); `compile_spec` compiles one
with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` and reads the resources
from ptxas' verbose report on the PTX (the ptxas Triton itself uses). Each record:
    kernel, arch, lmax, mmax, dtype, config, registers, spill_bytes, stack_bytes, shared_bytes,
    cubin_bytes, compile_s, error
`budget_violations(record)` checks the budgets of the README (zero spills, zero stack, <= 128
registers, <= 512 kB cubin; compile time is reported, not asserted). profiling/kernel_resources.py
(`egnn bench kernel-resources`) runs the full table in parallel, with timeouts and a cache.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import tempfile
import time

import torch

from . import ops
from .backend import MAX_TRITON_LMAX

BUDGET = {"registers": 128, "spill_bytes": 0, "stack_bytes": 0, "cubin_bytes": 512 * 1024, "compile_s": 30.0}
ARCHS = (90, 80)
_DT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclasses.dataclass(frozen=True)
class Spec:
    kernel: str  # to_edge | from_edge | aggregate | aggregate_plain | so2_fwd | so2_bwd | so2_fwd_tf32
    arch: int
    lmax: int
    mmax: int
    dtype: str  # fp32 | bf16 | fp16
    roll: bool = False

    @property
    def name(self) -> str:
        return f"{self.kernel}/sm{self.arch}/l{self.lmax}m{self.mmax}/{self.dtype}{'/roll' if self.roll else ''}"


def _mmaxes(lmax):
    return sorted({min(2, lmax), lmax} if lmax > 1 else {lmax})


def specs(archs=ARCHS, lmaxes=(2, 4, 6), dtypes=("fp32", "bf16", "fp16"), roll: bool = True,
          sweep: bool = True) -> list[Spec]:
    """What the ops launch: rotate_to_edge = to_edge (backward: from_edge), rotate_back = from_edge
    (backward: to_edge), attention_aggregate = aggregate (backward: to_edge), the reference layer's
    aggregate_plain, so2_linear = so2_fwd (backward: so2_bwd; TF32 when torch allows it).

    Every arch and dtype at `lmaxes` with mmax = min(2, lmax) and lmax; with `sweep`, also every
    (lmax, mmax) the backend sends to Triton (lmax <= MAX_TRITON_LMAX, any mmax) for the kernels
    whose code depends on them (the rotations and the aggregation; so2 takes lmax and mmax at run
    time), in fp32 on the first arch, so no launch the backend allows is left uncompiled. The so2
    kernels do not depend on lmax or mmax: they appear once per arch, dtype and variant."""
    out = []
    if sweep:
        out += [Spec(k, archs[0], l, m, "fp32") for l in range(MAX_TRITON_LMAX + 1) for m in range(l + 1)
                for k in ("to_edge", "from_edge", "aggregate")]
    for arch in archs:
        for lmax in lmaxes:
            for dt in dtypes:
                for mmax in _mmaxes(lmax):
                    out += [Spec(k, arch, lmax, mmax, dt) for k in ("to_edge", "from_edge", "aggregate", "so2_fwd",
                                                                    "so2_bwd")]
                out.append(Spec("aggregate_plain", arch, lmax, lmax, dt))
                if roll:  # frames with a roll (fairchem interop) take the HAS_ROLL variants
                    out += [Spec(k, arch, lmax, _mmaxes(lmax)[0], dt, roll=True) for k in ("to_edge", "from_edge")]
            out += [Spec("so2_fwd_tf32", arch, lmax, m, "fp32") for m in _mmaxes(lmax)]
    # so2 kernels take lmax and mmax at run time: one compile per arch, dtype and variant
    first = {}
    for s in out:
        if s.kernel.startswith("so2"):
            first.setdefault((s.kernel, s.arch, s.dtype), s)
    out = [s for s in out if not s.kernel.startswith("so2") or first[(s.kernel, s.arch, s.dtype)] is s]
    return list(dict.fromkeys(s for s in out if s.lmax <= MAX_TRITON_LMAX))


def representative() -> list[Spec]:
    """The subset `make test` compiles (about a minute on 2 cores): every kernel, both archs, the
    three dtypes, lmax 4 and 6, mmax below and at lmax, a roll."""
    return [Spec("to_edge", 90, 4, 4, "fp32"), Spec("from_edge", 90, 6, 2, "bf16", roll=True),
            Spec("aggregate", 90, 4, 2, "fp16"), Spec("aggregate_plain", 90, 4, 4, "fp32"),
            Spec("so2_fwd", 90, 4, 4, "fp32"), Spec("so2_bwd", 90, 6, 2, "bf16"), Spec("so2_fwd", 80, 4, 4, "fp16"),
            Spec("to_edge", 80, 6, 6, "fp16")]


def _kind(spec: Spec) -> str:
    return "so2" if spec.kernel.startswith("so2") else ("aggregate" if spec.kernel.startswith("aggregate") else "rotate")


def _torch_dtype(name):
    return {v: k for k, v in _DT.items()}[name]


def launch(spec: Spec):
    """(jit function, signature, constexprs, options) of a spec, as ops would launch it."""
    from . import aggregate, rotate, so2

    dt = spec.dtype
    cfg = ops.gpu_config(_kind(spec), spec.lmax, _torch_dtype(dt))
    options = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
    if spec.kernel in ("to_edge", "from_edge"):
        fn = rotate.to_edge_kernel if spec.kernel == "to_edge" else rotate.from_edge_kernel
        const = dict(LMAX=spec.lmax, MMAX=spec.mmax, HAS_ROLL=spec.roll, **cfg)
        ptr = {"i1_ptr": "*i64", "i2_ptr": "*i64", "vec_ptr": "*fp32", "roll_ptr": "*fp32"}
    elif spec.kernel.startswith("aggregate"):
        fn = aggregate.aggregate_kernel
        rotate_ = spec.kernel == "aggregate"
        const = dict(K=(spec.lmax + 1) ** 2, LMAX=spec.lmax if rotate_ else 0, MMAX=spec.mmax if rotate_ else 0,
                     ROTATE=rotate_, HAS_ROLL=False, **cfg)
        ptr = {"ptr_ptr": "*i32", "vec_ptr": "*fp32" if rotate_ else f"*{dt}", "roll_ptr": "*fp32"}
    else:
        fn = so2.so2_linear_kernel
        bwd = spec.kernel == "so2_bwd"
        precision = "tf32" if spec.kernel.endswith("tf32") else ("ieee" if dt == "fp32" else "native")
        const = dict(HAS_SCALE=not bwd, HAS_BIAS=not bwd, PRECISION=precision, **cfg)
        ptr = {"meta_ptr": "*i32"}
    sig = {}
    for name in fn.arg_names:
        if name in const:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptr.get(name, f"*{dt}")
        else:
            sig[name] = "i32"
    return fn, sig, const, options


def _ptxas(arch: int) -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        tool = get_ptxas(arch) if "arch" in get_ptxas.__code__.co_varnames else get_ptxas()
        return tool.path if hasattr(tool, "path") else tool[0]
    except (ImportError, AttributeError, TypeError):
        import triton

        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _ptxas_report(ptx: str, arch: int) -> dict:
    """registers, spill_bytes (stores + loads), stack_bytes from `ptxas -v` on the PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        res = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True)
    log = res.stderr + res.stdout
    if res.returncode:
        raise RuntimeError(f"ptxas failed: {log.strip()[-500:]}")
    regs = re.search(r"Used (\d+) registers", log)
    stack = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(regs.group(1)) if regs else None,
            "stack_bytes": int(stack.group(1)) if stack else 0,
            "spill_bytes": int(stack.group(2)) + int(stack.group(3)) if stack else 0}


def source_hash() -> str:
    """Changes when any kernel source changes (the cache key of the lane's results)."""
    import triton

    import inspect

    here = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha1(triton.__version__.encode())
    for f in sorted(("rotate.py", "rotate_io.py", "_wigner.py", "aggregate.py", "so2.py")):
        with open(os.path.join(here, f), "rb") as fh:
            h.update(fh.read())
    h.update(inspect.getsource(ops.gpu_config).encode())  # the launch parameters, not the rest of ops.py
    h.update(inspect.getsource(launch).encode())
    return h.hexdigest()[:12]


def compile_spec(spec: Spec) -> dict:
    """Compile one spec for its arch and measure it (never raises: failures go to `error`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, sig, const, options = launch(spec)
    rec = {"kernel": spec.kernel, "arch": f"sm_{spec.arch}{'a' if spec.arch >= 90 else ''}", "lmax": spec.lmax,
           "mmax": spec.mmax, "dtype": spec.dtype, "roll": spec.roll, "config": {**const, **options},
           "registers": None, "spill_bytes": None, "stack_bytes": None, "shared_bytes": None, "cubin_bytes": None,
           "compile_s": None, "error": None}
    rec["config"] = {k: v for k, v in rec["config"].items() if k in ("BLOCK_E", "BLOCK_C", "BLOCK_N", "BLOCK_K",
                                                                      "num_warps", "num_stages", "PRECISION")}
    t0 = time.perf_counter()
    try:
        k = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", spec.arch, 32), options=options)
        rec["compile_s"] = round(time.perf_counter() - t0, 2)
        rec["cubin_bytes"] = len(k.asm["cubin"])
        rec["shared_bytes"] = int(getattr(k.metadata, "shared", 0))
        rec.update(_ptxas_report(k.asm["ptx"], spec.arch))
    except Exception as exc:  # noqa: BLE001 - the lane reports every failure as a row, it never stops
        rec["compile_s"] = round(time.perf_counter() - t0, 2)
        rec["error"] = f"{type(exc).__name__}: {str(exc).strip()[-800:]}"
    return rec


def budget_violations(rec: dict, budget: dict = BUDGET) -> list[str]:
    if rec["error"]:
        return [f"compile error: {rec['error'][:200]}"]
    out = []
    for key in ("registers", "spill_bytes", "stack_bytes", "cubin_bytes"):
        if rec[key] is None or rec[key] > budget[key]:
            out.append(f"{key} {rec[key]} > {budget[key]}")
    return out


def api_available() -> str | None:
    """None when this Triton can compile ahead of time for a GPU target, else the reason."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        return f"this Triton has no ahead-of-time compile API ({exc})"
    try:
        _ptxas(90)
    except Exception as exc:  # noqa: BLE001
        return f"no ptxas found ({exc})"
    return None


def to_json(rec: dict) -> str:
    return json.dumps(rec, sort_keys=False)
