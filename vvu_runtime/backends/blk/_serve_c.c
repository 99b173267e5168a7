/*
 * Compiled fast path of BlkDevice.serve() (device.py): the 4 KiB-read case
 * that dominates a busy disk, as one C call instead of a dozen Python steps.
 *
 * serve_fast(readable, writable, fd, capacity_bytes, write_ok) serves a request
 * only when device.py's own fast path would serve it - header alone in the
 * first readable buffer, status alone in the last writable one, an IN or OUT
 * of whole sectors inside the disk, one preadv/pwritev that moves every byte -
 * and returns what serve() returns then. For anything else, and whenever the
 * I/O is short or fails, it returns -1 and serve() runs its Python code from
 * the top: that path is the reference, and I/O is idempotent, so redoing a
 * failed attempt is harmless (device.py's own fast path relies on the same).
 *
 * serve_fast(..., bounce, align) is the O_DIRECT case where guest memory cannot
 * be pinned (an appliance's BAR2; image.py): the same requests, when offset and
 * length are multiples of `align` and fit `bounce` (page-aligned), go through
 * it in one pread/pwrite and one copy, as RawImage's bounce path would do them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "virtio-blk headers are little-endian and this module reads them natively"
#endif

#define HDR_SIZE 16
#define SECTOR_SHIFT 9
#define T_IN 0u
#define T_OUT 1u
#define MAX_SEGS 256 /* data segments we take on the stack; more: serve() does it */

/* The buffers of `views` [lo, hi) as an iovec array; 0 on success, -1 when a
 * view will not give its buffer (serve() then decides). */
static int gather(PyObject *views, Py_ssize_t lo, Py_ssize_t hi, int writable,
                  Py_buffer *bufs, struct iovec *iov, Py_ssize_t *held, uint64_t *total)
{
    *held = 0;
    *total = 0;
    for (Py_ssize_t k = lo; k < hi; k++) {
        PyObject *v = PyList_GET_ITEM(views, k);
        if (!PyMemoryView_Check(v)
                || PyObject_GetBuffer(v, &bufs[*held], writable ? PyBUF_WRITABLE : PyBUF_SIMPLE)
                   < 0) {
            PyErr_Clear();
            return -1;
        }
        iov[*held].iov_base = bufs[*held].buf;
        iov[*held].iov_len = (size_t)bufs[*held].len;
        *total += (uint64_t)bufs[*held].len;
        (*held)++;
    }
    return 0;
}

static void release(Py_buffer *bufs, Py_ssize_t held)
{
    for (Py_ssize_t k = 0; k < held; k++)
        PyBuffer_Release(&bufs[k]);
}

/* The length of a memoryview in the list, or -1 if it is not one. */
static Py_ssize_t view_len(PyObject *list, Py_ssize_t k)
{
    PyObject *v = PyList_GET_ITEM(list, k);
    return PyMemoryView_Check(v) ? PyMemoryView_GET_BUFFER(v)->len : -1;
}

/* The transfer through the aligned `bounce` buffer: one pread then a copy out,
 * or a copy in then one pwrite. 0 when every byte moved, -1 otherwise (nothing
 * reported: serve() redoes the request). */
static int bounced(PyObject *bounce, long fd, int in, const struct iovec *iov, Py_ssize_t n,
                   uint64_t offset, uint64_t length)
{
    Py_buffer bb;
    if (PyObject_GetBuffer(bounce, &bb, PyBUF_WRITABLE) < 0) {
        PyErr_Clear();
        return -1;
    }
    int rc = -1;
    if ((uint64_t)bb.len < length)
        goto out;
    char *b = bb.buf;
    ssize_t done;
    if (in) {
        Py_BEGIN_ALLOW_THREADS
        done = pread((int)fd, b, (size_t)length, (off_t)offset);
        Py_END_ALLOW_THREADS
        if (done < 0 || (uint64_t)done != length)
            goto out;
        for (Py_ssize_t k = 0; k < n; b += iov[k].iov_len, k++)
            memcpy(iov[k].iov_base, b, iov[k].iov_len);
    } else {
        for (Py_ssize_t k = 0; k < n; b += iov[k].iov_len, k++)
            memcpy(b, iov[k].iov_base, iov[k].iov_len);
        Py_BEGIN_ALLOW_THREADS
        done = pwrite((int)fd, bb.buf, (size_t)length, (off_t)offset);
        Py_END_ALLOW_THREADS
        if (done < 0 || (uint64_t)done != length)
            goto out;
    }
    rc = 0;
out:
    PyBuffer_Release(&bb);
    return rc;
}

static PyObject *serve_fast(PyObject *Py_UNUSED(mod), PyObject *const *args, Py_ssize_t nargs)
{
    if ((nargs != 5 && nargs != 7) || !PyList_CheckExact(args[0])
            || !PyList_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError,
                        "serve_fast(readable: list, writable: list, fd, capacity_bytes, "
                        "write_ok[, bounce, align])");
        return NULL;
    }
    PyObject *readable = args[0], *writable = args[1];
    long fd = PyLong_AsLong(args[2]);
    unsigned long long capacity = PyLong_AsUnsignedLongLong(args[3]);
    int write_ok = PyObject_IsTrue(args[4]);
    unsigned long long align = nargs == 7 ? PyLong_AsUnsignedLongLong(args[6]) : 1;
    if (PyErr_Occurred())
        return NULL;
    if (!align || (align & (align - 1)))
        return PyLong_FromLong(-1);
    if (fd < 0 || fd > INT_MAX)
        return PyLong_FromLong(-1);
    Py_ssize_t nr = PyList_GET_SIZE(readable), nw = PyList_GET_SIZE(writable);
    if (nr == 0 || nw == 0 || view_len(readable, 0) != HDR_SIZE
            || view_len(writable, nw - 1) != 1)
        return PyLong_FromLong(-1);

    /* The header: copied out of guest memory once. */
    uint32_t type;
    uint64_t sector;
    Py_buffer hb;
    if (PyObject_GetBuffer(PyList_GET_ITEM(readable, 0), &hb, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        return PyLong_FromLong(-1);
    }
    memcpy(&type, hb.buf, 4);
    memcpy(&sector, (const char *)hb.buf + 8, 8);
    PyBuffer_Release(&hb);
    __asm__ __volatile__("" ::: "memory");

    int in;
    Py_ssize_t lo, hi;
    PyObject *data;
    if (type == T_IN && nr == 1) {
        in = 1;
        data = writable;
        lo = 0;
        hi = nw - 1;
    } else if (type == T_OUT && nw == 1 && write_ok) {
        in = 0;
        data = readable;
        lo = 1;
        hi = nr;
    } else {
        return PyLong_FromLong(-1);
    }
    if (hi - lo > MAX_SEGS || sector > (UINT64_MAX >> SECTOR_SHIFT))
        return PyLong_FromLong(-1);
    uint64_t offset = sector << SECTOR_SHIFT;

    Py_buffer bufs[MAX_SEGS];
    struct iovec iov[MAX_SEGS];
    Py_ssize_t held;
    uint64_t length;
    long result = -1;
    if (gather(data, lo, hi, in, bufs, iov, &held, &length) < 0)
        goto out;
    /* device.py: a length, whole sectors, inside the disk (no overflow: both < 2^63). */
    if (!length || (length & ((1u << SECTOR_SHIFT) - 1)) || offset > capacity
            || length > capacity - offset || offset > (uint64_t)LLONG_MAX)
        goto out;
    ssize_t done;
    if (nargs == 7) {
        if ((offset | length) & (align - 1) || bounced(args[5], fd, in, iov, held, offset,
                                                       length) < 0)
            goto out;
    } else {
        Py_BEGIN_ALLOW_THREADS
        done = in ? preadv((int)fd, iov, (int)held, (off_t)offset)
                  : pwritev((int)fd, iov, (int)held, (off_t)offset);
        Py_END_ALLOW_THREADS
        if (done < 0 || (uint64_t)done != length)
            goto out; /* serve() redoes it and reports the error its way */
    }
    Py_buffer sb;
    if (PyObject_GetBuffer(PyList_GET_ITEM(writable, nw - 1), &sb, PyBUF_WRITABLE) < 0) {
        PyErr_Clear();
        goto out;
    }
    *(volatile uint8_t *)sb.buf = 0; /* Status.OK */
    PyBuffer_Release(&sb);
    result = in ? (long)length + 1 : 1;
out:
    release(bufs, held);
    return PyLong_FromLong(result);
}

static PyMethodDef methods[] = {
    {"serve_fast", (PyCFunction)(void (*)(void))serve_fast, METH_FASTCALL,
     "BlkDevice.serve's fast path (IN/OUT of whole sectors, optionally through an O_DIRECT "
     "bounce buffer); -1: not served, do it in Python."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_serve_c",
    "Compiled fast path of vvu_runtime.backends.blk.device.BlkDevice.serve.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__serve_c(void)
{
    return PyModule_Create(&module_def);
}
