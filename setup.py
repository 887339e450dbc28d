"""Build llmfast and its C++/CUDA extensions.

``llmfast._C``: the CPU sources (``csrc/ops.cpp``, ``csrc/cpu/*.cpp``) are always
compiled. The CUDA sources (``csrc/cuda/*.cu``) are added when torch was built with
CUDA and an ``nvcc`` is found; ``LLMFAST_BUILD_CUDA=0/1`` forces that off/on.
``TORCH_CUDA_ARCH_LIST`` defaults to ``8.0;9.0``; ``MAX_JOBS`` is honoured by
torch's ninja build.  ``LLMFAST_CPU_ISA=avx512bf16|avx512|avx2|default`` overrides the
vector ISA of the CPU kernels, which otherwise follows the build machine (avx512bf16:
AVX-512 plus the bf16 dot product ``vdpbf16ps``, Zen 4 / Cooper Lake and later).

``llmfast._emu``: the same ``csrc/cuda/*.cu`` compiled as C++ for the CPU warp
emulator (``csrc/dev/cuda_emu.h``), so the test suite runs the CUDA kernels without
a GPU (``LLMFAST_CUDA_EMU=1``). Built when the CUDA headers (``cuda_fp16.h``) are
found, in the toolkit or the nvidia pip wheels; ``LLMFAST_BUILD_EMU=0/1`` forces it
off/on. ``LLMFAST_BUILD_ONLY=_C|_emu`` builds one of the two (e.g. the emulator alone
while llmfast._C is being rebuilt elsewhere).

Objects persist under ``build/temp-<extension>[-cuda]``, so a repeated
``pip install -e .`` recompiles only what changed.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

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
        return "avx512bf16" if "avx512_bf16" in flags else "avx512"
    if all(f in flags for f in ("avx2", "fma", "f16c")):
        return "avx2"
    return "default"


def _cpu_flags(isa):
    # at::vec picks its Vectorized<> implementation from CPU_CAPABILITY_*; the
    # CPU_CAPABILITY macro names the inline namespace, keeping ours apart from torch's.
    base = ["-O3", "-fopenmp"]  # torch picks the C++ standard its headers need
    if isa in ("avx512", "avx512bf16"):
        # kernels test __AVX512BF16__ for their bf16 dot-product paths and keep a widening fallback
        bf16 = ["-mavx512bf16"] if isa == "avx512bf16" else []
        return base + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"] + bf16 + [
            "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if isa == "avx2":
        return base + ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return base


def _nvidia_include_dirs():
    """The nvidia pip wheels' include folders: cusparse.h and friends ship there, not in every toolkit."""
    import torch

    site_nvidia = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia")
    return sorted(glob.glob(os.path.join(site_nvidia, "cu*", "include")))


def _csrc_files():
    """Every file under csrc/: an extension's `depends`, so that setuptools rebuilds it (and ninja
    decides what to recompile) when a header changes, not only a listed source."""
    return sorted(f for f in glob.glob("csrc/**/*", recursive=True) if os.path.isfile(f))


def _native_extension(cpp_extension, cuda_home, build_cuda):
    """llmfast._C: the CPU kernels, and the CUDA kernels when build_cuda."""
    isa = _cpu_isa()
    sources = sorted(glob.glob("csrc/ops.cpp") + glob.glob("csrc/cpu/*.cpp"))
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if build_cuda else ""
    defines = [f'-DLLMFAST_CPU_ISA="{isa}"', f'-DLLMFAST_CUDA_ARCHS="{archs}"']
    include_dirs = [os.path.join(ROOT, "csrc")]
    extra = {"cxx": _cpu_flags(isa) + defines}
    if not build_cuda:
        return cpp_extension.CppExtension("llmfast._C", sources, include_dirs=include_dirs, depends=_csrc_files(),
                                          extra_compile_args=extra, extra_link_args=["-fopenmp"])
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    include_dirs += _nvidia_include_dirs()  # CUDAExtension adds the toolkit's own
    extra["cxx"].append("-DLLMFAST_WITH_CUDA")
    extra["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo", "-DLLMFAST_WITH_CUDA", "--expt-relaxed-constexpr",
                     "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                     "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"] + defines
    return cpp_extension.CUDAExtension("llmfast._C", sources, include_dirs=include_dirs, depends=_csrc_files(),
                                       extra_compile_args=extra, extra_link_args=["-fopenmp"])


def _emu_extension(cpp_extension, cuda_include):
    """llmfast._emu: every csrc/cuda/<op>.cu compiled by the host compiler with -DLLMFAST_EMU.

    Each .cu gets a one-line wrapper build/emu-src/<op>.cpp (generated here, so a new op
    adds no file; rewritten only when its text changes, so ninja keeps the object).
    """
    out = os.path.join("build", "emu-src")
    os.makedirs(out, exist_ok=True)
    sources = ["csrc/dev/emu_module.cpp"]
    for cu in sorted(glob.glob("csrc/cuda/*.cu")):
        stem = os.path.splitext(os.path.basename(cu))[0]
        text = (f"// Generated by setup.py: {cu} for the CPU warp emulator (llmfast._emu).\n"
                f'#include "cuda/{stem}.cu"\n')
        path = os.path.join(out, stem + ".cpp")
        if not os.path.exists(path) or open(path).read() != text:
            with open(path, "w") as f:
                f.write(text)
        sources.append(path)
    # -fno-strict-aliasing: kernels reinterpret rows as 16-byte packs, legal in CUDA, not in ISO C++.
    flags = ["-O2", "-DLLMFAST_EMU", "-fno-strict-aliasing", "-Wno-unknown-pragmas"]
    return cpp_extension.CppExtension("llmfast._emu", sources, include_dirs=[os.path.join(ROOT, "csrc"), cuda_include],
                                      depends=_csrc_files(), extra_compile_args={"cxx": flags})


def _extensions():
    import torch
    from torch.utils import cpp_extension

    only = os.environ.get("LLMFAST_BUILD_ONLY", "")
    if only not in ("", "_C", "_emu"):
        sys.exit(f"LLMFAST_BUILD_ONLY={only!r}: expected _C or _emu")
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
    # The emulator needs only the CUDA headers' host half (cuda_fp16.h: __half and friends).
    candidates = ([os.path.join(cuda_home, "include")] if cuda_home else []) + _nvidia_include_dirs()
    cuda_include = next((d for d in candidates if os.path.exists(os.path.join(d, "cuda_fp16.h"))), None)
    build_emu = _env_flag("LLMFAST_BUILD_EMU")
    if build_emu is None:
        build_emu = cuda_include is not None
    if build_emu and cuda_include is None:
        sys.exit("LLMFAST_BUILD_EMU=1 but no CUDA headers (cuda_fp16.h) were found; set CUDA_HOME")

    ext_modules = []
    if only in ("", "_C"):
        ext_modules.append(_native_extension(cpp_extension, cuda_home, build_cuda))
    if only in ("", "_emu") and build_emu:
        ext_modules.append(_emu_extension(cpp_extension, cuda_include))

    class BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        def build_extension(self, ext):
            # pip's editable install (setuptools' editable_wheel) hands build_ext a fresh
            # temporary build_temp each run, so ninja found no objects and every
            # `pip install -e .` recompiled everything (~3 minutes). A persistent folder per
            # extension and flavour (llmfast._C with or without CUDA compiles its CPU files
            # with other flags) lets ninja rebuild only what changed, and keeps the
            # extensions' build.ninja files apart.
            flavour = ext.name.rsplit(".", 1)[-1] + ("-cuda" if any(s.endswith(".cu") for s in ext.sources) else "")
            self.build_temp = os.path.join(ROOT, "build", "temp-" + flavour)
            super().build_extension(ext)

    return ext_modules, BuildExt


def main():
    ext_modules, cmdclass = [], {}
    if _env_flag("LLMFAST_BUILD_EXT") is not False:
        ext_modules, build_ext = _extensions()
        cmdclass = {"build_ext": build_ext}
    setup(
        packages=find_packages(include=["llmfast", "llmfast.*"]) + ["llmfast.kernels", "llmfast.benchmarks"],
        # Triton kernels and benchmark cases ship inside the package: nothing installs
        # a top-level module named `kernels` or `benchmarks`.
        package_dir={"llmfast.kernels": "kernels", "llmfast.benchmarks": "benchmarks"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )


if __name__ == "__main__":
    main()
