"""Build vkernels. The CUDA C++ kernels (vkernels._C) are compiled when torch is a CUDA build and a
CUDA toolkit is found; otherwise the package installs without them (the Triton backend still works).

Environment:
  VKERNELS_CUDA=0|1     force the extension off, or on (1 without torch CUDA or a toolkit is an error)
  CUDA_HOME             toolkit root; defaults to /usr/local/cuda when /usr/local/cuda/bin/nvcc exists
  TORCH_CUDA_ARCH_LIST  GPU targets, default "8.0;9.0". Kernels that use Hopper-only instructions
                        (wgmma, setmaxnreg) need "9.0a", which only this variable adds.
  MAX_JOBS              parallel compile jobs (read by torch's ninja build)
"""
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent

# Must happen before torch.utils.cpp_extension is imported: it fixes CUDA_HOME at import, and without
# it guesses /usr/local from /usr/local/bin/nvcc, where linking -lcudart fails.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")


def cuda_build_problem():
    """Why the CUDA extension cannot be built here, or None when it can."""
    try:
        import torch
    except ImportError:
        return "torch is not installed in the build environment"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return "no CUDA toolkit found (set CUDA_HOME to a directory with bin/nvcc)"
    return None


def want_cuda_extension():
    forced = os.environ.get("VKERNELS_CUDA", "")
    if forced not in ("", "0", "1"):
        sys.exit(f"VKERNELS_CUDA must be 0 or 1, got {forced!r}")
    if forced == "0":
        print("vkernels: not building the CUDA extension: VKERNELS_CUDA=0", file=sys.stderr)
        return False
    problem = cuda_build_problem()
    if problem is None:
        return True
    if forced == "1":
        sys.exit(f"vkernels: VKERNELS_CUDA=1 but {problem}")
    print(f"vkernels: not building the CUDA extension: {problem}", file=sys.stderr)
    return False


def write_source_hashes_header() -> Path:
    """build/generated/vkernels_sources.h: the hash of each csrc/cuda/<family>.cu and its headers, which
    vkernels._C exposes as source_hashes, so that verification records (vkernels/verified.json) can
    tell whether the binary was built from the kernels that passed their tests (vkernels/sources.py)."""
    spec = importlib.util.spec_from_file_location("vkernels_sources", ROOT / "vkernels" / "sources.py")
    sources = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sources)
    header = ROOT / "build" / "generated" / "vkernels_sources.h"
    header.parent.mkdir(parents=True, exist_ok=True)
    escaped = sources.cuda_source_hashes_json(ROOT / "csrc").replace("\\", "\\\\").replace('"', '\\"')
    text = f'#define VKERNELS_SOURCE_HASHES "{escaped}"\n'
    if not header.exists() or header.read_text() != text:  # an unchanged header rebuilds nothing
        header.write_text(text)
    return header.parent


def cuda_extension_kwargs():
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    extension = CUDAExtension(
        name="vkernels._C",
        sources=sources,
        include_dirs=[str(write_source_hashes_header())],
        # No -std: torch adds the standard its headers need. No --use_fast_math: it breaks the NaN
        # propagation of max pooling.
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


packages = find_packages(include=["vkernels", "vkernels.*"])
package_dir = {}
# models/ lives at the top level of the repository and ships as vkernels.models.
if (ROOT / "models" / "__init__.py").exists():
    package_dir["vkernels.models"] = "models"
    packages += ["vkernels.models"] + [f"vkernels.models.{p}" for p in find_packages("models")]

setup(
    packages=packages,
    package_dir=package_dir,
    # the verification records and the tuned Triton configs, per GPU architecture (python -m vkernels.verify)
    package_data={"vkernels": ["verified.json", "tuned_configs.json"]},
    **(cuda_extension_kwargs() if want_cuda_extension() else {}),
)
