// The llmfast._C module. The schemas are declared in Python, one declaration per kernel
// (llmfast/ops/<op>.py through llmfast/ops/_library.py: schema, fake, autograd, Triton
// twin); the CPU kernels in csrc/cpu/<op>.cpp and the CUDA ones in csrc/cuda/<op>.cu
// register their implementations with TORCH_LIBRARY_IMPL when this library loads, and
// the dispatcher checks each C++ signature against its schema when that is defined.
#include <Python.h>

#include "cpu/stream.h"

// A Python module with no functions: importing it loads the kernels registered by the
// translation units. Build facts are attributes.
static struct PyModuleDef llmfast_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&llmfast_module);
  if (mod == nullptr) return nullptr;
  PyModule_AddStringConstant(mod, "cpu_isa", LLMFAST_CPU_ISA);
  PyModule_AddStringConstant(mod, "cuda_archs", LLMFAST_CUDA_ARCHS);
  PyModule_AddIntConstant(mod, "cpu_stream_bytes", static_cast<long>(llmfast::cpu::stream_min_bytes()));
#ifdef LLMFAST_WITH_CUDA
  PyModule_AddIntConstant(mod, "with_cuda", 1);
#else
  PyModule_AddIntConstant(mod, "with_cuda", 0);
#endif
  return mod;
}
