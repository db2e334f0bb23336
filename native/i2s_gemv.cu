// W2A8 GEMV over bitnet.cpp's I2_S x86 layout (CUDA): raw[r] = sum_j code(r, j) * q[j], exact int32, the
// same sum as bk_i2s_raw (native/bitnet_kernels.c); the float epilogue ((raw - act_sum) / s * w_scale) stays
// with the caller. Layout: each 128-value block is 32 bytes; byte j of a block holds values j, j+32, j+64,
// j+96 in bits 7-6, 5-4, 3-2, 1-0 (codes 0..2; 3 reads as 3, as the CPU kernels read it).
// One warp per output row; each lane takes 4 packed bytes (16 values) per step and uses __dp4a.
// Compile-checked only here (no GPU in CI): nvcc -c native/i2s_gemv.cu. native/build_cuda.py links it into a
// shared library (nvcc -shared -Xcompiler -fPIC, cudart) that bitnet_ref/device.py loads with ctypes through
// the small C ABI at the end (device count, upload, gemv, free). UNTESTED ON GPU HARDWARE.
#include <cstdint>
#include <cuda_runtime.h>

__global__ void i2s_gemv_raw(const uint8_t *__restrict__ w, const int8_t *__restrict__ q, int32_t *__restrict__ out,
                             int64_t rows, int64_t k) {
    const int lane = threadIdx.x & 31;
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const uint8_t *wr = w + row * (k / 4);
    const int64_t nb = k / 128;
    int32_t acc = 0;
    // step s covers block s/8, bytes 4*(s%8) .. +4
    for (int64_t s = lane; s < nb * 8; s += 32) {
        const int64_t b = s / 8;
        const int j = (int)(s % 8) * 4;
        const uint32_t p = *reinterpret_cast<const uint32_t *>(wr + 32 * b + j);
        const int8_t *qb = q + 128 * b + j;
#pragma unroll
        for (int g = 0; g < 4; g++) {
            const uint32_t codes = (p >> (6 - 2 * g)) & 0x03030303u;  // 4 codes, one per byte
            const int32_t qv = *reinterpret_cast<const int32_t *>(qb + 32 * g);
            acc = __dp4a((int32_t)codes, qv, acc);  // exact int32: |sum| <= 3*128*4 per call
        }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (lane == 0) out[row] = acc;
}

// host launcher: 8 rows (warps) per 256-thread block; returns the CUDA error code (0 on success)
extern "C" int bk_cuda_i2s_gemv_raw(const uint8_t *w, const int8_t *q, int32_t *out, int64_t rows, int64_t k,
                                    cudaStream_t stream) {
    if (k % 128) return -1;
    const int warps = 8;
    const unsigned grid = (unsigned)((rows + warps - 1) / warps);
    if (grid == 0) return 0;
    i2s_gemv_raw<<<grid, warps * 32, 0, stream>>>(w, q, out, rows, k);
    return (int)cudaGetLastError();
}

// -- C ABI for ctypes (bitnet_ref/device.py). Every function returns 0 or a positive cudaError_t code;
// -1 is a bad argument. Not thread-safe: one caller at a time (the scratch buffers are shared).
static int8_t *g_q = nullptr;
static int32_t *g_out = nullptr;
static int64_t g_q_cap = 0, g_out_cap = 0;

// number of CUDA devices in *count; the cudaGetDeviceCount error code otherwise (e.g. no driver)
extern "C" int bk_cuda_device_count(int *count) {
    if (!count) return -1;
    *count = 0;
    return (int)cudaGetDeviceCount(count);
}

// copy nbytes of packed weights to a new device buffer (*dev)
extern "C" int bk_cuda_upload(const void *host, int64_t nbytes, void **dev) {
    if (!host || !dev || nbytes <= 0) return -1;
    *dev = nullptr;
    cudaError_t e = cudaMalloc(dev, (size_t)nbytes);
    if (e != cudaSuccess) return (int)e;
    e = cudaMemcpy(*dev, host, (size_t)nbytes, cudaMemcpyHostToDevice);
    if (e != cudaSuccess) {
        cudaFree(*dev);
        *dev = nullptr;
    }
    return (int)e;
}

extern "C" int bk_cuda_free(void *dev) { return dev ? (int)cudaFree(dev) : 0; }

static int grow(void **buf, int64_t *cap, int64_t need) {
    if (need <= *cap) return 0;
    if (*buf) cudaFree(*buf);
    *buf = nullptr;
    *cap = 0;
    cudaError_t e = cudaMalloc(buf, (size_t)need);
    if (e != cudaSuccess) return (int)e;
    *cap = need;
    return 0;
}

// out[r] = sum_j code(r, j) * q[j] (exact int32) for one activation row q (host, k int8) against the
// uploaded packed weights w_dev (rows x k); out is a host buffer of rows int32. Synchronous.
extern "C" int bk_cuda_i2s_gemv(const void *w_dev, const int8_t *q, int32_t *out, int64_t rows, int64_t k) {
    if (!w_dev || !q || !out || rows <= 0 || k <= 0 || k % 128) return -1;
    int rc = grow((void **)&g_q, &g_q_cap, k);
    if (rc) return rc;
    rc = grow((void **)&g_out, &g_out_cap, rows * (int64_t)sizeof(int32_t));
    if (rc) return rc;
    cudaError_t e = cudaMemcpy(g_q, q, (size_t)k, cudaMemcpyHostToDevice);
    if (e != cudaSuccess) return (int)e;
    rc = bk_cuda_i2s_gemv_raw((const uint8_t *)w_dev, g_q, g_out, rows, k, 0);
    if (rc) return rc;
    e = cudaMemcpy(out, g_out, (size_t)(rows * (int64_t)sizeof(int32_t)), cudaMemcpyDeviceToHost);
    return (int)e;
}
