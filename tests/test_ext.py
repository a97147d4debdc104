"""The egnn::halo_* ops (csrc/halo.*, egnn/ops.py) against index_select / index_add_ and their twins."""
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from egnn import _ext, ops
from egnn.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (row shape, rows): a real embedding row (25 x 16) and an odd one that is no multiple of 16 bytes;
# enough rows that the CPU kernels split the work over threads.
SHAPES = [((25, 16), 700), ((3,), 5000)]
compiled = pytest.mark.skipif(not _ext.AVAILABLE, reason="needs the compiled extension egnn._C (pip install -e .)")


def _rand(rows, shape, dtype, gen):
    return torch.randn((rows, *shape), generator=gen, dtype=torch.float64).to(dtype)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@compiled
def test_ext_builds_all_ops_with_the_python_schemas():
    for name, schema in ops.SCHEMAS.items():
        assert str(getattr(torch.ops.egnn, name).default._schema) == f"egnn::{schema}"
        assert ops._has_kernel(name, "CPU") or ops._has_kernel(name, "CompositeExplicitAutograd")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,rows", SHAPES)
def test_pack_equals_index_select(dtype, shape, rows, gen):
    x = _rand(rows, shape, dtype, gen)
    for index in (torch.randint(0, rows, (3 * rows,), generator=gen),   # duplicates, any order
                  torch.randperm(rows, generator=gen)[: rows // 3],
                  torch.empty(0, dtype=torch.int64)):                     # a rank with nothing to send
        out = ops.halo_pack(x, index)
        assert out.shape == (index.numel(), *shape) and out.is_contiguous()
        assert torch.equal(out, x.index_select(0, index))
    # non-contiguous input (a column slice of a wider embedding)
    xt = _rand(rows, (*shape[:-1], 2 * shape[-1]), dtype, gen)[..., ::2]
    index = torch.randint(0, rows, (rows,), generator=gen)
    assert torch.equal(ops.halo_pack(xt, index), xt.index_select(0, index))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,rows", SHAPES)
def test_unpack_replaces_the_halo_slab(dtype, shape, rows, gen):
    x = _rand(rows, shape, dtype, gen)
    for offset, m in ((rows // 2, rows // 3), (rows - 7, 7), (rows, 0), (0, rows)):
        recv = _rand(m, shape, dtype, gen)
        ref = x.clone()
        ref[offset:offset + m] = recv
        out = ops.halo_unpack(x, recv, offset)
        assert torch.equal(out, ref) and out.data_ptr() != x.data_ptr()
        y = x.clone()
        assert ops.halo_unpack_(y, recv, offset) is y and torch.equal(y, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,rows", SHAPES)
def test_unpack_add_equals_index_add(dtype, shape, rows, gen):
    grad = _rand(rows, shape, dtype, gen)
    # heavy duplicates (each target hit ~3 times, one row 50 times) plus rows never hit
    index = torch.cat([torch.randint(0, rows // 2, (3 * rows // 2,), generator=gen), torch.full((50,), 1)])
    index = index[torch.randperm(index.numel(), generator=gen)]
    buf = _rand(index.numel(), shape, dtype, gen)
    out = ops.halo_unpack_add(grad, index, buf)
    plan = ops.scatter_plan(index)
    assert torch.equal(ops.halo_unpack_add(grad, index, buf, plan=plan), out)
    assert torch.equal(ops.halo_unpack_add(grad, index, buf), out)  # deterministic
    ref64 = grad.to(torch.float64, copy=True).index_add_(0, index, buf.double())
    if dtype in (torch.float32, torch.float64):
        # one task per row summing in ascending source order: bit-equal to a serial index_add_
        assert torch.equal(out, grad.clone().index_add_(0, index, buf))
    else:
        # fp32 accumulation: no worse than rounding the exact result once
        own = (out.double() - ref64).abs().max()
        once = (ref64.to(dtype).double() - ref64).abs().max()
        assert own <= once
    assert torch.equal(ops.halo_unpack_add(grad, index[:0], buf[:0]), grad)  # empty list
    for edge in ([rows - 1], [0, 0], [5], [0, rows - 1]):  # first/last rows, untouched head/tail
        i = torch.tensor(edge)
        assert torch.equal(ops.halo_unpack_add(grad, i, buf[: len(edge)]),
                           ops.TWINS["halo_unpack_add"](grad, i, buf[: len(edge)]))


@compiled
@pytest.mark.parametrize("dtype", DTYPES)
def test_twins_equal_the_compiled_ops(dtype, gen):
    rows, shape = 300, (25, 16)
    x = _rand(rows, shape, dtype, gen)
    index = torch.randint(0, rows, (2 * rows,), generator=gen)
    buf = _rand(index.numel(), shape, dtype, gen)
    recv = _rand(40, shape, dtype, gen)
    plan = ops.scatter_plan(index)
    e = torch.ops.egnn
    assert torch.equal(e.halo_pack(x, index), ops.TWINS["halo_pack"](x, index))
    assert torch.equal(e.halo_unpack(x, recv, 100), ops.TWINS["halo_unpack"](x, recv, 100))
    assert torch.equal(e.halo_unpack_add(x, index, buf), ops.TWINS["halo_unpack_add"](x, index, buf))
    assert torch.equal(e.halo_unpack_add_csr(x, *plan, buf), ops.TWINS["halo_unpack_add_csr"](x, *plan, buf))


@pytest.mark.gpu
@compiled
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,rows", SHAPES + [((25, 16), 200_000)])  # ~320 MB of fp32 rows: many blocks
def test_cuda_ops_equal_the_twins(dtype, shape, rows, gen):
    """csrc/halo_kernels.cu on the GPU: pack and unpack bit-equal to index_select / slice copy,
    unpack_add (atomics-free, by the CSR plan) bit-equal to the twin for fp32/fp64 and within one
    rounding of the exact sum for half precision."""
    e = torch.ops.egnn
    assert all(ops._has_kernel(n, "CUDA") for n in ops.SCHEMAS), "egnn._C was built without its CUDA kernels"
    x = _rand(rows, shape, dtype, gen)
    index = torch.cat([torch.randint(0, rows, (2 * rows,), generator=gen), torch.full((50,), 1)])
    buf = _rand(index.numel(), shape, dtype, gen)
    recv = _rand(rows // 3, shape, dtype, gen)
    plan = ops.scatter_plan(index)
    xc, ic, bc, rc = x.cuda(), index.cuda(), buf.cuda(), recv.cuda()
    pc = tuple(t.cuda() for t in plan)
    assert torch.equal(e.halo_pack(xc, ic).cpu(), x.index_select(0, index))
    assert torch.equal(e.halo_pack(xc, ic[:0]).cpu(), x[:0])  # a rank with nothing to send
    assert torch.equal(e.halo_unpack(xc, rc, rows // 2).cpu(), ops.TWINS["halo_unpack"](x, recv, rows // 2))
    twin = ops.TWINS["halo_unpack_add_csr"](x, *plan, buf)
    got = e.halo_unpack_add_csr(xc, *pc, bc).cpu()
    if dtype in (torch.float32, torch.float64):
        assert torch.equal(got, twin)
    else:
        ref64 = x.double().index_add_(0, index, buf.double())
        assert (got.double() - ref64).abs().max() <= (ref64.to(dtype).double() - ref64).abs().max()
    assert torch.equal(e.halo_unpack_add(xc, ic, bc).cpu(), got)


def test_scatter_plan_is_the_csr_by_target(gen):
    index = torch.randint(0, 20, (100,), generator=gen)
    rows, ptr, order = ops.scatter_plan(index)
    assert torch.equal(rows, index.unique())
    for u, r in enumerate(rows.tolist()):
        srcs = order[ptr[u]:ptr[u + 1]]
        assert torch.equal(srcs, (index == r).nonzero().flatten())  # ascending positions
    assert torch.equal(ops._index_from_csr(rows, ptr, order), index)


def test_gradients_in_float64(gen):
    x = _rand(12, (3, 2), torch.float64, gen).requires_grad_()
    index = torch.tensor([4, 0, 4, 11, 4, 7])
    plan = ops.scatter_plan(index)
    recv = _rand(5, (3, 2), torch.float64, gen).requires_grad_()
    buf = _rand(index.numel(), (3, 2), torch.float64, gen).requires_grad_()
    gc, ggc = torch.autograd.gradcheck, torch.autograd.gradgradcheck
    assert gc(lambda x: ops.halo_pack(x, index), (x,)) and gc(lambda x: ops.halo_pack(x, index, plan), (x,))
    assert gc(lambda x, r: ops.halo_unpack(x, r, 6), (x, recv)) and ggc(lambda x, r: ops.halo_unpack(x, r, 6), (x, recv))
    for p in (None, plan):
        assert gc(lambda g, b: ops.halo_unpack_add(g, index, b, p), (x, buf))
        assert ggc(lambda g, b: ops.halo_unpack_add(g, index, b, p), (x, buf))
    # the exchange's adjoint pair: <pack(x), y> == <x, unpack_add(0, index, y)>
    y = torch.randn(index.numel(), 3, 2, dtype=torch.float64, generator=gen)
    lhs = (ops.halo_pack(x, index) * y).sum()
    rhs = (x * ops.halo_unpack_add(torch.zeros_like(x), index, y)).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-12)


def test_opcheck_fake_and_autograd_registrations(gen):
    x = _rand(10, (4,), torch.float32, gen)
    index = torch.tensor([1, 9, 1, 0])
    buf = _rand(4, (4,), torch.float32, gen)
    e = torch.ops.egnn
    for op, args in ((e.halo_pack.default, (x, index)), (e.halo_pack.default, (x, index, *ops.scatter_plan(index))),
                     (e.halo_unpack.default, (x, buf[:3], 5)), (e.halo_unpack_add.default, (x, index, buf)),
                     (e.halo_unpack_add_csr.default, (x, *ops.scatter_plan(index), buf)),
                     (e.halo_unpack_.default, (x.clone(), buf[:3], 2))):
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def test_bad_input_raises_egnn_errors(gen):
    x = _rand(10, (4,), torch.float32, gen)
    with pytest.raises(InputError, match="int64"):
        ops.halo_pack(x, torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(InputError, match="10 rows"):
        ops.halo_pack(x, torch.tensor([1, 10]))
    with pytest.raises(InputError, match="shape"):
        ops.halo_unpack(x, torch.zeros(2, 5), 3)
    with pytest.raises(InputError, match="do not fit"):
        ops.halo_unpack(x, torch.zeros(4, 4), 7)
    with pytest.raises(InputError, match="float64"):
        ops.halo_unpack_add(x, torch.tensor([1]), torch.zeros(1, 4, dtype=torch.float64))
    with pytest.raises(InputError, match="entries"):
        ops.halo_unpack_add(x, torch.tensor([1, 2]), torch.zeros(1, 4))
    with pytest.raises(InputError, match="inference"):
        ops.halo_unpack_(x.clone().requires_grad_(), torch.zeros(1, 4), 0)
    with pytest.raises(InputError, match="plan"):
        ops.halo_unpack_add(x, torch.tensor([1, 2]), torch.zeros(2, 4), plan=ops.scatter_plan(torch.tensor([1])))


@compiled
def test_compiled_ops_check_their_arguments():
    """Direct torch.ops callers bypass egnn.ops' checks: the C++ side must refuse bad rows and CSRs."""
    x, e = torch.zeros(10, 4), torch.ops.egnn
    with pytest.raises(RuntimeError, match="out of range"):
        e.halo_pack(x, torch.tensor([3, -1]))
    with pytest.raises(RuntimeError, match="out of range"):
        e.halo_unpack_add(x, torch.tensor([10]), torch.zeros(1, 4))
    buf, rows, ptr, order = torch.zeros(3, 4), torch.tensor([2, 2]), torch.tensor([0, 1, 3]), torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match="strictly increasing"):  # a repeated row would race
        e.halo_unpack_add_csr(x, rows, ptr, order, buf)
    with pytest.raises(RuntimeError, match="permutation"):
        e.halo_unpack_add_csr(x, torch.tensor([1, 2]), ptr, torch.tensor([0, 0, 2]), buf)


def test_extension_sources_have_distinct_object_names():
    """torch's ninja build compiles csrc/<stem>.{cpp,cu} to one csrc/<stem>.o: two sources with one
    stem break every CUDA build (it happened to halo.cpp and halo.cu on the first GPU), while each
    file still compiles alone below and the CPU build never sees the .cu files."""
    stems = [p.stem for p in (ROOT / "csrc").iterdir() if p.suffix in (".cpp", ".cu")]
    assert len(stems) >= 3 and len(set(stems)) == len(stems), sorted(stems)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_every_cuda_source_compiles_for_the_default_archs(tmp_path, monkeypatch):
    """The kernels (*.cu) and their host glue (*_cuda.cpp) compile with nvcc for setup.py's default
    arch list (sm_80 and sm_90 machine code plus compute_90 PTX for newer GPUs), even here where
    torch is a CPU build (CI has nvcc but no GPU). The flags are torch's own for that list."""
    from torch.utils import cpp_extension

    setup_py = (ROOT / "setup.py").read_text()
    default = setup_py.split('DEFAULT_CUDA_ARCHS = "')[1].split('"')[0]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", default)
    arch_flags = cpp_extension._get_cuda_arch_flags()
    assert any("sm_80" in f for f in arch_flags) and any("code=compute_90" in f for f in arch_flags), arch_flags
    sources = sorted((ROOT / "csrc").glob("*.cu")) + sorted((ROOT / "csrc").glob("*_cuda.cpp"))
    assert any(s.suffix == ".cu" for s in sources), "csrc/ has no .cu files"
    inc = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{ROOT / 'csrc'}"]

    def compile_one(src):
        cmd = ["nvcc", *arch_flags, "-c", str(src), "-o", str(tmp_path / (src.name + ".o")), "-std=c++20",
               "-O3", "-DEGNN_WITH_CUDA", "-Xcompiler", "-fPIC", *inc]
        return src, subprocess.run(cmd, capture_output=True, text=True)

    cuobjdump = shutil.which("cuobjdump")
    try:
        import triton

        cuobjdump = cuobjdump or os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    except ImportError:
        pass
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for src, res in pool.map(compile_one, sources):
            assert res.returncode == 0, f"nvcc failed on {src.name}:\n{res.stderr[-4000:]}"
            obj = tmp_path / (src.name + ".o")
            assert obj.stat().st_size > 0
            if src.suffix == ".cu" and cuobjdump:  # machine code for both archs, and PTX
                elf = subprocess.run([cuobjdump, "--list-elf", str(obj)], capture_output=True, text=True).stdout
                ptx = subprocess.run([cuobjdump, "--list-ptx", str(obj)], capture_output=True, text=True).stdout
                assert "sm_80" in elf and "sm_90" in elf and "sm_90" in ptx, (elf, ptx)
