// Winograd F(2x2, 3x3) float32 convolutions, NHWC, stride 1, for onednn_ffi.cc.
//
// oneDNN has no Winograd convolution below AVX-512, and on AVX2-only CPUs its direct 3x3 convolutions take most of
// a float32 ResNet-20 or Flax CNN step. Winograd's minimal filtering computes each 2x2 block of outputs from a 4x4
// block of inputs with 16 products per channel pair where the direct sum takes 36: the input block and the kernel
// are carried into a 4x4 "transformed" domain (additions and halvings only), multiplied there point by point (16
// small matrix products over the channels), and carried back. Its sums differ from the direct ones by rounding
// alone (about 1e-6 relative). It is one more candidate in onednn_ffi.cc's `fastest`: a shape takes it only where
// it ran faster than oneDNN's own implementations on that machine, and the choice is recorded as theirs is.
//
// The input gradient of a stride-1 convolution is itself one (the output gradient convolved with the kernel turned
// half a circle, its channel axes swapped), so it runs the same `forward`. The kernel gradient runs the transforms
// transposed (`backward_weights`): the input blocks' and the output gradient's, multiplied point by point and summed
// over the batch, then carried back to 3x3.

#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

namespace winograd {

constexpr const char* kName = "cnn:winograd_2x2_3x3:avx2";
constexpr int64_t kTiles = 24;  // 2x2 output blocks per task: the task's transformed blocks stay in L2
constexpr int64_t kRows = 6;    // output blocks per register tile of the matrix products (12 accumulators)

// Input (n, ih, iw, c) to output (n, oh, ow, k), 3x3 kernel, stride 1, pt / pl zeros before the first row / column.
struct Shape {
  int64_t n, ih, iw, c, oh, ow, k, pt, pl;
  int64_t tiles_h() const { return (oh + 1) / 2; }
  int64_t tiles_w() const { return (ow + 1) / 2; }
  int64_t tiles() const { return n * tiles_h() * tiles_w(); }
};

// CNN_WINOGRAD: "0" leaves every convolution to oneDNN; "1" takes these kernels wherever they suit, untimed and
// unrecorded (for tests and comparisons); unset, they compete with oneDNN's implementations by time.
inline std::string setting() {
  const char* value = std::getenv("CNN_WINOGRAD");
  return value ? value : "";
}

// Whether this CPU runs the kernels below (AVX2 with FMA) and the environment lets them run, and whether a shape
// suits them: both channel counts multiples of 16 (the products' register tiles), pads that keep every window
// within two zeros of the input.
inline bool available() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && setting() != "0";
}

inline bool forced() { return setting() == "1"; }

inline bool suits(const Shape& s) {
  int64_t pb = s.oh + 2 - s.ih - s.pt, pr = s.ow + 2 - s.iw - s.pl;
  return s.c % 16 == 0 && s.k % 16 == 0 && s.c > 0 && s.k > 0 && s.oh > 0 && s.ow > 0 && s.pt >= 0 && s.pt <= 2 &&
         s.pl >= 0 && s.pl <= 2 && pb >= 0 && pb <= 2 && pr >= 0 && pr <= 2;
}

// Denormals flushed to zero, in and out, while the kernels run, whichever thread runs them: XLA's pool threads flush
// them (tsl sets FTZ and DAZ in each) and the thread that calls the FFI may not, so a task's sums would depend on
// where it ran. Flushing, as XLA's own loops do, also spares the products the slow path such tiny values take.
struct FlushDenormals {
  unsigned saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040u); }  // FTZ | DAZ
  ~FlushDenormals() { _mm_setcsr(saved); }
};

// Everything below runs only where `available()`, and is compiled for AVX2 and FMA as a whole.
#pragma GCC push_options
#pragma GCC target("avx2,fma")

// The kernel in the transformed domain, U[p][c][k] = (G g G^T)[p] for each of the 16 points p, from Flax's HWIO
// kernel `w` (kc input channels, kk output channels). `turned`: the input gradient's kernel, g[i][j] for input
// channel k and output channel c being w[2-i][2-j][c][k], so c = kk and k = kc.
inline void transform_kernel(const float* w, int64_t kc, int64_t kk, bool turned, float* U) {
  const int64_t c_n = turned ? kk : kc, k_n = turned ? kc : kk;
  for (int64_t c = 0; c < c_n; ++c) {
    for (int64_t k = 0; k < k_n; ++k) {
      float g[3][3], t[4][3];
      for (int i = 0; i < 3; ++i) {
        for (int j = 0; j < 3; ++j) {
          g[i][j] = turned ? w[((2 - i) * 3 + (2 - j)) * kc * kk + k * kk + c] : w[(i * 3 + j) * kc * kk + c * kk + k];
        }
      }
      for (int j = 0; j < 3; ++j) {  // G g, G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]
        t[0][j] = g[0][j];
        t[1][j] = 0.5f * (g[0][j] + g[1][j] + g[2][j]);
        t[2][j] = 0.5f * (g[0][j] - g[1][j] + g[2][j]);
        t[3][j] = g[2][j];
      }
      for (int i = 0; i < 4; ++i) {  // (G g) G^T
        float* u = U + (int64_t(i) * 4 * c_n + c) * k_n + k;
        const int64_t point = c_n * k_n;
        u[0] = t[i][0];
        u[point] = 0.5f * (t[i][0] + t[i][1] + t[i][2]);
        u[2 * point] = 0.5f * (t[i][0] - t[i][1] + t[i][2]);
        u[3 * point] = t[i][2];
      }
    }
  }
}

// V[p][t][c] = (B^T d B)[p] for the task's blocks first..first+count, d each block's 4x4 input window (zeros
// outside the input), B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1].
inline void transform_input(const float* x, const Shape& s, int64_t first, int64_t count, float* V) {
  alignas(32) static const float zeros[8] = {};
  const int64_t per_image = s.tiles_h() * s.tiles_w();
  for (int64_t t = 0; t < count; ++t) {
    const int64_t b = (first + t) / per_image, r = (first + t) % per_image;
    const int64_t y0 = 2 * (r / s.tiles_w()) - s.pt, x0 = 2 * (r % s.tiles_w()) - s.pl;
    const float* at[4][4];
    int64_t step[4][4];  // 8 where the window reads the input, 0 where it reads zeros
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 4; ++j) {
        const bool inside = y0 + i >= 0 && y0 + i < s.ih && x0 + j >= 0 && x0 + j < s.iw;
        at[i][j] = inside ? x + ((b * s.ih + y0 + i) * s.iw + x0 + j) * s.c : zeros;
        step[i][j] = inside ? 8 : 0;
      }
    }
    for (int64_t c = 0; c < s.c; c += 8) {
      __m256 d[4][4];
      for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 4; ++j) d[i][j] = _mm256_loadu_ps(at[i][j] + c / 8 * step[i][j]);
      }
      for (int j = 0; j < 4; ++j) {  // B^T d
        __m256 r0 = _mm256_sub_ps(d[0][j], d[2][j]), r1 = _mm256_add_ps(d[1][j], d[2][j]);
        __m256 r2 = _mm256_sub_ps(d[2][j], d[1][j]), r3 = _mm256_sub_ps(d[1][j], d[3][j]);
        d[0][j] = r0, d[1][j] = r1, d[2][j] = r2, d[3][j] = r3;
      }
      for (int i = 0; i < 4; ++i) {  // (B^T d) B
        float* v = V + ((int64_t(i) * 4) * count + t) * s.c + c;
        const int64_t point = count * s.c;
        _mm256_storeu_ps(v, _mm256_sub_ps(d[i][0], d[i][2]));
        _mm256_storeu_ps(v + point, _mm256_add_ps(d[i][1], d[i][2]));
        _mm256_storeu_ps(v + 2 * point, _mm256_sub_ps(d[i][2], d[i][1]));
        _mm256_storeu_ps(v + 3 * point, _mm256_sub_ps(d[i][1], d[i][3]));
      }
    }
  }
}

// The matrix products of both directions, on one register tile: for each row i < ROWS, the 16 floats at
// out + i * out_row get the sum over j < n of a[i * row + j * step] * b[j * b_step, + 16), added to what they hold
// if `add`. The accumulators are named one by one: GCC kept an array of them in memory, at half the speed.
template <int ROWS>
inline void tile(const float* a, int64_t row, int64_t step, const float* b, int64_t b_step, int64_t n, float* out,
                 int64_t out_row, bool add) {
  __m256 acc[2 * kRows];
  for (int i = 0; i < 2 * kRows; ++i) acc[i] = _mm256_setzero_ps();
  for (int i = 0; add && i < ROWS; ++i) {
    acc[2 * i] = _mm256_loadu_ps(out + i * out_row);
    acc[2 * i + 1] = _mm256_loadu_ps(out + i * out_row + 8);
  }
  __m256 a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3], a4 = acc[4], a5 = acc[5], a6 = acc[6], a7 = acc[7],
         a8 = acc[8], a9 = acc[9], a10 = acc[10], a11 = acc[11];
  for (int64_t j = 0; j < n; ++j, a += step, b += b_step) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    __m256 x = _mm256_broadcast_ss(a);
    a0 = _mm256_fmadd_ps(x, b0, a0), a1 = _mm256_fmadd_ps(x, b1, a1);
    if (ROWS > 1) {
      x = _mm256_broadcast_ss(a + row);
      a2 = _mm256_fmadd_ps(x, b0, a2), a3 = _mm256_fmadd_ps(x, b1, a3);
    }
    if (ROWS > 2) {
      x = _mm256_broadcast_ss(a + 2 * row);
      a4 = _mm256_fmadd_ps(x, b0, a4), a5 = _mm256_fmadd_ps(x, b1, a5);
    }
    if (ROWS > 3) {
      x = _mm256_broadcast_ss(a + 3 * row);
      a6 = _mm256_fmadd_ps(x, b0, a6), a7 = _mm256_fmadd_ps(x, b1, a7);
    }
    if (ROWS > 4) {
      x = _mm256_broadcast_ss(a + 4 * row);
      a8 = _mm256_fmadd_ps(x, b0, a8), a9 = _mm256_fmadd_ps(x, b1, a9);
    }
    if (ROWS > 5) {
      x = _mm256_broadcast_ss(a + 5 * row);
      a10 = _mm256_fmadd_ps(x, b0, a10), a11 = _mm256_fmadd_ps(x, b1, a11);
    }
  }
  const __m256 sums[2 * kRows] = {a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11};
  for (int i = 0; i < ROWS; ++i) {
    _mm256_storeu_ps(out + i * out_row, sums[2 * i]);
    _mm256_storeu_ps(out + i * out_row + 8, sums[2 * i + 1]);
  }
}

// M[p][t][k] = sum over c of V[p][t][c] U[p][c][k], for each point p: tiles of kRows blocks by 16 outputs.
inline void products(const float* V, const float* U, float* M, int64_t count, int64_t c_n, int64_t k_n) {
  for (int64_t p = 0; p < 16; ++p) {
    const float* v = V + p * count * c_n;
    const float* u = U + p * c_n * k_n;
    float* m = M + p * count * k_n;
    for (int64_t k = 0; k < k_n; k += 16) {
      int64_t t = 0;
      for (; t + kRows <= count; t += kRows) {
        tile<kRows>(v + t * c_n, c_n, 1, u + k, k_n, c_n, m + t * k_n + k, k_n, false);
      }
      for (; t < count; ++t) tile<1>(v + t * c_n, c_n, 1, u + k, k_n, c_n, m + t * k_n + k, k_n, false);
    }
  }
}

// y = A^T M A (+ bias, + addend, then relu) for the task's blocks, A^T = [1 1 1 0; 0 1 -1 -1]; a block's outputs
// beyond the image's last row or column are not written.
inline void transform_output(const float* M, const Shape& s, int64_t first, int64_t count, const float* bias,
                             const float* addend, bool relu, float* y) {
  const int64_t per_image = s.tiles_h() * s.tiles_w(), point = count * s.k;
  for (int64_t t = 0; t < count; ++t) {
    const int64_t b = (first + t) / per_image, r = (first + t) % per_image;
    const int64_t y0 = 2 * (r / s.tiles_w()), x0 = 2 * (r % s.tiles_w());
    for (int64_t k = 0; k < s.k; k += 8) {
      const float* m = M + t * s.k + k;
      __m256 q[2][4];
      for (int j = 0; j < 4; ++j) {  // A^T M
        const __m256 m0 = _mm256_loadu_ps(m + j * point), m1 = _mm256_loadu_ps(m + (4 + j) * point);
        const __m256 m2 = _mm256_loadu_ps(m + (8 + j) * point), m3 = _mm256_loadu_ps(m + (12 + j) * point);
        q[0][j] = _mm256_add_ps(_mm256_add_ps(m0, m1), m2);
        q[1][j] = _mm256_sub_ps(_mm256_sub_ps(m1, m2), m3);
      }
      const __m256 shift = bias ? _mm256_loadu_ps(bias + k) : _mm256_setzero_ps();
      for (int i = 0; i < 2 && y0 + i < s.oh; ++i) {
        const __m256 out[2] = {_mm256_add_ps(_mm256_add_ps(_mm256_add_ps(q[i][0], q[i][1]), q[i][2]), shift),
                               _mm256_add_ps(_mm256_sub_ps(_mm256_sub_ps(q[i][1], q[i][2]), q[i][3]), shift)};
        for (int j = 0; j < 2 && x0 + j < s.ow; ++j) {
          const int64_t at = ((b * s.oh + y0 + i) * s.ow + x0 + j) * s.k + k;
          __m256 o = addend ? _mm256_add_ps(out[j], _mm256_loadu_ps(addend + at)) : out[j];
          if (relu) o = _mm256_max_ps(o, _mm256_setzero_ps());
          _mm256_storeu_ps(y + at, o);
        }
      }
    }
  }
}

// y from x and the transformed kernel U; `parallel(tasks, body)` runs body(i) for every task i < tasks.
template <typename Parallel>
void forward(const Shape& s, const float* x, const float* U, const float* bias, const float* addend, bool relu,
             float* y, Parallel parallel) {
  const int64_t tiles = s.tiles(), tasks = (tiles + kTiles - 1) / kTiles;
  parallel(tasks, [&](int64_t i) {
    FlushDenormals flush;
    thread_local std::vector<float> v, m;
    v.resize(16 * kTiles * s.c);
    m.resize(16 * kTiles * s.k);
    const int64_t first = i * kTiles, count = std::min(kTiles, tiles - first);
    transform_input(x, s, first, count, v.data());
    products(v.data(), U, m.data(), count, s.c, s.k);
    transform_output(m.data(), s, first, count, bias, addend, relu, y);
  });
}

// Z[p][t][k] = (A dY A^T)[p] for the task's blocks, dY each block's 2x2 output gradient (zeros beyond the last row
// or column): the transpose of `transform_output`, which the kernel's gradient needs. dY's sums go to `bias`.
inline void transform_gradient(const float* dy, const Shape& s, int64_t first, int64_t count, float* Z, float* bias) {
  const int64_t per_image = s.tiles_h() * s.tiles_w(), point = count * s.k;
  for (int64_t t = 0; t < count; ++t) {
    const int64_t b = (first + t) / per_image, r = (first + t) % per_image;
    const int64_t y0 = 2 * (r / s.tiles_w()), x0 = 2 * (r % s.tiles_w());
    for (int64_t k = 0; k < s.k; k += 8) {
      __m256 g[2][2];
      for (int i = 0; i < 2; ++i) {
        for (int j = 0; j < 2; ++j) {
          const bool inside = y0 + i < s.oh && x0 + j < s.ow;
          const float* at = dy + ((b * s.oh + y0 + i) * s.ow + x0 + j) * s.k + k;
          g[i][j] = inside ? _mm256_loadu_ps(at) : _mm256_setzero_ps();
        }
      }
      const __m256 total = _mm256_add_ps(_mm256_add_ps(g[0][0], g[0][1]), _mm256_add_ps(g[1][0], g[1][1]));
      _mm256_storeu_ps(bias + k, _mm256_add_ps(_mm256_loadu_ps(bias + k), total));
      __m256 e[4][2];  // A dY, A = [1 0; 1 1; 1 -1; 0 -1]
      for (int j = 0; j < 2; ++j) {
        e[0][j] = g[0][j];
        e[1][j] = _mm256_add_ps(g[0][j], g[1][j]);
        e[2][j] = _mm256_sub_ps(g[0][j], g[1][j]);
        e[3][j] = _mm256_sub_ps(_mm256_setzero_ps(), g[1][j]);
      }
      for (int i = 0; i < 4; ++i) {  // (A dY) A^T
        float* z = Z + (int64_t(i) * 4 * count + t) * s.k + k;
        _mm256_storeu_ps(z, e[i][0]);
        _mm256_storeu_ps(z + point, _mm256_add_ps(e[i][0], e[i][1]));
        _mm256_storeu_ps(z + 2 * point, _mm256_sub_ps(e[i][0], e[i][1]));
        _mm256_storeu_ps(z + 3 * point, _mm256_sub_ps(_mm256_setzero_ps(), e[i][1]));
      }
    }
  }
}

// S[p][c][k] += sum over the task's blocks t of V[p][t][c] Z[p][t][k]: tiles of kRows input channels by 16 outputs.
inline void gradient_products(const float* V, const float* Z, float* S, int64_t count, int64_t c_n, int64_t k_n) {
  for (int64_t p = 0; p < 16; ++p) {
    const float* v = V + p * count * c_n;
    const float* z = Z + p * count * k_n;
    float* sum = S + p * c_n * k_n;
    for (int64_t k = 0; k < k_n; k += 16) {
      int64_t c = 0;
      for (; c + kRows <= c_n; c += kRows) tile<kRows>(v + c, 1, c_n, z + k, k_n, count, sum + c * k_n + k, k_n, true);
      for (; c < c_n; ++c) tile<1>(v + c, 1, c_n, z + k, k_n, count, sum + c * k_n + k, k_n, true);
    }
  }
}

// The kernel's gradient, HWIO: dw = G^T S G for each channel pair, S summed over every block, G^T = [1 1/2 1/2 0;
// 0 1/2 -1/2 0; 0 1/2 1/2 1].
inline void untransform_kernel(const float* S, int64_t c_n, int64_t k_n, float* dw) {
  const int64_t point = c_n * k_n;
  for (int64_t ck = 0; ck < point; ++ck) {
    float m[4][4], t[3][4];
    for (int p = 0; p < 16; ++p) m[p / 4][p % 4] = S[p * point + ck];
    for (int j = 0; j < 4; ++j) {
      t[0][j] = m[0][j] + 0.5f * (m[1][j] + m[2][j]);
      t[1][j] = 0.5f * (m[1][j] - m[2][j]);
      t[2][j] = 0.5f * (m[1][j] + m[2][j]) + m[3][j];
    }
    for (int i = 0; i < 3; ++i) {
      dw[(i * 3 + 0) * point + ck] = t[i][0] + 0.5f * (t[i][1] + t[i][2]);
      dw[(i * 3 + 1) * point + ck] = 0.5f * (t[i][1] - t[i][2]);
      dw[(i * 3 + 2) * point + ck] = 0.5f * (t[i][1] + t[i][2]) + t[i][3];
    }
  }
}

// dw (HWIO) and d_bias from x and dy. The blocks are cut into kSlices runs, each summed on its own and the runs
// added in order, so the result does not depend on which thread took which run (a resumed run repeats it bitwise).
constexpr int64_t kSlices = 8;

template <typename Parallel>
void backward_weights(const Shape& s, const float* x, const float* dy, float* dw, float* dbias, Parallel parallel) {
  FlushDenormals flush;  // here too, for the sums of the runs and the kernel's transform
  const int64_t tiles = s.tiles(), slices = std::min(kSlices, tiles), size = 16 * s.c * s.k + s.k;  // S, then dY's sums
  std::vector<float> sums(slices * size, 0.f);
  parallel(slices, [&](int64_t i) {
    FlushDenormals flush;
    thread_local std::vector<float> v, z;
    v.resize(16 * kTiles * s.c);
    z.resize(16 * kTiles * s.k);
    const int64_t end = tiles * (i + 1) / slices;
    for (int64_t first = tiles * i / slices; first < end; first += kTiles) {
      const int64_t count = std::min(kTiles, end - first);
      transform_input(x, s, first, count, v.data());
      transform_gradient(dy, s, first, count, z.data(), &sums[i * size + 16 * s.c * s.k]);
      gradient_products(v.data(), z.data(), &sums[i * size], count, s.c, s.k);
    }
  });
  for (int64_t i = 1; i < slices; ++i) {
    for (int64_t j = 0; j < size; ++j) sums[j] += sums[i * size + j];
  }
  untransform_kernel(sums.data(), s.c, s.k, dw);
  std::copy(sums.begin() + 16 * s.c * s.k, sums.begin() + size, dbias);
}

#pragma GCC pop_options

}  // namespace winograd
