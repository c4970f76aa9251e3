// Set-associative L1 embedding cache: device code only (the host object is cache/gpu.py).
//
// Layout (num_sets * ways slots, slot = set * ways + way):
//   keys  int64  [slots]        the slot's key (0 when free)
//   state uint32 [slots]        seqlock word: LOCK | OCC | version (slot.cuh)
//   stamp uint64 [slots]        LRU: tick of the last touch; LFU: access count
//   values S     [slots, dim]   fp32, fp16 or bf16 bits
// Every kernel takes the same view of these arrays after its batch arguments, as cuco's
// kernels take a table view: keys, state, stamp, values, num_sets, ways, dim.
// Semantics are those of cache/reference.py; the comments below say where each step of its
// module docstring happens.
#include "slot.cuh"

using namespace hps;

// Probes key k's set as a reader. Returns the way holding k (occupied, unlocked) or -1;
// *busy tells a -1 apart that may be wrong because some way was locked by a writer, and
// *seen is the matched way's state word. Warp-uniform results.
__device__ __forceinline__ int probe_set(long long k, unsigned long long base,
                                         const long long* keys, const unsigned* state, int ways,
                                         int lane, unsigned* seen, bool* busy) {
  unsigned s = 0;
  long long kk = 0;
  if (lane < ways) {
    s = ld_acquire(state + base + lane);  // orders the key load after the state load
    kk = ld_relaxed(keys + base + lane);
  }
  const unsigned match = __ballot_sync(FULL, lane < ways && (s & (OCC | LOCK)) == OCC && kk == k);
  *busy = __ballot_sync(FULL, (s & LOCK) != 0) != 0;
  if (!match) return -1;
  const int m = __ffs(match) - 1;
  *seen = __shfl_sync(FULL, s, m);
  return m;
}

// Finds k's way as a writer (a locked way may still hold k) or -1. Warp-uniform.
__device__ __forceinline__ int find_way(long long k, unsigned long long base,
                                        const long long* keys, const unsigned* state, int ways,
                                        int lane) {
  unsigned s = 0;
  long long kk = 0;
  if (lane < ways) {
    s = ld_acquire(state + base + lane);
    kk = ld_relaxed(keys + base + lane);
  }
  const unsigned match = __ballot_sync(FULL, lane < ways && (s & OCC) && kk == k);
  return match ? __ffs(match) - 1 : -1;
}

// Lane 0 locks the slot and checks it still holds k; on a mismatch it unlocks unchanged.
// Returns (warp-uniform) whether the warp now owns the slot; *before is the pre-lock word.
__device__ __forceinline__ bool lock_if_holds(unsigned* state, const long long* key, long long k,
                                              int lane, unsigned* before) {
  unsigned b = 0;
  int ok = 0;
  if (lane == 0) {
    b = lock_slot(state);
    ok = (b & OCC) && ld_relaxed(key) == k;
    if (!ok) st_release(state, b);  // nothing written: same word, readers need not retry
  }
  *before = __shfl_sync(FULL, b, 0);
  ok = __shfl_sync(FULL, ok, 0);
  __syncwarp();
  return ok != 0;
}

// Publishes a write: every lane's stores, then lane 0's new state word.
__device__ __forceinline__ void unlock_after_write(unsigned* state, unsigned after, int lane) {
  __threadfence();
  __syncwarp();
  if (lane == 0) st_release(state, after);
  __syncwarp();
}

__device__ __forceinline__ void touch(unsigned long long* stamp, int lfu,
                                      unsigned long long tick) {
  if (lfu)
    atomicAdd(stamp, 1ull);  // once per occurrence: concurrent warps may hit the same slot
  else
    *reinterpret_cast<volatile unsigned long long*>(stamp) = tick;
}

// Overwrites k's row where cached (the caller's write=false only asks); returns its way or -1.
template <int S>
__device__ int overwrite_if_cached(long long k, unsigned long long base, const long long* keys,
                                   unsigned* state, typename Storage<S>::T* values, int ways,
                                   int dim, const float* src, bool vec, bool write, int lane) {
  for (;;) {
    const int m = find_way(k, base, keys, state, ways, lane);
    if (m < 0 || !write) return m;
    const unsigned long long slot = base + m;
    unsigned before;
    if (!lock_if_holds(state + slot, keys + slot, k, lane, &before)) continue;  // moved
    write_row<S>(values + slot * dim, src, dim, vec, lane);
    unlock_after_write(state + slot, next_state(before, OCC), lane);
    return m;
  }
}

// -- find: one warp per key -------------------------------------------------------------------

// Rows of hits go to out (converted to O), hit[i] says which; misses get a zero row when
// zero_miss (out was freshly allocated), else keep theirs. A hit is touched once per
// occurrence (LRU: stamp = tick; LFU: +1).
//
// Each attempt: the warp loads every way's state word and key at once (relaxed: a hint), the
// ballot picks way m, then the seqlock read of slot m: each lane acquires the slot's word (it
// must equal the probed one), loads its part of the row and lane 0 the key again (relaxed),
// fence, reloads the word: the hit stands if every lane saw the same word and the key is still
// k. REGS = 1 (vec and at most 32 chunks of 16 bytes: dim <= 128 fp32, 256 fp16/bf16): each
// lane holds its chunk in registers and writes it to out only after that check, so the fence
// waits for no store. REGS = 0: the warp copies the row to out as it reads it (read_row).
// LRU skips the stamp store when the stamp already holds tick (a hot key, touched earlier in
// this call): the same result without a stream of stores to one address.
// REGS = 1 fits 32 registers (8 blocks of 256 threads per SM; ptxas -v: 4 bytes of spill
// loads), REGS = 0 48 (the unrolled read_row).
template <int S, int O, int REGS>
__launch_bounds__(256, REGS ? 8 : 5) __global__ void cache_find(
    const long long* __restrict__ query, long long n, const long long* keys, const unsigned* state,
    unsigned long long* stamp, const typename Storage<S>::T* values, unsigned long long num_sets,
    int ways, int dim, typename Output<O>::T* out, bool* hit, int vec, int zero_miss, int lfu,
    unsigned long long tick) {
  constexpr int V = Storage<S>::VEC;
  const int lane = threadIdx.x & 31;
  const unsigned long long magic = ~0ull / num_sets;  // for mod_by
  for (long long i = warp_id(); i < n; i += warp_count()) {
    const long long k = query[i];
    const unsigned long long base =
        mod_by(splitmix64((unsigned long long)k), num_sets, magic) * (unsigned long long)ways;
    typename Output<O>::T* dst = out + i * dim;
    unsigned r[4];
    unsigned long long slot = 0;
    bool found = false, tried = false;
    for (int attempt = 0; attempt < MAX_RETRIES; ++attempt) {
      if (attempt) backoff();
      unsigned s = 0;
      long long kk = 0;
      if (lane < ways) {
        s = ld_relaxed(state + base + lane);
        kk = ld_relaxed(keys + base + lane);
      }
      const unsigned match =
          __ballot_sync(FULL, lane < ways && (s & (OCC | LOCK)) == OCC && kk == k);
      if (!match) {
        if (__any_sync(FULL, (s & LOCK) != 0)) continue;  // k may be in a locked way
        break;                                            // a miss
      }
      const int m = __ffs(match) - 1;
      const unsigned seen = __shfl_sync(FULL, s, m);
      slot = base + m;
      unsigned long long old_stamp = 0;
      if (lane == 0 && !lfu) old_stamp = ld_relaxed(stamp + slot);  // outside the seqlock
      // Every lane orders its own loads of the slot after this acquire of the matched word.
      if (__any_sync(FULL, ld_acquire(state + slot) != seen)) continue;
      tried = true;
      const long long held = lane == 0 ? ld_relaxed(keys + slot) : k;
      if constexpr (REGS) {
        if (lane < dim / V) ld_relaxed_v4(values + slot * dim + (long long)lane * V, r);
      } else {
        read_row<S, O>(values + slot * dim, dst, dim, vec != 0, lane);
      }
      fence_acq_rel();  // key and row loads complete before the word is read again
      if (__all_sync(FULL, ld_relaxed(state + slot) == seen && held == k)) {
        found = true;
        if (lane == 0) {
          if (lfu)
            atomicAdd(stamp + slot, 1ull);  // once per occurrence: warps may share a slot
          else if (old_stamp != tick)
            *reinterpret_cast<volatile unsigned long long*>(stamp + slot) = tick;
        }
        break;
      }
    }
    if constexpr (REGS) {
      if (found && lane < dim / V) store_chunk<S, O>(r, dst + (long long)lane * V);
    }
    if (lane == 0) hit[i] = found;
    if (!found && (zero_miss || tried)) zero_row(dst, dim, lane);
  }
}

// -- contains: one warp per key ------------------------------------------------------------------

extern "C" __global__ void cache_contains(const long long* __restrict__ query, long long n,
                                          const long long* keys, const unsigned* state,
                                          const unsigned long long* stamp, const void* values,
                                          unsigned long long num_sets, int ways, int dim,
                                          bool* found) {
  const int lane = threadIdx.x & 31;
  for (long long i = warp_id(); i < n; i += warp_count()) {
    const long long k = query[i];
    const unsigned long long base =
        (splitmix64((unsigned long long)k) % num_sets) * (unsigned long long)ways;
    bool f = false;
    for (int attempt = 0; attempt < MAX_RETRIES; ++attempt) {
      if (attempt) backoff();
      unsigned seen;
      bool busy;
      f = probe_set(k, base, keys, state, ways, lane, &seen, &busy) >= 0;
      if (f || !busy) break;
    }
    if (lane == 0) found[i] = f;
  }
}

// -- insert ------------------------------------------------------------------------------------
// Host side: keep = last occurrence of each key (mark_last), then
//   cache_update  (reference step 2): cached keys overwritten and touched, all at once;
//   cache_place   (reference step 3): new keys, one warp per set, in batch order.

extern "C" __global__ void cache_set_index(const long long* __restrict__ query, long long n,
                                           unsigned long long num_sets, long long* sets) {
  for (long long i = thread_id(); i < n; i += thread_count())
    sets[i] = (long long)(splitmix64((unsigned long long)query[i]) % num_sets);
}

// order: a stable argsort of keys. keep[i]: i is its key's last occurrence in the batch.
extern "C" __global__ void mark_last(const long long* __restrict__ order,
                                     const long long* __restrict__ keys, long long n, bool* keep) {
  for (long long j = thread_id(); j < n; j += thread_count()) {
    const long long i = order[j];
    keep[i] = j == n - 1 || keys[order[j + 1]] != keys[i];
  }
}

// is_new[i] = 1 for kept keys not cached at the start of the call (placed by cache_place).
template <int S>
__global__ void cache_update(const long long* __restrict__ query,
                             const float* __restrict__ vectors, const bool* __restrict__ keep,
                             long long n, const long long* keys, unsigned* state,
                             unsigned long long* stamp, typename Storage<S>::T* values,
                             unsigned long long num_sets, int ways, int dim, int vec, int lfu,
                             unsigned long long tick, unsigned char* is_new) {
  const int lane = threadIdx.x & 31;
  for (long long i = warp_id(); i < n; i += warp_count()) {
    if (!keep[i]) {
      if (lane == 0) is_new[i] = 0;
      continue;
    }
    const long long k = query[i];
    const unsigned long long base =
        (splitmix64((unsigned long long)k) % num_sets) * (unsigned long long)ways;
    const int m = overwrite_if_cached<S>(k, base, keys, state, values, ways, dim,
                                         vectors + i * dim, vec, true, lane);
    if (lane == 0) {
      is_new[i] = m < 0;
      if (m >= 0) touch(stamp + base + m, lfu, tick);  // distinct keys: once per slot
    }
  }
}

// One set's new keys, in batch order: the lowest free way, else the smallest stamp (ties:
// lowest way). The warp keeps the set's state and stamps in registers (lane w: way w), so a
// key placed earlier in this call is a candidate victim for a later one.
template <int S>
__device__ void place_set(long long p0, long long set, const long long* query,
                          const float* vectors, const unsigned char* is_new,
                          const long long* order, const long long* sorted_sets, long long n,
                          long long* keys, unsigned* state, unsigned long long* stamp,
                          typename Storage<S>::T* values, int ways, int dim, bool vec, int lfu,
                          unsigned long long tick, int lane) {
  const unsigned long long base = (unsigned long long)set * (unsigned long long)ways;
  bool loaded = false;
  unsigned my_state = 0;
  unsigned long long my_stamp = 0;
  for (long long q = p0;; q += 32) {
    const long long p = q + lane;
    long long i = -1;
    if (p < n && sorted_sets[p] == set) i = order[p];
    const unsigned members = __ballot_sync(FULL, i >= 0);  // a prefix: sorted by set
    unsigned fresh = __ballot_sync(FULL, i >= 0 && is_new[i]);
    while (fresh) {
      const int b = __ffs(fresh) - 1;
      fresh &= fresh - 1;
      const long long idx = __shfl_sync(FULL, i, b);
      if (!loaded) {
        if (lane < ways) {
          my_state = ld_relaxed(state + base + lane);
          my_stamp = *reinterpret_cast<volatile unsigned long long*>(stamp + base + lane);
        }
        loaded = true;
      }
      const unsigned free_ways = __ballot_sync(FULL, lane < ways && !(my_state & OCC));
      int w;
      if (free_ways) {
        w = __ffs(free_ways) - 1;
      } else {
        unsigned long long best = lane < ways ? my_stamp : ~0ull;
        int best_way = lane;
#pragma unroll
        for (int off = 16; off; off >>= 1) {
          const unsigned long long s = __shfl_xor_sync(FULL, best, off);
          const int bw = __shfl_xor_sync(FULL, best_way, off);
          if (s < best || (s == best && bw < best_way)) {
            best = s;
            best_way = bw;
          }
        }
        w = best_way;  // the butterfly leaves every lane with the same minimum
      }
      const unsigned long long slot = base + w;
      const unsigned long long new_stamp = lfu ? 1ull : tick;
      unsigned before = 0;
      if (lane == 0) {
        before = lock_slot(state + slot);
        keys[slot] = query[idx];
        stamp[slot] = new_stamp;
      }
      before = __shfl_sync(FULL, before, 0);
      __syncwarp();
      write_row<S>(values + slot * dim, vectors + idx * dim, dim, vec, lane);
      const unsigned after = next_state(before, OCC);
      unlock_after_write(state + slot, after, lane);
      if (lane == w) {
        my_state = after;
        my_stamp = new_stamp;
      }
    }
    if (members != FULL) return;
  }
}

// order: stable argsort of the batch's set indices; sorted_sets = sets[order]. The warp whose
// 32-entry chunk holds the first entry of a set processes that whole set, so every set has
// exactly one owner and its keys go in batch order.
template <int S>
__global__ void cache_place(const long long* __restrict__ query,
                            const float* __restrict__ vectors,
                            const unsigned char* __restrict__ is_new,
                            const long long* __restrict__ order,
                            const long long* __restrict__ sorted_sets, long long n,
                            long long* keys, unsigned* state, unsigned long long* stamp,
                            typename Storage<S>::T* values, unsigned long long num_sets, int ways,
                            int dim, int vec, int lfu, unsigned long long tick) {
  const int lane = threadIdx.x & 31;
  const long long chunks = (n + 31) >> 5;
  for (long long c = warp_id(); c < chunks; c += warp_count()) {
    const long long p = (c << 5) + lane;
    const long long set = p < n ? sorted_sets[p] : -1;
    const bool start = p < n && (p == 0 || sorted_sets[p - 1] != set);
    unsigned starts = __ballot_sync(FULL, start);
    while (starts) {
      const int b = __ffs(starts) - 1;
      starts &= starts - 1;
      place_set<S>((c << 5) + b, __shfl_sync(FULL, set, b), query, vectors, is_new, order,
                   sorted_sets, n, keys, state, stamp, values, ways, dim, vec != 0, lfu, tick,
                   lane);
    }
  }
}

// -- assign, erase --------------------------------------------------------------------------------

// cached[i]: key i is cached (every occurrence); rows written for keep[i] only. No touch.
template <int S>
__global__ void cache_assign(const long long* __restrict__ query,
                             const float* __restrict__ vectors, const bool* __restrict__ keep,
                             long long n, const long long* keys, unsigned* state,
                             const unsigned long long* stamp, typename Storage<S>::T* values,
                             unsigned long long num_sets, int ways, int dim, int vec,
                             bool* cached) {
  const int lane = threadIdx.x & 31;
  for (long long i = warp_id(); i < n; i += warp_count()) {
    const long long k = query[i];
    const unsigned long long base =
        (splitmix64((unsigned long long)k) % num_sets) * (unsigned long long)ways;
    const int m = overwrite_if_cached<S>(k, base, keys, state, values, ways, dim,
                                         vectors + i * dim, vec, keep[i], lane);
    if (lane == 0) cached[i] = m >= 0;
  }
}

// Frees each cached key's slot (key 0, stamp 0, zero row); *erased counts distinct keys:
// a duplicate finds the slot already free once it gets the lock.
template <int S>
__global__ void cache_erase(const long long* __restrict__ query, long long n, long long* keys,
                            unsigned* state, unsigned long long* stamp,
                            typename Storage<S>::T* values, unsigned long long num_sets,
                            int ways, int dim, unsigned long long* erased) {
  const int lane = threadIdx.x & 31;
  for (long long i = warp_id(); i < n; i += warp_count()) {
    const long long k = query[i];
    const unsigned long long base =
        (splitmix64((unsigned long long)k) % num_sets) * (unsigned long long)ways;
    for (;;) {
      const int m = find_way(k, base, keys, state, ways, lane);
      if (m < 0) break;
      const unsigned long long slot = base + m;
      unsigned before;
      if (!lock_if_holds(state + slot, keys + slot, k, lane, &before)) continue;
      if (lane == 0) {
        keys[slot] = 0;
        stamp[slot] = 0;
      }
      zero_row(values + slot * dim, dim, lane);
      unlock_after_write(state + slot, next_state(before, 0), lane);
      if (lane == 0) atomicAdd(erased, 1ull);
      break;
    }
  }
}

// -- export, snapshot, find_missing ---------------------------------------------------------------

// out[r] = decoded values[rows[r]] (rows == nullptr: row r; rows[r] < 0: a zero row).
template <int S>
__global__ void gather_rows(const typename Storage<S>::T* __restrict__ values,
                            const long long* __restrict__ rows, long long m, int dim,
                            float* out) {
  const long long total = m * dim;
  for (long long e = thread_id(); e < total; e += thread_count()) {
    const long long r = e / dim;
    const long long src = rows ? rows[r] : r;
    out[e] = src < 0 ? 0.0f : Storage<S>::decode(values[src * dim + (e - r * dim)]);
  }
}

// cum: inclusive prefix sum of the misses; missing[cum[i] - 1] = i for each miss i.
extern "C" __global__ void scatter_missing(const bool* __restrict__ hit,
                                           const long long* __restrict__ cum, long long n,
                                           long long* missing) {
  for (long long i = thread_id(); i < n; i += thread_count())
    if (!hit[i]) missing[cum[i] - 1] = i;
}
