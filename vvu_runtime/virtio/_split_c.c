/*
 * Compiled hot path of the device side of a split virtqueue (split.py).
 *
 * split.py stays the reference: this module implements only what is hot
 * (pop, pop_many, chain_at, push, push_many, has_available) and only for
 * inputs it can serve *exactly* as split.py would. Whenever it meets
 * anything else - a bounds check that fails, a loop, an ordering violation,
 * an address outside guest memory, a memory table it cannot read, an odd argument - it
 * hands the whole operation to the pure-Python method, which then raises
 * (or answers) as it always did. So every exception, its class and its
 * message come from split.py itself, and this file can only be wrong by
 * being *less* strict, which tests/unit/test_split_compiled.py looks for by
 * running the same hostile inputs through both.
 *
 * The type is a base class: split.CompiledSplitQueue derives from it and
 * from SplitQueue. The ring position (_last_avail, _shadow_avail, used_idx)
 * and log_all live in this struct and are exposed as attributes under the
 * names split.py uses, so the Python methods that stay Python (refresh,
 * notifications, logging) read and write the same state.
 *
 * Shared memory: the driver writes the rings concurrently. A descriptor is
 * copied out once and only the copy is used (no double fetch); indexes are
 * read with volatile loads. Ordering follows split.py's reasoning (x86-TSO,
 * program order), with explicit fences where a weaker CPU would need them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#include "_split_core.h"

/* The pieces of the Python side we need, set once by configure(). */
static PyTypeObject *chain_type;      /* queue.DescriptorChain (a slots dataclass) */
static Py_ssize_t off_head, off_readable, off_writable, off_gpas, off_ndescs;
static PyObject *py_chain_at;         /* SplitQueue.chain_at: the reference walk */
static PyObject *py_push;             /* SplitQueue.push */
static PyObject *py_push_many;        /* SplitQueue.push_many */
static PyObject *virtio_error;        /* errors.VirtioError */
static PyObject *str_refresh, *str_gpa, *str_gpa_end, *str_view;

static void drop_regions(SplitCore *s)
{
    for (Py_ssize_t k = 0; k < s->nregions; k++) {
        Py_DECREF(s->regions[k].obj);
        Py_DECREF(s->regions[k].view);
    }
    PyMem_Free(s->regions);
    s->regions = NULL;
    s->nregions = 0;
    s->regions_ok = 0;
    s->hit = 0;
}

/* A region's gpa, size and view, as GuestMemory.translate reads them; -1 if odd. */
static int read_region(PyObject *m, region_t *r)
{
    PyObject *gpa = PyObject_GetAttr(m, str_gpa);
    PyObject *end = gpa ? PyObject_GetAttr(m, str_gpa_end) : NULL;
    PyObject *view = end ? PyObject_GetAttr(m, str_view) : NULL;
    int ok = view && PyLong_CheckExact(gpa) && PyLong_CheckExact(end)
             && PyMemoryView_Check(view);
    if (ok) {
        uint64_t g = PyLong_AsUnsignedLongLong(gpa);
        uint64_t e = PyLong_AsUnsignedLongLong(end); /* a region ending at 2^64 fails here */
        ok = !PyErr_Occurred() && e > g
             && PyMemoryView_GET_BUFFER(view)->len >= 0
             && (uint64_t)PyMemoryView_GET_BUFFER(view)->len == e - g;
        r->gpa = g;
        r->size = e - g;
    }
    PyErr_Clear();
    Py_XDECREF(gpa);
    Py_XDECREF(end);
    if (!ok) {
        Py_XDECREF(view);
        return -1;
    }
    Py_INCREF(m);
    r->obj = m;
    r->view = view;
    return 0;
}

/* Keep our copy of the memory table in step with GuestMemory._regions, the list it
 * edits in place (add/remove/clear). Checking is a pointer comparison per region;
 * we hold references to the region objects we copied, so a pointer cannot be
 * reused by a new region while we compare. A table we cannot read (odd types) is
 * left to GuestMemory.translate itself. Called at the start of every operation. */
static void sync_regions(SplitCore *s)
{
    if (!s->region_list)
        return;
    Py_ssize_t n = PyList_GET_SIZE(s->region_list);
    if (s->regions_ok && n == s->nregions) {
        Py_ssize_t k = 0;
        while (k < n && PyList_GET_ITEM(s->region_list, k) == s->regions[k].obj)
            k++;
        if (k == n)
            return;
    }
    drop_regions(s);
    region_t *r = PyMem_Calloc(n ? (size_t)n : 1, sizeof(region_t));
    if (!r) {
        PyErr_Clear();
        return;
    }
    s->regions = r;
    for (Py_ssize_t k = 0; k < n; k++) {
        if (read_region(PyList_GET_ITEM(s->region_list, k), &r[k]) < 0) {
            drop_regions(s);
            return;
        }
        s->nregions = k + 1;
    }
    s->regions_ok = 1;
}

/* GuestMemory.translate(gpa, length) for a descriptor: the same slice of the
 * same region view (the region that holds gpa, and the buffer must end inside
 * it). Returns NULL *without* an exception when the address is refused (the
 * caller defers to Python, which raises properly), NULL with an exception only
 * for failures the Python path would not see (no memory). */
static PyObject *translate(SplitCore *s, uint64_t gpa, uint32_t len, int *refused)
{
    if (s->regions_ok) {
        Py_ssize_t n = s->nregions, k = s->hit;
        for (Py_ssize_t tried = 0; tried < n; tried++, k = (k + 1 == n) ? 0 : k + 1) {
            region_t *r = &s->regions[k];
            if (gpa < r->gpa || gpa - r->gpa >= r->size)
                continue;
            uint64_t off = gpa - r->gpa;
            if (len > r->size - off)
                break; /* starts here, ends outside: refused, as in Python */
            s->hit = k;
            PyObject *v = PySequence_GetSlice(r->view, (Py_ssize_t)off,
                                              (Py_ssize_t)(off + len));
            if (!v) {
                PyErr_Clear(); /* e.g. a released view: let Python say so */
                *refused = 1;
            }
            return v;
        }
        *refused = 1;
        return NULL;
    }
    /* A memory table we could not copy: ask GuestMemory itself. */
    PyObject *a = PyLong_FromUnsignedLongLong(gpa);
    if (!a)
        return NULL;
    PyObject *l = PyLong_FromUnsignedLong(len);
    if (!l) {
        Py_DECREF(a);
        return NULL;
    }
    PyObject *args[2] = {a, l};
    PyObject *v = PyObject_Vectorcall(s->translate, args, 2, NULL);
    Py_DECREF(a);
    Py_DECREF(l);
    if (!v) {
        PyErr_Clear();
        *refused = 1;
        return NULL;
    }
    if (!PyMemoryView_Check(v)) { /* a memory object we do not know: not ours to judge */
        Py_DECREF(v);
        *refused = 1;
        return NULL;
    }
    return v;
}

/* translate()'s bounds for a caller that wants the bytes, not a view (the switch's
 * burst forwarder): the host address of [gpa, gpa + len) or NULL (refused, or a
 * table we could not copy, or a read-only or released view: the caller defers to
 * the Python path, which judges). Only valid until Python code runs again. */
static uint8_t *guest_ptr(SplitCore *s, uint64_t gpa, uint32_t len)
{
    if (!s->regions_ok)
        return NULL;
    Py_ssize_t n = s->nregions, k = s->hit;
    for (Py_ssize_t tried = 0; tried < n; tried++, k = (k + 1 == n) ? 0 : k + 1) {
        region_t *r = &s->regions[k];
        if (gpa < r->gpa || gpa - r->gpa >= r->size)
            continue;
        uint64_t off = gpa - r->gpa;
        if (len > r->size - off)
            return NULL;
        Py_buffer *b = PyMemoryView_GET_BUFFER(r->view);
        /* A released view keeps its (dangling) pointer: the flag says so. */
        if ((((PyMemoryViewObject *)r->view)->flags & _Py_MEMORYVIEW_RELEASED)
                || !b->buf || b->readonly || (uint64_t)b->len != r->size)
            return NULL;
        s->hit = k;
        return (uint8_t *)b->buf + off;
    }
    return NULL;
}

/* A DescriptorChain without running its dataclass __init__ (a Python frame per
 * chain would cost more than the whole walk): the slots are filled directly,
 * with the same values __init__ would store. Steals the references. */
static PyObject *make_chain(uint32_t head, PyObject *readable, PyObject *writable,
                            PyObject *gpas, uint32_t ndescs)
{
    PyObject *h = PyLong_FromUnsignedLong(head);
    PyObject *n = PyLong_FromUnsignedLong(ndescs);
    PyObject *c = (h && n && readable && writable && gpas)
        ? chain_type->tp_alloc(chain_type, 0) : NULL;
    if (!c) {
        Py_XDECREF(h);
        Py_XDECREF(n);
        Py_XDECREF(readable);
        Py_XDECREF(writable);
        Py_XDECREF(gpas);
        return NULL;
    }
    char *base = (char *)c;
    *(PyObject **)(base + off_head) = h;
    *(PyObject **)(base + off_readable) = readable;
    *(PyObject **)(base + off_writable) = writable;
    *(PyObject **)(base + off_gpas) = gpas;
    *(PyObject **)(base + off_ndescs) = n;
    return c;
}

static PyObject *one_item_list(PyObject *item)
{
    PyObject *l = PyList_New(1);
    if (l)
        PyList_SET_ITEM(l, 0, item);
    else
        Py_DECREF(item);
    return l;
}

enum { WALK_OK = 0, WALK_DEFER = 1, WALK_ERROR = -1 };

/* SplitQueue.chain_at()/_walk() for chains that break no rule. WALK_DEFER: the
 * chain breaks one (or we cannot tell): the caller runs the Python walk. */
static int walk(SplitCore *s, uint32_t head, PyObject **out)
{
    if (head >= s->size)
        return WALK_DEFER;
    desc_t d;
    read_desc((const uint8_t *)s->desc_buf.buf + (size_t)head * DESC_SIZE, &d);
    int refused = 0;
    if (d.len && !(d.flags & (F_NEXT | F_INDIRECT))) {
        /* The common case: one direct descriptor. */
        PyObject *buf = translate(s, d.addr, d.len, &refused);
        if (!buf)
            return refused ? WALK_DEFER : WALK_ERROR;
        if (d.flags & F_WRITE) {
            PyObject *gpa = PyLong_FromUnsignedLongLong(d.addr);
            if (!gpa) {
                Py_DECREF(buf);
                return WALK_ERROR;
            }
            *out = make_chain(head, PyList_New(0), one_item_list(buf), one_item_list(gpa), 1);
        } else {
            *out = make_chain(head, one_item_list(buf), PyList_New(0), PyList_New(0), 1);
        }
        return *out ? WALK_OK : WALK_ERROR;
    }

    int rc = WALK_DEFER;
    PyObject *readable = PyList_New(0), *writable = PyList_New(0), *gpas = PyList_New(0);
    PyObject *table_view = NULL;
    Py_buffer table_buf;
    int have_table = 0;
    if (!readable || !writable || !gpas) {
        rc = WALK_ERROR;
        goto done;
    }
    const uint8_t *table = s->desc_buf.buf;
    uint32_t limit = s->size, i = head, count = 0, ring_descs = 0;
    int indirect = 0;
    for (;;) {
        if (++count > limit)
            goto done; /* a loop, or a chain longer than its table */
        if (!indirect)
            ring_descs++;
        if (d.flags & F_INDIRECT) {
            if (indirect || !s->indirect_ok || (d.flags & F_NEXT) || !d.len
                    || d.len % DESC_SIZE || d.len / DESC_SIZE > s->max_indirect)
                goto done;
            table_view = translate(s, d.addr, d.len, &refused);
            if (!table_view) {
                if (!refused)
                    rc = WALK_ERROR;
                goto done;
            }
            if (PyObject_GetBuffer(table_view, &table_buf, PyBUF_SIMPLE) < 0) {
                PyErr_Clear();
                goto done;
            }
            have_table = 1;
            if ((size_t)table_buf.len != d.len)
                goto done;
            table = table_buf.buf;
            limit = d.len / DESC_SIZE;
            indirect = 1;
            i = 0;
            count = 0;
            read_desc(table, &d);
            continue;
        }
        if (d.len) {
            PyObject *buf = translate(s, d.addr, d.len, &refused);
            if (!buf) {
                if (!refused)
                    rc = WALK_ERROR;
                goto done;
            }
            if (d.flags & F_WRITE) {
                PyObject *gpa = PyLong_FromUnsignedLongLong(d.addr);
                int bad = !gpa || PyList_Append(writable, buf) < 0
                          || PyList_Append(gpas, gpa) < 0;
                Py_DECREF(buf);
                Py_XDECREF(gpa);
                if (bad) {
                    rc = WALK_ERROR;
                    goto done;
                }
            } else if (PyList_GET_SIZE(writable)) {
                Py_DECREF(buf); /* readable after writable */
                goto done;
            } else {
                int bad = PyList_Append(readable, buf) < 0;
                Py_DECREF(buf);
                if (bad) {
                    rc = WALK_ERROR;
                    goto done;
                }
            }
        }
        if (!(d.flags & F_NEXT))
            break;
        if (d.next >= limit)
            goto done;
        i = d.next;
        read_desc(table + (size_t)i * DESC_SIZE, &d);
    }
    if (have_table) {
        PyBuffer_Release(&table_buf);
        have_table = 0;
    }
    Py_XDECREF(table_view);
    *out = make_chain(head, readable, writable, gpas, ring_descs);
    return *out ? WALK_OK : WALK_ERROR;
done:
    if (have_table)
        PyBuffer_Release(&table_buf);
    Py_XDECREF(table_view);
    Py_XDECREF(readable);
    Py_XDECREF(writable);
    Py_XDECREF(gpas);
    return rc;
}

/* The chain at `head`, compiled when it is clean, else SplitQueue.chain_at
 * (which raises the error split.py defines, or returns what it returns). */
static PyObject *chain_or_reference(SplitCore *s, uint32_t head)
{
    PyObject *chain = NULL;
    int rc = walk(s, head, &chain);
    if (rc == WALK_OK)
        return chain;
    if (rc == WALK_ERROR)
        return NULL;
    PyObject *h = PyLong_FromUnsignedLong(head);
    if (!h)
        return NULL;
    PyObject *args[2] = {(PyObject *)s, h};
    chain = PyObject_Vectorcall(py_chain_at, args, 2, NULL);
    Py_DECREF(h);
    return chain;
}

static int check_bound(SplitCore *s)
{
    if (!s->bound) {
        PyErr_SetString(PyExc_RuntimeError, "compiled split ring used before _bind()");
        return -1;
    }
    return 0;
}

/* self._refresh_avail(): Python (it writes avail_event, fences, logs). */
static Py_ssize_t refresh(SplitCore *s)
{
    PyObject *r = PyObject_CallMethodNoArgs((PyObject *)s, str_refresh);
    if (!r)
        return -1;
    Py_ssize_t n = PyLong_AsSsize_t(r);
    Py_DECREF(r);
    /* The entries the new avail idx covers are read after it (acquire). */
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return n;
}

static PyObject *core_pop(SplitCore *s, PyObject *Py_UNUSED(arg))
{
    if (check_bound(s) < 0)
        return NULL;
    int last = s->last_avail;
    if (last == s->shadow_avail) {
        Py_ssize_t n = refresh(s);
        if (n < 0)
            return NULL;
        if (n == 0)
            Py_RETURN_NONE;
        last = s->last_avail;
    }
    uint16_t head = avail_at(s, 2 + ((uint32_t)last & s->mask));
    s->last_avail = (last + 1) & 0xFFFF;
    sync_regions(s);
    return chain_or_reference(s, head);
}

static PyObject *core_pop_many(SplitCore *s, PyObject *arg)
{
    if (check_bound(s) < 0)
        return NULL;
    Py_ssize_t limit = PyLong_AsSsize_t(arg);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    int last = s->last_avail;
    Py_ssize_t ready = (s->shadow_avail - last) & 0xFFFF;
    if (ready < limit) {
        ready = refresh(s);
        if (ready < 0)
            return NULL;
    }
    Py_ssize_t n = ready < limit ? ready : limit;
    PyObject *chains = PyList_New(0);
    if (!chains || n <= 0)
        return chains;
    sync_regions(s);
    for (Py_ssize_t k = 0; k < n; k++) {
        int i = last + (int)k;
        uint16_t head = avail_at(s, 2 + ((uint32_t)i & s->mask));
        PyObject *chain = chain_or_reference(s, head);
        if (!chain) {
            if (!PyErr_ExceptionMatches(virtio_error)) {
                Py_DECREF(chains);
                return NULL; /* as in Python: position unchanged */
            }
            if (PyList_GET_SIZE(chains) == 0) {
                s->last_avail = (i + 1) & 0xFFFF; /* consumed, as pop() does */
                Py_DECREF(chains);
                return NULL;
            }
            /* Hand out the good chains before it; the next call meets the bad one. */
            PyErr_Clear();
            s->last_avail = i & 0xFFFF;
            return chains;
        }
        int bad = PyList_Append(chains, chain) < 0;
        Py_DECREF(chain);
        if (bad) {
            Py_DECREF(chains);
            return NULL;
        }
    }
    s->last_avail = (last + (int)n) & 0xFFFF;
    return chains;
}

static PyObject *core_chain_at(SplitCore *s, PyObject *arg)
{
    if (check_bound(s) < 0)
        return NULL;
    if (PyLong_CheckExact(arg)) {
        long head = PyLong_AsLong(arg);
        if (head >= 0 && head < (long)s->size) {
            sync_regions(s);
            return chain_or_reference(s, (uint32_t)head);
        }
        PyErr_Clear();
    }
    PyObject *args[2] = {(PyObject *)s, arg};
    return PyObject_Vectorcall(py_chain_at, args, 2, NULL);
}

static PyObject *core_has_available(SplitCore *s, PyObject *Py_UNUSED(arg))
{
    if (check_bound(s) < 0)
        return NULL;
    return PyBool_FromLong(avail_at(s, 1) != (uint16_t)s->last_avail);
}

/* The used element of `chain` with `written` bytes, when both are what push()
 * stores without complaint and need nothing else (-1: let Python do it). */
static int64_t used_elem(PyObject *chain, PyObject *written)
{
    if (Py_TYPE(chain) != chain_type || !PyLong_CheckExact(written))
        return -1;
    PyObject *head = *(PyObject **)((char *)chain + off_head);
    if (!head || !PyLong_CheckExact(head))
        return -1;
    long h = PyLong_AsLong(head);
    long w = PyLong_AsLong(written);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    if (h < 0 || h > 0xFFFFFFFFL || w < 0 || w > 0x7FFFFFFFL)
        return -1;
    return (int64_t)((uint64_t)h | (uint64_t)w << 32);
}

static PyObject *core_push(SplitCore *s, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_bound(s) < 0)
        return NULL;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "push() takes (chain, written)");
        return NULL;
    }
    int64_t elem = s->log_all ? -1 : used_elem(args[0], args[1]);
    if (elem < 0) {
        /* Dirty logging, or an argument only Python can judge. */
        PyObject *a[3] = {(PyObject *)s, args[0], args[1]};
        return PyObject_Vectorcall(py_push, a, 3, NULL);
    }
    uint32_t idx = (uint32_t)s->used_idx;
    put_elem(s, idx, elem);
    publish(s, (idx + 1) & 0xFFFF);
    Py_RETURN_NONE;
}

static PyObject *core_push_many(SplitCore *s, PyObject *arg)
{
    if (check_bound(s) < 0)
        return NULL;
    /* Materialised first so that the Python path can take over the very same
     * items (a generator cannot be read twice). */
    PyObject *seq = PySequence_Fast(arg, "push_many() needs an iterable of (chain, written)");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    int python = s->log_all;
    for (Py_ssize_t k = 0; k < n && !python; k++) {
        PyObject *t = items[k];
        if (!PyTuple_CheckExact(t) || PyTuple_GET_SIZE(t) != 2
                || used_elem(PyTuple_GET_ITEM(t, 0), PyTuple_GET_ITEM(t, 1)) < 0)
            python = 1;
    }
    if (python) {
        PyObject *a[2] = {(PyObject *)s, seq};
        PyObject *r = PyObject_Vectorcall(py_push_many, a, 2, NULL);
        Py_DECREF(seq);
        return r;
    }
    uint32_t idx = (uint32_t)s->used_idx;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *t = items[k];
        put_elem(s, idx + (uint32_t)k, used_elem(PyTuple_GET_ITEM(t, 0), PyTuple_GET_ITEM(t, 1)));
    }
    publish(s, (idx + (uint32_t)n) & 0xFFFF);
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

static void release_bound(SplitCore *s)
{
    if (s->bound) {
        PyBuffer_Release(&s->desc_buf);
        PyBuffer_Release(&s->avail_buf);
        PyBuffer_Release(&s->used_buf);
        s->bound = 0;
    }
    Py_CLEAR(s->region_list);
    Py_CLEAR(s->translate);
    drop_regions(s);
}

/* _bind(desc, avail, used, size, indirect_ok, max_indirect, memory): the views
 * SplitQueue.__init__ made (already bounds-checked against the memory table). */
static PyObject *core_bind(SplitCore *s, PyObject *args)
{
    PyObject *desc, *avail, *used, *memory;
    unsigned int size, max_indirect;
    int indirect_ok;
    if (!PyArg_ParseTuple(args, "OOOIpIO:_bind", &desc, &avail, &used, &size, &indirect_ok,
                          &max_indirect, &memory))
        return NULL;
    if (size == 0 || size > 32768 || (size & (size - 1))) {
        PyErr_SetString(PyExc_ValueError, "queue size must be a power of two in 1..32768");
        return NULL;
    }
    release_bound(s);
    if (PyObject_GetBuffer(desc, &s->desc_buf, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(avail, &s->avail_buf, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&s->desc_buf);
        return NULL;
    }
    if (PyObject_GetBuffer(used, &s->used_buf, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&s->desc_buf);
        PyBuffer_Release(&s->avail_buf);
        return NULL;
    }
    s->bound = 1;
    if ((size_t)s->desc_buf.len < (size_t)size * DESC_SIZE
            || (size_t)s->avail_buf.len < 4 + 2 * (size_t)size
            || (size_t)s->used_buf.len < 4 + 8 * (size_t)size) {
        release_bound(s);
        PyErr_SetString(PyExc_ValueError, "ring views are shorter than the ring");
        return NULL;
    }
    s->translate = PyObject_GetAttrString(memory, "translate");
    if (!s->translate) {
        release_bound(s);
        return NULL;
    }
    s->region_list = PyObject_GetAttrString(memory, "_regions");
    if (!s->region_list || !PyList_CheckExact(s->region_list)) {
        PyErr_Clear();
        Py_CLEAR(s->region_list); /* every lookup goes to memory.translate */
    }
    s->size = size;
    s->mask = size - 1;
    s->indirect_ok = indirect_ok;
    s->max_indirect = max_indirect;
    drop_regions(s);
    Py_RETURN_NONE;
}

static PyObject *log_all_get(SplitCore *s, void *Py_UNUSED(c))
{
    return PyBool_FromLong(s->log_all);
}

static int log_all_set(SplitCore *s, PyObject *v, void *Py_UNUSED(c))
{
    if (!v) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete log_all");
        return -1;
    }
    int t = PyObject_IsTrue(v);
    if (t < 0)
        return -1;
    s->log_all = t;
    return 0;
}

static void core_dealloc(SplitCore *s)
{
    PyTypeObject *tp = Py_TYPE(s);
    PyObject_GC_UnTrack(s);
    release_bound(s);
    tp->tp_free((PyObject *)s);
    Py_DECREF(tp);
}

static int core_traverse(SplitCore *s, visitproc visit, void *arg)
{
    Py_VISIT(s->region_list);
    Py_VISIT(s->translate);
    for (Py_ssize_t k = 0; k < s->nregions; k++) {
        Py_VISIT(s->regions[k].obj);
        Py_VISIT(s->regions[k].view);
    }
    Py_VISIT(Py_TYPE(s));
    return 0;
}

static int core_clear(SplitCore *s)
{
    Py_CLEAR(s->region_list);
    Py_CLEAR(s->translate);
    drop_regions(s);
    return 0;
}

static PyMethodDef core_methods[] = {
    {"_bind", (PyCFunction)core_bind, METH_VARARGS, "Attach the ring views (from __init__)."},
    {"pop", (PyCFunction)core_pop, METH_NOARGS, "SplitQueue.pop, compiled."},
    {"pop_many", (PyCFunction)core_pop_many, METH_O, "SplitQueue.pop_many, compiled."},
    {"chain_at", (PyCFunction)core_chain_at, METH_O, "SplitQueue.chain_at, compiled."},
    {"has_available", (PyCFunction)core_has_available, METH_NOARGS,
     "SplitQueue.has_available, compiled."},
    {"push", (PyCFunction)(void (*)(void))core_push, METH_FASTCALL, "SplitQueue.push, compiled."},
    {"push_many", (PyCFunction)core_push_many, METH_O, "SplitQueue.push_many, compiled."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef core_members[] = {
    {"_last_avail", T_INT, offsetof(SplitCore, last_avail), 0, NULL},
    {"_shadow_avail", T_INT, offsetof(SplitCore, shadow_avail), 0, NULL},
    {"used_idx", T_INT, offsetof(SplitCore, used_idx), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef core_getset[] = {
    {"log_all", (getter)log_all_get, (setter)log_all_set, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot core_slots[] = {
    {Py_tp_doc, "State and hot methods of a split ring (see split.CompiledSplitQueue)."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, core_dealloc},
    {Py_tp_traverse, core_traverse},
    {Py_tp_clear, core_clear},
    {Py_tp_methods, core_methods},
    {Py_tp_members, core_members},
    {Py_tp_getset, core_getset},
    {0, NULL},
};

static PyType_Spec core_spec = {
    .name = "vvu_runtime.virtio._split_c.SplitCore",
    .basicsize = sizeof(SplitCore),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = core_slots,
};

/* Offset of a slot of the chain class; only a plain object slot will do. */
static Py_ssize_t slot_offset(PyTypeObject *tp, const char *name)
{
    PyObject *d = PyDict_GetItemString(tp->tp_dict, name);
    if (!d || !Py_IS_TYPE(d, &PyMemberDescr_Type)) {
        PyErr_Format(PyExc_TypeError, "%s.%s is not a slot", tp->tp_name, name);
        return -1;
    }
    PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
    if (m->type != T_OBJECT_EX || (m->flags & READONLY)) {
        PyErr_Format(PyExc_TypeError, "%s.%s is not a plain object slot", tp->tp_name, name);
        return -1;
    }
    return m->offset;
}

/* configure(DescriptorChain, chain_at, push, push_many, VirtioError) */
static PyObject *configure(PyObject *Py_UNUSED(mod), PyObject *args)
{
    PyObject *tp, *ca, *pu, *pm, *ve;
    if (!PyArg_ParseTuple(args, "O!OOOO:configure", &PyType_Type, &tp, &ca, &pu, &pm, &ve))
        return NULL;
    PyTypeObject *t = (PyTypeObject *)tp;
    if (t->tp_dictoffset != 0 || t->tp_new != PyBaseObject_Type.tp_new) {
        PyErr_SetString(PyExc_TypeError, "the chain class must be a plain slots class");
        return NULL;
    }
    Py_ssize_t o[5];
    const char *names[5] = {"head", "readable", "writable", "writable_gpas", "ndescs"};
    for (int k = 0; k < 5; k++)
        if ((o[k] = slot_offset(t, names[k])) < 0)
            return NULL;
    off_head = o[0];
    off_readable = o[1];
    off_writable = o[2];
    off_gpas = o[3];
    off_ndescs = o[4];
    Py_INCREF(tp);
    Py_XSETREF(chain_type, t);
    Py_INCREF(ca);
    Py_XSETREF(py_chain_at, ca);
    Py_INCREF(pu);
    Py_XSETREF(py_push, pu);
    Py_INCREF(pm);
    Py_XSETREF(py_push_many, pm);
    Py_INCREF(ve);
    Py_XSETREF(virtio_error, ve);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"configure", configure, METH_VARARGS,
     "Hand over DescriptorChain and the reference methods (split.py does this once)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_split_c",
    "Compiled hot path of split.SplitQueue; split.py is the reference.", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__split_c(void)
{
    str_refresh = PyUnicode_InternFromString("_refresh_avail");
    str_gpa = PyUnicode_InternFromString("gpa");
    str_gpa_end = PyUnicode_InternFromString("gpa_end");
    str_view = PyUnicode_InternFromString("view");
    if (!str_refresh || !str_gpa || !str_gpa_end || !str_view)
        return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (!m)
        return NULL;
    PyObject *core = PyType_FromSpec(&core_spec);
    if (!core || PyModule_AddObject(m, "SplitCore", core) < 0) {
        Py_XDECREF(core);
        Py_DECREF(m);
        return NULL;
    }
    /* For other compiled modules that walk these rings (_split_core.h). The
     * module keeps the type alive, and the module lives as long as the process. */
    static SplitCoreAPI api;
    api.core_type = (PyTypeObject *)core;
    api.sync_regions = sync_regions;
    api.guest_ptr = guest_ptr;
    PyObject *capsule = PyCapsule_New(&api, SPLIT_CORE_CAPSULE, NULL);
    if (!capsule || PyModule_AddObject(m, "_C_API", capsule) < 0) {
        Py_XDECREF(capsule);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
