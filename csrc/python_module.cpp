// Python entry point of se_fused._C. Importing it runs the static op
// registrations of the other translation units; the module itself only
// reports how it was built.
#include <Python.h>

#include "cpu/cpu_kernel_build.h"

namespace {

// build_info() -> {"cpu_parallel": bool, "cpu_vector_isa": str, "cuda": bool}
PyObject* build_info(PyObject*, PyObject*) {
  const se_fused::CpuKernelBuild cpu = se_fused::cpu_kernel_build();
#ifdef SE_FUSED_WITH_CUDA
  constexpr bool cuda = true;
#else
  constexpr bool cuda = false;
#endif
  return Py_BuildValue("{s:O,s:s,s:O}", "cpu_parallel", cpu.parallel ? Py_True : Py_False, "cpu_vector_isa",
                       cpu.vector_isa, "cuda", cuda ? Py_True : Py_False);
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "How the extension was compiled (CPU threading, vector ISA, CUDA)."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}
