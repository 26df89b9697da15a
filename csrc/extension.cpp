// The Python module fasterase._C. Importing it loads this library, and with it the
// TORCH_LIBRARY_IMPL blocks of every csrc/ source, which register the CUDA kernels of the
// fasterase ops; the ops' schemas and fake implementations are defined in Python (kernels/<op>.py).
// The module itself has no Python functions: the ops are called through torch.ops.fasterase.

#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "fasterase._C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
