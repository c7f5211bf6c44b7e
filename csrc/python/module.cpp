// The Python module dynconv_ext._C: importing it runs the static TORCH_LIBRARY registrations of csrc/ops.cpp and
// the kernels, and it carries the few helpers that work on Python objects directly (no dispatcher op: boxing a
// list of a thousand tensors through torch.ops costs ~0.15 us a tensor). Built by setup.py only: the CMake
// library of csrc/ is for C++ work and has no Python in it.
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <vector>

namespace {

// tensor_stamps(tensors) -> bytes or None: (data pointer, version counter, dtype) of every tensor as int64s,
// what identifies their current values for a cache of derived tensors
// (dynconv_ext.models.early_exit.weights_signature); ~20 ns a tensor instead of ~0.3 us from Python. None when one
// is an inference tensor (it has no version counter, so such a cache cannot tell it changed).
PyObject* tensor_stamps(PyObject* /*self*/, PyObject* seq) {
  PyObject* fast = PySequence_Fast(seq, "tensor_stamps: expected a sequence of tensors");
  if (fast == nullptr) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
  PyObject** items = PySequence_Fast_ITEMS(fast);
  std::vector<int64_t> words;
  words.reserve(3 * static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!THPVariable_Check(items[i])) {
      Py_DECREF(fast);
      PyErr_Format(PyExc_TypeError, "tensor_stamps: item %zd is a %s, not a tensor", i, Py_TYPE(items[i])->tp_name);
      return nullptr;
    }
    const at::Tensor& t = THPVariable_Unpack(items[i]);
    if (t.is_inference()) {
      Py_DECREF(fast);
      Py_RETURN_NONE;
    }
    words.push_back(t.has_storage() ? reinterpret_cast<int64_t>(t.data_ptr()) : 0);
    words.push_back(static_cast<int64_t>(t._version()));
    words.push_back(static_cast<int64_t>(t.scalar_type()));
  }
  Py_DECREF(fast);
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(words.data()),
                                   static_cast<Py_ssize_t>(words.size() * sizeof(int64_t)));
}

PyMethodDef methods[] = {
    {"tensor_stamps", tensor_stamps, METH_O,
     "tensor_stamps(tensors) -> bytes | None: (data pointer, version, dtype) of each tensor; None if one is an "
     "inference tensor."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "dynconv_ext native kernels", -1, methods};
  return PyModule_Create(&module);
}
