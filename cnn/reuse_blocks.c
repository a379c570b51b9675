/* Keeps large freed blocks for the next request of their size: preloaded (LD_PRELOAD) into the processes that
 * `cnn.runtime.restart_with_allocator` restarts.
 *
 * Why: XLA:CPU allocates a compiled step's temporary buffer (posix_memalign) at every call and frees it after: 101 MB
 * for ResNet-20's bf16 step at batch 128, 2.4 GB for ResNet-50's at batch 32. glibc maps every block of 32 MB or more
 * on its own and unmaps it when freed, so the kernel faulted the whole buffer in again at every step, and zeroed it:
 * 15-30 ms of system time against a 100-120 ms ResNet-20 step on 2 cores, even in 2 MB pages. glibc's own settings
 * (one arena, no separate mappings, no trimming) kept the memory but fragmented it: peak memory grew by half for
 * ResNet-20 and 2.4x for ResNet-50 (docs/performance.md). This keeps the very blocks instead.
 *
 * What it changes: posix_memalign of 32 MB or more takes a kept block of its size (up to 1/8 larger) and alignment,
 * if there is one; otherwise it first gives every kept block back, so blocks are kept only between a free and the
 * next large request, and at most KEPT of them. free of such a block keeps it. Everything else goes to the C
 * library unchanged.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>

enum { LARGE = 32 << 20, LIVE = 16, KEPT = 8 };

typedef struct {
  void* _Atomic ptr;
  size_t size, align;
} Block;

static Block live[LIVE];  /* large blocks handed out and not yet freed */
static Block kept[KEPT];  /* large blocks freed, for the next request of their size */
static atomic_int live_count;
static atomic_flag busy = ATOMIC_FLAG_INIT;

static int (*c_posix_memalign)(void**, size_t, size_t);
static void (*c_free)(void*);
static void* (*c_realloc)(void*, size_t);

static void lock(void) {
  while (atomic_flag_test_and_set_explicit(&busy, memory_order_acquire)) {
  }
}
static void unlock(void) { atomic_flag_clear_explicit(&busy, memory_order_release); }

/* The C library's functions. dlsym may free memory itself while it resolves them: a free that comes in then, before
 * `c_free` is known, cannot be passed on and is dropped (a few bytes, once). */
static _Thread_local int resolving;
static int resolve(void) {
  if (c_free && c_posix_memalign && c_realloc) return 1;
  if (resolving) return 0;
  resolving = 1;
  c_posix_memalign = (int (*)(void**, size_t, size_t))dlsym(RTLD_NEXT, "posix_memalign");
  c_realloc = (void* (*)(void*, size_t))dlsym(RTLD_NEXT, "realloc");
  c_free = (void (*)(void*))dlsym(RTLD_NEXT, "free");
  resolving = 0;
  return c_free && c_posix_memalign && c_realloc;
}
/* A child forked while another thread held the lock would wait for it forever: the fork waits for it instead. */
__attribute__((constructor)) static void init(void) {
  resolve();
  pthread_atfork(lock, unlock, unlock);
}

/* The live slot holding p, or -1; read without the lock (only p's owner frees p, so a match cannot go stale). */
static int live_slot(void* p) {
  if (atomic_load_explicit(&live_count, memory_order_acquire) == 0) return -1;
  for (int i = 0; i < LIVE; ++i) {
    if (atomic_load_explicit(&live[i].ptr, memory_order_relaxed) == p) return i;
  }
  return -1;
}

static void track(void* p, size_t size, size_t align) {
  lock();
  for (int i = 0; i < LIVE; ++i) {
    if (atomic_load_explicit(&live[i].ptr, memory_order_relaxed) == NULL) {
      live[i].size = size;
      live[i].align = align;
      atomic_store_explicit(&live[i].ptr, p, memory_order_relaxed);
      atomic_fetch_add_explicit(&live_count, 1, memory_order_release);
      break;
    }
  }
  unlock();  /* with every slot taken, p stays untracked: an ordinary block */
}

static void untrack(int i) {
  atomic_store_explicit(&live[i].ptr, NULL, memory_order_relaxed);
  atomic_fetch_sub_explicit(&live_count, 1, memory_order_release);
}

int posix_memalign(void** out, size_t align, size_t size) {
  if (!resolve()) return ENOMEM;
  if (size < LARGE) return c_posix_memalign(out, align, size);
  void *p = NULL, *back[KEPT] = {NULL};
  size_t have = size;
  lock();
  for (int i = 0; i < KEPT && !p; ++i) {
    void* k = atomic_load_explicit(&kept[i].ptr, memory_order_relaxed);
    if (k && kept[i].align % align == 0 && kept[i].size >= size && kept[i].size - size <= size / 8) {
      p = k;
      have = kept[i].size;
      atomic_store_explicit(&kept[i].ptr, NULL, memory_order_relaxed);
    }
  }
  if (!p) {  /* nothing kept fits: give it all back (after the lock: unmapping takes a while) before asking for more */
    for (int i = 0; i < KEPT; ++i) {
      back[i] = atomic_load_explicit(&kept[i].ptr, memory_order_relaxed);
      atomic_store_explicit(&kept[i].ptr, NULL, memory_order_relaxed);
    }
  }
  unlock();
  for (int i = 0; i < KEPT; ++i) {
    if (back[i]) c_free(back[i]);
  }
  if (!p) {
    int err = c_posix_memalign(&p, align, size);
    if (err) return err;
  }
  track(p, have, align);
  *out = p;
  return 0;
}

void free(void* p) {
  if (!p || !resolve()) return;
  int i = live_slot(p);
  if (i < 0) return c_free(p);
  lock();
  size_t size = live[i].size, align = live[i].align;
  untrack(i);
  /* A block realloc'd behind this library's back (reallocarray) and its address reused: not the block recorded */
  int keep = malloc_usable_size(p) >= size;
  for (int k = 0; k < KEPT && keep; ++k) {
    if (atomic_load_explicit(&kept[k].ptr, memory_order_relaxed) == NULL) {
      kept[k].size = size;
      kept[k].align = align;
      atomic_store_explicit(&kept[k].ptr, p, memory_order_relaxed);
      p = NULL;
      break;
    }
  }
  unlock();
  if (p) c_free(p);
}

void* realloc(void* p, size_t size) {
  if (!resolve()) return NULL;
  int i = p ? live_slot(p) : -1;
  if (i >= 0) {
    lock();
    if (atomic_load_explicit(&live[i].ptr, memory_order_relaxed) == p) untrack(i);
    unlock();
  }
  return c_realloc(p, size);
}
