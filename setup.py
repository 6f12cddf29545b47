"""Builds adello_kernels._C: the C++ CPU kernels always, the CUDA kernels when both a CUDA build
of torch and a CUDA toolkit are present.

    pip install --no-build-isolation -e .     # build isolation would pull another, multi-GB torch

Environment:
    ADELLO_NO_EXTENSION=1   install the pure-Python package only (reference and triton backends)
    ADELLO_FORCE_CUDA=0|1   skip / require the CUDA kernels (default: build them when possible)
    TORCH_CUDA_ARCH_LIST    CUDA architectures (default "8.0;9.0" when no GPU is visible)
    CUDA_HOME               the CUDA toolkit
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("ADELLO_NO_EXTENSION") == "1":
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print("adello_kernels: no C++ compiler found; installing without adello_kernels._C")
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/cpu/*.cpp")) + sorted(glob.glob("python/*.cpp"))
    cxx = ["-O3", "-fopenmp", "-DNDEBUG"]
    force = os.environ.get("ADELLO_FORCE_CUDA")
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and force != "0"
    if force == "1" and not with_cuda:
        raise RuntimeError("ADELLO_FORCE_CUDA=1 but no CUDA build of torch or no CUDA toolkit "
                           f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})")
    if with_cuda:
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = CUDAExtension(
            "adello_kernels._C",
            sources + sorted(glob.glob("csrc/cuda/*.cu")),
            extra_compile_args={"cxx": cxx + ["-DADELLO_WITH_CUDA"],
                                "nvcc": ["-O3", "-DNDEBUG", "-lineinfo",
                                         "-DADELLO_WITH_CUDA"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("adello_kernels._C", sources, extra_compile_args={"cxx": cxx},
                           extra_link_args=["-fopenmp"])
    print(f"adello_kernels: building _C with{'' if with_cuda else 'out'} CUDA kernels")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja")
                                                            is not None)}


ext_modules, cmdclass = _extensions()

setup(
    name="adello-kernels",
    version="0.1.0",
    description="Fused kernels for ADELLO long-tailed semi-supervised learning",
    packages=find_packages(include=["adello_kernels", "adello_kernels.*"]),
    package_data={"adello_kernels": ["train/presets/*.yaml", "train/data/imagenet127/*"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy", "pyyaml", "tqdm", "matplotlib", "torchmetrics"],
    extras_require={"triton": ["triton"], "test": ["pytest", "pytest-benchmark"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
