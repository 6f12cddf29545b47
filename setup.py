"""Builds adello_kernels._C: the C++ CPU kernels always, the CUDA kernels when both a CUDA build
of torch and a CUDA toolkit are present. Everything else about the package (name, version,
dependencies, extras) is in pyproject.toml.

    pip install .          # or pip install -e .; torch must already be installed

The extension is compiled against the torch of the interpreter that pip installs into. Under
pip's default build isolation that torch is not importable here (the isolated environment only
holds setuptools and wheel, and torch is deliberately not a build requirement: pip would
download a second, multi-GB torch and the extension would not load with the user's). So when
`import torch` fails, this script asks the target interpreter (`sys.executable` with the
frontend's PYTHON* variables ignored, `-E`) where its torch is and builds against that one; with
no torch there it stops and says how to install it. The torch version the extension was built
against is written to adello_kernels/_build_info.py, next to the extension, so that importing the
package with a different torch gives a warning naming both versions.

Environment:
    ADELLO_NO_EXTENSION=1   install the pure-Python package only (reference and triton backends)
    ADELLO_FORCE_CUDA=0|1   skip / require the CUDA kernels (default: build them when possible)
    ADELLO_TORCH_PYTHON     the interpreter whose torch to build against (default: the one pip
                            installs into); for frontends that build in a separate virtualenv
    TORCH_CUDA_ARCH_LIST    CUDA architectures (default "8.0;9.0" when no GPU is visible)
    CUDA_HOME               the CUDA toolkit
"""
import glob
import json
import os
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

_INSTALL_TORCH = (
    "Install torch into that environment first, then rerun the same command, e.g.\n"
    "    pip install torch --index-url https://download.pytorch.org/whl/cpu   # CPU build\n"
    "    pip install torch                                                    # CUDA build\n"
    "A frontend that builds in a virtualenv of its own (python -m build, uv) cannot see that\n"
    "torch: use pip, or name the interpreter whose torch to compile against:\n"
    "    ADELLO_TORCH_PYTHON=/path/to/python python -m build\n"
    "or install without the compiled kernels (reference and triton backends only):\n"
    "    ADELLO_NO_EXTENSION=1 pip install ."
)

_PROBE = """
import json, os, sys
try:
    import torch
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
    sys.exit(0)
print(json.dumps({"version": torch.__version__, "cuda": torch.version.cuda,
                  "site": os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))}))
"""


def _target_torch_info(python: str) -> dict:
    """{version, cuda, site} of the torch that `python` imports outside any build isolation, or
    {error} when it has none. -E drops PYTHONPATH / PYTHONNOUSERSITE, which is how pip hides the
    target's site-packages from the build (its sitecustomize sits on PYTHONPATH)."""
    try:
        out = subprocess.run([python, "-E", "-c", _PROBE], capture_output=True, text=True,
                             timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"could not run {python}: {exc}"}
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        return {"error": f"{python} exited with {out.returncode}: {out.stderr.strip()[-500:]}"}
    return json.loads(lines[-1])


def _import_torch():
    """The torch module to build against (see the module docstring); SystemExit with
    instructions when there is none."""
    try:
        import torch
        return torch
    except ImportError:
        pass
    python = os.environ.get("ADELLO_TORCH_PYTHON", sys.executable)
    info = _target_torch_info(python)
    if "error" in info:
        sys.exit(
            "adello-kernels: the C++ extension is compiled against the torch it will run with, "
            f"and the target interpreter has none ({python}: {info['error']}).\n"
            + _INSTALL_TORCH)
    # Appended, not prepended: setuptools and wheel keep coming from the build environment;
    # only what it lacks (torch and its own dependencies) is taken from the target's.
    sys.path.append(info["site"])
    try:
        import torch
    except ImportError as exc:
        sys.exit(f"adello-kernels: found torch {info['version']} in {info['site']} (for "
                 f"{python}) but could not import it inside the build environment ({exc}).\n"
                 + _INSTALL_TORCH)
    if torch.__version__ != info["version"]:
        sys.exit(f"adello-kernels: imported torch {torch.__version__} from {torch.__file__}, but "
                 f"{python} uses torch {info['version']} from {info['site']}.\n" + _INSTALL_TORCH)
    print(f"adello_kernels: building against torch {torch.__version__} of {python} "
          f"({info['site']})")
    return torch


def _build_info_source(torch, with_cuda: bool) -> str:
    return (
        '"""Written by setup.py when adello_kernels._C was built; not under version control."""\n'
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n"
        f"WITH_CUDA_KERNELS = {with_cuda!r}\n")


def _extensions():
    if os.environ.get("ADELLO_NO_EXTENSION") == "1":
        return [], {}
    if "sdist" in sys.argv[1:] and not {"bdist_wheel", "build_ext", "install"} & set(sys.argv):
        return [], {}  # a source distribution compiles nothing (MANIFEST.in lists the sources)
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print("adello_kernels: no C++ compiler found; installing without adello_kernels._C")
        return [], {}
    torch = _import_torch()
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = (sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
               + sorted(glob.glob("python/*.cpp")))
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

    base = BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    info = _build_info_source(torch, with_cuda)

    class build_ext(base):
        """BuildExtension that also writes _build_info.py wherever it puts the extension: the
        wheel's staging directory, and the source tree for an editable or in-place build."""

        def run(self):
            super().run()
            dirs = {os.path.join(self.build_lib, "adello_kernels")}
            if self.inplace or getattr(self, "editable_mode", False):
                dirs.add(self.get_finalized_command("build_py").get_package_dir("adello_kernels"))
            for d in dirs:
                os.makedirs(d, exist_ok=True)
                with open(os.path.join(d, "_build_info.py"), "w", encoding="utf-8") as f:
                    f.write(info)

    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
