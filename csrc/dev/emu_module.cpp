// The llmfast._emu module: csrc/cuda/*.cu compiled for the CPU warp emulator (csrc/dev/cuda_emu.h).
// setup.py builds it with -DLLMFAST_EMU from one generated wrapper per .cu file; each registers
// its bindings as llmfast_emu::<op> for the CPU dispatch key when the library loads, serving
// the `cuda` backend on CPU tensors in the tests (LLMFAST_CUDA_EMU=1, llmfast/ops/_library.py).
#include <Python.h>

// A Python module with no functions: importing it loads the kernels.
static struct PyModuleDef emu_module = {PyModuleDef_HEAD_INIT, "_emu", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__emu(void) { return PyModule_Create(&emu_module); }
