// A batch-1 decode weight chain in one persistent kernel: how close can the megakernel regime get to the
// bandwidth floor on this card? (issue 4's batch-1 target; benchmarks/NOTES-gpu.md, session 33)
//
// The model is Qwen3-0.6B's layer shape at one token, 28 layers, with attention left out (as
// profile_decode_chain.py --knockout does): per layer
//   A  qkv = W_qkv . bf16(rmsnorm(h) * w1)              4096 x 1024
//   C  h  += W_o . bf16(qkv[:2048])                       1024 x 2048   (attention's output stands in)
//   D  act = silu(W_g . n) * (W_u . n), n = bf16(rmsnorm(h) * w2)   2 x 3072 x 1024
//   E  h  += W_d . bf16(act)                              1024 x 3072
// One CTA per SM. A producer warp streams the CTA's weight units (16 KB: 8 rows x 1,024 columns, packed
// in the order the CTA consumes them) into a ring of shared-memory slots with cp.async.bulk, never waiting
// on the data: only on a free slot. So the HBM keeps streaming across op and layer boundaries. Eight
// consumer warps take an op's units (a warp a row), after waiting for the op before it through a global
// counter every CTA bumps when its share is written (the grid-wide dependency a kernel boundary gives).
//
// Variants (compile-time): BATCHED waits for all of an op's units, then runs every dot of a warp at once.
// LL replaces the counters with NCCL's low-latency protocol: each value goes out with its tag in one 8-byte
// word and readers poll the words themselves; LL_FENCE adds a fence after each such store, PAR_STORES has
// a warp's outputs stored by as many lanes (their fences side by side). L2_AHEAD=N also
// asks the L2 for the unit N further on; RING_SLOTS=N sets the ring's depth (12).
//
// Build: nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a [-DLL ...] chain.cu -o chain
// Run:   ./chain [out.json]     (checks against a kernel-per-op reference, then times three modes: the
//        chain, the chain without its waits, the weight stream alone; then one launch with clock stamps)
//        bash run.sh            (every variant, into $OUT or results/)
// H100 80GB HBM3, session 33 (results/megakernel_chain-h100.json): 20.8 us a layer with the counters, 23-34
// with LL, against the engine's kernel-per-op PDL chain at ~14.5 us a layer (profile_decode_chain.py
// --knockout) and a floor of 10.5. Kept as the measurement; not in the engine.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#define CHECK(x)                                                                                  \
  do {                                                                                            \
    cudaError_t e = (x);                                                                          \
    if (e != cudaSuccess) {                                                                       \
      fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e));           \
      exit(1);                                                                                    \
    }                                                                                             \
  } while (0)

constexpr int LAYERS = 28, H = 1024, QKV = 4096, QDIM = 2048, FF = 3072;
constexpr int UNIT_ROWS = 8, UNIT_K = 1024, UNIT_ELEMS = UNIT_ROWS * UNIT_K, UNIT_BYTES = UNIT_ELEMS * 2;
constexpr int CONSUMERS = 8, THREADS = (CONSUMERS + 1) * 32;
// Tiles an op has: 8 output rows each (D: 4 gate rows then the same 4 up rows), and 1,024-column chunks a tile.
constexpr int TILES_A = QKV / 8, TILES_C = H / 8, TILES_D = FF / 4, TILES_E = H / 8;
constexpr int CHUNKS_A = 1, CHUNKS_C = QDIM / UNIT_K, CHUNKS_D = 1, CHUNKS_E = FF / UNIT_K;
constexpr float EPS = 1e-6f;

struct Weights {  // logical, row-major, per layer
  __nv_bfloat16 *qkv, *o, *gate, *up, *down;
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n .reg .pred p;\n WAIT_%=:\n mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra WAIT_%=;\n}"
      ::"r"(smem_u32(bar)), "r"(parity) : "memory");
}
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
      ::"r"(smem_u32(dst)), "l"(src), "r"(bytes), "r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ int ld_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" ::"n"(CONSUMERS * 32)); }

__device__ __forceinline__ long long globaltimer() {
  long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ float silu(float x) { return x / (1.f + __expf(-x)); }

// A lane's share of the dot of a shared-memory row of 1,024 bf16 with 1,024 bf16 of x (shared): 4 x 8
// columns, 16-byte loads, conflict-free.
__device__ __forceinline__ float lane_dot(const __nv_bfloat16* w, const __nv_bfloat16* x, int lane) {
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < UNIT_K / 256; ++i) {
    const int k = i * 256 + lane * 8;
    uint4 wv = *reinterpret_cast<const uint4*>(w + k), xv = *reinterpret_cast<const uint4*>(x + k);
    const __nv_bfloat162* w2 = reinterpret_cast<const __nv_bfloat162*>(&wv);
    const __nv_bfloat162* x2 = reinterpret_cast<const __nv_bfloat162*>(&xv);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float2 a = __bfloat1622float2(w2[j]), b = __bfloat1622float2(x2[j]);
      acc = fmaf(a.x, b.x, acc);
      acc = fmaf(a.y, b.y, acc);
    }
  }
  return acc;
}

// The same dot, summed over the warp.
__device__ __forceinline__ float warp_dot(const __nv_bfloat16* w, const __nv_bfloat16* x, int lane) {
  float acc = lane_dot(w, x, lane);
#pragma unroll
  for (int o = 16; o; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  return acc;
}

struct Args {
  const __nv_bfloat16* packed;   // every CTA's units, CTA after CTA, each in its consumption order
  const long long* unit_start;   // (G + 1,) a CTA's first unit
  const float *w1, *w2;          // norm weights (H,)
  float* h;                      // residual stream (H,), fp32
  float *qkv, *act;              // op outputs
  int* counters;                 // (LAYERS * 4,) zeroed before a launch
  int wait;                      // 0: consumers skip the dependency waits (the stream and math alone)
  int compute;                   // 0: consumers only free the slots (the stream alone)
  int layers;
  long long *trace_clk, *trace_gt;
  unsigned long long *h_ll, *qkv_ll, *act_ll;  // LL: the same vectors as tagged words
  uint32_t epoch;                               // LL: this launch's number  // TRACE: (G, layers, 4 ops, 4 points) clock64 and globaltimer stamps
};

#ifndef RING_SLOTS
#define RING_SLOTS 12
#endif
struct Ring {
  static constexpr int SLOTS = RING_SLOTS;
  __nv_bfloat16 (*slot)[UNIT_ELEMS];
  uint64_t *full, *empty;
};

// An op's input x (N values, a thread's share in v) into shared memory as bf16, with the RMSNorm when w is
// given: one reduction.
template <int N>
__device__ __forceinline__ void put_x(const float (&v)[N / (CONSUMERS * 32)], const float* w, __nv_bfloat16* xs,
                                      float* red, int tid) {
  constexpr int PER = N / (CONSUMERS * 32);
  float rstd = 1.f;
  if (w != nullptr) {
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < PER; ++j) ss += v[j] * v[j];
#pragma unroll
    for (int o = 16; o; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if ((tid & 31) == 0) red[tid >> 5] = ss;
    consumers_sync();
    ss = 0.f;
#pragma unroll
    for (int i = 0; i < CONSUMERS; ++i) ss += red[i];
    rstd = rsqrtf(ss / N + EPS);
  }
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const int i = j * CONSUMERS * 32 + tid;
    xs[i] = __float2bfloat16(w != nullptr ? v[j] * rstd * w[i] : v[j]);
  }
  consumers_sync();
}

// x from global memory: every thread's loads issued at once (one L2 round trip).
template <int N>
__device__ void stage_x(const float* src, const float* w, __nv_bfloat16* xs, float* red, int tid) {
  float v[N / (CONSUMERS * 32)];
#pragma unroll
  for (int j = 0; j < N / (CONSUMERS * 32); ++j) v[j] = __ldcg(src + j * CONSUMERS * 32 + tid);
  put_x<N>(v, w, xs, red, tid);
}

// LL (NCCL's low-latency protocol): a value and its tag in one 8-byte word, stored and loaded whole, so a
// reader that sees the tag it expects has the value written with it: no fence, no counter, no flag. The
// tag names the launch, the layer and the op that wrote the word.
__device__ __forceinline__ void st_ll(unsigned long long* p, float v, uint32_t tag) {
  const unsigned long long word = (unsigned long long)tag << 32 | __float_as_uint(v);
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(word) : "memory");
#ifdef LL_FENCE  // push the word out now: the writer waits for it, its readers do not wait on a lazy flush
  asm volatile("fence.acq_rel.gpu;" ::: "memory");
#endif
}
__device__ __forceinline__ unsigned long long ld_word(const unsigned long long* p) {
  unsigned long long word;
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(word) : "l"(p) : "memory");
  return word;
}
__device__ __forceinline__ float ld_ll(const unsigned long long* p, uint32_t tag, bool wait) {
  unsigned long long word = ld_word(p);
  for (long long spins = 0; wait && (uint32_t)(word >> 32) != tag; word = ld_word(p)) {
    if (++spins > (1ll << 30)) asm volatile("trap;");
  }
  return __uint_as_float((uint32_t)word);
}
// x from LL words: all loads issued at once, then each word polled again until its tag is the one expected.
template <int N>
__device__ void stage_x_ll(const unsigned long long* src, uint32_t tag, bool wait, const float* w,
                           __nv_bfloat16* xs, float* red, int tid) {
  constexpr int PER = N / (CONSUMERS * 32);
  unsigned long long word[PER];
#pragma unroll
  for (int j = 0; j < PER; ++j) word[j] = ld_word(src + j * CONSUMERS * 32 + tid);
  float v[PER];
#pragma unroll
  for (int j = 0; j < PER; ++j)
    v[j] = wait && (uint32_t)(word[j] >> 32) != tag ? ld_ll(src + j * CONSUMERS * 32 + tid, tag, true)
                                                     : __uint_as_float((uint32_t)word[j]);
  put_x<N>(v, w, xs, red, tid);
}

__device__ __forceinline__ void wait_for(const Args& a, int counter, int tid) {
  if (a.wait && counter >= 0) {
    if (tid == 0) {
      const int target = gridDim.x;
      long long spins = 0;
      while (ld_acquire(a.counters + counter) < target) {
        if (++spins > (1ll << 31)) asm volatile("trap;");
      }
    }
    consumers_sync();
  }
}

__device__ __forceinline__ void signal(const Args& a, int counter, int tid) {
  consumers_sync();
  if (tid == 0) asm volatile("red.release.gpu.global.add.s32 [%0], 1;" ::"l"(a.counters + counter) : "memory");
}

// BATCHED: an op's units all waited for first, then every dot of the warp's rows at once (independent
// accumulators, one interleaved reduction), so the dots' latencies overlap instead of adding up.
template <int MAXT, int CHUNKS, class Out>
__device__ __forceinline__ void op_batched(const Ring& ring, long long& u, int nt, int warp, int lane,
                                           const __nv_bfloat16* xs, bool compute, Out out) {
  for (int i = 0; i < nt * CHUNKS; ++i) mbar_wait(ring.full + (u + i) % Ring::SLOTS, ((u + i) / Ring::SLOTS) & 1);
  if (compute) {
    float acc[MAXT];
#pragma unroll
    for (int i = 0; i < MAXT; ++i) {
      acc[i] = 0.f;
      if (i < nt)
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c)
          acc[i] += lane_dot(ring.slot[(u + i * CHUNKS + c) % Ring::SLOTS] + warp * UNIT_K, xs + c * UNIT_K, lane);
    }
#pragma unroll
    for (int o = 16; o; o >>= 1)
#pragma unroll
      for (int i = 0; i < MAXT; ++i) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], o);
#pragma unroll
    for (int i = 0; i < MAXT; ++i)
      if (i < nt && lane == 0) out(i, acc[i]);
  }
  __syncwarp();
  if (lane == 0)
    for (int i = 0; i < nt * CHUNKS; ++i) mbar_arrive(ring.empty + (u + i) % Ring::SLOTS);
  u += nt * CHUNKS;
}

// y[lane] from a register array (every lane holds all of y: warp_dot's sums are butterflies).
template <int N>
__device__ __forceinline__ float pick(const float (&y)[N], int lane) {
  float v = 0.f;
#pragma unroll
  for (int i = 0; i < N; ++i) v = lane == i ? y[i] : v;
  return v;
}

__device__ __forceinline__ int tiles_of(int tiles, int cta, int G) { return cta < tiles ? (tiles - cta + G - 1) / G : 0; }

__global__ void __launch_bounds__(THREADS, 1) chain_kernel(Args a) {
  extern __shared__ __align__(128) unsigned char smem[];
  Ring ring;
  ring.slot = reinterpret_cast<__nv_bfloat16(*)[UNIT_ELEMS]>(smem);
  ring.full = reinterpret_cast<uint64_t*>(smem + Ring::SLOTS * UNIT_BYTES);
  ring.empty = ring.full + Ring::SLOTS;
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(ring.empty + Ring::SLOTS);  // up to FF values
  float* red = reinterpret_cast<float*>(xs + FF);                                  // CONSUMERS floats
#ifdef BATCHED
  float* pair = red + CONSUMERS;  // D: (tiles, 8) gate and up products
#endif
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, cta = blockIdx.x, G = gridDim.x;
  if (threadIdx.x == 0) {
    for (int s = 0; s < Ring::SLOTS; ++s) {
      mbar_init(ring.full + s, 1);
      mbar_init(ring.empty + s, CONSUMERS);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  const long long first = a.unit_start[cta], units = a.unit_start[cta + 1] - first;

  if (warp == CONSUMERS) {  // the producer: every unit of this CTA, in order, as slots free up
    if (lane == 0) {
#ifdef L2_AHEAD
      for (long long u = 0; u < L2_AHEAD && u < units; ++u)
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(a.packed + (first + u) * UNIT_ELEMS),
                     "r"(UNIT_BYTES) : "memory");
#endif
      for (long long u = 0; u < units; ++u) {
        const int s = u % Ring::SLOTS;
        const uint32_t round = u / Ring::SLOTS;
        if (round > 0) mbar_wait(ring.empty + s, (round - 1) & 1);
#ifdef L2_AHEAD  // also ask the L2 for the unit L2_AHEAD further on, so a freed slot refills from the L2
        if (u + L2_AHEAD < units)
          asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(a.packed + (first + u + L2_AHEAD) * UNIT_ELEMS),
                       "r"(UNIT_BYTES) : "memory");
#endif
        mbar_expect_tx(ring.full + s, UNIT_BYTES);
        bulk_load(ring.slot[s], a.packed + (first + u) * UNIT_ELEMS, UNIT_BYTES, ring.full + s);
      }
    }
    return;
  }

  constexpr int MAX_A = (TILES_A + 127) / 128, MAX_D = (TILES_D + 127) / 128;  // tiles a CTA, G >= 128
  const int tid = threadIdx.x;
  long long u = 0;  // this CTA's next unit
  [[maybe_unused]] long long waited = 0;  // TRACE: cycles thread 0 spent waiting for units in the op
#define STAMP(op, k)                                                        \
  if (a.trace_clk != nullptr && tid == 0) {                                 \
    const long long at = (((long long)cta * a.layers + l) * 4 + (op)) * 8 + (k); \
    a.trace_clk[at] = clock64();                                            \
    a.trace_gt[at] = globaltimer();                                         \
    if ((k) == 3) a.trace_clk[at + 1] = waited, waited = 0;                 \
  }
#ifndef BATCHED
  auto take = [&](auto&& use) {  // waits for unit u, lets the consumer warps use it, frees its slot
    const int s = u % Ring::SLOTS;
    const long long t0 = clock64();
    mbar_wait(ring.full + s, (u / Ring::SLOTS) & 1);
    waited += clock64() - t0;
    if (a.compute) use(ring.slot[s] + warp * UNIT_K);
    __syncwarp();
    if (lane == 0) mbar_arrive(ring.empty + s);
    ++u;
  };
  // The two ways an op's result reaches the others: global vectors behind counters, or LL words.
#ifdef LL
  // tag(l, op): launch a.epoch, layer l (-1: the input h), op 0-3 (qkv, o, gate_up, down)
  auto tag = [&](int l, int op) { return a.epoch * 128u + (uint32_t)((l + 1) * 4 + op); };
  const bool wait = a.wait;
#define WAIT(counter)
#define STAGE(N, src, w, l, op) stage_x_ll<N>(a.src##_ll, tag(l, op), wait, w, xs, red, tid)
#define PUT(dst, i, v, l, op) st_ll(a.dst##_ll + (i), v, tag(l, op))
#define RESIDUAL(i, l, op) ld_ll(a.h_ll + (i), tag(l, op), wait)
#define SIGNAL(counter)
#else
#define WAIT(counter) wait_for(a, counter, tid)
#define STAGE(N, src, w, l, op) stage_x<N>(a.src, w, xs, red, tid)
#define PUT(dst, i, v, l, op) a.dst[i] = v
#define RESIDUAL(i, l, op) __ldcg(a.h + (i))
#define SIGNAL(counter) signal(a, counter, tid)
#endif
  for (int l = 0; l < a.layers; ++l) {
    [[maybe_unused]] const int base = l * 4;  // the counters of layer l (not with LL)
    // A: qkv = W_qkv . n(h)
    STAMP(0, 0);
    WAIT(l > 0 ? base - 1 : -1);
    STAMP(0, 1);
    if (a.compute) STAGE(H, h, a.w1, l - 1, 3);
    STAMP(0, 2);
    {  // the outputs are stored after the op's last unit: a slot's release (mbarrier.arrive) waits for the
       // warp's earlier stores, so a store before it would put an L2 write in every unit's path
      float y[MAX_A];
#pragma unroll
      for (int i = 0; i < MAX_A; ++i)
        if (cta + i * G < TILES_A) take([&](const __nv_bfloat16* w) { y[i] = warp_dot(w, xs, lane); });
      STAMP(0, 5);
#ifdef PAR_STORES  // lane i stores output i: one store (and with LL_FENCE one fence) for the warp's lanes at once
      const float mine = pick(y, lane);
      if (lane < MAX_A && cta + lane * G < TILES_A) PUT(qkv, (cta + lane * G) * 8 + warp, mine, l, 0);
#else
#pragma unroll
      for (int i = 0; i < MAX_A; ++i)
        if (cta + i * G < TILES_A && lane == 0) PUT(qkv, (cta + i * G) * 8 + warp, y[i], l, 0);
#endif
    }
    STAMP(0, 6);
    SIGNAL(base + 0);
    STAMP(0, 3);
    // C: h += W_o . qkv[:2048]
    STAMP(1, 0);
    WAIT(base + 0);
    STAMP(1, 1);
    if (a.compute) STAGE(QDIM, qkv, nullptr, l, 0);
    STAMP(1, 2);
    if (cta < TILES_C) {  // one tile a CTA (TILES_C <= G); the residual row loaded ahead of the units
      const float res = RESIDUAL(cta * 8 + warp, l - 1, 3);
      float y = 0.f;
      for (int c = 0; c < CHUNKS_C; ++c) take([&](const __nv_bfloat16* w) { y += warp_dot(w, xs + c * UNIT_K, lane); });
      STAMP(1, 5);
      if (lane == 0) PUT(h, cta * 8 + warp, res + y, l, 1);
    }
    STAMP(1, 6);
    SIGNAL(base + 1);
    STAMP(1, 3);
    // D: act = silu(W_g . n(h)) * (W_u . n(h)); a unit's rows 0-3 are gate rows, 4-7 the same up rows
    STAMP(2, 0);
    WAIT(base + 1);
    STAMP(2, 1);
    if (a.compute) STAGE(H, h, a.w2, l, 1);
    STAMP(2, 2);
    {
      float y[MAX_D];
#pragma unroll
      for (int i = 0; i < MAX_D; ++i)
        if (cta + i * G < TILES_D)
          take([&](const __nv_bfloat16* w) {
            if (warp < 4)
              y[i] = silu(__bfloat162float(__float2bfloat16(warp_dot(w, xs, lane)))) *
                     __bfloat162float(__float2bfloat16(warp_dot(w + 4 * UNIT_K, xs, lane)));
          });
      STAMP(2, 5);
#ifdef PAR_STORES
      const float mine = pick(y, lane);
      if (warp < 4 && lane < MAX_D && cta + lane * G < TILES_D) PUT(act, (cta + lane * G) * 4 + warp, mine, l, 2);
#else
#pragma unroll
      for (int i = 0; i < MAX_D; ++i)
        if (cta + i * G < TILES_D && warp < 4 && lane == 0) PUT(act, (cta + i * G) * 4 + warp, y[i], l, 2);
#endif
    }
    STAMP(2, 6);
    SIGNAL(base + 2);
    STAMP(2, 3);
    // E: h += W_d . act
    STAMP(3, 0);
    WAIT(base + 2);
    STAMP(3, 1);
    if (a.compute) STAGE(FF, act, nullptr, l, 2);
    STAMP(3, 2);
    if (cta < TILES_E) {
      const float res = RESIDUAL(cta * 8 + warp, l, 1);
      float y = 0.f;
      for (int c = 0; c < CHUNKS_E; ++c) take([&](const __nv_bfloat16* w) { y += warp_dot(w, xs + c * UNIT_K, lane); });
      STAMP(3, 5);
      if (lane == 0) PUT(h, cta * 8 + warp, res + y, l, 3);
    }
    STAMP(3, 6);
    SIGNAL(base + 3);
    STAMP(3, 3);
  }
#else
  for (int l = 0; l < a.layers; ++l) {
    const int base = l * 4;
    wait_for(a, l > 0 ? base - 1 : -1, tid);
    if (a.compute) stage_x<H>(a.h, a.w1, xs, red, tid);
    const int ta = tiles_of(TILES_A, cta, G);
    op_batched<MAX_A, 1>(ring, u, ta, warp, lane, xs, a.compute, [&](int i, float y) { a.qkv[(cta + i * G) * 8 + warp] = y; });
    signal(a, base + 0, tid);
    wait_for(a, base + 0, tid);
    if (a.compute) stage_x<QDIM>(a.qkv, nullptr, xs, red, tid);
    op_batched<1, CHUNKS_C>(ring, u, tiles_of(TILES_C, cta, G), warp, lane, xs, a.compute, [&](int, float y) {
      a.h[cta * 8 + warp] = __ldcg(a.h + cta * 8 + warp) + y; });
    signal(a, base + 1, tid);
    wait_for(a, base + 1, tid);
    if (a.compute) stage_x<H>(a.h, a.w2, xs, red, tid);
    const int td = tiles_of(TILES_D, cta, G);
    op_batched<MAX_D, 1>(ring, u, td, warp, lane, xs, a.compute, [&](int i, float y) { pair[i * 8 + warp] = y; });
    consumers_sync();
    if (a.compute && tid < td * 4) {
      const int i = tid / 4, r = tid % 4;
      a.act[(cta + i * G) * 4 + r] = silu(__bfloat162float(__float2bfloat16(pair[i * 8 + r]))) *
                                     __bfloat162float(__float2bfloat16(pair[i * 8 + 4 + r]));
    }
    signal(a, base + 2, tid);
    wait_for(a, base + 2, tid);
    if (a.compute) stage_x<FF>(a.act, nullptr, xs, red, tid);
    op_batched<1, CHUNKS_E>(ring, u, tiles_of(TILES_E, cta, G), warp, lane, xs, a.compute, [&](int, float y) {
      a.h[cta * 8 + warp] = __ldcg(a.h + cta * 8 + warp) + y; });
    signal(a, base + 3, tid);
  }
#endif
}

// ---- the reference: a kernel per op, a warp per output row, the same roundings ----
__global__ void ref_norm(const float* src, const float* w, int n, __nv_bfloat16* out) {  // one block
  __shared__ float red[32];
  float ss = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) ss += w ? src[i] * src[i] : 0.f;
  for (int o = 16; o; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = ss;
  __syncthreads();
  ss = 0.f;
  for (int i = 0; i < blockDim.x / 32; ++i) ss += red[i];
  const float rstd = w ? rsqrtf(ss / n + EPS) : 1.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = __float2bfloat16(w ? src[i] * rstd * w[i] : src[i]);
}
__global__ void ref_gemv(const __nv_bfloat16* W, const __nv_bfloat16* x, int n, int k, float* out, int add) {
  const int row = blockIdx.x * 8 + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= n) return;
  float acc = 0.f;
  for (int c = 0; c < k; c += UNIT_K) acc += warp_dot(W + (long long)row * k + c, x + c, lane);
  if (lane == 0) out[row] = add ? out[row] + acc : acc;
}
__global__ void ref_silu(const float* g, const float* u, float* act) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < FF) act[i] = silu(__bfloat162float(__float2bfloat16(g[i]))) * __bfloat162float(__float2bfloat16(u[i]));
}

__global__ void fill_random(__nv_bfloat16* p, long long n, uint32_t seed, float scale) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    uint32_t x = (uint32_t)i * 2654435761u ^ seed * 0x9E3779B9u ^ (uint32_t)(i >> 32) * 0x85EBCA6Bu;
    x ^= x >> 16; x *= 0x7FEB352Du; x ^= x >> 15; x *= 0x846CA68Bu; x ^= x >> 16;
    p[i] = __float2bfloat16(scale * ((x >> 8) * (1.f / 16777216.f) * 2.f - 1.f));
  }
}
// LL: the input h as tagged words (tag(-1, 3) of the launch).
__global__ void ll_init(const float* h0, unsigned long long* h_ll, uint32_t tag) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < H) h_ll[i] = (unsigned long long)tag << 32 | __float_as_uint(h0[i]);
}

// Copies unit descriptors' rows from the logical weights into the packed stream: a block a unit.
__global__ void pack_units(const int4* desc, const Weights* layers, __nv_bfloat16* packed) {
  const int4 d = desc[blockIdx.x];  // (layer * 4 + op, tile, chunk, -)
  const Weights w = layers[d.x / 4];
  __nv_bfloat16* dst = packed + (long long)blockIdx.x * UNIT_ELEMS;
  for (int r = 0; r < UNIT_ROWS; ++r) {
    const __nv_bfloat16* src;
    switch (d.x % 4) {
      case 0: src = w.qkv + (long long)(d.y * 8 + r) * H; break;
      case 1: src = w.o + (long long)(d.y * 8 + r) * QDIM + d.z * UNIT_K; break;
      case 2: src = (r < 4 ? w.gate : w.up) + (long long)(d.y * 4 + r % 4) * H; break;
      default: src = w.down + (long long)(d.y * 8 + r) * FF + d.z * UNIT_K; break;
    }
    for (int k = threadIdx.x; k < UNIT_K; k += blockDim.x) dst[r * UNIT_K + k] = src[k];
  }
}

int main(int argc, char** argv) {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const int G = prop.multiProcessorCount;
  if (G < 128) {
    fprintf(stderr, "needs 128 or more SMs\n");
    return 1;
  }
  // Weights, random in [-1, 1) / sqrt(K).
  std::vector<Weights> hw(LAYERS);
  const long long per_layer = (long long)QKV * H + (long long)H * QDIM + 2ll * FF * H + (long long)H * FF;
  __nv_bfloat16* all;
  CHECK(cudaMalloc(&all, per_layer * LAYERS * 2));
  for (int l = 0; l < LAYERS; ++l) {
    __nv_bfloat16* p = all + per_layer * l;
    hw[l] = {p, p + (long long)QKV * H, p + (long long)QKV * H + (long long)H * QDIM, nullptr, nullptr};
    hw[l].up = hw[l].gate + (long long)FF * H;
    hw[l].down = hw[l].up + (long long)FF * H;
    fill_random<<<1024, 256>>>(hw[l].qkv, (long long)QKV * H, 10 * l + 1, 1.f / 32);
    fill_random<<<1024, 256>>>(hw[l].o, (long long)H * QDIM, 10 * l + 2, 1.f / 45.25f);
    fill_random<<<1024, 256>>>(hw[l].gate, (long long)FF * H, 10 * l + 3, 1.f / 32);
    fill_random<<<1024, 256>>>(hw[l].up, (long long)FF * H, 10 * l + 4, 1.f / 32);
    fill_random<<<1024, 256>>>(hw[l].down, (long long)H * FF, 10 * l + 5, 1.f / 55.4f);
  }
  CHECK(cudaGetLastError());
  Weights* dlayers;
  CHECK(cudaMalloc(&dlayers, sizeof(Weights) * LAYERS));
  CHECK(cudaMemcpy(dlayers, hw.data(), sizeof(Weights) * LAYERS, cudaMemcpyHostToDevice));
  // Units per CTA in consumption order.
  std::vector<int4> desc;
  std::vector<long long> start(G + 1, 0);
  for (int c = 0; c < G; ++c) {
    start[c] = desc.size();
    for (int l = 0; l < LAYERS; ++l) {
      const int tiles[4] = {TILES_A, TILES_C, TILES_D, TILES_E}, chunks[4] = {CHUNKS_A, CHUNKS_C, CHUNKS_D, CHUNKS_E};
      for (int op = 0; op < 4; ++op)
        for (int t = c; t < tiles[op]; t += G)
          for (int ch = 0; ch < chunks[op]; ++ch) desc.push_back({l * 4 + op, t, ch, 0});
    }
  }
  start[G] = desc.size();
  const long long total_units = desc.size();
  __nv_bfloat16* packed;
  int4* ddesc;
  long long* dstart;
  CHECK(cudaMalloc(&packed, total_units * UNIT_BYTES));
  CHECK(cudaMalloc(&ddesc, total_units * sizeof(int4)));
  CHECK(cudaMalloc(&dstart, (G + 1) * sizeof(long long)));
  CHECK(cudaMemcpy(ddesc, desc.data(), total_units * sizeof(int4), cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(dstart, start.data(), (G + 1) * sizeof(long long), cudaMemcpyHostToDevice));
  pack_units<<<total_units, 256>>>(ddesc, dlayers, packed);
  CHECK(cudaGetLastError());

  float *w1, *w2, *h0, *h, *qkv, *act, *g, *up, *href;
  __nv_bfloat16* xb;
  int* counters;
  CHECK(cudaMalloc(&w1, H * 4)); CHECK(cudaMalloc(&w2, H * 4)); CHECK(cudaMalloc(&h0, H * 4));
  CHECK(cudaMalloc(&h, H * 4)); CHECK(cudaMalloc(&href, H * 4)); CHECK(cudaMalloc(&qkv, QKV * 4));
  CHECK(cudaMalloc(&act, FF * 4)); CHECK(cudaMalloc(&g, FF * 4)); CHECK(cudaMalloc(&up, FF * 4));
  CHECK(cudaMalloc(&xb, FF * 2)); CHECK(cudaMalloc(&counters, LAYERS * 4 * 4));
  {
    std::vector<float> v(H);
    srand(1);
    for (auto& x : v) x = 0.5f + (rand() / (float)RAND_MAX);
    CHECK(cudaMemcpy(w1, v.data(), H * 4, cudaMemcpyHostToDevice));
    for (auto& x : v) x = 0.5f + (rand() / (float)RAND_MAX);
    CHECK(cudaMemcpy(w2, v.data(), H * 4, cudaMemcpyHostToDevice));
    for (auto& x : v) x = 2.f * (rand() / (float)RAND_MAX) - 1.f;
    CHECK(cudaMemcpy(h0, v.data(), H * 4, cudaMemcpyHostToDevice));
  }
  // Reference.
  CHECK(cudaMemcpy(href, h0, H * 4, cudaMemcpyDeviceToDevice));
  for (int l = 0; l < LAYERS; ++l) {
    ref_norm<<<1, 1024>>>(href, w1, H, xb);
    ref_gemv<<<QKV / 8, 256>>>(hw[l].qkv, xb, QKV, H, qkv, 0);
    ref_norm<<<1, 1024>>>(qkv, nullptr, QDIM, xb);
    ref_gemv<<<H / 8, 256>>>(hw[l].o, xb, H, QDIM, href, 1);
    ref_norm<<<1, 1024>>>(href, w2, H, xb);
    ref_gemv<<<FF / 8, 256>>>(hw[l].gate, xb, FF, H, g, 0);
    ref_gemv<<<FF / 8, 256>>>(hw[l].up, xb, FF, H, up, 0);
    ref_silu<<<FF / 256, 256>>>(g, up, act);
    ref_norm<<<1, 1024>>>(act, nullptr, FF, xb);
    ref_gemv<<<H / 8, 256>>>(hw[l].down, xb, H, FF, href, 1);
  }
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());

  const size_t smem = Ring::SLOTS * UNIT_BYTES + 2 * Ring::SLOTS * 8 + FF * 2 + CONSUMERS * 4 + 8 * 8 * 4 + 64;
  CHECK(cudaFuncSetAttribute(chain_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  Args args{packed, dstart, w1, w2, h, qkv, act, counters, 1, 1, LAYERS, nullptr, nullptr, nullptr, nullptr, nullptr, 0};
  unsigned long long *h_ll, *qkv_ll, *act_ll;
  CHECK(cudaMalloc(&h_ll, H * 8)); CHECK(cudaMalloc(&qkv_ll, QKV * 8)); CHECK(cudaMalloc(&act_ll, FF * 8));
  CHECK(cudaMemset(h_ll, 0, H * 8)); CHECK(cudaMemset(qkv_ll, 0, QKV * 8)); CHECK(cudaMemset(act_ll, 0, FF * 8));
  args.h_ll = h_ll; args.qkv_ll = qkv_ll; args.act_ll = act_ll; args.epoch = 0;
  auto reset = [&]() {  // before a launch, outside its timing
    CHECK(cudaMemsetAsync(counters, 0, LAYERS * 4 * 4));
    ++args.epoch;
    ll_init<<<H / 256, 256>>>(h0, h_ll, args.epoch * 128u + 3u);
  };
  auto launch = [&](int wait) {
    reset();
    CHECK(cudaMemcpyAsync(h, h0, H * 4, cudaMemcpyDeviceToDevice));
    args.wait = wait;
    void* params[] = {&args};
    CHECK(cudaLaunchCooperativeKernel((void*)chain_kernel, G, THREADS, params, smem, 0));
  };
  launch(1);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  std::vector<float> out(H), ref(H);
#ifdef LL
  {
    std::vector<unsigned long long> words(H);
    CHECK(cudaMemcpy(words.data(), h_ll, H * 8, cudaMemcpyDeviceToHost));
    for (int i = 0; i < H; ++i) {
      const uint32_t bits = (uint32_t)words[i];
      memcpy(&out[i], &bits, 4);
      if ((words[i] >> 32) != args.epoch * 128ull + LAYERS * 4 + 3) out[i] = NAN;  // a word the last op missed
    }
  }
#else
  CHECK(cudaMemcpy(out.data(), h, H * 4, cudaMemcpyDeviceToHost));
#endif
  CHECK(cudaMemcpy(ref.data(), href, H * 4, cudaMemcpyDeviceToHost));
  double num = 0, den = 0;
  bool finite = true;
  for (int i = 0; i < H; ++i) {
    num += (out[i] - ref[i]) * (double)(out[i] - ref[i]);
    den += ref[i] * (double)ref[i];
    finite &= std::isfinite(out[i]);
  }
  const double rel = std::sqrt(num / den);
  printf("check: |out - ref| / |ref| = %.3e (ref norm %.3f)%s\n", rel, std::sqrt(den), finite ? "" : " NOT FINITE");

  // Timing: events around each launch alone (the counters' reset before it), median of 50.
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0)); CHECK(cudaEventCreate(&e1));
  auto time_chain = [&](int wait, int compute = 1) {
    std::vector<float> ms;
    args.compute = compute;
    for (int i = 0; i < 55; ++i) {
      reset();
      args.wait = wait;
      void* params[] = {&args};
      CHECK(cudaEventRecord(e0));
      CHECK(cudaLaunchCooperativeKernel((void*)chain_kernel, G, THREADS, params, smem, 0));
      CHECK(cudaEventRecord(e1));
      CHECK(cudaEventSynchronize(e1));
      float t;
      CHECK(cudaEventElapsedTime(&t, e0, e1));
      if (i >= 5) ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    return 1e3 * ms[ms.size() / 2];
  };
  // The copy ceiling: a device-to-device copy of the packed weights' size, bytes read + written.
  const double bytes = (double)total_units * UNIT_BYTES;
  void* scratch;
  CHECK(cudaMalloc(&scratch, (size_t)bytes));
  std::vector<float> cms;
  for (int i = 0; i < 12; ++i) {
    CHECK(cudaEventRecord(e0));
    CHECK(cudaMemcpyAsync(scratch, packed, (size_t)bytes, cudaMemcpyDeviceToDevice));
    CHECK(cudaEventRecord(e1));
    CHECK(cudaEventSynchronize(e1));
    float t;
    CHECK(cudaEventElapsedTime(&t, e0, e1));
    if (i >= 2) cms.push_back(t);
  }
  std::sort(cms.begin(), cms.end());
  const double copy_gbs = 2 * bytes / (cms[cms.size() / 2] * 1e-3) / 1e9;
  const double floor_us = bytes / (copy_gbs * 1e9) * 1e6;
  const double chain_us = time_chain(1), nowait_us = time_chain(0), stream_us = time_chain(0, 0);
  printf("card %s, %d SMs; weights %.1f MB over %d layers\n", prop.name, G, bytes / 1e6, LAYERS);
  printf("copy %.0f GB/s -> floor %.1f us (%.2f a layer)\n", copy_gbs, floor_us, floor_us / LAYERS);
  printf("chain, grid-wide waits: %.1f us (%.2f a layer, %.2fx the floor)\n", chain_us, chain_us / LAYERS,
         chain_us / floor_us);
  printf("chain, no waits:        %.1f us (%.2f a layer, %.2fx the floor)\n", nowait_us, nowait_us / LAYERS,
         nowait_us / floor_us);
  printf("stream alone:           %.1f us (%.2f a layer, %.2fx the floor)\n", stream_us, stream_us / LAYERS,
         stream_us / floor_us);
#ifndef BATCHED
  // One traced launch (sequential consumers): each op's phases, medians over CTAs and layers 2-27.
  {
    const long long n = (long long)G * LAYERS * 32;
    long long *clk, *gt;
    CHECK(cudaMalloc(&clk, n * 8)); CHECK(cudaMalloc(&gt, n * 8));
    CHECK(cudaMemset(clk, 0, n * 8)); CHECK(cudaMemset(gt, 0, n * 8));
    args.trace_clk = clk; args.trace_gt = gt; args.compute = 1;
    launch(1);
    CHECK(cudaDeviceSynchronize());
    args.trace_clk = args.trace_gt = nullptr;
    std::vector<long long> c(n), g(n);
    CHECK(cudaMemcpy(c.data(), clk, n * 8, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(g.data(), gt, n * 8, cudaMemcpyDeviceToHost));
    auto at = [&](int cta, int l, int op, int k) { return (((long long)cta * LAYERS + l) * 4 + op) * 8 + k; };
    // cycles per ns on CTA 0 over the whole run
    const double cyc_per_ns = double(c[at(0, LAYERS - 1, 3, 3)] - c[at(0, 0, 0, 0)]) /
                              double(g[at(0, LAYERS - 1, 3, 3)] - g[at(0, 0, 0, 0)]);
    auto med = [](std::vector<double> v) { std::sort(v.begin(), v.end()); return v.empty() ? 0. : v[v.size() / 2]; };
    const char* names[4] = {"qkv", "o", "gate_up", "down"};
    printf("traced (sequential consumers), SM clock %.2f GHz; us, median over CTAs and layers 2-27:\n", cyc_per_ns);
    printf("op       wait   stage  units (waiting for them)  stores  signal  wake-after-last-signal(globaltimer)\n");
    for (int op = 0; op < 4; ++op) {
      std::vector<double> w, st, un, wake, uw, so, sg;
      for (int l = 2; l < LAYERS; ++l) {
        // the op before: its last CTA's signal (globaltimer)
        const int pl = op == 0 ? l - 1 : l, pop = op == 0 ? 3 : op - 1;
        long long last = 0;
        for (int cta = 0; cta < G; ++cta) last = std::max(last, g[at(cta, pl, pop, 3)]);
        for (int cta = 0; cta < G; ++cta) {
          w.push_back((c[at(cta, l, op, 1)] - c[at(cta, l, op, 0)]) / cyc_per_ns / 1e3);
          st.push_back((c[at(cta, l, op, 2)] - c[at(cta, l, op, 1)]) / cyc_per_ns / 1e3);
          un.push_back((c[at(cta, l, op, 5)] - c[at(cta, l, op, 2)]) / cyc_per_ns / 1e3);
          so.push_back((c[at(cta, l, op, 6)] - c[at(cta, l, op, 5)]) / cyc_per_ns / 1e3);
          sg.push_back((c[at(cta, l, op, 3)] - c[at(cta, l, op, 6)]) / cyc_per_ns / 1e3);
          wake.push_back((g[at(cta, l, op, 1)] - last) / 1e3);
          uw.push_back(c[at(cta, l, op, 4)] / cyc_per_ns / 1e3);
        }
      }
      printf("%-8s %5.2f  %5.2f  %5.2f (%5.2f)            %5.2f   %5.2f   %5.2f\n", names[op], med(w), med(st), med(un), med(uw), med(so), med(sg), med(wake));
    }
  }
#endif
  if (argc > 1) {
    FILE* f = fopen(argv[1], "w");
    fprintf(f,
            "{\"card\": \"%s\", \"sms\": %d, \"layers\": %d, \"weight_bytes\": %.0f, \"copy_gb_per_s\": %.1f, "
            "\"floor_us\": %.2f, \"chain_us\": %.2f, \"chain_no_waits_us\": %.2f, \"stream_us\": %.2f, \"check_rel_err\": %.3e}\n",
            prop.name, G, LAYERS, bytes, copy_gbs, floor_us, chain_us, nowait_us, stream_us, rel);
    fclose(f);
  }
  return rel < 1e-2 && finite ? 0 : 1;
}
