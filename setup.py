"""Build llmfast and its C++/CUDA extension ``llmfast._C``.

The CPU sources (``csrc/ops.cpp``, ``csrc/cpu/*.cpp``) are always compiled.  The
CUDA sources (``csrc/cuda/*.cu``) are added when torch was built with CUDA and an
``nvcc`` is found; ``LLMFAST_BUILD_CUDA=0/1`` forces that off/on.
``TORCH_CUDA_ARCH_LIST`` defaults to ``8.0;9.0``; ``MAX_JOBS`` is honoured by
torch's ninja build.  ``LLMFAST_CPU_ISA=avx512|avx2|default`` overrides the
vector ISA of the CPU kernels, which otherwise follows the build machine.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.lower() not in ("0", "false", "no", "off")


def _find_cuda_home():
    # torch guesses CUDA_HOME from nvcc's folder (/usr/local here), compiles, then
    # fails to link -lcudart: name the toolkit folder explicitly.
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    candidates = ["/usr/local/cuda"]
    if nvcc:
        candidates.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for path in candidates:
        if os.path.exists(os.path.join(path, "bin", "nvcc")) and os.path.isdir(os.path.join(path, "lib64")):
            return path
    return None


def _cpu_isa():
    forced = os.environ.get("LLMFAST_CPU_ISA")
    if forced:
        return forced.lower()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return "default"
    if all(f in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq")):
        return "avx512"
    if all(f in flags for f in ("avx2", "fma", "f16c")):
        return "avx2"
    return "default"


def _cpu_flags(isa):
    # at::vec picks its Vectorized<> implementation from CPU_CAPABILITY_*; the
    # CPU_CAPABILITY macro names the inline namespace, keeping ours apart from torch's.
    base = ["-O3", "-fopenmp"]  # torch picks the C++ standard its headers need
    if isa == "avx512":
        return base + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                       "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if isa == "avx2":
        return base + ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return base


def _extensions():
    import torch
    from torch.utils import cpp_extension

    cuda_home = _find_cuda_home()
    build_cuda = _env_flag("LLMFAST_BUILD_CUDA")
    if build_cuda is None:
        build_cuda = torch.version.cuda is not None and cuda_home is not None
    if build_cuda:
        if cuda_home is None:
            sys.exit("LLMFAST_BUILD_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME")
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

    isa = _cpu_isa()
    sources = sorted(glob.glob("csrc/ops.cpp") + glob.glob("csrc/cpu/*.cpp"))
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if build_cuda else ""
    defines = [f'-DLLMFAST_CPU_ISA="{isa}"', f'-DLLMFAST_CUDA_ARCHS="{archs}"']
    include_dirs = [os.path.join(ROOT, "csrc")]
    extra = {"cxx": _cpu_flags(isa) + defines}
    if build_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        # cusparse.h and friends ship in the nvidia pip wheels, not in every toolkit.
        site_nvidia = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia")
        include_dirs += glob.glob(os.path.join(site_nvidia, "cu*", "include"))
        extra["cxx"].append("-DLLMFAST_WITH_CUDA")
        extra["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo", "-DLLMFAST_WITH_CUDA",
                         "--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__",
                         "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                         "-U__CUDA_NO_HALF2_OPERATORS__"] + defines
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    return [ext_cls("llmfast._C", sources, include_dirs=include_dirs, extra_compile_args=extra,
                    extra_link_args=["-fopenmp"])], cpp_extension.BuildExtension.with_options(use_ninja=True)


def main():
    ext_modules, cmdclass = [], {}
    if _env_flag("LLMFAST_BUILD_EXT") is not False:
        ext_modules, build_ext = _extensions()
        cmdclass = {"build_ext": build_ext}
    setup(
        packages=["llmfast", "llmfast.ops", "llmfast.nn", "llmfast.models", "llmfast.kernels",
                  "llmfast.benchmarks"],
        # Triton kernels and benchmark cases ship inside the package: nothing installs
        # a top-level module named `kernels` or `benchmarks`.
        package_dir={"llmfast.kernels": "kernels", "llmfast.benchmarks": "benchmarks"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )


if __name__ == "__main__":
    main()
