// Device helpers shared by the set-associative cache (cache.cu) and the static table
// (static_table.cu): the key hash, the per-slot seqlock word, storage conversions and
// warp-wide row copies. No includes, so NVRTC (CuPy) and nvcc compile it alike; gpu.py pastes
// this file in place of the #include line before handing the source to NVRTC.
#ifndef HPS_SLOT_CUH
#define HPS_SLOT_CUH

namespace hps {

inline constexpr unsigned FULL = 0xffffffffu;

// Slot state word (uint32): bit 0 LOCK (a writer is inside: the seqlock's "odd"), bit 1 OCC
// (holds a key), bit 2 TOMB (static table: erased, probing goes on past it), bits 3..31 a
// version counter that every completed write advances.
inline constexpr unsigned LOCK = 1u, OCC = 2u, TOMB = 4u, FLAGS = 7u, STEP = 8u;

// A reader gives up (reports a miss) after this many collisions with writers.
inline constexpr int MAX_RETRIES = 128;

enum Kind { F32 = 0, F16 = 1, BF16 = 2 };

// SplitMix64's output function: hps_core/hashing.py, bit for bit.
__device__ __forceinline__ unsigned long long splitmix64(unsigned long long z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// h % d without a 64-bit division: magic = ~0ull / d (once per thread), q = the high half of
// h * magic is floor(h / d) or at most two below it (and never above), so r = h - q * d does
// not wrap and at most two subtractions make it exact.
__device__ __forceinline__ unsigned long long mod_by(unsigned long long h, unsigned long long d,
                                                     unsigned long long magic) {
  unsigned long long r = h - __umul64hi(h, magic) * d;
  while (r >= d) r -= d;
  return r;
}

// -- memory operations with explicit ordering ----------------------------------------------
// Readers load slot data with ld.relaxed.gpu: coherent at GPU scope (served by L2, never by a
// stale L1 line), so the seqlock's version check covers what was actually read.

__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ unsigned ld_relaxed(const unsigned* p) {
  unsigned v;
  asm volatile("ld.relaxed.gpu.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ unsigned short ld_relaxed(const unsigned short* p) {
  unsigned short v;
  asm volatile("ld.relaxed.gpu.b16 %0, [%1];" : "=h"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ long long ld_relaxed(const long long* p) {
  long long v;
  asm volatile("ld.relaxed.gpu.b64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ unsigned long long ld_relaxed(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.relaxed.gpu.b64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

// 16 bytes; p must be 16-byte aligned.
__device__ __forceinline__ void ld_relaxed_v4(const void* p, unsigned (&r)[4]) {
  asm volatile("ld.relaxed.gpu.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "l"(p)
               : "memory");
}

// Plain 16-byte load of data no one writes during the kernel (input rows).
__device__ __forceinline__ void ld_v4(const void* p, unsigned (&r)[4]) {
  asm volatile("ld.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "l"(p));
}

__device__ __forceinline__ void st_v4(void* p, unsigned a, unsigned b, unsigned c, unsigned d) {
  asm volatile("st.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(a), "r"(b), "r"(c), "r"(d)
               : "memory");
}

__device__ __forceinline__ void st_v2(void* p, unsigned a, unsigned b) {
  asm volatile("st.v2.u32 [%0], {%1, %2};" ::"l"(p), "r"(a), "r"(b) : "memory");
}

__device__ __forceinline__ void st_release(unsigned* p, unsigned v) {
  asm volatile("st.release.gpu.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ void fence_acq_rel() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }

__device__ __forceinline__ void backoff() { asm volatile("nanosleep.u32 64;"); }

// -- the seqlock -----------------------------------------------------------------------------

// Spins until this thread owns the slot; returns the state word before locking (LOCK clear).
// Only writers contend here, and writers are meant to be ordered among themselves, so the
// spin is short; the nanosleep keeps a contended spin off the memory system.
__device__ __forceinline__ unsigned lock_slot(unsigned* state) {
  for (;;) {
    const unsigned s = ld_relaxed(state);
    if (!(s & LOCK) && atomicCAS(state, s, s | LOCK) == s) {
      __threadfence();  // the odd word is visible before any row byte changes
      return s;
    }
    backoff();
  }
}

// The unlocked word after a completed write: version advanced, flags replaced.
__device__ __forceinline__ unsigned next_state(unsigned before, unsigned flags) {
  return ((before & ~FLAGS) + STEP) | flags;
}

// -- storage and output types ----------------------------------------------------------------

__device__ __forceinline__ unsigned short f32_to_f16(float x) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));  // __float2half_rn: nearest even, inf
  return h;
}

__device__ __forceinline__ float f16_to_f32(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

// reference.to_bf16_bits: round to nearest even on the integer pattern; NaN -> quiet NaN.
__device__ __forceinline__ unsigned short f32_to_bf16(float x) {
  const unsigned long long b = __float_as_uint(x);
  if ((b & 0x7FFFFFFFull) > 0x7F800000ull) return (unsigned short)((b >> 16) | 0x0040ull);
  return (unsigned short)((b + 0x7FFFull + ((b >> 16) & 1ull)) >> 16);
}

__device__ __forceinline__ float bf16_to_f32(unsigned short h) {
  return __uint_as_float((unsigned)h << 16);
}

template <int S>
struct Storage;

template <>
struct Storage<F32> {
  using T = unsigned;  // fp32 bit patterns
  static constexpr int VEC = 4;  // elements per 16 bytes
  __device__ static float decode(unsigned b) { return __uint_as_float(b); }
  __device__ static unsigned encode(float x) { return __float_as_uint(x); }
};

template <>
struct Storage<F16> {
  using T = unsigned short;
  static constexpr int VEC = 8;
  __device__ static float decode(unsigned short b) { return f16_to_f32(b); }
  __device__ static unsigned short encode(float x) { return f32_to_f16(x); }
};

template <>
struct Storage<BF16> {
  using T = unsigned short;
  static constexpr int VEC = 8;
  __device__ static float decode(unsigned short b) { return bf16_to_f32(b); }
  __device__ static unsigned short encode(float x) { return f32_to_bf16(x); }
};

// Output rows: fp32 (default) or fp16.
template <int O>
struct Output;

template <>
struct Output<F32> {
  using T = float;
  __device__ static float make(float x) { return x; }
};

template <>
struct Output<F16> {
  using T = unsigned short;
  __device__ static unsigned short make(float x) { return f32_to_f16(x); }
};

__device__ __forceinline__ unsigned pack16(unsigned short lo, unsigned short hi) {
  return (unsigned)lo | ((unsigned)hi << 16);
}

// -- warp-wide row copies ----------------------------------------------------------------------
// Every lane of the warp calls these; lanes take 16-byte chunks (vec) or elements in turn.

// One 16-byte chunk of a stored row (Storage<S>::VEC elements) -> output elements at d,
// converted to O: 16 bytes out (8 for fp32 storage to fp16 output).
template <int S, int O>
__device__ __forceinline__ void store_chunk(const unsigned (&r)[4], typename Output<O>::T* d) {
  using St = Storage<S>;
  using Out = Output<O>;
  constexpr int V = St::VEC;
  float f[V];
  if constexpr (S == F32) {
#pragma unroll
    for (int j = 0; j < 4; ++j) f[j] = __uint_as_float(r[j]);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      f[2 * j] = St::decode((unsigned short)(r[j] & 0xFFFFu));
      f[2 * j + 1] = St::decode((unsigned short)(r[j] >> 16));
    }
  }
  if constexpr (O == F32) {
#pragma unroll
    for (int j = 0; j < V; j += 4)
      st_v4(d + j, __float_as_uint(f[j]), __float_as_uint(f[j + 1]), __float_as_uint(f[j + 2]),
            __float_as_uint(f[j + 3]));
  } else if constexpr (V == 4) {  // fp32 storage -> fp16 output: 8 bytes
    st_v2(d, pack16(Out::make(f[0]), Out::make(f[1])), pack16(Out::make(f[2]), Out::make(f[3])));
  } else if constexpr (S == F16) {  // fp16 -> fp16: the stored bits as they are
    st_v4(d, r[0], r[1], r[2], r[3]);
  } else {
    st_v4(d, pack16(Out::make(f[0]), Out::make(f[1])), pack16(Out::make(f[2]), Out::make(f[3])),
          pack16(Out::make(f[4]), Out::make(f[5])), pack16(Out::make(f[6]), Out::make(f[7])));
  }
}

// Stored row -> output row, reading with relaxed loads (the seqlock reader's side).
// vec: dim % Storage<S>::VEC == 0 and dst 16-byte aligned (src always is: slots are
// dim * itemsize apart from a 256-byte aligned base).
template <int S, int O>
__device__ __forceinline__ void read_row(const typename Storage<S>::T* src,
                                         typename Output<O>::T* dst, int dim, bool vec,
                                         int lane) {
  using St = Storage<S>;
  using Out = Output<O>;
  if (vec) {
    constexpr int V = St::VEC;
    const int chunks = dim / V;
    for (int c = lane; c < chunks; c += 32) {
      unsigned r[4];
      ld_relaxed_v4(src + (long long)c * V, r);
      store_chunk<S, O>(r, dst + (long long)c * V);
    }
  } else {
    for (int e = lane; e < dim; e += 32) dst[e] = Out::make(St::decode(ld_relaxed(src + e)));
  }
}

// fp32 input row -> stored row (the writer's side; callers hold the slot's lock).
// vec: dim % 4 == 0 and src 16-byte aligned.
template <int S>
__device__ __forceinline__ void write_row(typename Storage<S>::T* dst, const float* src, int dim,
                                          bool vec, int lane) {
  using St = Storage<S>;
  if (vec) {
    const int chunks = dim / 4;
    for (int c = lane; c < chunks; c += 32) {
      unsigned x[4];
      ld_v4(src + (long long)c * 4, x);
      typename St::T* d = dst + (long long)c * 4;
      if constexpr (S == F32) {
        st_v4(d, x[0], x[1], x[2], x[3]);
      } else {
        st_v2(d, pack16(St::encode(__uint_as_float(x[0])), St::encode(__uint_as_float(x[1]))),
              pack16(St::encode(__uint_as_float(x[2])), St::encode(__uint_as_float(x[3]))));
      }
    }
  } else {
    for (int e = lane; e < dim; e += 32) dst[e] = St::encode(src[e]);
  }
}

template <typename T>
__device__ __forceinline__ void zero_row(T* dst, int dim, int lane) {
  for (int e = lane; e < dim; e += 32) dst[e] = T(0);
}

// Grid-stride warp loop bounds: this warp's index, the number of warps, the lane.
__device__ __forceinline__ long long warp_id() {
  return ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
}
__device__ __forceinline__ long long warp_count() {
  return ((long long)gridDim.x * blockDim.x) >> 5;
}
__device__ __forceinline__ long long thread_id() {
  return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ long long thread_count() { return (long long)gridDim.x * blockDim.x; }

}  // namespace hps

#endif  // HPS_SLOT_CUH
