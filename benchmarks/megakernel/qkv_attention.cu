// One decode token's attention block up to o_proj in one kernel of thread-block clusters (Hopper, sm_90):
// [x + residual ->] rmsnorm -> qkv_proj -> Qwen3's q/k RMSNorm -> RoPE -> the new k and v into the paged cache
// -> attention over the cache -> the merge of the key splits. qkv_attention.py beside it compiles, checks and
// times it (session 34: no faster than the engine's three Triton kernels; benchmarks/NOTES-gpu.md).
//
// A cluster of CLUSTER CTAs serves one KV head. Each CTA takes R / CLUSTER of that head's R = (GROUP + 2) *
// HEAD_DIM rows of W_qkv ([its GROUP q heads | k | v]), streamed into shared memory by a bulk copy before
// the PDL wait, with the first two tiles of its share of the cached keys. After the wait the CTAs push their
// rows of q, k and v, then their softmax partials, into each other's shared memory (st.shared::cluster), each
// time behind a cluster barrier: the links that otherwise take a kernel boundary each.
//
// Compile-time: HEAD_DIM (128), GROUP (q heads per KV head), CLUSTER, HIDDEN (K of W_qkv), HAS_NORM
// (Qwen3's q/k norm), COS_SIN_BF16 (the RoPE table's dtype; fp32 otherwise), TRACE (clock64 stamps of the
// phases, by each CTA's first thread, into an extra int64 (CTAs, 16) argument).

typedef unsigned short bf16_t;
typedef unsigned int u32;

#define D HEAD_DIM
#define R ((GROUP + 2) * D)
#define RPC (R / CLUSTER)
#define THREADS 256
#define WARPS (THREADS / 32)
#define RPW (RPC / WARPS)
#define NEG_INF (-__int_as_float(0x7f800000))
#define TILE 32             // keys a tile: a thread per (key, 16 dims) for the scores
#define XV (HIDDEN / 256)   // 16-byte vectors of x a lane holds

#if COS_SIN_BF16
typedef bf16_t cs_t;
#else
typedef float cs_t;
#endif

static_assert(D == 128, "a lane holds 4 of a head's 128 dims");
static_assert(R % CLUSTER == 0 && RPC % WARPS == 0, "whole rows a warp");
static_assert(HIDDEN % 256 == 0, "16-byte vectors across a warp");
static_assert(TILE * 8 == THREADS, "a thread per (key, 16 dims)");
static_assert(GROUP * D % CLUSTER == 0, "the merge's outputs split evenly over the cluster");
#define OPC (GROUP * D / CLUSTER)  // outputs each CTA merges

__device__ __forceinline__ float bf2f(bf16_t h) { return __uint_as_float(((u32)h) << 16); }
__device__ __forceinline__ bf16_t f2bf(float f) {
    bf16_t h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float round_bf(float f) { return bf2f(f2bf(f)); }
__device__ __forceinline__ float cs_load(const cs_t* p) {
#if COS_SIN_BF16
    return bf2f(*p);
#else
    return *p;
#endif
}
__device__ __forceinline__ float exp2_approx(float x) {  // as Triton's tl.exp2: exp2(-inf) = 0
    float y;
    asm("ex2.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
__device__ __forceinline__ u32 cluster_rank() {
    u32 r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
// Every thread of the cluster: its earlier writes to shared memory are seen by the others' later reads.
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
__device__ __forceinline__ void st_cluster(float* local, u32 rank, float v) {  // into the same word of CTA `rank`
    u32 remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_addr(local)), "r"(rank));
    asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(remote), "f"(v) : "memory");
}
__device__ __forceinline__ void mbar_init(u32 bar) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_expect(u32 bar, u32 bytes) {  // the one arrival, and the bytes to come
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    u32 done = 0;
    while (!done)
        asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                     : "=r"(done) : "r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void copy16_async(void* dst, const void* src) {  // one thread, 16 bytes, no registers
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void commit_copies() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void wait_copies() {  // all but the N latest groups have landed
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, u32 bytes, u32 bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
__device__ __forceinline__ float dot8(uint4 a, uint4 b) {  // 8 bf16 pairs
    const u32 av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        s += __uint_as_float(av[i] << 16) * __uint_as_float(bv[i] << 16);
        s += __uint_as_float(av[i] & 0xffff0000u) * __uint_as_float(bv[i] & 0xffff0000u);
    }
    return s;
}

// Row i of a KV head's [q heads | k | v] block in W_qkv ((H + 2 Hkv) * D, HIDDEN).
__device__ __forceinline__ long long w_row(int i, int kv_head, int num_heads, int num_kv_heads) {
    if (i < GROUP * D) return (long long)kv_head * GROUP * D + i;
    if (i < (GROUP + 1) * D) return (long long)num_heads * D + kv_head * D + (i - GROUP * D);
    return (long long)(num_heads + num_kv_heads) * D + kv_head * D + (i - (GROUP + 1) * D);
}

struct Keys {  // one CTA's share of a seq's keys, and where they live
    const bf16_t *k_cache, *v_cache;
    const int* block_table;
    long long kb, ks, vb, vs, head_k, head_v;  // strides (elements); head_*: the KV head's offset
    int page_size, start, end, new_pos;
};

// Tile t of the CTA's keys into buf ((2, TILE, D): k then v) by 16-byte async copies, four a thread, as one
// commit group (empty past the end): every cached key but the step's new one, which the kernel writes itself.
__device__ __forceinline__ void issue_tile(const Keys& s, int t, bf16_t* buf, int tid) {
    const int first = s.start + t * TILE;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int c = tid + i * THREADS, v = c / (TILE * 16), j = (c / 16) % TILE, part = c % 16;
        const int pos = first + j;
        if (pos < s.end && pos != s.new_pos) {
            const long long page = s.block_table[pos / s.page_size], slot = pos % s.page_size;
            const bf16_t* src = v ? s.v_cache + page * s.vb + slot * s.vs + s.head_v
                                  : s.k_cache + page * s.kb + slot * s.ks + s.head_k;
            copy16_async(buf + (v * TILE + j) * D + part * 8, src + part * 8);
        }
    }
    commit_copies();
}

#if TRACE
#define STAMP(i) do { if (tid == 0) trace[blockIdx.x * 16 + (i)] = clock64(); } while (0)
#else
#define STAMP(i) do {} while (0)
#endif

extern "C" __global__ void __launch_bounds__(THREADS, 1)
qkv_attention_kernel(const bf16_t* __restrict__ x, const bf16_t* __restrict__ add, bf16_t* __restrict__ stream,
                     const bf16_t* __restrict__ norm_w, float norm_eps,
                     const bf16_t* __restrict__ w, const bf16_t* __restrict__ q_norm_w,
                     const bf16_t* __restrict__ k_norm_w, float qk_eps, const cs_t* __restrict__ cos_sin,
                     long long stride_cs, bf16_t* k_cache, bf16_t* v_cache, long long stride_kb, long long stride_ks,
                     long long stride_kh, long long stride_vb, long long stride_vs, long long stride_vh,
                     const int* __restrict__ block_table, const int* __restrict__ context_lens,
                     const long long* __restrict__ slot_mapping, int page_size, float qk_scale_log2,
                     bf16_t* __restrict__ out, int num_heads, int num_kv_heads
#if TRACE
                     , long long* trace
#endif
                     ) {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    extern __shared__ __align__(128) unsigned char smem[];
    bf16_t* w_s = (bf16_t*)smem;                           // (RPC, HIDDEN): this CTA's rows of W_qkv
    bf16_t* kv_s = w_s + RPC * HIDDEN;                     // 2 buffers of (2, TILE, D): k, v
    float* part_s = (float*)(kv_s + 4 * TILE * D);         // (RPC,): this CTA's rows of q, k, v
    float* full_s = part_s + RPC;                          // (R,): every CTA's, pushed by each
    float* q_s = full_s + R;                               // (GROUP, D): q normalized and rotated
    float* new_s = q_s + GROUP * D;                        // (2, D): the new token's k and v
    float* score_s = new_s + 2 * D;                        // (GROUP, TILE): scores, then exp2(score - max)
    float* m_s = score_s + GROUP * TILE;                   // (2, GROUP): running max, by tile parity
    float* alpha_s = m_s + 2 * GROUP;                      // (GROUP,): the tile's rescale of the old sums
    float* merge_s = alpha_s + GROUP;                      // (CLUSTER, OPC): every CTA's partials of my outputs
    float* lse_s = merge_s + GROUP * D;                    // (CLUSTER, GROUP): every CTA's log2-sum-exps
    unsigned long long* bar = (unsigned long long*)(((unsigned long long)(lse_s + CLUSTER * GROUP) + 7) & ~7ull);

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    STAMP(0);
    const u32 rank = cluster_rank();
    const int kv_head = blockIdx.x / CLUSTER;
    const u32 bar_w = smem_addr(bar);
    if (tid == 0) {
        mbar_init(bar_w);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();

    // Before the wait: what no kernel of this step writes (weights, step inputs, keys older than the new one).
    if (warp == 0) {  // the CTA's rows of W: one copy where they are contiguous (D a multiple of RPC)
        if (lane == 0) mbar_expect(bar_w, RPC * HIDDEN * 2);
        __syncwarp();
        const long long row0 = w_row(rank * RPC, kv_head, num_heads, num_kv_heads);
        if (D % RPC == 0) {
            if (lane == 0) bulk_copy(w_s, w + row0 * HIDDEN, RPC * HIDDEN * 2, bar_w);
        } else {
            for (int i = lane; i < RPC; i += 32)
                bulk_copy(w_s + i * HIDDEN, w + w_row(rank * RPC + i, kv_head, num_heads, num_kv_heads) * HIDDEN,
                          HIDDEN * 2, bar_w);
        }
    }
    const int ctx = context_lens[0];
    const int split = (ctx + CLUSTER - 1) / CLUSTER;
    Keys keys{k_cache, v_cache, block_table, stride_kb, stride_ks, stride_vb, stride_vs,
              kv_head * stride_kh, kv_head * stride_vh, page_size, 0, 0, ctx - 1};
    keys.start = min((int)rank * split, ctx);
    keys.end = min(keys.start + split, ctx);
    const int num_tiles = (keys.end - keys.start + TILE - 1) / TILE;
    issue_tile(keys, 0, kv_s, tid);
    issue_tile(keys, 1, kv_s + 2 * TILE * D, tid);
    uint4 nw[XV];  // the norm weight in the lane's K layout: 8 elements at lane * 8 + i * 256
#pragma unroll
    for (int i = 0; i < XV; ++i) nw[i] = *(const uint4*)(norm_w + lane * 8 + i * 256);
    const int pos = max(ctx - 1, 0);
    const float c0 = cs_load(cos_sin + pos * stride_cs + lane), c1 = cs_load(cos_sin + pos * stride_cs + lane + 32);
    const float s0 = cs_load(cos_sin + pos * stride_cs + D / 2 + lane);
    const float s1 = cs_load(cos_sin + pos * stride_cs + D / 2 + lane + 32);
#if HAS_NORM
    float hw[4] = {1.f, 1.f, 1.f, 1.f};  // the q or k norm weight of the head this warp rotates
    if (warp <= GROUP) {
        const bf16_t* nwh = warp < GROUP ? q_norm_w : k_norm_w;
#pragma unroll
        for (int i = 0; i < 4; ++i) hw[i] = bf2f(nwh[lane + 32 * i]);
    }
#endif
    const long long slot = slot_mapping[0];
    STAMP(1);

    asm volatile("griddepcontrol.wait;" ::: "memory");
    STAMP(2);

    // rmsnorm(s) in every warp, in the lane's K layout: s = x, or x + add rounded (which CTA 0 stores to
    // `stream`); the staged gemv's rounding (an fp64 sum of squares; s * rstd * w rounded to bf16).
    float xs[XV][8];
    double ss = 0.0;
#pragma unroll
    for (int i = 0; i < XV; ++i) {
        const int k0 = lane * 8 + i * 256;
        const uint4 xq = *(const uint4*)(x + k0);
        const u32 xw[4] = {xq.x, xq.y, xq.z, xq.w};
        u32 aw[4] = {0, 0, 0, 0};
        if (add != nullptr) {
            const uint4 aq = *(const uint4*)(add + k0);
            aw[0] = aq.x, aw[1] = aq.y, aw[2] = aq.z, aw[3] = aq.w;
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            float v = bf2f((bf16_t)(xw[e / 2] >> (16 * (e % 2))));
            if (add != nullptr) v = round_bf(v + bf2f((bf16_t)(aw[e / 2] >> (16 * (e % 2)))));
            xs[i][e] = v;
            ss += (double)v * (double)v;
        }
        if (add != nullptr && blockIdx.x == 0 && warp == 0) {
            u32 packed[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) packed[e] = (u32)f2bf(xs[i][2 * e]) | ((u32)f2bf(xs[i][2 * e + 1]) << 16);
            *(uint4*)(stream + k0) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
        }
    }
    const float rstd = rsqrtf((float)(warp_sum_f64(ss) / HIDDEN) + norm_eps);
    uint4 xn[XV];
#pragma unroll
    for (int i = 0; i < XV; ++i) {
        const u32 ww[4] = {nw[i].x, nw[i].y, nw[i].z, nw[i].w};
        u32 packed[4];
#pragma unroll
        for (int e = 0; e < 4; ++e)
            packed[e] = (u32)f2bf(xs[i][2 * e] * rstd * __uint_as_float(ww[e] << 16))
                        | ((u32)f2bf(xs[i][2 * e + 1] * rstd * __uint_as_float(ww[e] & 0xffff0000u)) << 16);
        xn[i] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    }
    STAMP(3);

    // This CTA's rows of qkv: a warp RPW rows, each lane's 16-byte vectors of W against x's, rounded to bf16.
    mbar_wait(bar_w, 0);
    STAMP(4);
    float acc[RPW];
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
        acc[r] = 0.f;
#pragma unroll
        for (int i = 0; i < XV; ++i) acc[r] += dot8(*(const uint4*)(w_s + (warp + r * WARPS) * HIDDEN + lane * 8 + i * 256), xn[i]);
    }
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
        const float v = warp_sum(acc[r]);
        if (lane == 0) part_s[warp + r * WARPS] = round_bf(v);
    }
    __syncthreads();
    for (int i = tid; i < RPC * CLUSTER; i += THREADS)  // pushed into every CTA's full_s (this one's too)
        st_cluster(full_s + rank * RPC + i % RPC, i / RPC, part_s[i % RPC]);
    cluster_sync();
    STAMP(5);

    // q/k RMSNorm and RoPE (neox halves: lane's dims lane, lane + 32 pair with + 64), a warp a head.
    if (warp <= GROUP) {
        const float* src = full_s + warp * D;
        float a0 = src[lane], a1 = src[lane + 32], b0 = src[lane + 64], b1 = src[lane + 96];
#if HAS_NORM
        const float hr = rsqrtf(warp_sum(a0 * a0 + a1 * a1 + b0 * b0 + b1 * b1) / D + qk_eps);
        a0 = a0 * hr * hw[0], a1 = a1 * hr * hw[1], b0 = b0 * hr * hw[2], b1 = b1 * hr * hw[3];
#endif
        float* dst = warp < GROUP ? q_s + warp * D : new_s;
        dst[lane] = round_bf(a0 * c0 - b0 * s0);
        dst[lane + 64] = round_bf(b0 * c0 + a0 * s0);
        dst[lane + 32] = round_bf(a1 * c1 - b1 * s1);
        dst[lane + 96] = round_bf(b1 * c1 + a1 * s1);
    }
    for (int d = tid; d < D; d += THREADS) new_s[D + d] = full_s[(GROUP + 1) * D + d];
    if (tid < GROUP) m_s[tid] = NEG_INF;
    __syncthreads();
    STAMP(6);
    const bool holds_new = keys.new_pos >= keys.start && keys.new_pos < keys.end;
    if (holds_new && slot >= 0 && tid < 2 * D) {  // the new k and v into the cache
        const long long page = slot / page_size, off = slot % page_size;
        if (tid < D) k_cache[page * stride_kb + off * stride_ks + kv_head * stride_kh + tid] = f2bf(new_s[tid]);
        else v_cache[page * stride_vb + off * stride_vs + kv_head * stride_vh + tid - D] = f2bf(new_s[tid]);
    }

    // Attention over the CTA's keys, a tile at a time (online softmax, base 2). Scores: a thread per (key, 16
    // dims), summed over 8 lanes; the tile's max and exp2s: a thread per (head, key); the output: a thread per
    // (head, dim), with the probabilities rounded to bf16 against v as the Triton kernel's tl.dot takes them.
    constexpr int PAIRS = (GROUP * D + THREADS - 1) / THREADS;
    float l_i[PAIRS], o_i[PAIRS];
#pragma unroll
    for (int p = 0; p < PAIRS; ++p) l_i[p] = 0.f, o_i[p] = 0.f;
    const int kj = tid / 8, kc = tid % 8;
    for (int t = 0; t < num_tiles; ++t) {
        bf16_t* k_buf = kv_s + (t & 1) * 2 * TILE * D;
        bf16_t* v_buf = k_buf + TILE * D;
        if (t + 1 < num_tiles) wait_copies<1>(); else wait_copies<0>();
        const int first = keys.start + t * TILE, n = min(TILE, keys.end - first);
        if (keys.new_pos >= first && keys.new_pos < first + n && tid < 2 * D)
            (tid < D ? k_buf : v_buf)[(keys.new_pos - first) * D + tid % D] = f2bf(new_s[tid]);
        __syncthreads();
        if (t == 0) STAMP(7);
        {  // every lane, so the shuffles see full warps; rows past n hold stale keys, their scores unused
            const uint4* kr = (const uint4*)(k_buf + kj * D + kc * 16);
            const uint4 k0 = kr[0], k1 = kr[1];
#pragma unroll
            for (int g = 0; g < GROUP; ++g) {
                const float* q = q_s + g * D + kc * 16;
                float s = 0.f;
                const u32 kw[8] = {k0.x, k0.y, k0.z, k0.w, k1.x, k1.y, k1.z, k1.w};
#pragma unroll
                for (int e = 0; e < 8; ++e)
                    s += q[2 * e] * __uint_as_float(kw[e] << 16) + q[2 * e + 1] * __uint_as_float(kw[e] & 0xffff0000u);
                s += __shfl_xor_sync(0xffffffffu, s, 1);
                s += __shfl_xor_sync(0xffffffffu, s, 2);
                s += __shfl_xor_sync(0xffffffffu, s, 4);
                if (kc == 0 && kj < n) score_s[g * TILE + kj] = s * qk_scale_log2;
            }
        }
        __syncthreads();
        if (t == 0) STAMP(8);
        const float* m_old = m_s + (t & 1) * GROUP;
        float* m_new_s = m_s + ((t + 1) & 1) * GROUP;
        for (int gj = tid; gj < GROUP * TILE; gj += THREADS) {  // a warp a head (TILE == 32)
            const int g = gj / TILE, j = gj % TILE;
            float m_new = m_old[g];
#pragma unroll
            for (int i = 0; i < TILE; ++i) m_new = fmaxf(m_new, i < n ? score_s[g * TILE + i] : NEG_INF);
            const float mine = score_s[gj];
            __syncwarp();
            score_s[gj] = j < n ? exp2_approx(mine - m_new) : 0.f;
            if (j == 0) m_new_s[g] = m_new, alpha_s[g] = exp2_approx(m_old[g] - m_new);
        }
        __syncthreads();
        if (t == 0) STAMP(9);
#pragma unroll
        for (int p = 0; p < PAIRS; ++p) {
            const int o = tid + p * THREADS;
            if (o >= GROUP * D) break;
            const float* pr = score_s + (o / D) * TILE;
            float l_sum = 0.f, o_sum = 0.f;
#pragma unroll
            for (int j = 0; j < TILE; ++j) {
                if (j < n) {
                    l_sum += pr[j];
                    o_sum += round_bf(pr[j]) * bf2f(v_buf[j * D + o % D]);
                }
            }
            const float alpha = alpha_s[o / D];
            l_i[p] = l_i[p] * alpha + l_sum;
            o_i[p] = o_i[p] * alpha + o_sum;
        }
        __syncthreads();  // buffer t % 2 and the scores are free again
        if (t == 0) STAMP(10);
        if (t + 2 < num_tiles) issue_tile(keys, t + 2, k_buf, tid);
    }
    STAMP(11);
    // Normalized partials and log2-sum-exps (an empty share gives 0, -inf), pushed to the CTAs that merge them.
    const float* m_fin = m_s + (num_tiles & 1) * GROUP;
#pragma unroll
    for (int p = 0; p < PAIRS; ++p) {
        const int o = tid + p * THREADS;
        if (o >= GROUP * D) break;
        st_cluster(merge_s + rank * OPC + o % OPC, o / OPC, o_i[p] / (l_i[p] == 0.f ? 1.f : l_i[p]));
        if (o % D == 0) {
            const float lse = l_i[p] == 0.f ? NEG_INF : m_fin[o / D] + __log2f(l_i[p]);
            for (int c = 0; c < CLUSTER; ++c) st_cluster(lse_s + rank * GROUP + o / D, c, lse);
        }
    }
    cluster_sync();  // after it no CTA touches another's shared memory: each may leave when done
    STAMP(12);

    // The merge: each CTA of the cluster finishes OPC of the outputs, from every CTA's partials of them.
    if (tid < OPC) {
        const int o = rank * OPC + tid;
        {
            float lse[CLUSTER], part[CLUSTER];
#pragma unroll
            for (int c = 0; c < CLUSTER; ++c) lse[c] = lse_s[c * GROUP + o / D], part[c] = merge_s[c * OPC + tid];
            float mx = NEG_INF;
#pragma unroll
            for (int c = 0; c < CLUSTER; ++c) mx = fmaxf(mx, lse[c]);
            if (mx == NEG_INF) mx = 0.f;
            float total_w = 0.f, sum = 0.f;
#pragma unroll
            for (int c = 0; c < CLUSTER; ++c) {
                const float wgt = exp2_approx(lse[c] - mx);
                total_w += wgt;
                sum += part[c] * wgt;
            }
            out[(long long)kv_head * GROUP * D + o] = f2bf(sum / (total_w == 0.f ? 1.f : total_w));
        }
    }
    STAMP(13);
}
