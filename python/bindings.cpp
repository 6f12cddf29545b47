// adello_kernels._C: the compiled kernels of the adello:: ops.
//
// The op schemas are defined once, in Python (adello_kernels/ops/flexda.py and ops/step.py);
// each kernel file in csrc/ registers its implementation for one dispatch key with
// TORCH_LIBRARY_IMPL, which runs when this shared library is loaded. This file only makes the
// library importable as a Python module (`import adello_kernels._C`), as pytorch/extension-cpp
// does.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "Compiled kernels of the adello:: torch.library ops (registered on import).",
      -1,       // size
      nullptr,  // methods
  };
  return PyModule_Create(&module_def);
}
}
