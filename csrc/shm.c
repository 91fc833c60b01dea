/*
 * shm.c - the shared region: one memfd, mapped MAP_SHARED before the first
 * fork, so the zygote and every worker inherit the same mapping.
 *
 * Layout: [slot 0][slot 1]...; each slot is [ctl (4 KiB)][task ring][result
 * ring], page aligned.  The memfd is closed as soon as it is mapped: nothing
 * appears in /dev/shm, no fd leaks into children, and the memory goes away
 * when the last process that maps it exits, however it exits.
 *
 * No Python here.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "cpool.h"

#define CTL_BYTES 4096u

static size_t
page_round(size_t n)
{
    size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    return (n + pg - 1) & ~(pg - 1);
}

/* Create and map the region for nslots workers.  Returns 0 or -errno. */
int
cp_shm_create(cp_shm *s, int nslots, uint64_t ring_cap)
{
    memset(s, 0, sizeof *s);
    if (nslots < 1 || ring_cap < 4096 || ring_cap > (UINT64_C(1) << 34) ||
        (ring_cap & (ring_cap - 1)))
        return -EINVAL;
    s->nslots = nslots;
    s->ring_cap = ring_cap;
    s->slot_bytes = CTL_BYTES + 2 * page_round(cp_ring_bytes(ring_cap));
    s->size = s->slot_bytes * (size_t)nslots;

    int fd = memfd_create("cpool", MFD_CLOEXEC);
    if (fd < 0)
        return -errno;
    /* Sized, not populated: the rings are small (2 MiB a worker by
     * default) and pages are faulted in as they are first used, which keeps
     * Pool() fast (populating them up front costs more than the fork). */
    int rc = ftruncate(fd, (off_t)s->size);
    if (rc < 0) {
        rc = -errno;
        close(fd);
        return rc;
    }
    void *p = mmap(NULL, s->size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    rc = -errno;
    close(fd);
    if (p == MAP_FAILED)
        return rc;
    s->base = p;
    for (int i = 0; i < nslots; i++)
        cp_shm_reset_slot(s, i);
    return CP_OK;
}

void
cp_shm_destroy(cp_shm *s)
{
    if (s->base)
        munmap(s->base, s->size);
    s->base = NULL;
}

static uint8_t *
slot_base(cp_shm *s, int slot)
{
    return (uint8_t *)s->base + s->slot_bytes * (size_t)slot;
}

cp_ctl *
cp_shm_ctl(cp_shm *s, int slot)
{
    return (cp_ctl *)slot_base(s, slot);
}

void *
cp_shm_task_ring(cp_shm *s, int slot)
{
    return slot_base(s, slot) + CTL_BYTES;
}

void *
cp_shm_result_ring(cp_shm *s, int slot)
{
    return slot_base(s, slot) + CTL_BYTES + page_round(cp_ring_bytes(s->ring_cap));
}

/* Reset a slot for a new worker.  Only safe while no process uses the slot:
 * before the first fork, or after its worker has been reaped.  The record of
 * how its last worker ended (exited) is kept. */
void
cp_shm_reset_slot(cp_shm *s, int slot)
{
    cp_ctl *c = cp_shm_ctl(s, slot);
    memset(c, 0, offsetof(cp_ctl, exited));
    cp_ring_format(cp_shm_task_ring(s, slot), s->ring_cap);
    cp_ring_format(cp_shm_result_ring(s, slot), s->ring_cap);
}
