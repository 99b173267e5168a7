/*
 * Compiled burst of vvu-switch's forwarding loop (Switch.forward_chains).
 *
 * switch.py stays the reference: this module forwards one whole burst of a TX
 * ring only when every frame in it is one the Python loop would forward to a
 * port's single RX ring (SwitchPort.fast_rx) without the slow path, and then
 * with the same results:
 *  - TX: a single readable descriptor, or a chain of readable descriptors in the
 *    ring or through one indirect table (walked with split.py's rules: any rule
 *    broken, any writable buffer, and Python walks it), as Linux sends a TSO
 *    frame;
 *  - header: no flags, or NEEDS_CSUM and a GSO type (TSO4/6, ECN, USO, UFO) that
 *    the sender negotiated (send_gso) and the destination accepts as they are
 *    (accept_csum, accept_gso): the header is passed through unchanged, as
 *    deliver_batch / deliver_plain pass it;
 *  - a source already learned on this port, a learned, unexpired unicast
 *    destination on another port;
 *  - RX chains of one writable descriptor: the frame in one, or, with MRG_RXBUF,
 *    merged over several (num_buffers), in the order deliver_batch and _write pop
 *    and fill them.
 * Runts, oversize frames, bad sources and hairpins are counted as Python counts
 * them; frames without an RX chain count as rx_ring_full. For anything else (a
 * bad descriptor or chain, an index jump, multicast, an unknown or aged
 * destination, an address to learn or move, an offload to do in software, an
 * RX buffer too small without MRG_RXBUF, a ring that runs dry in the middle of
 * a merged frame, dirty logging...) it changes nothing and returns None: the
 * caller runs the Python burst, which then does what it always did, failing
 * rings and raising as before. So every error comes from the Python code, and
 * tests/unit/test_switch_compiled.py and test_switch_compiled_gso.py run both
 * on the same inputs.
 *
 * Everything is decided before anything is written: the TX avail entries, every
 * descriptor (read once, only the copy used), the FDB entries and the RX chains
 * of every destination (refreshing each RX avail index where Python's pops
 * would). Then, in the order of the Python loop: frame copies per group of
 * deliveries between its flushes (a multi-descriptor frame is delivered alone),
 * per destination in order of first appearance, frames in ring order; the TX
 * used elements and index, the RX used elements and index of each destination,
 * the FDB `seen` stamps. An RX buffer that overlaps any ring it could disturb is
 * refused (deferred), and so is one over a TX buffer when frames are delivered
 * alone (Python reads later headers after earlier copies then): with that, the
 * order of these writes cannot be observed by what is read in this burst.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "../../virtio/_split_core.h"

#define ETH_HLEN 14u
#define MAX_BURST 256
#define MAX_DSTS 16
#define MAX_MACS 32
/* RX chains beyond each frame's first, per burst (merged frames, MRG_RXBUF): a
 * 64 KiB frame over 4 KiB buffers takes 16 more. */
#define MAX_EXTRA 2048
/* Readable buffers of the burst's multi-descriptor TX chains (a Linux TSO frame:
 * its header, linear part and page fragments, often through an indirect table). */
#define MAX_SEGS 4096
#define NEEDS_CSUM 1u
#define GSO_TABLE 256

static SplitCoreAPI *api;
static PyObject *str_refresh, *str_fast_rx, *str_port, *str_seen;

typedef struct {
    const uint8_t *buf;
    uint32_t len;
} seg_t;

typedef struct {
    const uint8_t *buf; /* the TX buffer (header + frame); multi: NULL */
    uint32_t len;       /* header + frame (saturated at 2^32-1: oversize anyway) */
    uint32_t seg, nseg; /* multi: its readable buffers, burst_t.segs[seg..seg+nseg) */
    uint32_t group;     /* deliveries between flushes of the Python loop (see below) */
    int multi;          /* several readable buffers: delivered alone, as Python does */
    uint16_t head;
    int dst;            /* index into dsts, or -1: dropped */
    uint16_t rx_head;
    uint8_t *rx_buf;    /* NULL: no RX chain (rx_ring_full) */
    uint32_t rx_cap;    /* length of rx_buf */
    uint32_t rx_extra;  /* merged frame: first of its further chains in burst_t.extras */
    uint32_t rx_nextra; /* how many (0: the frame fits rx_buf) */
} frame_t;

/* A further RX chain of a merged frame: one writable buffer. */
typedef struct {
    uint8_t *buf;
    uint32_t cap;
    uint16_t head;
} extra_t;

typedef struct {
    PyObject *port;     /* strong */
    PyObject *core;     /* strong: the destination's RX SplitCore */
    PyObject *queue;    /* strong: what the caller touches for it (an RxQueue) */
    PyObject *accept_gso; /* strong: the destination's accept_gso table (GUEST_* bits) */
    int accept_csum;
    int mergeable;      /* MRG_RXBUF: a frame may span several RX chains */
    int touch;          /* whether Python would touch the queue (a batch, or a frame) */
    uint32_t frames, delivered, chains;
    uint64_t bytes;
} dst_t;

typedef struct {
    uint8_t mac[6];
    int dst;            /* index into dsts, or -1: this port (hairpin) */
} mac_t;

typedef struct {
    frame_t frames[MAX_BURST];
    dst_t dsts[MAX_DSTS];
    int ndsts;
    mac_t macs[MAX_MACS];
    int nmacs;
    PyObject *seen_entries[MAX_BURST]; /* strong: source entries to stamp */
    int nseen;
    extra_t extras[MAX_EXTRA];
    uint32_t nextra;
    seg_t segs[MAX_SEGS];
    uint32_t nsegs;
} burst_t;

enum { OK = 0, DEFER = 1, ERROR = -1 };

static void burst_clear(burst_t *b)
{
    for (int k = 0; k < b->ndsts; k++) {
        Py_DECREF(b->dsts[k].port);
        Py_DECREF(b->dsts[k].core);
        Py_DECREF(b->dsts[k].queue);
        Py_DECREF(b->dsts[k].accept_gso);
    }
    for (int k = 0; k < b->nseen; k++)
        Py_DECREF(b->seen_entries[k]);
    b->ndsts = b->nseen = b->nmacs = 0;
    b->nextra = b->nsegs = 0;
}

static SplitCore *as_core(PyObject *o)
{
    if (!PyObject_TypeCheck(o, api->core_type))
        return NULL;
    SplitCore *s = (SplitCore *)o;
    return (s->bound && !s->log_all) ? s : NULL;
}

/* self._refresh_avail(), as pop_many calls it; -1 (exception cleared) means
 * defer: the Python path calls it again and raises the same error. */
static Py_ssize_t refresh(SplitCore *s)
{
    PyObject *r = PyObject_CallMethodNoArgs((PyObject *)s, str_refresh);
    Py_ssize_t n = r ? PyLong_AsSsize_t(r) : -1;
    Py_XDECREF(r);
    if (n < 0)
        PyErr_Clear();
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return n;
}

/* Entries ready for pop_many(limit), refreshing as it does; -1: defer. */
static Py_ssize_t ready_for(SplitCore *s, Py_ssize_t limit)
{
    Py_ssize_t ready = (s->shadow_avail - s->last_avail) & 0xFFFF;
    if (ready < limit)
        ready = refresh(s);
    return ready;
}

/* The refresh a Python pop() makes when it reaches `pos` entries past the ring's
 * position (shadow index reached): the same call at the same logical position, so
 * that it writes avail_event (or not) exactly as Python would there. Returns the
 * entries known ready counted from the ring's real position, -1: defer. */
static Py_ssize_t refresh_at(SplitCore *s, uint32_t pos)
{
    int saved = s->last_avail;
    s->last_avail = (int)(((uint32_t)saved + pos) & 0xFFFF);
    Py_ssize_t n = refresh(s);
    s->last_avail = saved;
    return n < 0 ? -1 : (Py_ssize_t)pos + n;
}

/* `table[index]` of an offload table (ForwardingPort.send_gso / accept_gso, a list
 * of 256 truth values), as Python's `if table[index]` reads it; -1: defer. */
static int table_ok(PyObject *table, unsigned index)
{
    if (!PyList_CheckExact(table) || PyList_GET_SIZE(table) != GSO_TABLE)
        return -1;
    int t = PyObject_IsTrue(PyList_GET_ITEM(table, index));
    if (t < 0)
        PyErr_Clear();
    return t;
}

/* The value of an FDB entry's `seen` as Python's float arithmetic sees it. */
static int as_double(PyObject *o, double *out)
{
    if (PyFloat_CheckExact(o)) {
        *out = PyFloat_AS_DOUBLE(o);
        return 0;
    }
    if (PyLong_CheckExact(o)) {
        *out = PyLong_AsDouble(o); /* what float - int does */
        if (*out == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            return -1;
        }
        return 0;
    }
    return -1;
}

/* Two MAC addresses equal: two loads each, never a libc memcmp call (which the
 * compiler emits for memcmp(.., 6) in a large enough function: -10% at 64 B). */
static inline int mac_eq(const uint8_t *a, const uint8_t *b)
{
    uint32_t a4, b4;
    uint16_t a2, b2;
    memcpy(&a4, a, 4);
    memcpy(&b4, b, 4);
    memcpy(&a2, a + 4, 2);
    memcpy(&b2, b + 4, 2);
    return a4 == b4 && a2 == b2;
}

static int overlaps(const uint8_t *p, uint32_t n, const Py_buffer *b)
{
    const uint8_t *q = b->buf;
    return p < q + b->len && q < p + n;
}

/* Where frames to `mac` go: index into dsts, -1 for this port (hairpin), or
 * DEFER / ERROR via *rc. Cached per burst (the FDB does not change in one). */
static int destination(burst_t *b, const uint8_t *mac, PyObject *table, PyObject *port,
                       double now, double ageing, PyObject *hs, int *rc)
{
    for (int k = 0; k < b->nmacs; k++)
        if (mac_eq(b->macs[k].mac, mac))
            return b->macs[k].dst;
    *rc = DEFER;
    if (b->nmacs == MAX_MACS)
        return 0;
    PyObject *key = PyBytes_FromStringAndSize((const char *)mac, 6);
    if (!key) {
        *rc = ERROR;
        return 0;
    }
    PyObject *entry = PyDict_GetItemWithError(table, key); /* borrowed */
    Py_DECREF(key);
    if (!entry) {
        if (PyErr_Occurred())
            *rc = ERROR;
        return 0; /* unknown: flooded by the Python path */
    }
    Py_INCREF(entry);
    PyObject *seen = PyObject_GetAttr(entry, str_seen);
    PyObject *dport = seen ? PyObject_GetAttr(entry, str_port) : NULL;
    Py_DECREF(entry);
    double s;
    int d = 0;
    if (!dport) {
        PyErr_Clear();
        goto out;
    }
    if (as_double(seen, &s) < 0 || now - s > ageing)
        goto out; /* aged (or a stamp we cannot judge): Python's lookup */
    if (dport == port) {
        d = -1;
    } else {
        for (d = 0; d < b->ndsts && b->dsts[d].port != dport; d++)
            ;
        if (d == b->ndsts) {
            if (d == MAX_DSTS)
                goto out;
            PyObject *fr = PyObject_CallMethodOneArg(dport, str_fast_rx, hs);
            if (!fr) {
                *rc = ERROR;
                goto out;
            }
            /* (core, accept_csum, queue, accept_gso, mergeable) or None: a destination
             * only Python serves. */
            SplitCore *core = NULL;
            int acc = 0, mrg = 0;
            if (PyTuple_CheckExact(fr) && PyTuple_GET_SIZE(fr) == 5) {
                core = as_core(PyTuple_GET_ITEM(fr, 0));
                acc = PyObject_IsTrue(PyTuple_GET_ITEM(fr, 1));
                mrg = acc < 0 ? -1 : PyObject_IsTrue(PyTuple_GET_ITEM(fr, 4));
            }
            if (!core || acc < 0 || mrg < 0) {
                PyErr_Clear();
                Py_DECREF(fr);
                goto out;
            }
            dst_t *t = &b->dsts[d];
            Py_INCREF(dport);
            Py_INCREF(core);
            Py_INCREF(PyTuple_GET_ITEM(fr, 2));
            Py_INCREF(PyTuple_GET_ITEM(fr, 3));
            t->port = dport;
            t->core = (PyObject *)core;
            t->queue = PyTuple_GET_ITEM(fr, 2);
            t->accept_gso = PyTuple_GET_ITEM(fr, 3);
            t->accept_csum = acc;
            t->mergeable = mrg;
            t->frames = t->delivered = t->chains = 0;
            t->touch = 0;
            t->bytes = 0;
            b->ndsts++;
            Py_DECREF(fr);
        }
    }
    memcpy(b->macs[b->nmacs].mac, mac, 6);
    b->macs[b->nmacs].dst = d;
    b->nmacs++;
    *rc = OK;
out:
    Py_XDECREF(seen);
    Py_XDECREF(dport);
    return d;
}

/* The source check of the Python loop for a new source: 0 learned on `port`
 * (its entry kept for the stamp), 1 defer (to learn, move or refuse), -1 error. */
static int source(burst_t *b, const uint8_t *mac, PyObject *table, PyObject *port)
{
    PyObject *key = PyBytes_FromStringAndSize((const char *)mac, 6);
    if (!key)
        return -1;
    PyObject *entry = PyDict_GetItemWithError(table, key);
    Py_DECREF(key);
    if (!entry)
        return PyErr_Occurred() ? -1 : 1;
    Py_INCREF(entry);
    PyObject *eport = PyObject_GetAttr(entry, str_port);
    if (!eport) {
        PyErr_Clear();
        Py_DECREF(entry);
        return 1;
    }
    Py_DECREF(eport); /* identity only; the entry keeps it alive */
    if (eport != port || b->nseen == MAX_BURST) {
        Py_DECREF(entry);
        return 1;
    }
    b->seen_entries[b->nseen++] = entry;
    return 0;
}

/* SplitQueue._walk for a TX chain that breaks no rule and has no writable buffer:
 * its readable buffers (the non-empty ones, as `chain.readable`) appended to
 * b->segs. DEFER for anything else (a loop, a bad indirect table, an address
 * outside memory, a writable buffer...): Python walks it and raises or answers. */
static int walk_tx(SplitCore *s, desc_t d, burst_t *b, frame_t *f)
{
    const uint8_t *table = s->desc_buf.buf;
    uint32_t limit = s->size, count = 0;
    uint64_t total = 0;
    int indirect = 0;
    f->seg = b->nsegs;
    for (;;) {
        if (++count > limit)
            return DEFER;
        if (d.flags & F_INDIRECT) {
            if (indirect || !s->indirect_ok || (d.flags & F_NEXT) || !d.len
                    || d.len % DESC_SIZE || d.len / DESC_SIZE > s->max_indirect)
                return DEFER;
            table = api->guest_ptr(s, d.addr, d.len);
            if (!table)
                return DEFER;
            limit = d.len / DESC_SIZE;
            indirect = 1;
            count = 0;
            read_desc(table, &d);
            continue;
        }
        if (d.len) {
            if (d.flags & F_WRITE || b->nsegs == MAX_SEGS)
                return DEFER;
            const uint8_t *p = api->guest_ptr(s, d.addr, d.len);
            if (!p)
                return DEFER;
            b->segs[b->nsegs].buf = p;
            b->segs[b->nsegs].len = d.len;
            b->nsegs++;
            total += d.len;
        }
        if (!(d.flags & F_NEXT))
            break;
        if (d.next >= limit)
            return DEFER;
        read_desc(table + (size_t)d.next * DESC_SIZE, &d);
    }
    f->nseg = b->nsegs - f->seg;
    f->len = total > 0xFFFFFFFFu ? 0xFFFFFFFFu : (uint32_t)total;
    return OK;
}

/* The first `n` bytes of a frame (n <= its length), wherever its buffers put them
 * (`segs`: the burst's pool). */
static void gather(const frame_t *f, const seg_t *segs, uint8_t *out, uint32_t n)
{
    if (!f->multi) {
        memcpy(out, f->buf, n);
        return;
    }
    segs += f->seg;
    for (uint32_t k = 0, got = 0; got < n; k++) {
        uint32_t take = segs[k].len < n - got ? segs[k].len : n - got;
        memcpy(out + got, segs[k].buf, take);
        got += take;
    }
}

/* SwitchPort._write: a 10- or 12-byte header (the sender's first 10 bytes, then
 * num_buffers), then the frame after the sender's `hs`-byte header, poured over
 * the frame's RX chains in turn, one memmove per (source, chain) piece as the
 * Python loop copies slices. The header is read first, as _write reads it. */
static void scatter(const frame_t *f, const extra_t *extras, const seg_t *segs, uint32_t hs)
{
    uint8_t hdr[12];
    uint32_t nbuf = 1 + f->rx_nextra, hl = hs == 12 ? 12 : 10;
    gather(f, segs, hdr, 10);
    hdr[10] = (uint8_t)nbuf;
    hdr[11] = (uint8_t)(nbuf >> 8);
    seg_t one = {f->buf, f->len};
    const seg_t *src = f->multi ? segs + f->seg : &one;
    uint32_t nsrc = f->multi ? f->nseg : 1;
    /* Sources: the header (si == -1), then the frame's buffers from byte hs on. */
    int64_t si = -1;
    const uint8_t *sp = hdr;
    uint32_t sl = hl, skip = hs;
    for (uint32_t c = 0; c < nbuf && si < (int64_t)nsrc; c++) {
        uint8_t *w = c ? extras[c - 1].buf : f->rx_buf;
        uint32_t wl = c ? extras[c - 1].cap : f->rx_cap, wo = 0;
        while (wo < wl && si < (int64_t)nsrc) {
            uint32_t take = wl - wo < sl ? wl - wo : sl;
            memmove(w + wo, sp, take);
            wo += take;
            sp += take;
            sl -= take;
            while (!sl && ++si < (int64_t)nsrc) {
                /* Next source: a buffer of the frame, minus what the header took. */
                sp = src[si].buf;
                sl = src[si].len;
                uint32_t k = skip < sl ? skip : sl;
                skip -= k;
                sp += k;
                sl -= k;
            }
        }
    }
}

/* The pieces of a frame's TX buffers, and of its RX chains. */
static uint32_t tx_pieces(const burst_t *b, const frame_t *f, const seg_t **out, seg_t *one)
{
    if (f->multi) {
        *out = b->segs + f->seg;
        return f->nseg;
    }
    one->buf = f->buf;
    one->len = f->len;
    *out = one;
    return f->buf ? 1 : 0;
}

static void rx_piece(const burst_t *b, const frame_t *f, uint32_t c, const uint8_t **w,
                     uint32_t *wl)
{
    *w = c ? b->extras[f->rx_extra + c - 1].buf : f->rx_buf;
    *wl = c ? b->extras[f->rx_extra + c - 1].cap : (f->rx_cap < f->len ? f->rx_cap : f->len);
}

/* Whether any RX buffer of the burst overlaps any of its TX buffers (1: or too many
 * to tell cheaply). Different guests' memory never overlaps, so the spans decide
 * in one pass; only overlapping spans cost a pairwise look. */
static int tx_rx_overlap(const burst_t *b, Py_ssize_t n)
{
    uintptr_t tlo = UINTPTR_MAX, thi = 0, rlo = UINTPTR_MAX, rhi = 0;
    uint64_t tcount = 0, rcount = 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        const frame_t *f = &b->frames[k];
        const seg_t *t;
        seg_t one;
        uint32_t nt = tx_pieces(b, f, &t, &one);
        for (uint32_t i = 0; i < nt; i++) {
            uintptr_t a = (uintptr_t)t[i].buf;
            tlo = a < tlo ? a : tlo;
            thi = a + t[i].len > thi ? a + t[i].len : thi;
        }
        tcount += nt;
        if (!f->rx_buf)
            continue;
        for (uint32_t c = 0; c <= f->rx_nextra; c++) {
            const uint8_t *w;
            uint32_t wl;
            rx_piece(b, f, c, &w, &wl);
            uintptr_t a = (uintptr_t)w;
            rlo = a < rlo ? a : rlo;
            rhi = a + wl > rhi ? a + wl : rhi;
            rcount++;
        }
    }
    if (thi <= rlo || rhi <= tlo)
        return 0;
    if (tcount * rcount > 65536)
        return 1;
    for (Py_ssize_t k = 0; k < n; k++) {
        const frame_t *f = &b->frames[k];
        if (!f->rx_buf)
            continue;
        for (uint32_t c = 0; c <= f->rx_nextra; c++) {
            const uint8_t *w;
            uint32_t wl;
            rx_piece(b, f, c, &w, &wl);
            for (Py_ssize_t q = 0; q < n; q++) {
                const seg_t *t;
                seg_t one;
                uint32_t nt = tx_pieces(b, &b->frames[q], &t, &one);
                for (uint32_t i = 0; i < nt; i++)
                    if (w < t[i].buf + t[i].len && t[i].buf < w + wl)
                        return 1;
            }
        }
    }
    return 0;
}

/*
 * forward_burst(tx, port, hdr_size, limit, max_len, fdb_table, ageing, clock, send_csum,
 *               send_gso)
 *
 * One burst of Switch.forward_chains. Returns
 * (chains, packets, bytes, runt, oversize, bad_source, hairpin,
 *  [(dst_port, queue, delivered, payload_bytes, rx_ring_full), ...], gso)
 * (chains == 0: the ring is empty), or, having changed nothing, None or the
 * time it read from clock(): run the Python burst (with that time). The clock
 * is read once, where the Python loop reads it: after a pop that returned
 * chains.
 */
static PyObject *forward_burst(PyObject *Py_UNUSED(mod), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "forward_burst() takes 10 arguments");
        return NULL;
    }
    PyObject *port = args[1], *table = args[5], *clock = args[7], *send_gso = args[9];
    Py_ssize_t hs = PyLong_AsSsize_t(args[2]);
    Py_ssize_t limit = PyLong_AsSsize_t(args[3]);
    Py_ssize_t max_len = PyLong_AsSsize_t(args[4]);
    if (PyErr_Occurred())
        return NULL;
    int send_csum = PyObject_IsTrue(args[8]);
    if (send_csum < 0)
        return NULL;
    double now, ageing;
    SplitCore *tx = as_core(args[0]);
    if (!tx || !PyDict_CheckExact(table) || as_double(args[6], &ageing) < 0 || hs < 2
            || !PyList_CheckExact(send_gso) || PyList_GET_SIZE(send_gso) != GSO_TABLE
            || hs > 64 || limit <= 0 || limit > MAX_BURST
            || max_len < hs + (Py_ssize_t)ETH_HLEN || max_len > 0x7FFFFFFF)
        Py_RETURN_NONE;
    if (PyLong_CheckExact(args[6]) && (ageing > 9007199254740992.0 || ageing < -9007199254740992.0))
        Py_RETURN_NONE; /* an int Python would compare exactly, not as a double */

    Py_ssize_t ready = ready_for(tx, limit);
    if (ready < 0)
        Py_RETURN_NONE;
    Py_ssize_t n = ready < limit ? ready : limit;
    if (n == 0)
        return Py_BuildValue("(iiiiiii[]i)", 0, 0, 0, 0, 0, 0, 0, 0);

    /* One burst_t kept for the process (it is ~45 KiB: no malloc/free per burst);
     * a nested call, which no caller makes, gets its own. */
    static burst_t *kept;
    static int kept_busy;
    burst_t *b = kept_busy ? NULL : kept;
    if (!b) {
        b = PyMem_Malloc(sizeof(burst_t));
        if (!b)
            return PyErr_NoMemory();
        if (!kept_busy && !kept)
            kept = b;
    }
    if (b == kept)
        kept_busy = 1;
    b->ndsts = b->nseen = b->nmacs = 0;
    b->nextra = b->nsegs = 0;
    PyObject *hs_obj = args[2];
    PyObject *result = NULL, *now_obj = NULL;
    int rc = DEFER;
    uint32_t min_len = (uint32_t)hs + ETH_HLEN;
    long long pkts = 0, nbytes = 0, runt = 0, oversize = 0, bad_source = 0, hairpin = 0;
    long long gso_in = 0;
    uint32_t group = 0; /* see frame_t.group */
    int multi = 0;      /* any frame over several TX buffers in the burst */
    uint8_t last_src[6];
    int have_last = 0;

    /* First the chains, as pop_many(limit) would return them: one readable buffer
     * each, or the Python pop (which walks, fails or returns fewer). */
    api->sync_regions(tx);
    uint32_t last = (uint32_t)tx->last_avail;
    for (Py_ssize_t k = 0; k < n; k++) {
        frame_t *f = &b->frames[k];
        f->dst = -1;
        f->rx_buf = NULL;
        uint16_t head = avail_at(tx, 2 + ((last + (uint32_t)k) & tx->mask));
        if (head >= tx->size)
            goto done;
        desc_t d;
        read_desc((const uint8_t *)tx->desc_buf.buf + (size_t)head * DESC_SIZE, &d);
        f->head = head;
        f->multi = 0;
        if (d.len && !(d.flags & (F_NEXT | F_INDIRECT | F_WRITE))) {
            const uint8_t *p = api->guest_ptr(tx, d.addr, d.len);
            if (!p)
                goto done;
            f->buf = p;
            f->len = d.len;
            continue;
        }
        if ((d.flags & (F_NEXT | F_INDIRECT | F_WRITE)) == F_WRITE)
            goto done; /* one writable buffer: Python's (no readable one) */
        if (walk_tx(tx, d, b, f) != OK)
            goto done;
        if (f->nseg == 1) {
            /* One readable buffer left (the others empty): a `single` frame. */
            f->buf = b->segs[f->seg].buf;
            b->nsegs--;
        } else {
            f->buf = NULL;
            f->multi = f->nseg > 1;
        }
    }
    now_obj = PyObject_CallNoArgs(clock);
    if (!now_obj) {
        rc = ERROR; /* as the Python loop would raise it: after the pop, see the caller */
        goto done;
    }
    if (!PyFloat_CheckExact(now_obj))
        goto done;
    now = PyFloat_AS_DOUBLE(now_obj);

    for (Py_ssize_t k = 0; k < n; k++) {
        frame_t *f = &b->frames[k];
        const uint8_t *p = f->buf;
        if (f->len < min_len) {
            runt++;
            continue;
        }
        if (f->len > (uint64_t)max_len) {
            oversize++;
            continue;
        }
        /* The header's two bytes and both MACs, copied once (the guest may change
         * them under us; Python's unpack also reads them once). A frame over several
         * buffers: from its first hs + 14 bytes, gathered (Switch._scattered). */
        uint8_t h[2], dmac[6], smac[6], first[64 + ETH_HLEN];
        if (f->multi) {
            gather(f, b->segs, first, min_len);
            p = first;
        }
        memcpy(h, p, 2);
        memcpy(dmac, p + hs, 6);
        memcpy(smac, p + hs + 6, 6);
        __asm__ __volatile__("" ::: "memory");
        pkts++;
        nbytes += f->len;
        if (h[1])
            gso_in++;
        if (!have_last || !mac_eq(smac, last_src)) {
            static const uint8_t zero[6];
            if ((smac[0] & 1) || mac_eq(smac, zero)) {
                bad_source++;
                continue; /* last_src unchanged, as in Python */
            }
            int s = source(b, smac, table, port);
            if (s < 0) {
                rc = ERROR;
                goto done;
            }
            if (s > 0)
                goto done;
            memcpy(last_src, smac, 6);
            have_last = 1;
        }
        if (dmac[0] & 1)
            goto done; /* multicast: flooded by the slow path */
        if ((h[0] || h[1]) && (h[0] & ~NEEDS_CSUM || (h[0] && !send_csum)
                               || table_ok(send_gso, h[1]) != 1))
            goto done; /* offload bits the sender may not use (checked, counted by Python) */
        int drc = OK;
        int di = destination(b, dmac, table, port, now, ageing, hs_obj, &drc);
        if (drc != OK) {
            rc = drc;
            goto done;
        }
        if (di < 0) {
            hairpin++;
            continue;
        }
        if ((h[0] || h[1]) && ((h[0] && !b->dsts[di].accept_csum)
                               || table_ok(b->dsts[di].accept_gso, h[1]) != 1))
            goto done; /* checksum or segmentation to do in software */
        if (f->multi) {
            /* Not batched by Python: the batches so far are flushed, this frame is
             * delivered alone (deliver/deliver_plain), then batching starts again. */
            if (hs != 12 && hs != 10)
                goto done;
            f->group = ++group;
            group++;
            multi = 1;
        } else {
            f->group = group;
        }
        f->dst = di;
        b->dsts[di].frames++;
    }

    /* The RX chains, per destination, popped in the Python loop's order: per group
     * (see frame_t.group) one pop_many(k) for the k frames batched to it
     * (deliver_batch) or one pop() for a frame delivered alone (deliver_plain); then,
     * for each frame larger than its chain (MRG_RXBUF), further chains one pop() at
     * a time (_write). Each refresh of the avail index is made where Python's pop
     * would make it (refresh_at). Positions count from the ring's own. */
    for (int di = 0; di < b->ndsts; di++) {
        dst_t *t = &b->dsts[di];
        SplitCore *rx = (SplitCore *)t->core;
        if (!rx->bound || rx->log_all)
            goto done;
        api->sync_regions(rx);
        uint32_t rlast = (uint32_t)rx->last_avail;
        uint32_t known = ((uint32_t)rx->shadow_avail - rlast) & 0xFFFF;
        uint32_t pos = 0, base = 0, got = 0, used = 0, cur = UINT32_MAX;
        for (Py_ssize_t k = 0; k < n; k++) {
            frame_t *f = &b->frames[k];
            if (f->dst != di)
                continue;
            if (f->group != cur) {
                /* A pop_many(k) (or pop(): k = 1) where Python's loop makes it. */
                cur = f->group;
                uint32_t want = multi ? 0 : t->frames; /* one group: all of them */
                for (Py_ssize_t q = k; multi && q < n; q++)
                    want += b->frames[q].dst == di && b->frames[q].group == cur;
                if (!f->multi)
                    t->touch = 1; /* deliver_batch touches the queue in any case */
                if (known - pos < want) {
                    Py_ssize_t r = refresh_at(rx, pos);
                    if (r < 0)
                        goto done;
                    known = (uint32_t)r;
                }
                base = pos;
                got = known - pos < want ? known - pos : want;
                used = 0;
                pos += got; /* the merges' further chains come after these */
                if (pos > rx->size)
                    goto done;
            }
            if (used == got)
                continue; /* none left for it: rx_ring_full */
            uint16_t head = avail_at(rx, 2 + ((rlast + base + used) & rx->mask));
            used++;
            if (head >= rx->size)
                goto done;
            desc_t d;
            read_desc((const uint8_t *)rx->desc_buf.buf + (size_t)head * DESC_SIZE, &d);
            if (!(d.flags & F_WRITE) || (d.flags & (F_NEXT | F_INDIRECT)) || !d.len)
                goto done; /* a chain to walk, or none to write to */
            uint8_t *w = api->guest_ptr(rx, d.addr, d.len);
            if (!w)
                goto done;
            f->rx_head = head;
            f->rx_buf = w;
            f->rx_cap = d.len;
            f->rx_nextra = 0;
            t->delivered++;
            t->touch = 1;
            if (d.len >= f->len)
                continue;
            /* Merged over further chains, or (no MRG_RXBUF) dropped into the reserve. */
            if (!t->mergeable || hs != 12)
                goto done;
            f->rx_extra = b->nextra;
            for (uint64_t cap = d.len; cap < f->len;) {
                if (pos == known) {
                    /* pop() at its shadow index refreshes; a dry ring puts the chains
                     * in the reserve: Python's case. */
                    Py_ssize_t r = refresh_at(rx, pos);
                    if (r <= (Py_ssize_t)pos)
                        goto done;
                    known = (uint32_t)r;
                }
                if (b->nextra == MAX_EXTRA || pos >= rx->size)
                    goto done;
                uint16_t xh = avail_at(rx, 2 + ((rlast + pos) & rx->mask));
                if (xh >= rx->size)
                    goto done;
                desc_t x;
                read_desc((const uint8_t *)rx->desc_buf.buf + (size_t)xh * DESC_SIZE, &x);
                if (!(x.flags & F_WRITE) || (x.flags & (F_NEXT | F_INDIRECT)) || !x.len)
                    goto done;
                uint8_t *xw = api->guest_ptr(rx, x.addr, x.len);
                if (!xw)
                    goto done;
                extra_t *e = &b->extras[b->nextra++];
                e->buf = xw;
                e->cap = x.len;
                e->head = xh;
                cap += x.len;
                pos++;
            }
            f->rx_nextra = b->nextra - f->rx_extra;
        }
        t->chains = pos;
    }
    /* No RX buffer may overlap a ring of this burst: then no copy can change what
     * was read, nor be changed by the used-ring writes, whatever their order. */
    for (Py_ssize_t k = 0; k < n; k++) {
        frame_t *f = &b->frames[k];
        if (!f->rx_buf)
            continue;
        for (uint32_t c = 0; c <= f->rx_nextra; c++) {
            const uint8_t *w = c ? b->extras[f->rx_extra + c - 1].buf : f->rx_buf;
            uint32_t wl = c ? b->extras[f->rx_extra + c - 1].cap
                            : (f->rx_cap < f->len ? f->rx_cap : f->len);
            for (int di = -1; di < b->ndsts; di++) {
                SplitCore *r = di < 0 ? tx : (SplitCore *)b->dsts[di].core;
                if (overlaps(w, wl, &r->desc_buf) || overlaps(w, wl, &r->avail_buf)
                        || overlaps(w, wl, &r->used_buf))
                    goto done;
            }
        }
    }

    /* With frames delivered alone, Python reads later frames' headers after earlier
     * frames were written: no RX buffer may overlap a TX buffer of the burst then. */
    if (multi && tx_rx_overlap(b, n))
        goto done;

    /* Python ran in between (fast_rx, _refresh_avail): the pointers are only good
     * if no memory table changed meanwhile. */
    for (int di = -1; di < b->ndsts; di++)
        if (!regions_current(di < 0 ? tx : (SplitCore *)b->dsts[di].core))
            goto done;

    /* Decided: now the writes, in the Python loop's order: per group, the
     * destinations in order of first appearance (deliver_batch per batch), each
     * one's frames in ring order. */
    for (Py_ssize_t k = 0; k < n;) {
        if (b->frames[k].dst < 0) {
            k++;
            continue;
        }
        uint32_t g = b->frames[k].group;
        Py_ssize_t e = k + 1;
        while (e < n && (b->frames[e].dst < 0 || b->frames[e].group == g))
            e++;
        uint32_t done_mask = 0; /* MAX_DSTS <= 32 */
        for (Py_ssize_t q = k; q < e; q++) {
            int di = b->frames[q].dst;
            if (di < 0 || done_mask >> di & 1)
                continue;
            done_mask |= 1u << di;
            dst_t *t = &b->dsts[di];
            for (Py_ssize_t r = q; r < e; r++) {
                frame_t *f = &b->frames[r];
                if (f->dst != di || !f->rx_buf)
                    continue;
                t->bytes += f->len - (uint32_t)hs;
                if (!f->rx_nextra && !f->multi) {
                    memmove(f->rx_buf, f->buf, f->len); /* memoryview slice assignment */
                    if (hs == 12) {
                        f->rx_buf[10] = 1; /* num_buffers = 1 */
                        f->rx_buf[11] = 0;
                    }
                    continue;
                }
                scatter(f, b->extras + f->rx_extra, b->segs, (uint32_t)hs);
            }
        }
        k = e;
    }
    uint32_t used = (uint32_t)tx->used_idx;
    for (Py_ssize_t k = 0; k < n; k++)
        put_elem(tx, used + (uint32_t)k, (int64_t)b->frames[k].head);
    tx->last_avail = (int)((last + (uint32_t)n) & 0xFFFF);
    publish(tx, (used + (uint32_t)n) & 0xFFFF);
    for (int di = 0; di < b->ndsts; di++) {
        dst_t *t = &b->dsts[di];
        if (!t->delivered)
            continue;
        SplitCore *rx = (SplitCore *)t->core;
        uint32_t ru = (uint32_t)rx->used_idx, j = 0;
        for (Py_ssize_t k = 0; k < n; k++) {
            frame_t *f = &b->frames[k];
            if (f->dst != di || !f->rx_buf)
                continue;
            if (!f->rx_nextra) {
                put_elem(rx, ru + j++, (int64_t)((uint64_t)f->rx_head | (uint64_t)f->len << 32));
                continue;
            }
            /* _write's (chain, written) per chain: all full but the last. */
            uint32_t left = f->len - f->rx_cap;
            put_elem(rx, ru + j++, (int64_t)((uint64_t)f->rx_head | (uint64_t)f->rx_cap << 32));
            for (uint32_t c = 0; c < f->rx_nextra; c++) {
                extra_t *e = &b->extras[f->rx_extra + c];
                uint32_t wr = e->cap < left ? e->cap : left;
                left -= wr;
                put_elem(rx, ru + j++, (int64_t)((uint64_t)e->head | (uint64_t)wr << 32));
            }
        }
        /* j: every chain popped, pop_many's and _write's (t->chains). */
        rx->last_avail = (int)(((uint32_t)rx->last_avail + j) & 0xFFFF);
        publish(rx, (ru + j) & 0xFFFF);
    }
    for (int k = 0; k < b->nseen; k++)
        if (PyObject_SetAttr(b->seen_entries[k], str_seen, now_obj) < 0) {
            rc = ERROR; /* cannot happen with FdbEntry; never silently */
            goto done;
        }

    PyObject *out = PyList_New(b->ndsts);
    if (!out) {
        rc = ERROR;
        goto done;
    }
    for (int di = 0; di < b->ndsts; di++) {
        dst_t *t = &b->dsts[di];
        PyObject *item = Py_BuildValue("(OOIKIO)", t->port, t->queue, t->delivered,
                                       (unsigned long long)t->bytes, t->frames - t->delivered,
                                       t->touch ? Py_True : Py_False);
        if (!item) {
            Py_DECREF(out);
            rc = ERROR;
            goto done;
        }
        PyList_SET_ITEM(out, di, item);
    }
    result = Py_BuildValue("(nLLLLLLNL)", n, pkts, nbytes, runt, oversize, bad_source, hairpin,
                           out, gso_in);
    rc = result ? OK : ERROR;
done:
    burst_clear(b);
    if (b == kept)
        kept_busy = 0;
    else
        PyMem_Free(b);
    if (rc == ERROR) {
        Py_XDECREF(now_obj);
        return NULL;
    }
    if (rc == DEFER) {
        if (now_obj)
            return now_obj; /* the Python burst uses this time, not a second read */
        Py_RETURN_NONE;
    }
    Py_XDECREF(now_obj);
    return result;
}

static PyMethodDef module_methods[] = {
    {"forward_burst", (PyCFunction)(void (*)(void))forward_burst, METH_FASTCALL,
     "One burst of Switch.forward_chains, compiled, or None: run the Python burst."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_forward_c",
    "Compiled burst of vvu-switch's forwarding loop; switch.py is the reference.", -1,
    module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__forward_c(void)
{
    /* PyCapsule_Import only walks attributes: the ring module must be imported. */
    PyObject *split = PyImport_ImportModule("vvu_runtime.virtio._split_c");
    if (!split)
        return NULL;
    Py_DECREF(split);
    api = PyCapsule_Import(SPLIT_CORE_CAPSULE, 0);
    if (!api)
        return NULL;
    str_refresh = PyUnicode_InternFromString("_refresh_avail");
    str_fast_rx = PyUnicode_InternFromString("fast_rx");
    str_port = PyUnicode_InternFromString("port");
    str_seen = PyUnicode_InternFromString("seen");
    if (!str_refresh || !str_fast_rx || !str_port || !str_seen)
        return NULL;
    return PyModule_Create(&module_def);
}
