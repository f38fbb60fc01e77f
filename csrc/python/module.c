/*
 * module.c - the CPython binding `dms._C`: argument parsing, DLPack import
 * into checked dms_tensor views, GIL release around every kernel, and the
 * translation of dms_status into Python exceptions. No arithmetic happens
 * here; the C API (csrc/dms.h) validates shapes, dtypes and devices.
 *
 * DLPack: an argument is any object with __dlpack__/__dlpack_device__
 * (torch.Tensor, numpy.ndarray, ...) or a raw DLPack capsule. The
 * versioned protocol (>= 1.0) is asked for first, the legacy one is the
 * fallback. A capsule is consumed by renaming it to "used_..." and its
 * deleter is called once the op returns, except in a CacheViews (the
 * cache's nine tensors imported once, for every op of a decode step),
 * which releases them when it dies.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PY_ARRAY_UNIQUE_SYMBOL dms_ARRAY_API
#include <numpy/arrayobject.h>

#include "../dms.h"
#include "dlpack.h"

#ifndef DMS_VERSION
#define DMS_VERSION "0.0.0"
#endif
#ifndef DMS_CUDA_ARCHS
#define DMS_CUDA_ARCHS ""
#endif

typedef struct {
    PyObject *dms_error;              /* base of the errors below        */
    PyObject *cuda_error;             /* the CUDA runtime failed         */
    PyObject *cuda_unavailable_error; /* CUDA tensor, CPU-only build     */
    PyObject *pool_error;             /* the page pool must grow         */
    PyTypeObject *cache_views_type;   /* _C.CacheViews                   */
    /* Constants of the DLPack calls, made once: a call per tensor should
     * not build names, dicts and tuples (they also wake the cyclic GC). */
    PyObject *str_dlpack;             /* "__dlpack__"                    */
    PyObject *str_dlpack_device;      /* "__dlpack_device__"             */
    PyObject *max_version;            /* (major, minor) dms reads        */
    PyObject *kw_version;             /* ("max_version",)                */
    PyObject *kw_stream_version;      /* ("stream", "max_version")       */
    PyObject *kw_stream;              /* ("stream",)                     */
} module_state;

static module_state *get_state(PyObject *module)
{
    return (module_state *)PyModule_GetState(module);
}

/* ---- errors ----------------------------------------------------------- */

static PyObject *raise_status(PyObject *module, dms_status status)
{
    module_state *st = get_state(module);
    PyObject *type;
    switch (status) {
    case DMS_ERR_DTYPE:
        type = PyExc_TypeError;
        break;
    case DMS_ERR_SHAPE:
    case DMS_ERR_LAYOUT:
    case DMS_ERR_DEVICE:
    case DMS_ERR_VALUE:
    case DMS_ERR_READONLY:
        type = PyExc_ValueError;
        break;
    case DMS_ERR_POOL:
        type = st->pool_error;
        break;
    case DMS_ERR_NO_CUDA:
        type = st->cuda_unavailable_error;
        break;
    case DMS_ERR_CUDA:
        type = st->cuda_error;
        break;
    default:
        type = st->dms_error;
        break;
    }
    PyErr_Format(type, "%s", dms_last_error());
    return NULL;
}

/* ---- DLPack import ---------------------------------------------------- */

typedef struct {
    dms_tensor view;
    PyObject *capsule;                     /* renamed "used_...", owned */
    DmsDLManagedTensor *legacy;            /* exactly one of these two  */
    DmsDLManagedTensorVersioned *versioned; /* is set once imported     */
} tensor_arg;

/* Hands the tensor back to its producer. Runs with the GIL held; a
 * pending exception (the op's error) is kept aside, since a deleter may run
 * Python code that must not see it. */
static void release_tensor(tensor_arg *arg)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    if (arg->versioned != NULL && arg->versioned->deleter != NULL)
        arg->versioned->deleter(arg->versioned);
    if (arg->legacy != NULL && arg->legacy->deleter != NULL)
        arg->legacy->deleter(arg->legacy);
    arg->versioned = NULL;
    arg->legacy = NULL;
    Py_CLEAR(arg->capsule);
    PyErr_Restore(type, value, traceback);
}

static void format_dl_dtype(DmsDLDataType dt, char *buf, size_t size)
{
    const char *kind;
    switch (dt.code) {
    case DMS_DL_INT: kind = "int"; break;
    case DMS_DL_UINT: kind = "uint"; break;
    case DMS_DL_FLOAT: kind = "float"; break;
    case DMS_DL_BFLOAT: kind = "bfloat"; break;
    case DMS_DL_COMPLEX: kind = "complex"; break;
    case DMS_DL_BOOL: kind = "bool"; break;
    default: kind = "dlpack-code-"; break;
    }
    if (dt.lanes != 1)
        snprintf(buf, size, "%s%u x%u lanes", kind, dt.bits, dt.lanes);
    else
        snprintf(buf, size, "%s%u", kind, dt.bits);
}

static int map_dtype(DmsDLDataType dt, dms_dtype *out)
{
    if (dt.lanes != 1)
        return -1;
    switch (dt.code) {
    case DMS_DL_FLOAT:
        if (dt.bits == 32) { *out = DMS_FLOAT32; return 0; }
        if (dt.bits == 16) { *out = DMS_FLOAT16; return 0; }
        return -1;
    case DMS_DL_BFLOAT:
        if (dt.bits == 16) { *out = DMS_BFLOAT16; return 0; }
        return -1;
    case DMS_DL_INT:
        if (dt.bits == 32) { *out = DMS_INT32; return 0; }
        if (dt.bits == 64) { *out = DMS_INT64; return 0; }
        return -1;
    case DMS_DL_UINT:
        if (dt.bits == 8) { *out = DMS_UINT8; return 0; }
        return -1;
    case DMS_DL_BOOL:
        if (dt.bits == 8) { *out = DMS_BOOL; return 0; }
        return -1;
    default:
        return -1;
    }
}

/* Re-raises the pending exception with "name: " before its message. */
static void prefix_error(const char *name)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    PyObject *text = value ? PyObject_Str(value) : NULL;
    if (text != NULL) {
        PyErr_Format(type, "%s: %U", name, text);
        Py_DECREF(text);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(traceback);
    } else {
        PyErr_Restore(type, value, traceback);
    }
}

/*
 * Asks `obj` for a DLPack capsule, versioned first. New reference; on
 * failure the exception does not name the argument yet.
 *
 * `cpu_call`: the call's device is already known to be the CPU (its cache
 * lives there). Then __dlpack_device__ is not asked (on a torch CPU tensor
 * it costs about as much as the export itself) and no stream is passed: a
 * tensor that turns out to live elsewhere is refused by the op's device
 * check before anything runs, so no stream ordering is needed for it.
 */
static PyObject *export_capsule(const module_state *st, PyObject *obj,
                                unsigned long long stream, int cpu_call)
{
    if (PyCapsule_CheckExact(obj)) {
        Py_INCREF(obj);
        return obj;
    }
    long device_type = DMS_DL_CPU;
    if (!cpu_call) {
        PyObject *device = PyObject_VectorcallMethod(st->str_dlpack_device,
                                                     &obj, 1, NULL);
        if (device == NULL)
            goto not_dlpack;
        device_type = -1;
        if (PyTuple_Check(device) && PyTuple_GET_SIZE(device) == 2)
            device_type = PyLong_AsLong(PyTuple_GET_ITEM(device, 0));
        Py_DECREF(device);
        if (device_type == -1 && PyErr_Occurred())
            return NULL;
    }
    /* __dlpack__(stream=..., max_version=...) as a vectorcall: args[0] is
     * the tensor, then the keyword values named by the kwnames tuple. */
    PyObject *args[3] = {obj, NULL, NULL};
    PyObject *kw_both = st->kw_version, *kw_legacy = NULL;
    size_t nkw = 0;
    if (device_type == DMS_DL_CUDA || device_type == DMS_DL_CUDA_MANAGED) {
        /* The producer makes its work visible on our stream. In the DLPack
         * protocol 1 names the legacy default stream (0 is reserved). */
        args[1] = PyLong_FromUnsignedLongLong(stream == 0 ? 1 : stream);
        if (args[1] == NULL)
            return NULL;
        nkw = 1;
        kw_both = st->kw_stream_version;
        kw_legacy = st->kw_stream;
    }
    args[1 + nkw] = st->max_version;
    PyObject *capsule = PyObject_VectorcallMethod(st->str_dlpack, args,
                                                  1, kw_both);
    if (capsule == NULL && PyErr_ExceptionMatches(PyExc_TypeError)) {
        /* A pre-1.0 producer does not know max_version. */
        PyErr_Clear();
        capsule = PyObject_VectorcallMethod(st->str_dlpack, args, 1,
                                            kw_legacy);
    }
    if (nkw)
        Py_DECREF(args[1]);
    if (capsule == NULL && cpu_call)
        goto not_dlpack;
    return capsule;
not_dlpack:
    if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError,
                     "expected a tensor supporting DLPack "
                     "(torch.Tensor, numpy.ndarray, ...), got %.100s",
                     Py_TYPE(obj)->tp_name);
    }
    return NULL;
}

/*
 * Imports `obj` into `arg` (zero-initialised by the caller). Returns 0, or
 * -1 with an exception set naming `name`. Rank, dtype set, shape and
 * device agreement are checked later by the C op itself.
 */
static int import_tensor(const module_state *st, PyObject *obj,
                         const char *name, int is_output,
                         unsigned long long stream, int cpu_call,
                         tensor_arg *arg)
{
    PyObject *capsule = export_capsule(st, obj, stream, cpu_call);
    if (capsule == NULL) {
        prefix_error(name); /* e.g. the producer's BufferError */
        return -1;
    }
    arg->capsule = capsule;
    if (!PyCapsule_CheckExact(capsule)) {
        PyErr_Format(PyExc_TypeError, "%s: __dlpack__ returned %.100s, not a "
                     "capsule", name, Py_TYPE(capsule)->tp_name);
        return -1;
    }
    const char *cap_name = PyCapsule_GetName(capsule);
    if (cap_name == NULL && PyErr_Occurred())
        return -1;
    DmsDLTensor *dl;
    uint64_t flags = 0;
    if (cap_name != NULL && strcmp(cap_name, "dltensor_versioned") == 0) {
        arg->versioned = (DmsDLManagedTensorVersioned *)PyCapsule_GetPointer(
            capsule, "dltensor_versioned");
        if (arg->versioned == NULL ||
            PyCapsule_SetName(capsule, "used_dltensor_versioned") < 0)
            return -1;
        if (arg->versioned->version.major != DMS_DLPACK_MAJOR) {
            /* Only the header is ABI-stable across major versions: hand the
             * tensor straight back to its producer. */
            unsigned major = arg->versioned->version.major;
            release_tensor(arg);
            PyErr_Format(PyExc_BufferError, "%s: DLPack major version %u is "
                         "not supported (dms reads version %d)", name, major,
                         DMS_DLPACK_MAJOR);
            return -1;
        }
        dl = &arg->versioned->dl_tensor;
        flags = arg->versioned->flags;
    } else if (cap_name != NULL && strcmp(cap_name, "dltensor") == 0) {
        arg->legacy =
            (DmsDLManagedTensor *)PyCapsule_GetPointer(capsule, "dltensor");
        if (arg->legacy == NULL ||
            PyCapsule_SetName(capsule, "used_dltensor") < 0)
            return -1;
        dl = &arg->legacy->dl_tensor;
    } else {
        PyErr_Format(PyExc_ValueError, "%s: expected a DLPack capsule named "
                     "'dltensor' or 'dltensor_versioned', got '%s' (a "
                     "capsule can be consumed only once)", name,
                     cap_name ? cap_name : "<unnamed>");
        return -1;
    }

    dms_tensor *v = &arg->view;
    switch (dl->device.device_type) {
    case DMS_DL_CPU:
    case DMS_DL_CUDA_HOST:
        v->device_type = DMS_CPU;
        v->device_index = 0;
        break;
    case DMS_DL_CUDA:
    case DMS_DL_CUDA_MANAGED:
        v->device_type = DMS_CUDA;
        v->device_index = dl->device.device_id;
        break;
    default:
        PyErr_Format(PyExc_ValueError, "%s: expected a CPU or CUDA tensor, "
                     "got DLPack device type %d", name,
                     (int)dl->device.device_type);
        return -1;
    }
    if (map_dtype(dl->dtype, &v->dtype) < 0) {
        char buf[48];
        format_dl_dtype(dl->dtype, buf, sizeof buf);
        PyErr_Format(PyExc_TypeError, "%s: dtype %s is not supported (dms "
                     "takes float32, float16, bfloat16, int32, int64, uint8 "
                     "and bool)", name, buf);
        return -1;
    }
    if (dl->ndim < 0 || dl->ndim > DMS_MAX_DIMS) {
        PyErr_Format(PyExc_ValueError, "%s: expected at most %d dims, got %d",
                     name, DMS_MAX_DIMS, (int)dl->ndim);
        return -1;
    }
    v->ndim = dl->ndim;
    int64_t compact = 1;
    for (int d = dl->ndim - 1; d >= 0; --d) {
        v->shape[d] = dl->shape[d];
        v->strides[d] = dl->strides ? dl->strides[d] : compact;
        compact *= dl->shape[d];
    }
    v->data = dl->data ? (char *)dl->data + dl->byte_offset : NULL;
    v->readonly = (flags & DMS_DL_FLAG_READ_ONLY) != 0;
    if (is_output && (flags & DMS_DL_FLAG_IS_COPIED)) {
        PyErr_Format(PyExc_ValueError, "%s: the producer exported a copy; an "
                     "output must be the tensor's own memory", name);
        return -1;
    }
    return 0;
}

/* ---- host arrays owned by C, seen from NumPy without a copy ----------- */

static void free_host_buffer(PyObject *capsule)
{
    free(PyCapsule_GetPointer(capsule, "dms.host_buffer"));
}

/*
 * A NumPy array over `data`, which the array (through a capsule base) owns
 * and frees with free(). On failure `data` is freed too.
 */
static PyObject *host_array(void *data, int ndim, npy_intp *dims, int typenum)
{
    PyObject *capsule = PyCapsule_New(data, "dms.host_buffer",
                                      free_host_buffer);
    if (capsule == NULL) {
        free(data);
        return NULL;
    }
    PyObject *array = PyArray_SimpleNewFromData(ndim, dims, typenum, data);
    if (array == NULL) {
        Py_DECREF(capsule);
        return NULL;
    }
    if (PyArray_SetBaseObject((PyArrayObject *)array, capsule) < 0) {
        Py_DECREF(array);
        return NULL;
    }
    return array;
}

static PyObject *py_aligned_empty(PyObject *module, PyObject *args,
                                  PyObject *kwargs)
{
    static char *keywords[] = {"shape", "dtype", "alignment", NULL};
    PyObject *shape;
    const char *dtype;
    Py_ssize_t alignment = 64;
    (void)module;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Os|n:aligned_empty",
                                     keywords, &shape, &dtype, &alignment))
        return NULL;
    static const struct { const char *name; int typenum; size_t size; }
    types[] = {{"float32", NPY_FLOAT32, 4}, {"float16", NPY_FLOAT16, 2},
               {"int32", NPY_INT32, 4},     {"int64", NPY_INT64, 8},
               {"uint8", NPY_UINT8, 1},     {"bool", NPY_BOOL, 1}};
    int typenum = -1;
    size_t itemsize = 0;
    for (size_t i = 0; i < sizeof types / sizeof types[0]; ++i) {
        if (strcmp(dtype, types[i].name) == 0) {
            typenum = types[i].typenum;
            itemsize = types[i].size;
        }
    }
    if (typenum < 0)
        return PyErr_Format(PyExc_TypeError, "dtype: expected float32, "
                            "float16, int32, int64, uint8 or bool, got '%s'",
                            dtype);
    if (alignment < (Py_ssize_t)sizeof(void *) ||
        (alignment & (alignment - 1)) != 0 || alignment > 4096)
        return PyErr_Format(PyExc_ValueError, "alignment: expected a power "
                            "of two in [%d, 4096], got %zd",
                            (int)sizeof(void *), alignment);
    PyObject *seq = PySequence_Fast(shape, "shape: expected a sequence of "
                                    "non-negative ints");
    if (seq == NULL)
        return NULL;
    Py_ssize_t ndim = PySequence_Fast_GET_SIZE(seq);
    npy_intp dims[DMS_MAX_DIMS];
    size_t nbytes = itemsize;
    if (ndim > DMS_MAX_DIMS) {
        Py_DECREF(seq);
        return PyErr_Format(PyExc_ValueError, "shape: expected at most %d "
                            "dims, got %zd", DMS_MAX_DIMS, ndim);
    }
    for (Py_ssize_t d = 0; d < ndim; ++d) {
        long long n = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, d));
        if (n == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return NULL;
        }
        if (n < 0 || (n > 0 && nbytes > SIZE_MAX / 2 / (size_t)n)) {
            Py_DECREF(seq);
            return PyErr_Format(PyExc_ValueError, "shape: dim %zd is %lld; "
                                "expected a non-negative size that fits in "
                                "memory", d, n);
        }
        dims[d] = (npy_intp)n;
        nbytes *= (size_t)n;
    }
    Py_DECREF(seq);
    /* aligned_alloc wants a multiple of the alignment, and never 0. */
    size_t rounded = (nbytes + (size_t)alignment - 1) & ~((size_t)alignment - 1);
    void *data = aligned_alloc((size_t)alignment,
                               rounded ? rounded : (size_t)alignment);
    if (data == NULL)
        return PyErr_NoMemory();
    return host_array(data, (int)ndim, dims, typenum);
}

/* ---- ops -------------------------------------------------------------- */

#define EXEC_KEYWORDS "num_threads", "stream"

/* How an op takes one tensor argument. */
typedef struct {
    const char *name;
    int is_output;
    int optional; /* None allowed (the view is then NULL) */
} tensor_spec;

#define MAX_TENSOR_ARGS 20

/* The tensors of one call, imported from Python objects by import_all. */
typedef struct {
    int count;
    tensor_arg args[MAX_TENSOR_ARGS];
    const dms_tensor *views[MAX_TENSOR_ARGS];
} tensor_args;

/* Imports objs[i] per specs[i] into out->args[first + i]; -1 with an
 * exception set naming the argument. `cpu_call` as in export_capsule. */
static int import_range(const module_state *st, const tensor_spec *specs,
                        PyObject *const *objs, int n,
                        unsigned long long stream, int cpu_call,
                        tensor_args *out, int first)
{
    for (int i = 0; i < n; ++i) {
        if (objs[i] == Py_None) {
            if (!specs[i].optional) {
                PyErr_Format(PyExc_ValueError, "%s: a tensor is required, "
                             "got None", specs[i].name);
                return -1;
            }
            continue;
        }
        tensor_arg *arg = &out->args[first + i];
        if (import_tensor(st, objs[i], specs[i].name, specs[i].is_output,
                          stream, cpu_call, arg) < 0)
            return -1;
        out->views[first + i] = &arg->view;
    }
    return 0;
}

/* Imports objs[i] per specs[i]; -1 with an exception set naming the
 * argument. Call release_all afterwards in every case. */
static int import_all(PyObject *module, const tensor_spec *specs,
                      PyObject *const *objs, int n,
                      unsigned long long stream, tensor_args *out)
{
    memset(out, 0, sizeof *out);
    out->count = n;
    return import_range(get_state(module), specs, objs, n, stream, 0, out,
                        0);
}

static void release_all(tensor_args *t)
{
    for (int i = 0; i < t->count; ++i)
        release_tensor(&t->args[i]);
}

/* Runs `call` (a dms_status expression over `views`) without the GIL, then
 * releases the tensors and turns the status into None or an exception. */
#define RUN_OP(module, tensors, call)                                     \
    do {                                                                  \
        dms_status status_;                                               \
        const dms_tensor *const *v = (tensors).views;                     \
        (void)v;                                                          \
        Py_BEGIN_ALLOW_THREADS                                            \
        status_ = (call);                                                 \
        Py_END_ALLOW_THREADS                                              \
        release_all(&(tensors));                                          \
        if (status_ != DMS_OK)                                            \
            return raise_status((module), status_);                       \
        Py_RETURN_NONE;                                                   \
    } while (0)

static PyObject *py_gate_forward(PyObject *module, PyObject *args,
                                 PyObject *kwargs)
{
    static char *keywords[] = {"z", "noise", "tau", "y", "p", "a",
                               EXEC_KEYWORDS, NULL};
    static const tensor_spec specs[] = {{"z", 0, 0}, {"noise", 0, 1},
                                        {"y", 1, 1}, {"p", 1, 1},
                                        {"a", 1, 1}};
    PyObject *o[5];
    double tau;
    int num_threads = 0;
    unsigned long long stream = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOdOOO|$iK:gate_forward",
                                     keywords, &o[0], &o[1], &tau, &o[2],
                                     &o[3], &o[4], &num_threads, &stream))
        return NULL;
    tensor_args t;
    if (import_all(module, specs, o, 5, stream, &t) < 0) {
        release_all(&t);
        return NULL;
    }
    dms_exec exec = {num_threads, (void *)(uintptr_t)stream};
    RUN_OP(module, t,
           dms_gate_forward(v[0], v[1], (float)tau, v[2], v[3], v[4], &exec));
}

static PyObject *py_gate_backward(PyObject *module, PyObject *args,
                                  PyObject *kwargs)
{
    static char *keywords[] = {"y", "grad_a", "grad_p", "grad_y", "tau",
                               "grad_z", EXEC_KEYWORDS, NULL};
    static const tensor_spec specs[] = {{"y", 0, 0}, {"grad_a", 0, 1},
                                        {"grad_p", 0, 1}, {"grad_y", 0, 1},
                                        {"grad_z", 1, 1}};
    PyObject *o[5];
    double tau;
    int num_threads = 0;
    unsigned long long stream = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOdO|$iK:gate_backward",
                                     keywords, &o[0], &o[1], &o[2], &o[3],
                                     &tau, &o[4], &num_threads, &stream))
        return NULL;
    tensor_args t;
    if (import_all(module, specs, o, 5, stream, &t) < 0) {
        release_all(&t);
        return NULL;
    }
    dms_exec exec = {num_threads, (void *)(uintptr_t)stream};
    RUN_OP(module, t,
           dms_gate_backward(v[0], v[1], v[2], v[3], (float)tau, v[4], &exec));
}

static PyObject *py_attn_train_forward(PyObject *module, PyObject *args,
                                       PyObject *kwargs)
{
    static char *keywords[] = {"q", "k", "v", "y", "key_padding", "window",
                               "scale", "o", "lse", EXEC_KEYWORDS, NULL};
    static const tensor_spec specs[] = {
        {"q", 0, 0}, {"k", 0, 0}, {"v", 0, 0}, {"y", 0, 1},
        {"key_padding", 0, 1}, {"o", 1, 0}, {"lse", 1, 0}};
    PyObject *o[7];
    long long window;
    double scale;
    int num_threads = 0;
    unsigned long long stream = 0;
    if (!PyArg_ParseTupleAndKeywords(
            args, kwargs, "OOOOOLdOO|$iK:attn_train_forward", keywords, &o[0],
            &o[1], &o[2], &o[3], &o[4], &window, &scale, &o[5], &o[6],
            &num_threads, &stream))
        return NULL;
    tensor_args t;
    if (import_all(module, specs, o, 7, stream, &t) < 0) {
        release_all(&t);
        return NULL;
    }
    dms_exec exec = {num_threads, (void *)(uintptr_t)stream};
    RUN_OP(module, t,
           dms_attn_train_forward(v[0], v[1], v[2], v[3], v[4],
                                  (int64_t)window, (float)scale, v[5], v[6],
                                  &exec));
}

static PyObject *py_attn_train_backward(PyObject *module, PyObject *args,
                                        PyObject *kwargs)
{
    static char *keywords[] = {"q", "k", "v", "y", "key_padding", "window",
                               "scale", "o", "lse", "grad_o", "grad_q",
                               "grad_k", "grad_v", "grad_y", EXEC_KEYWORDS,
                               NULL};
    static const tensor_spec specs[] = {
        {"q", 0, 0},      {"k", 0, 0},      {"v", 0, 0},
        {"y", 0, 1},      {"key_padding", 0, 1}, {"o", 0, 0},
        {"lse", 0, 0},    {"grad_o", 0, 0}, {"grad_q", 1, 0},
        {"grad_k", 1, 0}, {"grad_v", 1, 0}, {"grad_y", 1, 1}};
    PyObject *o[12];
    long long window;
    double scale;
    int num_threads = 0;
    unsigned long long stream = 0;
    if (!PyArg_ParseTupleAndKeywords(
            args, kwargs, "OOOOOLdOOOOOOO|$iK:attn_train_backward", keywords,
            &o[0], &o[1], &o[2], &o[3], &o[4], &window, &scale, &o[5], &o[6],
            &o[7], &o[8], &o[9], &o[10], &o[11], &num_threads, &stream))
        return NULL;
    tensor_args t;
    if (import_all(module, specs, o, 12, stream, &t) < 0) {
        release_all(&t);
        return NULL;
    }
    dms_exec exec = {num_threads, (void *)(uintptr_t)stream};
    RUN_OP(module, t,
           dms_attn_train_backward(v[0], v[1], v[2], v[3], v[4],
                                   (int64_t)window, (float)scale, v[5], v[6],
                                   v[7], v[8], v[9], v[10], v[11], &exec));
}

static PyObject *py_logistic_noise(PyObject *module, PyObject *args,
                                   PyObject *kwargs)
{
    static char *keywords[] = {"out", "seed", "process_index", "accum_step",
                               "global_step", EXEC_KEYWORDS, NULL};
    PyObject *oout, *oseed;
    unsigned long process_index, accum_step, global_step;
    int num_threads = 0;
    unsigned long long stream = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOkkk|$iK:logistic_noise",
                                     keywords, &oout, &oseed, &process_index,
                                     &accum_step, &global_step, &num_threads,
                                     &stream))
        return NULL;
    /* 'k' wraps silently; the counters must fit 32 bits and the seed 64. */
    if (process_index > UINT32_MAX || accum_step > UINT32_MAX ||
        global_step > UINT32_MAX)
        return PyErr_Format(PyExc_ValueError, "process_index, accum_step, "
                            "global_step: expected values in [0, 2^32), got "
                            "%lu, %lu, %lu", process_index, accum_step,
                            global_step);
    unsigned long long seed = PyLong_AsUnsignedLongLong(oseed);
    if (seed == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return PyErr_Format(PyExc_ValueError, "seed: expected an int in "
                            "[0, 2^64)");
    }
    static const tensor_spec specs[] = {{"out", 1, 0}};
    tensor_args t;
    if (import_all(module, specs, &oout, 1, stream, &t) < 0) {
        release_all(&t);
        return NULL;
    }
    dms_exec exec = {num_threads, (void *)(uintptr_t)stream};
    RUN_OP(module, t,
           dms_logistic_noise(v[0], seed, (uint32_t)process_index,
                              (uint32_t)accum_step, (uint32_t)global_step,
                              &exec));
}

/* ---- paged cache ------------------------------------------------------ */

/* The cache tensors, in the order Python passes them (dms/cache.py): nine,
 * then the two scale tensors of FP8 pages. An op's own tensors follow them
 * at index CACHE_TENSORS of its views (the scales' views NULL without). */
static const tensor_spec cache_specs[] = {
    {"cache.k_pages", 1, 0},    {"cache.v_pages", 1, 0},
    {"cache.slot_limit", 1, 0}, {"cache.page_table", 1, 0},
    {"cache.row_slots", 1, 0},  {"cache.row_seen", 1, 0},
    {"cache.window", 1, 0},     {"cache.free_pages", 1, 0},
    {"cache.free_count", 1, 0}, {"cache.k_scales", 1, 0},
    {"cache.v_scales", 1, 0}};
#define CACHE_TENSORS 11
#define CACHE_TENSORS_NATIVE 9

/*
 * _C.CacheViews(cache, *, stream=0): the nine cache tensors (eleven with
 * FP8 pages) imported once.
 *
 * Every op of a decode step hands over the same pool, page table and
 * counters. Importing them anew per call cost nine DLPack exports, about
 * 40 us on a CPU: more than the attention over a 512-slot row. This object
 * keeps the exports (so their producers keep the memory alive), the tensor
 * objects themselves and the stream they were exported for. An op given it
 * reuses the views; the C API still checks their dtypes, shapes and devices
 * at every call. `holds(cache, stream)` says whether it still stands for a
 * tuple (the same objects, the same stream), so dms.cache imports again
 * after it replaced a tensor (pool growth, select_rows). A tensor whose
 * memory is swapped in place (torch's resize_ or set_) is not noticed; the
 * cache never does that to its tensors.
 */
typedef struct {
    PyObject_HEAD
    PyObject *objects[CACHE_TENSORS]; /* the tensors imported, owned       */
    int n_objects;                   /* 9, or 11 with FP8 pages           */
    unsigned long long stream;       /* the stream they were exported for */
    tensor_args imported;            /* args[0..n_objects): their exports */
} cache_views_object;

static int cache_views_clear(PyObject *self)
{
    cache_views_object *cv = (cache_views_object *)self;
    release_all(&cv->imported);
    cv->imported.count = 0;
    for (int i = 0; i < CACHE_TENSORS; ++i)
        Py_CLEAR(cv->objects[i]);
    return 0;
}

static int cache_views_traverse(PyObject *self, visitproc visit, void *arg)
{
    cache_views_object *cv = (cache_views_object *)self;
    Py_VISIT(Py_TYPE(self));
    for (int i = 0; i < CACHE_TENSORS; ++i)
        Py_VISIT(cv->objects[i]);
    return 0;
}

static void cache_views_dealloc(PyObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    cache_views_clear(self);
    type->tp_free(self);
    Py_DECREF(type);
}

/* The number of tensors of a cache tuple (9 or 11), or -1 with an
 * exception set. */
static int check_cache_tuple(PyObject *state)
{
    if (PyTuple_Check(state) &&
        (PyTuple_GET_SIZE(state) == CACHE_TENSORS_NATIVE ||
         PyTuple_GET_SIZE(state) == CACHE_TENSORS))
        return (int)PyTuple_GET_SIZE(state);
    PyErr_Format(PyExc_TypeError, "cache: expected a tuple of %d tensors "
                 "(k_pages, v_pages, slot_limit, page_table, row_slots, "
                 "row_seen, window, free_pages, free_count), %d with FP8 "
                 "pages (then k_scales, v_scales), or a CacheViews of one, "
                 "got %.100s", CACHE_TENSORS_NATIVE, CACHE_TENSORS,
                 Py_TYPE(state)->tp_name);
    return -1;
}

static PyObject *cache_views_new(PyTypeObject *type, PyObject *args,
                                 PyObject *kwargs)
{
    static char *keywords[] = {"cache", "stream", NULL};
    PyObject *state;
    unsigned long long stream = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|$K:CacheViews",
                                     keywords, &state, &stream))
        return NULL;
    const int n = check_cache_tuple(state);
    if (n < 0)
        return NULL;
    cache_views_object *cv = (cache_views_object *)type->tp_alloc(type, 0);
    if (cv == NULL)
        return NULL;
    cv->stream = stream;
    cv->n_objects = n;
    cv->imported.count = n;
    PyObject *objs[CACHE_TENSORS];
    for (int i = 0; i < n; ++i) {
        objs[i] = PyTuple_GET_ITEM(state, i);
        cv->objects[i] = Py_NewRef(objs[i]);
    }
    const module_state *st = get_state(PyType_GetModule(type));
    if (import_range(st, cache_specs, objs, n, stream, 0, &cv->imported,
                     0) < 0) {
        Py_DECREF(cv);
        return NULL;
    }
    return (PyObject *)cv;
}

static PyObject *cache_views_holds(PyObject *self, PyObject *const *args,
                                   Py_ssize_t nargs)
{
    cache_views_object *cv = (cache_views_object *)self;
    if (nargs < 1 || nargs > 2)
        return PyErr_Format(PyExc_TypeError, "holds(cache, stream=0): "
                            "expected 1 or 2 arguments, got %zd", nargs);
    unsigned long long stream = 0;
    if (nargs == 2) {
        stream = PyLong_AsUnsignedLongLong(args[1]);
        if (stream == (unsigned long long)-1 && PyErr_Occurred())
            return NULL;
    }
    PyObject *state = args[0];
    if (stream != cv->stream || !PyTuple_Check(state) ||
        PyTuple_GET_SIZE(state) != cv->n_objects)
        Py_RETURN_FALSE;
    for (int i = 0; i < cv->n_objects; ++i)
        if (PyTuple_GET_ITEM(state, i) != cv->objects[i])
            Py_RETURN_FALSE;
    Py_RETURN_TRUE;
}

static PyMethodDef cache_views_methods[] = {
    {"holds", (PyCFunction)(void (*)(void))cache_views_holds, METH_FASTCALL,
     "holds(cache, stream=0)\nTrue if these views were imported from the "
     "very tensors of the tuple\n`cache` (identity, not equality) for "
     "`stream`."},
    {NULL, NULL, 0, NULL}};

static PyType_Slot cache_views_slots[] = {
    {Py_tp_new, cache_views_new},
    {Py_tp_dealloc, cache_views_dealloc},
    {Py_tp_traverse, cache_views_traverse},
    {Py_tp_clear, cache_views_clear},
    {Py_tp_methods, cache_views_methods},
    {Py_tp_doc,
     "CacheViews(cache, *, stream=0)\nThe nine cache tensors (k_pages, "
     "v_pages, slot_limit, page_table,\nrow_slots, row_seen, window, "
     "free_pages, free_count; then k_scales, v_scales\nwith FP8 pages) "
     "imported once through DLPack; the cache ops take it\nin place of the "
     "tuple and skip the exports per call. Keeps the tensors\nalive."},
    {0, NULL}};

static PyType_Spec cache_views_spec = {
    .name = "dms._C.CacheViews",
    .basicsize = sizeof(cache_views_object),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = cache_views_slots,
};

/* Fills t->views[0..10] from `state` (a CacheViews, or a tuple imported
 * here; views 9 and 10 stay NULL without scales), then imports the op's
 * other tensors after them; fills `cache` (kv_format: dms_kv_format).
 * Once the cache's device is known to be the CPU, the other tensors skip
 * the device query (export_capsule). */
static int import_cache_call(PyObject *module, PyObject *state,
                             long long window_size, int kv_format,
                             const tensor_spec *specs,
                             PyObject *const *objs, int n,
                             unsigned long long stream, tensor_args *t,
                             dms_cache *cache)
{
    memset(t, 0, sizeof *t);
    t->count = CACHE_TENSORS + n;
    const module_state *st = get_state(module);
    if (Py_IS_TYPE(state, st->cache_views_type)) {
        const cache_views_object *cv = (const cache_views_object *)state;
        if (cv->imported.views[0]->device_type == DMS_CUDA &&
            cv->stream != stream) {
            PyErr_Format(PyExc_ValueError, "cache: its CacheViews were "
                         "exported for CUDA stream %llu, the call runs on "
                         "stream %llu; import them again for this stream",
                         cv->stream, stream);
            return -1;
        }
        /* Borrowed: t->args[0..10] stay empty, so release_all skips
         * them. */
        for (int i = 0; i < cv->n_objects; ++i)
            t->views[i] = cv->imported.views[i];
    } else {
        const int n_state = check_cache_tuple(state);
        if (n_state < 0)
            return -1;
        PyObject *cache_objs[CACHE_TENSORS];
        for (int i = 0; i < n_state; ++i)
            cache_objs[i] = PyTuple_GET_ITEM(state, i);
        if (import_range(st, cache_specs, cache_objs, 1, stream, 0, t, 0) < 0)
            return -1;
        if (import_range(st, cache_specs + 1, cache_objs + 1, n_state - 1,
                         stream, t->views[0]->device_type == DMS_CPU, t,
                         1) < 0)
            return -1;
    }
    if (import_range(st, specs, objs, n, stream,
                     t->views[0]->device_type == DMS_CPU, t,
                     CACHE_TENSORS) < 0)
        return -1;
    const dms_tensor *const *v = t->views;
    cache->k_pages = v[0];
    cache->v_pages = v[1];
    cache->slot_limit = v[2];
    cache->page_table = v[3];
    cache->row_slots = v[4];
    cache->row_seen = v[5];
    cache->window = v[6];
    cache->free_pages = v[7];
    cache->free_count = v[8];
    cache->k_scales = v[9];
    cache->v_scales = v[10];
    cache->window_size = (int64_t)window_size;
    cache->kv_format = (dms_kv_format)kv_format;
    return 0;
}

static PyObject *py_cache_append(PyObject *module, PyObject *args,
                                 PyObject *kwargs)
{
    static char *keywords[] = {"cache", "window_size", "k_new", "v_new",
                               "decisions", "key_padding", "token_slots",
                               "kv_format", EXEC_KEYWORDS, NULL};
    static const tensor_spec specs[] = {{"k_new", 0, 0}, {"v_new", 0, 0},
                                        {"decisions", 0, 0},
                                        {"key_padding", 0, 1},
                                        {"token_slots", 1, 0}};
    PyObject *state, *o[5];
    long long window_size;
    int kv_format = 0, num_threads = 0;
    unsigned long long stream = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs,
                                     "OLOOOOO|$iiK:cache_append", keywords,
                                     &state, &window_size, &o[0], &o[1], &o[2],
                                     &o[3], &o[4], &kv_format, &num_threads,
                                     &stream))
        return NULL;
    tensor_args t;
    dms_cache cache;
    if (import_cache_call(module, state, window_size, kv_format, specs, o, 5,
                          stream, &t, &cache) < 0) {
        release_all(&t);
        return NULL;
    }
    dms_exec exec = {num_threads, (void *)(uintptr_t)stream};
    RUN_OP(module, t,
           dms_cache_append(&cache, v[11], v[12], v[13], v[14], v[15],
                            &exec));
}

static PyObject *py_attn_prefill(PyObject *module, PyObject *args,
                                 PyObject *kwargs)
{
    static char *keywords[] = {"cache", "window_size", "q", "k_new", "v_new",
                               "decisions", "key_padding", "scale", "o",
                               "lse", "kv_format", EXEC_KEYWORDS, NULL};
    static const tensor_spec specs[] = {
        {"q", 0, 0},         {"k_new", 0, 0},       {"v_new", 0, 0},
        {"decisions", 0, 0}, {"key_padding", 0, 1}, {"o", 1, 0},
        {"lse", 1, 0}};
    PyObject *state, *o[7];
    long long window_size;
    double scale;
    int kv_format = 0, num_threads = 0;
    unsigned long long stream = 0;
    if (!PyArg_ParseTupleAndKeywords(
            args, kwargs, "OLOOOOOdOO|$iiK:attn_prefill", keywords, &state,
            &window_size, &o[0], &o[1], &o[2], &o[3], &o[4], &scale, &o[5],
            &o[6], &kv_format, &num_threads, &stream))
        return NULL;
    tensor_args t;
    dms_cache cache;
    if (import_cache_call(module, state, window_size, kv_format, specs, o, 7,
                          stream, &t, &cache) < 0) {
        release_all(&t);
        return NULL;
    }
    dms_exec exec = {num_threads, (void *)(uintptr_t)stream};
    RUN_OP(module, t,
           dms_attn_prefill(&cache, v[11], v[12], v[13], v[14], v[15],
                            (float)scale, v[16], v[17], &exec));
}

static PyObject *py_attn_decode(PyObject *module, PyObject *args,
                                PyObject *kwargs)
{
    static char *keywords[] = {"cache", "window_size", "q", "scale", "o",
                               "lse", "workspace", "kv_format", EXEC_KEYWORDS,
                               NULL};
    static const tensor_spec specs[] = {{"q", 0, 0}, {"o", 1, 0},
                                        {"lse", 1, 0}, {"workspace", 1, 1}};
    PyObject *state, *o[4];
    long long window_size;
    double scale;
    int kv_format = 0, num_threads = 0;
    unsigned long long stream = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs,
                                     "OLOdOOO|$iiK:attn_decode", keywords,
                                     &state, &window_size, &o[0], &scale,
                                     &o[1], &o[2], &o[3], &kv_format,
                                     &num_threads, &stream))
        return NULL;
    tensor_args t;
    dms_cache cache;
    if (import_cache_call(module, state, window_size, kv_format, specs, o, 4,
                          stream, &t, &cache) < 0) {
        release_all(&t);
        return NULL;
    }
    dms_exec exec = {num_threads, (void *)(uintptr_t)stream};
    RUN_OP(module, t,
           dms_attn_decode(&cache, v[11], (float)scale, v[12], v[13], v[14],
                           &exec));
}

/* ---- introspection ---------------------------------------------------- */

static PyObject *int_tuple(const int64_t *values, int n)
{
    PyObject *tuple = PyTuple_New(n);
    if (tuple == NULL)
        return NULL;
    for (int i = 0; i < n; ++i) {
        PyObject *item = PyLong_FromLongLong(values[i]);
        if (item == NULL) {
            Py_DECREF(tuple);
            return NULL;
        }
        PyTuple_SET_ITEM(tuple, i, item);
    }
    return tuple;
}

static PyObject *py_tensor_info(PyObject *module, PyObject *args,
                                PyObject *kwargs)
{
    static char *keywords[] = {"tensor", "stream", NULL};
    PyObject *obj;
    unsigned long long stream = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|$K:tensor_info",
                                     keywords, &obj, &stream))
        return NULL;
    tensor_arg t = {0};
    PyObject *result = NULL, *shape = NULL, *strides = NULL;
    if (import_tensor(get_state(module), obj, "tensor", 0, stream, 0,
                      &t) < 0)
        goto cleanup;
    shape = int_tuple(t.view.shape, t.view.ndim);
    strides = int_tuple(t.view.strides, t.view.ndim);
    if (shape == NULL || strides == NULL)
        goto cleanup;
    PyObject *version = t.versioned
        ? Py_BuildValue("(II)", t.versioned->version.major,
                        t.versioned->version.minor)
        : Py_NewRef(Py_None);
    if (version == NULL)
        goto cleanup;
    result = Py_BuildValue(
        "{s:s,s:(si),s:O,s:O,s:O,s:N,s:K}", "dtype",
        dms_dtype_name(t.view.dtype), "device",
        t.view.device_type == DMS_CUDA ? "cuda" : "cpu",
        t.view.device_index, "shape", shape, "strides", strides, "readonly",
        t.view.readonly ? Py_True : Py_False, "dlpack_version", version,
        "data_ptr", (unsigned long long)(uintptr_t)t.view.data);
cleanup:
    Py_XDECREF(shape);
    Py_XDECREF(strides);
    release_tensor(&t);
    return result;
}

static PyObject *py_build_info(PyObject *module, PyObject *unused)
{
    (void)unused;
    unsigned features = dms_cpu_features();
    PyObject *cpu = PyList_New(0);
    if (cpu == NULL)
        return NULL;
    static const struct { unsigned bit; const char *name; } names[] = {
        {DMS_CPU_AVX2, "avx2"},       {DMS_CPU_FMA, "fma"},
        {DMS_CPU_F16C, "f16c"},       {DMS_CPU_AVX512F, "avx512f"},
        {DMS_CPU_AVX512BF16, "avx512bf16"}, {DMS_CPU_AMX_BF16, "amx_bf16"}};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; ++i) {
        if (!(features & names[i].bit))
            continue;
        PyObject *s = PyUnicode_FromString(names[i].name);
        if (s == NULL || PyList_Append(cpu, s) < 0) {
            Py_XDECREF(s);
            Py_DECREF(cpu);
            return NULL;
        }
        Py_DECREF(s);
    }
    static const char *const ops[] = {"gate", "logistic_noise", "attn_train",
                                      "attn_prefill", "attn_decode"};
    PyObject *kernels = PyDict_New();
    if (kernels == NULL) {
        Py_DECREF(cpu);
        return NULL;
    }
    for (size_t i = 0; i < sizeof ops / sizeof ops[0]; ++i) {
        PyObject *s = PyUnicode_FromString(dms_cpu_kernel(ops[i]));
        if (s == NULL || PyDict_SetItemString(kernels, ops[i], s) < 0) {
            Py_XDECREF(s);
            Py_DECREF(kernels);
            Py_DECREF(cpu);
            return NULL;
        }
        Py_DECREF(s);
    }
    int runtime = 0, driver = 0, cublas = 0, devices = 0;
    if (dms_has_cuda()) {
        dms_status status = dms_cuda_info(&runtime, &driver, &cublas,
                                          &devices);
        if (status != DMS_OK) {
            Py_DECREF(cpu);
            Py_DECREF(kernels);
            return raise_status(module, status);
        }
    }
#if defined(__SANITIZE_ADDRESS__)
    PyObject *sanitized = Py_True;
#else
    PyObject *sanitized = Py_False;
#endif
#ifdef _OPENMP
    PyObject *openmp = Py_True;
    int openmp_version = _OPENMP;
#else
    PyObject *openmp = Py_False;
    int openmp_version = 0;
#endif
#if defined(__clang__)
    const char *compiler = "clang " __clang_version__;
#elif defined(__GNUC__)
    const char *compiler = "gcc " __VERSION__;
#else
    const char *compiler = "unknown";
#endif
    return Py_BuildValue(
        "{s:s,s:O,s:s,s:i,s:i,s:i,s:i,s:N,s:N,s:O,s:i,s:i,s:s,s:(ii),s:O}",
        "version", DMS_VERSION, "cuda", dms_has_cuda() ? Py_True : Py_False,
        "cuda_archs", DMS_CUDA_ARCHS, "cuda_runtime_version", runtime,
        "cuda_driver_version", driver, "cublas_version", cublas,
        "cuda_device_count", devices, "cpu_features", cpu, "cpu_kernels",
        kernels, "openmp", openmp,
        "openmp_version", openmp_version, "default_num_threads",
        dms_default_num_threads(), "compiler", compiler, "dlpack_version",
        DMS_DLPACK_MAJOR, DMS_DLPACK_MINOR, "sanitized", sanitized);
}

/* ---- module ----------------------------------------------------------- */

static PyMethodDef methods[] = {
    {"gate_forward", (PyCFunction)(void (*)(void))py_gate_forward,
     METH_VARARGS | METH_KEYWORDS,
     "gate_forward(z, noise, tau, y, p, a, *, num_threads=0, stream=0)\n"
     "Writes y = (z + noise) / tau, p = sigmoid(y), a = 1[y > 0] into the\n"
     "given outputs (None skips one). Shapes [B, H, T]; noise=None is the\n"
     "inference threshold a = 1[z > 0]."},
    {"gate_backward", (PyCFunction)(void (*)(void))py_gate_backward,
     METH_VARARGS | METH_KEYWORDS,
     "gate_backward(y, grad_a, grad_p, grad_y, tau, grad_z, *, num_threads=0,"
     " stream=0)\nWrites grad_z = ((grad_a + grad_p) * s * (1 - s) + grad_y)"
     " / tau,\ns = sigmoid(y); a None gradient counts as zero."},
    {"logistic_noise", (PyCFunction)(void (*)(void))py_logistic_noise,
     METH_VARARGS | METH_KEYWORDS,
     "logistic_noise(out, seed, process_index, accum_step, global_step, *,\n"
     "num_threads=0, stream=0)\nFills the float32 C-contiguous `out` with "
     "standard logistic noise drawn\nfrom Philox4x32-10 keyed by seed; the "
     "same arguments give the same noise\non CPU and CUDA."},
    {"attn_train_forward",
     (PyCFunction)(void (*)(void))py_attn_train_forward,
     METH_VARARGS | METH_KEYWORDS,
     "attn_train_forward(q, k, v, y, key_padding, window, scale, o, lse, *,\n"
     "num_threads=0, stream=0)\nDMS training attention (SPEC section 3, "
     "soft form) into o [B, H*G, T, D]\nand lse [B, H*G, T]; see "
     "dms_attn_train_forward in csrc/dms.h."},
    {"attn_train_backward",
     (PyCFunction)(void (*)(void))py_attn_train_backward,
     METH_VARARGS | METH_KEYWORDS,
     "attn_train_backward(q, k, v, y, key_padding, window, scale, o, lse,\n"
     "grad_o, grad_q, grad_k, grad_v, grad_y, *, num_threads=0, stream=0)\n"
     "Gradients of attn_train_forward; see dms_attn_train_backward."},
    {"cache_append", (PyCFunction)(void (*)(void))py_cache_append,
     METH_VARARGS | METH_KEYWORDS,
     "cache_append(cache, window_size, k_new, v_new, decisions, key_padding,\n"
     "token_slots, *, num_threads=0, stream=0)\nAppends n tokens per row "
     "with delayed eviction; see dms_cache_append.\n`cache`: the nine "
     "cache tensors as a tuple or a CacheViews (so in\nevery cache op)."},
    {"attn_prefill", (PyCFunction)(void (*)(void))py_attn_prefill,
     METH_VARARGS | METH_KEYWORDS,
     "attn_prefill(cache, window_size, q, k_new, v_new, decisions,\n"
     "key_padding, scale, o, lse, *, num_threads=0, stream=0)\nAttention of "
     "new queries over the cache and the new keys; see dms_attn_prefill."},
    {"attn_decode", (PyCFunction)(void (*)(void))py_attn_decode,
     METH_VARARGS | METH_KEYWORDS,
     "attn_decode(cache, window_size, q, scale, o, lse, workspace, *,\n"
     "num_threads=0, stream=0)\nOne query per row over the stored slots; "
     "see dms_attn_decode."},
    {"aligned_empty", (PyCFunction)(void (*)(void))py_aligned_empty,
     METH_VARARGS | METH_KEYWORDS,
     "aligned_empty(shape, dtype, alignment=64)\nAn uninitialised NumPy "
     "array whose memory dms allocated (aligned to\n`alignment` bytes) and "
     "frees when the array dies."},
    {"tensor_info", (PyCFunction)(void (*)(void))py_tensor_info,
     METH_VARARGS | METH_KEYWORDS,
     "tensor_info(tensor, *, stream=0)\nThe checked view dms makes of a "
     "DLPack tensor: dtype, device, shape,\nstrides (elements), readonly, "
     "the DLPack version used, data pointer."},
    {"build_info", py_build_info, METH_NOARGS,
     "build_info()\nWhat this build of the extension contains."},
    {NULL, NULL, 0, NULL}};

static int module_exec(PyObject *module)
{
    if (PyArray_ImportNumPyAPI() < 0)
        return -1;
    module_state *st = get_state(module);
    st->dms_error = PyErr_NewExceptionWithDoc(
        "dms.DMSError", "Base class of the errors raised by dms kernels.",
        PyExc_RuntimeError, NULL);
    if (st->dms_error == NULL ||
        PyModule_AddObjectRef(module, "DMSError", st->dms_error) < 0)
        return -1;
    st->cuda_error = PyErr_NewExceptionWithDoc(
        "dms.CudaError", "The CUDA runtime reported an error.", st->dms_error,
        NULL);
    if (st->cuda_error == NULL ||
        PyModule_AddObjectRef(module, "CudaError", st->cuda_error) < 0)
        return -1;
    st->cuda_unavailable_error = PyErr_NewExceptionWithDoc(
        "dms.CudaUnavailableError",
        "A CUDA tensor reached a build of dms without CUDA kernels.",
        st->dms_error, NULL);
    if (st->cuda_unavailable_error == NULL ||
        PyModule_AddObjectRef(module, "CudaUnavailableError",
                              st->cuda_unavailable_error) < 0)
        return -1;
    st->pool_error = PyErr_NewExceptionWithDoc(
        "dms.PoolExhaustedError",
        "The cache's page pool (or page table) is too small for the call; "
        "nothing was changed.", st->dms_error, NULL);
    if (st->pool_error == NULL ||
        PyModule_AddObjectRef(module, "PoolExhaustedError", st->pool_error) < 0)
        return -1;
    st->str_dlpack = PyUnicode_InternFromString("__dlpack__");
    st->str_dlpack_device = PyUnicode_InternFromString("__dlpack_device__");
    st->max_version = Py_BuildValue("(ii)", DMS_DLPACK_MAJOR,
                                    DMS_DLPACK_MINOR);
    st->kw_version = Py_BuildValue("(s)", "max_version");
    st->kw_stream_version = Py_BuildValue("(ss)", "stream", "max_version");
    st->kw_stream = Py_BuildValue("(s)", "stream");
    if (st->str_dlpack == NULL || st->str_dlpack_device == NULL ||
        st->max_version == NULL || st->kw_version == NULL ||
        st->kw_stream_version == NULL || st->kw_stream == NULL)
        return -1;
    st->cache_views_type = (PyTypeObject *)PyType_FromModuleAndSpec(
        module, &cache_views_spec, NULL);
    if (st->cache_views_type == NULL ||
        PyModule_AddObjectRef(module, "CacheViews",
                              (PyObject *)st->cache_views_type) < 0)
        return -1;
    return 0;
}

static int module_traverse(PyObject *module, visitproc visit, void *arg)
{
    module_state *st = get_state(module);
    Py_VISIT(st->dms_error);
    Py_VISIT(st->cuda_error);
    Py_VISIT(st->cuda_unavailable_error);
    Py_VISIT(st->pool_error);
    Py_VISIT(st->cache_views_type);
    Py_VISIT(st->str_dlpack);
    Py_VISIT(st->str_dlpack_device);
    Py_VISIT(st->max_version);
    Py_VISIT(st->kw_version);
    Py_VISIT(st->kw_stream_version);
    Py_VISIT(st->kw_stream);
    return 0;
}

static int module_clear(PyObject *module)
{
    module_state *st = get_state(module);
    Py_CLEAR(st->dms_error);
    Py_CLEAR(st->cuda_error);
    Py_CLEAR(st->cuda_unavailable_error);
    Py_CLEAR(st->pool_error);
    Py_CLEAR(st->cache_views_type);
    Py_CLEAR(st->str_dlpack);
    Py_CLEAR(st->str_dlpack_device);
    Py_CLEAR(st->max_version);
    Py_CLEAR(st->kw_version);
    Py_CLEAR(st->kw_stream_version);
    Py_CLEAR(st->kw_stream);
    return 0;
}

static void module_free(void *module)
{
    module_clear((PyObject *)module);
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, module_exec},
#if PY_VERSION_HEX >= 0x030C0000
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED},
#endif
    {0, NULL}};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "dms._C",
    .m_doc = "The C engine of dms: kernels reached through DLPack tensors.",
    .m_size = sizeof(module_state),
    .m_methods = methods,
    .m_slots = slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

PyMODINIT_FUNC PyInit__C(void)
{
    return PyModuleDef_Init(&module_def);
}
