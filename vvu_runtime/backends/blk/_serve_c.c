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
 *
 * serve_burst(...) is BlkDevice.process()'s loop over a compiled split ring
 * (split.CompiledSplitQueue, walked through _split_core.h): pop, serve_fast's
 * requests, inflight records, used ring, notify, and the busy poll between
 * bursts, without a Python step per request. It serves a request only when
 * serve_fast would and the Python loop would reach the same bytes; at the first
 * request it will not serve it stops before consuming it and says DEFER, and
 * the caller pops that one in Python (see serve_burst below).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "../../virtio/_split_core.h"

/* virtio-blk headers are little-endian: _split_core.h insists on a little-endian host. */

#define HDR_SIZE 16
#define SECTOR_SHIFT 9
#define T_IN 0u
#define T_OUT 1u
#define MAX_SEGS 256 /* data segments we take on the stack; more: serve() does it */
#define SEG_LIMIT 256 /* buffers of one chain serve_burst walks; more: Python does */

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

/* One request's transfer between the image and the guest buffers `iov`: one
 * preadv/pwritev, or, with `bounce` (O_DIRECT into memory it cannot pin), through
 * that aligned buffer when offset and length are multiples of `align`: one pread
 * then a copy out, or a copy in then one pwrite. 0 when every byte moved, -1
 * otherwise (nothing reported: the Python path redoes it). `unlocked`: release the
 * GIL around the syscall; serve_burst keeps it, its raw guest pointers being valid
 * only while no other Python code runs. */
static int move(int fd, int in, const struct iovec *iov, Py_ssize_t n, uint64_t offset,
                uint64_t length, const Py_buffer *bounce, uint64_t align, int unlocked)
{
    ssize_t done;
    PyThreadState *ts;
    if (!bounce) {
        ts = unlocked ? PyEval_SaveThread() : NULL;
        done = in ? preadv(fd, iov, (int)n, (off_t)offset) : pwritev(fd, iov, (int)n, (off_t)offset);
        if (ts)
            PyEval_RestoreThread(ts);
        return (done < 0 || (uint64_t)done != length) ? -1 : 0;
    }
    if ((offset | length) & (align - 1) || (uint64_t)bounce->len < length)
        return -1;
    char *b = bounce->buf;
    if (in) {
        ts = unlocked ? PyEval_SaveThread() : NULL;
        done = pread(fd, b, (size_t)length, (off_t)offset);
        if (ts)
            PyEval_RestoreThread(ts);
        if (done < 0 || (uint64_t)done != length)
            return -1;
        for (Py_ssize_t k = 0; k < n; b += iov[k].iov_len, k++)
            memcpy(iov[k].iov_base, b, iov[k].iov_len);
    } else {
        for (Py_ssize_t k = 0; k < n; b += iov[k].iov_len, k++)
            memcpy(b, iov[k].iov_base, iov[k].iov_len);
        ts = unlocked ? PyEval_SaveThread() : NULL;
        done = pwrite(fd, bounce->buf, (size_t)length, (off_t)offset);
        if (ts)
            PyEval_RestoreThread(ts);
        if (done < 0 || (uint64_t)done != length)
            return -1;
    }
    return 0;
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
    Py_buffer bb;
    if (nargs == 7 && PyObject_GetBuffer(args[5], &bb, PyBUF_WRITABLE) < 0) {
        PyErr_Clear();
        goto out;
    }
    /* A transfer that fails: serve() redoes it and reports the error its way. */
    int moved = move((int)fd, in, iov, held, offset, length, nargs == 7 ? &bb : NULL, align, 1);
    if (nargs == 7)
        PyBuffer_Release(&bb);
    if (moved < 0)
        goto out;
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

/* ---------------------------------------------------------------- serve_burst */

enum { WHY_EMPTY = 0, WHY_DEFER = 1, WHY_BUDGET = 2, WHY_TURN = 3 };

#define MAX_GROUP 64         /* chains per group (notify_every is 16) */
#define MAX_GROUP_SEGS 1024  /* data buffers per group; more: Python serves it */
#define MAX_RANGES (MAX_GROUP_SEGS + 3 * MAX_GROUP + 3)

typedef struct {
    uint16_t head;
    int in;               /* IN (read into the guest) or OUT */
    uint64_t offset, length;
    uint32_t seg, nseg;   /* its data buffers: group_t.iov[seg..seg+nseg) */
    uint8_t *status;
    const uint8_t *hdr;
    const uint8_t *table; /* its indirect table, or NULL */
    uint32_t table_len;
} req_t;

typedef struct {
    uintptr_t start, end;
    int write;
} range_t;

typedef struct {
    req_t reqs[MAX_GROUP];
    struct iovec iov[MAX_GROUP_SEGS];
    range_t ranges[MAX_RANGES];
    uint32_t nseg;
} group_t;

static SplitCoreAPI *api;
static PyObject *str_refresh, *str_view, *str_counter, *str_batch, *str_queue_size;
static PyObject *str_event_idx, *str_signalled_used, *str_signalled_valid, *str_call,
    *str_missed_call, *str_signal;

/* The split ring module's capsule, the first time a burst needs it (serve_fast
 * works without the compiled ring). 0, or -1 with an exception. */
static int need_api(void)
{
    if (api)
        return 0;
    PyObject *split = PyImport_ImportModule("vvu_runtime.virtio._split_c");
    if (!split)
        return -1;
    Py_DECREF(split);
    api = PyCapsule_Import(SPLIT_CORE_CAPSULE, 0);
    return api ? 0 : -1;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* The chain at `head` as a request serve_fast would serve (header alone in the
 * first readable buffer, status alone in the last writable one, IN or OUT of
 * whole sectors inside the disk), walked with split.py's rules and giving the
 * same buffers as its walk. 0: `r` filled in, its data buffers appended to
 * g->iov; -1: anything else (Python pops it, walks it, judges it). Everything
 * is read once, into the copies used. */
static int take(SplitCore *s, group_t *g, uint16_t head, req_t *r, uint64_t capacity,
                int write_ok)
{
    if (head >= s->size)
        return -1;
    desc_t d;
    read_desc((const uint8_t *)s->desc_buf.buf + (size_t)head * DESC_SIZE, &d);
    const uint8_t *table = s->desc_buf.buf;
    uint32_t limit = s->size, count = 0;
    r->table = NULL;
    r->table_len = 0;
    if (d.flags & F_INDIRECT) {
        if (!s->indirect_ok || (d.flags & F_NEXT) || !d.len || d.len % DESC_SIZE
                || d.len / DESC_SIZE > s->max_indirect)
            return -1;
        table = api->guest_ptr(s, d.addr, d.len);
        if (!table)
            return -1;
        r->table = table;
        r->table_len = d.len;
        limit = d.len / DESC_SIZE;
        read_desc(table, &d);
    }
    /* Buffers in chain order: readable ones, then writable ones. */
    uint8_t *bufs[2 + SEG_LIMIT];
    uint32_t lens[2 + SEG_LIMIT];
    uint32_t n = 0, nr = 0;
    for (;;) {
        if (++count > limit || n == 2 + SEG_LIMIT)
            return -1;
        if (!d.len || (d.flags & F_INDIRECT))
            return -1; /* Python skips empty buffers and refuses nested tables */
        uint8_t *p = api->guest_ptr(s, d.addr, d.len);
        if (!p)
            return -1;
        if (d.flags & F_WRITE) {
            bufs[n] = p;
            lens[n++] = d.len;
        } else {
            if (n != nr)
                return -1; /* readable after writable */
            bufs[n] = p;
            lens[n++] = d.len;
            nr++;
        }
        if (!(d.flags & F_NEXT))
            break;
        if (d.next >= limit)
            return -1;
        read_desc(table + (size_t)d.next * DESC_SIZE, &d);
    }
    uint32_t nw = n - nr;
    if (!nr || !nw || lens[0] != HDR_SIZE || lens[n - 1] != 1)
        return -1;
    uint32_t type;
    uint64_t sector;
    memcpy(&type, bufs[0], 4);
    memcpy(&sector, bufs[0] + 8, 8);
    __asm__ __volatile__("" ::: "memory");
    uint32_t lo, hi;
    if (type == T_IN && nr == 1) {
        r->in = 1;
        lo = 1;
        hi = n - 1;
    } else if (type == T_OUT && nw == 1 && write_ok) {
        r->in = 0;
        lo = 1;
        hi = nr;
    } else {
        return -1;
    }
    if (sector > (UINT64_MAX >> SECTOR_SHIFT) || g->nseg + (hi - lo) > MAX_GROUP_SEGS)
        return -1;
    uint64_t length = 0;
    r->seg = g->nseg;
    for (uint32_t k = lo; k < hi; k++) {
        g->iov[g->nseg].iov_base = bufs[k];
        g->iov[g->nseg++].iov_len = lens[k];
        length += lens[k];
    }
    r->nseg = hi - lo;
    r->offset = sector << SECTOR_SHIFT;
    r->length = length;
    /* The used element holds length + 1 in 32 bits: bigger is Python's to refuse. */
    if (!length || (length & ((1u << SECTOR_SHIFT) - 1)) || r->offset > capacity
            || length > capacity - r->offset || r->offset > (uint64_t)LLONG_MAX
            || length >= UINT32_MAX) {
        g->nseg = r->seg;
        return -1;
    }
    r->head = head;
    r->hdr = bufs[0];
    r->status = bufs[n - 1];
    return 0;
}

static int by_start(const void *a, const void *b)
{
    uintptr_t x = ((const range_t *)a)->start, y = ((const range_t *)b)->start;
    return (x > y) - (x < y);
}

/* Whether memory this group writes (data read into the guest, status bytes)
 * overlaps memory it reads (rings, indirect tables, headers, data written out).
 * The Python loop walks every chain of a group before serving the first and reads
 * each header as it serves it; with no such overlap the order of those steps
 * cannot change what they see, so this one may differ from it. */
static int group_overlaps(SplitCore *s, group_t *g, uint32_t n)
{
    range_t *rg = g->ranges;
    uint32_t k = 0;
#define ADD(p, len, w) do { rg[k].start = (uintptr_t)(p); rg[k].end = (uintptr_t)(p) + (len); \
                            rg[k++].write = (w); } while (0)
    ADD(s->desc_buf.buf, (size_t)s->desc_buf.len, 0);
    ADD(s->avail_buf.buf, (size_t)s->avail_buf.len, 0);
    ADD(s->used_buf.buf, (size_t)s->used_buf.len, 0);
    for (uint32_t i = 0; i < n; i++) {
        req_t *r = &g->reqs[i];
        ADD(r->hdr, HDR_SIZE, 0);
        ADD(r->status, 1, 1);
        if (r->table)
            ADD(r->table, r->table_len, 0);
        for (uint32_t j = r->seg; j < r->seg + r->nseg; j++)
            ADD(g->iov[j].iov_base, g->iov[j].iov_len, r->in);
    }
#undef ADD
    qsort(rg, k, sizeof *rg, by_start);
    uintptr_t read_end = 0, write_end = 0;
    for (uint32_t i = 0; i < k; i++) {
        if (rg[i].start < (rg[i].write ? read_end : write_end))
            return 1;
        uintptr_t *end = rg[i].write ? &write_end : &read_end;
        if (rg[i].end > *end)
            *end = rg[i].end;
    }
    return 0;
}

/* inflight.SplitInflight's records (its `view`, `_counter`), as begin, complete and
 * commit write them. */
typedef struct {
    Py_buffer buf;
    uint64_t counter;
    int on;
} tracker_t;

static inline uint8_t *rec(tracker_t *t, uint32_t head)
{
    return (uint8_t *)t->buf.buf + 16 + 16 * (size_t)head;
}

static void begin(tracker_t *t, uint32_t head)
{
    memcpy(rec(t, head) + 8, &t->counter, 8);
    t->counter++;
    rec(t, head)[0] = 1;
}

/* Up to `limit` chains' worth of the ring's avail entries known ready, re-reading
 * avail idx as SplitQueue.pop_many does; -1: let Python pop (a bad index jump, or
 * an error in _refresh_avail: Python calls it again and raises). `python_refresh`:
 * an empty ring asks Python's _refresh_avail, which re-arms avail_event. */
static Py_ssize_t ready(SplitCore *s, Py_ssize_t limit, int python_refresh)
{
    Py_ssize_t n = (s->shadow_avail - s->last_avail) & 0xFFFF;
    if (n >= limit)
        return n;
    uint16_t avail = avail_at(s, 1);
    if (avail != (uint16_t)s->last_avail) {
        n = (uint16_t)(avail - (uint16_t)s->last_avail);
        if ((uint32_t)n > s->size)
            return -1;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        s->shadow_avail = avail;
        return n;
    }
    if (!python_refresh)
        return 0;
    PyObject *r = PyObject_CallMethodNoArgs((PyObject *)s, str_refresh);
    n = r ? PyLong_AsSsize_t(r) : -1;
    Py_XDECREF(r);
    if (n < 0)
        PyErr_Clear();
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return n;
}

/* SplitQueue.should_notify's state (_event_idx, _signalled_used, _signalled_valid):
 * read when a burst starts, written back when it ends (nothing else runs on the
 * ring in between). */
typedef struct {
    int event_idx;
    uint16_t signalled_used;
    int signalled_valid;
    int changed;
} notice_t;

static int notice_read(PyObject *ring, notice_t *n)
{
    PyObject *e = PyObject_GetAttr(ring, str_event_idx);
    PyObject *u = e ? PyObject_GetAttr(ring, str_signalled_used) : NULL;
    PyObject *v = u ? PyObject_GetAttr(ring, str_signalled_valid) : NULL;
    int ok = v && PyLong_Check(u);
    if (ok) {
        long used = PyLong_AsLong(u);
        n->event_idx = PyObject_IsTrue(e);
        n->signalled_valid = PyObject_IsTrue(v);
        ok = used >= 0 && used <= 0xFFFF && n->event_idx >= 0 && n->signalled_valid >= 0;
        n->signalled_used = (uint16_t)used;
        n->changed = 0;
    }
    Py_XDECREF(e);
    Py_XDECREF(u);
    Py_XDECREF(v);
    if (!ok)
        PyErr_Clear();
    return ok ? 0 : -1;
}

static int notice_write(PyObject *ring, const notice_t *n)
{
    if (!n->changed)
        return 0;
    PyObject *u = PyLong_FromLong(n->signalled_used);
    int rc = (!u || PyObject_SetAttr(ring, str_signalled_used, u) < 0
              || PyObject_SetAttr(ring, str_signalled_valid,
                                  n->signalled_valid ? Py_True : Py_False) < 0) ? -1 : 0;
    Py_XDECREF(u);
    return rc;
}

/* SplitQueue.should_notify(), on that state. */
static int should_notify(SplitCore *s, notice_t *n)
{
    uint16_t new_idx = (uint16_t)s->used_idx, old = n->signalled_used;
    if (new_idx == old)
        return 0;
    n->signalled_used = new_idx;
    n->changed = 1;
    /* Our used idx before the driver's wishes (store then load). */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (!n->event_idx)
        return !(avail_at(s, 0) & 1); /* VRING_AVAIL_F_NO_INTERRUPT */
    if (!n->signalled_valid) {
        n->signalled_valid = 1;
        return 1;
    }
    uint16_t event = avail_at(s, 2 + s->size); /* used_event */
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

/* What a burst holds while it runs. */
typedef struct {
    tracker_t t;
    Py_buffer bounce_buf, bell_buf;
    Py_buffer *bounce, *bell;
    uint32_t bell_word, bell_value;
    notice_t notice;
} held_t;

/* The tracker's records (see tracker_t); 0, or -1: not one we can keep (defer). */
static int hold_tracker(PyObject *obj, SplitCore *s, tracker_t *t)
{
    t->on = 0;
    if (obj == Py_None)
        return 0;
    PyObject *batch = PyObject_GetAttr(obj, str_batch);
    PyObject *view = batch ? PyObject_GetAttr(obj, str_view) : NULL;
    PyObject *counter = view ? PyObject_GetAttr(obj, str_counter) : NULL;
    PyObject *qsize = counter ? PyObject_GetAttr(obj, str_queue_size) : NULL;
    int ok = qsize && PyList_CheckExact(batch) && !PyList_GET_SIZE(batch)
             && PyLong_CheckExact(counter) && PyLong_CheckExact(qsize)
             && PyLong_AsLong(qsize) >= (long)s->size
             && PyObject_GetBuffer(view, &t->buf, PyBUF_WRITABLE) == 0;
    if (ok) {
        t->on = 1;
        t->counter = PyLong_AsUnsignedLongLong(counter);
        if (PyErr_Occurred() || (size_t)t->buf.len < 16 + 16 * (size_t)s->size
                || t->counter > (UINT64_MAX >> 1))
            ok = 0;
    }
    Py_XDECREF(batch);
    Py_XDECREF(view);
    Py_XDECREF(counter);
    Py_XDECREF(qsize);
    if (!ok) {
        PyErr_Clear();
        if (t->on)
            PyBuffer_Release(&t->buf);
        t->on = 0;
        return -1;
    }
    return 0;
}

/* The doorbell register (vhost_user.transport.Register32): (window, word, value). */
static int hold_bell(PyObject *obj, held_t *h)
{
    h->bell = NULL;
    if (obj == Py_None)
        return 0;
    if (!PyTuple_CheckExact(obj) || PyTuple_GET_SIZE(obj) != 3)
        return -1;
    unsigned long word = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(obj, 1));
    unsigned long value = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(obj, 2));
    if (PyErr_Occurred() || value > UINT32_MAX
            || PyObject_GetBuffer(PyTuple_GET_ITEM(obj, 0), &h->bell_buf, PyBUF_WRITABLE) < 0) {
        PyErr_Clear();
        return -1;
    }
    if (word > ((size_t)h->bell_buf.len >> 2) - 1 || h->bell_buf.len < 4
            || ((uintptr_t)h->bell_buf.buf & 3)) {
        PyBuffer_Release(&h->bell_buf);
        return -1;
    }
    h->bell = &h->bell_buf;
    h->bell_word = (uint32_t)word;
    h->bell_value = (uint32_t)value;
    return 0;
}

/* Vring.notify(), after a group: the driver's wishes, then the doorbell store, or
 * the call notifier's signal(), or missed_call when there is none. */
static int notify(SplitCore *s, PyObject *vring, held_t *h)
{
    if (!should_notify(s, &h->notice))
        return 0;
    if (h->bell) {
        ((volatile uint32_t *)h->bell->buf)[h->bell_word] = h->bell_value;
        return 0;
    }
    PyObject *call = PyObject_GetAttr(vring, str_call);
    if (!call)
        return -1;
    int rc = 0;
    if (call == Py_None) {
        rc = PyObject_SetAttr(vring, str_missed_call, Py_True);
    } else {
        PyObject *r = PyObject_CallMethodNoArgs(call, str_signal);
        rc = r ? 0 : -1;
        Py_XDECREF(r);
    }
    Py_DECREF(call);
    return rc;
}

static void let_go(held_t *h)
{
    if (h->t.on)
        PyBuffer_Release(&h->t.buf);
    if (h->bounce)
        PyBuffer_Release(h->bounce);
    if (h->bell)
        PyBuffer_Release(h->bell);
}

/* serve_burst(ring, tracker, vring, bell, limit, budget, spin_us, turn_s, fd,
 *             capacity_bytes, write_ok[, bounce, align]) -> (served, why)
 *
 * BlkDevice.process()'s loop, compiled, for a CompiledSplitQueue without dirty
 * logging: groups of up to `limit` chains (as pop_many(limit) takes them), each
 * served, pushed with one used-idx update (inflight records kept as the Python
 * Vring keeps them when `tracker`, a SplitInflight bound to this ring, is given)
 * and followed by what vring.notify() does, should_notify included; `bell` (the
 * call notifier's register(), or None) is stored to instead of calling its
 * signal(). When the ring is empty: with `spin_us` > 0 (the caller turned the
 * driver's kicks off) it watches avail idx that long for more, otherwise it asks
 * _refresh_avail (re-arming kicks) and returns.
 *
 * why: EMPTY (nothing more came), DEFER (the next group is not one we serve:
 * the caller serves one group in Python, as pop_many(limit) takes it, and calls
 * again), BUDGET (`budget` requests served), TURN (`turn_s` passed while
 * spinning found more). Groups are served whole or left whole, so pushes and
 * notifications fall where the Python loop's do; an I/O that fails or comes up
 * short leaves its group to Python, which redoes it (I/O is idempotent) and
 * reports the error. */
static PyObject *serve_burst(PyObject *Py_UNUSED(mod), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 11 && nargs != 13) {
        PyErr_SetString(PyExc_TypeError, "serve_burst() takes 11 or 13 arguments");
        return NULL;
    }
    if (need_api() < 0)
        return NULL;
    PyObject *ring = args[0], *tracker_obj = args[1], *vring = args[2];
    Py_ssize_t limit = PyLong_AsSsize_t(args[4]);
    Py_ssize_t budget = PyLong_AsSsize_t(args[5]);
    double spin_us = PyFloat_AsDouble(args[6]);
    double turn_s = PyFloat_AsDouble(args[7]);
    long fd = PyLong_AsLong(args[8]);
    unsigned long long capacity = PyLong_AsUnsignedLongLong(args[9]);
    int write_ok = PyObject_IsTrue(args[10]);
    unsigned long long align = nargs == 13 ? PyLong_AsUnsignedLongLong(args[12]) : 1;
    if (PyErr_Occurred())
        return NULL;
    if (!PyObject_TypeCheck(ring, api->core_type)) {
        PyErr_SetString(PyExc_TypeError, "serve_burst() needs a compiled split ring");
        return NULL;
    }
    SplitCore *s = (SplitCore *)ring;
    if (!s->bound || s->log_all || limit <= 0 || limit > MAX_GROUP || budget <= 0
            || fd < 0 || fd > INT_MAX || !align || (align & (align - 1)))
        return Py_BuildValue("(ii)", 0, WHY_DEFER);

    held_t h = {.bounce = NULL, .bell = NULL};
    h.t.on = 0;
    if (hold_tracker(tracker_obj, s, &h.t) < 0 || notice_read(ring, &h.notice) < 0
            || (h.notice.event_idx && s->avail_buf.len < 2 * (Py_ssize_t)(3 + s->size))
            || hold_bell(args[3], &h) < 0) {
        let_go(&h);
        return Py_BuildValue("(ii)", 0, WHY_DEFER);
    }
    if (nargs == 13) {
        if (PyObject_GetBuffer(args[11], &h.bounce_buf, PyBUF_WRITABLE) < 0) {
            PyErr_Clear();
            let_go(&h);
            return Py_BuildValue("(ii)", 0, WHY_DEFER);
        }
        h.bounce = &h.bounce_buf;
    }
    tracker_t *t = &h.t;

    static group_t *kept;
    static int kept_busy;
    group_t *g = kept_busy ? NULL : kept;
    if (!g) {
        g = PyMem_Malloc(sizeof(group_t));
        if (!g) {
            let_go(&h);
            return PyErr_NoMemory();
        }
        if (!kept_busy && !kept)
            kept = g;
    }
    if (g == kept)
        kept_busy = 1;

    Py_ssize_t served = 0;
    int why = WHY_EMPTY, error = 0;
    double start = (spin_us > 0 || turn_s > 0) ? now_s() : 0.0;
    for (;;) {
        Py_ssize_t n = ready(s, limit, spin_us <= 0);
        if (n < 0) {
            why = WHY_DEFER;
            break;
        }
        if (n == 0) {
            if (spin_us <= 0)
                break; /* EMPTY, kicks re-armed by _refresh_avail */
            double deadline = now_s() + spin_us * 1e-6;
            while (avail_at(s, 1) == (uint16_t)s->last_avail && now_s() < deadline)
                ;
            if (avail_at(s, 1) == (uint16_t)s->last_avail)
                break; /* EMPTY: the caller turns kicks back on and looks again */
            if (turn_s > 0 && now_s() - start >= turn_s) {
                why = WHY_TURN;
                break;
            }
            continue;
        }
        if (n > limit)
            n = limit;

        /* The group pop_many(limit) would take, served whole or not at all: the
         * Python loop pushes and notifies once per group, after serving all of it,
         * and a group split between us and Python would interleave our used-ring
         * writes with its transfers. So every chain is walked and judged first. */
        api->sync_regions(s);
        g->nseg = 0;
        uint32_t last = (uint32_t)s->last_avail, m = 0;
        while (m < (uint32_t)n) {
            uint16_t head = avail_at(s, 2 + ((last + m) & s->mask));
            if (take(s, g, head, &g->reqs[m], capacity, write_ok) < 0)
                break;
            m++;
        }
        if (m < (uint32_t)n || group_overlaps(s, g, m)) {
            why = WHY_DEFER;
            break;
        }
        /* Serve in ring order, each status right after its transfer, as serve()
         * does. A transfer that fails or comes up short hands the whole group to
         * Python, which redoes it: I/O is idempotent, and with no overlaps (above)
         * what it reads is what it read here. */
        uint32_t done = 0;
        while (done < m) {
            req_t *r = &g->reqs[done];
            if (move((int)fd, r->in, g->iov + r->seg, r->nseg, r->offset, r->length, h.bounce,
                     align, 0) < 0)
                break;
            *(volatile uint8_t *)r->status = 0; /* Status.OK */
            done++;
        }
        if (done < m) {
            why = WHY_DEFER;
            break;
        }
        /* Consumed: inflight records (begin, then complete into the last-batch
         * list), the used elements, one used-idx update, the records cleared. */
        uint32_t idx = (uint32_t)s->used_idx;
        uint16_t lbh = 0;
        if (t->on)
            memcpy(&lbh, (uint8_t *)t->buf.buf + 12, 2);
        for (uint32_t k = 0; k < m; k++) {
            req_t *r = &g->reqs[k];
            uint64_t written = r->in ? r->length + 1 : 1;
            if (t->on) {
                begin(t, r->head);
                memcpy(rec(t, r->head) + 6, &lbh, 2);
                lbh = r->head;
            }
            put_elem(s, idx + k, (int64_t)(r->head | written << 32));
        }
        if (t->on)
            memcpy((uint8_t *)t->buf.buf + 12, &lbh, 2);
        s->last_avail = (int)((last + m) & 0xFFFF);
        publish(s, (idx + m) & 0xFFFF);
        if (t->on) {
            uint16_t used = (uint16_t)s->used_idx;
            for (uint32_t k = 0; k < m; k++)
                rec(t, g->reqs[k].head)[0] = 0;
            memcpy((uint8_t *)t->buf.buf + 14, &used, 2);
        }
        served += m;
        if (notify(s, vring, &h) < 0) {
            error = 1;
            break;
        }
        if (served >= budget) {
            why = WHY_BUDGET;
            break;
        }
    }

    if (g == kept)
        kept_busy = 0;
    else
        PyMem_Free(g);
    /* What the ring and the tracker must remember (keeping notify()'s exception,
     * if any, for the caller). */
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    if (notice_write(ring, &h.notice) < 0)
        error = 1;
    if (t->on) {
        PyObject *c = PyLong_FromUnsignedLongLong(t->counter);
        if (!c || PyObject_SetAttr(tracker_obj, str_counter, c) < 0)
            error = 1;
        Py_XDECREF(c);
    }
    if (et) {
        PyErr_Clear();
        PyErr_Restore(et, ev, tb);
    }
    let_go(&h);
    if (error)
        return NULL;
    return Py_BuildValue("(ni)", served, why);
}

static PyMethodDef methods[] = {
    {"serve_fast", (PyCFunction)(void (*)(void))serve_fast, METH_FASTCALL,
     "BlkDevice.serve's fast path (IN/OUT of whole sectors, optionally through an O_DIRECT "
     "bounce buffer); -1: not served, do it in Python."},
    {"serve_burst", (PyCFunction)(void (*)(void))serve_burst, METH_FASTCALL,
     "BlkDevice.process()'s loop over a compiled split ring; (served, why)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_serve_c",
    "Compiled fast path of vvu_runtime.backends.blk.device.BlkDevice.serve.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__serve_c(void)
{
    str_refresh = PyUnicode_InternFromString("_refresh_avail");
    str_view = PyUnicode_InternFromString("view");
    str_counter = PyUnicode_InternFromString("_counter");
    str_batch = PyUnicode_InternFromString("_batch");
    str_queue_size = PyUnicode_InternFromString("queue_size");
    str_event_idx = PyUnicode_InternFromString("_event_idx");
    str_signalled_used = PyUnicode_InternFromString("_signalled_used");
    str_signalled_valid = PyUnicode_InternFromString("_signalled_valid");
    str_call = PyUnicode_InternFromString("call");
    str_missed_call = PyUnicode_InternFromString("missed_call");
    str_signal = PyUnicode_InternFromString("signal");
    if (!str_refresh || !str_view || !str_counter || !str_batch || !str_queue_size
            || !str_event_idx || !str_signalled_used || !str_signalled_valid || !str_call
            || !str_missed_call || !str_signal)
        return NULL;
    return PyModule_Create(&module_def);
}
