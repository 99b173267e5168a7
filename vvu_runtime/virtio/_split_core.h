/*
 * The compiled split ring's state (_split_c.c), shared with the other compiled
 * parts of the data path that walk rings themselves (the switch's burst
 * forwarder, backends/switch/_forward_c.c). Both are compiled from this one
 * definition by the same builder (accel.build, setuptools), so the layout
 * agrees; the functions that need _split_c.c's own statics are reached through
 * the capsule SPLIT_CORE_CAPSULE, which also carries the SplitCore type for
 * the type check.
 */
#ifndef VVU_SPLIT_CORE_H
#define VVU_SPLIT_CORE_H

#include <Python.h>
#include <stdint.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "virtio 1.x rings are little-endian and this module reads them natively"
#endif

#define F_NEXT 1u
#define F_WRITE 2u
#define F_INDIRECT 4u
#define DESC_SIZE 16u

typedef struct {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
} desc_t;

/* One region of the memory table, copied from a MappedRegion. */
typedef struct {
    PyObject *obj;   /* the MappedRegion (strong: identity is how we spot changes) */
    PyObject *view;  /* its memoryview; buffers are slices of it, as in Python */
    uint64_t gpa, size;
} region_t;

typedef struct {
    PyObject_HEAD
    int last_avail;
    int shadow_avail;
    int used_idx;
    int log_all;
    int bound;
    uint32_t size, mask, max_indirect;
    int indirect_ok;
    Py_buffer desc_buf, avail_buf, used_buf;
    PyObject *region_list; /* GuestMemory._regions (NULL: not a list, use translate) */
    PyObject *translate;   /* memory.translate, when the table cannot be copied */
    region_t *regions;     /* our copy of the table */
    Py_ssize_t nregions, hit;
    int regions_ok;
} SplitCore;

/* Copy a descriptor out of shared memory once. The barrier stops the compiler
 * from re-reading fields from guest memory later instead of using the copy. */
static inline void read_desc(const uint8_t *p, desc_t *d)
{
    memcpy(&d->addr, p, 8);
    memcpy(&d->len, p + 8, 4);
    memcpy(&d->flags, p + 12, 2);
    memcpy(&d->next, p + 14, 2);
    __asm__ __volatile__("" ::: "memory");
}

static inline uint16_t avail_at(SplitCore *s, uint32_t i)
{
    return ((volatile uint16_t *)s->avail_buf.buf)[i];
}

static inline void publish(SplitCore *s, uint32_t idx)
{
    /* Elements before the index (release): the driver reads idx first. */
    __atomic_store_n(&((uint16_t *)s->used_buf.buf)[1], (uint16_t)idx, __ATOMIC_RELEASE);
    s->used_idx = (int)idx;
}

static inline void put_elem(SplitCore *s, uint32_t idx, int64_t elem)
{
    uint64_t v = (uint64_t)elem;
    memcpy((uint8_t *)s->used_buf.buf + 4 + 8 * (size_t)(idx & s->mask), &v, 8);
}

/* Whether the ring's copy of the memory table is still GuestMemory's (the check
 * sync_regions starts with): pointers from guest_ptr stay valid while it is. */
static inline int regions_current(SplitCore *s)
{
    if (!s->regions_ok || !s->region_list || PyList_GET_SIZE(s->region_list) != s->nregions)
        return 0;
    for (Py_ssize_t k = 0; k < s->nregions; k++)
        if (PyList_GET_ITEM(s->region_list, k) != s->regions[k].obj)
            return 0;
    return 1;
}

typedef struct {
    PyTypeObject *core_type;
    /* Bring the ring's copy of the memory table in step with GuestMemory's. */
    void (*sync_regions)(SplitCore *s);
    /* Host address of guest-physical [gpa, gpa + len) when it lies in one region of
     * the synced table, writable views only; NULL when refused (the Python
     * translate would refuse it or we cannot tell: the caller defers to Python). */
    uint8_t *(*guest_ptr)(SplitCore *s, uint64_t gpa, uint32_t len);
} SplitCoreAPI;

#define SPLIT_CORE_CAPSULE "vvu_runtime.virtio._split_c._C_API"

#endif
