"""Build egnn and its C++/CUDA extension egnn._C.

Environment:
  EGNN_SKIP_EXT=1        build no extension (the package then runs on its pure-PyTorch paths)
  EGNN_FORCE_CUDA=1      compile the CUDA sources even without a CUDA torch / visible GPU
  TORCH_CUDA_ARCH_LIST   CUDA archs (default "8.0;9.0+PTX": A100 and Hopper H100/H200/GH200 machine code,
                         plus PTX that the driver compiles for newer GPUs such as L40 or B200)
"""
import glob
import os

from setuptools import setup

DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"  # nothing in csrc/ is Hopper-only, so sm_90a would lock A100 users out
PACKAGE_DIR = {"egnn": "egnn", "egnn.kernels": "kernels", "egnn.comm": "comm"}
PACKAGES = ["egnn", "egnn.nn", "egnn.cli", "egnn.io", "egnn.partition", "egnn.kernels", "egnn.comm"]


def _existing(pkgs):
    return [p for p in pkgs if os.path.isdir(PACKAGE_DIR.get(p, p.replace(".", "/")))]


def extensions():
    if os.environ.get("EGNN_SKIP_EXT") == "1":
        return [], {}
    from torch.utils import cpp_extension as ce

    # *_cuda.cpp files hold the CUDA ops' host glue (they include CUDA headers): CUDA builds only.
    cuda_glue = sorted(glob.glob("csrc/*_cuda.cpp"))
    sources = [s for s in sorted(glob.glob("csrc/*.cpp")) if s not in cuda_glue]
    cuda_sources = cuda_glue + sorted(glob.glob("csrc/*.cu"))
    # torch's ninja build writes csrc/<stem>.o for every source: two sources with one stem (halo.cpp
    # and halo.cu) would make one object twice and fail the CUDA build, which no CPU build sees
    stems = [os.path.splitext(s)[0] for s in sources + cuda_sources]
    clash = sorted({s for s in stems if stems.count(s) > 1})
    if clash:
        raise SystemExit(f"setup.py: csrc/ sources share the object names {clash}: rename one of each pair")
    import torch

    want_cuda = os.environ.get("EGNN_FORCE_CUDA") == "1" or (
        torch.version.cuda is not None and ce.CUDA_HOME is not None
    )
    # No -std: torch.utils.cpp_extension picks the standard its own headers need (C++17 in older
    # releases, C++20 in newer ones). No -fopenmp: the CPU kernels use at::parallel_for, i.e. torch's own OpenMP
    # runtime; linking libgomp here could load a second runtime next to the one torch bundles.
    cxx = ["-O3"]
    extra = {"cxx": cxx}
    if want_cuda and cuda_sources:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        extra["cxx"] = cxx + ["-DEGNN_WITH_CUDA"]
        extra["nvcc"] = ["-O3", "-DEGNN_WITH_CUDA"]
        ext = ce.CUDAExtension("egnn._C", sources + cuda_sources, extra_compile_args=extra)
    else:
        ext = ce.CppExtension("egnn._C", sources, extra_compile_args=extra)
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(
    packages=_existing(PACKAGES),
    package_dir=PACKAGE_DIR,
    package_data={"egnn": ["demo_data/**/*", "configs/*.yaml", "pretrained/*.pt"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
