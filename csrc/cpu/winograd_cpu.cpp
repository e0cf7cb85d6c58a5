// Winograd F(m x m, 3x3) convolution for float32 on the CPU (csrc/cpu/winograd_cpu.h says what and when).
//
// Per block of tiles, on one thread: the input transform V = B^T d B of every (m + 2)^2 input patch (A^2: 81 for
// stride 2), lane by lane over channels ([A^2, tiles, C_in]); a GEMM M = V U per transformed element with the
// transformed weight U = G g G^T ([elements, packed C_in x C_out], cpu/gemm_cpu.h; stride 2 keeps 36 distinct
// elements); the output transform A^T M A, with the bias, residual and ReLU, straight into the output. Blocks keep
// V and M in the thread's cache, M written over the V that the GEMMs have read (gemm_plan); the transforms run on
// the ISA that torch's kernels use (cpu/isa_dispatch.h), the GEMMs on cpu/gemm_cpu.h's kernel with U packed for it.
#include "cpu/winograd_cpu.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/conv_layout_cpu.h"
#include "cpu/gemm_cpu.h"
#include "cpu/isa_dispatch.h"

namespace deeplab_ops {
namespace {

using cpu_isa::kernel_isa;
using cpu_isa::run_isa;

constexpr int kLanes = 64;                      // channels per transform block (a tile's patch stays in L1)
constexpr int64_t kBlockBytes = 1 << 20;         // V and M of one thread's block of tiles (in its L2)
constexpr int64_t kMinBlockTiles = 32;           // rows of each GEMM (fewer read U too often; block_tiles may
                                                 // even blocks out down to kMinSplitTiles over many threads)
constexpr int64_t kMaxBlockTiles = 256;
constexpr int64_t kParallelBlocks = 4;           // blocks a small convolution is split into (threads to use)
constexpr int64_t kMinSplitTiles = 16;           // ... but no block under this many tiles
constexpr int64_t kMinChannels = 32;             // below this the GEMMs are too thin to pay for the transforms
constexpr double kMaxWorkRatio = 0.45;           // GEMM work against direct convolution's, at most
// ... for weights large enough to run in chunks (at least ~300 channels each way): the transforms are a smaller part
// there (measured with F(4x4): 1 x 512 x 33 x 33 at dilation 4, a ratio of 0.62, 1.21-1.30x oneDNN's speed; batch
// 2: 1.03x. F(3x3) now takes that shape at a ratio of 0.43).
constexpr double kMaxWorkRatioChunked = 0.65;
// ... and short grids' work, their weight reads counted (winograd_plan), for weights of chunk size
constexpr double kMaxShortGridRatio = 0.8;
// ... and stride-2 tiles', for transformed weights up to kMaxStridedWeightBytes (36 elements of C_in x C_out:
// about 170 channels each way). Measured on this project's EPYC (2 threads, channels-last, kept weights, bias and
// ReLU, against oneDNN's convolution of the same call): 128 -> 128 on a 129 x 129 map 5.5 against 6.6 ms (work
// 0.63 of direct's by this count), 64 -> 64 on 65 x 65 0.33 against 0.41 ms, at batch 8 3.5 against 3.7 ms; 256 ->
// 256 on 65 x 65 (a 9.4 MB transform, read from L3 by every block's GEMMs) 7.4 against 7.0 ms.
constexpr double kMaxStridedWorkRatio = 0.68;
constexpr int64_t kMaxStridedWeightBytes = 4 << 20;
// The transformed weight, read by every block: up to kBlockWeightBytes each thread's blocks multiply by it (larger
// ones streamed from memory once per block ran 512 x 512 channels at 0.4x oneDNN's speed; 256 x 256 ran at
// 1.0-1.7x); beyond that, chunks of tiles of about kChunkBytes of V and M, each multiplied with U read
// once. Weights over kMaxWeightBytes run oneDNN.
constexpr int64_t kBlockWeightBytes = 12 << 20;
constexpr int64_t kChunkBytes = 48 << 20;
// ... and each of V and M under this: glibc serves a larger allocation by a fresh mmap that is page-faulted in on
// every call (measured: 2 x 2048 x 33 x 33 -> 256 at dilation 6, a 43 MB V per chunk, 62.5 ms against 21.7 ms at
// batch 1, whose 30 MB V is reused from the heap).
constexpr int64_t kChunkBufferBytes = 30 << 20;
constexpr int64_t kMaxWeightBytes = 160 << 20;
// A weight whose transform is not kept (not registered with winograd_cache_allow: the ASPP's branch parameters,
// weights folded inside a compiled graph) is transformed on every call: U = G g G^T costs about as much as this many
// GEMM products per transformed element (measured on this project's Xeon, per call, against the GEMMs' ~9.4 ps per
// product: 256 x 256 and 512 x 512 channels 0.38-0.43 ns per element; over glibc's largest mmap threshold, 32 MB,
// a fresh U is mapped and page-faulted in on each call: 2048 x 256 channels 1.75 ns, 1024 x 1024 3.1 ns).
constexpr double kTransformCost = 40.0;
constexpr double kTransformCostMapped = 250.0;
constexpr int64_t kMappedBytes = int64_t{32} << 20;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A transformed weight of `points` elements, each [C_in x C_out] packed for the GEMM: [points, packed size], zero
// in the padding columns of the last panel (written by no transform).
at::Tensor packed_weight_buffer(int64_t points, int64_t c_in, int64_t c_out, const at::TensorOptions& options) {
  const int64_t size = gemm_packed_size(c_in, c_out);
  return c_out % kGemmPanel == 0 ? at::empty({points, size}, options) : at::zeros({points, size}, options);
}

// M[rows x C_out] (row stride C_out) = V[rows x C_in] (row stride C_in) times transformed element xi of u, for the
// output-channel panels [p0, p1) (all of them by default), on the calling thread.
void point_gemm(const float* v, const at::Tensor& u, int64_t xi, int64_t c_in, int64_t c_out, float* m, int64_t rows,
                int64_t p0 = 0, int64_t p1 = -1) {
  packed_gemm(v, c_in, u.const_data_ptr<float>() + xi * u.size(1), c_in, c_out, m, c_out, rows, p0,
              p1 < 0 ? gemm_panels(c_out) : p1);
}

// A stride-1 3x3 convolution split into the output's polyphase grids (one per dilation phase) and m x m tiles.
// A stride-2 convolution (dilation 1): one grid, its tiles' input patches 2m + 1 pixels across, 2m apart (sh, sw).
struct Geometry {
  int64_t n, c, k, h, w, ho, wo, ph, pw, dh, dw;
  int64_t qh, qw;  // phases per axis (a dilation larger than the output leaves some empty)
  int64_t th, tw;  // tiles per phase per axis
  int64_t sh = 1, sw = 1;  // the stride: output pixel oy reads input rows sh * oy - ph + j
  int64_t eh = 0, ew = 0;  // stride 2: the last output row / column left out of the tiles (strided_edges)
  int64_t tiles() const { return n * qh * qw * th * tw; }
};

Geometry geometry(int64_t n, int64_t c, int64_t h, int64_t w, int64_t k, at::IntArrayRef padding,
                  at::IntArrayRef dilation, int m) {
  Geometry g{};
  g.n = n, g.c = c, g.h = h, g.w = w, g.k = k;
  g.ph = padding[0], g.pw = padding[1], g.dh = dilation[0], g.dw = dilation[1];
  g.ho = h + 2 * g.ph - 2 * g.dh;
  g.wo = w + 2 * g.pw - 2 * g.dw;
  g.qh = std::min(g.dh, g.ho);
  g.qw = std::min(g.dw, g.wo);
  g.th = ceil_div(ceil_div(g.ho, g.dh), m);
  g.tw = ceil_div(ceil_div(g.wo, g.dw), m);
  return g;
}

// A stride-2 3x3 convolution (dilation 1) in m x m output tiles. With `edges`, an output of m * t + 1 rows (or
// columns), t >= 1, leaves its last one out of the tiles: a row of tiles for it would cost 81 products per tile for
// m of its pixels, strided_edges computes it directly at 9 per pixel or fewer (DeepLab's stride-2 maps are all
// such: 129 -> 65, 65 -> 33, 33 -> 17 pixels; at 65 x 65 the products fall by 6.5 %).
Geometry strided_geometry(int64_t n, int64_t c, int64_t h, int64_t w, int64_t k, at::IntArrayRef padding, int m,
                          bool edges = true) {
  Geometry g{};
  g.n = n, g.c = c, g.h = h, g.w = w, g.k = k;
  g.ph = padding[0], g.pw = padding[1], g.dh = 1, g.dw = 1, g.sh = 2, g.sw = 2;
  g.ho = h + 2 * g.ph < 3 ? 0 : (h + 2 * g.ph - 3) / 2 + 1;  // no output where the padded map is under 3 pixels
  g.wo = w + 2 * g.pw < 3 ? 0 : (w + 2 * g.pw - 3) / 2 + 1;
  g.qh = 1, g.qw = 1;
  g.eh = edges && g.ho > m && g.ho % m == 1 ? 1 : 0;
  g.ew = edges && g.wo > m && g.wo % m == 1 ? 1 : 0;
  g.th = ceil_div(g.ho - g.eh, m);
  g.tw = ceil_div(g.wo - g.ew, m);
  return g;
}

// Tile t's image and the output pixel of its corner (its pixels are oy0 + dh * i, ox0 + dw * j, i, j < m).
struct Tile {
  int64_t n, oy0, ox0;
};

DLO_INLINE Tile tile_at(const Geometry& g, int64_t t, int m) {
  const int64_t tx = t % g.tw;
  t /= g.tw;
  const int64_t ty = t % g.th;
  t /= g.th;
  const int64_t px = t % g.qw;
  t /= g.qw;
  const int64_t py = t % g.qh;
  return {t / g.qh, py + g.dh * ty * m, px + g.dw * tx * m};
}

// Lanes of float32 as one GCC/clang vector of the ISA's register width (run_isa passes it), or a plain float.
#if defined(__GNUC__) || defined(__clang__)
template <int kBytes>
struct FloatVec {
  typedef float type __attribute__((vector_size(kBytes)));
};
#else
template <int kBytes>
struct FloatVec {
  typedef float type;
};
#endif

// Loads and stores through references: a vector passed or returned by value would change with the target's ABI.
template <typename T>
DLO_INLINE void load(T& v, const float* p) {
  std::memcpy(&v, p, sizeof(T));
}
template <typename T>
DLO_INLINE void store(float* p, const T& v) {
  std::memcpy(p, &v, sizeof(T));
}
// v[j] = the vector at p + j * stride, j < N: one axis of a tile.
template <typename T, int N>
DLO_INLINE void load_axis(T (&v)[N], const float* p, int64_t stride) {
  for (int j = 0; j < N; ++j) load(v[j], p + j * stride);
}

// The 1-D transforms along one axis of a tile for one vector (or one float) of channels: element j of the input at
// in + j * (its stride), of the output at out + j * (its stride). kTile outputs per axis from A transformed
// elements; the weight's transform has P distinct elements per axis, point(a) the one that element a multiplies by
// (every one its own but in the stride-2 transform).
template <int M>
struct Transform;

template <int kTileSize, int kElements>
struct AxisShape {
  static constexpr int kTile = kTileSize, A = kElements, P = kElements;
  static constexpr int point(int a) { return a; }
};

// The transform id of stride-2 convolutions in 4 x 4 output tiles (winograd_plan's answer for them).
constexpr int kStrided4 = -4;

template <>
struct Transform<4> : AxisShape<4, 6> {
  // G g (3 -> 6), with common terms shared
  template <typename T>
  DLO_INLINE static void kernel(const T* g, T* u) {
    const T s = g[0] + g[2], p = g[0] * (1.f / 24) + g[2] * (1.f / 6), q = g[1] * (1.f / 12);
    u[0] = g[0] * 0.25f;
    u[1] = (s + g[1]) * (-1.f / 6);
    u[2] = (s - g[1]) * (-1.f / 6);
    u[3] = p + q;
    u[4] = p - q;
    u[5] = g[2];
  }
  // B^T d
  template <typename T>
  DLO_INLINE static void input(const float* d, int64_t ds, float* v, int64_t vs) {
    T x[6];
    load_axis(x, d, ds);
    store<T>(v, 4.f * x[0] - 5.f * x[2] + x[4]);
    store<T>(v + vs, (x[3] + x[4]) - 4.f * (x[1] + x[2]));
    store<T>(v + 2 * vs, 4.f * (x[1] - x[2]) + (x[4] - x[3]));
    store<T>(v + 3 * vs, 2.f * (x[3] - x[1]) + (x[4] - x[2]));
    store<T>(v + 4 * vs, 2.f * (x[1] - x[3]) + (x[4] - x[2]));
    store<T>(v + 5 * vs, 4.f * x[1] - 5.f * x[3] + x[5]);
  }
  // A^T m
  template <typename T>
  DLO_INLINE static void output_values(const T (&x)[6], float* y, int64_t ys) {
    const T a = x[1] + x[2], b = x[1] - x[2], p = x[3] + x[4], q = x[3] - x[4];
    store<T>(y, x[0] + a + p);
    store<T>(y + ys, b + 2.f * q);
    store<T>(y + 2 * ys, a + 4.f * p);
    store<T>(y + 3 * ys, b + 8.f * q + x[5]);
  }
};

// F(3, 3) on the points 0, 1, -1, 2 and infinity: 25 products per 3x3 tile, for maps (or dilated phase grids) that
// split into 3-pixel tiles where 4-pixel ones would compute a padded row and column (a 9 x 9 phase grid: 9 F(3x3)
// tiles, 225 products, against 9 F(4x4) tiles, 324).
template <>
struct Transform<3> : AxisShape<3, 5> {
  template <typename T>
  DLO_INLINE static void kernel(const T* g, T* u) {
    const T s = g[0] + g[2];
    u[0] = g[0] * 0.5f;
    u[1] = (s + g[1]) * -0.5f;
    u[2] = (g[1] - s) * (1.f / 6);
    u[3] = (g[0] + 2.f * g[1] + 4.f * g[2]) * (1.f / 6);
    u[4] = g[2];
  }
  template <typename T>
  DLO_INLINE static void input(const float* d, int64_t ds, float* v, int64_t vs) {
    T x[5];
    load_axis(x, d, ds);
    const T e = x[3] - x[1];
    store<T>(v, 2.f * (x[0] - x[2]) + e);
    store<T>(v + vs, (x[3] - x[2]) - 2.f * x[1]);
    store<T>(v + 2 * vs, 2.f * x[1] - 3.f * x[2] + x[3]);
    store<T>(v + 3 * vs, e);
    store<T>(v + 4 * vs, 2.f * (x[1] - x[3]) - x[2] + x[4]);
  }
  template <typename T>
  DLO_INLINE static void output_values(const T (&x)[5], float* y, int64_t ys) {
    const T a = x[1] + x[2];
    store<T>(y, x[0] + a + x[3]);
    store<T>(y + ys, (x[1] - x[2]) + 2.f * x[3]);
    store<T>(y + 2 * ys, a + 4.f * x[3] + x[4]);
  }
};

template <>
struct Transform<2> : AxisShape<2, 4> {
  template <typename T>
  DLO_INLINE static void kernel(const T* g, T* u) {
    const T s = (g[0] + g[2]) * 0.5f, h = g[1] * 0.5f;
    u[0] = g[0];
    u[1] = s + h;
    u[2] = s - h;
    u[3] = g[2];
  }
  template <typename T>
  DLO_INLINE static void input(const float* d, int64_t ds, float* v, int64_t vs) {
    T x[4];
    load_axis(x, d, ds);
    store<T>(v, x[0] - x[2]);
    store<T>(v + vs, x[1] + x[2]);
    store<T>(v + 2 * vs, x[2] - x[1]);
    store<T>(v + 3 * vs, x[1] - x[3]);
  }
  template <typename T>
  DLO_INLINE static void output_values(const T (&x)[4], float* y, int64_t ys) {
    store<T>(y, x[0] + x[1] + x[2]);
    store<T>(y + ys, (x[1] - x[2]) - x[3]);
  }
};

// A stride-2 3x3 convolution along one axis, 4 outputs from the 9 inputs d0..d8 they read: y_r = w0 d_2r + w1 d_2r+1
// + w2 d_2r+2. The even inputs e_r = d_2r (5) with (w0, w2) are F(4, 2) on the points 0, 1, -1, 2 and infinity (5
// products); the odd ones q_r = d_2r+1 (4) multiply w1 directly (4). 9 products per 4 outputs against 12, so in 2-D
// 81 per 4 x 4 tile against 144 (1.78x fewer); elements 5-8 of U are all w1's (P = 6 distinct per axis).
template <>
struct Transform<kStrided4> {
  static constexpr int kTile = 4, A = 9, P = 6;
  static constexpr int point(int a) { return a < 5 ? a : 5; }
  // G g (3 -> the 6 distinct elements)
  template <typename T>
  DLO_INLINE static void kernel(const T* g, T* u) {
    u[0] = g[0] * 0.5f;
    u[1] = (g[0] + g[2]) * 0.5f;
    u[2] = (g[0] - g[2]) * (1.f / 6);
    u[3] = (g[0] + 2.f * g[2]) * (1.f / 6);
    u[4] = g[2];
    u[5] = g[1];
  }
  // B^T d: F(4, 2)'s on the even inputs, the odd ones as they are
  template <typename T>
  DLO_INLINE static void input(const float* d, int64_t ds, float* v, int64_t vs) {
    input_even<T>(d, ds, v, vs);
    for (int r = 0; r < 4; ++r) {
      T x;
      load(x, d + (2 * r + 1) * ds);
      store<T>(v + (5 + r) * vs, x);
    }
  }
  // Elements 0-4 of B^T d (F(4, 2)'s, from the even inputs alone). input_tiles' first pass computes only these
  // along the columns: elements 5-8 of a column are its odd inputs as they are, so the rows of the tile they make
  // are the patch's odd rows, which its second pass transforms straight from the patch (x, or the zero-padded copy
  // of a tile over the border).
  template <typename T>
  DLO_INLINE static void input_even(const float* d, int64_t ds, float* v, int64_t vs) {
    T e0, e1, e2, e3, e4;
    load(e0, d), load(e1, d + 2 * ds), load(e2, d + 4 * ds), load(e3, d + 6 * ds), load(e4, d + 8 * ds);
    store<T>(v, 2.f * (e0 - e2) + (e3 - e1));
    store<T>(v + vs, 2.f * e1 + (e2 - e3));
    store<T>(v + 2 * vs, 3.f * e2 - 2.f * e1 - e3);
    store<T>(v + 3 * vs, e3 - e1);
    store<T>(v + 4 * vs, 2.f * (e1 - e3) - e2 + e4);
  }
  // A^T m
  template <typename T>
  DLO_INLINE static void output_values(const T (&x)[9], float* y, int64_t ys) {
    const T a = x[1] + x[2], b = x[1] - x[2];
    store<T>(y, (x[0] + a + x[3]) + x[5]);
    store<T>(y + ys, (b + 2.f * x[3]) + x[6]);
    store<T>(y + 2 * ys, (a + 4.f * x[3]) + x[7]);
    store<T>(y + 3 * ys, (b + 8.f * x[3] + x[4]) + x[8]);
  }
};

// Transform<M>'s output transform of the A elements at m + j * ms (A^T m along one axis), into y + i * ys.
template <int M, typename T>
DLO_INLINE void output_axis(const float* m, int64_t ms, float* y, int64_t ys) {
  T x[Transform<M>::A];
  load_axis(x, m, ms);
  Transform<M>::template output_values<T>(x, y, ys);
}

template <typename T>
struct Tag {
  using type = T;
};

// f(Tag<T>, offset) over `lanes` consecutive channels: vectors of V, then single floats for the rest.
template <typename V, typename F>
DLO_INLINE void for_lanes(int lanes, const F& f) {
  constexpr int kPer = static_cast<int>(sizeof(V) / sizeof(float));
  int c = 0;
  for (; c + kPer <= lanes; c += kPer) f(Tag<V>{}, c);
  for (; c < lanes; ++c) f(Tag<float>{}, c);
}

struct Strides4 {
  int64_t n, c, h, w;
};

// Where V (or M) keeps a tile's transformed element xi: at xi * element + tile index * tile floats. A chunk's V is
// element-major (element = the chunk's rows x channels, tile = channels); a block's is tile-major (element =
// channels, tile = (m + 2)^2 x channels), so that the (m + 2)^2 vectors a tile's transform writes for a run of
// channels lie together (element-major, they lay a block's rows x channels apart: 16 KB for 32 tiles of 128
// channels, all in one set of L1 and each in its own page).
struct Layout {
  int64_t element, tile;
};
Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// V's elements xi of the block's tiles t0 + t, t < count (t at v + t * vl.tile, as Layout says): the transformed
// input patches, each element's channels contiguous. x channels-last dense (channel stride 1), its
// first element image n0's input row row0 (a band of an NCHW x's rows converted, winograd_blocks). A tile inside the
// image is read in place; one over its border through a zero-padded copy.
template <int M, typename V>
DLO_INLINE void input_tiles(const float* x, Strides4 xs, const Geometry& g, int64_t t0, int64_t count, Layout vl,
                            float* v, int64_t n0 = 0, int64_t row0 = 0) {
  constexpr int A = Transform<M>::A;
  alignas(64) float patch[A][A][kLanes];
  alignas(64) float half[A][A][kLanes];
  const int64_t vs = vl.element;
  for (int64_t t = 0; t < count; ++t) {
    const Tile tile = tile_at(g, t0 + t, Transform<M>::kTile);
    // the patch's input rows iy0 + dh * j
    const int64_t iy0 = g.sh * tile.oy0 - g.ph, ix0 = g.sw * tile.ox0 - g.pw;
    const bool inside = iy0 >= 0 && ix0 >= 0 && iy0 + g.dh * (A - 1) < g.h && ix0 + g.dw * (A - 1) < g.w;
    for (int64_t c0 = 0; c0 < g.c; c0 += kLanes) {
      const int lanes = static_cast<int>(std::min<int64_t>(kLanes, g.c - c0));
      const float* src = patch[0][0];
      int64_t row = A * kLanes, col = kLanes;  // src's strides between patch rows and columns
      if (inside) {
        src = x + (tile.n - n0) * xs.n + (iy0 - row0) * xs.h + ix0 * xs.w + c0;
        row = g.dh * xs.h, col = g.dw * xs.w;
      } else {
        for (int j = 0; j < A; ++j) {
          const int64_t iy = iy0 + g.dh * j;
          for (int l = 0; l < A; ++l) {
            const int64_t ix = ix0 + g.dw * l;
            float* p = patch[j][l];
            if (iy < 0 || iy >= g.h || ix < 0 || ix >= g.w) {
              for_lanes<V>(lanes, [&](auto tag, int c) { store(p + c, typename decltype(tag)::type{}); });
            } else {
              const float* s = x + (tile.n - n0) * xs.n + (iy - row0) * xs.h + ix * xs.w + c0;
              for_lanes<V>(lanes, [&](auto tag, int c) {
                typename decltype(tag)::type v;
                load(v, s + c);
                store(p + c, v);
              });
            }
          }
        }
      }
      float* dst = v + t * vl.tile + c0;
      if constexpr (M == kStrided4) {  // the columns' even elements, then the rows: 0-4 from them, 5-8 from x's
        for (int l = 0; l < A; ++l) {
          for_lanes<V>(lanes, [&](auto tag, int c) {
            Transform<M>::template input_even<typename decltype(tag)::type>(src + l * col + c, row, half[0][l] + c,
                                                                            A * kLanes);
          });
        }
        for (int r = 0; r < A; ++r) {
          const float* in = r < 5 ? half[r][0] : src + (2 * (r - 5) + 1) * row;
          const int64_t step = r < 5 ? kLanes : col;
          for_lanes<V>(lanes, [&](auto tag, int c) {
            Transform<M>::template input<typename decltype(tag)::type>(in + c, step, dst + r * A * vs + c, vs);
          });
        }
      } else {
        for (int l = 0; l < A; ++l) {
          for_lanes<V>(lanes, [&](auto tag, int c) {
            Transform<M>::template input<typename decltype(tag)::type>(src + l * col + c, row, half[0][l] + c,
                                                                       A * kLanes);
          });
        }
        for (int r = 0; r < A; ++r) {
          for_lanes<V>(lanes, [&](auto tag, int c) {
            Transform<M>::template input<typename decltype(tag)::type>(half[r][0] + c, kLanes, dst + r * A * vs + c,
                                                                       vs);
          });
        }
      }
    }
  }
}

struct Epilogue {
  const float* bias;      // [K] or null
  const float* residual;  // the output's shape, channels-last dense (channel stride 1), or null
  Strides4 rs;
  bool relu;
};

template <typename T>
DLO_INLINE void relu_in_place(T& v) {
  if constexpr (std::is_same_v<T, float>) {
    v = v < 0.f ? 0.f : v;  // NaN stays NaN
  } else {
    v = v < 0.f ? T{} : v;
  }
}

// Output pixel (n, oy, ox)'s channels [k0, k0 + lanes) from val, with the epilogue: + bias, + residual, ReLU. out:
// channels-last (channel stride 1), its first element image n0's output row row0 (a band, winograd_blocks).
template <typename V>
DLO_INLINE void store_pixel(const float* val, const Epilogue& e, int64_t n, int64_t oy, int64_t ox, int64_t k0,
                            int lanes, float* out, Strides4 os, int64_t n0 = 0, int64_t row0 = 0) {
  const float* bias = e.bias != nullptr ? e.bias + k0 : nullptr;
  const float* r = e.residual == nullptr ? nullptr : e.residual + n * e.rs.n + oy * e.rs.h + ox * e.rs.w + k0;
  float* dst = out + (n - n0) * os.n + (oy - row0) * os.h + ox * os.w + k0;
  for_lanes<V>(lanes, [&](auto tag, int c) {
    using T = typename decltype(tag)::type;
    T s, a;
    load(s, val + c);
    if (bias != nullptr) load(a, bias + c), s = s + a;
    if (r != nullptr) load(a, r + c), s = s + a;
    if (e.relu) relu_in_place(s);
    store(dst + c, s);
  });
}

// The output pixels of the block's tiles t0 + t, t < count, from the GEMM products in mm (tile t's element xi at
// mm + t * ml.tile + slot[xi] * ml.element, slot[xi] = xi without a slot table: as for input_tiles), into a
// channels-last dense output (or band of it: n0, row0 as for store_pixel).
template <int M, typename V>
DLO_INLINE void output_tiles(const float* mm, const Geometry& g, int64_t t0, int64_t count, Layout ml,
                             const Epilogue& e, float* out, Strides4 os, int64_t n0 = 0, int64_t row0 = 0,
                             const int16_t* slot = nullptr) {
  constexpr int A = Transform<M>::A, T = Transform<M>::kTile;
  alignas(64) float half[T][A][kLanes];
  alignas(64) float y[T][T][kLanes];
  int64_t offset[A * A];  // where element xi lies in a tile's M
  for (int xi = 0; xi < A * A; ++xi) offset[xi] = (slot != nullptr ? slot[xi] : xi) * ml.element;
  for (int64_t t = 0; t < count; ++t) {
    const Tile tile = tile_at(g, t0 + t, T);
    for (int64_t k0 = 0; k0 < g.k; k0 += kLanes) {
      const int lanes = static_cast<int>(std::min<int64_t>(kLanes, g.k - k0));
      const float* src = mm + t * ml.tile + k0;
      for (int l = 0; l < A; ++l) {
        for_lanes<V>(lanes, [&](auto tag, int c) {
          using L = typename decltype(tag)::type;
          L x[A];
          for (int r = 0; r < A; ++r) load(x[r], src + offset[r * A + l] + c);
          Transform<M>::template output_values<L>(x, half[0][l] + c, A * kLanes);
        });
      }
      for (int i = 0; i < T; ++i) {
        for_lanes<V>(lanes, [&](auto tag, int c) {
          output_axis<M, typename decltype(tag)::type>(half[i][0] + c, kLanes, y[i][0] + c, kLanes);
        });
      }
      for (int i = 0; i < T; ++i) {
        const int64_t oy = tile.oy0 + g.dh * i;
        if (oy >= g.ho) break;
        for (int j = 0; j < T; ++j) {
          const int64_t ox = tile.ox0 + g.dw * j;
          if (ox >= g.wo) break;
          store_pixel<V>(y[i][j], e, tile.n, oy, ox, k0, lanes, out, os, n0, row0);
        }
      }
    }
  }
}

// U[xi][c][k] = (G g G^T)[xi] for g = w[k][c], for the input channels [begin, end): w as [C_in][3][3][C_out]
// (wt, C_out contiguous), lane by lane over output channels. Each xi's [C_in x C_out] is packed for the GEMM
// (gemm_packed_index: a vector of lanes stays within one panel, kLanes being a multiple of the panel width's
// divisors the vectors have).
template <int M, typename V>
DLO_INLINE void weight_tiles(const float* wt, int64_t c_in, int64_t k, int64_t begin, int64_t end, float* u) {
  constexpr int P = Transform<M>::P;  // the distinct elements per axis: U holds P x P
  const int64_t us = gemm_packed_size(c_in, k);  // between transformed elements xi
  for (int64_t c = begin; c < end; ++c) {
    const float* g = wt + c * 9 * k;
    for (int64_t k0 = 0; k0 < k; k0 += kLanes) {
      const int lanes = static_cast<int>(std::min<int64_t>(kLanes, k - k0));
      for_lanes<V>(lanes, [&](auto tag, int l) {
        using T = typename decltype(tag)::type;
        T col[3], hc[P], h[P][3], row[P];
        for (int j = 0; j < 3; ++j) {  // h = G w, column by column
          for (int i = 0; i < 3; ++i) load(col[i], g + (i * 3 + j) * k + k0 + l);
          Transform<M>::kernel(col, hc);
          for (int a = 0; a < P; ++a) h[a][j] = hc[a];
        }
        float* dst = u + gemm_packed_index(c_in, c, k0 + l);
        for (int a = 0; a < P; ++a) {  // u = h G^T, row by row
          Transform<M>::kernel(h[a], row);
          for (int b = 0; b < P; ++b) store(dst + (a * P + b) * us, row[b]);
        }
      });
    }
  }
}

template <int M>
at::Tensor weight_transform(const at::Tensor& weight) {
  constexpr int P = Transform<M>::P;
  const int64_t k = weight.size(0), c = weight.size(1);
  const at::Tensor wt = weight.permute({1, 2, 3, 0}).contiguous();  // [C_in, 3, 3, C_out]
  at::Tensor u = packed_weight_buffer(P * P, c, k, weight.options());
  const float* wp = wt.const_data_ptr<float>();
  float* up = u.mutable_data_ptr<float>();
  const auto isa = kernel_isa();
  at::parallel_for(0, c, std::max<int64_t>(1, 1024 / k), [&](int64_t begin, int64_t end) {
    run_isa(
        isa,
        [&](int64_t bb, int64_t ee, auto width) {
          weight_tiles<M, typename FloatVec<decltype(width)::value>::type>(wp, c, k, bb, ee, up);
        },
        begin, end);
  });
  return u;
}

// Transformed weights kept between calls: an eval network's folded weights are the same tensors call after call,
// and for a 256 x 256 layer the transform writes 9.4 MB, a third of a batch-1 33 x 33 call's time. Only weights
// registered with winograd_cache_allow are kept: the eval path registers the folds it stores in
// deeplab_ops.common.derived, which nothing writes in place. Any other tensor may change without its version
// counter saying so (a compiled graph reuses one buffer for the next layer's folded weight; writes through `.data`),
// so its transform is computed per call. An entry belongs to one weight tensor (WeightRef: its TensorImpl's address
// and its storage, held weakly; an entry whose storage was freed is dropped at the next plan of any float32 3x3
// convolution without gradient, or by winograd_cache_release) in one state (storage, sizes, strides, version
// counter, read before the transform) and one tile size.
// Least recently used first out, within kCacheBytes and kCacheEntries. A forward pass uses its layers' transforms in
// turn, so a model whose transforms exceed the cache evicts each before its next use: kCacheBytes holds
// DeepLabV3-ResNet-101's (about 340 MB at output stride 16; ResNet-50's about 180 MB) with room to spare.
constexpr int64_t kCacheBytes = int64_t{1} << 30;
constexpr size_t kCacheEntries = 256;

// A weight as the cache knows it, holding no reference of any kind on the tensor (torch.utils.swap_tensors refuses
// a tensor with a weak reference, and PyTorch's swap-on-conversion mode swaps every parameter a conversion or load
// reaches, a child module's too): its TensorImpl's address, compared and never dereferenced, and its storage, held
// weakly, so that no other storage takes the storage's address while the cache knows it. Gone when the storage is
// freed. A tensor that took a freed weight's TensorImpl address while the storage lives is taken for that weight
// only if it views the same storage, and an entry matches only the same data pointer, sizes, strides and version
// counter too: the same bytes.
struct WeightRef {
  const c10::TensorImpl* impl;
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;

  static WeightRef of(const at::Tensor& t) { return {t.unsafeGetTensorImpl(), t.storage().getWeakStorageImpl()}; }
  bool expired() const { return storage.expired(); }
  bool is(const at::Tensor& t) const {
    return impl == t.unsafeGetTensorImpl() && t.has_storage() &&
           storage._unsafe_get_target() == t.storage().unsafeGetStorageImpl() && !storage.expired();
  }
};

// What identifies a weight tensor's contents while its owner lives. The storage is compared by its StorageImpl,
// which an entry holds weakly: `.data` given a new tensor keeps the version counter, and a data pointer alone is
// reused by the allocator (`w.data = a; w.data = b` put b where the weight's storage had been: a stale hit), and
// `.data` given another view of the same storage (a transpose) keeps all but the strides.
struct WeightState {
  WeightRef ref;  // the weight: its storage's address is not reused while the state is kept
  const void* data;
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;
  uint32_t version;

  static WeightState of(const at::Tensor& t) {
    return {WeightRef::of(t), t.const_data_ptr(), t.sizes().vec(), t.strides().vec(),
            t.unsafeGetTensorImpl()->version_counter().current_version()};
  }
  bool operator==(const WeightState& o) const {
    return ref.impl == o.ref.impl && ref.storage._unsafe_get_target() == o.ref.storage._unsafe_get_target() &&
           data == o.data && version == o.version && sizes == o.sizes && strides == o.strides;
  }
};

struct CachedTransform {
  WeightState state;  // its weight (state.ref) and the state it was in
  int m;
  at::Tensor u;
};

class TransformCache {
 public:
  // Registers `weight` (not an inference tensor: it has no version counter) as one whose transforms may be kept.
  void allow(const at::Tensor& weight) {
    if (weight.is_inference() || !weight.has_storage()) return;
    std::lock_guard<std::mutex> lock(mu_);
    // erase-remove, not std::erase_if: the extension builds as C++17 with torch < 2.13 (torch 2.11 included).
    allowed_.erase(std::remove_if(allowed_.begin(), allowed_.end(), [](const WeightRef& w) { return w.expired(); }),
                   allowed_.end());
    if (std::any_of(allowed_.begin(), allowed_.end(), [&](const WeightRef& w) { return w.is(weight); })) return;
    // one registration per TensorImpl (a `.data` assignment gives the same tensor another storage)
    const auto same_impl = [&](const WeightRef& w) { return w.impl == weight.unsafeGetTensorImpl(); };
    allowed_.erase(std::remove_if(allowed_.begin(), allowed_.end(), same_impl), allowed_.end());
    allowed_.push_back(WeightRef::of(weight));
  }

  // Whether `weight` is registered. The plan of every float32 3x3 convolution without gradient asks, registered
  // weight or not, so the entries of freed weights (a deleted model's, a replaced fold's) are dropped here, not
  // only at the next lookup of a registered weight.
  bool allowed(const at::Tensor& weight) {
    if (weight.is_inference() || !weight.has_storage()) return false;
    std::list<CachedTransform> dropped;  // freed outside the lock
    std::lock_guard<std::mutex> lock(mu_);
    drop_expired(dropped);
    return std::any_of(allowed_.begin(), allowed_.end(), [&](const WeightRef& w) { return w.is(weight); });
  }

  // The cached transform of a weight in `state` for tile size m, or an undefined tensor.
  at::Tensor find(const WeightState& state, int m) {
    std::list<CachedTransform> dropped;  // freed outside the lock
    std::lock_guard<std::mutex> lock(mu_);
    at::Tensor u;
    for (auto it = entries_.begin(); it != entries_.end();) {
      const auto next = std::next(it);
      if (it->state.ref.expired()) {
        drop(it, dropped);
      } else if (!u.defined() && it->m == m && it->state == state) {
        entries_.splice(entries_.begin(), entries_, it);
        u = it->u;
      }
      it = next;
    }
    ++(u.defined() ? hits_ : misses_);
    return u;
  }

  // Keeps u, the transform of the weight as it was in `state` (read before the transform: a write during it leaves
  // an entry the next call does not match).
  void insert(const WeightState& state, int m, const at::Tensor& u) {
    const int64_t nbytes = static_cast<int64_t>(u.nbytes());
    if (nbytes > kCacheBytes) return;
    std::list<CachedTransform> dropped;
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = entries_.begin(); it != entries_.end();) {
      const auto next = std::next(it);
      if (it->state.ref.expired() || (it->state.ref.impl == state.ref.impl && it->m == m)) drop(it, dropped);
      it = next;
    }
    while (!entries_.empty() && (bytes_ + nbytes > kCacheBytes || entries_.size() >= kCacheEntries)) {
      drop(std::prev(entries_.end()), dropped);
    }
    entries_.push_front({state, m, u});
    bytes_ += nbytes;
  }

  void release(at::TensorList weights) {
    std::list<CachedTransform> dropped;
    std::lock_guard<std::mutex> lock(mu_);
    const auto listed = [&](const WeightRef& w) {
      return std::any_of(weights.begin(), weights.end(),
                         [&](const at::Tensor& t) { return w.impl == t.unsafeGetTensorImpl(); });
    };
    allowed_.erase(std::remove_if(allowed_.begin(), allowed_.end(), listed), allowed_.end());
    for (auto it = entries_.begin(); it != entries_.end();) {
      const auto next = std::next(it);
      if (listed(it->state.ref)) drop(it, dropped);
      it = next;
    }
    drop_expired(dropped);
  }

  std::vector<int64_t> info() {
    std::lock_guard<std::mutex> lock(mu_);
    return {static_cast<int64_t>(entries_.size()), bytes_, hits_, misses_};
  }

  void clear() {
    std::list<CachedTransform> dropped;
    std::lock_guard<std::mutex> lock(mu_);
    dropped.splice(dropped.begin(), entries_);
    allowed_.clear();
    bytes_ = 0;
  }

 private:
  void drop(std::list<CachedTransform>::iterator it, std::list<CachedTransform>& dropped) {
    bytes_ -= static_cast<int64_t>(it->u.nbytes());
    dropped.splice(dropped.begin(), entries_, it);
  }

  // The entries and registrations of weights that have been freed (mu_ held).
  void drop_expired(std::list<CachedTransform>& dropped) {
    for (auto it = entries_.begin(); it != entries_.end();) {
      const auto next = std::next(it);
      if (it->state.ref.expired()) drop(it, dropped);
      it = next;
    }
    allowed_.erase(std::remove_if(allowed_.begin(), allowed_.end(), [](const WeightRef& w) { return w.expired(); }),
                   allowed_.end());
  }

  std::mutex mu_;
  std::list<CachedTransform> entries_;  // most recently used first
  std::vector<WeightRef> allowed_;
  int64_t bytes_ = 0, hits_ = 0, misses_ = 0;
};

TransformCache& transform_cache() {
  static auto* cache = new TransformCache();  // never destroyed: no teardown order to get wrong at exit
  return *cache;
}

// build(weight), kept under `key` for a registered weight: found again while the weight is in the same state.
template <typename F>
at::Tensor kept_or_built(const at::Tensor& weight, int key, const F& build) {
  if (!transform_cache().allowed(weight)) return build(weight);
  const WeightState state = WeightState::of(weight);
  at::Tensor u = transform_cache().find(state, key);
  if (!u.defined()) {
    u = build(weight);
    transform_cache().insert(state, key, u);
  }
  return u;
}

template <int M>
at::Tensor cached_weight_transform(const at::Tensor& weight) {
  return kept_or_built(weight, M, [](const at::Tensor& w) { return weight_transform<M>(w); });
}

// f(offset, count, width) over sub-blocks of kMinSplitTiles of a chunk's `tiles` tiles, split over the threads, in
// the ISA's build: the same partition, so the same bits, for any thread count.
template <typename F>
void for_sub_blocks(cpu_isa::Isa isa, int64_t tiles, const F& f) {
  at::parallel_for(0, ceil_div(tiles, kMinSplitTiles), 1, [&](int64_t s0, int64_t s1) {
    run_isa(
        isa,
        [&](int64_t b0, int64_t b1, auto width) {
          for (int64_t sb = b0; sb < b1; ++sb) {
            const int64_t off = sb * kMinSplitTiles;
            f(off, std::min(kMinSplitTiles, tiles - off), width);
          }
        },
        s0, s1);
  });
}

// The element of U that transformed element xi (of A x A) multiplies by.
template <int M>
int64_t u_point(int64_t xi) {
  constexpr int A = Transform<M>::A, P = Transform<M>::P;
  return Transform<M>::point(static_cast<int>(xi / A)) * P + Transform<M>::point(static_cast<int>(xi % A));
}

// Tiles per block of winograd_blocks for `points` transformed elements and C_in + C_out = `channels`: V and M of a
// block within kBlockBytes, and at least kParallelBlocks blocks where the tiles allow; then the blocks evened out
// over `threads` (a multiple of them where the tiles allow: 289 tiles at most 32 a block on 2 threads are 10 blocks
// of 29, not nine of 32 and one of 1). The bits do not depend on the blocks (each tile is transformed alone, each
// GEMM output is one chain over C_in).
int64_t block_tiles(int64_t points, int64_t c, int64_t k, int64_t tiles, int64_t threads) {
  const int64_t most = std::min(std::clamp<int64_t>(kBlockBytes / (points * (c + k) * int64_t{sizeof(float)}),
                                                    kMinBlockTiles, kMaxBlockTiles),
                                std::max(kMinSplitTiles, ceil_div(tiles, kParallelBlocks)));
  int64_t blocks = ceil_div(tiles, most);
  const int64_t even = ceil_div(blocks, threads) * threads;
  if (even * kMinSplitTiles <= tiles) blocks = even;
  return ceil_div(tiles, blocks);
}

// The order in which a block's GEMMs run (and a chunk's, winograd_chunks, by groups over the threads), and where
// winograd_blocks puts their products. The elements that multiply by the same element of U form a group, one
// packed_gemm_shared, in parts of at most kMaxGemmGroup, the largest first. A block's V and M share one buffer of
// `slots` elements per tile, each of max(C_in, C_out) floats: V's element xi in slot xi, M's in slot[xi], one of the
// spare slots past A^2 or the slot of a V element whose group has run (its GEMMs have read it). M takes V's place as
// the GEMMs consume it, so the two take A^2 plus the largest group's slots, not A^2 of each: the stride-2 transform at
// 128 channels each way, 32 tiles, 85 slots (1.4 MB) against 2 x 81 (2.7 MB, over a core's 2 MB L2 on this project's
// Xeon: V and M went out to L3 and came back on every block). Measured there (layer2's stride-2 convolution, channels-
// last, 2 threads, same run): 2.34 ms with V and M apart, 2.26 with groups whole (97 slots), 2.24 in parts of 4 (the
// centre tap's 16 elements read its U element 4 times); parts of 2, 2.24.
constexpr size_t kMaxGemmGroup = 4;

template <int M>
struct GemmPlan {
  static constexpr int kElements = Transform<M>::A * Transform<M>::A;
  std::array<int16_t, kElements> order{};      // the elements, group after group
  std::array<int16_t, kElements> group_end{};  // group i: order[group_end[i - 1] (0 for i = 0), group_end[i])
  int groups = 0;
  std::array<int16_t, kElements> slot{};
  int slots = 0;
};

template <int M>
const GemmPlan<M>& gemm_plan() {
  static const GemmPlan<M> plan = [] {
    constexpr int E = GemmPlan<M>::kElements;
    std::vector<std::vector<int16_t>> groups;
    std::vector<int> group_of_point(E, -1);
    for (int xi = 0; xi < E; ++xi) {
      int& gi = group_of_point[u_point<M>(xi)];
      if (gi < 0) gi = static_cast<int>(groups.size()), groups.emplace_back();
      groups[gi].push_back(static_cast<int16_t>(xi));
    }
    std::vector<std::vector<int16_t>> parts;  // the groups in parts of at most kMaxGemmGroup
    for (const auto& group : groups) {
      for (size_t i = 0; i < group.size(); i += kMaxGemmGroup) {
        parts.emplace_back(group.begin() + i, group.begin() + std::min(group.size(), i + kMaxGemmGroup));
      }
    }
    groups = std::move(parts);
    std::stable_sort(groups.begin(), groups.end(), [](const auto& a, const auto& b) { return a.size() > b.size(); });
    GemmPlan<M> p;
    std::deque<int16_t> free;  // slots that no V element still needs and no M element holds
    for (size_t s = 0; s < groups.front().size(); ++s) free.push_back(static_cast<int16_t>(E + s));
    p.slots = E + static_cast<int>(groups.front().size());
    int n = 0;
    for (const auto& group : groups) {
      for (const int16_t xi : group) {
        p.order[n++] = xi;
        p.slot[xi] = free.front();
        free.pop_front();
      }
      for (const int16_t xi : group) free.push_back(xi);
      p.group_end[p.groups++] = static_cast<int16_t>(n);
    }
    return p;
  }();
  return plan;
}

// The GEMMs of gemm_plan's groups [first, last) (all of them by default), in its order, over `used` tiles (or
// rows): V's element xi at v + xi * vl.element, M's at m + slot[xi] * ml.element (xi without a slot table), tile by
// tile vl.tile and ml.tile apart. A group's elements multiply by the same element of U (the stride-2 transform's:
// 16 of a tile's 81 the centre tap's, 4 each the transform of an outer tap along one axis) in one
// packed_gemm_shared, which reads each block of that element's panels once for all of them. The bits are those of
// a GEMM per element.
template <int M>
void element_gemms(const float* v, Layout vl, const at::Tensor& u, const Geometry& g, float* m, Layout ml,
                   int64_t used, const int16_t* slot, int64_t first = 0, int64_t last = -1) {
  const GemmPlan<M>& plan = gemm_plan<M>();
  std::array<GemmRows, GemmPlan<M>::kElements> parts;
  const float* up = u.const_data_ptr<float>();
  if (last < 0) last = plan.groups;
  for (int64_t i = first; i < last; ++i) {
    const int begin = i == 0 ? 0 : plan.group_end[i - 1];
    const int count = plan.group_end[i] - begin;
    for (int j = 0; j < count; ++j) {
      const int xi = plan.order[begin + j];
      parts[j] = {v + xi * vl.element, m + (slot != nullptr ? slot[xi] : xi) * ml.element, used};
    }
    packed_gemm_shared(parts.data(), count, vl.tile, up + u_point<M>(plan.order[begin]) * u.size(1), g.c, g.k,
                       ml.tile, 0, gemm_panels(g.k));
  }
}

// Rows (tiles or grids) per chunk of `rows` for `points` transformed elements: the fewest chunks of at most the rows
// whose V and M keep within kChunkBytes together and kChunkBufferBytes each (at least kMinBlockTiles rows), each of
// the returned size but the last, which is up to one row short per chunk (3104 tiles, at most 341 a chunk: nine
// chunks of 311, one of 305). Over about 6800 channels on one side (m = 4) the buffers exceed kChunkBufferBytes.
int64_t chunk_rows(int64_t points, int64_t c, int64_t k, int64_t rows) {
  const int64_t most = std::max<int64_t>(
      std::min(kChunkBytes / (points * (c + k)), kChunkBufferBytes / (points * std::max(c, k))) /
          int64_t{sizeof(float)},
      kMinBlockTiles);
  return ceil_div(rows, ceil_div(rows, most));
}

// Scratch memory of the calling thread, kept between calls: a block's V, M and bands, the edges' rows. Allocated per
// call, glibc serves buffers of this size (about 1-5 MB a thread) from pages it faults in afresh on every call
// wherever it trims its heap between calls, which one more or less temporary of the call decides (measured on this
// project's EPYC, one thread: layer2's stride-2 convolution in NCHW, without the whole-map temporaries of converting
// x and the output, faulted in 1,096 pages a call for its per-thread buffers, about 3.4 us each in this VM; with
// them, none). Grows to the most a call of this thread has asked for, up to kMaxScratchBytes; a larger request is
// allocated for the call (`spare` holds it).
constexpr int64_t kMaxScratchBytes = 32 << 20;

float* thread_scratch(int64_t floats, const at::TensorOptions& options, at::Tensor& spare) {
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  thread_local std::unique_ptr<float, Free> kept;
  thread_local int64_t capacity = 0;
  if (floats * int64_t{sizeof(float)} > kMaxScratchBytes) {
    spare = at::empty({floats}, options);
    return spare.mutable_data_ptr<float>();
  }
  if (floats > capacity) {
    const int64_t bytes = ceil_div(floats * int64_t{sizeof(float)}, 64) * 64;
    float* p = static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>(bytes)));
    TORCH_CHECK(p != nullptr, "deeplab_ops: could not allocate ", bytes, " bytes of Winograd scratch memory");
    kept.reset(p);
    capacity = bytes / int64_t{sizeof(float)};
  }
  return kept.get();
}

// Floats of a part of a scratch, rounded up to whole cache lines.
int64_t scratch_part(int64_t floats) { return ceil_div(floats, 16) * 16; }

// ---- NCHW activations in bands: a tile geometry of dilation 1 (stride 1 or 2) ----
// winograd_blocks reads an NCHW x and writes an NCHW output through bands of rows in channels-last, one per thread:
// before a block's input transform, the input rows its tiles read (a block of tiles is a run of them in row-major
// order: one or a few rows of tiles) are transposed into the input band; its output transform writes into the output
// band, which is transposed into the output after it. Each band is written and read while it is in the thread's
// cache, in place of converting the whole map to channels-last before the convolution and its output back after it:
// two tensors of the activations' size less per call, each written and read back through memory, and each a fresh
// allocation whose pages are faulted in on every call where glibc trims the heap between calls (a channels-last
// temporary beside the output makes it do so).

// A tile geometry whose bands winograd_blocks keeps (one phase grid, dilation 1).
bool banded_geometry(const Geometry& g) { return g.dh == 1 && g.dw == 1 && g.qh == 1 && g.qw == 1; }

// The input rows [r0, r1) that tiles [ta, tb] of one image read (indices within the image), clamped to the image.
std::pair<int64_t, int64_t> input_band(const Geometry& g, int64_t ta, int64_t tb, int m, int a) {
  const int64_t ya = g.sh * (ta / g.tw) * m - g.ph, yb = g.sh * (tb / g.tw) * m - g.ph + a;
  return {std::max<int64_t>(0, ya), std::min(g.h, yb)};
}

// The rows of tiles a block of `block` tiles spans, at most.
int64_t band_tile_rows(const Geometry& g, int64_t block) { return std::min(g.th, ceil_div(block, g.tw) + 1); }

// The output pixels of tiles [ta, tb] of image n (indices within it) from the channels-last band (its first row
// row0) into the NCHW out (dense: os.w == 1), a row at a time.
void band_to_nchw(const Geometry& g, int m, int64_t n, int64_t ta, int64_t tb, const float* band, int64_t row0,
                  float* out, Strides4 os) {
  const int64_t tiled_rows = g.ho - g.eh, tiled_cols = g.wo - g.ew;
  for (int64_t ty = ta / g.tw; ty <= tb / g.tw; ++ty) {
    const int64_t x0 = (ty == ta / g.tw ? ta % g.tw : 0) * m;
    const int64_t x1 = std::min(tiled_cols, ((ty == tb / g.tw ? tb % g.tw : g.tw - 1) + 1) * m);
    for (int64_t oy = ty * m; oy < std::min(tiled_rows, (ty + 1) * m); ++oy) {
      transpose_blocked(band + ((oy - row0) * g.wo + x0) * g.k, g.k, out + n * os.n + oy * os.h + x0, os.c, x1 - x0,
                        g.k);
    }
  }
}

// f(t, end, n) over tiles [t0, t0 + count) in runs within one image n each (per_image tiles an image), or in one run
// (n unused) where !by_image.
template <typename F>
void for_image_runs(int64_t t0, int64_t count, int64_t per_image, bool by_image, const F& f) {
  for (int64_t t = t0; t < t0 + count;) {
    const int64_t n = t / per_image, end = by_image ? std::min(t0 + count, (n + 1) * per_image) : t0 + count;
    f(t, end, n);
    t = end;
  }
}

// The stride-2 convolution's edge pixels (Geometry::eh, ew: the last output row and column, where the tiles leave
// them) as a direct convolution, one GEMM per run of up to kEdgeRows of them, with the weight as [(ky, kx, c) x
// C_out] packed for it (kept beside the tile transform) and the epilogue as the tiles'. Along a run whose pixels'
// patches lie inside x across the run (with padding 1: all of the last row's pixels but its first and last, all of
// the last column's above that row but its top one; with padding 0, all), where x's channels are contiguous and the
// build has vector kernels, each 3 x 3 tap is one term of packed_gemm_sum read in place (the run's pixels two apart
// in x), and the taps outside x, the same for all of the run (the padding beyond the last row or column: a third of
// the taps of DeepLab's odd maps), are left out. The other pixels are gathered as rows of [3][3][C_in], zero outside
// the image. Each output is one chain of fused multiply-adds over its taps (ky, kx, c) in order: the same bits for
// any thread count and vector build, as the tiles', and either way (a tap outside the image adds a zero product when
// gathered, for a finite weight).
constexpr int kStridedEdgeKey = -5;  // the packed direct weight's cache key (not a tile transform's)
constexpr int64_t kEdgeRows = 32;    // edge pixels per GEMM

at::Tensor strided_edge_weight(const at::Tensor& weight) {
  const int64_t k = weight.size(0), inner = 9 * weight.size(1);
  const at::Tensor wt = weight.permute({2, 3, 1, 0}).contiguous();  // [3, 3, C_in, C_out]: rows (ky, kx, c)
  const at::Tensor packed = at::empty({gemm_packed_size(inner, k)}, weight.options());
  at::parallel_for(0, gemm_panels(k), 1, [&](int64_t p0, int64_t p1) {
    gemm_pack_panels(wt.const_data_ptr<float>(), k, inner, k, packed.mutable_data_ptr<float>(), p0, p1);
  });
  return packed;
}

// Edge pixels of image n: `count` of them from output pixel (oy, ox) on, one apart along the row (along_row) or the
// column; `direct`: read in place (above), else gathered.
struct EdgeRun {
  int64_t n, oy, ox, count;
  bool along_row, direct;
  Tile pixel(int64_t i) const { return along_row ? Tile{n, oy, ox + i} : Tile{n, oy + i, ox}; }
};

// The edge pixels as runs of at most kEdgeRows, each stretch split evenly: every image's gathered ones (with padding
// 1, a row's and a column's ends), then every image's direct ones.
std::vector<EdgeRun> edge_runs(const Geometry& g, bool channels_contiguous) {
  std::vector<EdgeRun> gathered, direct;
  // Output pixels [a, b) of `count` along an axis whose patches lie inside a map of `size` pixels (padding pad):
  // 2 o - pad >= 0 and 2 o - pad + 2 < size.
  const auto inner = [](int64_t count, int64_t pad, int64_t size) {
    const int64_t a = std::min(count, (pad + 1) / 2), top = size - 3 + pad;
    return std::pair<int64_t, int64_t>{a, top < 0 ? a : std::max(a, std::min(count, top / 2 + 1))};
  };
  const auto add = [&](const EdgeRun& r) {
    const auto [ia, ib] = channels_contiguous ? inner(r.count, r.along_row ? g.pw : g.ph, r.along_row ? g.w : g.h)
                                              : std::pair<int64_t, int64_t>{r.count, r.count};
    const auto piece = [&](int64_t from, int64_t to, bool in_place) {
      const int64_t parts = ceil_div(to - from, kEdgeRows);
      for (int64_t i = 0; i < parts; ++i) {
        const int64_t p0 = from + (to - from) * i / parts, p1 = from + (to - from) * (i + 1) / parts;
        const Tile t = r.pixel(p0);
        (in_place ? direct : gathered).push_back({r.n, t.oy0, t.ox0, p1 - p0, r.along_row, in_place});
      }
    };
    piece(0, ia, false);
    piece(ia, ib, true);
    piece(ib, r.count, false);
  };
  for (int64_t n = 0; n < g.n; ++n) {
    if (g.eh > 0) add({n, g.ho - 1, 0, g.wo, true, false});
    if (g.ew > 0) add({n, 0, g.wo - 1, g.ho - g.eh, false, false});
  }
  gathered.insert(gathered.end(), direct.begin(), direct.end());
  return gathered;
}

// The edge pixels of one call (its x, packed weight wd, epilogue and output), computed in parts: part p of `parts`
// takes runs p, p + parts, ... (dealt out in turn: the direct ones, of even sizes, evenly). winograd_blocks runs
// the parts in its own parallel region, after each thread's blocks (one fork and join per call, not two);
// strided_edges in one of theirs.
struct StridedEdges {
  const Geometry& g;
  const float* xp;
  Strides4 xs;
  const at::Tensor& wd;
  const Epilogue& e;
  float* op;
  Strides4 os;
  const at::TensorOptions& options;
  // (in place only where packed_gemm_sum gives the gathered GEMM's bits: the vector builds)
  std::vector<EdgeRun> runs = edge_runs(g, xs.c == 1 && kernel_isa() != cpu_isa::Isa::kBase);

  void part(int64_t part, int64_t parts) const;
};

void StridedEdges::part(int64_t part, int64_t parts) const {
  const int64_t count = static_cast<int64_t>(runs.size());
  if (part >= count) return;
  const int64_t inner = 9 * g.c;
  const float* wp = wd.const_data_ptr<float>();
  const auto isa = kernel_isa();
  const int64_t a_size = scratch_part(kEdgeRows * inner);
  at::Tensor spare;
  float* ap = thread_scratch(a_size + kEdgeRows * g.k, options, spare);
  float* mp = ap + a_size;
  for (int64_t i = part; i < count; i += parts) {
    const EdgeRun& run = runs[i];
    const int64_t rows = run.count;
    if (run.direct) {  // a term per tap inside x (the run's first pixel's taps: the same for all of it)
      std::array<GemmTerm, 9> terms;
      int64_t taps = 0;
      for (int64_t ky = 0; ky < 3; ++ky) {
        const int64_t iy = g.sh * run.oy - g.ph + ky;
        if (iy < 0 || iy >= g.h) continue;
        for (int64_t kx = 0; kx < 3; ++kx) {
          const int64_t ix = g.sw * run.ox - g.pw + kx;
          if (ix < 0 || ix >= g.w) continue;
          terms[taps++] = {xp + run.n * xs.n + iy * xs.h + ix * xs.w, (ky * 3 + kx) * g.c, g.c};
        }
      }
      const int64_t lda = run.along_row ? g.sw * xs.w : g.sh * xs.h;
      packed_gemm_sum(terms.data(), taps, lda, wp, inner, g.k, mp, g.k, rows, 0, gemm_panels(g.k));
    } else {
      for (int64_t r = 0; r < rows; ++r) {
        const Tile px = run.pixel(r);
        for (int64_t ky = 0; ky < 3; ++ky) {
          const int64_t iy = g.sh * px.oy0 - g.ph + ky;
          for (int64_t kx = 0; kx < 3; ++kx) {
            const int64_t ix = g.sw * px.ox0 - g.pw + kx;
            float* dst = ap + r * inner + (ky * 3 + kx) * g.c;
            if (iy < 0 || iy >= g.h || ix < 0 || ix >= g.w) {
              std::fill(dst, dst + g.c, 0.f);
            } else if (xs.c == 1) {
              std::memcpy(dst, xp + px.n * xs.n + iy * xs.h + ix * xs.w, sizeof(float) * g.c);
            } else {  // an NCHW x
              const float* src = xp + px.n * xs.n + iy * xs.h + ix * xs.w;
              for (int64_t c = 0; c < g.c; ++c) dst[c] = src[c * xs.c];
            }
          }
        }
      }
      packed_gemm(ap, inner, wp, inner, g.k, mp, g.k, rows, 0, gemm_panels(g.k));
    }
    run_isa(
        isa,
        [&](int64_t, int64_t, auto width) {
          using V = typename FloatVec<decltype(width)::value>::type;
          for (int64_t r = 0; r < rows; ++r) {
            const Tile px = run.pixel(r);
            for (int64_t k0 = 0; k0 < g.k; k0 += kLanes) {
              const int lanes = static_cast<int>(std::min<int64_t>(kLanes, g.k - k0));
              if (os.c == 1) {
                store_pixel<V>(mp + r * g.k + k0, e, px.n, px.oy0, px.ox0, k0, lanes, op, os);
              } else {  // an NCHW output: the pixel's channels in place in M, then each to its plane
                store_pixel<V>(mp + r * g.k + k0, e, px.n, px.oy0, px.ox0, k0, lanes, mp + r * g.k, Strides4{},
                               px.n, px.oy0);
              }
            }
            if (os.c != 1) {
              float* dst = op + px.n * os.n + px.oy0 * os.h + px.ox0 * os.w;
              for (int64_t k = 0; k < g.k; ++k) dst[k * os.c] = mp[r * g.k + k];
            }
          }
        },
        0, 1);
  }
}

// The edge pixels in a parallel region of their own.
void strided_edges(const StridedEdges& edges) {
  const int64_t parts = std::clamp<int64_t>(at::get_num_threads(), 1, static_cast<int64_t>(edges.runs.size()));
  at::parallel_for(0, parts, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t part = b0; part < b1; ++part) edges.part(part, parts);
  });
}

// The transformed weight u fits beside every thread's blocks in cache: blocks of tiles, each transformed,
// multiplied and transformed back by one thread while its V and M stay in that core's cache. The blocks in one part
// per thread, each part a run of them (evened out: 10 blocks on 4 threads are parts of 2, 3, 2 and 3), then the
// part's share of the edge pixels where there are any (`edges`); fewer blocks than threads leave some parts with
// edges only.
template <int M>
void winograd_blocks(const Geometry& g, const float* xp, Strides4 xs, const at::Tensor& u, const Epilogue& e,
                     float* op, Strides4 os, const at::TensorOptions& options, const StridedEdges* edges = nullptr) {
  constexpr int A = Transform<M>::A;
  const int64_t tiles = g.tiles();
  const auto isa = kernel_isa();
  const int64_t block = block_tiles(A * A, g.c, g.k, tiles, at::get_num_threads());
  // tile-major; V and M in one buffer (gemm_plan) where that takes less memory
  const GemmPlan<M>& plan = gemm_plan<M>();
  const int64_t lane = std::max(g.c, g.k);
  const bool shared = plan.slots * lane < A * A * (g.c + g.k);
  const Layout vl = shared ? Layout{lane, plan.slots * lane} : Layout{g.c, A * A * g.c};
  const Layout ml = shared ? vl : Layout{g.k, A * A * g.k};
  const int16_t* slot = shared ? plan.slot.data() : nullptr;
  const int64_t blocks = ceil_div(tiles, block);
  // An NCHW x or output (channel stride not 1, winograd<M> passes them for banded geometries): through bands
  constexpr int T = Transform<M>::kTile;
  const bool nchw_in = xs.c != 1, nchw_out = os.c != 1;
  const int64_t per_image = g.th * g.tw, band_rows = band_tile_rows(g, block);
  const auto blocks_of_part = [&](int64_t b0, int64_t b1) {
    const int64_t v_size = scratch_part(block * vl.tile), m_size = shared ? 0 : scratch_part(block * ml.tile);
    const int64_t i_size = nchw_in ? scratch_part(std::min(g.h, (band_rows - 1) * g.sh * T + A) * g.w * g.c) : 0;
    const int64_t o_size = nchw_out ? band_rows * T * g.wo * g.k : 0;
    at::Tensor spare;
    float* vp = thread_scratch(v_size + m_size + i_size + o_size, options, spare);
    float* mp = shared ? vp : vp + v_size;
    float* ip = vp + v_size + m_size;  // the input band
    float* obp = ip + i_size;  // the output band
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t t0 = blk * block, tc = std::min(block, tiles - t0);
      // The block's tiles of one image at a time through bands (all of them at once from a channels-last x)
      for_image_runs(t0, tc, per_image, nchw_in, [&](int64_t t, int64_t end, int64_t n) {
        const float* x = xp;
        Strides4 s = xs;
        int64_t n0 = 0, row0 = 0;
        if (nchw_in) {
          const auto [r0, r1] = input_band(g, t - n * per_image, end - 1 - n * per_image, T, A);
          transpose_blocked(xp + n * xs.n + r0 * xs.h, xs.c, ip, g.c, g.c, (r1 - r0) * g.w);
          x = ip, s = {0, 1, g.w * g.c, g.c}, n0 = n, row0 = r0;
        }
        run_isa(
            isa,
            [&](int64_t, int64_t, auto width) {
              input_tiles<M, typename FloatVec<decltype(width)::value>::type>(x, s, g, t, end - t, vl,
                                                                              vp + (t - t0) * vl.tile, n0, row0);
            },
            0, 1);
      });
      element_gemms<M>(vp, vl, u, g, mp, ml, tc, slot);
      for_image_runs(t0, tc, per_image, nchw_out, [&](int64_t t, int64_t end, int64_t n) {
        float* out = nchw_out ? obp : op;
        const Strides4 s = nchw_out ? Strides4{0, 1, g.wo * g.k, g.k} : os;
        const int64_t n0 = nchw_out ? n : 0, row0 = nchw_out ? (t - n * per_image) / g.tw * T : 0;
        run_isa(
            isa,
            [&](int64_t, int64_t, auto width) {
              using V = typename FloatVec<decltype(width)::value>::type;
              output_tiles<M, V>(mp + (t - t0) * ml.tile, g, t, end - t, ml, e, out, s, n0, row0, slot);
            },
            0, 1);
        if (nchw_out) band_to_nchw(g, T, n, t - n * per_image, end - 1 - n * per_image, out, row0, op, os);
      });
    }
  };
  // (as many parts as threads where the blocks or the edge runs give each work: a part may have edges only)
  const int64_t work = std::max<int64_t>(blocks, edges != nullptr ? static_cast<int64_t>(edges->runs.size()) : 0);
  const int64_t parts = std::clamp<int64_t>(at::get_num_threads(), 1, std::max<int64_t>(work, 1));
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    const int64_t b0 = blocks * p0 / parts, b1 = blocks * p1 / parts;
    if (b0 < b1) blocks_of_part(b0, b1);
    if (edges != nullptr) {
      for (int64_t p = p0; p < p1; ++p) edges->part(p, parts);
    }
  });
}

// A transformed weight too large for every thread's block to read it from cache: chunks of tiles, each transformed
// by all threads, multiplied with u read once per chunk, and transformed back by all.
template <int M>
void winograd_chunks(const Geometry& g, const float* xp, Strides4 xs, const at::Tensor& u, const Epilogue& e,
                     float* op, Strides4 os, const at::TensorOptions& options) {
  constexpr int A = Transform<M>::A;
  const int64_t tiles = g.tiles();
  const auto isa = kernel_isa();
  const int64_t chunk = chunk_rows(A * A, g.c, g.k, tiles);
  const Layout vl{chunk * g.c, g.c}, ml{chunk * g.k, g.k};  // element-major
  const at::Tensor vbuf = at::empty({A * A, chunk, g.c}, options);
  const at::Tensor mbuf = at::empty({A * A, chunk, g.k}, options);
  float* vp = vbuf.mutable_data_ptr<float>();
  float* mp = mbuf.mutable_data_ptr<float>();  // [A * A, chunk, K]: `chunk` rows between xi
  for (int64_t t0 = 0; t0 < tiles; t0 += chunk) {
    const int64_t tc = std::min(chunk, tiles - t0);
    for_sub_blocks(isa, tc, [&](int64_t off, int64_t n, auto width) {
      input_tiles<M, typename FloatVec<decltype(width)::value>::type>(xp, xs, g, t0 + off, n, vl, vp + off * g.c);
    });
    // The GEMMs' groups (gemm_plan) split over the threads, each on one (as in the blocks).
    at::parallel_for(0, gemm_plan<M>().groups, 1, [&](int64_t g0, int64_t g1) {
      element_gemms<M>(vp, vl, u, g, mp, ml, tc, nullptr, g0, g1);
    });
    for_sub_blocks(isa, tc, [&](int64_t off, int64_t n, auto width) {
      output_tiles<M, typename FloatVec<decltype(width)::value>::type>(mp + off * g.k, g, t0 + off, n, ml, e, op,
                                                                       os);
    });
  }
}

// ---- Short grids: a dilated 3x3 convolution whose dilation phase grids are at most 3 pixels along each axis ----
//
// With padding == dilation, output pixel i of a phase grid reads grid pixels i - 1, i, i + 1 (zero outside the
// grid): each grid is an undilated 3x3 convolution with padding 1 over a map of L_h x L_w pixels, L <= 3 where the
// map is at most three dilations across (the ASPP's rate 18 on a 33 x 33 map: grids of 2 and 1 pixels). Most of
// F(m)'s tile there is padding; instead each grid is computed whole, with the minimal algorithm for its length
// along each axis (GridAxis<L>): L = 2, y0 = g1 x0 + g2 x1, y1 = g0 x0 + g1 x1, is a 2 x 2 Toeplitz product in 3
// multiplies (g1 (x0 + x1), (g2 - g1) x1, (g0 - g1) x0) where direct convolution does 4; L = 3 is F(3, 3) with its
// two outer inputs zero (5 against 7); L = 1 the centre tap. A 2 x 2 grid: 9 products against 16, a 3 x 3 one 25
// against 49. Grids of one type (L_h, L_w) share their GEMMs: one per point pair, [grids x C_in] by [C_in x C_out].
template <int L>
struct GridAxis;

template <>
struct GridAxis<1> {
  static constexpr int P = 1;
  template <typename T>
  DLO_INLINE static void kernel(const T* g, T* u) {
    u[0] = g[1];
  }
  template <typename T>
  DLO_INLINE static void input(const float* d, int64_t, float* v, int64_t) {
    T x;
    load(x, d);
    store(v, x);
  }
  template <typename T>
  DLO_INLINE static void output(const float* m, int64_t, float* y, int64_t) {
    T x;
    load(x, m);
    store(y, x);
  }
};

template <>
struct GridAxis<2> {
  static constexpr int P = 3;
  template <typename T>
  DLO_INLINE static void kernel(const T* g, T* u) {
    u[0] = g[1];
    u[1] = g[2] - g[1];
    u[2] = g[0] - g[1];
  }
  template <typename T>
  DLO_INLINE static void input(const float* d, int64_t ds, float* v, int64_t vs) {
    T x[2];
    load_axis(x, d, ds);
    store<T>(v, x[0] + x[1]);
    store<T>(v + vs, x[1]);
    store<T>(v + 2 * vs, x[0]);
  }
  template <typename T>
  DLO_INLINE static void output(const float* m, int64_t ms, float* y, int64_t ys) {
    T x[3];
    load_axis(x, m, ms);
    store<T>(y, x[0] + x[1]);
    store<T>(y + ys, x[0] + x[2]);
  }
};

template <>
struct GridAxis<3> {
  static constexpr int P = 5;
  template <typename T>
  DLO_INLINE static void kernel(const T* g, T* u) {
    Transform<3>::kernel(g, u);
  }
  // Transform<3>::input of (0, x0, x1, x2, 0)
  template <typename T>
  DLO_INLINE static void input(const float* d, int64_t ds, float* v, int64_t vs) {
    T x[3];
    load_axis(x, d, ds);
    const T e = x[2] - x[0];
    store<T>(v, e - 2.f * x[1]);
    store<T>(v + vs, (x[2] - x[1]) - 2.f * x[0]);
    store<T>(v + 2 * vs, 2.f * x[0] - 3.f * x[1] + x[2]);
    store<T>(v + 3 * vs, e);
    store<T>(v + 4 * vs, -2.f * e - x[1]);
  }
  template <typename T>
  DLO_INLINE static void output(const float* m, int64_t ms, float* y, int64_t ys) {
    output_axis<3, T>(m, ms, y, ys);
  }
};

constexpr int grid_points(int l) { return l == 1 ? 1 : l == 2 ? 3 : 5; }

// The phase grids of one axis (padding == dilation, stride 1, so the output has the input's size): phase p's grid
// has ceil((size - p) / dil) pixels, which falls with p: the phases whose grids have L pixels are [begin[L], end[L]).
struct GridAxisPhases {
  int64_t begin[4] = {0, 0, 0, 0}, end[4] = {0, 0, 0, 0};
  int64_t count(int l) const { return end[l] - begin[l]; }
};

GridAxisPhases grid_axis_phases(int64_t size, int64_t dil) {
  GridAxisPhases a;
  for (int64_t p = 0; p < std::min(size, dil); ++p) {
    const int64_t l = ceil_div(size - p, dil);  // 1..3 where short_grids_apply
    if (a.end[l] == 0) a.begin[l] = p;
    a.end[l] = p + 1;
  }
  return a;
}

// One type of grid (L_h x L_w pixels): n * (phases of length L_h) * (of length L_w) grids, whose transformed weight
// starts at point `first` of the whole transform [points, packed C_in x C_out].
struct GridType {
  int lh, lw;
  int64_t grids, first;
  int points() const { return grid_points(lh) * grid_points(lw); }
};

struct ShortGrids {
  int64_t n, c, k, h, w, dh, dw;
  GridAxisPhases ay, ax;
  std::vector<GridType> types;  // the lengths present, longest first
  int64_t points = 0;           // all types' together
};

ShortGrids short_grids(int64_t n, int64_t c, int64_t h, int64_t w, int64_t k, at::IntArrayRef dilation) {
  ShortGrids s{n, c, k, h, w, dilation[0], dilation[1], grid_axis_phases(h, dilation[0]),
               grid_axis_phases(w, dilation[1]), {}, 0};
  for (int lh = 3; lh >= 1; --lh) {
    for (int lw = 3; lw >= 1; --lw) {
      const int64_t grids = n * s.ay.count(lh) * s.ax.count(lw);
      if (grids == 0) continue;
      s.types.push_back({lh, lw, grids, s.points});
      s.points += grid_points(lh) * grid_points(lw);
    }
  }
  return s;
}

// Whether the short-grid algorithm computes this convolution: every phase grid at most 3 pixels along each axis,
// padding equal to the dilation (stride 1, 3 x 3: checked by the caller).
bool short_grids_apply(int64_t h, int64_t w, at::IntArrayRef padding, at::IntArrayRef dilation) {
  return padding[0] == dilation[0] && padding[1] == dilation[1] && h <= 3 * dilation[0] && w <= 3 * dilation[1];
}

// Grid g of a type: its image and the output pixel of its first pixel (its pixels are y0 + dh * i, x0 + dw * j).
DLO_INLINE Tile grid_at(const ShortGrids& s, const GridType& type, int64_t g) {
  const int64_t nx = s.ax.count(type.lw), ny = s.ay.count(type.lh);
  const int64_t ix = g % nx;
  g /= nx;
  const int64_t iy = g % ny;
  return {g / ny, s.ay.begin[type.lh] + iy, s.ax.begin[type.lw] + ix};
}

// V[p][g][c] for grids g0 + g, g < count, of one type (`rows` grids between points p): the transformed grids, read
// in place (a grid's pixels all lie in the image).
template <int LH, int LW, typename V>
DLO_INLINE void input_grids(const float* x, Strides4 xs, const ShortGrids& s, const GridType& type, int64_t g0,
                            int64_t count, int64_t rows, float* v) {
  constexpr int PW = GridAxis<LW>::P;
  alignas(64) float half[LH][PW][kLanes];
  const int64_t vs = rows * s.c;
  for (int64_t g = 0; g < count; ++g) {
    const Tile grid = grid_at(s, type, g0 + g);
    const float* base = x + grid.n * xs.n + grid.oy0 * xs.h + grid.ox0 * xs.w;
    for (int64_t c0 = 0; c0 < s.c; c0 += kLanes) {
      const int lanes = static_cast<int>(std::min<int64_t>(kLanes, s.c - c0));
      for (int i = 0; i < LH; ++i) {
        for_lanes<V>(lanes, [&](auto tag, int c) {
          GridAxis<LW>::template input<typename decltype(tag)::type>(base + i * s.dh * xs.h + c0 + c, s.dw * xs.w,
                                                                     half[i][0] + c, kLanes);
        });
      }
      float* dst = v + g * s.c + c0;
      for (int b = 0; b < PW; ++b) {
        for_lanes<V>(lanes, [&](auto tag, int c) {
          GridAxis<LH>::template input<typename decltype(tag)::type>(half[0][b] + c, PW * kLanes, dst + b * vs + c,
                                                                     PW * vs);
        });
      }
    }
  }
}

// The output pixels of grids g0 + g, g < count, of one type from the GEMM products mm[p][g][k] (`rows` grids
// between points), with the epilogue, into a channels-last dense output.
template <int LH, int LW, typename V>
DLO_INLINE void output_grids(const float* mm, const ShortGrids& s, const GridType& type, int64_t g0, int64_t count,
                             int64_t rows, const Epilogue& e, float* out, Strides4 os) {
  constexpr int PW = GridAxis<LW>::P;
  alignas(64) float half[LH][PW][kLanes];
  alignas(64) float y[LH][LW][kLanes];
  const int64_t ms = rows * s.k;
  for (int64_t g = 0; g < count; ++g) {
    const Tile grid = grid_at(s, type, g0 + g);
    for (int64_t k0 = 0; k0 < s.k; k0 += kLanes) {
      const int lanes = static_cast<int>(std::min<int64_t>(kLanes, s.k - k0));
      const float* src = mm + g * s.k + k0;
      for (int b = 0; b < PW; ++b) {
        for_lanes<V>(lanes, [&](auto tag, int c) {
          GridAxis<LH>::template output<typename decltype(tag)::type>(src + b * ms + c, PW * ms, half[0][b] + c,
                                                                      PW * kLanes);
        });
      }
      for (int i = 0; i < LH; ++i) {
        for_lanes<V>(lanes, [&](auto tag, int c) {
          GridAxis<LW>::template output<typename decltype(tag)::type>(half[i][0] + c, kLanes, y[i][0] + c, kLanes);
        });
      }
      for (int i = 0; i < LH; ++i) {
        const int64_t oy = grid.oy0 + s.dh * i;
        for (int j = 0; j < LW; ++j) {
          const int64_t ox = grid.ox0 + s.dw * j;
          store_pixel<V>(y[i][j], e, grid.n, oy, ox, k0, lanes, out, os);
        }
      }
    }
  }
}

// U[first + a * P_w + b][c][k] = (G_h g G_w^T)[a][b] for g = w[k][c], one grid type, input channels [begin, end)
// (wt as [C_in][3][3][C_out]).
template <int LH, int LW, typename V>
DLO_INLINE void weight_grids(const float* wt, int64_t c_in, int64_t k, int64_t first, int64_t begin, int64_t end,
                             float* u) {
  constexpr int PH = GridAxis<LH>::P, PW = GridAxis<LW>::P;
  const int64_t us = gemm_packed_size(c_in, k);
  for (int64_t c = begin; c < end; ++c) {
    const float* g = wt + c * 9 * k;
    for (int64_t k0 = 0; k0 < k; k0 += kLanes) {
      const int lanes = static_cast<int>(std::min<int64_t>(kLanes, k - k0));
      for_lanes<V>(lanes, [&](auto tag, int l) {
        using T = typename decltype(tag)::type;
        T col[3], hc[PH], h[PH][3], row[PW];
        for (int j = 0; j < 3; ++j) {
          for (int i = 0; i < 3; ++i) load(col[i], g + (i * 3 + j) * k + k0 + l);
          GridAxis<LH>::kernel(col, hc);
          for (int a = 0; a < PH; ++a) h[a][j] = hc[a];
        }
        float* dst = u + first * us + gemm_packed_index(c_in, c, k0 + l);
        for (int a = 0; a < PH; ++a) {
          GridAxis<LW>::kernel(h[a], row);
          for (int b = 0; b < PW; ++b) store(dst + (a * PW + b) * us, row[b]);
        }
      });
    }
  }
}

// f(Tag<L_h>, Tag<L_w>) for a type's lengths as template arguments.
template <typename F>
DLO_INLINE void with_lengths(const GridType& type, const F& f) {
  const auto w = [&](auto lh) {
    switch (type.lw) {
      case 1:
        return f(lh, std::integral_constant<int, 1>{});
      case 2:
        return f(lh, std::integral_constant<int, 2>{});
      default:
        return f(lh, std::integral_constant<int, 3>{});
    }
  };
  switch (type.lh) {
    case 1:
      return w(std::integral_constant<int, 1>{});
    case 2:
      return w(std::integral_constant<int, 2>{});
    default:
      return w(std::integral_constant<int, 3>{});
  }
}

// Every type's transformed weight in one tensor [points, packed C_in x C_out], in the order of s.types.
at::Tensor short_grid_weight_transform(const at::Tensor& weight, const ShortGrids& s) {
  const int64_t k = weight.size(0), c = weight.size(1);
  const at::Tensor wt = weight.permute({1, 2, 3, 0}).contiguous();  // [C_in, 3, 3, C_out]
  at::Tensor u = packed_weight_buffer(s.points, c, k, weight.options());
  const float* wp = wt.const_data_ptr<float>();
  float* up = u.mutable_data_ptr<float>();
  const auto isa = kernel_isa();
  at::parallel_for(0, c, std::max<int64_t>(1, 1024 / k), [&](int64_t begin, int64_t end) {
    for (const GridType& type : s.types) {
      with_lengths(type, [&](auto lh, auto lw) {
        run_isa(
            isa,
            [&](int64_t bb, int64_t ee, auto width) {
              weight_grids<decltype(lh)::value, decltype(lw)::value, typename FloatVec<decltype(width)::value>::type>(
                  wp, c, k, type.first, bb, ee, up);
            },
            begin, end);
      });
    }
  });
  return u;
}

// The cache key of a short-grid transform: which types it holds (a bit per (L_h, L_w)), beside the tile sizes.
int short_grid_key(const ShortGrids& s) {
  int mask = 0;
  for (const GridType& type : s.types) mask |= 1 << ((type.lh - 1) * 3 + (type.lw - 1));
  return 1000 + mask;
}

// The grids of one type per chunk (chunk_rows, as F(m)'s tiles).
int64_t short_grid_chunk(const ShortGrids& s, const GridType& type) {
  return chunk_rows(type.points(), s.c, s.k, type.grids);
}

// The GEMMs of one point over a chunk of `rows` grids. Each reads the point's weight (C_in x C_out floats): where
// that exceeds a core's L2 (1 MB here), one GEMM per point (2048 -> 256 at rate 36 on a 65 x 65 map, 2 threads: 77
// ms, against 89 ms with each point's rows in two GEMMs and 142 ms on oneDNN); below, at least 16 GEMMs over all
// points where the rows allow (parts of at least kMinBlockTiles rows), so that the threads share them evenly
// whatever the point count.
constexpr int64_t kL2Bytes = 1 << 20;
// Never a single GEMM where there are two rows, so that two threads share the work (a one-point type, a 1 x 1 grid
// type of 2048 -> 256 channels at rate 18); one row, its column panels in two GEMMs (short_grid_conv).
int64_t short_grid_parts(int64_t points, int64_t rows, int64_t point_bytes) {
  const int64_t parts = point_bytes > kL2Bytes
                            ? 1
                            : std::clamp<int64_t>(ceil_div(16, points), 1, std::max<int64_t>(1, rows / kMinBlockTiles));
  return points * parts < 2 && rows >= 2 ? 2 : parts;
}

// The short-grid convolution: per type, chunks of grids (each chunk's V and M within the chunk limits), each
// transformed by all threads, multiplied point by point (the GEMMs split over the threads, each on one thread; the
// vector builds' bits do not depend on the split, cpu/gemm_cpu.h) and transformed back by all.
void short_grid_conv(const ShortGrids& s, const float* xp, Strides4 xs, const at::Tensor& u, const Epilogue& e,
                     float* op, Strides4 os, const at::TensorOptions& options) {
  const auto isa = kernel_isa();
  int64_t v_size = 0, m_size = 0;
  for (const GridType& type : s.types) {
    v_size = std::max(v_size, type.points() * short_grid_chunk(s, type) * s.c);
    m_size = std::max(m_size, type.points() * short_grid_chunk(s, type) * s.k);
  }
  const at::Tensor vbuf = at::empty({v_size}, options);
  const at::Tensor mbuf = at::empty({m_size}, options);
  float* vp = vbuf.mutable_data_ptr<float>();
  float* mp = mbuf.mutable_data_ptr<float>();
  const int64_t panels = gemm_panels(s.k);
  for (const GridType& type : s.types) {
    const int64_t chunk = short_grid_chunk(s, type), points = type.points();
    for (int64_t g0 = 0; g0 < type.grids; g0 += chunk) {
      const int64_t gc = std::min(chunk, type.grids - g0);
      with_lengths(type, [&](auto lh, auto lw) {
        for_sub_blocks(isa, gc, [&](int64_t off, int64_t n, auto width) {
          input_grids<decltype(lh)::value, decltype(lw)::value, typename FloatVec<decltype(width)::value>::type>(
              xp, xs, s, type, g0 + off, n, gc, vp + off * s.c);
        });
      });
      const int64_t parts = short_grid_parts(points, gc, s.c * s.k * int64_t{sizeof(float)});
      const int64_t part_rows = ceil_div(gc, parts);
      // ... nor where there is one row (one grid of a one-point type): its column panels in two GEMMs then
      const int64_t col_parts = points * parts < 2 ? std::min<int64_t>(2, panels) : 1;
      const int64_t part_panels = ceil_div(panels, col_parts);
      at::parallel_for(0, points * parts * col_parts, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t p = t / (parts * col_parts), r0 = (t / col_parts % parts) * part_rows;
          const int64_t q0 = t % col_parts * part_panels;
          if (r0 >= gc || q0 >= panels) continue;
          point_gemm(vp + (p * gc + r0) * s.c, u, type.first + p, s.c, s.k, mp + (p * gc + r0) * s.k,
                     std::min(part_rows, gc - r0), q0, std::min(panels, q0 + part_panels));
        }
      });
      with_lengths(type, [&](auto lh, auto lw) {
        for_sub_blocks(isa, gc, [&](int64_t off, int64_t n, auto width) {
          output_grids<decltype(lh)::value, decltype(lw)::value, typename FloatVec<decltype(width)::value>::type>(
              mp + off * s.k, s, type, g0 + off, n, gc, e, op, os);
        });
      });
    }
  }
}

// The entries' frame: x and the residual channels-last dense (NCHW ones converted in: one conversion in and one out
// cost less than the transforms save over oneDNN's NCHW convolution, docs/kernels.md), a channels-last output of
// [N, C_out, ho, wo], body(x, its strides, the epilogue, out, its strides), the output returned in out_format. With
// `nchw` (a body that takes NCHW through bands: winograd_blocks), an NCHW-contiguous x is passed as it is, and an
// NCHW output is written by the body itself.
template <typename F>
at::Tensor channels_last_call(const at::Tensor& x_, int64_t k, int64_t ho, int64_t wo,
                              const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                              bool relu, at::MemoryFormat out_format, const F& body, bool nchw = false) {
  constexpr auto kCL = at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_.is_contiguous(kCL) || (nchw && x_.is_contiguous()) ? x_ : change_layout(x_, kCL);
  const bool nchw_out = nchw && out_format == at::MemoryFormat::Contiguous;
  at::Tensor out = at::empty({x.size(0), k, ho, wo}, x.options().memory_format(nchw_out ? out_format : kCL));
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const at::Tensor r = !residual.has_value() || !residual->defined() ? at::Tensor()
                       : residual->is_contiguous(kCL)                  ? *residual
                                                                        : change_layout(*residual, kCL);
  const Epilogue e{b.defined() ? b.const_data_ptr<float>() : nullptr, r.defined() ? r.const_data_ptr<float>() : nullptr,
                   r.defined() ? strides_of(r) : Strides4{}, relu};
  body(x.const_data_ptr<float>(), strides_of(x), e, out.mutable_data_ptr<float>(), strides_of(out), x.options());
  return nchw_out || out_format == kCL ? out : change_layout(out, out_format);
}

template <int M>
at::Tensor winograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& residual, at::IntArrayRef padding, at::IntArrayRef dilation,
                    bool relu, at::MemoryFormat out_format) {
  const Geometry g =
      M == kStrided4
          ? strided_geometry(x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0), padding, Transform<M>::kTile)
          : geometry(x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0), padding, dilation, M);
  const at::Tensor u = cached_weight_transform<M>(weight);
  const at::Tensor wd = g.eh + g.ew > 0 ? kept_or_built(weight, kStridedEdgeKey, strided_edge_weight) : at::Tensor();
  return channels_last_call(x, g.k, g.ho, g.wo, bias, residual, relu, out_format,
                            [&](const float* xp, Strides4 xs, const Epilogue& e, float* op, Strides4 os,
                                const at::TensorOptions& options) {
                              std::optional<StridedEdges> edges;
                              if (wd.defined()) edges.emplace(StridedEdges{g, xp, xs, wd, e, op, os, options});
                              if (static_cast<int64_t>(u.nbytes()) <= kBlockWeightBytes) {
                                winograd_blocks<M>(g, xp, xs, u, e, op, os, options, edges ? &*edges : nullptr);
                              } else {
                                winograd_chunks<M>(g, xp, xs, u, e, op, os, options);
                                if (edges) strided_edges(*edges);
                              }
                            },
                            banded_geometry(g) && static_cast<int64_t>(u.nbytes()) <= kBlockWeightBytes);
}

// The short-grid convolution's entry (winograd_plan's 1), as winograd<M> for tiles.
at::Tensor short_grid_winograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& residual, at::IntArrayRef padding,
                               at::IntArrayRef dilation, bool relu, at::MemoryFormat out_format) {
  TORCH_CHECK(short_grids_apply(x.size(2), x.size(3), padding, dilation),
              "deeplab_ops: the short-grid convolution needs padding == dilation and a map at most 3 dilations across");
  const ShortGrids s = short_grids(x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0), dilation);
  const at::Tensor u =
      kept_or_built(weight, short_grid_key(s), [&](const at::Tensor& w) { return short_grid_weight_transform(w, s); });
  return channels_last_call(x, s.k, s.h, s.w, bias, residual, relu, out_format,
                            [&](const float* xp, Strides4 xs, const Epilogue& e, float* op, Strides4 os,
                                const at::TensorOptions& options) {
                              short_grid_conv(s, xp, xs, u, e, op, os, options);
                            });
}

// A GEMM's read of one point of a transformed weight (C_in x C_out floats), in GEMM rows of products: about 30 rows
// where the point exceeds a core's L2 (1 MB on this project's Xeon; a 2048 x 256 point is 2 MB, and a call's points
// together 18-128 MB), proportionally less for smaller points.
double short_grid_reads(int64_t point_bytes) {
  constexpr double kRows = 30.0;
  return kRows * std::min(1.0, static_cast<double>(point_bytes) / static_cast<double>(kL2Bytes));
}

// F(m x m)'s work as short grids count theirs (products, the per-call transform where the weight is not kept, and
// each GEMM's read of its point of U: once per chunk, or per block of tiles where U fits beside them).
double tile_work_with_reads(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int m, double transform) {
  const int64_t a2 = (m + 2) * (m + 2), c = x.size(1), k = weight.size(0);
  const Geometry g = geometry(x.size(0), c, x.size(2), x.size(3), k, padding, dilation, m);
  const int64_t tiles = g.tiles(), point_bytes = c * k * int64_t{sizeof(float)};
  // as winograd<M> runs them: chunks or blocks
  const int64_t gemms = ceil_div(tiles, a2 * point_bytes > kBlockWeightBytes ? chunk_rows(a2, c, k, tiles)
                                                                            : block_tiles(a2, c, k, tiles, 1));
  return (static_cast<double>(tiles) + transform + short_grid_reads(point_bytes) * static_cast<double>(gemms)) *
         static_cast<double>(a2);
}

// $DEEPLAB_OPS_CPU_WINOGRAD, read per call (a getenv beside a convolution): unset, "" or "1" on, "0" off; any
// other value is refused rather than read as either.
bool winograd_enabled() {
  const char* v = std::getenv("DEEPLAB_OPS_CPU_WINOGRAD");
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, "1") == 0) return true;
  TORCH_CHECK_VALUE(std::strcmp(v, "0") == 0, "DEEPLAB_OPS_CPU_WINOGRAD='", v,
                    "' is not a setting; expected '0' (Winograd off) or '1' (on, the default)");
  return false;
}

}  // namespace

int winograd_plan(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                  at::IntArrayRef dilation) {
  if (!winograd_enabled() || !x.is_cpu() || !weight.is_cpu()) return 0;
  // A convolution stays float32: where the GEMMs would follow a lowered float32 matmul precision (the baseline
  // build's, cpu/gemm_cpu.h), oneDNN's float32 convolution runs instead.
  if (!packed_gemm_is_float32()) return 0;
  if (x.scalar_type() != at::kFloat || weight.scalar_type() != at::kFloat) return 0;
  if (x.dim() != 4 || weight.dim() != 4 || weight.size(2) != 3 || weight.size(3) != 3) return 0;
  if (weight.size(1) != x.size(1) || stride.size() != 2 || padding.size() != 2 || dilation.size() != 2) return 0;
  if (padding[0] < 0 || padding[1] < 0 || dilation[0] < 1 || dilation[1] < 1) return 0;
  if (x.size(1) < kMinChannels || weight.size(0) < kMinChannels || x.size(0) < 1) return 0;
  if (36 * x.size(1) * weight.size(0) * int64_t{sizeof(float)} > kMaxWeightBytes) return 0;
  // The weight transform, per call where it is not kept, in the same units as the products (per input-output
  // channel pair)
  const bool kept = transform_cache().allowed(weight);
  const auto transform_cost = [&](int64_t u_bytes) {
    return kept ? 0.0 : (u_bytes > kMappedBytes ? kTransformCostMapped : kTransformCost);
  };
  if (stride[0] == 2 && stride[1] == 2 && dilation[0] == 1 && dilation[1] == 1) {
    // Stride 2: 4 x 4 output tiles of 81 products each, against direct convolution's taps inside the image. The
    // tiles are counted over the whole output, its edges (strided_edges) too: the ratio below was measured so.
    const Geometry g =
        strided_geometry(x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0), padding, 4, /*edges=*/false);
    if (g.ho < 1 || g.wo < 1) return 0;
    const double direct = static_cast<double>(x.size(0)) *
                          static_cast<double>(valid_taps(x.size(2), g.ho, padding[0], 1, 3, 2)) *
                          static_cast<double>(valid_taps(x.size(3), g.wo, padding[1], 1, 3, 2));
    const int64_t u_bytes = 36 * x.size(1) * weight.size(0) * int64_t{sizeof(float)};
    if (u_bytes > kMaxStridedWeightBytes) return 0;
    const double work = (static_cast<double>(g.tiles()) + transform_cost(u_bytes)) * 81.0;
    return work < kMaxStridedWorkRatio * direct ? kStrided4 : 0;
  }
  if (stride[0] != 1 || stride[1] != 1) return 0;
  const int64_t ho = x.size(2) + 2 * padding[0] - 2 * dilation[0], wo = x.size(3) + 2 * padding[1] - 2 * dilation[1];
  if (ho < 1 || wo < 1) return 0;
  // Direct convolution's multiplies: oneDNN skips the taps that fall in the padding, which on a map not much larger
  // than the dilation is most of them.
  const double direct = static_cast<double>(x.size(0)) *
                        static_cast<double>(valid_taps(x.size(2), ho, padding[0], dilation[0], 3, 1)) *
                        static_cast<double>(valid_taps(x.size(3), wo, padding[1], dilation[1], 3, 1));
  int best = 0;
  double best_work = 0.0;
  for (int m : {4, 3, 2}) {
    const Geometry g = geometry(x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0), padding, dilation, m);
    const int64_t u_bytes = (m + 2) * (m + 2) * x.size(1) * weight.size(0) * int64_t{sizeof(float)};
    const double transform = transform_cost(u_bytes);
    const double work = (static_cast<double>(g.tiles()) + transform) * (m + 2) * (m + 2);
    const bool chunked = u_bytes > kBlockWeightBytes;
    if (work < (chunked ? kMaxWorkRatioChunked : kMaxWorkRatio) * direct && (best == 0 || work < best_work)) {
      best = m, best_work = work;
    }
  }
  // Short grids (a map at most three dilations across, padding == dilation): each grid whole. Their GEMMs have few
  // rows per point where the map is small, so the cost counts, beside the products, each GEMM's read of its point of
  // the transformed weight (short_grid_reads); measured against oneDNN (2048 -> 256, batch 1, channels-last, kept
  // weights): 0.70x its time at rate 18 on 33 x 33 maps (work 0.70 of direct's by this count), 0.68x at rate 24 on
  // 65 x 65 (0.61), 0.66x at rate 36 (0.62), 0.93x at rate 12 on 33 x 33 (0.86; F(3x3) tiles 0.70x, 0.77 by the same
  // count, so they run), 1.5x at rate 6 on 17 x 17 (1.78).
  if (short_grids_apply(x.size(2), x.size(3), padding, dilation)) {
    const ShortGrids s = short_grids(x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0), dilation);
    const int64_t point_bytes = x.size(1) * weight.size(0) * int64_t{sizeof(float)};
    const int64_t u_bytes = s.points * point_bytes;
    if (u_bytes <= kMaxWeightBytes) {
      const double reads = short_grid_reads(point_bytes);
      const double transform = transform_cost(u_bytes);
      double work = 0.0;
      for (const GridType& type : s.types) {
        const int64_t chunk = short_grid_chunk(s, type);
        const double gemms =
            static_cast<double>(ceil_div(type.grids, chunk) * short_grid_parts(type.points(), chunk, point_bytes));
        work += (static_cast<double>(type.grids) + transform + reads * gemms) * type.points();
      }
      // Channels enough for F(4x4)'s weight to run in chunks (about 300 each way), as for tiles: with fewer, the
      // transforms are a larger part (256 -> 256 at rate 12 on a 33 x 33 map: 1.19x oneDNN's time, 2 threads).
      const double ratio = 36 * point_bytes > kBlockWeightBytes ? kMaxShortGridRatio : kMaxWorkRatio;
      const double tiles = best == 0 ? 0.0 : tile_work_with_reads(x, weight, padding, dilation, best, transform);
      if (work < ratio * direct && (best == 0 || work < tiles)) best = 1;
    }
  }
  return best;
}

at::Tensor winograd_conv3x3(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual, at::IntArrayRef padding,
                            at::IntArrayRef dilation, bool relu, int m, at::MemoryFormat out_format) {
  // Named in the profiler (its GEMMs are no aten ops): a trace shows which convolutions ran by Winograd.
  RECORD_FUNCTION("deeplab_ops::winograd_conv3x3", std::vector<c10::IValue>());
  switch (m) {
    case 4:
      return winograd<4>(x, weight, bias, residual, padding, dilation, relu, out_format);
    case 3:
      return winograd<3>(x, weight, bias, residual, padding, dilation, relu, out_format);
    case 2:
      return winograd<2>(x, weight, bias, residual, padding, dilation, relu, out_format);
    case 1:
      return short_grid_winograd(x, weight, bias, residual, padding, dilation, relu, out_format);
    case kStrided4:
      return winograd<kStrided4>(x, weight, bias, residual, padding, dilation, relu, out_format);
    default:
      TORCH_CHECK(false, "deeplab_ops: Winograd tile size must be 4, 3 or 2 (or 1: short grids, -4: stride 2), got ",
                  m);
  }
}

at::Tensor channels_last_weight(const at::Tensor& weight, bool may_keep) {
  constexpr auto kCL = at::MemoryFormat::ChannelsLast;
  const auto convert = [](const at::Tensor& w) { return change_layout(w, kCL); };
  if (!may_keep || weight.is_contiguous(kCL)) return convert(weight);  // itself where it is channels_last
  constexpr int kLayoutKey = 1;  // not a tile size: the entry is the weight in channels_last
  return kept_or_built(weight, kLayoutKey, convert);
}

bool channels_last_weight_kept(const at::Tensor& weight) { return transform_cache().allowed(weight); }

void winograd_cache_allow(const at::Tensor& weight) { transform_cache().allow(weight); }

std::vector<int64_t> winograd_cache_info() { return transform_cache().info(); }

void winograd_cache_clear() { transform_cache().clear(); }

void winograd_cache_release(at::TensorList weights) { transform_cache().release(weights); }

}  // namespace deeplab_ops
