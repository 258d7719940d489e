// gpt_cuda.cu: attention on the GPU, one idea at a time. A course in CUDA that starts from an element-wise
// kernel and ends with a fused, causal, grouped-query flash-attention kernel. Every stage is checked against the
// CPU attention of gpt.cpp (included below, so there is exactly one reference) and timed. DESIGN.md §7 has the
// recurrences, the layouts, the flop count and the tolerance rule.
//
// Build and run:   nvcc -O3 -std=c++20 -arch=sm_90 gpt_cuda.cu -lcublas -o gpt_cuda     (or: make)
//                  ./gpt_cuda run --stage 5 --batch 4 --heads 16 --n 4096 --d 64 --causal
//                  ./gpt_cuda bench            (writes out/cuda_bench.md and out/cuda_bench.svg)
//                  ./gpt_cuda eval --model out/names_gpu.safetensors --split val   (./gpt_cuda sample: same flags as ./gpt)
//                  ./gpt_cuda --help
//
// Notation (DESIGN.md §7): B sequences, H query heads, G key/value heads (G divides H; query head h reads
// K/V head h / (H/G)), Nq query rows, Nk keys, hd head size. Q, O [B, H, Nq, hd]; K, V [B, G, Nk, hd];
// LSE [B, H, Nq]; row-major fp32. Causal with Nq != Nk aligns the ends: query i sees keys j <= i + Nk - Nq.
//
// The course map. Read the sections in this order; each one says what it changes and why that is faster.
//   stage  kernel(s)                         idea
//   0a     s0a_scale                         element-wise: one thread per element, grid-stride loop
//   0b     s0b_row_sum                       block reduction: shared-memory tree, then warp shuffles
//   0c     s0c_softmax_rows                  row softmax: max, sum of exponentials, normalise (three passes)
//   1a     s1a_matmul_naive                  matmul, one thread per output element
//   1b     s1b_matmul_smem_tiled             matmul, 32 x 32 tiles staged in shared memory
//   1c     s1c_matmul_register_tiled         matmul, each thread computes an 8 x 8 tile in registers
//   1d     s1d_matmul_qk_transposed          S = Q K^T: the same kernel reading its second operand transposed
//   2      s2_attention_naive                S = scale Q K^T in global memory, masked row softmax, O = P V
//   3a     s3a_softmax_online                one-pass (online) softmax
//   3b     s3b_attention_streaming           attention that streams over keys: the N x N matrix is never stored
//   4      s4_attention_flash1               tiles in shared memory, FlashAttention-1 loop order (O in global memory)
//   5      s5_attention_flash2               fused FlashAttention-2: a block owns its rows, state in registers, K/V
//                                            copied by copy warps that do nothing else
//   6      s6_attention_flash_causal         causal tile skipping, masking only diagonal tiles, longest blocks first;
//                                            without the mask (below hd 128) equal shares of tiles, cut blocks merged
//   7      s7_attention_decode_split         decode: a few query rows, the KEYS split across blocks, partials merged
//   8      s8_attention_tensor_cores         stage 6 on the tensor cores, operands split in two TF32 parts (3xTF32)
//
// Then the whole model: a gpt.cpp checkpoint on the GPU (./gpt_cuda eval, ./gpt_cuda sample), with stage 2-6 or 8
// attention for many positions (--stage), stage 7 for each decode step, and a decode step replayed from a CUDA graph.
//
// Measured on an NVIDIA H200, 2026-12-04, with `./gpt_cuda bench` (median of 10 runs, L2 flushed; the full table,
// causal and not, is in out/cuda_bench.md and the README). fp32 peak 66.9 TFLOP/s, DRAM 4814 GB/s.
//   stage  workload                        ms       TFLOP/s   GB/s   x over the previous stage of its kind
//   0a     x [98304, 1024]                 0.264     0.38     3055
//   0b     x [98304, 1024]                 0.121     0.83     3331
//   0c     x [98304, 1024]                 0.366     1.4      2201
//   3a     x [98304, 1024]                 0.549     0.92     1466   0.67 (vs 0c; see stage 3)
//   cuBLAS 4096^3                          2.686    51.2
//   1a     4096^3                         25.027     5.5
//   1b     4096^3                         15.831     8.7             1.58
//   1c     4096^3                          3.371    40.8             4.70   (80% of cuBLAS)
//   1d     4096^3, B transposed            3.364    40.9
//   2      B4 H16 N4096 d64               14.188    19.4
//   3b     B4 H16 N4096 d64               44.752     6.1             0.32   (see stage 3)
//   4      B4 H16 N4096 d64               12.218    22.5             3.66
//   5      B4 H16 N4096 d64                6.963    39.5             1.75
//   6      B4 H16 N4096 d64                6.589    41.7             1.06   (non-causal: 5's work in equal shares)
//   8      B4 H16 N4096 d64                4.529    60.7             1.52   (tensor cores)
//   5      B4 H16 N4096 d64 causal         7.050    19.5             1.74
//   6      B4 H16 N4096 d64 causal         3.737    36.8             1.89
//   8      B4 H16 N4096 d64 causal         2.518    54.6             1.48
//   5      B2 H16 N8192 d128              24.959    44.1             2.10
//   6      B2 H16 N8192 d128              24.441    44.99            1.02
//   8      B2 H16 N8192 d128              18.397    59.8             1.33
//   6      B2 H16 N8192 d128 causal       12.882    42.7             1.95   (vs 5 causal, 25.111 ms)
//   8      B2 H16 N8192 d128 causal        9.672    56.8             1.33
// The banners of stages 0-4 keep the numbers of the H100 they were tuned on (2026-11-23 and 24); from stage 5 on they
// quote this table, and list what each step of the kernel gained. docs/gpu_notes.md has the experiments that were
// measured and not kept, with their numbers.
//
// Sections: utilities | stage 0 | stage 1 | stage 2 | stage 3 | stage 4 | stage 5 | stage 6 | stage 7 | stage 8 |
// runner | GPU model: layer kernels | weights, cache, forward | inference and evaluation | bench | CLI.

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cinttypes>
#include <ctime>
#include <type_traits>

// gpt.cpp is the CPU reference. Its main is compiled out; ours is compiled out too when the includer (tests.cpp)
// defined GPT_NO_MAIN before including this file.
#ifdef GPT_NO_MAIN
#include "gpt.cpp"
#else
#define GPT_NO_MAIN
#include "gpt.cpp"
#undef GPT_NO_MAIN
#endif

// ==== Utilities ====
// Every CUDA call goes through CUDA_CHECK, every launch through launch(), and every device allocation through
// DeviceBuffer. Errors become gpt.cpp's Error, so the CLI prints them and the tests report them.

#define CUDA_CHECK(call) cuda_check((call), #call, __FILE__, __LINE__)

void cuda_check(const cudaError_t status, const char* call, const char* file, const int line) {
    if (status == cudaSuccess) return;
    throw Error(std::string("cuda: ") + call + " failed at " + file + ":" + std::to_string(line) + ": " +
                cudaGetErrorString(status));
}

__host__ __device__ constexpr int64_t ceil_div(const int64_t a, const int64_t b) { return (a + b - 1) / b; }

// Query i of Nq sees keys [0, visible_keys): all Nk, or when causal those j <= i + Nk - Nq (the ends aligned). At or
// below 0 the row sees no key.
__host__ __device__ constexpr int visible_keys(const int i, const int Nq, const int Nk, const bool causal) {
    return causal ? (i + Nk - Nq + 1 < Nk ? i + Nk - Nq + 1 : Nk) : Nk;
}

bool cuda_device_available() {
    int count = 0;
    return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

// One owner for each device allocation: move-only, freed in the destructor.
template <typename T>
struct DeviceBuffer {
    T* data = nullptr;
    size_t count = 0;

    DeviceBuffer() = default;
    explicit DeviceBuffer(const size_t n) : count(n) {
        if (n == 0) return;
        const cudaError_t status = cudaMalloc(&data, n * sizeof(T));
        if (status != cudaSuccess) {
            data = nullptr;
            cudaGetLastError();  // clear the sticky allocation error so later calls are not blamed for it
            throw Error("cuda: cannot allocate " + std::to_string(double(n * sizeof(T)) / (1 << 30)) +
                        " GiB of device memory: " + cudaGetErrorString(status));
        }
    }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    DeviceBuffer(DeviceBuffer&& other) noexcept
        : data(std::exchange(other.data, nullptr)), count(std::exchange(other.count, 0)) {}
    DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
        if (this != &other) {
            if (data) cudaFree(data);
            data = std::exchange(other.data, nullptr);
            count = std::exchange(other.count, 0);
        }
        return *this;
    }
    ~DeviceBuffer() {
        if (data) cudaFree(data);
    }

    void upload(std::span<const T> host) {
        check(host.size() == count,
              "device buffer: upload of " + std::to_string(host.size()) + " values into " + std::to_string(count));
        CUDA_CHECK(cudaMemcpy(data, host.data(), count * sizeof(T), cudaMemcpyHostToDevice));
    }
    void download(std::span<T> host) const {
        check(host.size() == count,
              "device buffer: download of " + std::to_string(count) + " values into " + std::to_string(host.size()));
        CUDA_CHECK(cudaMemcpy(host.data(), data, count * sizeof(T), cudaMemcpyDeviceToHost));
    }
    // All bits set is a NaN in every float: an output element that a kernel forgets to write fails the check.
    void poison() { CUDA_CHECK(cudaMemset(data, 0xff, count * sizeof(T))); }
};

// Page-locked host memory, mapped into the device's address space: a copy captured into a CUDA graph needs it (the
// decode step copies its token in inside the graph), and a kernel can write into it directly (device_view), which the
// decode step's last gemv does with the logits.
struct PinnedDeleter {
    void operator()(void* pointer) const { cudaFreeHost(pointer); }
};
template <typename T>
using PinnedArray = std::unique_ptr<T[], PinnedDeleter>;
template <typename T>
PinnedArray<T> pinned_array(const size_t n) {
    void* pointer = nullptr;
    CUDA_CHECK(cudaHostAlloc(&pointer, n * sizeof(T), cudaHostAllocMapped));
    return PinnedArray<T>(static_cast<T*>(pointer));
}
// The address at which kernels reach a PinnedArray.
template <typename T>
T* device_view(const PinnedArray<T>& host) {
    void* device = nullptr;
    CUDA_CHECK(cudaHostGetDevicePointer(&device, host.get(), 0));
    return static_cast<T*>(device);
}

// Grows a scratch buffer to at least n elements (kept between calls, so timed runs do not allocate).
void reserve(DeviceBuffer<float>& buffer, const size_t n) {
    if (buffer.count < n) buffer = DeviceBuffer<float>(n);
}
// The same for a buffer that holds arrival counters: a new buffer starts at zero, and the kernels that count in it
// set each counter back to zero when they are done, so it stays zero between calls.
void reserve_zeroed(DeviceBuffer<float>& buffer, const size_t n) {
    if (buffer.count < n) {
        buffer = DeviceBuffer<float>(n);
        CUDA_CHECK(cudaMemset(buffer.data, 0, n * sizeof(float)));
    }
}

// The one launch helper: checks the grid against the hardware limits, raises the dynamic shared-memory limit when a
// kernel needs more than the default 48 KB, launches into `stream`, and checks the launch. The stages use the default
// stream (launch); the GPU model uses model_stream (launch_on), which a CUDA graph can capture. prepare_launch is the
// part that launch_overlapping (below) shares.
template <typename... KernelArgs>
void prepare_launch(const char* name, void (*kernel)(KernelArgs...), const dim3 grid, const size_t smem_bytes) {
    check(grid.y <= 65535 && grid.z <= 65535, std::string(name) + ": grid " + std::to_string(grid.y) + " x " +
                                                  std::to_string(grid.z) + " exceeds 65535 in y or z");
    if (smem_bytes > 48 * 1024)
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_bytes)));
}
template <typename... KernelArgs, typename... Args>
void launch_on(const cudaStream_t stream, const char* name, void (*kernel)(KernelArgs...), const dim3 grid,
               const dim3 block, const size_t smem_bytes, Args&&... args) {
    prepare_launch(name, kernel, grid, smem_bytes);
    kernel<<<grid, block, smem_bytes, stream>>>(std::forward<Args>(args)...);
    const cudaError_t status = cudaGetLastError();
    check(status == cudaSuccess, std::string(name) + ": launch failed: " + cudaGetErrorString(status));
}
template <typename... KernelArgs, typename... Args>
void launch(const char* name, void (*kernel)(KernelArgs...), const dim3 grid, const dim3 block,
            const size_t smem_bytes, Args&&... args) {
    launch_on(cudaStream_t(nullptr), name, kernel, grid, block, smem_bytes, std::forward<Args>(args)...);
}

// Programmatic dependent launch (sm_90): a kernel launched with launch_overlapping may start while the kernel before
// it in the stream is still running, once that kernel calls start_next_kernel. It must do nothing before
// wait_for_previous_kernel but read data that no earlier kernel writes (weights, say), since any number of kernels
// before it may still be in flight; the wait returns when the previous kernel has finished and its writes are visible.
// Both are no-ops for a kernel launched the ordinary way. Used by the decode step of the GPU model, whose kernels are
// short enough that launch and ramp-up would otherwise cost as much as the work.
__device__ void start_next_kernel() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}
__device__ void wait_for_previous_kernel() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

template <typename... KernelArgs, typename... Args>
void launch_overlapping(const cudaStream_t stream, const char* name, void (*kernel)(KernelArgs...), const dim3 grid,
                        const dim3 block, const size_t smem_bytes, Args&&... args) {
    prepare_launch(name, kernel, grid, smem_bytes);
    cudaLaunchAttribute overlap{};
    overlap.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    overlap.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config{};
    config.gridDim = grid, config.blockDim = block, config.dynamicSmemBytes = smem_bytes, config.stream = stream;
    config.attrs = &overlap, config.numAttrs = 1;
    const cudaError_t status = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
    check(status == cudaSuccess, std::string(name) + ": launch failed: " + cudaGetErrorString(status));
}

// printf-style formatting of one number.
std::string format(const char* pattern, const double value) {
    char text[64];
    std::snprintf(text, sizeof(text), pattern, value);
    return text;
}

// True when p may be read as float4 (16-byte aligned) and every row of `row_length` floats starts aligned too.
bool float4_ok(const void* p, const int64_t row_length) {
    return reinterpret_cast<uintptr_t>(p) % 16 == 0 && row_length % 4 == 0;
}

// Kernels that keep a head's row in registers are compiled for the head sizes 32, 64, 80 and 128;
// body(std::integral_constant<int, HD>) is called with the one that matches.
template <typename Body>
void dispatch_head_size(const char* stage, const int hd, const Body& body) {
    switch (hd) {
        case 32: body(std::integral_constant<int, 32>{}); return;
        case 64: body(std::integral_constant<int, 64>{}); return;
        case 80: body(std::integral_constant<int, 80>{}); return;
        case 128: body(std::integral_constant<int, 128>{}); return;
        default:
            throw Error(std::string("stage ") + stage + ": head size " + std::to_string(hd) +
                        " is not supported (compiled for 32, 64, 80, 128)");
    }
}

// Warp-level reductions: each step adds (or maxes) the value held by the lane `offset` away, so after
// log2(32) = 5 steps every lane holds the result for the whole warp. No shared memory, no __syncthreads.
__device__ float warp_sum(float value) {
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
    return value;
}
__device__ float warp_max(float value) {
    for (int offset = 16; offset > 0; offset /= 2) value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
    return value;
}

// The shapes of one attention call: Q, O [B, H, Nq, hd]; K, V [B, G, Nk, hd]; LSE [B, H, Nq].
struct AttentionShape {
    int B = 1, H = 1, G = 1, Nq = 1, Nk = 1, hd = 64;
    bool causal = false;
};

void check_attention_shape(const char* stage, const AttentionShape& s) {
    const std::string where = std::string("stage ") + stage + ": ";
    check(s.B >= 1 && s.H >= 1 && s.G >= 1 && s.Nq >= 1 && s.Nk >= 1 && s.hd >= 1,
          where + "every size must be at least 1");
    check(s.H % s.G == 0, where + "kv heads " + std::to_string(s.G) + " must divide heads " + std::to_string(s.H));
    check(int64_t(s.B) * s.H <= 65535, where + "B * H = " + std::to_string(int64_t(s.B) * s.H) + " exceeds 65535");
}

// ==== Stage 0: CUDA warm-up ====
// Stage 0: three memory-bound kernels that are the pieces of naive attention: scale the scores, reduce a row, softmax
// a row. They introduce the grid of blocks of threads, coalesced access, shared memory, __syncthreads and warp
// shuffles. Each thread does almost no arithmetic, so the speed limit is DRAM bandwidth: the GB/s column says how
// close each one gets. Measured (H100, x [98304, 1024] = the scores of B8 H12 N1024, 2026-11-23, ./gpt_cuda bench):
// 0a 0.321 ms, 2506 GB/s (75% of DRAM peak); 0b 0.142 ms, 2830 GB/s (84%); 0c 0.392 ms, 2053 GB/s (61%).

// ---- 0a. Element-wise ----
// out[i] = scale * x[i]   for i < count. One thread per element; consecutive threads touch consecutive floats, so
// a warp reads 128 contiguous bytes in one transaction (coalesced). A grid-stride loop lets any grid size cover any
// count.
__global__ void s0a_scale_kernel(float* out, const float* x, const float scale, const int64_t count) {
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) out[i] = scale * x[i];
}

void s0a_scale(float* out, const float* x, const float scale, const int64_t count) {
    constexpr int threads = 256;
    const int blocks = int(std::min<int64_t>(ceil_div(count, threads), 65536));
    launch("s0a_scale", s0a_scale_kernel, dim3(blocks), dim3(threads), 0, out, x, scale, count);
}

// ---- 0b. Block reduction ----
// out[r] = sum_c x[r, c]   x: [rows, cols] -> out: [rows]. One block per row. Each thread first sums a strided
// slice of the row (coalesced), then the block combines its partial sums: a shared-memory tree halves the number of
// active threads each step until one warp is left, and that warp finishes with shuffles (no barriers needed inside a
// warp).
template <int THREADS>
__global__ void s0b_row_sum_kernel(float* out, const float* x, const int cols) {
    static_assert(THREADS >= 64 && (THREADS & (THREADS - 1)) == 0,
                  "the tree halves a power-of-two block down to one warp");
    __shared__ float partial[THREADS];
    const float* row = x + int64_t(blockIdx.x) * cols;
    float sum = 0.0f;
    for (int c = threadIdx.x; c < cols; c += THREADS) sum += row[c];
    partial[threadIdx.x] = sum;
    __syncthreads();  // every partial sum is in shared memory before any thread reads another's
    for (int stride = THREADS / 2; stride >= 32; stride /= 2) {
        if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
        __syncthreads();  // this level of the tree is complete before the next level reads it
    }
    if (threadIdx.x < 32) {
        const float total = warp_sum(partial[threadIdx.x]);
        if (threadIdx.x == 0) out[blockIdx.x] = total;
    }
}

void s0b_row_sum(float* out, const float* x, const int rows, const int cols) {
    constexpr int threads = 256;
    launch("s0b_row_sum", s0b_row_sum_kernel<threads>, dim3(rows), dim3(threads), 0, out, x, cols);
}

// Block-wide reductions used from here on: shuffle inside each warp, pass one value per warp through shared memory,
// shuffle again. Every thread of the block gets the result. `scratch` holds 32 floats.
__device__ float block_sum(float value, float* scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    value = warp_sum(value);
    if (lane == 0) scratch[warp] = value;
    __syncthreads();  // every warp's sum is in scratch
    value = warp_sum(lane < warps ? scratch[lane] : 0.0f);
    __syncthreads();  // everyone has read scratch before the next reduction overwrites it
    return value;
}
__device__ float block_max(float value, float* scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    value = warp_max(value);
    if (lane == 0) scratch[warp] = value;
    __syncthreads();  // every warp's max is in scratch
    value = warp_max(lane < warps ? scratch[lane] : -INFINITY);
    __syncthreads();  // everyone has read scratch before the next reduction overwrites it
    return value;
}

// ---- 0c. Row softmax ----
// out[r, :] = softmax(x[r, :]) = e^(x - m) / sum e^(x - m), m = max of the row (subtracting m keeps e^x from
// overflowing when scores are large). One block per row, three passes over the row: max, sum, normalise.
__global__ void s0c_softmax_rows_kernel(float* out, const float* x, const int cols) {
    __shared__ float scratch[32];
    const float* row = x + int64_t(blockIdx.x) * cols;
    float* out_row = out + int64_t(blockIdx.x) * cols;
    float m = -INFINITY;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, row[c]);
    m = block_max(m, scratch);
    float l = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) l += expf(row[c] - m);
    l = block_sum(l, scratch);
    const float inv_l = 1.0f / l;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) out_row[c] = expf(row[c] - m) * inv_l;
}

void s0c_softmax_rows(float* out, const float* x, const int rows, const int cols) {
    launch("s0c_softmax_rows", s0c_softmax_rows_kernel, dim3(rows), dim3(256), 0, out, x, cols);
}

// ==== Stage 1: matrix operations ====
// Stage 1: C = alpha * A @ B, the two products inside attention (S = Q K^T and O = P V). Changes from stage 0: every
// output needs K multiply-adds, so arithmetic, not bandwidth, becomes the limit, provided each value loaded from
// memory is reused many times. The three versions raise that reuse: 1a reuses nothing (2 loads per FMA), 1b reuses each
// loaded value 32 times through shared memory, 1c also keeps an 8 x 8 tile of C in registers (8 FMAs per shared-memory
// load). cuBLAS SGEMM is the yardstick in the bench. Measured (H100, M = N = K = 4096, 2026-11-23, ./gpt_cuda bench):
// 1a 24.6 ms, 5.6 TFLOP/s; 1b 15.4 ms, 8.9 TFLOP/s (1.59x); 1c 3.38 ms, 40.7 TFLOP/s (4.57x, 79% of cuBLAS SGEMM's
// 2.66 ms, 51.7 TFLOP/s); 1d 3.37 ms, 40.8 TFLOP/s.
//
// Shapes: A [M, K], B [K, N] (1d: B [N, K], read transposed), C [M, N]. `batch` independent products; product z reads
// A + z*stride_a, B + (z / b_group)*stride_b and writes C + z*stride_c, so H query heads can share G K/V heads.
struct MatmulShape {
    int M = 1, N = 1, K = 1;
    int batch = 1, b_group = 1;
    int64_t stride_a = 0, stride_b = 0, stride_c = 0;
    float alpha = 1.0f;
};

void check_matmul_shape(const char* stage, const MatmulShape& s) {
    check(s.M >= 1 && s.N >= 1 && s.K >= 1 && s.batch >= 1 && s.b_group >= 1,
          std::string("stage ") + stage + ": every matmul size must be at least 1");
    check(s.batch <= 65535, std::string("stage ") + stage + ": batch " + std::to_string(s.batch) + " exceeds 65535");
}

// ---- 1a. Naive ----
// Thread (row, col) computes one C element: a dot product of a row of A and a column of B, both read from global
// memory. Threads of a warp take consecutive columns, so B and C accesses coalesce and A's element is a broadcast.
__global__ void s1a_matmul_naive_kernel(float* c, const float* a, const float* b, const MatmulShape s) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x, row = blockIdx.y * blockDim.y + threadIdx.y,
              z = blockIdx.z;
    if (row >= s.M || col >= s.N) return;
    const float* a_row = a + z * s.stride_a + int64_t(row) * s.K;
    const float* b_col = b + (z / s.b_group) * s.stride_b + col;
    float sum = 0.0f;
    for (int k = 0; k < s.K; ++k) sum += a_row[k] * b_col[int64_t(k) * s.N];
    c[z * s.stride_c + int64_t(row) * s.N + col] = s.alpha * sum;
}

void s1a_matmul_naive(float* c, const float* a, const float* b, const MatmulShape& s) {
    check_matmul_shape("1a", s);
    const dim3 block(32, 8);
    launch("s1a_matmul_naive", s1a_matmul_naive_kernel, dim3(ceil_div(s.N, 32), ceil_div(s.M, 8), s.batch), block, 0,
           c, a, b, s);
}

// ---- 1b. Shared-memory tiling ----
// A block of TILE x TILE threads owns a TILE x TILE tile of C. It walks along K one tile at a time: each thread loads
// one element of A's tile and one of B's into shared memory, then all threads read the tiles from there. Every value
// loaded from global memory is now used TILE times. Out-of-range elements load as 0, so any M, N, K works.
template <int TILE>
__global__ void s1b_matmul_smem_tiled_kernel(float* c, const float* a, const float* b, const MatmulShape s) {
    __shared__ float a_tile[TILE][TILE];
    __shared__ float b_tile[TILE][TILE];
    const int tx = threadIdx.x, ty = threadIdx.y, z = blockIdx.z;
    const int row = blockIdx.y * TILE + ty, col = blockIdx.x * TILE + tx;
    const float* a_mat = a + z * s.stride_a;
    const float* b_mat = b + (z / s.b_group) * s.stride_b;
    float sum = 0.0f;
    for (int k0 = 0; k0 < s.K; k0 += TILE) {
        a_tile[ty][tx] = (row < s.M && k0 + tx < s.K) ? a_mat[int64_t(row) * s.K + k0 + tx] : 0.0f;
        b_tile[ty][tx] = (k0 + ty < s.K && col < s.N) ? b_mat[int64_t(k0 + ty) * s.N + col] : 0.0f;
        __syncthreads();  // both tiles are complete before anyone reads them
        for (int k = 0; k < TILE; ++k) sum += a_tile[ty][k] * b_tile[k][tx];
        __syncthreads();  // everyone is done with the tiles before the next iteration overwrites them
    }
    if (row < s.M && col < s.N) c[z * s.stride_c + int64_t(row) * s.N + col] = s.alpha * sum;
}

void s1b_matmul_smem_tiled(float* c, const float* a, const float* b, const MatmulShape& s) {
    check_matmul_shape("1b", s);
    constexpr int tile = 32;
    launch("s1b_matmul_smem_tiled", s1b_matmul_smem_tiled_kernel<tile>,
           dim3(ceil_div(s.N, tile), ceil_div(s.M, tile), s.batch), dim3(tile, tile), 0, c, a, b, s);
}

// ---- 1c. Register tiling ----
// A block of 256 threads owns a BM x BN = 128 x 128 tile of C; thread (ty, tx) of a 16 x 16 grid owns 8 rows x 8 columns
// of it, as two 4-row halves BM/2 apart and two 4-column halves BN/2 apart (so its shared-memory reads are float4 and
// a warp's reads do not collide in the same bank). Per step k it loads 8 values of A and 8 of B from shared memory and
// does 64 FMAs on registers. A's tile is stored transposed (a_tile[k][m]) so the 8 values of a column are contiguous.
// Double buffering: the next K-tile is fetched from global memory into registers while this one is multiplied, and
// stored into the other shared buffer, so one __syncthreads per K-tile suffices.

// Four consecutive floats m[row, col..col+3] of a [rows, cols] row-major matrix; zeros outside it.
__device__ float4 load4_or_zero(const float* m, const int row, const int col, const int rows, const int cols,
                                const bool vector_ok) {
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (row >= rows) return v;
    const float* p = m + int64_t(row) * cols + col;
    if (vector_ok && col + 3 < cols) return *reinterpret_cast<const float4*>(p);
    if (col + 0 < cols) v.x = p[0];
    if (col + 1 < cols) v.y = p[1];
    if (col + 2 < cols) v.z = p[2];
    if (col + 3 < cols) v.w = p[3];
    return v;
}

// The body shared by 1c (B is [K, N]) and 1d (B is [N, K], read transposed).
template <int BM, int BN, int BK, int TM, int TN, bool B_TRANSPOSED>
__device__ void register_tiled_matmul(float* c, const float* a, const float* b, const MatmulShape& s,
                                      const bool vec_a, const bool vec_b, const bool vec_c) {
    constexpr int threads = 256;
    static_assert(TM == 8 && TN == 8, "each thread reads its 8 rows and 8 columns as two float4 halves");
    static_assert(BM == 16 * TM && BN == 16 * TN, "a 16 x 16 grid of threads covers the tile");
    static_assert(BK % 4 == 0 && (BM * BK / 4) % threads == 0 && (BN * BK / 4) % threads == 0,
                  "tiles are loaded as float4s, the same number by every thread");
    constexpr int a_loads = BM * BK / 4 / threads, b_loads = BN * BK / 4 / threads;
    // Two buffers each. A is stored transposed, a_tile[k][m]; the +4 spreads its stores over the banks.
    __shared__ __align__(16) float a_tile[2][BK][BM + 4];
    __shared__ __align__(16) float b_tile[2][BK][BN + 4];

    const int z = blockIdx.z, m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const float* a_mat = a + z * s.stride_a;
    const float* b_mat = b + (z / s.b_group) * s.stride_b;
    float* c_mat = c + z * s.stride_c;

    // Loader: float4 number f = threadIdx.x + p * threads. For A (and a transposed B) f walks along K first, so a
    // warp reads 8 rows x 64 bytes; for a plain B it walks along N, so a warp reads 512 contiguous bytes.
    float4 a_next[a_loads], b_next[b_loads];
    const auto fetch = [&](const int k0) {
        for (int p = 0; p < a_loads; ++p) {
            const int f = threadIdx.x + p * threads, row = f / (BK / 4), kq = (f % (BK / 4)) * 4;
            a_next[p] = load4_or_zero(a_mat, m0 + row, k0 + kq, s.M, s.K, vec_a);
        }
        for (int p = 0; p < b_loads; ++p) {
            const int f = threadIdx.x + p * threads;
            if constexpr (B_TRANSPOSED) {
                const int col = f / (BK / 4), kq = (f % (BK / 4)) * 4;
                b_next[p] = load4_or_zero(b_mat, n0 + col, k0 + kq, s.N, s.K, vec_b);
            } else {
                const int k = f / (BN / 4), nq = (f % (BN / 4)) * 4;
                b_next[p] = load4_or_zero(b_mat, k0 + k, n0 + nq, s.K, s.N, vec_b);
            }
        }
    };
    const auto store = [&](const int buf) {
        for (int p = 0; p < a_loads; ++p) {
            const int f = threadIdx.x + p * threads, row = f / (BK / 4), kq = (f % (BK / 4)) * 4;
            a_tile[buf][kq + 0][row] = a_next[p].x;
            a_tile[buf][kq + 1][row] = a_next[p].y;
            a_tile[buf][kq + 2][row] = a_next[p].z;
            a_tile[buf][kq + 3][row] = a_next[p].w;
        }
        for (int p = 0; p < b_loads; ++p) {
            const int f = threadIdx.x + p * threads;
            if constexpr (B_TRANSPOSED) {
                const int col = f / (BK / 4), kq = (f % (BK / 4)) * 4;
                b_tile[buf][kq + 0][col] = b_next[p].x;
                b_tile[buf][kq + 1][col] = b_next[p].y;
                b_tile[buf][kq + 2][col] = b_next[p].z;
                b_tile[buf][kq + 3][col] = b_next[p].w;
            } else {
                const int k = f / (BN / 4), nq = (f % (BN / 4)) * 4;
                *reinterpret_cast<float4*>(&b_tile[buf][k][nq]) = b_next[p];
            }
        }
    };

    float acc[TM][TN] = {};
    const int k_tiles = int(ceil_div(s.K, BK));
    fetch(0);
    store(0);
    __syncthreads();  // the first tiles are in shared memory
    for (int kt = 0; kt < k_tiles; ++kt) {
        const int buf = kt % 2;
        if (kt + 1 < k_tiles) fetch((kt + 1) * BK);  // global loads in flight while we compute
#pragma unroll
        for (int k = 0; k < BK; ++k) {
            const float4 a_lo = *reinterpret_cast<const float4*>(&a_tile[buf][k][ty * 4]);
            const float4 a_hi = *reinterpret_cast<const float4*>(&a_tile[buf][k][ty * 4 + BM / 2]);
            const float4 b_lo = *reinterpret_cast<const float4*>(&b_tile[buf][k][tx * 4]);
            const float4 b_hi = *reinterpret_cast<const float4*>(&b_tile[buf][k][tx * 4 + BN / 2]);
            const float a_frag[TM] = {a_lo.x, a_lo.y, a_lo.z, a_lo.w, a_hi.x, a_hi.y, a_hi.z, a_hi.w};
            const float b_frag[TN] = {b_lo.x, b_lo.y, b_lo.z, b_lo.w, b_hi.x, b_hi.y, b_hi.z, b_hi.w};
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a_frag[i], b_frag[j], acc[i][j]);
        }
        if (kt + 1 < k_tiles) store(1 - buf);
        __syncthreads();  // the next tile is complete, and nobody still reads the buffer that gets overwritten next
    }

    // Epilogue: thread's rows are ty*4 + {0..3} and BM/2 + ty*4 + {0..3}; columns likewise with tx and BN/2.
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int row = m0 + ty * 4 + (i % 4) + (i / 4) * (BM / 2);
        if (row >= s.M) continue;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int col = n0 + tx * 4 + half * (BN / 2);
            float* out = c_mat + int64_t(row) * s.N + col;
            const float4 v = make_float4(s.alpha * acc[i][half * 4 + 0], s.alpha * acc[i][half * 4 + 1],
                                         s.alpha * acc[i][half * 4 + 2], s.alpha * acc[i][half * 4 + 3]);
            if (vec_c && col + 3 < s.N) {
                *reinterpret_cast<float4*>(out) = v;
            } else {
                if (col + 0 < s.N) out[0] = v.x;
                if (col + 1 < s.N) out[1] = v.y;
                if (col + 2 < s.N) out[2] = v.z;
                if (col + 3 < s.N) out[3] = v.w;
            }
        }
    }
}

constexpr int mm_bm = 128, mm_bn = 128, mm_bk = 16, mm_tm = 8, mm_tn = 8;

__global__ void __launch_bounds__(256, 2)
    s1c_matmul_register_tiled_kernel(float* c, const float* a, const float* b, const MatmulShape s, const bool vec_a,
                                     const bool vec_b, const bool vec_c) {
    register_tiled_matmul<mm_bm, mm_bn, mm_bk, mm_tm, mm_tn, false>(c, a, b, s, vec_a, vec_b, vec_c);
}

void s1c_matmul_register_tiled(float* c, const float* a, const float* b, const MatmulShape& s) {
    check_matmul_shape("1c", s);
    const bool batched = s.batch > 1;
    const bool vec_a = float4_ok(a, s.K) && (!batched || s.stride_a % 4 == 0);
    const bool vec_b = float4_ok(b, s.N) && (s.batch / s.b_group <= 1 || s.stride_b % 4 == 0);
    const bool vec_c = float4_ok(c, s.N) && (!batched || s.stride_c % 4 == 0);
    launch("s1c_matmul_register_tiled", s1c_matmul_register_tiled_kernel,
           dim3(ceil_div(s.N, mm_bn), ceil_div(s.M, mm_bm), s.batch), dim3(256), 0, c, a, b, s, vec_a, vec_b, vec_c);
}

// ---- 1d. The transposed product S = Q K^T ----
// Q [Nq, hd] times K [Nk, hd]^T: the second operand is stored row by row along the reduction axis. The only change from
// 1c is B's loader: it reads K like A (float4 along hd) and stores it transposed into b_tile[k][n], so the inner
// loop is the same and no transposed copy of K is ever written to global memory.
__global__ void __launch_bounds__(256, 2)
    s1d_matmul_qk_transposed_kernel(float* c, const float* a, const float* b, const MatmulShape s, const bool vec_a,
                                    const bool vec_b, const bool vec_c) {
    register_tiled_matmul<mm_bm, mm_bn, mm_bk, mm_tm, mm_tn, true>(c, a, b, s, vec_a, vec_b, vec_c);
}

void s1d_matmul_qk_transposed(float* c, const float* a, const float* b, const MatmulShape& s) {
    check_matmul_shape("1d", s);
    const bool batched = s.batch > 1;
    const bool vec_a = float4_ok(a, s.K) && (!batched || s.stride_a % 4 == 0);
    const bool vec_b = float4_ok(b, s.K) && (s.batch / s.b_group <= 1 || s.stride_b % 4 == 0);
    const bool vec_c = float4_ok(c, s.N) && (!batched || s.stride_c % 4 == 0);
    launch("s1d_matmul_qk_transposed", s1d_matmul_qk_transposed_kernel,
           dim3(ceil_div(s.N, mm_bn), ceil_div(s.M, mm_bm), s.batch), dim3(256), 0, c, a, b, s, vec_a, vec_b, vec_c);
}

// cuBLAS SGEMM, the bench's yardstick for stage 1 (and nothing else). cuBLAS is column-major: the row-major product
// C = A B is the column-major product C^T = B^T A^T, so B goes first.
cublasHandle_t cublas_handle() {
    static cublasHandle_t handle = [] {
        cublasHandle_t h = nullptr;
        check(cublasCreate(&h) == CUBLAS_STATUS_SUCCESS, "cublas: cannot create a handle");
        return h;
    }();
    return handle;
}

void cublas_sgemm(float* c, const float* a, const float* b, const MatmulShape& s) {
    check_matmul_shape("cuBLAS", s);
    const float beta = 0.0f;
    for (int z = 0; z < s.batch; ++z) {
        const cublasStatus_t status = cublasSgemm(cublas_handle(), CUBLAS_OP_N, CUBLAS_OP_N, s.N, s.M, s.K, &s.alpha,
                                                  b + (z / s.b_group) * s.stride_b, s.N, a + z * s.stride_a, s.K,
                                                  &beta, c + z * s.stride_c, s.N);
        check(status == CUBLAS_STATUS_SUCCESS, "cublas: sgemm failed with status " + std::to_string(int(status)));
    }
}

// ==== Stage 2: naive attention ====
// Stage 2: attention from the stage 0 and 1 pieces, the way a framework without fusion runs it:
//   S = scale * Q K^T  (1d, one product per head)  ->  P = softmax(mask(S)) row by row (2a)  ->  O = P V  (1c).
// Changes from stage 1: a causal mask, rows that see no key, and the log-sum-exp. Why it is slow: S is B*H*Nq*Nk
// floats (8 GiB at B2 H16 N8192) written once, read and written by the softmax, read again by P V: the N x N traffic,
// not the arithmetic, sets its time, and its memory grows with N^2. Measured (H100, 2026-11-23, ./gpt_cuda bench):
// B4 H16 N4096 d64 14.6 ms, 18.8 TFLOP/s (causal 13.4 ms, 10.3 TFLOP/s: it computes all of S, then masks half);
// B2 H16 N8192 d128 38.5 ms, 28.6 TFLOP/s (causal 34.1 ms, 16.1 TFLOP/s).

// ---- 2a. Masked row softmax ----
// In place on S [B*H*Nq, Nk]: row r is query i = r % Nq, which sees keys j < visible = min(Nk, i + Nk - Nq + 1) when
// causal (all Nk otherwise). Keys it cannot see get p = 0; a row that sees none gets p = 0 everywhere and lse = -inf.
// lse = m + log(l) in natural-log units. One block per row, as in 0c.
__global__ void s2a_masked_softmax_kernel(float* scores, float* lse, const int Nq, const int Nk, const bool causal) {
    __shared__ float scratch[32];
    const int i = int(blockIdx.x % Nq);
    float* row = scores + int64_t(blockIdx.x) * Nk;
    const int visible = visible_keys(i, Nq, Nk, causal);
    float m = -INFINITY;
    for (int j = threadIdx.x; j < visible; j += blockDim.x) m = fmaxf(m, row[j]);
    m = block_max(m, scratch);
    float l = 0.0f;
    for (int j = threadIdx.x; j < visible; j += blockDim.x) l += expf(row[j] - m);
    l = block_sum(l, scratch);
    const float inv_l = visible > 0 ? 1.0f / l : 0.0f;
    for (int j = threadIdx.x; j < Nk; j += blockDim.x) row[j] = j < visible ? expf(row[j] - m) * inv_l : 0.0f;
    if (threadIdx.x == 0) lse[blockIdx.x] = visible > 0 ? m + logf(l) : -INFINITY;
}

void s2a_masked_softmax(float* scores, float* lse, const int rows, const int Nq, const int Nk, const bool causal) {
    launch("s2a_masked_softmax", s2a_masked_softmax_kernel, dim3(rows), dim3(256), 0, scores, lse, Nq, Nk, causal);
}

void s2_attention_naive(float* out, float* lse, const float* q, const float* k, const float* v,
                        const AttentionShape& s, DeviceBuffer<float>& workspace) {
    check_attention_shape("2", s);
    const size_t score_count = size_t(s.B) * s.H * s.Nq * s.Nk;
    if (workspace.count < score_count) {
        size_t free_bytes = 0, total_bytes = 0;
        CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
        check(score_count * sizeof(float) + (size_t(256) << 20) <= free_bytes + workspace.count * sizeof(float),
              "stage 2: the score matrix needs " + std::to_string(score_count * sizeof(float) >> 20) + " MiB, only " +
                  std::to_string(free_bytes >> 20) + " MiB of device memory are free");
        reserve(workspace, score_count);
    }
    const int heads = s.B * s.H, group = s.H / s.G;
    // 1. S = scale * Q K^T: [B*H] products of [Nq, hd] x [Nk, hd]^T;
    //    head b*H + h reads K head (b*H + h) / (H/G) = b*G + h/(H/G)
    MatmulShape qk;
    qk.M = s.Nq, qk.N = s.Nk, qk.K = s.hd, qk.batch = heads, qk.b_group = group;
    qk.stride_a = int64_t(s.Nq) * s.hd, qk.stride_b = int64_t(s.Nk) * s.hd, qk.stride_c = int64_t(s.Nq) * s.Nk;
    qk.alpha = 1.0f / std::sqrt(float(s.hd));
    s1d_matmul_qk_transposed(workspace.data, q, k, qk);
    // 2. P = softmax(mask(S)), in place, and LSE
    s2a_masked_softmax(workspace.data, lse, heads * s.Nq, s.Nq, s.Nk, s.causal);
    // 3. O = P V: [B*H] products of [Nq, Nk] x [Nk, hd]
    MatmulShape pv;
    pv.M = s.Nq, pv.N = s.hd, pv.K = s.Nk, pv.batch = heads, pv.b_group = group;
    pv.stride_a = int64_t(s.Nq) * s.Nk, pv.stride_b = int64_t(s.Nk) * s.hd, pv.stride_c = int64_t(s.Nq) * s.hd;
    s1c_matmul_register_tiled(out, workspace.data, v, pv);
}

// ==== Stage 3: online softmax ====
// Stage 3: the softmax recurrence that needs one pass: for each score x, m' = max(m, x), l = l e^(m - m') + e^(x - m'),
// m = m' (DESIGN.md §7). Two partial results merge the same way: m = max(m1, m2), l = l1 e^(m1 - m) + l2 e^(m2 - m).
// Changes from stage 2: 3a reads a row twice instead of three times; 3b applies the recurrence to attention itself,
// carrying O along (o = o e^(m - m') + e^(x - m') v), so S is never stored: memory O(N) instead of O(N^2).
// Faster because: 3a saves a pass over memory. 3b trades stage 2's tiled matmuls for a simple loop per query row, so on
// long sequences it is slower than stage 2; what it wins is memory, and stage 4 wins the speed back with tiles.
// Measured (H100, 2026-11-23, ./gpt_cuda bench): 3a 0.550 ms, 1465 GB/s on x [98304, 1024]: 0.71x of 0c, because a
// 4 KB row stays in L1 between 0c's passes (its extra pass costs almost nothing) while 3a's first pass is a chain of
// dependent updates; the saved pass pays off only for rows that do not fit in cache. 3b: B4 H16 N4096 d64 46.0 ms,
// 6.0 TFLOP/s (0.32x of stage 2); B2 H16 N8192 d128 329 ms, 3.3 TFLOP/s (q and o, 256 floats, spill out of registers).

// Merges the partial softmax statistics (m_other, l_other) into (m, l).
__device__ void merge_softmax_stats(float& m, float& l, const float m_other, const float l_other) {
    const float m_new = fmaxf(m, m_other);
    if (m_new == -INFINITY) return;  // both empty: nothing to merge (and e^(-inf - -inf) would be NaN)
    l = l * expf(m - m_new) + l_other * expf(m_other - m_new);
    m = m_new;
}

// ---- 3a. One-pass softmax ----
// Each thread runs the recurrence over its strided slice of the row, four elements per step; the block merges the (m, l)
// pairs (shuffles inside a warp, then one pair per warp through shared memory); a second pass writes e^(x - m) / l.
__global__ void s3a_softmax_online_kernel(float* out, const float* x, const int cols) {
    __shared__ float warp_m[32], warp_l[32];
    const float* row = x + int64_t(blockIdx.x) * cols;
    float* out_row = out + int64_t(blockIdx.x) * cols;
    float m = -INFINITY, l = 0.0f;
    for (int c0 = threadIdx.x; c0 < cols; c0 += 4 * blockDim.x) {
        // Four elements at a time (loads issued together): m' = max(m, x0..x3), l = l e^(m - m') + sum e^(x - m').
        float x[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) x[k] = c0 + k * int(blockDim.x) < cols ? row[c0 + k * blockDim.x] : -INFINITY;
        const float m_new = fmaxf(m, fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3])));
        l = l * expf(m - m_new) + expf(x[0] - m_new) + expf(x[1] - m_new) + expf(x[2] - m_new) + expf(x[3] - m_new);
        m = m_new;
    }
    for (int offset = 16; offset > 0; offset /= 2)
        merge_softmax_stats(m, l, __shfl_xor_sync(0xffffffffu, m, offset), __shfl_xor_sync(0xffffffffu, l, offset));
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    if (lane == 0) warp_m[warp] = m, warp_l[warp] = l;
    __syncthreads();  // every warp's (m, l) is in shared memory
    m = -INFINITY, l = 0.0f;
    for (int w = 0; w < warps; ++w) merge_softmax_stats(m, l, warp_m[w], warp_l[w]);
    const float inv_l = 1.0f / l;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) out_row[c] = expf(row[c] - m) * inv_l;
}

void s3a_softmax_online(float* out, const float* x, const int rows, const int cols) {
    launch("s3a_softmax_online", s3a_softmax_online_kernel, dim3(rows), dim3(256), 0, out, x, cols);
}

// ---- 3b. Streaming attention ----
// One thread owns one query row: its scaled q and its running output o live in registers; it walks over the keys it
// may see, updating (m, l, o) with the online recurrence. Threads of a warp are consecutive rows of one head and read
// the same key at the same time, so each K and V load is one broadcast. Grid: (row blocks, B*H).
template <int HD>
__global__ void s3b_attention_streaming_kernel(float* out, float* lse, const float* q, const float* k, const float* v,
                                               const AttentionShape s) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x, head = blockIdx.y, kv_head = head / (s.H / s.G);
    if (i >= s.Nq) return;
    const float* q_row = q + (int64_t(head) * s.Nq + i) * HD;
    const float* k_head = k + int64_t(kv_head) * s.Nk * HD;
    const float* v_head = v + int64_t(kv_head) * s.Nk * HD;
    const float scale = rsqrtf(float(HD));
    float q_scaled[HD], o[HD];
#pragma unroll
    for (int d = 0; d < HD; ++d) q_scaled[d] = q_row[d] * scale, o[d] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    const int visible = visible_keys(i, s.Nq, s.Nk, s.causal);
    for (int j = 0; j < visible; ++j) {
        const float4* k_row = reinterpret_cast<const float4*>(k_head + int64_t(j) * HD);
        const float4* v_row = reinterpret_cast<const float4*>(v_head + int64_t(j) * HD);
        float x = 0.0f;
#pragma unroll
        for (int d = 0; d < HD / 4; ++d) {
            const float4 kk = k_row[d];
            x += q_scaled[4 * d] * kk.x + q_scaled[4 * d + 1] * kk.y + q_scaled[4 * d + 2] * kk.z +
                 q_scaled[4 * d + 3] * kk.w;
        }
        const float m_new = fmaxf(m, x);
        const float correction = expf(m - m_new), p = expf(x - m_new);  // correction = 0 on the first key (m = -inf)
        l = l * correction + p;
#pragma unroll
        for (int d = 0; d < HD / 4; ++d) {
            const float4 vv = v_row[d];
            o[4 * d] = o[4 * d] * correction + p * vv.x;
            o[4 * d + 1] = o[4 * d + 1] * correction + p * vv.y;
            o[4 * d + 2] = o[4 * d + 2] * correction + p * vv.z;
            o[4 * d + 3] = o[4 * d + 3] * correction + p * vv.w;
        }
        m = m_new;
    }
    float* out_row = out + (int64_t(head) * s.Nq + i) * HD;
    const float inv_l = l > 0.0f ? 1.0f / l : 0.0f;  // a row that saw no key writes 0
#pragma unroll
    for (int d = 0; d < HD; ++d) out_row[d] = o[d] * inv_l;
    lse[int64_t(head) * s.Nq + i] = l > 0.0f ? m + logf(l) : -INFINITY;
}

void s3b_attention_streaming(float* out, float* lse, const float* q, const float* k, const float* v,
                             const AttentionShape& s, DeviceBuffer<float>&) {
    check_attention_shape("3b", s);
    constexpr int threads = 128;
    dispatch_head_size("3b", s.hd, [&](auto hd) {
        launch("s3b_attention_streaming", s3b_attention_streaming_kernel<decltype(hd)::value>,
               dim3(ceil_div(s.Nq, threads), s.B * s.H), dim3(threads), 0, out, lse, q, k, v, s);
    });
}

// ==== Stage 4: tiled building blocks, FlashAttention-1 loop order ====
// Stage 4: tiles. A block of 256 threads takes Bq = 128 query rows and Bc = 64 keys at a time; Q, K and V tiles are
// staged in shared memory and every thread computes an 8 x 4 piece of S = Q K^T and an 8 x hd/16 piece of P V in
// registers (the register tiling of 1c, applied to attention). The loop order is FlashAttention-1's: the OUTER loop
// runs over K/V tiles (here: one kernel launch per K/V tile), the inner one over query tiles (the grid). So between
// K/V tiles the partial output O and the row statistics m, l must wait in global memory, and every launch reads and
// rewrites all of O:  O = (l e^(m - m_new) O + e^(m~ - m_new) P~ V) / l_new. Changes from stage 3: K/V values are reused
// by 128 query rows from shared memory instead of being re-read per row. Slower than it could be because O, m, l make
// Nk/64 round trips through memory; stage 5 fixes that. Measured (H100, 2026-11-23, ./gpt_cuda bench): B4 H16 N4096
// d64 12.7 ms, 21.7 TFLOP/s (3.63x of 3b, 1.15x of stage 2; 12.6 ms, 21.8 with unroll 8 in scores_tile and pv_tile,
// ./gpt_cuda run); causal 12.8 ms, 10.8 TFLOP/s. B2 H16 N8192 d128 55.0 ms,
// 20.0 TFLOP/s: slower than stage 2 (38.5 ms) there, because each of its 128 launches re-reads and rewrites all of O
// (134 MB) and reloads Q: about 50 GB of traffic that stage 5 removes.
//
// Thread layout, shared by stages 4-6: thread t is (ty, tx) = (t / 16, t % 16). It owns query rows ty*8 .. ty*8+7 of
// the tile, keys tx, tx+16, tx+32, tx+48 of S, and hd/16 output columns of O (out_col below). The 16 threads that share
// a row are one half of a warp, so row-wide max and sum are four shuffles. Strided keys keep a warp's shared-memory
// accesses in distinct banks.
constexpr int flash_rows = 128;     // Bq: query rows per block
constexpr int flash_keys = 64;      // Bc: keys per K/V tile
constexpr int flash_threads = 256;  // a 16 x 16 grid of threads
constexpr int rows_per_thread = 8, keys_per_thread = 4;
constexpr int p_stride = flash_rows + 4;  // P^T rows padded so float4 stores of different keys use different banks
template <int HD>
constexpr int k_stride = HD + 4;  // K rows padded likewise, for the float4 reads of four keys in scores_tile
static_assert(flash_rows == 16 * rows_per_thread && flash_keys == 16 * keys_per_thread,
              "16 x 16 threads cover the tile");
constexpr float log2_e = 1.4426950408889634f, ln_2 = 0.6931471805599453f;

// Shared memory of one block: q_t [hd][Bq] (Q transposed), k_s [Bc][hd + 4], v_s [Bc][hd],
// p_t [Bc][p_stride] (P transposed).
template <int HD>
constexpr size_t flash_smem_bytes = sizeof(float) * (size_t(HD) * flash_rows + size_t(flash_keys) * k_stride<HD> +
                                                     size_t(flash_keys) * HD + size_t(flash_keys) * p_stride);

struct FlashTiles {
    float* q_t;
    float* k_s;
    float* v_s;
    float* p_t;
};

template <int HD>
__device__ FlashTiles carve_flash_tiles(float* smem) {
    FlashTiles t;
    t.q_t = smem;
    t.k_s = t.q_t + HD * flash_rows;
    t.v_s = t.k_s + flash_keys * k_stride<HD>;
    t.p_t = t.v_s + flash_keys * HD;
    return t;
}

// Output column c (0 <= c < hd/16) of thread tx. With hd a multiple of 64 the thread owns groups of four adjacent
// columns, tx*4 + 64g + {0..3}, so V is read as float4; otherwise single columns tx + 16c. Either way a warp's 16
// threads cover contiguous memory, so the reads of V and the writes of O coalesce and do not collide in banks.
template <int HD>
__device__ int out_col(const int tx, const int c) {
    if constexpr (HD % 64 == 0)
        return tx * 4 + 64 * (c / 4) + c % 4;
    else
        return tx + 16 * c;
}

// Max and sum over the 16 threads (one half-warp) that share a row.
__device__ float row_max16(float value) {
    for (int offset = 8; offset > 0; offset /= 2) value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
    return value;
}
__device__ float row_sum16(float value) {
    for (int offset = 8; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
    return value;
}

// Q tile [Bq, hd] -> q_t [hd][Bq], multiplied by q_scale (rows past Nq are 0). Consecutive threads take consecutive
// rows, so the transposed stores q_t[d][row] fall in consecutive banks.
template <int HD>
__device__ void load_q_tile(float* q_t, const float* q_head, const int row0, const int Nq, const float q_scale) {
    for (int f = threadIdx.x; f < flash_rows * HD / 4; f += flash_threads) {
        const int row = f % flash_rows, d = (f / flash_rows) * 4;
        float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (row0 + row < Nq) x = *reinterpret_cast<const float4*>(q_head + int64_t(row0 + row) * HD + d);
        q_t[(d + 0) * flash_rows + row] = x.x * q_scale;
        q_t[(d + 1) * flash_rows + row] = x.y * q_scale;
        q_t[(d + 2) * flash_rows + row] = x.z * q_scale;
        q_t[(d + 3) * flash_rows + row] = x.w * q_scale;
    }
}

// cp.async (sm_80+): copy 16 bytes from global to shared memory without passing through registers; the thread goes on
// at once and waits later (cp_async_wait_all), so the copy overlaps whatever the thread computes meanwhile. With
// src_bytes = 0 nothing is read and the 16 bytes are zero-filled.
__device__ void cp_async16(void* shared_dst, const void* global_src, const int src_bytes) {
    const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(shared_dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(global_src), "r"(src_bytes));
}
__device__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// Starts copying keys key0 .. key0+Bc-1 of a K or V head [Nk, hd] into dst [Bc][dst_stride]; keys past Nk become 0.
// THREADS threads copy, `thread` (0 .. THREADS-1) being the caller: all of a block's threads in stages 4 and 8, its
// copy warps in stages 5 and 6. Consecutive threads take consecutive float4s of a row, so a warp reads 512 contiguous
// bytes. The tile is hd/4 * Bc / THREADS float4s a thread, a count known at compile time: the copies are unrolled
// into one run of instructions with no branch, each with its own address registers. (A loop `f += THREADS` up to the
// tile's size compiled to a loop whose copies waited for the one before to have read its address registers: a
// quarter of the cycles in which no warp of stage 5 could issue were spent in it, from ncu at d128.)
template <int HD, int THREADS>
__device__ void load_kv_tile_async(float* dst, const int dst_stride, const float* head, const int key0, const int Nk,
                                   const int thread) {
    static_assert(flash_keys * HD / 4 % THREADS == 0, "every thread copies the same number of float4s");
#pragma unroll
    for (int i = 0; i < flash_keys * HD / 4 / THREADS; ++i) {
        const int f = thread + i * THREADS, key = f / (HD / 4), d = (f % (HD / 4)) * 4;
        const bool inside = key0 + key < Nk;
        cp_async16(dst + key * dst_stride + d, head + int64_t(inside ? key0 + key : 0) * HD + d, inside ? 16 : 0);
    }
}

// s[r][c] = q_t[:, ty*8 + r] . k_s[tx + 16c, :]. Per 4 steps of d: four float4 of K (one per key), eight of Q, 128 FMAs.
template <int HD>
__device__ void scores_tile(float (&s)[rows_per_thread][keys_per_thread], const float* q_t, const float* k_s,
                            const int ty, const int tx) {
#pragma unroll
    for (int r = 0; r < rows_per_thread; ++r)
#pragma unroll
        for (int c = 0; c < keys_per_thread; ++c) s[r][c] = 0.0f;
    // The loop over d (4 values a step) unrolled by 8 steps, by 16 from hd 80 (at hd 64, 16 is the whole loop: 5%
    // slower), so that the loads of the next steps issue earlier. 8 against 4: 2-3% faster at d128, 6% causal d64.
    // 16 against 8 (H200, 2026-12-04, three rounds side by side): causal d80 29.6 against 27.9 TFLOP/s, stage 5 d128
    // 44.1 against 43.6, stage 6 d128 44.99-45.01 against 44.80-44.84, causal d128 42.7 both.
#pragma unroll(HD >= 80 ? 16 : 8)
    for (int d0 = 0; d0 < HD; d0 += 4) {
        float4 kk[keys_per_thread];
#pragma unroll
        for (int c = 0; c < keys_per_thread; ++c)
            kk[c] = *reinterpret_cast<const float4*>(k_s + (tx + 16 * c) * k_stride<HD> + d0);
#pragma unroll
        for (int dd = 0; dd < 4; ++dd) {
            const float4 q_lo = *reinterpret_cast<const float4*>(q_t + (d0 + dd) * flash_rows + ty * 8);
            const float4 q_hi = *reinterpret_cast<const float4*>(q_t + (d0 + dd) * flash_rows + ty * 8 + 4);
            const float qv[rows_per_thread] = {q_lo.x, q_lo.y, q_lo.z, q_lo.w, q_hi.x, q_hi.y, q_hi.z, q_hi.w};
#pragma unroll
            for (int c = 0; c < keys_per_thread; ++c) {
                const float k_value = dd == 0 ? kk[c].x : dd == 1 ? kk[c].y : dd == 2 ? kk[c].z : kk[c].w;
#pragma unroll
                for (int r = 0; r < rows_per_thread; ++r) s[r][c] = fmaf(qv[r], k_value, s[r][c]);
            }
        }
    }
}

// Scores of keys a row may not see become -inf: keys past Nk and, when causal, keys j > i + Nk - Nq.
__device__ void mask_scores(float (&s)[rows_per_thread][keys_per_thread], const int first_row, const int first_key,
                            const int Nq, const int Nk, const bool causal) {
#pragma unroll
    for (int r = 0; r < rows_per_thread; ++r) {
        const int visible = visible_keys(first_row + r, Nq, Nk, causal);
#pragma unroll
        for (int c = 0; c < keys_per_thread; ++c)
            if (first_key + 16 * c >= visible) s[r][c] = -INFINITY;
    }
}

// P tile -> p_t [Bc][Bq] (transposed): key tx + 16c of this thread's 8 rows is two float4 stores.
__device__ void store_p_tile(float* p_t, const float (&p)[rows_per_thread][keys_per_thread], const int ty,
                             const int tx) {
#pragma unroll
    for (int c = 0; c < keys_per_thread; ++c) {
        float* dst = p_t + (tx + 16 * c) * p_stride + ty * 8;
        *reinterpret_cast<float4*>(dst) = make_float4(p[0][c], p[1][c], p[2][c], p[3][c]);
        *reinterpret_cast<float4*>(dst + 4) = make_float4(p[4][c], p[5][c], p[6][c], p[7][c]);
    }
}

// acc[r][c] += sum_key P[ty*8 + r, key] V[key, out_col(tx, c)]: per key, two float4 of P^T and hd/16 values of V.
template <int HD>
__device__ void pv_tile(float (&acc)[rows_per_thread][HD / 16], const float* p_t, const float* v_s, const int ty,
                        const int tx) {
#pragma unroll 16  // 16, not 8: 1.2% faster at d128 (more P and V loads issue ahead of their FMAs)
    for (int key = 0; key < flash_keys; ++key) {
        const float4 p_lo = *reinterpret_cast<const float4*>(p_t + key * p_stride + ty * 8);
        const float4 p_hi = *reinterpret_cast<const float4*>(p_t + key * p_stride + ty * 8 + 4);
        const float pv[rows_per_thread] = {p_lo.x, p_lo.y, p_lo.z, p_lo.w, p_hi.x, p_hi.y, p_hi.z, p_hi.w};
        float vv[HD / 16];
        if constexpr (HD % 64 == 0) {
#pragma unroll
            for (int g = 0; g < HD / 64; ++g) {
                const float4 x = *reinterpret_cast<const float4*>(v_s + key * HD + out_col<HD>(tx, 4 * g));
                vv[4 * g] = x.x, vv[4 * g + 1] = x.y, vv[4 * g + 2] = x.z, vv[4 * g + 3] = x.w;
            }
        } else {
#pragma unroll
            for (int c = 0; c < HD / 16; ++c) vv[c] = v_s[key * HD + out_col<HD>(tx, c)];
        }
#pragma unroll
        for (int r = 0; r < rows_per_thread; ++r)
#pragma unroll
            for (int c = 0; c < HD / 16; ++c) acc[r][c] = fmaf(pv[r], vv[c], acc[r][c]);
    }
}

// ---- 4. One FlashAttention-1 step: merge K/V tile `key0` into O, m, l held in global memory ----
// Scores are in log2 units (Q pre-multiplied by scale * log2(e)), so exp2f is the exponential; lse converts back.
template <int HD>
__global__ void __launch_bounds__(flash_threads)
    s4_attention_flash1_kernel(float* out, float* lse, float* row_max, float* row_sum, const float* q, const float* k,
                               const float* v, const AttentionShape s, const int key0, const bool first,
                               const bool last) {
    extern __shared__ float4 smem4[];
    const FlashTiles tiles = carve_flash_tiles<HD>(reinterpret_cast<float*>(smem4));
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16, lane = threadIdx.x % 32;
    const int row0 = blockIdx.x * flash_rows, head = blockIdx.y, kv_head = head / (s.H / s.G);
    load_q_tile<HD>(tiles.q_t, q + int64_t(head) * s.Nq * HD, row0, s.Nq, rsqrtf(float(HD)) * log2_e);
    load_kv_tile_async<HD, flash_threads>(tiles.k_s, k_stride<HD>, k + int64_t(kv_head) * s.Nk * HD, key0, s.Nk,
                                          threadIdx.x);
    load_kv_tile_async<HD, flash_threads>(tiles.v_s, HD, v + int64_t(kv_head) * s.Nk * HD, key0, s.Nk, threadIdx.x);
    cp_async_wait_all();
    __syncthreads();  // Q, K and V tiles are complete

    // This tile alone: m~ = rowmax S, P~ = e^(S - m~), l~ = rowsum P~ (each over the 16 threads of a row).
    float p[rows_per_thread][keys_per_thread], tile_max[rows_per_thread], tile_sum[rows_per_thread];
    scores_tile<HD>(p, tiles.q_t, tiles.k_s, ty, tx);
    mask_scores(p, row0 + ty * 8, key0 + tx, s.Nq, s.Nk, s.causal);
#pragma unroll
    for (int r = 0; r < rows_per_thread; ++r) {
        tile_max[r] = row_max16(fmaxf(fmaxf(p[r][0], p[r][1]), fmaxf(p[r][2], p[r][3])));
        const float m_safe =
            tile_max[r] == -INFINITY ? 0.0f : tile_max[r];  // a fully masked row gives P~ = 0, not NaN
        float sum = 0.0f;
#pragma unroll
        for (int c = 0; c < keys_per_thread; ++c) sum += (p[r][c] = exp2f(p[r][c] - m_safe));
        tile_sum[r] = row_sum16(sum);
    }
    store_p_tile(tiles.p_t, p, ty, tx);
    __syncthreads();  // the whole P~ tile is written before any thread reads a row of it
    float pv[rows_per_thread][HD / 16] = {};
    pv_tile<HD>(pv, tiles.p_t, tiles.v_s, ty, tx);

    // Merge with the running result in global memory. Lane tx == 0 of each row reads and writes m and l; the
    // shuffle hands its m, l to the other 15 threads of the row.
    float* out_head = out + int64_t(head) * s.Nq * HD;
#pragma unroll
    for (int r = 0; r < rows_per_thread; ++r) {
        const int row = row0 + ty * 8 + r;
        const int64_t stat = int64_t(head) * s.Nq + row;
        float m_old = -INFINITY, l_old = 0.0f;
        if (!first && tx == 0 && row < s.Nq) m_old = row_max[stat], l_old = row_sum[stat];
        m_old = __shfl_sync(0xffffffffu, m_old, lane & 16);
        l_old = __shfl_sync(0xffffffffu, l_old, lane & 16);
        if (row >= s.Nq) continue;
        const float m_new = fmaxf(m_old, tile_max[r]);
        float w_old = 0.0f,
              w_tile = 0.0f;  // weights of the old O and of this tile's P~ V; both 0 while the row saw nothing
        if (m_new != -INFINITY) w_old = exp2f(m_old - m_new) * l_old, w_tile = exp2f(tile_max[r] - m_new);
        const float l_new = w_old + w_tile * tile_sum[r];
        const float inv_l = l_new > 0.0f ? 1.0f / l_new : 0.0f;
#pragma unroll
        for (int c = 0; c < HD / 16; ++c) {
            float* o = out_head + int64_t(row) * HD + out_col<HD>(tx, c);
            const float o_old = first ? 0.0f : *o;  // the re-read that stage 5 removes
            *o = (w_old * o_old + w_tile * pv[r][c]) * inv_l;
        }
        if (tx == 0) {
            row_max[stat] = m_new, row_sum[stat] = l_new;
            if (last) lse[stat] = l_new > 0.0f ? (m_new + log2f(l_new)) * ln_2 : -INFINITY;
        }
    }
}

void s4_attention_flash1(float* out, float* lse, const float* q, const float* k, const float* v,
                         const AttentionShape& s, DeviceBuffer<float>& workspace) {
    check_attention_shape("4", s);
    const size_t rows = size_t(s.B) * s.H * s.Nq;
    reserve(workspace, 2 * rows);  // running max m and running sum l of every query row
    dispatch_head_size("4", s.hd, [&](auto hd) {
        constexpr int HD = decltype(hd)::value;
        // The outer loop of FlashAttention-1, over K/V tiles, is this host loop: one launch per tile.
        for (int key0 = 0; key0 < s.Nk; key0 += flash_keys)
            launch("s4_attention_flash1", s4_attention_flash1_kernel<HD>, dim3(ceil_div(s.Nq, flash_rows), s.B * s.H),
                   dim3(flash_threads), flash_smem_bytes<HD>, out, lse, workspace.data, workspace.data + rows, q, k,
                   v, s, key0, key0 == 0, key0 + flash_keys >= s.Nk);
    });
}

// ==== Stage 5: fused flash attention (FlashAttention-2 loop order) ====
// Stage 5: swap the loops. A block owns its 128 query rows for the whole kernel and loops over all K/V tiles itself, so
// the running output (acc), max m and sum l stay in registers, and O and LSE are written once at the end:
//   S = Q K_j^T,  m' = max(m, rowmax S),  P = e^(S - m'),  l = e^(m - m') l + rowsum P,  acc = e^(m - m') acc + P V_j.
//   O = acc / l,  LSE = m + log l.    (DESIGN.md §7)
// Changes from stage 4: one launch instead of Nk/64; no reads or writes of O, m, l per tile; O is divided by l once
// (not after every tile); each thread keeps its partial l, so only the max needs shuffles per tile. The loads of K and
// V take turns with the math (cp.async): V_j arrives while S = Q K_j^T is computed, K_j+1 while P V_j is. Four copy
// warps issue them and do nothing else (FlashAttention-3's producer warps), so the 8 warps that compute hold no copy
// addresses. Causal rows are handled by masking every tile (stage 6 skips the tiles that are fully masked).
// Faster because the only memory traffic left is reading Q once and K, V once per block of rows, and it overlaps the
// arithmetic. Measured (H200, 2026-12-04, ./gpt_cuda bench): B4 H16 N4096 d64 6.96 ms, 39.5 TFLOP/s (1.75x stage 4);
// B2 H16 N8192 d128 24.96 ms, 44.1 TFLOP/s (2.10x); B8 H12 N1024 d64 0.680 ms, 37.9; causal d64 7.05 ms, 19.5.
// What it took, each step side by side with the one before (./gpt_cuda run; TFLOP/s at B2 H16 N8192 d128 / B4 H16
// N4096 d64):
//   H100, 2026-11-24   the scores and P V unrolled by 4                                      40.3 / 37.8
//                      P V unrolled by 16                                                    41.5 / 38.8
//                      exp2_flush (below) instead of exp2f                                   42.1 / 39.5
//   H200, 2026-12-04   the same code                                                         42.1 / 39.5
//                      the K/V copy loop unrolled (each thread's count of float4s known at
//                      compile time; ncu had put a quarter of the stall samples there)       43.3 / 39.1
//                      the copy warps (the compute warps drop from 223 to 168 registers)    43.6 / 39.5
//                      the scores unrolled by 16 from hd 80 on (at hd 64 that is the whole
//                      loop, and it was slower)                                              44.1 / 39.5
// One block an SM: at d128 shared memory allows no more (165 KB), at d64 registers (144 a thread for 384 threads; two
// blocks would need 85). What limits it now, from ncu of the same loop in stage 6 at d128 (H200, 2026-12-04): the
// schedulers issue in 77-79% of the cycles, the FMA pipe is busy 69%, FFMA is 84% of the instructions; the compute
// warps' stall samples are 39% issuing, 33% ready while another warp issues, 14% held at dispatch, 7% waiting for
// shared memory, 1% at a barrier. A warp's float4 read from shared memory costs 2 wavefronts when the lanes of each
// half-warp share one address (Q, P) and 4 when they read 16 different ones (K, V): the shared-memory pipe is busy 7/8
// as long as the FMA pipe at full rate, close to the limit but not it (a layout with a quarter fewer wavefronts in the
// scores and a third fewer in P V ran at the same speed).
// docs/gpu_notes.md has what else was tried and measured (double-buffered K/V, other thread layouts, more warps,
// mbarriers, cp.async.bulk, lazy rescaling) and why it was not kept.

// 2^x as the one hardware instruction (MUFU.EX2) that exp2f is built on, ex2.approx.ftz: exp2f wraps it in a range
// check and a rescale so that results below 2^-126 come out subnormal instead of 0. Here such a result is a weight
// under 2^-126 in a row whose largest weight is 1, far below what fp32 resolves in the row's sum, and 2^-inf is still
// 0. That saves about three instructions on each of the 40 exponentials per thread and tile: about 1% at d64.
__device__ float exp2_flush(const float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// The copy warps. A block has flash_threads compute threads (8 warps) and copy_threads more (4 warps) that only copy:
// K_0, then per tile V_j and K_j+1, each followed by a wait for the copy and a barrier of all 12 warps. The compute
// warps never issue a copy, so none of their issue slots and registers go to copies. Four copy warps, not one: warp w
// runs on scheduler w % 4 of the SM, so each scheduler gets one (a single copy warp, with all the copies on one
// scheduler, ran 7% slower than copies by every thread). The barrier is named barrier 1 (barrier 0 is __syncthreads)
// counting all 384 threads, in its non-.aligned form barrier.sync: the copy warps and the compute warps reach it at
// different instructions, which bar.sync (= barrier.sync.aligned) and __syncthreads do not allow.
constexpr int copy_threads = 128;
constexpr int flash2_threads = flash_threads + copy_threads;
__device__ void tile_barrier() { asm volatile("barrier.sync 1, %0;" ::"n"(flash2_threads) : "memory"); }

// The copy warps' part of the loop over the tiles of keys [key_begin, key_end). The barriers match the compute warps'
// one by one: one before the loop (K of the first tile, and Q from the compute warps, are in place), two a tile (see
// flash2_tile).
template <int HD>
__device__ void copy_kv_tiles(const FlashTiles& tiles, const float* k_head, const float* v_head, const int key_begin,
                              const int key_end, const int Nk) {
    const int thread = threadIdx.x - flash_threads;
    if (key_begin < key_end)
        load_kv_tile_async<HD, copy_threads>(tiles.k_s, k_stride<HD>, k_head, key_begin, Nk, thread);
    cp_async_wait_all();
    tile_barrier();
    for (int key0 = key_begin; key0 < key_end; key0 += flash_keys) {
        load_kv_tile_async<HD, copy_threads>(tiles.v_s, HD, v_head, key0, Nk, thread);  // while S = Q K_j^T
        cp_async_wait_all();
        tile_barrier();  // V_j is complete, and every compute thread is done reading K_j
        if (key0 + flash_keys < key_end)  // while acc += P V_j
            load_kv_tile_async<HD, copy_threads>(tiles.k_s, k_stride<HD>, k_head, key0 + flash_keys, Nk, thread);
        cp_async_wait_all();
        tile_barrier();  // K_j+1 is complete, and every compute thread is done reading V_j
    }
}

// One K/V tile of the FA2 loop for a compute thread's rows. On entry K_j is complete in k_s and the copy warps are
// bringing V_j into v_s; on exit K_j+1 (when there is one) is complete in k_s. mask = false skips the mask (stage 6
// uses it for tiles that every row of the block sees completely). It is a flag, not a template parameter, so the loop
// body is compiled once: with a masked and an unmasked copy, causal d64 ran at 35.5 TFLOP/s against 36.3 with one
// (H200, 2026-12-04, same run; d128 the same).
template <int HD>
__device__ void flash2_tile(const bool mask, const FlashTiles& tiles, float (&acc)[rows_per_thread][HD / 16],
                            float (&m)[rows_per_thread], float (&l)[rows_per_thread], const int row0, const int key0,
                            const AttentionShape& s) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    float p[rows_per_thread][keys_per_thread];
    scores_tile<HD>(p, tiles.q_t, tiles.k_s, ty, tx);
    if (mask) mask_scores(p, row0 + ty * 8, key0 + tx, s.Nq, s.Nk, s.causal);
#pragma unroll
    for (int r = 0; r < rows_per_thread; ++r) {
        const float m_new = fmaxf(m[r], row_max16(fmaxf(fmaxf(p[r][0], p[r][1]), fmaxf(p[r][2], p[r][3]))));
        const float m_safe = m_new == -INFINITY ? 0.0f : m_new;  // a row that has seen no key keeps p = 0, not NaN
        const float correction = exp2_flush(m[r] - m_safe);      // 0 before the first visible key (m = -inf)
        float sum = 0.0f;
#pragma unroll
        for (int c = 0; c < keys_per_thread; ++c) sum += (p[r][c] = exp2_flush(p[r][c] - m_safe));
        l[r] =
            l[r] * correction + sum;  // this thread's share of the row sum; the 16 shares are added once, at the end
#pragma unroll
        for (int c = 0; c < HD / 16; ++c) acc[r][c] *= correction;
        m[r] = m_new;
    }
    store_p_tile(tiles.p_t, p, ty, tx);
    tile_barrier();  // P and V_j are complete, and every thread is done reading K_j (the copy warps start K_j+1)
    pv_tile<HD>(acc, tiles.p_t, tiles.v_s, ty, tx);
    tile_barrier();  // K_j+1 is complete, and every thread is done reading P and V_j (the copy warps start V_j+1)
}

// O = acc / l and LSE = (m + log2 l) ln 2 for the thread's rows; a row with l = 0 saw no key: O = 0, LSE = -inf.
template <int HD>
__device__ void write_flash_rows(float* out_head, float* lse_head, const float (&acc)[rows_per_thread][HD / 16],
                                 const float (&m)[rows_per_thread], const float (&l)[rows_per_thread], const int row0,
                                 const int Nq) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int r = 0; r < rows_per_thread; ++r) {
        const float l_row = row_sum16(l[r]);  // all 32 lanes take part in the shuffle, before any of them skips a row
        const int row = row0 + ty * 8 + r;
        if (row >= Nq) continue;
        const float inv_l = l_row > 0.0f ? 1.0f / l_row : 0.0f;
#pragma unroll
        for (int c = 0; c < HD / 16; ++c) out_head[int64_t(row) * HD + out_col<HD>(tx, c)] = acc[r][c] * inv_l;
        if (tx == 0) lse_head[row] = l_row > 0.0f ? (m[r] + log2f(l_row)) * ln_2 : -INFINITY;
    }
}

// The copy warps' part for query head `head` (of B*H): they copy the K/V head that it reads.
template <int HD>
__device__ void copy_kv_tiles_for(const FlashTiles& tiles, const float* k, const float* v, const AttentionShape& s,
                                  const int head, const int key_begin, const int key_end) {
    const int64_t kv_head = head / (s.H / s.G);
    copy_kv_tiles<HD>(tiles, k + kv_head * s.Nk * HD, v + kv_head * s.Nk * HD, key_begin, key_end, s.Nk);
}

// The compute warps' part: query rows [row0, row0 + Bq) of head `head` against keys [key_begin, key_end) (the copy
// warps bring the tiles); they load Q and leave with acc, m and l of their rows. Tiles that end past full_end are
// masked (stage 5 masks every tile: full_end = 0).
template <int HD>
__device__ void flash2_rows(const FlashTiles& tiles, float (&acc)[rows_per_thread][HD / 16],
                            float (&m)[rows_per_thread], float (&l)[rows_per_thread], const float* q,
                            const AttentionShape& s, const int head, const int row0, const int key_begin,
                            const int key_end, const int full_end) {
    load_q_tile<HD>(tiles.q_t, q + int64_t(head) * s.Nq * HD, row0, s.Nq, rsqrtf(float(HD)) * log2_e);
#pragma unroll
    for (int r = 0; r < rows_per_thread; ++r) {
        m[r] = -INFINITY, l[r] = 0.0f;
#pragma unroll
        for (int c = 0; c < HD / 16; ++c) acc[r][c] = 0.0f;
    }
    tile_barrier();  // Q (from every compute thread) and the first K tile (from the copy warps) are in shared memory
    for (int key0 = key_begin; key0 < key_end; key0 += flash_keys)
        flash2_tile<HD>(key0 + flash_keys > full_end, tiles, acc, m, l, row0, key0, s);
}

template <int HD>
__global__ void __launch_bounds__(flash2_threads)
    s5_attention_flash2_kernel(float* out, float* lse, const float* q, const float* k, const float* v,
                               const AttentionShape s) {
    extern __shared__ float4 smem4[];
    const FlashTiles tiles = carve_flash_tiles<HD>(reinterpret_cast<float*>(smem4));
    const int row0 = blockIdx.x * flash_rows, head = blockIdx.y;
    if (threadIdx.x >= flash_threads) {  // a copy warp
        copy_kv_tiles_for<HD>(tiles, k, v, s, head, 0, s.Nk);
        return;
    }
    float acc[rows_per_thread][HD / 16], m[rows_per_thread], l[rows_per_thread];
    flash2_rows<HD>(tiles, acc, m, l, q, s, head, row0, 0, s.Nk, 0);
    write_flash_rows<HD>(out + int64_t(head) * s.Nq * HD, lse + int64_t(head) * s.Nq, acc, m, l, row0, s.Nq);
}

void s5_attention_flash2(float* out, float* lse, const float* q, const float* k, const float* v,
                         const AttentionShape& s, DeviceBuffer<float>&) {
    check_attention_shape("5", s);
    dispatch_head_size("5", s.hd, [&](auto hd) {
        constexpr int HD = decltype(hd)::value;
        launch("s5_attention_flash2", s5_attention_flash2_kernel<HD>, dim3(ceil_div(s.Nq, flash_rows), s.B * s.H),
               dim3(flash2_threads), flash_smem_bytes<HD>, out, lse, q, k, v, s);
    });
}

// ==== Stage 6: causal flash attention ====
// Stage 6: causal attention at half the cost. Query rows row0 .. row0+127 see keys up to (row0 + 127) + Nk - Nq, so the
// block stops there: tiles above the diagonal are never loaded (about half of them when Nq = Nk). Tiles that every row
// of the block sees in full run without the mask; only tiles crossing the diagonal (or the end of K) pay for it. Blocks
// near the bottom of a head have the most tiles, so they are launched first (grid x counts down), and the launch ends
// with short blocks that fill the gaps. Heads stay in grid y, so the blocks running at one time share a few heads'
// K/V in L2. With Nq != Nk the diagonal moves by Nk - Nq (bottom-right alignment); a block whose rows see
// no key at all writes O = 0 and LSE = -inf without touching K or V. Grouped-query attention is the index
// h / (H/G) of every stage: the H/G query heads of a group are adjacent in the grid and share their K/V in L2.
// Changes from stage 5: tile skipping, mask only on diagonal tiles, longest-first order. Faster because causal
// attention does half the work of stage 5's masked loop. Without a mask it does stage 5's work, and below hd 128
// deals it out in equal shares of tiles so that no SM idles in the last wave (6b below). Measured (H200, 2026-12-04,
// ./gpt_cuda bench): causal B4 H16 N4096 d64 3.74 ms, 36.8 TFLOP/s (1.89x stage 5); causal B2 H16 N8192 d128
// 12.88 ms, 42.7 (1.95x); causal B8 H12 N1024 d64 0.452 ms, 28.5 (1.52x). Without the mask: B2 H16 N8192 d128
// 24.44 ms, 45.0 (44.99; 1.02x stage 5); and with the equal shares (./gpt_cuda bench --stages 5,6, later that day)
// B4 H16 N4096 d64 6.59 ms, 41.7 (1.06x), B8 H12 N1024 d64 0.650 ms, 39.6 (1.05x). Stage 6 gained with each step of
// stage 5 (its loop is stage 5's): causal B4 H16 N4096 d64 went 33.2, 34.7, 35.5 TFLOP/s on the H100 (2026-11-24,
// ./gpt_cuda run), then 36.2 with the K/V copies unrolled and the mask a runtime flag (see flash2_tile) and 36.7 with
// the copy warps on the H200 (2026-12-04, ./gpt_cuda bench).

// The keys a block of query rows [row0, row0 + rows) attends to: keys [0, key_end) are seen by some row of the block,
// keys [0, full_end) by every row of it.
struct BlockKeys {
    int key_end, full_end;
};
__device__ BlockKeys block_keys(const AttentionShape& s, const int row0, const int rows) {
    const int last_row = min(row0 + rows, s.Nq) - 1;
    return {visible_keys(last_row, s.Nq, s.Nk, s.causal), visible_keys(row0, s.Nq, s.Nk, s.causal)};
}

template <int HD>
__global__ void __launch_bounds__(flash2_threads)
    s6_attention_flash_causal_kernel(float* out, float* lse, const float* q, const float* k, const float* v,
                                     const AttentionShape s) {
    extern __shared__ float4 smem4[];
    const FlashTiles tiles = carve_flash_tiles<HD>(reinterpret_cast<float*>(smem4));
    const int row0 = (gridDim.x - 1 - blockIdx.x) * flash_rows, head = blockIdx.y;
    const auto [key_end, full_end] = block_keys(s, row0, flash_rows);
    if (threadIdx.x >= flash_threads) {  // a copy warp
        copy_kv_tiles_for<HD>(tiles, k, v, s, head, 0, key_end);
        return;
    }
    float acc[rows_per_thread][HD / 16], m[rows_per_thread], l[rows_per_thread];
    flash2_rows<HD>(tiles, acc, m, l, q, s, head, row0, 0, key_end, full_end);
    write_flash_rows<HD>(out + int64_t(head) * s.Nq * HD, lse + int64_t(head) * s.Nq, acc, m, l, row0, s.Nq);
}

// ---- 6b. Without the mask: equal shares of tiles, so that no SM idles in the last wave ----
// Not causal, every block of rows has the same ceil(Nk / Bc) tiles, and one block a block of rows leaves SMs idle at
// the end: B2 H16 N8192 d128 is 2048 blocks, one at a time on each of 132 SMs (a block takes 162 KB of shared
// memory), so 15.5 waves take the time of 16 and the last one runs on half the GPU. Measured (H200, 2026-12-04,
// ./gpt_cuda run --stage 6 --d 128 --n 8192, same run): H = 33 (2112 blocks, 16 full waves) 46.2 TFLOP/s against
// 45.0 at H = 32 (B1; 2048 blocks) and 43.7 at H = 31 (1984 blocks, 15.03 waves).
// So without the mask the grid is one block per place an SM has for it (the SMs times the blocks one SM holds), the
// blocks of rows are laid end to end, tile after tile, and block b of P takes tiles [b T / P, (b + 1) T / P) of all T:
// every block gets the same work to within one tile (GEMM libraries call this stream-K). A share may begin or end in
// the middle of a block of rows. With at least P blocks of rows a share holds at least one block of rows' tiles, so
// a block of rows is cut at most once: its first tiles are the end of block b's share (piece 0), the rest the
// beginning of block b+1's (piece 1). Each piece holds acc, m and l for its rows over its keys. A compute warp holds
// 16 whole rows, so each warp settles its rows alone: it writes its part of the piece, counts its arrival (as in
// stage 7), and the second of the two warps with these rows merges them by the rule of DESIGN.md §7, thread by thread
// (the two threads hold the same rows and columns, and l is each thread's share of its row's sum):
//   m = max(m_0, m_1),  acc = 2^(m_0 - m) acc_0 + 2^(m_1 - m) acc_1,  l = 2^(m_0 - m) l_0 + 2^(m_1 - m) l_1.
// The merge always adds piece 0's terms to piece 1's in the same order, whichever arrives last, so the output does
// not depend on timing.
constexpr int compute_warps = flash_threads / 32;
struct CutRowBlocks {
    float* pieces;       // [P][2][piece_floats<HD>]: the two pieces of the block of rows that block b's share ends in
    unsigned* arrivals;  // [P][compute_warps], zero between calls (the merging warp sets its counter back)
};
// A piece: for each compute thread, its rows' acc [8][hd/16], then m [8] and l [8], stored value-major (thread t's
// value i at i * 256 + t), so that a warp writes and reads 128 contiguous bytes at a time.
template <int HD>
constexpr int piece_floats = (rows_per_thread * HD / 16 + 2 * rows_per_thread) * flash_threads;

// A compute warp's end of a cut block of rows: write its part of this piece, count it, and if the other piece's warp
// is already done, merge and write O and LSE of the warp's rows. `cut` is the block whose share ends in the block of
// rows, `piece` 0 or 1 as above.
template <int HD>
__device__ void finish_cut_rows(float (&acc)[rows_per_thread][HD / 16], float (&m)[rows_per_thread],
                                float (&l)[rows_per_thread], const CutRowBlocks& cuts, const int cut, const int piece,
                                float* out_head, float* lse_head, const int row0, const int Nq) {
    float* mine = cuts.pieces + (int64_t(cut) * 2 + piece) * piece_floats<HD> + threadIdx.x;
    const float* other = cuts.pieces + (int64_t(cut) * 2 + 1 - piece) * piece_floats<HD> + threadIdx.x;
    constexpr int columns = HD / 16, m_at = rows_per_thread * columns, l_at = m_at + rows_per_thread;
#pragma unroll
    for (int r = 0; r < rows_per_thread; ++r) {
#pragma unroll
        for (int c = 0; c < columns; ++c) mine[(r * columns + c) * flash_threads] = acc[r][c];
        mine[(m_at + r) * flash_threads] = m[r], mine[(l_at + r) * flash_threads] = l[r];
    }
    __threadfence();  // this part of the piece is visible to the whole GPU before it is counted
    __syncwarp();
    unsigned* arrivals = cuts.arrivals + cut * compute_warps + threadIdx.x / 32;
    unsigned before = 0;
    if (threadIdx.x % 32 == 0) before = atomicAdd(arrivals, 1u);
    if (__shfl_sync(0xffffffffu, before, 0) == 0) return;  // the first to arrive: the other warp merges
    __threadfence();                                        // the other part is read after its arrival was counted
#pragma unroll
    for (int r = 0; r < rows_per_thread; ++r) {
        const float m_other = __ldcg(other + (m_at + r) * flash_threads);
        const float m_0 = piece == 0 ? m[r] : m_other, m_1 = piece == 0 ? m_other : m[r];
        const float m_new = fmaxf(m_0, m_1), m_safe = m_new == -INFINITY ? 0.0f : m_new;
        const float w_0 = exp2_flush(m_0 - m_safe), w_1 = exp2_flush(m_1 - m_safe);
        const float l_other = __ldcg(other + (l_at + r) * flash_threads);
        l[r] = piece == 0 ? fmaf(w_0, l[r], w_1 * l_other) : fmaf(w_0, l_other, w_1 * l[r]);
#pragma unroll
        for (int c = 0; c < columns; ++c) {
            const float a_other = __ldcg(other + (r * columns + c) * flash_threads);
            acc[r][c] = piece == 0 ? fmaf(w_0, acc[r][c], w_1 * a_other) : fmaf(w_0, a_other, w_1 * acc[r][c]);
        }
        m[r] = m_new;
    }
    write_flash_rows<HD>(out_head, lse_head, acc, m, l, row0, Nq);
    if (threadIdx.x % 32 == 0) *arrivals = 0;  // ready for the next call
}

// This block's share: from tile `first_tile` of block of rows `first_block` up to tile `end_tile` of `end_block`
// (excluded). Blocks of rows count over B * H * ceil(Nq / Bq), heads outermost. Every thread computes it from the
// block's index and the shape, so the compiler knows it is the same in the whole warp and keeps it in the warp's
// uniform registers: read from shared memory instead, it took regular registers and forced reconvergence points
// into the tile loop (stage 6 d64 38.6 against 41.9 TFLOP/s, H200, 2026-12-04).
struct Share {
    int first_block, first_tile, end_block, end_tile;
};
__device__ Share find_share(const AttentionShape& s) {
    const int64_t tiles = ceil_div(s.Nk, flash_keys);
    const int64_t all_tiles = int64_t(s.B) * s.H * ceil_div(s.Nq, flash_rows) * tiles;
    const int64_t begin = all_tiles * blockIdx.x / gridDim.x, end = all_tiles * (blockIdx.x + 1) / gridDim.x;
    return {int(begin / tiles), int(begin % tiles), int(end / tiles), int(end % tiles)};
}

// Calls piece(head, row0, first, last) for each block of rows in the share, in order: query rows [row0, row0 + Bq)
// of head `head` (of B*H) with their tiles [first, last). Only the first piece may start past tile 0, only the last
// end before the last tile.
template <typename Piece>
__device__ void for_each_piece(const Share& share, const AttentionShape& s, const Piece& piece) {
    const int row_blocks = int(ceil_div(s.Nq, flash_rows)), tiles = int(ceil_div(s.Nk, flash_keys));
    for (int r = share.first_block;; ++r) {
        const int first = r == share.first_block ? share.first_tile : 0;
        const int last = r == share.end_block ? share.end_tile : tiles;
        if (r > share.end_block || first >= last) return;
        piece(r / row_blocks, (r % row_blocks) * flash_rows, first, last);
    }
}

template <int HD>
__global__ void __launch_bounds__(flash2_threads)
    s6_attention_flash_balanced_kernel(float* out, float* lse, const float* q, const float* k, const float* v,
                                       const AttentionShape s, const CutRowBlocks cuts) {
    extern __shared__ float4 smem4[];
    const FlashTiles tiles = carve_flash_tiles<HD>(reinterpret_cast<float*>(smem4));
    const Share share = find_share(s);
    const auto keys = [&](const int tile) { return min(tile * flash_keys, s.Nk); };
    if (threadIdx.x >= flash_threads) {  // a copy warp
        for_each_piece(share, s, [&](const int head, const int, const int first, const int last) {
            copy_kv_tiles_for<HD>(tiles, k, v, s, head, keys(first), keys(last));
        });
        return;
    }
    for_each_piece(share, s, [&](const int head, const int row0, const int first, const int last) {
        float acc[rows_per_thread][HD / 16], m[rows_per_thread], l[rows_per_thread];
        flash2_rows<HD>(tiles, acc, m, l, q, s, head, row0, keys(first), keys(last), s.Nk);
        float* out_head = out + int64_t(head) * s.Nq * HD;
        float* lse_head = lse + int64_t(head) * s.Nq;
        if (first == 0 && last == int(ceil_div(s.Nk, flash_keys)))
            write_flash_rows<HD>(out_head, lse_head, acc, m, l, row0, s.Nq);
        else  // cut: piece 0 ends this block's share, piece 1 begins it
            finish_cut_rows<HD>(acc, m, l, cuts, first == 0 ? blockIdx.x : blockIdx.x - 1, first == 0 ? 0 : 1,
                                out_head, lse_head, row0, s.Nq);
    });
}

// Stage 6 without the mask on `blocks` blocks (the GPU's places for them, or fewer to test the cuts).
void flash_attention_balanced(float* out, float* lse, const float* q, const float* k, const float* v,
                              const AttentionShape& s, DeviceBuffer<float>& workspace, const int blocks) {
    check(!s.causal, "stage 6: the balanced schedule is for attention without the causal mask");
    dispatch_head_size("6", s.hd, [&](auto hd) {
        constexpr int HD = decltype(hd)::value;
        const int64_t row_blocks = int64_t(s.B) * s.H * ceil_div(s.Nq, flash_rows);
        const int grid = int(std::min<int64_t>(blocks, row_blocks));  // at least one block of rows a share
        check(grid >= 1, "stage 6: at least one block");
        const size_t pieces = size_t(grid) * 2 * piece_floats<HD>;
        reserve_zeroed(workspace, pieces + size_t(grid) * compute_warps);
        const CutRowBlocks cuts{workspace.data, reinterpret_cast<unsigned*>(workspace.data + pieces)};
        launch("s6_attention_flash_balanced", s6_attention_flash_balanced_kernel<HD>, dim3(grid),
               dim3(flash2_threads), flash_smem_bytes<HD>, out, lse, q, k, v, s, cuts);
    });
}

// The places the GPU has for blocks of `kernel` at once: its SMs times the blocks of this size that fit one SM.
template <typename... KernelArgs>
int resident_blocks(const char* name, void (*kernel)(KernelArgs...), const int threads, const size_t smem_bytes) {
    int device = 0, sms = 0, per_sm = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    prepare_launch(name, kernel, dim3(1), smem_bytes);  // the shared-memory limit the occupancy depends on
    CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem_bytes));
    return sms * std::max(per_sm, 1);
}

// Causal: one block a block of rows, longest first. Not causal: equal shares below hd 128. At hd 128 the tile loop
// needs all 168 registers a thread has, and in the balanced kernel ptxas schedules it worse: 4% slower a tile (B1 H4
// N1000 Nk3000 d128, no cuts: 10.2 against 10.7 TFLOP/s), more than the last wave gives back (B2 H16 N8192 d128 43.6
// against 45.0). At d64 (146 registers) it gains: B4 H16 N4096 41.9 against 39.8, B8 H12 N1024 39.7 against 38.2;
// d80 40.5 against 40.2 (B2 H16 N2048; H200, 2026-12-04, ./gpt_cuda run, same run).
void s6_attention_flash_causal(float* out, float* lse, const float* q, const float* k, const float* v,
                               const AttentionShape& s, DeviceBuffer<float>& workspace) {
    check_attention_shape("6", s);
    dispatch_head_size("6", s.hd, [&](auto hd) {
        constexpr int HD = decltype(hd)::value;
        if (!s.causal && HD < 128) {
            static const int blocks = resident_blocks("s6_attention_flash_balanced",
                                                      s6_attention_flash_balanced_kernel<HD>, flash2_threads,
                                                      flash_smem_bytes<HD>);
            flash_attention_balanced(out, lse, q, k, v, s, workspace, blocks);
        } else {
            launch("s6_attention_flash_causal", s6_attention_flash_causal_kernel<HD>,
                   dim3(ceil_div(s.Nq, flash_rows), s.B * s.H), dim3(flash2_threads), flash_smem_bytes<HD>, out, lse,
                   q, k, v, s);
        }
    });
}

// ==== Stage 7: decode attention, keys split across blocks (flash-decoding) ====
// Stage 7: attention for a few query rows against a long K/V cache, the inner loop of sampling. Stages 4-6 give a block
// 128 query rows; with one row there is one block per head, a handful for the whole GPU, each walking all keys alone.
// Changes from stage 6: the KEYS are split instead. Block (split, g, row) takes keys [split * Bk, (split + 1) * Bk)
// and every query head of K/V group g (they share the keys, so K and V are read once per group), and writes a partial
// result per head: O_s = softmax-weighted V over its keys, its max m_s and sum l_s (one thread per key computes the
// scores; then one warp per head, lanes along hd). The splits are merged with the rule of DESIGN.md §7:
//   m = max_s m_s,  l = sum_s e^(m_s - m) l_s,  O = sum_s e^(m_s - m) l_s O_s / l,  LSE = m + log l.
// by the last block of the row to finish (it counts the arrivals with an atomic), so it is one kernel, not a second
// launch that waits for the first. The cache may hold more positions than are filled (head stride max_T * hd), and
// the number of filled positions may be read from device memory, so that one captured CUDA graph serves every decode
// step: the grid covers the whole cache, a split past the last key a row sees leaves at once, the merge takes the
// splits before it, and a row whose keys fit in one split is finished by that block alone (no partials, no merge).
// Faster because all SMs stream the cache at once. Measured (./gpt_cuda run --stage 7 --heads 12 --kv-heads 4 --n 1
// --nk 4096 --d 64 --causal --runs 20): 0.024 ms with a separate merge kernel against 0.490 ms for stage 6 on the same
// one-row problem (H100, 2026-11-24; 20x), 0.017 ms with the merge in the last block (H200, 2026-12-03), 0.013-0.014 ms
// as it is now (H200, 2026-12-04). The K and V it reads are 8.4 MB: at this size the launch and the block's
// chain of waits, not bandwidth, set the time. In the GPU model's decode step (below) it takes 36 us of 0.173 ms a
// token at positions 2-65 and 100 us of 0.240 ms at 3698-3761, where the fence and the count of arrivals take 12 us
// and the merge 35 (H200, 2026-12-04, timed by taking parts out); docs/gpu_notes.md has those timings and what was
// tried on them.

// Where the keys and values live and how they are split. Nk = past + Nq: the Nq new rows are the last Nq keys.
struct SplitKv {
    int64_t head_stride = 0;            // floats from one K/V head to the next (max_T * hd for the KV cache)
    int capacity = 1;                   // positions the buffer holds; ceil(capacity / split_keys) blocks per row
    int split_keys = 64;                // Bk, keys per block
    int past = 0;                       // keys before the new rows, unless past_on_device is set
    const int* past_on_device = nullptr;
};

constexpr int decode_threads = 128;
constexpr int decode_split_keys = 64;  // Bk of the GPU model: 64 blocks per K/V head at T = 4096

int decode_splits(const SplitKv& kv) { return int(ceil_div(kv.capacity, kv.split_keys)); }

// Partial results of row r = (b*H + h)*Nq + i, split s, at r * splits + s: outputs [.., hd], then max and sum; and one
// arrival counter per block row (b, g, i), which the last split to finish uses to know it is last.
struct DecodePartials {
    float* out;
    float* max;
    float* sum;
    unsigned* arrivals;
};

// The workspace holds the partials and, after them, the counters (unsigned, in the same buffer). The counters start
// at zero when the buffer is made, and the merging block sets its counter back to zero, so they stay zero between calls.
DecodePartials carve_decode_partials(DeviceBuffer<float>& workspace, const int64_t rows, const int splits, const int hd,
                                     const int64_t block_rows) {
    const size_t count = size_t(rows) * splits;
    reserve_zeroed(workspace, count * (hd + 2) + block_rows);
    return {workspace.data, workspace.data + count * hd, workspace.data + count * (hd + 1),
            reinterpret_cast<unsigned*>(workspace.data + count * (hd + 2))};
}

// Shared memory of a block: k_s [Bk][hd + 4] (padded: thread j reads row j as float4s without bank conflicts),
// v_s [Bk][hd], q_s [group][hd], scores [group][Bk].
size_t decode_smem_bytes(const AttentionShape& s, const SplitKv& kv) {
    const size_t group = s.H / s.G;
    return sizeof(float) * (size_t(kv.split_keys) * (2 * s.hd + 4) + group * (s.hd + kv.split_keys));
}

// The merge of DESIGN.md §7 for one output row over its splits, in log2 units, by one warp in one pass: the online
// rule of stage 3 applied to the partials. A lane takes four adjacent columns of O (one float4); when hd/4 < 32 the
// warp holds 32 / (hd/4) lane groups, each taking every 2nd (hd 64) or 4th (hd 32) split. A lane keeps a running max
// M, sum L and output o; for a split with max m_s, sum l_s and normalised output O_s:
//   M' = max(M, m_s),  L = e^(M - M') L + e^(m_s - M') l_s,  o = e^(M - M') o + e^(m_s - M') l_s O_s,
// and at the end the lane groups are combined by the same rule (shuffles) and O = o / L, LSE = M + log L. Every split
// holds at least one key, so l_s >= 1 (its largest score gives 2^0). The partials were written by other blocks:
// __ldcg reads them from L2, past this SM's L1. The loads of merge_batch splits are issued before any is used, so at
// 4096 keys (64 splits) and hd 64 a lane makes 32 / merge_batch = 4 L2 round trips. The merge before this one took
// two passes (the maximum and the weights first, then the outputs by lanes taking columns, 12 round trips): decode
// at positions 4032-4095 took 0.244-0.249 ms a token with this one against 0.255-0.263 ms (H200, 2026-12-04, three
// rounds side by side), positions 2-65 unchanged at 0.173-0.178 ms.
constexpr int merge_batch = 8;

template <int HD>
__device__ void merge_splits(float* out, float* lse, const DecodePartials parts, const int64_t first,
                             const int splits) {
    constexpr int columns = HD / 4, groups = columns <= 16 ? 32 / columns : 1;
    const int lane = threadIdx.x % 32, column = lane % columns, lane_group = lane / columns;
    float M = -INFINITY, L = 0.0f;
    float4 o = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int s0 = lane_group < groups ? lane_group : splits; s0 < splits; s0 += groups * merge_batch) {
        float m_s[merge_batch], l_s[merge_batch];
        float4 o_s[merge_batch];
#pragma unroll
        for (int b = 0; b < merge_batch; ++b) {
            const int s = s0 + b * groups;
            const bool inside = s < splits;  // a split past the end weighs e^(-inf) 0 = 0
            m_s[b] = inside ? __ldcg(parts.max + first + s) : -INFINITY;
            l_s[b] = inside ? __ldcg(parts.sum + first + s) : 0.0f;
            o_s[b] = inside ? __ldcg(reinterpret_cast<const float4*>(parts.out + (first + s) * HD) + column)
                            : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
        float M_new = M;
#pragma unroll
        for (int b = 0; b < merge_batch; ++b) M_new = fmaxf(M_new, m_s[b]);
        const float rescale = exp2f(M - M_new);  // M_new is finite: split s0 is inside
        L *= rescale, o.x *= rescale, o.y *= rescale, o.z *= rescale, o.w *= rescale;
#pragma unroll
        for (int b = 0; b < merge_batch; ++b) {
            const float w = exp2f(m_s[b] - M_new) * l_s[b];
            L += w, o.x = fmaf(w, o_s[b].x, o.x), o.y = fmaf(w, o_s[b].y, o.y);
            o.z = fmaf(w, o_s[b].z, o.z), o.w = fmaf(w, o_s[b].w, o.w);
        }
        M = M_new;
    }
#pragma unroll
    for (int offset = columns; offset < 32 && groups > 1; offset *= 2) {  // lane groups: the same rule
        const float M_other = __shfl_xor_sync(0xffffffffu, M, offset), L_other = __shfl_xor_sync(0xffffffffu, L, offset);
        float4 o_other;
        o_other.x = __shfl_xor_sync(0xffffffffu, o.x, offset), o_other.y = __shfl_xor_sync(0xffffffffu, o.y, offset);
        o_other.z = __shfl_xor_sync(0xffffffffu, o.z, offset), o_other.w = __shfl_xor_sync(0xffffffffu, o.w, offset);
        const float M_new = fmaxf(M, M_other), M_safe = M_new == -INFINITY ? 0.0f : M_new;  // both saw no split
        const float a = exp2f(M - M_safe), c = exp2f(M_other - M_safe);
        L = a * L + c * L_other;
        o = make_float4(a * o.x + c * o_other.x, a * o.y + c * o_other.y, a * o.z + c * o_other.z,
                        a * o.w + c * o_other.w);
        M = M_new;
    }
    if (lane < columns) reinterpret_cast<float4*>(out)[column] = make_float4(o.x / L, o.y / L, o.z / L, o.w / L);
    if (lane == 0) *lse = (M + log2f(L)) * ln_2;
}

template <int HD>
__global__ void __launch_bounds__(decode_threads)
    s7_decode_kernel(float* out, float* lse, const DecodePartials parts, const float* q, const float* k, const float* v,
                     const AttentionShape s, const SplitKv kv) {
    extern __shared__ float4 smem4[];
    __shared__ bool merges;
    const int group = s.H / s.G, split = blockIdx.x, splits = gridDim.x, g = blockIdx.y;
    const int b = blockIdx.z / s.Nq, i = blockIdx.z % s.Nq;
    float* k_s = reinterpret_cast<float*>(smem4);
    float* v_s = k_s + kv.split_keys * (HD + 4);
    float* q_s = v_s + kv.split_keys * HD;             // scaled by log2(e) / sqrt(hd)
    float* scores = q_s + group * HD;                  // S, then P
    const int past = kv.past_on_device ? *kv.past_on_device : kv.past;
    const int visible = s.causal ? min(past + s.Nq, past + i + 1) : past + s.Nq;  // keys [0, visible) of row i
    const int key0 = split * kv.split_keys, n_keys = max(0, min(kv.split_keys, visible - key0));
    // The grid is sized for a full cache; only the first `used` splits hold keys of this row. The others leave at once
    // (they write nothing), and when one split holds them all it is the whole answer: it writes O and LSE itself, with
    // no partials and no merge (with Bk = 64, every decode step at positions up to 64).
    const int used = max(1, int(ceil_div(visible, kv.split_keys)));
    if (split >= used) return;
    // Output row (b, head, i) of O [B, H, Nq, hd] and LSE; its partial of this split is at output_row * splits + split.
    const auto output_row = [&](const int head) { return (int64_t(b) * s.H + head) * s.Nq + i; };
    if (visible <= 0) {  // the row sees no key (causal with Nq > Nk): it gives 0, written by split 0 alone
        wait_for_previous_kernel();
        for (int f = threadIdx.x; f < group * HD; f += decode_threads) {
            out[output_row(g * group + f / HD) * HD + f % HD] = 0.0f;
            if (f % HD == 0) lse[output_row(g * group + f / HD)] = -INFINITY;
        }
        return;
    }
    const auto part = [&](const int head) { return output_row(head) * splits + split; };
    // The block's keys and values stream into shared memory (cp.async, a warp copies 512 contiguous bytes) while q
    // is loaded: both arrive with one wait. The keys before `past` were cached by earlier decode steps, so their copy
    // starts before the wait for the previous kernel (which writes this step's new rows).
    const float* k_head = k + (int64_t(b) * s.G + g) * kv.head_stride + int64_t(key0) * HD;
    const float* v_head = v + (int64_t(b) * s.G + g) * kv.head_stride + int64_t(key0) * HD;
    const auto copy_keys = [&](const int from, const int to) {
        for (int f = from * HD / 4 + threadIdx.x; f < to * HD / 4; f += decode_threads) {
            const int key = f / (HD / 4), d = (f % (HD / 4)) * 4;
            cp_async16(k_s + key * (HD + 4) + d, k_head + int64_t(key) * HD + d, 16);
            cp_async16(v_s + key * HD + d, v_head + int64_t(key) * HD + d, 16);
        }
    };
    const int cached_keys = max(0, min(n_keys, past - key0));
    copy_keys(0, cached_keys);
    wait_for_previous_kernel();
    // Only now may the next kernel start (a block that leaves early lets it start as it leaves). Each gemv lets its
    // successor start at once, so started at our start, o_proj and then [gate; up] would load their 15 MB of weights
    // while the q, k, v gemv still runs; the queue of those loads made that gemv's hand-over to this kernel 2.2-2.4
    // us against 0.8 us for the others (timeline, H200, 2026-12-03). Measured in the decode step: 0.180 -> 0.177 ms
    // a token at positions 2-65, 0.271 -> 0.268 ms at 3967-4031; started only at the exit: 0.186-0.189, 0.281-0.285.
    start_next_kernel();
    copy_keys(cached_keys, n_keys);
    for (int f = threadIdx.x; f < group * HD; f += decode_threads)
        q_s[f] = q[output_row(g * group + f / HD) * HD + f % HD] * (rsqrtf(float(HD)) * log2_e);
    cp_async_wait_all();
    __syncthreads();  // K, V and q are in shared memory
    // Scores: one thread per key, its K row in registers, one dot product per query head of the group, in four chains
    // (each FMA waits for the one before it in its chain): 0.293 -> 0.285 ms a token at positions 3967-4031 (H200).
    for (int j = threadIdx.x; j < n_keys; j += decode_threads) {
        float4 key[HD / 4];
#pragma unroll
        for (int d = 0; d < HD / 4; ++d) key[d] = reinterpret_cast<const float4*>(k_s + j * (HD + 4))[d];
        for (int h = 0; h < group; ++h) {
            const float4* q_h = reinterpret_cast<const float4*>(q_s + h * HD);
            float4 dot = {0.0f, 0.0f, 0.0f, 0.0f};  // four independent chains of hd/4 multiply-adds, not one of hd
#pragma unroll
            for (int d = 0; d < HD / 4; ++d) {
                const float4 qq = q_h[d];
                dot.x = fmaf(qq.x, key[d].x, dot.x), dot.y = fmaf(qq.y, key[d].y, dot.y);
                dot.z = fmaf(qq.z, key[d].z, dot.z), dot.w = fmaf(qq.w, key[d].w, dot.w);
            }
            scores[h * kv.split_keys + j] = (dot.x + dot.y) + (dot.z + dot.w);
        }
    }
    __syncthreads();  // every score is in shared memory
    // Per head, one warp (no more barriers): m = max, P = 2^(S - m), l = sum P, then lane d of the warp sums P V[:, d]
    // for its hd/32 columns d together, key after key: hd/32 independent chains of adds, not one chain after the other.
    // Measured in the decode step (H200, 2026-12-03, L12 D768 model): 0.220 -> 0.201 ms a token at positions 2-65 and
    // 0.341 -> 0.309 ms at 3967-4031 against the column-after-column loop.
    const int lane = threadIdx.x % 32;
    for (int h = threadIdx.x / 32; h < group; h += decode_threads / 32) {
        float* p = scores + h * kv.split_keys;
        float m = -INFINITY;
        for (int j = lane; j < n_keys; j += 32) m = fmaxf(m, p[j]);
        m = warp_max(m);
        float l = 0.0f;
        for (int j = lane; j < n_keys; j += 32) l += (p[j] = exp2f(p[j] - m));
        l = warp_sum(l);
        __syncwarp();  // every P of the head is written before any lane reads another's
        const int64_t row = output_row(g * group + h);
        float* o_row = used == 1 ? out + row * HD : parts.out + part(g * group + h) * HD;
        constexpr int per_lane = (HD + 31) / 32;
        float o[per_lane] = {};
#pragma unroll 4
        for (int j = 0; j < n_keys; ++j)
#pragma unroll
            for (int c = 0; c < per_lane; ++c)
                if (lane + 32 * c < HD) o[c] = fmaf(p[j], v_s[j * HD + lane + 32 * c], o[c]);
#pragma unroll
        for (int c = 0; c < per_lane; ++c)
            if (lane + 32 * c < HD) o_row[lane + 32 * c] = o[c] / l;
        if (lane == 0 && used == 1) lse[row] = (m + log2f(l)) * ln_2;
        if (lane == 0 && used > 1) parts.max[part(g * group + h)] = m, parts.sum[part(g * group + h)] = l;
    }
    if (used == 1) return;
    // The last of the `used` blocks of (b, g, i) to finish merges them, so no second kernel is launched: each block
    // makes its partials visible to the whole GPU (__threadfence) before it counts itself in.
    __threadfence();
    __syncthreads();
    unsigned* arrivals = parts.arrivals + int64_t(blockIdx.z) * s.G + g;
    if (threadIdx.x == 0) merges = atomicAdd(arrivals, 1u) == unsigned(used - 1);
    __syncthreads();
    if (!merges) return;
    __threadfence();  // the other blocks' partials are read after their arrivals were counted
    for (int h = threadIdx.x / 32; h < group; h += decode_threads / 32) {
        const int64_t row = output_row(g * group + h);
        merge_splits<HD>(out + row * HD, lse + row, parts, row * splits, used);
    }
    if (threadIdx.x == 0) *arrivals = 0;  // ready for the next call
}

// Q, O [B, H, Nq, hd], LSE [B, H, Nq]; K, V [B, G, .., hd] with heads kv.head_stride apart; Nk = past + Nq. With
// `overlapping`, the kernel is launched to overlap the one before it in `stream` (the decode step of the GPU model).
void decode_attention(const cudaStream_t stream, float* out, float* lse, const float* q, const float* k,
                      const float* v, const AttentionShape& s, const SplitKv& kv, DeviceBuffer<float>& workspace,
                      const bool overlapping = false) {
    check_attention_shape("7", s);
    check(kv.split_keys >= 1 && kv.capacity >= 1, "stage 7: split_keys and capacity must be positive");
    const int splits = decode_splits(kv);
    const DecodePartials parts =
        carve_decode_partials(workspace, int64_t(s.B) * s.H * s.Nq, splits, s.hd, int64_t(s.B) * s.Nq * s.G);
    dispatch_head_size("7", s.hd, [&](auto hd) {
        constexpr int HD = decltype(hd)::value;
        const dim3 grid(splits, s.G, s.B * s.Nq), block(decode_threads);
        const size_t smem = decode_smem_bytes(s, kv);
        if (overlapping)
            launch_overlapping(stream, "s7_decode", s7_decode_kernel<HD>, grid, block, smem, out, lse, parts, q, k, v,
                               s, kv);
        else
            launch_on(stream, "s7_decode", s7_decode_kernel<HD>, grid, block, smem, out, lse, parts, q, k, v, s, kv);
    });
}

// The stage-table launcher: K, V packed [B, G, Nk, hd], the Nq rows the last Nq keys (as in stages 2-6).
void s7_attention_decode_split(float* out, float* lse, const float* q, const float* k, const float* v,
                               const AttentionShape& s, DeviceBuffer<float>& workspace) {
    SplitKv kv;
    kv.head_stride = int64_t(s.Nk) * s.hd, kv.capacity = s.Nk, kv.split_keys = decode_split_keys;
    kv.past = s.Nk - s.Nq;
    decode_attention(nullptr, out, lse, q, k, v, s, kv, workspace);
}

// ==== Stage 8: tensor cores, split-precision TF32 (3xTF32) ====
// Stage 8: stage 6's loop with its two products per tile, S = Q K_j^T and acc += P V_j, on the tensor cores. A tensor
// core multiplies TF32 numbers (fp32 with a 10-bit mantissa) and adds in fp32, many times faster than the FMA units,
// but one TF32 product keeps only about 3 decimal digits: scores of +-80 would be off by 0.04, 4% in e^s. Splitting
// each operand x = big + small, both TF32, and summing three products
//   a b ~ a_big b_big + a_big b_small + a_small b_big          (a_small b_small, under 2^-22 |a b|, is dropped)
// brings back nearly fp32's accuracy at three tensor-core products per product (3xTF32).
// The instruction is mma.sync m16n8k8: a warp multiplies a 16 x 8 tile of A by an 8 x 8 tile of B into a 16 x 8 tile
// of C, each lane holding fixed elements (g = lane / 4, t = lane % 4):
//   A: (g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4);   B: (k = t, n = g), (t + 4, g);
//   C: (g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1).
// A warp owns 16 query rows, a block 128 (8 warps), and K/V tiles of 64 keys come in as in stage 4, copied by all the
// block's threads (cp.async, V_j while S is computed, K_j+1 while P V_j is). S's C tiles become P's A tiles in the
// registers they are in, with no shuffle and no trip through shared memory: within each group of 8 keys, the product's
// k index t stands for key 2t and t + 4 for key 2t + 1, and V's B tile is read in that order of keys. Q, K and V rows
// sit in shared memory at a stride of hd + 4 floats, so each fragment load hits 32 different banks. Masks, tile
// skipping and the online softmax are stage 6's, applied to the C tiles (the 4 lanes of a group share a row: two
// shuffles for its max).
// Changes from stage 6: both products as mma.sync on split operands, P kept in registers. Faster because a tensor core
// instruction does 2048 flops where an FFMA does 64, so even at three per product and the splitting around them the FMA
// pipe's limit is left behind. Measured (H200, 2026-12-04, ./gpt_cuda bench): B2 H16 N8192 d128 18.40 ms, 59.8 TFLOP/s
// (1.33x stage 6), causal 9.67 ms, 56.8 (1.33x); B4 H16 N4096 d64 60.7 (1.45x), causal 54.6 (1.48x); B8 H12 N1024 d64
// 58.5, causal 40.5 (58.6, 55.6, 59.7, 53.1, 57.6 and 39.8 when it landed, 2026-12-03). What it took, each step
// measured against the one before (H200, 2026-12-03, two device runs of ./gpt_cuda run --stage 8 --runs 10, d128 / d64
// as above; stage 6 41.8 / 39.7 TFLOP/s):
//   1. the three products of each tile back to back, the split by cvt.rna.tf32:            39.7 / 38.7 TFLOP/s
//   2. S kept in registers: a loop over S's tiles that was not unrolled indexed the array
//      with a variable, which puts it in local memory (ptxas: 128 bytes of stack):          d64 40.4
//   3. the three products as three passes over all the tiles that share one A tile (so
//      consecutive mma do not wait for each other's accumulator):                          d64 40.8
//   4. two blocks an SM at hd <= 80 (128 registers; ptxas spills a few bytes at 64 and 80): 44.8 / 44.5
//   5. the split by an integer add and a mask instead of cvt.rna.tf32, which sm_90 runs as
//      four instructions (an infinity test, the add, the mask, a select): 3 a split, not 9
//      (ncu at step 4: the ALU pipe was 50% busy, the tensor pipe 42%):                    58.5 / 59.8
// Splitting K and V once per tile into shared memory, instead of every warp splitting its fragments, helped while the
// split was expensive (d64 50.9 against 44.5 at step 4) and hurt after step 5 (48.4 / 54.3 against 58.5 / 59.8).
// Accuracy: max |error| 5e-6 at d128 against stage 6's 4e-7, twenty times inside the tolerance (1e-4 + 1e-3 |ref|).
constexpr int s8_rows = 128, s8_threads = 256;  // 8 warps of 16 rows; K/V tiles of flash_keys (64) keys
static_assert(flash_keys == 64, "stage 8 loads its K/V tiles with stage 4's loader");
template <int HD>
constexpr int s8_stride = HD + 4;
template <int HD>
constexpr size_t s8_smem_bytes = sizeof(float) * size_t(s8_rows + 2 * flash_keys) * s8_stride<HD>;

// x = big + small, both as the 32-bit patterns the tensor core reads. big is x rounded to TF32 (add half a TF32 ulp to
// the bit pattern, clear the 13 low bits: round half away from zero); small = x - big is exact in fp32, and the tensor
// core reads only its top 11 significant bits, which drops less than 2^-22 |x|.
struct Tf32Split {
    uint32_t big, small;
};
__device__ Tf32Split split_tf32(const float x) {
    const uint32_t big = (__float_as_uint(x) + 0x1000u) & 0xffffe000u;
    return {big, __float_as_uint(x - __uint_as_float(big))};
}

// c += a b for one m16n8k8 tile: a[4], b[2] are this lane's elements (layout above) as TF32, c[4] fp32.
__device__ void mma_tf32(float (&c)[4], const uint32_t a0, const uint32_t a1, const uint32_t a2, const uint32_t a3,
                         const uint32_t b0, const uint32_t b1) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// c[i] += a b[i] for N tiles sharing one A, in 3xTF32: each of the three products is one pass over the N tiles, so
// an mma never waits for the one just before it (the small products first, so they are not lost against the big one).
template <int N>
__device__ void mma_3xtf32(float (*c)[4], const Tf32Split (&a)[4], const Tf32Split (&b)[N][2]) {
#pragma unroll
    for (int i = 0; i < N; ++i) mma_tf32(c[i], a[0].small, a[1].small, a[2].small, a[3].small, b[i][0].big, b[i][1].big);
#pragma unroll
    for (int i = 0; i < N; ++i) mma_tf32(c[i], a[0].big, a[1].big, a[2].big, a[3].big, b[i][0].small, b[i][1].small);
#pragma unroll
    for (int i = 0; i < N; ++i) mma_tf32(c[i], a[0].big, a[1].big, a[2].big, a[3].big, b[i][0].big, b[i][1].big);
}

template <int HD>
__global__ void __launch_bounds__(s8_threads, HD <= 80 ? 2 : 1)
    s8_attention_tensor_cores_kernel(float* out, float* lse, const float* q, const float* k, const float* v,
                                     const AttentionShape s) {
    constexpr int S = s8_stride<HD>, key_tiles = flash_keys / 8;
    extern __shared__ float4 smem4[];
    float* q_s = reinterpret_cast<float*>(smem4);  // [128][hd + 4], scaled by log2(e) / sqrt(hd)
    float* k_s = q_s + s8_rows * S;                 // [64][hd + 4]
    float* v_s = k_s + flash_keys * S;              // [64][hd + 4]
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4, m0 = threadIdx.x / 32 * 16;
    // Rows, keys and heads as in stage 6, the longest blocks first.
    const int row0 = (gridDim.x - 1 - blockIdx.x) * s8_rows, head = blockIdx.y, kv_head = head / (s.H / s.G);
    const auto [key_end, full_end] = block_keys(s, row0, s8_rows);
    const float* k_head = k + int64_t(kv_head) * s.Nk * HD;
    const float* v_head = v + int64_t(kv_head) * s.Nk * HD;
    if (key_end > 0) load_kv_tile_async<HD, s8_threads>(k_s, S, k_head, 0, s.Nk, threadIdx.x);
    const float* q_head = q + int64_t(head) * s.Nq * HD;
    const float q_scale = rsqrtf(float(HD)) * log2_e;
    for (int f = threadIdx.x; f < s8_rows * HD / 4; f += s8_threads) {
        const int row = f / (HD / 4), d = (f % (HD / 4)) * 4;
        float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (row0 + row < s.Nq) x = *reinterpret_cast<const float4*>(q_head + int64_t(row0 + row) * HD + d);
        *reinterpret_cast<float4*>(q_s + row * S + d) =
            make_float4(x.x * q_scale, x.y * q_scale, x.z * q_scale, x.w * q_scale);
    }
    // This lane's share of O (rows g and g + 8 of the warp, columns 8c + 2t and 8c + 2t + 1), and m, l of its 2 rows.
    float acc[HD / 8][4] = {}, m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    cp_async_wait_all();
    __syncthreads();  // Q and K_0 are in shared memory
    for (int key0 = 0; key0 < key_end; key0 += flash_keys) {
        load_kv_tile_async<HD, s8_threads>(v_s, S, v_head, key0, s.Nk, threadIdx.x);  // V_j arrives while S is computed
        // S = Q K_j^T: the warp's 16 rows x 64 keys, 8 C tiles; hd / 8 steps of k, each one A tile of Q and 8 B
        // tiles of K.
        float scores[key_tiles][4] = {};
#pragma unroll 2
        for (int k0 = 0; k0 < HD; k0 += 8) {
            const float* q_row = q_s + (m0 + g) * S + k0 + t;
            const Tf32Split a[4] = {split_tf32(q_row[0]), split_tf32(q_row[8 * S]), split_tf32(q_row[4]),
                                    split_tf32(q_row[8 * S + 4])};
            Tf32Split b[key_tiles][2];
#pragma unroll
            for (int n = 0; n < key_tiles; ++n) {
                const float* k_row = k_s + (8 * n + g) * S + k0 + t;
                b[n][0] = split_tf32(k_row[0]), b[n][1] = split_tf32(k_row[4]);
            }
            mma_3xtf32(scores, a, b);
        }
        if (key0 + flash_keys > full_end) {  // a tile crossing the diagonal or the end of K: mask as stage 6 does
#pragma unroll
            for (int n = 0; n < key_tiles; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int row = row0 + m0 + g + 8 * (e / 2), key = key0 + 8 * n + 2 * t + e % 2;
                    if (key >= visible_keys(row, s.Nq, s.Nk, s.causal)) scores[n][e] = -INFINITY;
                }
        }
        // Online softmax of the lane's two rows (r = 0: row g, elements 0 and 1; r = 1: row g + 8, elements 2 and 3).
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float tile_max = -INFINITY;
#pragma unroll
            for (int n = 0; n < key_tiles; ++n) tile_max = fmaxf(tile_max, fmaxf(scores[n][2 * r], scores[n][2 * r + 1]));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
            const float m_new = fmaxf(m[r], tile_max);
            const float m_safe = m_new == -INFINITY ? 0.0f : m_new;  // a row that has seen no key keeps P = 0
            const float correction = exp2_flush(m[r] - m_safe);
            float sum = 0.0f;
#pragma unroll
            for (int n = 0; n < key_tiles; ++n) {
                sum += (scores[n][2 * r] = exp2_flush(scores[n][2 * r] - m_safe));
                sum += (scores[n][2 * r + 1] = exp2_flush(scores[n][2 * r + 1] - m_safe));
            }
            l[r] = l[r] * correction + sum;  // the lane's share; the 4 shares of a row are added once, at the end
#pragma unroll
            for (int c = 0; c < HD / 8; ++c) acc[c][2 * r] *= correction, acc[c][2 * r + 1] *= correction;
            m[r] = m_new;
        }
        cp_async_wait_all();
        __syncthreads();  // V_j is complete, and every warp is done reading K_j
        if (key0 + flash_keys < key_end)
            load_kv_tile_async<HD, s8_threads>(k_s, S, k_head, key0 + flash_keys, s.Nk, threadIdx.x);
        // acc += P V_j, 8 keys at a time: P's A tile is S's C tile n (k index t = key 2t, t + 4 = key 2t + 1), and
        // the B tiles are V's rows 8n + 2t and 8n + 2t + 1, groups of output columns at a time.
        constexpr int column_tiles = HD / 8 <= 8 ? HD / 8 : HD / 16;  // B tiles per pass: 4, 8, 5, 8 at hd 32-128
#pragma unroll
        for (int n = 0; n < key_tiles; ++n) {
            const Tf32Split p[4] = {split_tf32(scores[n][0]), split_tf32(scores[n][2]), split_tf32(scores[n][1]),
                                    split_tf32(scores[n][3])};
            const float* v_row = v_s + (8 * n + 2 * t) * S + g;
#pragma unroll
            for (int c0 = 0; c0 < HD / 8; c0 += column_tiles) {
                Tf32Split b[column_tiles][2];
#pragma unroll
                for (int i = 0; i < column_tiles; ++i)
                    b[i][0] = split_tf32(v_row[8 * (c0 + i)]), b[i][1] = split_tf32(v_row[S + 8 * (c0 + i)]);
                mma_3xtf32(acc + c0, p, b);
            }
        }
        cp_async_wait_all();
        __syncthreads();  // K_j+1 is complete, and every warp is done reading V_j
    }
    // O = acc / l and LSE = (m + log2 l) ln 2; a row with l = 0 saw no key: O = 0, LSE = -inf.
    float* out_head = out + int64_t(head) * s.Nq * HD;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l_row = l[r] + __shfl_xor_sync(0xffffffffu, l[r], 1);  // every lane shuffles before any skips a row
        l_row += __shfl_xor_sync(0xffffffffu, l_row, 2);
        const int row = row0 + m0 + g + 8 * r;
        if (row >= s.Nq) continue;
        const float inv_l = l_row > 0.0f ? 1.0f / l_row : 0.0f;
#pragma unroll
        for (int c = 0; c < HD / 8; ++c)
            *reinterpret_cast<float2*>(out_head + int64_t(row) * HD + 8 * c + 2 * t) =
                make_float2(acc[c][2 * r] * inv_l, acc[c][2 * r + 1] * inv_l);
        if (t == 0) lse[int64_t(head) * s.Nq + row] = l_row > 0.0f ? (m[r] + log2f(l_row)) * ln_2 : -INFINITY;
    }
}

void s8_attention_tensor_cores(float* out, float* lse, const float* q, const float* k, const float* v,
                               const AttentionShape& s, DeviceBuffer<float>&) {
    check_attention_shape("8", s);
    dispatch_head_size("8", s.hd, [&](auto hd) {
        constexpr int HD = decltype(hd)::value;
        launch("s8_attention_tensor_cores", s8_attention_tensor_cores_kernel<HD>,
               dim3(ceil_div(s.Nq, s8_rows), s.B * s.H), dim3(s8_threads), s8_smem_bytes<HD>, out, lse, q, k, v, s);
    });
}

// ==== Runner ====
// The stages[] table names every stage once: its id (the CLI's --stage, the bench table's first column and the
// prefix of its kernels), its launcher and its idea. run_stage() makes random inputs, computes the reference with
// gpt.cpp, launches the stage, checks every value it can (DESIGN.md §7) and only then times it.

enum class StageKind { elementwise, row_reduce, row_softmax, matmul, matmul_qk, attention };

using ElementwiseLaunch = void (*)(float*, const float*, float, int64_t);
using RowsLaunch = void (*)(float*, const float*, int, int);
using MatmulLaunch = void (*)(float*, const float*, const float*, const MatmulShape&);
using AttentionLaunch = void (*)(float*, float*, const float*, const float*, const float*, const AttentionShape&,
                                 DeviceBuffer<float>&);

struct Stage {
    const char* id;      // "0a" ... "8"
    const char* kernel;  // its launcher
    const char* idea;
    StageKind kind;
    ElementwiseLaunch elementwise = nullptr;  // the one launcher that matches `kind` is set
    RowsLaunch rows = nullptr;
    MatmulLaunch matmul = nullptr;
    AttentionLaunch attention = nullptr;
};

const Stage stages[] = {
    {.id = "0a",
     .kernel = "s0a_scale",
     .idea = "element-wise scale, one thread per element",
     .kind = StageKind::elementwise,
     .elementwise = s0a_scale},
    {.id = "0b",
     .kernel = "s0b_row_sum",
     .idea = "block reduction: shared-memory tree, then warp shuffles",
     .kind = StageKind::row_reduce,
     .rows = s0b_row_sum},
    {.id = "0c",
     .kernel = "s0c_softmax_rows",
     .idea = "row softmax in three passes: max, sum, normalise",
     .kind = StageKind::row_softmax,
     .rows = s0c_softmax_rows},
    {.id = "1a",
     .kernel = "s1a_matmul_naive",
     .idea = "matmul, one thread per output",
     .kind = StageKind::matmul,
     .matmul = s1a_matmul_naive},
    {.id = "1b",
     .kernel = "s1b_matmul_smem_tiled",
     .idea = "matmul, 32 x 32 shared-memory tiles",
     .kind = StageKind::matmul,
     .matmul = s1b_matmul_smem_tiled},
    {.id = "1c",
     .kernel = "s1c_matmul_register_tiled",
     .idea = "matmul, 8 x 8 register tile per thread",
     .kind = StageKind::matmul,
     .matmul = s1c_matmul_register_tiled},
    {.id = "1d",
     .kernel = "s1d_matmul_qk_transposed",
     .idea = "S = Q K^T, second operand read transposed",
     .kind = StageKind::matmul_qk,
     .matmul = s1d_matmul_qk_transposed},
    {.id = "2",
     .kernel = "s2_attention_naive",
     .idea = "naive attention: S in global memory, 3 kernels",
     .kind = StageKind::attention,
     .attention = s2_attention_naive},
    {.id = "3a",
     .kernel = "s3a_softmax_online",
     .idea = "one-pass (online) softmax",
     .kind = StageKind::row_softmax,
     .rows = s3a_softmax_online},
    {.id = "3b",
     .kernel = "s3b_attention_streaming",
     .idea = "streaming attention, one thread per query row",
     .kind = StageKind::attention,
     .attention = s3b_attention_streaming},
    {.id = "4",
     .kernel = "s4_attention_flash1",
     .idea = "tiled, FlashAttention-1 loop order (O in global memory)",
     .kind = StageKind::attention,
     .attention = s4_attention_flash1},
    {.id = "5",
     .kernel = "s5_attention_flash2",
     .idea = "fused FlashAttention-2, state in registers, copy warps",
     .kind = StageKind::attention,
     .attention = s5_attention_flash2},
    {.id = "6",
     .kernel = "s6_attention_flash_causal",
     .idea = "causal tile skipping, diagonal-only masks; equal shares unmasked",
     .kind = StageKind::attention,
     .attention = s6_attention_flash_causal},
    {.id = "7",
     .kernel = "s7_attention_decode_split",
     .idea = "decode: keys split across blocks, partials merged (flash-decoding)",
     .kind = StageKind::attention,
     .attention = s7_attention_decode_split},
    {.id = "8",
     .kernel = "s8_attention_tensor_cores",
     .idea = "stage 6 on the tensor cores, split-precision TF32 (3xTF32)",
     .kind = StageKind::attention,
     .attention = s8_attention_tensor_cores},
};

// The bench's yardstick for stage 1, run through the same check; not a stage of the course.
const Stage cublas_yardstick = {.id = "cuBLAS",
                                .kernel = "cublasSgemm",
                                .idea = "cuBLAS SGEMM (yardstick)",
                                .kind = StageKind::matmul,
                                .matmul = cublas_sgemm};

const Stage& find_stage(const std::string_view id) {
    std::string known;
    for (const Stage& stage : stages) {
        if (id == stage.id) return stage;
        known += std::string(" ") + stage.id;
    }
    throw Error("unknown stage '" + std::string(id) + "' (stages:" + known + ")");
}

// What one run works on. Attention stages take `shape` as it is; stage 0 and 3a work on the score matrix
// x [B*H*Nq, Nk]; stage 1 on B*H products P [Nq, Nk] @ V [Nk, hd] (1a-1c) or Q [Nq, hd] @ K [Nk, hd]^T (1d).
struct RunConfig {
    AttentionShape shape;
    float score_std =
        1.0f;  // standard deviation of the scores (and of x); 40 makes a missing max-subtraction overflow
    uint64_t seed = 1;
    int timed_runs = 10;   // 0: check only
    int sample_rows = -1;  // rows checked per sampled head or matrix: 0 = all, -1 = all unless the CPU would be slow
};

// The reference for out[out_begin ...] and lse[lse_begin ...]: one contiguous piece of the output.
struct ReferenceSlice {
    int64_t out_begin = 0;
    std::vector<float> out;
    int64_t lse_begin = 0;
    std::vector<float> lse;
};

struct Problem {
    StageKind kind = StageKind::attention;
    RunConfig config;
    int rows = 0, cols = 0;                   // stage 0 and 3a: x [rows, cols]
    float scale = 1.0f;                       // stage 0a: 1 / sqrt(hd)
    MatmulShape matmul;                       // stage 1
    DeviceBuffer<float> a, b, c;              // inputs: x | A, B | Q, K, V
    DeviceBuffer<float> out, lse, workspace;  // outputs and a stage's scratch (S for stage 2; m, l for stage 4)
    std::vector<ReferenceSlice> expected;
    int64_t checked_rows = 0, total_rows = 0;
    double atol = 1e-4, rtol = 1e-3;  // DESIGN.md §7; stage 1 widens atol (see make_matmul_problem)
    double flops = 0, bytes = 0;      // work of one run, and the DRAM traffic if every input is read once
    std::string workload;
};

// Row ranges the reference computes: all of [0, n), or the first and last `sample` rows.
std::vector<std::pair<int, int>> checked_ranges(const int n, const int sample) {
    if (sample <= 0 || 2 * sample >= n) return {{0, n}};
    return {{0, sample}, {n - sample, n}};
}

// The CPU reference runs at a few GFLOP/s: beyond ~4 GFLOP the bench checks the first and last 256 rows of two heads.
int resolve_sample(const RunConfig& config, const double reference_flops) {
    if (config.sample_rows >= 0) return config.sample_rows;
    return reference_flops > 4e9 ? 256 : 0;
}

std::vector<float> random_vector(Rng& rng, const size_t n, const float std) {
    std::vector<float> x(n);
    for (float& value : x) value = std * rng.normal();
    return x;
}

DeviceBuffer<float> to_device(const std::vector<float>& host) {
    DeviceBuffer<float> buffer(host.size());
    buffer.upload(host);
    return buffer;
}

std::string attention_workload(const AttentionShape& s) {
    std::string text = "B" + std::to_string(s.B) + " H" + std::to_string(s.H);
    if (s.G != s.H) text += "/G" + std::to_string(s.G);
    text += s.Nq == s.Nk ? " N" + std::to_string(s.Nq) : " Nq" + std::to_string(s.Nq) + " Nk" + std::to_string(s.Nk);
    return text + " d" + std::to_string(s.hd) + (s.causal ? " causal" : "");
}

// Stage 0 and 3a: x [B*H*Nq, Nk] ~ N(0, score_std^2).
Problem make_rows_problem(const StageKind kind, const RunConfig& config) {
    const AttentionShape& s = config.shape;
    Problem p;
    p.kind = kind, p.config = config;
    const int64_t rows = int64_t(s.B) * s.H * s.Nq;
    check(rows <= INT32_MAX, "stage 0: " + std::to_string(rows) + " rows exceed the grid");
    p.rows = int(rows), p.cols = s.Nk, p.scale = 1.0f / std::sqrt(float(s.hd));
    p.workload = "x [" + std::to_string(p.rows) + ", " + std::to_string(p.cols) + "]";
    const size_t count = size_t(p.rows) * p.cols;
    Rng rng(config.seed);
    const std::vector<float> x = random_vector(rng, count, config.score_std);
    p.a = to_device(x);
    p.total_rows = p.rows;
    if (kind == StageKind::elementwise) {
        ReferenceSlice slice;
        slice.out.resize(count);
        for (size_t i = 0; i < count; ++i) slice.out[i] = p.scale * x[i];
        p.expected.push_back(std::move(slice));
        p.out = DeviceBuffer<float>(count);
        p.checked_rows = p.rows, p.flops = double(count), p.bytes = 8.0 * count;
        return p;
    }
    const int sample = resolve_sample(config, 5.0 * count);
    for (const auto& [r0, r1] : checked_ranges(p.rows, sample)) {
        ReferenceSlice slice;
        const std::span<const float> x_rows(x.data() + size_t(r0) * p.cols, size_t(r1 - r0) * p.cols);
        if (kind == StageKind::row_reduce) {
            slice.out_begin = r0;
            for (int r = 0; r < r1 - r0; ++r) {
                double sum = 0.0;
                for (int c = 0; c < p.cols; ++c) sum += x_rows[size_t(r) * p.cols + c];
                slice.out.push_back(float(sum));
            }
        } else {
            slice.out_begin = int64_t(r0) * p.cols;
            slice.out.resize(x_rows.size());
            softmax_rows(slice.out, x_rows, r1 - r0, p.cols);
        }
        p.checked_rows += r1 - r0;
        p.expected.push_back(std::move(slice));
    }
    const bool reduce = kind == StageKind::row_reduce;
    p.out = DeviceBuffer<float>(reduce ? size_t(p.rows) : count);
    p.flops = (reduce ? 1.0 : 5.0) * count;  // softmax: max, subtract, exp, add, divide per element
    p.bytes = 4.0 * count + 4.0 * (reduce ? p.rows : count);
    return p;
}

// Stage 1: B*H products; product z reads B batch z / (H/G). A, B ~ N(0, 1).
Problem make_matmul_problem(const StageKind kind, const RunConfig& config) {
    const AttentionShape& s = config.shape;
    const bool qk = kind == StageKind::matmul_qk;
    Problem p;
    p.kind = kind, p.config = config;
    MatmulShape& m = p.matmul;
    m.M = s.Nq, m.N = qk ? s.Nk : s.hd, m.K = qk ? s.hd : s.Nk;
    m.batch = s.B * s.H, m.b_group = s.H / s.G;
    m.stride_a = int64_t(m.M) * m.K, m.stride_b = int64_t(m.K) * m.N, m.stride_c = int64_t(m.M) * m.N;
    const int b_batches = m.batch / m.b_group;
    p.workload = (m.batch > 1 ? std::to_string(m.batch) + " x " : std::string()) + "M" + std::to_string(m.M) + " N" +
                 std::to_string(m.N) + " K" + std::to_string(m.K) + (qk ? " (B transposed)" : "");
    Rng rng(config.seed);
    const std::vector<float> a = random_vector(rng, size_t(m.batch) * m.stride_a, 1.0f);
    const std::vector<float> b = random_vector(rng, size_t(b_batches) * m.stride_b, 1.0f);
    p.a = to_device(a), p.b = to_device(b);
    p.out = DeviceBuffer<float>(size_t(m.batch) * m.stride_c);
    // A dot product of K unit-size terms carries rounding error that grows like sqrt(K), and the CPU and the GPU sum in
    // different orders, so the absolute tolerance grows with sqrt(K) (relative to results of size ~ sqrt(K)).
    p.atol = 1e-4 * std::sqrt(double(m.K));
    const int sample = resolve_sample(config, 2.0 * m.batch * m.M * m.N * m.K);
    std::vector<int> batches;
    for (int z = 0; z < m.batch; ++z)
        if (sample == 0 || z == 0 || z == m.batch - 1) batches.push_back(z);
    p.total_rows = int64_t(m.batch) * m.M;
    for (const int z : batches) {
        // matmul_forward computes x @ w^T with w [N, K]: that is B itself for 1d, and B transposed for 1a-1c.
        const float* b_z = b.data() + size_t(z / m.b_group) * m.stride_b;
        std::vector<float> w(b_z, b_z + m.stride_b);
        if (!qk)
            for (int k = 0; k < m.K; ++k)
                for (int n = 0; n < m.N; ++n) w[size_t(n) * m.K + k] = b_z[size_t(k) * m.N + n];
        for (const auto& [r0, r1] : checked_ranges(m.M, sample)) {
            ReferenceSlice slice;
            slice.out_begin = z * m.stride_c + int64_t(r0) * m.N;
            slice.out.resize(size_t(r1 - r0) * m.N);
            matmul_forward(
                slice.out,
                std::span<const float>(a.data() + z * m.stride_a + size_t(r0) * m.K, size_t(r1 - r0) * m.K), w,
                r1 - r0, m.K, m.N);
            p.checked_rows += r1 - r0;
            p.expected.push_back(std::move(slice));
        }
    }
    p.flops = 2.0 * m.batch * m.M * m.N * m.K;
    p.bytes = 4.0 * (double(m.batch) * m.stride_a + double(b_batches) * m.stride_b + double(m.batch) * m.stride_c);
    return p;
}

// Query/key pairs that attention evaluates: Nq * Nk, or, when causal, the pairs with j <= i + Nk - Nq.
double visible_pairs(const AttentionShape& s) {
    if (!s.causal) return double(s.Nq) * s.Nk;
    double pairs = 0.0;
    for (int i = 0; i < s.Nq; ++i) pairs += std::clamp(i + s.Nk - s.Nq + 1, 0, s.Nk);
    return pairs;
}

// Attention: Q, K ~ N(0, score_std) so the scores q.k / sqrt(hd) have standard deviation score_std; V ~ N(0, 1).
Problem make_attention_problem(const RunConfig& config) {
    const AttentionShape& s = config.shape;
    check_attention_shape("run", s);
    Problem p;
    p.kind = StageKind::attention, p.config = config;
    p.workload = attention_workload(s);
    const size_t q_size = size_t(s.H) * s.Nq * s.hd, kv_size = size_t(s.G) * s.Nk * s.hd;  // one sequence
    Rng rng(config.seed);
    const float qk_std = std::sqrt(config.score_std);
    const std::vector<float> q = random_vector(rng, s.B * q_size, qk_std);
    const std::vector<float> k = random_vector(rng, s.B * kv_size, qk_std);
    const std::vector<float> v = random_vector(rng, s.B * kv_size, 1.0f);
    p.a = to_device(q), p.b = to_device(k), p.c = to_device(v);
    p.out = DeviceBuffer<float>(s.B * q_size);
    p.lse = DeviceBuffer<float>(size_t(s.B) * s.H * s.Nq);
    p.total_rows = int64_t(s.B) * s.H * s.Nq;
    const double pairs = visible_pairs(s);
    p.flops = 4.0 * s.B * s.H * pairs * s.hd;
    p.bytes = 4.0 * (2.0 * s.B * q_size + 2.0 * s.B * kv_size + double(s.B) * s.H * s.Nq);
    const int sample = resolve_sample(config, p.flops);
    if (sample == 0) {
        // The whole output: one call of gpt.cpp's attention per sequence (it maps query heads to K/V heads itself).
        for (int b = 0; b < s.B; ++b) {
            ReferenceSlice slice;
            slice.out_begin = b * q_size, slice.out.resize(q_size);
            slice.lse_begin = int64_t(b) * s.H * s.Nq, slice.lse.resize(size_t(s.H) * s.Nq);
            attention_forward(slice.out, slice.lse, std::span<const float>(q).subspan(b * q_size, q_size),
                              std::span<const float>(k).subspan(b * kv_size, kv_size),
                              std::span<const float>(v).subspan(b * kv_size, kv_size), s.H, s.G, s.Nq, s.Nk, s.hd,
                              s.causal);
            p.expected.push_back(std::move(slice));
        }
        p.checked_rows = p.total_rows;
        return p;
    }
    // Sampled: rows [r0, r1) of heads (0, 0) and (B-1, H-1). Because causal rows are bottom-right aligned, rows r0..r1-1
    // against the first min(Nk, r1 + Nk - Nq) keys form a smaller attention problem of the same kind.
    struct Piece {
        int b, h, r0, r1;
    };
    std::vector<Piece> pieces;
    for (const auto& [b, h] : {std::pair{0, 0}, std::pair{s.B - 1, s.H - 1}}) {
        if (!pieces.empty() && pieces.front().b == b && pieces.front().h == h) break;
        for (const auto& [r0, r1] : checked_ranges(s.Nq, sample)) pieces.push_back({b, h, r0, r1});
    }
    p.expected.resize(pieces.size());
    parallel_for(int(pieces.size()), p.flops, [&](const int index) {
        const auto [b, h, r0, r1] = pieces[index];
        const int rows = r1 - r0, keys = s.causal ? std::min(s.Nk, r1 + s.Nk - s.Nq) : s.Nk;
        const size_t head = size_t(b) * s.H + h, kv_head = size_t(b) * s.G + h / (s.H / s.G);
        ReferenceSlice& slice = p.expected[index];
        slice.out_begin = (head * s.Nq + r0) * s.hd, slice.out.assign(size_t(rows) * s.hd, 0.0f);
        slice.lse_begin = head * s.Nq + r0, slice.lse.assign(rows, -std::numeric_limits<float>::infinity());
        if (keys <= 0) return;  // no row of the piece sees a key
        attention_forward(slice.out, slice.lse,
                          std::span<const float>(q).subspan((head * s.Nq + r0) * s.hd, size_t(rows) * s.hd),
                          std::span<const float>(k).subspan(kv_head * s.Nk * s.hd, size_t(keys) * s.hd),
                          std::span<const float>(v).subspan(kv_head * s.Nk * s.hd, size_t(keys) * s.hd), 1, 1, rows,
                          keys, s.hd, s.causal);
    });
    for (const Piece& piece : pieces) p.checked_rows += piece.r1 - piece.r0;
    return p;
}

Problem make_problem(const StageKind kind, const RunConfig& config) {
    switch (kind) {
        case StageKind::elementwise:
        case StageKind::row_reduce:
        case StageKind::row_softmax: return make_rows_problem(kind, config);
        case StageKind::matmul:
        case StageKind::matmul_qk: return make_matmul_problem(kind, config);
        case StageKind::attention: return make_attention_problem(config);
    }
    throw Error("unknown stage kind");
}

void launch_stage(const Stage& stage, Problem& p) {
    switch (stage.kind) {
        case StageKind::elementwise:
            stage.elementwise(p.out.data, p.a.data, p.scale, int64_t(p.rows) * p.cols);
            return;
        case StageKind::row_reduce:
        case StageKind::row_softmax: stage.rows(p.out.data, p.a.data, p.rows, p.cols); return;
        case StageKind::matmul:
        case StageKind::matmul_qk: stage.matmul(p.out.data, p.a.data, p.b.data, p.matmul); return;
        case StageKind::attention:
            stage.attention(p.out.data, p.lse.data, p.a.data, p.b.data, p.c.data, p.config.shape, p.workspace);
            return;
    }
}

struct StageResult {
    bool passed = true;
    std::string failure;                          // the first value out of tolerance, when !passed
    double max_error = 0.0, max_lse_error = 0.0;  // largest |gpu - cpu| over the checked values
    int64_t checked_rows = 0, total_rows = 0;
    double ms = 0.0, tflops = 0.0, gbps = 0.0;  // median time of the timed runs; 0 when not timed
};

// |gpu - ref| <= atol + rtol |ref|, written so that NaN fails; equal infinities (the LSE of a row that sees no key) pass.
bool close_enough(const float gpu, const float ref, const double atol, const double rtol) {
    if (gpu == ref) return true;
    return std::fabs(double(gpu) - double(ref)) <= atol + rtol * std::fabs(double(ref));
}

// Compares one output against its reference slices, and checks that no value anywhere is NaN (the poison of an
// element that was never written).
void compare_output(StageResult& result, double& max_error, const char* name, const std::vector<float>& gpu,
                    const std::vector<ReferenceSlice>& expected, const bool lse, const Problem& p) {
    for (const ReferenceSlice& slice : expected) {
        const std::vector<float>& ref = lse ? slice.lse : slice.out;
        const int64_t begin = lse ? slice.lse_begin : slice.out_begin;
        for (size_t i = 0; i < ref.size(); ++i) {
            const float value = gpu[begin + i];
            if (value != ref[i])
                max_error = std::max(max_error, std::isnan(value) ? INFINITY : std::fabs(double(value) - ref[i]));
            if (result.passed && !close_enough(value, ref[i], p.atol, p.rtol)) {
                result.passed = false;
                result.failure = std::string(name) + "[" + std::to_string(begin + i) +
                                 "] = " + std::to_string(value) + ", expected " + std::to_string(ref[i]);
            }
        }
    }
    for (size_t i = 0; i < gpu.size() && result.passed; ++i)
        if (std::isnan(gpu[i])) {
            result.passed = false;
            result.failure = std::string(name) + "[" + std::to_string(i) + "] is NaN (never written, or not finite)";
        }
}

// Median time of `runs` launches, after one warm-up; L2 is flushed before each, so no run finds its inputs cached.
double median_ms(const Stage& stage, Problem& p, const int runs) {
    struct Event {
        cudaEvent_t event = nullptr;
        Event() { CUDA_CHECK(cudaEventCreate(&event)); }
        ~Event() { cudaEventDestroy(event); }
    };
    constexpr size_t flush_bytes = size_t(256) << 20;  // several times the 50 MB L2 of an H100
    DeviceBuffer<char> flush(flush_bytes);
    Event start, stop;
    launch_stage(stage, p);
    CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<double> times;
    for (int run = 0; run < runs; ++run) {
        CUDA_CHECK(cudaMemsetAsync(flush.data, run & 0xff, flush_bytes));
        CUDA_CHECK(cudaEventRecord(start.event));
        launch_stage(stage, p);
        CUDA_CHECK(cudaEventRecord(stop.event));
        CUDA_CHECK(cudaEventSynchronize(stop.event));
        float ms = 0.0f;
        CUDA_CHECK(cudaEventElapsedTime(&ms, start.event, stop.event));
        times.push_back(ms);
    }
    std::sort(times.begin(), times.end());
    return runs % 2 ? times[runs / 2] : 0.5 * (times[runs / 2 - 1] + times[runs / 2]);
}

// Runs `stage` on a problem made for its kind: poison the outputs, launch, check against the reference, then time.
StageResult run_stage(const Stage& stage, Problem& p) {
    check(stage.kind == p.kind, std::string("stage ") + stage.id + ": problem made for another kind of stage");
    StageResult result;
    result.checked_rows = p.checked_rows, result.total_rows = p.total_rows;
    p.out.poison();
    if (p.lse.count) p.lse.poison();
    launch_stage(stage, p);
    CUDA_CHECK(cudaDeviceSynchronize());  // errors inside the kernel (a bad address, say) surface here
    std::vector<float> out(p.out.count);
    p.out.download(out);
    compare_output(result, result.max_error, "out", out, p.expected, false, p);
    if (p.lse.count) {
        std::vector<float> lse(p.lse.count);
        p.lse.download(lse);
        compare_output(result, result.max_lse_error, "lse", lse, p.expected, true, p);
    }
    if (result.passed && p.config.timed_runs > 0) {
        result.ms = median_ms(stage, p, p.config.timed_runs);
        result.tflops = p.flops / (result.ms * 1e-3) * 1e-12;
        result.gbps = p.bytes / (result.ms * 1e-3) * 1e-9;
    }
    return result;
}

// The CLI's `run` and the GPU tests: make the inputs and the reference, then run.
StageResult run_stage(const Stage& stage, const RunConfig& config) {
    Problem problem = make_problem(stage.kind, config);
    return run_stage(stage, problem);
}

// ==== GPU model: the kernels of one transformer layer ====
// The whole GPT of gpt.cpp (DESIGN.md §3) on the GPU, in fp32 like the CPU engine, one kernel per step of
// model_forward: embedding, RMSNorm, the linear layers, RoPE, attention (a stage of this course), SwiGLU and the
// residual adds. Rows are token positions, as in gpt.cpp: x [rows, D]. Linear layers take the weights as stored in
// the checkpoint, w [out, in], and compute x w^T. Two regimes: many rows (prefill, evaluation) is a matrix product,
// done by stage 1d; one row (a decode step) is a matrix-vector product that reads every weight once, so its speed
// limit is memory bandwidth: gemv_kernel below, which also folds in the RMSNorm before it and the residual add or the
// SwiGLU after it, so a decode step is few kernels. All these kernels run on model_stream; a decode step is
// replayed from a CUDA graph (see the inference section), which the legacy default stream cannot be captured into.

const cudaStream_t model_stream = cudaStreamPerThread;  // ordered with the default stream that the stages use

// x[n, :] = table[tokens[n], :]    tokens [rows] -> x [rows, D]
__global__ void embedding_kernel(float* x, const float* table, const int* tokens, const int D) {
    start_next_kernel();
    wait_for_previous_kernel();
    const float* row = table + int64_t(tokens[blockIdx.x]) * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) x[int64_t(blockIdx.x) * D + d] = row[d];
}

// y[n, :] = x[n, :] r with r = 1 / sqrt(mean(x[n, :]^2) + eps), one block per row    x, y [rows, D]
// RMSNorm without its weights g: upload_model folds g into the matrices that read the norm's output (see there).
__global__ void rms_norm_kernel(float* y, const float* x, const int D, const float eps) {
    __shared__ float scratch[32];
    const float* row = x + int64_t(blockIdx.x) * D;
    float sum_squares = 0.0f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) sum_squares += row[d] * row[d];
    const float r = 1.0f / sqrtf(block_sum(sum_squares, scratch) / D + eps);
    for (int d = threadIdx.x; d < D; d += blockDim.x) y[int64_t(blockIdx.x) * D + d] = row[d] * r;
}

// silu(z) = z / (1 + e^-z), as in gpt.cpp
__device__ float silu(const float z) { return z * (1.0f / (1.0f + expf(-z))); }

// What a linear layer does with its product p = x w^T: store it, add it to the output (the residual stream), or, for
// the stacked [gate; up] weights of the MLP, store silu(p[:, j]) * p[:, F + j] for j < F.
enum class LinearOutput { store, add, swiglu };

// The epilogue of the many-row path: out [rows, N] from the product p [rows, N] (swiglu: p [rows, 2N]).
template <LinearOutput MODE>
__global__ void linear_output_kernel(float* out, const float* product, const int64_t rows, const int N) {
    const int64_t count = rows * N, stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < count; e += stride) {
        if constexpr (MODE == LinearOutput::add) out[e] += product[e];
        if constexpr (MODE == LinearOutput::swiglu) {
            const int64_t n = e / N, j = e % N;
            out[e] = silu(product[n * 2 * N + j]) * product[n * 2 * N + N + j];
        }
    }
}

// ---- gemv: one row through a linear layer ----
// out = output(w x~), x~ = x r (RMSNorm without its weights) when `normalize`, else x.   x [K], w [N, K] (swiglu:
// [2N, K]) -> [N]. Each warp owns an output j and walks row j of w in float4 steps, consecutive lanes on consecutive
// float4s (coalesced, 512 bytes per warp per step, several steps in flight), then sums its lanes with shuffles. The
// warp reads x itself, from L1, since every warp of an SM reads the same few KB, and sums x_k^2 in the same loop, so
// the norm is ready with the dot product:  w_j . (x r) = r (w_j . x),  r = 1 / sqrt(mean x^2 + eps). The norm's
// weights g are already in w (upload_model folds them), so the kernel reads nothing but w and x. Every weight is
// read once. The weights do not depend on the kernel before, so a decode step launches each gemv to overlap its
// predecessor (programmatic dependent launch, sm_90): the kernel lets its own successor start at once, loads its
// weight rows into registers, and only then waits for the previous kernel's output. A warp holds up to 8 float4s a
// lane of one row, or 6 of each of two rows (SwiGLU, RoPE pairs): a row of up to 1024 or 768 floats. A longer row
// is split among 2, 4 or 8 warps of the block (gemv_parts), whose sums meet in shared memory; a row longer than 8
// warps hold asks L2 to fetch the rest (prefetch.global.L2, one request per 128-byte line) before the wait.
// Measured in the decode step (H200, 2026-12-03, L12 D768 model, 64 graph replays timed, positions 2-65 and
// 3967-4031), side by side in one run:
//   4 float4s of each of two rows and 8 of one in registers, the rest of each row prefetched into L2: 0.201, 0.310 ms
//   the same, down's rows (2048 floats) split between two warps:                                    0.195, 0.305 ms
//   6 float4s of each of two rows ([gate; up] and q, k, v rows held whole), down split (this code):  0.183, 0.291 ms
// and earlier: g read and multiplied in the loop instead of folded, 0.238 against 0.219 ms at positions 2-65;
// before the L2 prefetch, 16 float4s of one row or 8 of two in registers, 0.327 ms, 128-thread blocks 0.307 ms.
constexpr int gemv_threads = 256, gemv_warps = gemv_threads / 32;
template <bool TWO_ROWS>
constexpr int gemv_prefetch = TWO_ROWS ? 6 : 8;  // float4 steps of each weight row held in registers before the wait

// One warp's sums over k: w_first . x, w_second . x and, to normalize, x . x.
struct GemvSums {
    float first = 0.0f, second = 0.0f, squares = 0.0f;
};

template <bool TWO_ROWS>
__device__ void gemv_step(GemvSums& sums, const float4 a, const float4 b, const float4 xv, const bool normalize) {
    if (normalize) sums.squares += xv.x * xv.x + xv.y * xv.y + xv.z * xv.z + xv.w * xv.w;
    sums.first += a.x * xv.x + a.y * xv.y + a.z * xv.z + a.w * xv.w;
    if constexpr (TWO_ROWS) sums.second += b.x * xv.x + b.y * xv.y + b.z * xv.z + b.w * xv.w;
}

template <bool VECTOR, bool TWO_ROWS>
__device__ GemvSums gemv_sums(const float* w_first, const float* w_second, const float* x, const bool normalize,
                              const int K) {
    GemvSums sums;
    const int lane = threadIdx.x % 32;
    if constexpr (VECTOR) {
        const float4* w1 = reinterpret_cast<const float4*>(w_first);
        const float4* w2 = reinterpret_cast<const float4*>(w_second);
        const float4* x4 = reinterpret_cast<const float4*>(x);
        const int steps = K / 4;
        constexpr int prefetch = gemv_prefetch<TWO_ROWS>;
        float4 a_first[prefetch] = {}, b_first[prefetch] = {};
#pragma unroll
        for (int p = 0; p < prefetch; ++p)
            if (lane + 32 * p < steps) {
                a_first[p] = __ldg(w1 + lane + 32 * p);
                if constexpr (TWO_ROWS) b_first[p] = __ldg(w2 + lane + 32 * p);
            }
        for (int line = 4 * prefetch + lane; line < (steps + 7) / 8; line += 32) {  // 8 float4s a line
            asm volatile("prefetch.global.L2 [%0];" ::"l"(w1 + 8 * line));
            if constexpr (TWO_ROWS) asm volatile("prefetch.global.L2 [%0];" ::"l"(w2 + 8 * line));
        }
        wait_for_previous_kernel();
#pragma unroll
        for (int p = 0; p < prefetch; ++p)
            if (lane + 32 * p < steps) gemv_step<TWO_ROWS>(sums, a_first[p], b_first[p], x4[lane + 32 * p], normalize);
#pragma unroll 4
        for (int k = lane + 32 * prefetch; k < steps; k += 32)
            gemv_step<TWO_ROWS>(sums, __ldg(w1 + k), TWO_ROWS ? __ldg(w2 + k) : float4{}, x4[k], normalize);
    } else {
        wait_for_previous_kernel();
        for (int k = lane; k < K; k += 32) {
            const float xv = x[k];
            if (normalize) sums.squares += xv * xv;
            sums.first += w_first[k] * xv;
            if constexpr (TWO_ROWS) sums.second += w_second[k] * xv;
        }
    }
    sums.first = warp_sum(sums.first);
    if constexpr (TWO_ROWS) sums.second = warp_sum(sums.second);
    if (normalize) sums.squares = warp_sum(sums.squares);
    return sums;
}

// A row longer than a warp holds in registers (8 float4s a lane of one row, 6 of each of two) is split into `parts`
// consecutive shares, one for each of `parts` neighbouring warps, so that a block holds all of its weights in
// registers before the wait; the shares' sums meet in shared memory. `parts` is a power of two up to gemv_warps.
int gemv_parts(const int K, const bool two_rows) {
    const int held = 32 * 4 * (two_rows ? gemv_prefetch<true> : gemv_prefetch<false>);  // floats of a row in a warp
    int parts = 1;
    while (parts < gemv_warps && parts * held < K) parts *= 2;
    return parts;
}

// The sums of rows (w_first, w_second) . x over all K, for every warp of the row's `parts`. An inactive warp (past the
// last row) loads nothing but still meets the others at the barrier.
template <bool VECTOR, bool TWO_ROWS>
__device__ GemvSums gemv_row_sums(const float* w_first, const float* w_second, const float* x, const bool normalize,
                                  const int K, const int parts, const bool active) {
    __shared__ GemvSums shares[gemv_warps];
    const int warp = threadIdx.x / 32, part = warp % parts;
    const int share = int(VECTOR ? 4 * ceil_div(K / 4, parts) : ceil_div(K, parts));
    const int begin = min(K, part * share), length = min(K - begin, share);
    GemvSums sums;
    if (active) sums = gemv_sums<VECTOR, TWO_ROWS>(w_first + begin, w_second + begin, x + begin, normalize, length);
    if (parts == 1) return sums;
    if (threadIdx.x % 32 == 0) shares[warp] = sums;
    __syncthreads();
    GemvSums total;
    for (int p = warp - part; p < warp - part + parts; ++p)
        total.first += shares[p].first, total.second += shares[p].second, total.squares += shares[p].squares;
    return total;
}

template <LinearOutput MODE, bool VECTOR>
__global__ void __launch_bounds__(gemv_threads)
    gemv_kernel(float* out, const float* w, const float* x, const bool normalize, const float eps, const int N,
                const int K, const int parts) {
    start_next_kernel();
    const int j = blockIdx.x * (gemv_warps / parts) + threadIdx.x / 32 / parts;
    constexpr bool swiglu = MODE == LinearOutput::swiglu;
    const GemvSums sums = gemv_row_sums<VECTOR, swiglu>(w + int64_t(j) * K, w + int64_t(N + j) * K, x, normalize, K,
                                                        parts, j < N);
    const float r = normalize ? 1.0f / sqrtf(sums.squares / K + eps) : 1.0f;
    if (j >= N || threadIdx.x % (32 * parts) != 0) return;  // lane 0 of the row's first warp writes
    if constexpr (swiglu)
        out[j] = silu(r * sums.first) * (r * sums.second);
    else if constexpr (MODE == LinearOutput::add)
        out[j] += r * sums.first;
    else
        out[j] = r * sums.first;
}

// ---- RoPE and the split into heads ----
// qkv [B*T, (H + 2G) hd] (the q, k and v projections side by side) -> q [B, H, T, hd], k, v [B, G, T, hd], with RoPE
// (DESIGN.md §3, rotate-half) on q and k at position past + t. With a cache, k and v also go to the cache rows
// past + t ([G, max_T, hd]). One block per row; thread e handles the pair (i, i + hd/2) of one head, a rotation by the
// angle a = position theta^(-2i/hd). cos a and sin a come from a table [T, hd/2] made once on the CPU, exactly as
// gpt.cpp makes its own (angle in double, rounded to float), so both rotate by the same numbers.
__device__ void rope_rotate(float& first, float& second, const float c, const float s) {
    const float rotated_first = first * c - second * s;
    second = second * c + first * s, first = rotated_first;
}

__global__ void split_heads_rope_kernel(float* q_out, float* k_out, float* v_out, float* cache_k, float* cache_v,
                                        const float* qkv, const int T, const int H, const int G, const int hd,
                                        const float* rope_cos, const float* rope_sin, const int max_T,
                                        const int* past) {
    const int n = blockIdx.x, b = n / T, t = n % T, half = hd / 2;
    const int position = (past ? *past : 0) + t;
    const float* row = qkv + int64_t(n) * (H + 2 * G) * hd;
    for (int e = threadIdx.x; e < (H + 2 * G) * half; e += blockDim.x) {
        const int head = e / half, i = e % half;
        float first = row[head * hd + i], second = row[head * hd + i + half];
        const int64_t angle = int64_t(position) * half + i;
        if (head < H + G) rope_rotate(first, second, rope_cos[angle], rope_sin[angle]);
        float* dst = q_out + ((int64_t(b) * H + head) * T + t) * hd;
        float* cache = nullptr;
        if (head >= H) {
            const int g = (head - H) % G;
            const bool key = head < H + G;
            dst = (key ? k_out : v_out) + ((int64_t(b) * G + g) * T + t) * hd;
            if (cache_k) cache = (key ? cache_k : cache_v) + (int64_t(g) * max_T + position) * hd;
        }
        dst[i] = first, dst[i + half] = second;
        if (cache) cache[i] = first, cache[i + half] = second;
    }
}

// A decode step does all of the above in the epilogue of its q, k, v gemv: warp p computes the two outputs (i, i + hd/2)
// of one head (the two-row gemv of the SwiGLU), rotates them, and writes q, or the new row of the K or V cache, so no
// kernel runs between the projection and the attention.   x [D], w [(H + 2G) hd, D] -> q [H, hd], cache rows
struct RopeTargets {
    float* q;        // [H, hd]
    float* cache_k;  // [G, max_T, hd], this layer's
    float* cache_v;
    const float* rope_cos;
    const float* rope_sin;
    const int* position;  // the filled length of the cache, on the device
    int H, G, hd, max_T;
};

template <bool VECTOR>
__global__ void __launch_bounds__(gemv_threads)
    qkv_rope_gemv_kernel(const RopeTargets to, const float* w, const float* x, const float eps, const int K,
                         const int parts) {
    start_next_kernel();
    const int half = to.hd / 2, pair = blockIdx.x * (gemv_warps / parts) + threadIdx.x / 32 / parts;
    const bool active = pair < (to.H + 2 * to.G) * half;
    const int head = pair / half, i = pair % half;
    const int64_t row = int64_t(head) * to.hd + i;
    // The position and its angle are read before the wait, with the weights: the length was last written by the
    // previous decode step (an earlier graph launch), so the lookup leaves the chain of waits.
    const int position = *to.position;
    const bool rotated = head < to.H + to.G;
    const float c = rotated ? to.rope_cos[int64_t(position) * half + i] : 1.0f;
    const float s = rotated ? to.rope_sin[int64_t(position) * half + i] : 0.0f;
    const GemvSums sums = gemv_row_sums<VECTOR, true>(w + row * K, w + (row + half) * K, x, true, K, parts, active);
    if (!active || threadIdx.x % (32 * parts) != 0) return;
    const float r = 1.0f / sqrtf(sums.squares / K + eps);
    float first = r * sums.first, second = r * sums.second;
    if (rotated) rope_rotate(first, second, c, s);
    const bool query = head < to.H, key = head < to.H + to.G;
    float* dst = query ? to.q + int64_t(head) * to.hd
                       : (key ? to.cache_k : to.cache_v) + (int64_t((head - to.H) % to.G) * to.max_T + position) * to.hd;
    dst[i] = first, dst[i + half] = second;
}

// attended [B, H, T, hd] -> rows [B*T, H*hd] (heads side by side again, for o_proj)
__global__ void merge_heads_kernel(float* rows, const float* attended, const int T, const int H, const int hd) {
    const int n = blockIdx.x, b = n / T, t = n % T;
    for (int e = threadIdx.x; e < H * hd; e += blockDim.x)
        rows[int64_t(n) * H * hd + e] = attended[((int64_t(b) * H + e / hd) * T + t) * hd + e % hd];
}

// losses[n] = logsumexp(logits[n, :]) - logits[n, target[n]], one block per row    logits [rows, V]
__global__ void cross_entropy_kernel(float* losses, const float* logits, const int* targets, const int V) {
    __shared__ float scratch[32];
    const float* row = logits + int64_t(blockIdx.x) * V;
    float m = -INFINITY;
    for (int v = threadIdx.x; v < V; v += blockDim.x) m = fmaxf(m, row[v]);
    m = block_max(m, scratch);
    float sum = 0.0f;
    for (int v = threadIdx.x; v < V; v += blockDim.x) sum += expf(row[v] - m);
    sum = block_sum(sum, scratch);
    if (threadIdx.x == 0) losses[blockIdx.x] = m + logf(sum) - row[targets[blockIdx.x]];
}

__global__ void advance_kernel(int* length, const int T) {
    start_next_kernel();
    wait_for_previous_kernel();  // the kernels before have read the length
    *length += T;
}

// ---- Mixture of experts (DESIGN.md §3): routing, and the chosen experts of one row ----
// route_kernel, one thread per row n (E is small): router logits r = logits[n, :] give the scores s_e = sigmoid(r_e)
// (sigmoid scoring) or p_e = softmax(r)_e (softmax scoring); the K experts with the largest key s_e + b_e (b = the
// routing bias, which only chooses; null for softmax) are picked one at a time, each the largest key below the pick
// before it in the order (key descending, index ascending), so ties go to the lower index as in gpt.cpp's
// choose_experts; gates g_k = s_{e_k} / sum_j s_{e_j}. Each choice adds 1 to counts[e] (the expert load).
__device__ float expert_score(const float* r, const int e, const bool softmax, const float max, const float sum) {
    return softmax ? expf(r[e] - max) / sum : 1.0f / (1.0f + expf(-r[e]));
}

__global__ void route_kernel(int* chosen, float* gates, int* counts, const float* logits, const float* bias,
                             const int rows, const int E, const int K, const bool softmax) {
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= rows) return;
    const float* r = logits + int64_t(n) * E;
    float max = -INFINITY, sum = 0.0f;
    if (softmax) {
        for (int e = 0; e < E; ++e) max = fmaxf(max, r[e]);
        for (int e = 0; e < E; ++e) sum += expf(r[e] - max);
    }
    int* expert = chosen + int64_t(n) * K;
    float* gate = gates + int64_t(n) * K;
    float previous_key = INFINITY, chosen_sum = 0.0f;
    int previous = -1;
    for (int k = 0; k < K; ++k) {
        int best = -1;
        float best_key = -INFINITY;
        for (int e = 0; e < E; ++e) {
            const float key = expert_score(r, e, softmax, max, sum) + (bias ? bias[e] : 0.0f);
            const bool after_previous = key < previous_key || (key == previous_key && e > previous);
            if (after_previous && (best < 0 || key > best_key)) best = e, best_key = key;
        }
        if (best < 0) best = 0;  // keys that are NaN (a corrupt checkpoint): the output is NaN, as on the CPU, but no index is out of range
        expert[k] = best, gate[k] = expert_score(r, best, softmax, max, sum);
        chosen_sum += gate[k];
        atomicAdd(counts + best, 1);
        previous = best, previous_key = best_key;
    }
    for (int k = 0; k < K; ++k) gate[k] /= chosen_sum;
}

// One row through its K chosen experts, as gemv_kernel does a dense layer (a decode step: the choices are read on
// the device, so the step stays one graph). The expert's weights are known only once route_kernel has finished, so
// these kernels wait for it before their first load.
// hidden[k, j] = silu(w_gate_up[e_k, j] . h) * (w_gate_up[e_k, Fe + j] . h)    grid (Fe / warps, K)
template <bool VECTOR>
__global__ void __launch_bounds__(gemv_threads)
    chosen_experts_swiglu_kernel(float* hidden, const float* w_gate_up, const float* h, const int* chosen,
                                 const int Fe, const int D) {
    start_next_kernel();
    const int j = blockIdx.x * gemv_warps + threadIdx.x / 32, k = blockIdx.y;
    if (j >= Fe) return;
    wait_for_previous_kernel();
    const float* w = w_gate_up + int64_t(chosen[k]) * 2 * Fe * D;
    const GemvSums sums = gemv_sums<VECTOR, true>(w + int64_t(j) * D, w + int64_t(Fe + j) * D, h, false, D);
    if (threadIdx.x % 32 == 0) hidden[int64_t(k) * Fe + j] = silu(sums.first) * sums.second;
}

// x[j] += sum_k g_k (w_down[e_k, j] . hidden[k, :])    grid (D / warps)
template <bool VECTOR>
__global__ void __launch_bounds__(gemv_threads)
    chosen_experts_down_kernel(float* x, const float* w_down, const float* hidden, const int* chosen,
                               const float* gates, const int K, const int Fe, const int D) {
    start_next_kernel();
    const int j = blockIdx.x * gemv_warps + threadIdx.x / 32;
    if (j >= D) return;
    wait_for_previous_kernel();
    float total = 0.0f;
    for (int k = 0; k < K; ++k) {
        const float* w = w_down + (int64_t(chosen[k]) * D + j) * Fe;
        total += gates[k] * gemv_sums<VECTOR, false>(w, nullptr, hidden + int64_t(k) * Fe, false, Fe).first;
    }
    if (threadIdx.x % 32 == 0) x[j] += total;
}

// Many rows, dispatched by expert: batch[s, :] = h[tokens[s], :], the rows of every expert's batch, expert after
// expert (one block per slot s)    h [rows, D] -> batch [rows K, D]
__global__ void gather_rows_kernel(float* batch, const float* h, const int* tokens, const int D) {
    const float* row = h + int64_t(tokens[blockIdx.x]) * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) batch[int64_t(blockIdx.x) * D + d] = row[d];
}

// x[n, :] += sum_k g_nk outputs[slots[n, k], :], one block per row: each row's gated expert outputs
__global__ void combine_experts_kernel(float* x, const float* outputs, const int* slots, const float* gates,
                                       const int K, const int D) {
    const int64_t n = blockIdx.x;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float sum = 0.0f;
        for (int k = 0; k < K; ++k) sum += gates[n * K + k] * outputs[int64_t(slots[n * K + k]) * D + d];
        x[n * D + d] += sum;
    }
}

// ==== GPU model: weights, activations, KV cache and the forward pass ====
// upload_model copies a gpt.cpp Model to the device once: the q, k, v projections stacked into one [(H + 2G) hd, D]
// matrix and gate and up into one [2F, D], so each is one product. Each RMSNorm's weights g are folded into the
// matrices that read its output (wqkv; [gate; up], or the router, the experts' and the shared expert's [gate; up];
// the head, a copy of the embedding when tied), so the norm on the GPU is x r and a decode step reads one vector less
// a kernel. The results differ from the CPU's only by rounding. The activations are allocated once, for up to
// max_rows positions, and reused (a captured decode graph holds their addresses). gpu_forward mirrors model_forward
// line by line; the attention stage is chosen with --stage (stages 2-6 and 8 for many rows; a decode step uses
// stage 7).
// A Mixture-of-Experts layer keeps its router and bias, its experts' [gate; up] stacked expert after expert, their
// down projections, and the shared expert's [gate; up] and down (the dense path's layout, at hidden size S Fe).

struct GpuLayer {
    DeviceBuffer<float> wqkv;       // [(H + 2G) hd, D]   q_proj, k_proj, v_proj stacked, input_layernorm folded in
    DeviceBuffer<float> wo;         // [D, H hd]
    DeviceBuffer<float> w_gate_up;  // [2F, D]            gate_proj, up_proj stacked      (dense layers)
    DeviceBuffer<float> w_down;     // [D, F]
    DeviceBuffer<float> router;           // [E, D]       mlp.gate                        (MoE layers)
    DeviceBuffer<float> router_bias;      // [E]          e_score_correction_bias: only chooses
    DeviceBuffer<float> experts_gate_up;  // [E, 2Fe, D]  each expert's gate_proj, up_proj stacked
    DeviceBuffer<float> experts_down;     // [E, D, Fe]
    DeviceBuffer<float> shared_gate_up;   // [2 S Fe, D]  the shared expert (empty when S = 0)
    DeviceBuffer<float> shared_down;      // [D, S Fe]
    DeviceBuffer<int> expert_counts;      // [E] tokens routed to each expert since the last reset (K per token)
};

struct GpuActivations {
    int max_rows = 0;
    DeviceBuffer<int> tokens, targets;  // [rows]
    DeviceBuffer<float> x;              // [rows, D] the residual stream
    DeviceBuffer<float> normed;         // [rows, D] rms_norm(x), many-row path
    DeviceBuffer<float> product;        // [rows, widest layer] x w^T before the epilogue, many-row path
    DeviceBuffer<float> qkv;            // [rows, (H + 2G) hd]
    DeviceBuffer<float> q, k, v;        // [B, H, T, hd], [B, G, T, hd]
    DeviceBuffer<float> attended;       // [B, H, T, hd]
    DeviceBuffer<float> attended_rows;  // [rows, H hd]
    DeviceBuffer<float> lse;            // [B, H, T]
    DeviceBuffer<float> hidden;         // [rows, max(F, S Fe)]
    DeviceBuffer<float> router_logits;  // [rows, E]
    DeviceBuffer<int> chosen;           // [rows, K] each row's experts, largest key first
    DeviceBuffer<float> gates;          // [rows, K]
    DeviceBuffer<int> batch_tokens;     // [rows K] the row in each slot of the expert batches, expert after expert
    DeviceBuffer<int> batch_slots;      // [rows, K] the slot of row n's k-th expert
    DeviceBuffer<float> expert_inputs;  // [rows K, D] the expert batches
    DeviceBuffer<float> expert_hidden;  // [rows K, Fe]
    DeviceBuffer<float> expert_outputs; // [rows K, D]
    DeviceBuffer<float> logits;         // [rows, V]
    DeviceBuffer<float> losses;         // [rows]
    DeviceBuffer<float> attention_scratch;  // the many-row stage's workspace (stage 2: S; stage 4: m, l)
    DeviceBuffer<float> decode_partials;    // stage 7's partial results in a decode step (fixed: graphs hold it)
    PinnedArray<int> decode_token;          // [1] the decode step's input token, on the host
    PinnedArray<float> decode_logits;       // [V] and its logits
};

struct GpuModel {
    ModelConfig config;
    const Stage* attention_stage = nullptr;  // many-row attention: stage 2, 3b, 4, 5, 6 or 8
    DeviceBuffer<float> embed;               // [V, D]
    std::vector<GpuLayer> layers;
    DeviceBuffer<float> lm_head;             // [V, D], the final norm folded in (so a copy of embed when tied)
    DeviceBuffer<float> rope_cos, rope_sin;  // [T, hd/2]: cos and sin of pos * theta^(-2i/hd)
    GpuActivations work;
};

template <typename T>
DeviceBuffer<T> copy_on_device(const DeviceBuffer<T>& source) {
    DeviceBuffer<T> copy(source.count);
    if (source.count)
        CUDA_CHECK(cudaMemcpyAsync(copy.data, source.data, source.count * sizeof(T), cudaMemcpyDeviceToDevice,
                                   model_stream));
    return copy;
}

// The KV cache on the device, as in gpt.cpp: per layer K and V [G, max_T, hd]. The filled length is kept on the host
// and on the device: the kernels of a decode step read it there, so a replayed graph sees the current length. A copy
// (prefix sharing: every document starts from the prompt's cache) is a new allocation with the same contents.
struct GpuKvCache {
    int length = 0, max_T = 0;
    DeviceBuffer<float> keys, values;  // [L, G, max_T, hd]
    DeviceBuffer<int> length_on_device;

    GpuKvCache() = default;
    GpuKvCache(const GpuKvCache& other)
        : length(other.length), max_T(other.max_T), keys(copy_on_device(other.keys)),
          values(copy_on_device(other.values)), length_on_device(copy_on_device(other.length_on_device)) {}
    GpuKvCache(GpuKvCache&&) = default;
    GpuKvCache& operator=(GpuKvCache&&) = default;
};

// Floats of the weights on the GPU: each layer's matrices (and router bias), the embedding and the head.
size_t layer_weights(const ModelConfig& c, const int l) {
    const size_t D = c.dim, hd = c.head_dim(), E = c.n_experts, Fe = c.expert_ffn_dim;
    const size_t ffn = c.is_moe_layer(l) ? E * D + E + 3 * D * Fe * (E + c.n_shared_experts) : 3 * D * c.ffn_dim;
    return (c.n_heads + 2 * c.n_kv_heads) * hd * D + D * c.n_heads * hd + ffn;
}
size_t layers_weights(const ModelConfig& c) {
    size_t n = 0;
    for (int l = 0; l < c.n_layers; ++l) n += layer_weights(c, l);
    return n;
}
size_t gpu_weights(const ModelConfig& c) { return 2 * size_t(c.vocab_size) * c.dim + layers_weights(c); }
size_t widest_layer(const ModelConfig& c) {
    const size_t moe = c.n_experts > 0 ? 2 * size_t(std::max(1, c.n_shared_experts)) * c.expert_ffn_dim : 0;
    return std::max({size_t(c.dim), size_t(c.n_heads + 2 * c.n_kv_heads) * c.head_dim(), 2 * size_t(c.ffn_dim),
                     size_t(c.vocab_size), moe, size_t(c.n_experts)});
}
size_t hidden_width(const ModelConfig& c) {
    return std::max(c.ffn_dim, c.n_shared_experts * c.expert_ffn_dim);
}
size_t activation_floats(const ModelConfig& c, const int rows) {
    const size_t hd = c.head_dim(), H = c.n_heads, G = c.n_kv_heads, K = c.top_k_experts;
    const size_t moe = c.n_experts + K * (4 + 2 * c.dim + c.expert_ffn_dim);
    return rows * (2 * c.dim + widest_layer(c) + (H + 2 * G) * hd * 2 + 3 * H * hd + H + hidden_width(c) +
                   c.vocab_size + 1 + moe);
}

// Refuses, before allocating anything, a model whose weights, activations and one KV cache do not fit in free memory.
void check_fits_on_gpu(const ModelConfig& c, const int max_rows) {
    const double gib = double(1 << 30);
    const double weights = 4.0 * gpu_weights(c), activations = 4.0 * activation_floats(c, max_rows);
    const double cache = double(kv_cache_bytes_per_token(c)) * c.context;
    size_t free_bytes = 0, total_bytes = 0;
    CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
    check(weights + activations + cache <= double(free_bytes),
          "the model does not fit in GPU memory: it needs " + format("%.2f", (weights + activations + cache) / gib) +
              " GiB (weights " + format("%.2f", weights / gib) + ", activations " + format("%.2f", activations / gib) +
              ", KV cache " + format("%.2f", cache / gib) + "), " + format("%.2f", free_bytes / gib) + " GiB are free");
}

// The matrices `parts` [rows_i, D] stacked into one, with the weights g [D] of the RMSNorm before them folded in:
// w'[j, k] = w[j, k] g[k], so that rms_norm(x) . w_j = (x r g) . w_j = r (x . w'_j) and the GPU's norm is x r alone.
DeviceBuffer<float> stacked_on_device(const std::vector<const Tensor*>& parts, const Tensor* folded_norm = nullptr) {
    std::vector<float> host;
    for (const Tensor* part : parts) host.insert(host.end(), part->data.begin(), part->data.end());
    if (folded_norm)
        for (size_t e = 0; e < host.size(); ++e) host[e] *= folded_norm->data[e % folded_norm->data.size()];
    return to_device(host);
}

const Stage& model_attention_stage(const std::string& id) {
    const Stage& stage = find_stage(id);
    check(stage.kind == StageKind::attention && std::string_view(stage.id) != "7",
          "--stage " + id + " is not an attention stage for many rows (2, 3b, 4, 5, 6 or 8)");
    return stage;
}

// max_rows: the most positions one forward takes (a prompt, or evaluation windows side by side).
GpuModel upload_model(const Model& model, const std::string& stage_id, const int max_rows) {
    const ModelConfig& c = model.config;
    GpuModel gpu;
    gpu.config = c;
    gpu.attention_stage = &model_attention_stage(stage_id);
    dispatch_head_size(gpu.attention_stage->id, c.head_dim(), [](auto) {});  // and stage 7, compiled for the same
    check(max_rows >= c.context, "upload_model: max_rows must cover the context");
    check_fits_on_gpu(c, max_rows);
    gpu.embed = to_device(model.embed.data);
    for (int l = 0; l < c.n_layers; ++l) {
        const Layer& layer = model.layers[l];
        GpuLayer& g = gpu.layers.emplace_back();
        g.wqkv = stacked_on_device({&layer.wq, &layer.wk, &layer.wv}, &layer.attn_norm);
        g.wo = to_device(layer.wo.data);
        if (!c.is_moe_layer(l)) {
            g.w_gate_up = stacked_on_device({&layer.mlp.w_gate, &layer.mlp.w_up}, &layer.ffn_norm);
            g.w_down = to_device(layer.mlp.w_down.data);
            continue;
        }
        const MixtureOfExperts& moe = layer.moe;
        std::vector<const Tensor*> gate_up, down;
        for (const SwiGLU& expert : moe.experts) gate_up.insert(gate_up.end(), {&expert.w_gate, &expert.w_up});
        for (const SwiGLU& expert : moe.experts) down.push_back(&expert.w_down);
        g.router = stacked_on_device({&moe.router}, &layer.ffn_norm), g.router_bias = to_device(moe.router_bias.data);
        g.experts_gate_up = stacked_on_device(gate_up, &layer.ffn_norm), g.experts_down = stacked_on_device(down);
        if (c.n_shared_experts > 0) {
            g.shared_gate_up = stacked_on_device({&moe.shared.w_gate, &moe.shared.w_up}, &layer.ffn_norm);
            g.shared_down = to_device(moe.shared.w_down.data);
        }
        g.expert_counts = DeviceBuffer<int>(c.n_experts);
        CUDA_CHECK(cudaMemset(g.expert_counts.data, 0, sizeof(int) * c.n_experts));
    }
    gpu.lm_head = stacked_on_device({c.tie_embeddings ? &model.embed : &model.lm_head}, &model.final_norm);
    const int half = c.head_dim() / 2;
    std::vector<float> rope_cos(size_t(c.context) * half), rope_sin(size_t(c.context) * half);
    for (int position = 0; position < c.context; ++position)
        for (int i = 0; i < half; ++i) {
            const double angle = double(position) * std::pow(double(c.rope_theta), -2.0 * i / c.head_dim());
            rope_cos[size_t(position) * half + i] = static_cast<float>(std::cos(angle));
            rope_sin[size_t(position) * half + i] = static_cast<float>(std::sin(angle));
        }
    gpu.rope_cos = to_device(rope_cos), gpu.rope_sin = to_device(rope_sin);
    GpuActivations& w = gpu.work;
    const size_t rows = max_rows, hd = c.head_dim(), H = c.n_heads, G = c.n_kv_heads;
    w.max_rows = max_rows;
    w.tokens = DeviceBuffer<int>(rows), w.targets = DeviceBuffer<int>(rows);
    w.x = DeviceBuffer<float>(rows * c.dim), w.normed = DeviceBuffer<float>(rows * c.dim);
    w.product = DeviceBuffer<float>(rows * widest_layer(c));
    w.qkv = DeviceBuffer<float>(rows * (H + 2 * G) * hd);
    w.q = DeviceBuffer<float>(rows * H * hd), w.k = DeviceBuffer<float>(rows * G * hd);
    w.v = DeviceBuffer<float>(rows * G * hd);
    w.attended = DeviceBuffer<float>(rows * H * hd), w.attended_rows = DeviceBuffer<float>(rows * H * hd);
    w.lse = DeviceBuffer<float>(rows * H), w.hidden = DeviceBuffer<float>(rows * hidden_width(c));
    if (c.n_experts > 0) {
        const size_t K = c.top_k_experts;
        w.router_logits = DeviceBuffer<float>(rows * c.n_experts);
        w.chosen = DeviceBuffer<int>(rows * K), w.gates = DeviceBuffer<float>(rows * K);
        w.batch_tokens = DeviceBuffer<int>(rows * K), w.batch_slots = DeviceBuffer<int>(rows * K);
        w.expert_inputs = DeviceBuffer<float>(rows * K * c.dim);
        w.expert_outputs = DeviceBuffer<float>(rows * K * c.dim);
        w.expert_hidden = DeviceBuffer<float>(rows * K * c.expert_ffn_dim);
    }
    w.logits = DeviceBuffer<float>(rows * c.vocab_size), w.losses = DeviceBuffer<float>(rows);
    // A decode step's stage-7 partials, allocated now so that the captured graph keeps valid addresses.
    SplitKv kv;
    kv.capacity = c.context, kv.split_keys = decode_split_keys;
    carve_decode_partials(w.decode_partials, H, decode_splits(kv), hd, G);
    w.decode_token = pinned_array<int>(1), w.decode_logits = pinned_array<float>(c.vocab_size);
    return gpu;
}

GpuKvCache make_gpu_kv_cache(const ModelConfig& c) {
    GpuKvCache cache;
    cache.max_T = c.context;
    const size_t size = size_t(c.n_layers) * c.n_kv_heads * c.context * c.head_dim();
    cache.keys = DeviceBuffer<float>(size), cache.values = DeviceBuffer<float>(size);
    cache.length_on_device = DeviceBuffer<int>(1);
    CUDA_CHECK(cudaMemsetAsync(cache.length_on_device.data, 0, sizeof(int), model_stream));
    return cache;
}

// out = output(x~ w^T) for `rows` rows, x~ = x r (RMSNorm, its weights folded into w) when `normalize`, else x:
// x [rows, K], w [N, K] (swiglu: [2N, K]) -> out [rows, N].
void linear(GpuModel& model, float* out, const float* x, const float* w, const bool normalize, const int rows,
            const int K, const int N, const LinearOutput mode) {
    GpuActivations& work = model.work;
    const float eps = model.config.norm_eps;
    if (rows == 1) {
        const bool vector = float4_ok(w, K) && float4_ok(x, K);
        const int parts = gemv_parts(K, mode == LinearOutput::swiglu);
        const auto run = [&](auto kernel) {
            launch_overlapping(model_stream, "gemv", kernel, dim3(ceil_div(N, gemv_warps / parts)), dim3(gemv_threads),
                               0, out, w, x, normalize, eps, N, K, parts);
        };
        if (mode == LinearOutput::store) vector ? run(gemv_kernel<LinearOutput::store, true>) : run(gemv_kernel<LinearOutput::store, false>);
        if (mode == LinearOutput::add) vector ? run(gemv_kernel<LinearOutput::add, true>) : run(gemv_kernel<LinearOutput::add, false>);
        if (mode == LinearOutput::swiglu) vector ? run(gemv_kernel<LinearOutput::swiglu, true>) : run(gemv_kernel<LinearOutput::swiglu, false>);
        return;
    }
    const float* input = x;
    if (normalize) {
        launch_on(model_stream, "rms_norm", rms_norm_kernel, dim3(rows), dim3(256), 0, work.normed.data, x, K, eps);
        input = work.normed.data;
    }
    float* product = mode == LinearOutput::store ? out : work.product.data;
    MatmulShape shape;
    shape.M = rows, shape.N = mode == LinearOutput::swiglu ? 2 * N : N, shape.K = K;
    s1d_matmul_qk_transposed(product, input, w, shape);  // default stream: runs after model_stream's work, and before its next
    const dim3 grid(int(std::min<int64_t>(ceil_div(int64_t(rows) * N, 256), 4096)));
    if (mode == LinearOutput::add)
        launch_on(model_stream, "residual_add", linear_output_kernel<LinearOutput::add>, grid, dim3(256), 0, out,
                  product, int64_t(rows), N);
    if (mode == LinearOutput::swiglu)
        launch_on(model_stream, "swiglu", linear_output_kernel<LinearOutput::swiglu>, grid, dim3(256), 0, out, product,
                  int64_t(rows), N);
}

// x = x + o_proj(attention(rope(q), rope(k), v)) with q, k, v from rms_norm(x). With a cache (B = 1), the new keys and
// values go to it; a prompt at position 0 attends with the chosen stage, a decode step with stage 7 over the cache.
// A decode step is three kernels, each launched to overlap the one before: the q, k, v gemv with RoPE and the cache
// write in its epilogue, stage 7, and the o_proj gemv.
void attention_block(GpuModel& model, const GpuLayer& layer, const int layer_index, const int B, const int T,
                     GpuKvCache* cache) {
    const ModelConfig& c = model.config;
    GpuActivations& w = model.work;
    const int rows = B * T, H = c.n_heads, G = c.n_kv_heads, hd = c.head_dim();
    const size_t cache_offset = cache ? size_t(layer_index) * G * cache->max_T * hd : 0;
    float* cache_k = cache ? cache->keys.data + cache_offset : nullptr;
    float* cache_v = cache ? cache->values.data + cache_offset : nullptr;
    AttentionShape shape;
    shape.B = B, shape.H = H, shape.G = G, shape.Nq = T, shape.Nk = T, shape.hd = hd, shape.causal = true;
    if (cache && T == 1) {  // [H, 1, hd] is already the row [1, H hd]
        const RopeTargets to{w.q.data, cache_k,      cache_v, model.rope_cos.data, model.rope_sin.data,
                             cache->length_on_device.data, H,  G,       hd,       cache->max_T};
        const bool vector = float4_ok(layer.wqkv.data, c.dim) && float4_ok(w.x.data, c.dim);
        const int parts = gemv_parts(c.dim, true);
        launch_overlapping(model_stream, "qkv_rope_gemv", vector ? qkv_rope_gemv_kernel<true> : qkv_rope_gemv_kernel<false>,
                           dim3(ceil_div((H + 2 * G) * hd / 2, gemv_warps / parts)), dim3(gemv_threads), 0, to,
                           layer.wqkv.data, w.x.data, c.norm_eps, c.dim, parts);
        SplitKv kv;
        kv.head_stride = int64_t(cache->max_T) * hd, kv.capacity = cache->max_T, kv.split_keys = decode_split_keys;
        kv.past_on_device = cache->length_on_device.data;
        decode_attention(model_stream, w.attended.data, w.lse.data, w.q.data, cache_k, cache_v, shape, kv,
                         w.decode_partials, true);
        linear(model, w.x.data, w.attended.data, layer.wo.data, false, rows, H * hd, c.dim, LinearOutput::add);
        return;
    }
    linear(model, w.qkv.data, w.x.data, layer.wqkv.data, true, rows, c.dim, (H + 2 * G) * hd,
           LinearOutput::store);
    launch_on(model_stream, "split_heads_rope", split_heads_rope_kernel, dim3(rows), dim3(128), 0, w.q.data, w.k.data,
              w.v.data, cache_k, cache_v, w.qkv.data, T, H, G, hd, model.rope_cos.data, model.rope_sin.data,
              cache ? cache->max_T : 0, cache ? cache->length_on_device.data : nullptr);
    model.attention_stage->attention(w.attended.data, w.lse.data, w.q.data, w.k.data, w.v.data, shape,
                                     w.attention_scratch);
    launch_on(model_stream, "merge_heads", merge_heads_kernel, dim3(rows), dim3(128), 0, w.attended_rows.data,
              w.attended.data, T, H, hd);
    linear(model, w.x.data, w.attended_rows.data, layer.wo.data, false, rows, H * hd, c.dim, LinearOutput::add);
}

// x = x + down_proj(silu(gate_proj(h)) * up_proj(h)) with h = rms_norm(x) when `normalize` (its weights folded into
// w_gate_up), else h = x: a SwiGLU MLP of hidden size F (w_gate_up [2F, D], w_down [D, F]).
void swiglu_ffn(GpuModel& model, const float* h, const bool normalize, const float* w_gate_up,
                const float* w_down, const int F, const int rows) {
    const ModelConfig& c = model.config;
    GpuActivations& w = model.work;
    linear(model, w.hidden.data, h, w_gate_up, normalize, rows, c.dim, F, LinearOutput::swiglu);
    linear(model, w.x.data, w.hidden.data, w_down, false, rows, F, c.dim, LinearOutput::add);
}

// The dense layer's feed-forward: x = x + mlp(rms_norm(x)).
void dense_ffn(GpuModel& model, const GpuLayer& layer, const int rows) {
    swiglu_ffn(model, model.work.x.data, true, layer.w_gate_up.data, layer.w_down.data,
               model.config.ffn_dim, rows);
}

// ---- The Mixture-of-Experts feed-forward (DESIGN.md §3) ----
// x = x + shared(h) + sum_{chosen e} g_e expert_e(h), h = rms_norm(x), every expert a SwiGLU MLP of hidden size Fe.
// What changes from dense_ffn: h is computed once (the router, the experts and the shared expert all read it, and x
// changes under them), the router's product r = h W_router^T [rows, E] goes to route_kernel, which picks each row's
// K experts and gates on the device, and only the chosen experts run, so the work grows with K, not E:
// - one row (a decode step, captured into a graph): the gemv kernels above read the choices from device memory;
// - many rows (prompt, evaluation): the choices come to the host (one synchronisation per MoE layer), which lays
//   out each expert's batch, the rows that chose it in increasing order; the batches are gathered into one buffer,
//   each goes through its expert as two products (stage 1d, or a gemv for a batch of one), and each row adds its
//   gated outputs back (combine_experts_kernel, so no two writers share a row).
void run_expert_batches(GpuModel& model, const GpuLayer& layer, const int rows) {
    const ModelConfig& c = model.config;
    GpuActivations& w = model.work;
    const int D = c.dim, E = c.n_experts, K = c.top_k_experts, Fe = c.expert_ffn_dim;
    std::vector<int> chosen(size_t(rows) * K);
    CUDA_CHECK(cudaMemcpyAsync(chosen.data(), w.chosen.data, sizeof(int) * chosen.size(), cudaMemcpyDeviceToHost,
                               model_stream));
    CUDA_CHECK(cudaStreamSynchronize(model_stream));
    std::vector<int> batch_start(E + 1, 0);  // expert e's batch: the slots batch_start[e] .. batch_start[e + 1] - 1
    for (const int e : chosen) ++batch_start[e + 1];
    std::partial_sum(batch_start.begin(), batch_start.end(), batch_start.begin());
    std::vector<int> next(batch_start.begin(), batch_start.end() - 1), tokens(chosen.size()), slots(chosen.size());
    for (size_t i = 0; i < chosen.size(); ++i) {
        const int slot = next[chosen[i]]++;
        tokens[slot] = int(i / K), slots[i] = slot;
    }
    CUDA_CHECK(cudaMemcpyAsync(w.batch_tokens.data, tokens.data(), sizeof(int) * tokens.size(), cudaMemcpyHostToDevice,
                               model_stream));
    CUDA_CHECK(cudaMemcpyAsync(w.batch_slots.data, slots.data(), sizeof(int) * slots.size(), cudaMemcpyHostToDevice,
                               model_stream));
    launch_on(model_stream, "gather_rows", gather_rows_kernel, dim3(rows * K), dim3(128), 0, w.expert_inputs.data,
              w.normed.data, w.batch_tokens.data, D);
    for (int e = 0; e < E; ++e) {
        const int first = batch_start[e], count = batch_start[e + 1] - first;
        if (count == 0) continue;
        float* hidden = w.expert_hidden.data + size_t(first) * Fe;
        linear(model, hidden, w.expert_inputs.data + size_t(first) * D,
               layer.experts_gate_up.data + size_t(e) * 2 * Fe * D, false, count, D, Fe, LinearOutput::swiglu);
        linear(model, w.expert_outputs.data + size_t(first) * D, hidden, layer.experts_down.data + size_t(e) * D * Fe,
               false, count, Fe, D, LinearOutput::store);
    }
    launch_on(model_stream, "combine_experts", combine_experts_kernel, dim3(rows), dim3(128), 0, w.x.data,
              w.expert_outputs.data, w.batch_slots.data, w.gates.data, K, D);
}

void run_chosen_experts(GpuModel& model, const GpuLayer& layer) {
    const ModelConfig& c = model.config;
    GpuActivations& w = model.work;
    const int D = c.dim, K = c.top_k_experts, Fe = c.expert_ffn_dim;
    const bool vector = float4_ok(layer.experts_gate_up.data, D) && float4_ok(layer.experts_down.data, Fe) &&
                        float4_ok(w.normed.data, D) && float4_ok(w.expert_hidden.data, Fe);
    const dim3 block(gemv_threads), swiglu_grid(ceil_div(Fe, gemv_warps), K), down_grid(ceil_div(D, gemv_warps));
    launch_overlapping(model_stream, "chosen_experts_swiglu",
                       vector ? chosen_experts_swiglu_kernel<true> : chosen_experts_swiglu_kernel<false>, swiglu_grid,
                       block, 0, w.expert_hidden.data, layer.experts_gate_up.data, w.normed.data, w.chosen.data, Fe, D);
    launch_overlapping(model_stream, "chosen_experts_down",
                       vector ? chosen_experts_down_kernel<true> : chosen_experts_down_kernel<false>, down_grid,
                       block, 0, w.x.data, layer.experts_down.data, w.expert_hidden.data, w.chosen.data, w.gates.data, K,
                       Fe, D);
}

void moe_ffn(GpuModel& model, const GpuLayer& layer, const int rows) {
    const ModelConfig& c = model.config;
    GpuActivations& w = model.work;
    const int D = c.dim, E = c.n_experts, K = c.top_k_experts;
    const bool softmax = c.scoring == "softmax";
    launch_on(model_stream, "rms_norm", rms_norm_kernel, dim3(rows), dim3(256), 0, w.normed.data, w.x.data, D,
              c.norm_eps);
    linear(model, w.router_logits.data, w.normed.data, layer.router.data, false, rows, D, E, LinearOutput::store);
    launch_on(model_stream, "route", route_kernel, dim3(ceil_div(rows, 128)), dim3(128), 0, w.chosen.data,
              w.gates.data, layer.expert_counts.data, w.router_logits.data,
              softmax ? nullptr : layer.router_bias.data, rows, E, K, softmax);
    if (rows == 1)
        run_chosen_experts(model, layer);
    else
        run_expert_batches(model, layer, rows);
    if (c.n_shared_experts > 0)
        swiglu_ffn(model, w.normed.data, false, layer.shared_gate_up.data, layer.shared_down.data,
                   c.n_shared_experts * c.expert_ffn_dim, rows);
}

// work.tokens [B*T] (already on the device) -> logits [B*T, V], work.logits unless given. As model_forward: with a
// cache, B = 1 and the tokens sit at positions cache.length .. cache.length + T - 1; the device copy of the length
// advances by T here (the host copy is the caller's). One row launches only, with no synchronisation, so a decode
// step can be captured into a graph; many rows wait once per MoE layer for its routing (run_expert_batches).
void gpu_forward(GpuModel& model, const int B, const int T, GpuKvCache* cache, float* logits = nullptr) {
    const ModelConfig& c = model.config;
    check(int64_t(B) * T <= model.work.max_rows, "gpu_forward: " + std::to_string(int64_t(B) * T) +
                                                      " positions exceed the " + std::to_string(model.work.max_rows) +
                                                      " the activations were allocated for");
    check(!cache || (B == 1 && (cache->length == 0 || T == 1)),
          "the GPU KV cache takes one sequence: a prompt at position 0, then one token at a time");
    const int rows = B * T, past = cache ? cache->length : 0;
    check(past + T <= c.context, "positions up to " + std::to_string(past + T) +
                                     " do not fit the model's context of " + std::to_string(c.context));
    GpuActivations& w = model.work;
    launch_overlapping(model_stream, "embedding", embedding_kernel, dim3(rows), dim3(256), 0, w.x.data,
                       model.embed.data, w.tokens.data, c.dim);
    for (size_t l = 0; l < model.layers.size(); ++l) {
        attention_block(model, model.layers[l], int(l), B, T, cache);
        if (c.is_moe_layer(int(l)))
            moe_ffn(model, model.layers[l], rows);
        else
            dense_ffn(model, model.layers[l], rows);
    }
    if (cache)
        launch_overlapping(model_stream, "advance", advance_kernel, dim3(1), dim3(1), 0, cache->length_on_device.data, T);
    linear(model, logits ? logits : w.logits.data, w.x.data, model.lm_head.data, true, rows, c.dim, c.vocab_size,
           LinearOutput::store);
}

// Token ids are checked against the vocabulary before they go to the device.
void check_token_ids(const std::span<const int> tokens, const int V) {
    for (const int token : tokens)
        check(token >= 0 && token < V, "token id " + std::to_string(token) + " is outside the vocabulary");
}
void upload_tokens(DeviceBuffer<int>& buffer, const std::span<const int> tokens, const int V) {
    check_token_ids(tokens, V);
    CUDA_CHECK(cudaMemcpyAsync(buffer.data, tokens.data(), tokens.size_bytes(), cudaMemcpyHostToDevice, model_stream));
}

// ==== GPU model: inference and evaluation ====
// prefill and decode_step as in gpt.cpp §11, so gpt.cpp's generate and prefill_prompt run on the GPU unchanged.
// A decode step reads every weight once and does two flops with each, so memory bandwidth sets its limit:
//   time a token >= (bytes of the weights + bytes of the KV cache read) / bandwidth.
// Its kernels are short (a D x D gemv reads 2.4 MB: half a microsecond at 4.8 TB/s), so launching them one by one
// from the CPU would cost more than running them. Three things keep the GPU on the work instead:
//  - the first decode step of a state is captured into a CUDA graph, with the copy of the token in (through
//    page-locked host memory), and every step replays it; its kernels read the position from the device;
//  - five kernels a layer (the q, k, v gemv with RoPE and the cache write, stage 7, o_proj, [gate; up] with SwiGLU,
//    down), each launched to overlap the one before, so that a gemv loads its weights before it waits for its input;
//  - the last gemv writes the logits straight into page-locked host memory (a copy node cost about 3 us a token).
// Measured (H200, 2026-12-04, ./gpt_cuda bench; L12 D768 H12 G4 F2048 V2048, fp32): 0.175 ms a token at positions 2-65
// and 0.244 ms at 4032-4095, 42% and 40% of the bandwidth limit (309 and 408 MB a token at the measured 4176 GB/s),
// from 0.366 and 0.491 ms at the start of 2026-12-03. What is left is the chain of 63 dependent kernels, about 15 us a
// layer: a hand-over costs 0.6-0.9 us, and with stage 7 left out (wrong logits, a timing only) the step takes 0.137 ms
// at any position, about 54% of the limit; stage 7 is where the rest goes (see its banner). On its timeline the gemvs
// after stage 7 load their weights while it runs, and its own few round trips to L2 wait behind those loads, yet every
// way tried of loading them later or earlier made the step slower; docs/gpu_notes.md has each step and each try.
// Prefill of 4096 tokens: 31.3 ms (stage 6).

// One captured decode step, replayed with one launch.
struct CudaGraph {
    cudaGraphExec_t exec = nullptr;
    CudaGraph() = default;
    CudaGraph(const CudaGraph&) = delete;
    CudaGraph& operator=(const CudaGraph&) = delete;
    CudaGraph(CudaGraph&& other) noexcept : exec(std::exchange(other.exec, nullptr)) {}
    CudaGraph& operator=(CudaGraph&& other) noexcept {
        if (this != &other) {
            if (exec) cudaGraphExecDestroy(exec);
            exec = std::exchange(other.exec, nullptr);
        }
        return *this;
    }
    ~CudaGraph() {
        if (exec) cudaGraphExecDestroy(exec);
    }
};

struct GpuInferenceState {
    GpuKvCache cache;
    std::vector<float> logits;  // [V], the prediction after the last position processed
    CudaGraph decode_graph;     // captured at the first decode step (a copy captures its own: it has its own cache)

    GpuInferenceState() = default;
    GpuInferenceState(const GpuInferenceState& other) : cache(other.cache), logits(other.logits) {}
    GpuInferenceState(GpuInferenceState&&) = default;
    GpuInferenceState& operator=(GpuInferenceState&&) = default;
};

// The last row of work.logits -> state.logits (waits for the GPU).
void download_last_logits(GpuModel& model, GpuInferenceState& state, const int rows) {
    const int V = model.config.vocab_size;
    state.logits.resize(V);
    CUDA_CHECK(cudaMemcpyAsync(state.logits.data(), model.work.logits.data + size_t(rows - 1) * V, sizeof(float) * V,
                               cudaMemcpyDeviceToHost, model_stream));
    CUDA_CHECK(cudaStreamSynchronize(model_stream));
}

GpuInferenceState prefill(GpuModel& model, const std::span<const int> prompt) {
    check(!prompt.empty(), "prefill needs at least one token");
    check(int(prompt.size()) <= model.config.context, "positions up to " + std::to_string(prompt.size()) +
                                                          " do not fit the model's context of " +
                                                          std::to_string(model.config.context));
    GpuInferenceState state;
    state.cache = make_gpu_kv_cache(model.config);
    upload_tokens(model.work.tokens, prompt, model.config.vocab_size);
    gpu_forward(model, 1, int(prompt.size()), &state.cache);
    state.cache.length = int(prompt.size());
    download_last_logits(model, state, int(prompt.size()));
    return state;
}

void decode_step(GpuModel& model, GpuInferenceState& state, const int token) {
    check(state.cache.length < model.config.context, "positions up to " + std::to_string(state.cache.length + 1) +
                                                         " do not fit the model's context of " +
                                                         std::to_string(model.config.context));
    const int V = model.config.vocab_size;
    check_token_ids(std::span<const int>(&token, 1), V);
    GpuActivations& w = model.work;
    w.decode_token[0] = token;
    if (!state.decode_graph.exec) {
        cudaGraph_t graph = nullptr;
        CUDA_CHECK(cudaStreamBeginCapture(model_stream, cudaStreamCaptureModeThreadLocal));
        try {
            CUDA_CHECK(cudaMemcpyAsync(w.tokens.data, w.decode_token.get(), sizeof(int), cudaMemcpyHostToDevice,
                                       model_stream));
            gpu_forward(model, 1, 1, &state.cache, device_view(w.decode_logits));
        } catch (const Error&) {
            cudaStreamEndCapture(model_stream, &graph);
            if (graph) cudaGraphDestroy(graph);
            throw;
        }
        CUDA_CHECK(cudaStreamEndCapture(model_stream, &graph));
        const cudaError_t status = cudaGraphInstantiate(&state.decode_graph.exec, graph, 0);
        cudaGraphDestroy(graph);
        CUDA_CHECK(status);
    }
    CUDA_CHECK(cudaGraphLaunch(state.decode_graph.exec, model_stream));
    CUDA_CHECK(cudaStreamSynchronize(model_stream));
    state.cache.length += 1;
    state.logits.assign(w.decode_logits.get(), w.decode_logits.get() + V);
}

// The expert loads that route_kernel counts on the device: zeroed, then read into an EvalResult as gpt.cpp's
// add_expert_counts reports them (per MoE layer, the tokens routed to each expert, K per token).
void reset_expert_counts(GpuModel& model) {
    for (GpuLayer& layer : model.layers)
        if (layer.expert_counts.count)
            CUDA_CHECK(cudaMemsetAsync(layer.expert_counts.data, 0, sizeof(int) * layer.expert_counts.count,
                                       model_stream));
}
void read_expert_counts(const GpuModel& model, EvalResult& result) {
    CUDA_CHECK(cudaStreamSynchronize(model_stream));
    for (int l = 0; l < model.config.n_layers; ++l) {
        if (!model.config.is_moe_layer(l)) continue;
        std::vector<int> counts(model.config.n_experts);
        model.layers[l].expert_counts.download(counts);
        result.moe_layers.push_back(l);
        result.expert_counts.emplace_back(counts.begin(), counts.end());
    }
}

// Evaluation (DESIGN.md §1), as gpt.cpp's evaluate: windows at 0, T, 2T, ..., as many side by side as the activations
// hold; per-position losses on the GPU, summed in double on the CPU; the expert load of MoE models.
EvalResult evaluate(GpuModel& model, const std::vector<int>& stream) {
    const int T = model.config.context, V = model.config.vocab_size;
    const size_t targets = stream.size() >= 2 ? stream.size() - 1 : 0;
    EvalResult result;
    if (targets == 0) return result;
    GpuActivations& w = model.work;
    reset_expert_counts(model);
    std::vector<float> losses(w.max_rows);
    double total = 0.0;
    const auto run = [&](const size_t first, const int B, const int length) {
        const int rows = B * length;
        upload_tokens(w.tokens, std::span<const int>(stream.data() + first, rows), V);
        upload_tokens(w.targets, std::span<const int>(stream.data() + first + 1, rows), V);
        gpu_forward(model, B, length, nullptr);
        launch_on(model_stream, "cross_entropy", cross_entropy_kernel, dim3(rows), dim3(256), 0, w.losses.data,
                  w.logits.data, w.targets.data, V);
        CUDA_CHECK(cudaMemcpyAsync(losses.data(), w.losses.data, sizeof(float) * rows, cudaMemcpyDeviceToHost,
                                   model_stream));
        CUDA_CHECK(cudaStreamSynchronize(model_stream));
        for (int n = 0; n < rows; ++n) total += losses[n];
    };
    const size_t full_windows = targets / T, windows_per_run = std::max(1, w.max_rows / T);
    for (size_t window = 0; window < full_windows; window += windows_per_run)
        run(window * T, int(std::min(windows_per_run, full_windows - window)), T);
    if (const int rest = int(targets - full_windows * T); rest > 0) run(full_windows * T, 1, rest);
    read_expert_counts(model, result);
    result.tokens = targets;
    result.loss = total / double(targets);
    return result;
}

// ==== Bench and CLI ====
// ./gpt_cuda bench runs every stage on the issue's shapes and writes the table as Markdown and as an SVG bar chart.
// % of peak is against the fp32 FMA peak for matmul and attention, and against DRAM bandwidth for the memory-bound
// stages (0a-0c, 3a). "x prev" is the speed-up over the previous stage of the same kind on the same workload.

struct DevicePeaks {
    std::string name;
    int sms = 0;
    double clock_mhz = 0.0, fp32_tflops = 0.0, dram_gbps = 0.0;
};

DevicePeaks device_peaks() {
    int device = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    cudaDeviceProp prop{};
    CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    int clock_khz = 0, memory_clock_khz = 0, bus_bits = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, device));
    CUDA_CHECK(cudaDeviceGetAttribute(&memory_clock_khz, cudaDevAttrMemoryClockRate, device));
    CUDA_CHECK(cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, device));
    const int fp32_lanes = (prop.major == 8 && prop.minor == 0) ? 64 : 128;  // FP32 FMA lanes per SM (A100: 64)
    DevicePeaks peaks;
    peaks.name = prop.name, peaks.sms = prop.multiProcessorCount, peaks.clock_mhz = clock_khz * 1e-3;
    peaks.fp32_tflops = 2.0 * peaks.sms * fp32_lanes * clock_khz * 1e3 * 1e-12;
    peaks.dram_gbps = 2.0 * memory_clock_khz * 1e3 * (bus_bits / 8) * 1e-9;  // double data rate
    return peaks;
}

struct CudaBenchRow {
    std::string stage, kernel, workload;
    StageKind kind = StageKind::attention;
    bool yardstick = false;
    StageResult result;
    double speedup = 0.0;  // over the previous stage of the same kind and workload; 0 when there is none
    double peak_percent = 0.0;
};

bool memory_bound(const StageKind kind) {
    return kind == StageKind::elementwise || kind == StageKind::row_reduce || kind == StageKind::row_softmax;
}

std::string today() {
    const std::time_t now = std::time(nullptr);
    char text[16];
    std::strftime(text, sizeof(text), "%Y-%m-%d", std::gmtime(&now));
    return text;
}

std::string bench_markdown(const std::vector<CudaBenchRow>& rows, const DevicePeaks& peaks,
                           const std::string& command) {
    std::string md =
        "Measured on " + peaks.name + " (" + std::to_string(peaks.sms) + " SMs, fp32 peak " +
        format("%.1f", peaks.fp32_tflops) + " TFLOP/s = SMs x 128 FMA x 2 x " + format("%.0f", peaks.clock_mhz) +
        " MHz; DRAM " + format("%.0f", peaks.dram_gbps) + " GB/s), " + today() + ", `" + command +
        "`. Median of 10 runs after a warm-up, L2 flushed before each; max error is the largest |gpu - cpu| "
        "over the checked values (attention: the output; LSE is checked too).\n\n";
    md += "| stage | kernel | workload | ms | TFLOP/s | % of peak | GB/s | x prev | max error |\n";
    md += "|---|---|---|---:|---:|---:|---:|---:|---:|\n";
    for (const CudaBenchRow& row : rows) {
        const StageResult& r = row.result;
        md += "| " + row.stage + " | `" + row.kernel + "` | " + row.workload + " | ";
        if (!r.passed) {
            md += "failed | | | | | " + r.failure + " |\n";
            continue;
        }
        md += format("%.3f", r.ms) + " | " + format(r.tflops < 1 ? "%.3f" : "%.1f", r.tflops) + " | " +
              format("%.0f%%", row.peak_percent) + " | " + format("%.0f", r.gbps) + " | " +
              (row.speedup > 0 ? format("%.2f", row.speedup) : std::string("-")) + " | " +
              format("%.1e", r.max_error) + " |\n";
    }
    return md;
}

std::string bench_json(const std::vector<CudaBenchRow>& rows, const DevicePeaks& peaks) {
    std::string json = "{\"device\": " + json_quote(peaks.name) + ", \"date\": " + json_quote(today()) +
                       ", \"fp32_peak_tflops\": " + format("%.3f", peaks.fp32_tflops) +
                       ", \"dram_peak_gbps\": " + format("%.1f", peaks.dram_gbps) + ", \"rows\": [";
    for (size_t i = 0; i < rows.size(); ++i) {
        const CudaBenchRow& row = rows[i];
        const StageResult& r = row.result;
        json +=
            std::string(i ? ", " : "") + "\n  {\"stage\": " + json_quote(row.stage) +
            ", \"kernel\": " + json_quote(row.kernel) + ", \"workload\": " + json_quote(row.workload) +
            ", \"passed\": " + (r.passed ? "true" : "false") + ", \"ms\": " + format("%.6g", r.ms) +
            ", \"tflops\": " + format("%.6g", r.tflops) + ", \"gbps\": " + format("%.6g", r.gbps) +
            ", \"peak_percent\": " + format("%.4g", row.peak_percent) +
            ", \"speedup\": " + format("%.4g", row.speedup) +
            ", \"max_error\": " + (std::isfinite(r.max_error) ? format("%.4g", r.max_error) : "null") +
            ", \"max_lse_error\": " + (std::isfinite(r.max_lse_error) ? format("%.4g", r.max_lse_error) : "null") +
            "}";
    }
    return json + "\n]}\n";
}

// Horizontal bars of TFLOP/s for the compute-bound rows (stage 1 and attention), one bar per row, a gap between
// workloads, one colour per stage (cuBLAS grey) and a dashed line at the fp32 peak.
std::string bench_svg(const std::vector<CudaBenchRow>& rows, const DevicePeaks& peaks) {
    constexpr int width = 980, label_width = 300, bar_height = 18, gap = 4, group_gap = 12, top = 50;
    const std::map<std::string, const char*> colors = {
        {"cuBLAS", "#9e9e9e"}, {"1a", "#e57373"}, {"1b", "#ffb74d"}, {"1c", "#81c784"}, {"1d", "#4db6ac"},
        {"2", "#e57373"},      {"3b", "#ffb74d"}, {"4", "#fff176"},  {"5", "#81c784"},  {"6", "#4fc3f7"},
        {"8", "#9575cd"}};
    std::vector<const CudaBenchRow*> bars;
    int groups = 0;
    for (const CudaBenchRow& row : rows)
        if (!memory_bound(row.kind) && row.result.passed) {
            groups += bars.empty() || bars.back()->workload != row.workload;
            bars.push_back(&row);
        }
    const int height = top + int(bars.size()) * (bar_height + gap) + groups * group_gap + 30;
    const double scale = (width - label_width - 60) / peaks.fp32_tflops;
    std::string svg = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + std::to_string(width) + "\" height=\"" +
                      std::to_string(height) + "\" font-family=\"sans-serif\" font-size=\"12\">\n";
    svg += "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
    svg += "<text x=\"10\" y=\"20\" font-size=\"15\">gpt_cuda bench: fp32 TFLOP/s on " + peaks.name + ", " + today() +
           " (dashed line: peak " + format("%.1f", peaks.fp32_tflops) + ")</text>\n";
    const int peak_x = label_width + int(peaks.fp32_tflops * scale);
    svg += "<line x1=\"" + std::to_string(peak_x) + "\" y1=\"" + std::to_string(top - 8) + "\" x2=\"" +
           std::to_string(peak_x) + "\" y2=\"" + std::to_string(height - 20) +
           "\" stroke=\"#555\" stroke-dasharray=\"4 3\"/>\n";
    int y = top - group_gap;
    for (size_t i = 0; i < bars.size(); ++i) {
        const CudaBenchRow& row = *bars[i];
        if (i == 0 || bars[i - 1]->workload != row.workload) y += group_gap;
        const int w = std::max(1, int(row.result.tflops * scale));
        const auto color = colors.find(row.stage);
        svg += "<text x=\"10\" y=\"" + std::to_string(y + 13) + "\">" + row.stage + "  " + row.workload + "</text>\n";
        svg += "<rect x=\"" + std::to_string(label_width) + "\" y=\"" + std::to_string(y) + "\" width=\"" +
               std::to_string(w) + "\" height=\"" + std::to_string(bar_height) + "\" fill=\"" +
               (color == colors.end() ? "#7986cb" : color->second) + "\"/>\n";
        svg += "<text x=\"" + std::to_string(label_width + w + 5) + "\" y=\"" + std::to_string(y + 13) + "\">" +
               format(row.result.tflops < 1 ? "%.2f" : "%.1f", row.result.tflops) + "</text>\n";
        y += bar_height + gap;
    }
    return svg + "</svg>\n";
}

struct BenchOptions {
    bool json = false, quick = false, model = true;
    std::string out_dir = "out";
    std::set<std::string> only;  // stage ids to run; empty = all
};

std::vector<CudaBenchRow> run_bench(const BenchOptions& options, const DevicePeaks& peaks) {
    std::vector<CudaBenchRow> rows;
    const auto wanted = [&](const Stage& stage) { return options.only.empty() || options.only.count(stage.id); };
    const auto run_group = [&](const StageKind kind, const RunConfig& config,
                               const std::vector<const Stage*>& group) {
        std::vector<const Stage*> selected;
        for (const Stage* stage : group)
            if (wanted(*stage)) selected.push_back(stage);
        if (selected.empty()) return;
        Problem problem = make_problem(kind, config);
        for (const Stage* stage : selected) {
            CudaBenchRow row;
            row.stage = stage->id, row.kernel = stage->kernel, row.workload = problem.workload;
            row.kind = kind, row.yardstick = stage == &cublas_yardstick;
            try {
                row.result = run_stage(*stage, problem);
            } catch (const Error& e) {  // a stage that cannot take this workload gets a failed row; the bench goes on
                row.result.passed = false, row.result.failure = e.what();
            }
            const StageResult& r = row.result;
            row.peak_percent = 100.0 * (memory_bound(kind) ? r.gbps / peaks.dram_gbps : r.tflops / peaks.fp32_tflops);
            for (auto it = rows.rbegin(); it != rows.rend(); ++it)
                if (it->kind == kind && it->workload == row.workload && !it->yardstick && !row.yardstick) {
                    if (it->result.passed && r.passed && r.ms > 0) row.speedup = it->result.ms / r.ms;
                    break;
                }
            std::fprintf(stderr, "%-6s %-28s %-32s %s %9.3f ms %8.2f TFLOP/s %7.0f GB/s  err %.1e\n",
                         row.stage.c_str(), row.kernel.c_str(), row.workload.c_str(), r.passed ? "ok  " : "FAIL",
                         r.ms, r.tflops, r.gbps, r.max_error);
            if (!r.passed) std::fprintf(stderr, "       %s\n", r.failure.c_str());
            rows.push_back(std::move(row));
        }
    };
    const auto stage = [](const char* id) { return &find_stage(id); };
    RunConfig config;
    // Stage 0 and 3a on the score matrix of the first attention shape: x [B*H*N, N].
    config.shape =
        options.quick ? AttentionShape{1, 12, 12, 1024, 1024, 64} : AttentionShape{8, 12, 12, 1024, 1024, 64};
    run_group(StageKind::elementwise, config, {stage("0a")});
    run_group(StageKind::row_reduce, config, {stage("0b")});
    run_group(StageKind::row_softmax, config, {stage("0c"), stage("3a")});
    // Stage 1 at 4096^3, next to cuBLAS.
    const int n = options.quick ? 2048 : 4096;
    config.shape = AttentionShape{1, 1, 1, n, n, n};
    run_group(StageKind::matmul, config, {&cublas_yardstick, stage("1a"), stage("1b"), stage("1c")});
    run_group(StageKind::matmul_qk, config, {stage("1d")});
    // Attention stages on the issue's shapes, causal and not.
    std::vector<AttentionShape> shapes = {{8, 12, 12, 1024, 1024, 64}};
    if (!options.quick) shapes.push_back({4, 16, 16, 4096, 4096, 64}), shapes.push_back({2, 16, 16, 8192, 8192, 128});
    for (AttentionShape shape : shapes)
        for (const bool causal : {false, true}) {
            shape.causal = causal, config.shape = shape;
            run_group(StageKind::attention, config, {stage("2"), stage("3b"), stage("4"), stage("5"), stage("6"), stage("8")});
        }
    return rows;
}

// ---- The model section of the bench ----
// A larger model with random weights (gpt.cpp's init): L12 D768 H12 G4 F2048 V2048, context 4096 (--quick: L4, 1024).
// Prefill tokens/s with each attention stage, and decode tokens/s, on the GPU and with gpt.cpp on the CPU. Decode is
// memory-bound: each token reads every weight once plus the KV cache so far, so its speed limit is the measured copy
// bandwidth over those bytes, and the table gives the share of that limit reached. GPU prefill logits are compared
// with the CPU's before anything is timed.

struct ModelBenchRow {
    std::string engine, phase;
    double tokens_per_s = 0.0, bytes_per_token = 0.0, limit_share = 0.0;  // 0: not a memory-bound row
};

struct ModelBench {
    ModelConfig config;
    double copy_gbps = 0.0, max_logit_error = 0.0;
    int greedy_agree = 0, greedy_steps = 0;
    std::vector<ModelBenchRow> rows;
};

// Device-to-device copy of 1 GiB, bytes read plus bytes written per second (the median of 10).
double measured_copy_gbps() {
    constexpr size_t bytes = size_t(1) << 30;
    DeviceBuffer<char> from(bytes), to(bytes);
    CUDA_CHECK(cudaMemset(from.data, 1, bytes));
    std::vector<double> seconds;
    for (int run = 0; run < 11; ++run) {
        CUDA_CHECK(cudaDeviceSynchronize());
        Timer timer;
        CUDA_CHECK(cudaMemcpy(to.data, from.data, bytes, cudaMemcpyDeviceToDevice));
        CUDA_CHECK(cudaDeviceSynchronize());
        if (run > 0) seconds.push_back(timer.seconds());
    }
    std::sort(seconds.begin(), seconds.end());
    return 2.0 * bytes / (0.5 * (seconds[4] + seconds[5])) * 1e-9;
}

// Bytes a decode step reads with `length` positions in the cache: every weight (the embedding only when tied, as the
// output layer) and the keys and values of length + 1 positions.
double decode_bytes(const ModelConfig& c, const int length) {
    const double weights = 4.0 * (double(layers_weights(c)) + c.dim + double(c.vocab_size) * c.dim);  // + embedding row
    return weights + double(kv_cache_bytes_per_token(c)) * (length + 1);
}

int greedy_token(const std::vector<float>& logits) {
    return int(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

ModelBench run_model_bench(const bool quick) {
    ModelBench bench;
    ModelConfig& c = bench.config;
    c.vocab_size = 2048, c.dim = 768, c.n_heads = 12, c.n_kv_heads = 4, c.ffn_dim = 2048;
    c.n_layers = quick ? 4 : 12, c.context = quick ? 1024 : 4096;
    Model model = make_model(c);
    init_model(model, 1);
    Rng rng(5);
    std::vector<int> tokens(c.context);
    for (int& token : tokens) token = int(rng.below(c.vocab_size));
    bench.copy_gbps = measured_copy_gbps();
    GpuModel gpu = upload_model(model, "6", c.context);
    constexpr int decode_steps = 64, cpu_decode_steps = 16;
    const int long_prompt = c.context - decode_steps - 1;
    const auto log = [](const ModelBenchRow& row) {
        std::fprintf(stderr, "model  %-4s %-44s %10.1f tokens/s\n", row.engine.c_str(), row.phase.c_str(),
                     row.tokens_per_s);
    };
    // The check: the CPU's prefill of the long prompt and 16 greedy steps, against the GPU's.
    const std::span<const int> prompt(tokens.data(), long_prompt);
    Timer cpu_prefill_timer;
    InferenceState cpu_state = prefill(model, prompt);
    const double cpu_prefill_seconds = cpu_prefill_timer.seconds();
    GpuInferenceState gpu_state = prefill(gpu, prompt);
    for (int v = 0; v < c.vocab_size; ++v)
        bench.max_logit_error =
            std::max(bench.max_logit_error, std::fabs(double(gpu_state.logits[v]) - cpu_state.logits[v]));
    Timer cpu_decode_timer;
    for (int step = 0; step < cpu_decode_steps; ++step) {
        const int cpu_token = greedy_token(cpu_state.logits), gpu_token = greedy_token(gpu_state.logits);
        bench.greedy_agree += cpu_token == gpu_token, ++bench.greedy_steps;
        decode_step(model, cpu_state, cpu_token);
        decode_step(gpu, gpu_state, cpu_token);
    }
    const double cpu_decode_seconds = cpu_decode_timer.seconds();
    // GPU prefill of the whole context with each many-row attention stage (the median of 3 after a warm-up).
    for (const char* id : {"2", "3b", "4", "5", "6", "8"}) {
        gpu.attention_stage = &find_stage(id);
        std::vector<double> seconds;
        for (int run = 0; run < 4; ++run) {
            Timer timer;
            prefill(gpu, tokens);
            if (run > 0) seconds.push_back(timer.seconds());
        }
        std::sort(seconds.begin(), seconds.end());
        bench.rows.push_back({"GPU", "prefill " + std::to_string(c.context) + " tokens, stage " + id,
                              c.context / seconds[1]});
        log(bench.rows.back());
    }
    bench.rows.push_back({"CPU", "prefill " + std::to_string(long_prompt) + " tokens", long_prompt / cpu_prefill_seconds});
    log(bench.rows.back());
    // GPU decode: greedy steps after a prompt of 1 token and after the long prompt (the cache nearly full).
    for (const int prompt_length : {1, long_prompt}) {
        GpuInferenceState state = prefill(gpu, std::span<const int>(tokens.data(), prompt_length));
        decode_step(gpu, state, greedy_token(state.logits));  // captures the graph
        double bytes = 0.0;
        Timer timer;
        for (int step = 0; step < decode_steps; ++step) {
            bytes += decode_bytes(c, state.cache.length);
            decode_step(gpu, state, greedy_token(state.logits));
        }
        const double seconds = timer.seconds();
        ModelBenchRow row{"GPU", "decode at positions " + std::to_string(prompt_length + 1) + "-" +
                                     std::to_string(prompt_length + decode_steps),
                          decode_steps / seconds, bytes / decode_steps};
        row.limit_share = bytes / seconds * 1e-9 / bench.copy_gbps;
        bench.rows.push_back(row);
        log(row);
    }
    ModelBenchRow cpu_row{"CPU", "decode at positions " + std::to_string(long_prompt + 1) + "-" +
                                     std::to_string(long_prompt + cpu_decode_steps),
                          cpu_decode_steps / cpu_decode_seconds, decode_bytes(c, long_prompt + cpu_decode_steps / 2)};
    bench.rows.push_back(cpu_row);
    log(cpu_row);
    return bench;
}

std::string model_bench_markdown(const ModelBench& bench, const DevicePeaks& peaks) {
    std::string md = "\nGPU model: " + describe_model(bench.config) + ", random weights, fp32, batch 1, on " +
                     peaks.name + ", " + today() + ". Decode bandwidth limit: measured copy bandwidth " +
                     format("%.0f", bench.copy_gbps) +
                     " GB/s (bytes read + written) / bytes read per token (every weight + the KV cache so far). "
                     "Check before timing: GPU prefill logits vs the CPU's, max |error| " +
                     format("%.1e", bench.max_logit_error) + "; greedy tokens equal in " +
                     std::to_string(bench.greedy_agree) + " of " + std::to_string(bench.greedy_steps) + " steps.\n\n";
    md += "| engine | phase | tokens/s | ms/token | MB read/token | % of bandwidth limit |\n|---|---|---:|---:|---:|---:|\n";
    for (const ModelBenchRow& row : bench.rows)
        md += "| " + row.engine + " | " + row.phase + " | " + format("%.1f", row.tokens_per_s) + " | " +
              format("%.3f", 1e3 / row.tokens_per_s) + " | " +
              (row.bytes_per_token > 0 ? format("%.0f", row.bytes_per_token * 1e-6) : std::string("-")) + " | " +
              (row.limit_share > 0 ? format("%.0f%%", 100.0 * row.limit_share) : std::string("-")) + " |\n";
    return md;
}

// The command line reuses gpt.cpp's flag tables (Command, FlagSpec), parser (parse_flags) and UsageError. eval and
// sample take ./gpt's own flags for them (less --threads: the work is on the GPU), plus --stage.
Command gpu_model_command(const std::string& name) {
    const std::vector<Command> cpu_commands = commands();
    Command command =
        *std::find_if(cpu_commands.begin(), cpu_commands.end(), [&](const Command& c) { return c.name == name; });
    std::erase_if(command.flags, [](const FlagSpec& flag) { return flag.name == "--threads"; });
    command.summary += ", on the GPU";
    command.flags.push_back(
        {"--stage", "6", "attention stage for many positions (prompt, eval windows): 2, 3b, 4, 5, 6 or 8; decode uses 7"});
    return command;
}

std::vector<Command> cuda_commands() {
    return {
        gpu_model_command("eval"),
        gpu_model_command("sample"),
        {"run",
         "run one stage on random inputs, check it against gpt.cpp's attention, time it",
         {{"--stage", "", "stage id: 0a 0b 0c 1a 1b 1c 1d 2 3a 3b 4 5 6 7 8 (required)"},
          {"--batch", "1", "B, sequences"},
          {"--heads", "4", "H, query heads"},
          {"--kv-heads", "", "G, key/value heads, dividing H (default H)"},
          {"--n", "1024", "Nq, query rows"},
          {"--nk", "", "Nk, keys (default Nq)"},
          {"--d", "64", "hd, head size (stages 3b-7 take 32, 64, 80, 128)"},
          {"--causal", "", "causal mask, bottom-right aligned when Nq != Nk", true},
          {"--score-std", "1", "standard deviation of the scores (40 needs the max-subtraction)"},
          {"--seed", "1", "seed of the random inputs"},
          {"--runs", "10", "timed runs, the median is reported (0: check only)"},
          {"--check-rows", "-1",
           "rows checked per head: 0 all, -1 all unless the CPU reference would be slow (then 256)"}}},
        {"bench",
         "every stage on the standard shapes; writes cuda_bench.md, .svg and .json",
         {{"--json", "", "print the table as JSON instead of Markdown", true},
          {"--out", "out", "folder for cuda_bench.md, cuda_bench.svg and cuda_bench.json"},
          {"--stages", "", "only these stage ids, comma-separated, e.g. 5,6; 'model' is the GPU model (default all)"},
          {"--quick", "", "smaller shapes: the first attention shape only, matmul at 2048^3, model L4 T1024", true}}},
        {"stages", "list the stages", {}},
    };
}

std::string cuda_usage() {
    std::string text =
        "usage: ./gpt_cuda command [flags]   attention on the GPU, stage by stage, checked against gpt.cpp; and the\n"
        "whole model of a gpt.cpp checkpoint on the GPU (eval, sample)\n"
        "Stage 0 and 3a work on the score matrix [B*H*Nq, Nk]; stages 1a-1c on B*H products [Nq, Nk] x [Nk, hd],\n"
        "1d on [Nq, hd] x [Nk, hd]^T; stages 2-8 on Q [B, H, Nq, hd], K and V [B, G, Nk, hd].\n";
    for (const Command& command : cuda_commands()) {
        text += "\n./gpt_cuda " + command.name + ": " + command.summary + "\n";
        for (const FlagSpec& flag : command.flags) {
            std::string left = "  " + flag.name + (flag.is_switch ? "" : " X");
            left.resize(std::max<size_t>(left.size() + 1, 18), ' ');
            text +=
                left + flag.help + (flag.default_value.empty() ? "" : " (default " + flag.default_value + ")") + "\n";
        }
    }
    return text;
}

int cmd_cuda_run(const Flags& flags) {
    if (!flags.has("--stage")) throw UsageError("run needs --stage");
    const Stage& stage = find_stage(flags.text("--stage"));
    RunConfig config;
    AttentionShape& s = config.shape;
    s.B = flags.positive("--batch"), s.H = flags.positive("--heads");
    s.G = flags.has("--kv-heads") ? flags.positive("--kv-heads") : s.H;
    s.Nq = flags.positive("--n"), s.Nk = flags.has("--nk") ? flags.positive("--nk") : s.Nq,
    s.hd = flags.positive("--d");
    s.causal = flags.has("--causal");
    config.score_std = float(flags.real("--score-std"));
    config.seed = flags.seed("--seed");
    config.timed_runs = flags.integer("--runs");
    config.sample_rows = flags.integer("--check-rows");
    check_attention_shape(stage.id, s);
    check(cuda_device_available(), "no CUDA device found");
    set_thread_count(int(std::max(1u, std::thread::hardware_concurrency())));  // for the CPU reference
    const DevicePeaks peaks = device_peaks();
    Problem problem = make_problem(stage.kind, config);
    const StageResult r = run_stage(stage, problem);
    std::printf("stage %s (%s): %s\n", stage.id, stage.kernel, stage.idea);
    std::printf("workload: %s, scores ~ N(0, %g^2), seed %" PRIu64 ", on %s\n", problem.workload.c_str(),
                config.score_std, config.seed, peaks.name.c_str());
    std::printf("check:    %s, max |error| %.2e (out)", r.passed ? "passed" : "FAILED", r.max_error);
    if (problem.lse.count) std::printf(", %.2e (lse)", r.max_lse_error);
    std::printf("; %" PRId64 " of %" PRId64 " rows checked (atol %.1e, rtol %.0e)\n", r.checked_rows, r.total_rows,
                problem.atol, problem.rtol);
    if (!r.passed) {
        std::printf("          first failure: %s\n", r.failure.c_str());
        return 1;
    }
    if (r.ms > 0) {
        const bool memory = memory_bound(stage.kind);
        std::printf("time:     %.3f ms (median of %d), %.2f TFLOP/s, %.0f GB/s, %.1f%% of the %s peak\n", r.ms,
                    config.timed_runs, r.tflops, r.gbps,
                    100.0 * (memory ? r.gbps / peaks.dram_gbps : r.tflops / peaks.fp32_tflops),
                    memory ? "DRAM" : "fp32");
    }
    return 0;
}

int cmd_cuda_bench(const Flags& flags, const std::vector<std::string>& args) {
    BenchOptions options;
    options.json = flags.has("--json"), options.quick = flags.has("--quick"), options.out_dir = flags.text("--out");
    std::stringstream list(flags.text("--stages"));
    if (flags.has("--stages")) options.model = false;
    for (std::string id; std::getline(list, id, ',');)
        if (id == "model")
            options.model = true, options.only.insert(id);
        else
            options.only.insert(find_stage(id).id);
    check(cuda_device_available(), "no CUDA device found");
    set_thread_count(int(std::max(1u, std::thread::hardware_concurrency())));  // for the CPU reference
    const DevicePeaks peaks = device_peaks();
    std::string command = "./gpt_cuda bench";
    for (const std::string& arg : args) command += " " + arg;
    const std::vector<CudaBenchRow> rows = run_bench(options, peaks);
    std::string markdown = rows.empty() ? "`" + command + "`\n" : bench_markdown(rows, peaks, command);
    const std::string json = bench_json(rows, peaks);
    if (options.model) markdown += model_bench_markdown(run_model_bench(options.quick), peaks);
    std::filesystem::create_directories(options.out_dir);
    write_file_atomically(options.out_dir + "/cuda_bench.md", markdown);
    write_file_atomically(options.out_dir + "/cuda_bench.svg", bench_svg(rows, peaks));
    write_file_atomically(options.out_dir + "/cuda_bench.json", json);
    std::fputs(options.json ? json.c_str() : markdown.c_str(), stdout);
    for (const CudaBenchRow& row : rows)
        if (!row.result.passed) return 1;
    return 0;
}

// Evaluation runs up to eval_rows positions (windows side by side) per forward pass.
constexpr int eval_rows = 4096;

int cmd_cuda_eval(const Flags& flags) {
    check(cuda_device_available(), "no CUDA device found");
    const Checkpoint checkpoint = load_checkpoint(flags.text("--model"));
    const std::vector<int> stream = eval_stream(flags, checkpoint.tokenizer);
    GpuModel gpu = upload_model(checkpoint.model, flags.text("--stage"),
                                std::max(checkpoint.model.config.context, eval_rows));
    print_eval_result(flags, evaluate(gpu, stream));
    return 0;
}

int cmd_cuda_sample(const Flags& flags) {
    const SampleConfig config = sample_config_from_flags(flags);
    check(cuda_device_available(), "no CUDA device found");
    const Checkpoint checkpoint = load_checkpoint(flags.text("--model"));
    GpuModel gpu = upload_model(checkpoint.model, flags.text("--stage"), checkpoint.model.config.context);
    print_samples(gpu, checkpoint.tokenizer, config);
    return 0;
}

int cmd_cuda_stages() {
    for (const Stage& stage : stages) std::printf("%-3s %-28s %s\n", stage.id, stage.kernel, stage.idea);
    return 0;
}

int run_cuda_command_line(const std::vector<std::string>& args) {
    if (args.empty()) throw UsageError("no command given");
    for (const std::string& arg : args)
        if (arg == "--help" || arg == "-h" || arg == "help") {
            std::fputs(cuda_usage().c_str(), stdout);
            return 0;
        }
    const std::vector<Command> commands = cuda_commands();
    const auto command =
        std::find_if(commands.begin(), commands.end(), [&](const Command& c) { return c.name == args[0]; });
    if (command == commands.end()) throw UsageError("unknown command '" + args[0] + "'");
    const std::vector<std::string> rest(args.begin() + 1, args.end());
    const Flags flags = parse_flags(*command, rest);
    if (command->name == "eval") return cmd_cuda_eval(flags);
    if (command->name == "sample") return cmd_cuda_sample(flags);
    if (command->name == "run") return cmd_cuda_run(flags);
    if (command->name == "bench") return cmd_cuda_bench(flags, rest);
    return cmd_cuda_stages();
}

#ifndef GPT_NO_MAIN
int main(int argc, char** argv) {
    try {
        return run_cuda_command_line(std::vector<std::string>(argv + 1, argv + argc));
    } catch (const UsageError& e) {
        std::fprintf(stderr, "error: %s\n\n%s", e.what(), cuda_usage().c_str());
        return 2;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
#endif
