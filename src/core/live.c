/* live.c: which groups and handles are alive, and which thread is inside a call on a group.
 *
 * Every public call looks its objects up here before touching them, so that a destroyed (or never created) group or
 * handle is a named EP_STATUS_INVALID_USAGE instead of a use after free. The set is a sorted array of addresses
 * under one mutex: a lookup is a binary search (tens of nanoseconds beside a call's microseconds), and it never
 * dereferences an address it holds, except a live handle's group when that group is destroyed (orphaning). */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "core/internal.h"

typedef struct live_entry {
  uintptr_t address;
  ep_object_kind_t kind;
} live_entry_t;

static pthread_mutex_t g_live_mutex = PTHREAD_MUTEX_INITIALIZER;
static live_entry_t* g_live;
static size_t g_live_count, g_live_capacity;

/* The first index whose address is >= `address`. Caller holds the mutex. */
static size_t lower_bound(uintptr_t address) {
  size_t lo = 0, hi = g_live_count;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (g_live[mid].address < address) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

bool ep_live_add(const void* object, ep_object_kind_t kind) {
  const uintptr_t a = (uintptr_t)object;
  bool ok = true;
  pthread_mutex_lock(&g_live_mutex);
  size_t i = lower_bound(a);
  if (i < g_live_count && g_live[i].address == a) {
    g_live[i].kind = kind; /* the address was freed by someone else and reused: the new object is what lives */
  } else {
    if (g_live_count == g_live_capacity) {
      size_t cap = g_live_capacity ? 2 * g_live_capacity : 64;
      live_entry_t* grown = (live_entry_t*)realloc(g_live, cap * sizeof(*grown));
      if (grown) {
        g_live = grown;
        g_live_capacity = cap;
      } else {
        ok = false;
      }
    }
    if (ok) {
      memmove(&g_live[i + 1], &g_live[i], (g_live_count - i) * sizeof(*g_live));
      g_live[i].address = a;
      g_live[i].kind = kind;
      g_live_count++;
    }
  }
  pthread_mutex_unlock(&g_live_mutex);
  return ok;
}

void ep_live_remove(const void* object) {
  const uintptr_t a = (uintptr_t)object;
  pthread_mutex_lock(&g_live_mutex);
  size_t i = lower_bound(a);
  if (i < g_live_count && g_live[i].address == a) {
    memmove(&g_live[i], &g_live[i + 1], (g_live_count - i - 1) * sizeof(*g_live));
    g_live_count--;
  }
  pthread_mutex_unlock(&g_live_mutex);
}

bool ep_live_is(const void* object, ep_object_kind_t kind) {
  if (!object) return false;
  const uintptr_t a = (uintptr_t)object;
  pthread_mutex_lock(&g_live_mutex);
  size_t i = lower_bound(a);
  bool live = i < g_live_count && g_live[i].address == a && g_live[i].kind == kind;
  pthread_mutex_unlock(&g_live_mutex);
  return live;
}

void ep_live_orphan_handles(ep_group_t group) {
  pthread_mutex_lock(&g_live_mutex);
  for (size_t i = 0; i < g_live_count; ++i) {
    if (g_live[i].kind == EP_OBJECT_HANDLE) {
      ep_handle_t h = (ep_handle_t)g_live[i].address;
      if (h->group == group) h->group = NULL;
    } else if (g_live[i].kind == EP_OBJECT_LL_HANDLE) {
      ep_ll_handle_t h = (ep_ll_handle_t)g_live[i].address;
      if (h->group == group) h->group = NULL;
    }
  }
  pthread_mutex_unlock(&g_live_mutex);
}

/* ---- One thread per group at a time ----
 * A thread is named by the address of its own thread-local byte. The call scope of the running public call
 * (a stack of them, as one public call may make another) records the group it took, and gives it back at its end. */
static _Thread_local char t_thread_token;
static _Thread_local ep_call_scope_t* t_scope;

void ep_call_scope_begin(ep_call_scope_t* scope) {
  scope->outer = t_scope;
  scope->held = NULL;
  t_scope = scope;
}

void ep_call_scope_end(ep_call_scope_t* scope) {
  if (scope->held) {
    atomic_store(&scope->held->busy_fn, NULL);
    atomic_store(&scope->held->busy_thread, (uintptr_t)0);
  }
  t_scope = scope->outer;
}

void ep_call_scope_release(ep_group_t group) {
  for (ep_call_scope_t* s = t_scope; s; s = s->outer)
    if (s->held == group) s->held = NULL;
}

ep_status_t ep_take_group(ep_group_t group, const char* fn) {
  const uintptr_t me = (uintptr_t)&t_thread_token;
  uintptr_t holder = atomic_load(&group->busy_thread);
  if (holder == me) return EP_STATUS_SUCCESS; /* a call this thread is already making on the group */
  if (!t_scope) return EP_STATUS_SUCCESS;     /* not a public call's entry: nothing to give back at its end */
  uintptr_t expected = 0;
  if (atomic_compare_exchange_strong(&group->busy_thread, &expected, me)) {
    atomic_store(&group->busy_fn, fn);
    t_scope->held = group;
    return EP_STATUS_SUCCESS;
  }
  const char* other = atomic_load(&group->busy_fn);
  /* The message goes to this thread only: the group's own message belongs to the call in progress. */
  return ep_fail(NULL, EP_STATUS_INVALID_USAGE,
                 "%s: another thread is inside %s on this group; calls on one group must come from one thread at a "
                 "time",
                 fn, other ? other : "a call");
}
