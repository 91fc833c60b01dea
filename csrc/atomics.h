/*
 * atomics.h - the memory-ordering vocabulary of cpool.
 *
 * Every cross-process handshake in cpool is one of two shapes:
 *   publish:  write payload; store_release(index)
 *   consume:  load_acquire(index); read payload
 * plus the Dekker-style "sleeping flag" handshake of cp_futex_*, which needs a
 * full fence on both sides (cp_fence_full) so that neither side can miss the
 * other's store.
 */
#ifndef CPOOL_ATOMICS_H
#define CPOOL_ATOMICS_H

#include <stdint.h>

#define CP_LIKELY(x)   __builtin_expect(!!(x), 1)
#define CP_UNLIKELY(x) __builtin_expect(!!(x), 0)
#define CP_CACHELINE 64

#define cp_load_acquire(p)     __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define cp_load_relaxed(p)     __atomic_load_n((p), __ATOMIC_RELAXED)
#define cp_store_release(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define cp_store_relaxed(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define cp_fence_full()        __atomic_thread_fence(__ATOMIC_SEQ_CST)

static inline void
cp_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

#endif /* CPOOL_ATOMICS_H */
