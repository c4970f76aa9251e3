// Static GPU table: open addressing with linear probing, no eviction (HPS's static cache, for
// tables that fit in GPU memory). Device code only; the host object is cache/gpu.py.
//
// Layout (table_slots a power of two, at least twice the row capacity):
//   keys   int64  [table_slots]       the slot's key
//   state  uint32 [table_slots]       seqlock word: LOCK | OCC | TOMB | version (slot.cuh)
//   row_of uint32 [table_slots]       the slot's row in values
//   values S      [capacity, dim]     rows, allocated from free_rows, then from next_row on
// Probing goes on past occupied slots and tombstones (erased keys) and stops at a never-used
// slot. A warp probes 32 consecutive slots at once. Every kernel takes the same view of the
// arrays after its batch arguments: keys, state, row_of, values, mask (table_slots - 1), dim.
#include "slot.cuh"

using namespace hps;

// Probes for k. reader: matches only unlocked slots and reports *busy when a locked slot before
// the stop could hide k; writer: a locked slot may hold k. Returns the slot or -1 and sets *seen
// to the slot's state word. Warp-uniform.
__device__ long long probe_table(long long k, const long long* keys, const unsigned* state,
                                 unsigned long long mask, bool reader, int lane, unsigned* seen,
                                 bool* busy) {
  const unsigned long long h = splitmix64((unsigned long long)k) & mask;
  bool locked_before = false;
  for (unsigned long long off = 0; off <= mask; off += 32) {
    const unsigned long long slot = (h + off + lane) & mask;
    const unsigned s = ld_acquire(state + slot);
    const long long kk = ld_relaxed(keys + slot);
    const unsigned need = reader ? (OCC | LOCK) : OCC;
    const bool match = (s & need) == OCC && kk == k;
    const bool never_used = (s & (OCC | TOMB | LOCK)) == 0;
    const unsigned hits = __ballot_sync(FULL, match);
    const unsigned stops = __ballot_sync(FULL, match || never_used);
    const unsigned locks = __ballot_sync(FULL, (s & LOCK) != 0);
    if (stops) {
      const int f = __ffs(stops) - 1;
      *busy = locked_before || (locks & ((1u << f) - 1u)) != 0;
      if (!(hits & (1u << f))) return -1;
      *seen = __shfl_sync(FULL, s, f);
      return (long long)((h + off + f) & mask);
    }
    locked_before = locked_before || locks != 0;
  }
  *busy = locked_before;
  return -1;
}

// Rows of hits go to out; see cache_find for zero_miss and the seqlock read.
template <int S, int O>
__global__ void static_find(const long long* __restrict__ query, long long n,
                            const long long* keys, const unsigned* state,
                            const unsigned* row_of, const typename Storage<S>::T* values,
                            unsigned long long mask, int dim, typename Output<O>::T* out,
                            bool* hit, int vec, int zero_miss) {
  const int lane = threadIdx.x & 31;
  for (long long i = warp_id(); i < n; i += warp_count()) {
    const long long k = query[i];
    typename Output<O>::T* dst = out + i * dim;
    bool found = false, wrote = false;
    for (int attempt = 0; attempt < MAX_RETRIES; ++attempt) {
      if (attempt) backoff();
      unsigned seen = 0;
      bool busy = false;
      const long long slot = probe_table(k, keys, state, mask, true, lane, &seen, &busy);
      if (slot < 0) {
        if (busy) continue;
        break;
      }
      if (__any_sync(FULL, ld_acquire(state + slot) != seen)) continue;
      const unsigned long long row = ld_relaxed(row_of + slot);
      read_row<S, O>(values + row * dim, dst, dim, vec, lane);
      wrote = true;
      fence_acq_rel();
      if (__all_sync(FULL, ld_relaxed(state + slot) == seen)) {
        found = true;
        break;
      }
    }
    if (lane == 0) hit[i] = found;
    if (!found && (zero_miss || wrote)) zero_row(dst, dim, lane);
  }
}

extern "C" __global__ void static_contains(const long long* __restrict__ query, long long n,
                                           const long long* keys, const unsigned* state,
                                           const unsigned* row_of, const void* values,
                                           unsigned long long mask, int dim, bool* found) {
  const int lane = threadIdx.x & 31;
  for (long long i = warp_id(); i < n; i += warp_count()) {
    bool f = false;
    for (int attempt = 0; attempt < MAX_RETRIES; ++attempt) {
      if (attempt) backoff();
      unsigned seen;
      bool busy = false;
      f = probe_table(query[i], keys, state, mask, true, lane, &seen, &busy) >= 0;
      if (f || !busy) break;
    }
    if (lane == 0) found[i] = f;
  }
}

// kind[i]: 0 skip (an earlier duplicate), 1 new key, 2 cached key (overwrite).
extern "C" __global__ void static_classify(const long long* __restrict__ query,
                                           const bool* __restrict__ keep, long long n,
                                           const long long* keys, const unsigned* state,
                                           const unsigned* row_of, const void* values,
                                           unsigned long long mask, int dim,
                                           unsigned char* kind) {
  const int lane = threadIdx.x & 31;
  for (long long i = warp_id(); i < n; i += warp_count()) {
    unsigned char c = 0;
    if (keep[i]) {
      unsigned seen;
      bool busy;
      c = probe_table(query[i], keys, state, mask, false, lane, &seen, &busy) >= 0 ? 2 : 1;
    }
    if (lane == 0) kind[i] = c;
  }
}

// Overwrites the row of the cached key k under its slot's lock; false when k is not cached.
template <int S>
__device__ bool static_overwrite(long long k, const long long* keys, unsigned* state,
                                 const unsigned* row_of, typename Storage<S>::T* values,
                                 unsigned long long mask, int dim, const float* src, bool vec,
                                 int lane) {
  for (;;) {
    unsigned seen;
    bool busy;
    const long long slot = probe_table(k, keys, state, mask, false, lane, &seen, &busy);
    if (slot < 0) return false;
    unsigned before = 0;
    int ok = 0;
    if (lane == 0) {
      before = lock_slot(state + slot);
      ok = (before & OCC) && ld_relaxed(keys + slot) == k;
      if (!ok) st_release(state + slot, before);
    }
    before = __shfl_sync(FULL, before, 0);
    if (!__shfl_sync(FULL, ok, 0)) continue;
    __syncwarp();
    const unsigned long long row = row_of[slot];
    write_row<S>(values + row * dim, src, dim, vec, lane);
    __threadfence();
    __syncwarp();
    if (lane == 0) st_release(state + slot, next_state(before, OCC));
    __syncwarp();
    return true;
  }
}

// Writes the batch classified by static_classify. A new key claims the first never-used or
// erased slot on its probe path (CAS on the state word) and takes row number
// r = atomicAdd(alloc, 1): free_rows[free_top - 1 - r] while r < free_top, else
// next_row + r - free_top. The host has checked that the rows suffice; *failed counts keys
// that found no slot (never, with the table at most half full).
template <int S>
__global__ void static_insert(const long long* __restrict__ query,
                              const float* __restrict__ vectors,
                              const unsigned char* __restrict__ kind, long long n,
                              long long* keys, unsigned* state, unsigned* row_of,
                              typename Storage<S>::T* values, unsigned long long mask, int dim,
                              int vec, const unsigned* free_rows, unsigned long long free_top,
                              unsigned long long next_row, unsigned long long* counters) {
  const int lane = threadIdx.x & 31;
  unsigned long long* alloc = counters;
  unsigned long long* failed = counters + 1;
  for (long long i = warp_id(); i < n; i += warp_count()) {
    const unsigned char c = kind[i];
    if (c == 0) continue;
    const long long k = query[i];
    const float* src = vectors + i * dim;
    if (c == 2) {
      static_overwrite<S>(k, keys, state, row_of, values, mask, dim, src, vec != 0, lane);
      continue;
    }
    const unsigned long long h = splitmix64((unsigned long long)k) & mask;
    long long slot = -1;
    unsigned before = 0;
    for (unsigned long long off = 0; off <= mask && slot < 0; off += 32) {
      const unsigned long long mine = (h + off + lane) & mask;
      const unsigned s = ld_relaxed(state + mine);
      unsigned free_lanes = __ballot_sync(FULL, (s & (OCC | LOCK)) == 0);  // unused or erased
      while (free_lanes) {
        const int f = __ffs(free_lanes) - 1;
        free_lanes &= free_lanes - 1;
        int won = 0;
        if (lane == f) {
          won = atomicCAS(state + mine, s, s | LOCK) == s;
          if (won) __threadfence();
        }
        if (__shfl_sync(FULL, won, f)) {  // else another warp took it: the next free slot
          slot = (long long)((h + off + f) & mask);
          before = __shfl_sync(FULL, s, f);
          break;
        }
      }
    }
    if (slot < 0) {
      if (lane == 0) atomicAdd(failed, 1ull);
      continue;
    }
    __syncwarp();
    unsigned long long row = 0;
    if (lane == 0) {
      const unsigned long long r = atomicAdd(alloc, 1ull);
      row = r < free_top ? free_rows[free_top - 1 - r] : next_row + (r - free_top);
      keys[slot] = k;
      row_of[slot] = (unsigned)row;
    }
    row = __shfl_sync(FULL, row, 0);
    write_row<S>(values + row * dim, src, dim, vec != 0, lane);
    __threadfence();
    __syncwarp();
    if (lane == 0) st_release(state + slot, next_state(before, OCC));  // clears TOMB
    __syncwarp();
  }
}

// cached[i]: key i is cached; rows written for keep[i] only.
template <int S>
__global__ void static_assign(const long long* __restrict__ query,
                              const float* __restrict__ vectors, const bool* __restrict__ keep,
                              long long n, const long long* keys, unsigned* state,
                              const unsigned* row_of, typename Storage<S>::T* values,
                              unsigned long long mask, int dim, int vec, bool* cached) {
  const int lane = threadIdx.x & 31;
  for (long long i = warp_id(); i < n; i += warp_count()) {
    const long long k = query[i];
    bool c;
    if (keep[i]) {
      c = static_overwrite<S>(k, keys, state, row_of, values, mask, dim, vectors + i * dim,
                              vec != 0, lane);
    } else {
      unsigned seen;
      bool busy;
      c = probe_table(k, keys, state, mask, false, lane, &seen, &busy) >= 0;
    }
    if (lane == 0) cached[i] = c;
  }
}

// Turns each cached key's slot into a tombstone and pushes its row on free_rows at
// free_top + counters[0]++ (so counters[0] ends as the number of distinct keys erased).
extern "C" __global__ void static_erase(const long long* __restrict__ query, long long n,
                                        long long* keys, unsigned* state, const unsigned* row_of,
                                        const void* values, unsigned long long mask, int dim,
                                        unsigned* free_rows,
                                        unsigned long long free_top,
                                        unsigned long long* counters) {
  const int lane = threadIdx.x & 31;
  for (long long i = warp_id(); i < n; i += warp_count()) {
    const long long k = query[i];
    unsigned seen;
    bool busy;
    const long long slot = probe_table(k, keys, state, mask, false, lane, &seen, &busy);
    if (slot < 0) continue;
    if (lane == 0) {
      const unsigned before = lock_slot(state + slot);
      if ((before & OCC) && ld_relaxed(keys + slot) == k) {
        keys[slot] = 0;
        free_rows[free_top + atomicAdd(counters, 1ull)] = row_of[slot];
        __threadfence();
        st_release(state + slot, next_state(before, TOMB));
      } else {  // a duplicate of k in this batch erased it first
        st_release(state + slot, before);
      }
    }
    __syncwarp();
  }
}
