// CIC paint / read kernels for CPU, called from jit through XLA's FFI (see simulators/native.py).
//
// Particles are given as displacements (in mesh cells) from a Lagrangian grid of shape
// (npx, npy, npz): particle (i, j, k) sits at cell coordinate (i, j, k) * mesh_factor + disp,
// shifted by `offset` along x and y (the halo padding of a shard). Along z the mesh is periodic;
// along x and y it is periodic if `wrap_xy`, else indices are clipped (the caller checks that
// particles stay inside the halo). Fields are C-ordered (nx, ny, nz, C).
//
// XLA's CPU scatter costs ~4 ns per update; a plain loop in particle (Lagrangian) order stays in
// cache and is several times faster. Paint uses one private mesh per extra thread (no atomics).
// The loops are instantiated per channel count (1: density, 2: the lightcone's ray samples, 3:
// force), with each point's stencil in local arrays: the generic loop over a runtime channel count,
// with the stencil in a struct, ran at half this speed (NOTEBOOK 25).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t npx, npy, npz;  // particle grid
  int64_t nx, ny, nz, C;  // mesh and channels
  int64_t mesh_factor, offset;
  bool wrap_xy;
};

template <typename T>
inline void axis_cells(T x, int64_t n, bool wrap, int64_t* i0, int64_t* i1, T* f) {
  T fl = std::floor(x);
  *f = x - fl;
  int64_t i = static_cast<int64_t>(fl);
  if (wrap) {
    int64_t a = (i >= 0 && i < n) ? i : ((i % n) + n) % n;  // avoid the division when inside
    *i0 = a;
    *i1 = (a + 1 == n) ? 0 : a + 1;
  } else {
    *i0 = std::min<int64_t>(std::max<int64_t>(i, 0), n - 1);
    *i1 = std::min<int64_t>(std::max<int64_t>(i + 1, 0), n - 1);
  }
}

// Lagrangian index (i, j, k) of particle p, advanced without divisions in the loops below.
struct Lagrangian {
  int64_t i, j, k;
  Lagrangian(const Geometry& g, int64_t p)
      : i(p / (g.npz * g.npy)), j((p / g.npz) % g.npy), k(p % g.npz) {}
  void next(const Geometry& g) {
    if (++k == g.npz) {
      k = 0;
      if (++j == g.npy) {
        j = 0;
        ++i;
      }
    }
  }
};

// The eight corners of the cell containing point p: corner 4a + 2b + d (a, b, d in {0, 1} along
// x, y, z) has flat index idx and weight w; fr holds the fractional position along each axis.
template <typename T>
inline void corners(const Geometry& g, const T* disp, int64_t p, const Lagrangian& q,
                    int64_t idx[8], T w[8], T fr[3]) {
  const T x = static_cast<T>(q.i * g.mesh_factor + g.offset) + disp[3 * p];
  const T y = static_cast<T>(q.j * g.mesh_factor + g.offset) + disp[3 * p + 1];
  const T z = static_cast<T>(q.k * g.mesh_factor) + disp[3 * p + 2];
  int64_t cx[2], cy[2], cz[2];
  axis_cells(x, g.nx, g.wrap_xy, &cx[0], &cx[1], &fr[0]);
  axis_cells(y, g.ny, g.wrap_xy, &cy[0], &cy[1], &fr[1]);
  axis_cells(z, g.nz, true, &cz[0], &cz[1], &fr[2]);
  const T wx[2] = {1 - fr[0], fr[0]}, wy[2] = {1 - fr[1], fr[1]}, wz[2] = {1 - fr[2], fr[2]};
  for (int a = 0; a < 2; ++a)
    for (int b = 0; b < 2; ++b) {
      const int64_t row = (cx[a] * g.ny + cy[b]) * g.nz;
      const T wab = wx[a] * wy[b];
      for (int d = 0; d < 2; ++d) {
        idx[4 * a + 2 * b + d] = row + cz[d];
        w[4 * a + 2 * b + d] = wab * wz[d];
      }
    }
}

// The sum of eight terms as a balanced tree (shorter dependency chains than a running sum).
template <typename T>
inline T sum8(const T* t) {
  return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
}

// Calls body(std::integral_constant<int, NC>) with the channel count NC as a compile-time constant
// where it is one the simulator uses, else with NC = 0 (the loops then read the runtime count).
template <typename F>
void by_channels(int64_t C, F body) {
  switch (C) {
    case 1: body(std::integral_constant<int, 1>{}); break;
    case 2: body(std::integral_constant<int, 2>{}); break;
    case 3: body(std::integral_constant<int, 3>{}); break;
    default: body(std::integral_constant<int, 0>{});
  }
}

// m[idx, c] += w * v[p, c] over points [b, e), skipping points whose values are all 0 (the
// lightcone's adjoint paints ray-sample cotangents, about half of them zero: samples of a step's
// window outside its shell).
template <int NC, typename T>
void paint_range(const Geometry g, const T* d, const T* v, T* m, int64_t b, int64_t e) {
  const int64_t C = NC > 0 ? NC : g.C;
  Lagrangian q(g, b);
  for (int64_t p = b; p < e; ++p, q.next(g)) {
    bool zero = true;
    for (int64_t ch = 0; ch < C; ++ch) zero = zero && v[p * C + ch] == T(0);
    if (zero) continue;
    int64_t idx[8];
    T w[8], fr[3];
    corners(g, d, p, q, idx, w, fr);
    for (int c = 0; c < 8; ++c)
      for (int64_t ch = 0; ch < C; ++ch) m[idx[c] * C + ch] += w[c] * v[p * C + ch];
  }
}

// body(p, idx, w, fr) for each point p in [b, e), with its corners (``corners``). Inlined, with
// the stencil passed as arrays by reference, it runs as fast as the loop written out.
template <typename T, typename F>
[[gnu::always_inline]] inline void each_point(const Geometry& g, const T* d, int64_t b, int64_t e,
                                              F&& body) {
  Lagrangian q(g, b);
  for (int64_t p = b; p < e; ++p, q.next(g)) {
    int64_t idx[8];
    T w[8], fr[3];
    corners(g, d, p, q, idx, w, fr);
    body(p, idx, w, fr);
  }
}

// o[p, c] = sum_corners w * f[idx, c] over points [b, e)
template <int NC, typename T>
void read_range(const Geometry g, const T* f, const T* d, T* o, int64_t b, int64_t e) {
  const int64_t C = NC > 0 ? NC : g.C;
  each_point(g, d, b, e, [&](int64_t p, const int64_t (&idx)[8], const T (&w)[8],
                             const T (&)[3]) [[gnu::always_inline]] {
    for (int64_t ch = 0; ch < C; ++ch) {
      T t[8];
      for (int c = 0; c < 8; ++c) t[c] = w[c] * f[idx[c] * C + ch];
      o[p * C + ch] = sum8(t);
    }
  });
}

// o[p, a] = sum_corners dw_a * sum_c f[idx, c] * ct[p, c] over points [b, e), where dw_a is the
// weight's derivative along axis a: d(wx[a] wy[b] wz[d]) / dfx = (2a - 1) wy[b] wz[d], etc.
template <int NC, typename T>
void read_grad_range(const Geometry g, const T* f, const T* d, const T* ct, T* o, int64_t b,
                     int64_t e) {
  const int64_t C = NC > 0 ? NC : g.C;
  each_point(g, d, b, e, [&](int64_t p, const int64_t (&idx)[8], const T (&)[8],
                             const T (&fr)[3]) [[gnu::always_inline]] {
    T acc[8];
    for (int c = 0; c < 8; ++c) {
      T s = 0;
      for (int64_t ch = 0; ch < C; ++ch) s += f[idx[c] * C + ch] * ct[p * C + ch];
      acc[c] = s;
    }
    const T wx[2] = {1 - fr[0], fr[0]}, wy[2] = {1 - fr[1], fr[1]}, wz[2] = {1 - fr[2], fr[2]};
    const T dw[2] = {-1, 1};
    T gx[8], gy[8], gz[8];
    for (int a = 0; a < 2; ++a)
      for (int bb = 0; bb < 2; ++bb)
        for (int dd = 0; dd < 2; ++dd) {
          const int c = 4 * a + 2 * bb + dd;
          gx[c] = dw[a] * wy[bb] * wz[dd] * acc[c];
          gy[c] = wx[a] * dw[bb] * wz[dd] * acc[c];
          gz[c] = wx[a] * wy[bb] * dw[dd] * acc[c];
        }
    o[3 * p] = sum8(gx);
    o[3 * p + 1] = sum8(gy);
    o[3 * p + 2] = sum8(gz);
  });
}

int n_threads(int64_t work) {
  static const int configured = [] {  // LENSBENCH_THREADS caps the threads (default: all cores)
    const char* env = std::getenv("LENSBENCH_THREADS");
    unsigned hw = std::thread::hardware_concurrency();
    int t = env ? std::atoi(env) : static_cast<int>(hw == 0 ? 1 : hw);
    return std::max(1, std::min(t, 8));
  }();
  int t = configured;
  return work < (1 << 16) ? 1 : t;
}

template <typename F>
void parallel_for(int64_t n, int threads, F body) {  // body(thread, begin, end)
  if (threads <= 1) {
    body(0, 0, n);
    return;
  }
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    int64_t b = n * t / threads, e = n * (t + 1) / threads;
    pool.emplace_back([=] { body(t, b, e); });
  }
  for (auto& th : pool) th.join();
}

template <typename D>
Geometry geometry(const D& pd, const D& md, int64_t mesh_factor, int64_t offset, int64_t wrap_xy) {
  return Geometry{pd[0], pd[1], pd[2], md[0], md[1], md[2], md.size() > 3 ? md[3] : 1,
                  mesh_factor, offset, wrap_xy != 0};
}

// mesh[idx, c] += w * values[p, c]
template <ffi::DataType DT>
ffi::Error Paint(ffi::Buffer<DT> disp, ffi::Buffer<DT> values, ffi::ResultBuffer<DT> mesh,
                 int64_t mesh_factor, int64_t offset, int64_t wrap_xy) {
  using T = ffi::NativeType<DT>;
  const Geometry g = geometry(disp.dimensions(), mesh->dimensions(), mesh_factor, offset, wrap_xy);
  const int64_t n = g.npx * g.npy * g.npz, cells = g.nx * g.ny * g.nz * g.C;
  const T* d = disp.typed_data();
  const T* v = values.typed_data();
  T* out = mesh->typed_data();
  const int threads = n_threads(n);
  std::vector<std::vector<T>> priv(threads > 1 ? threads - 1 : 0);
  parallel_for(n, threads, [&](int t, int64_t b, int64_t e) {
    T* m = out;
    if (t > 0) {
      priv[t - 1].assign(cells, T(0));
      m = priv[t - 1].data();
    } else {
      std::memset(out, 0, sizeof(T) * cells);
    }
    by_channels(g.C, [&](auto nc) { paint_range<decltype(nc)::value>(g, d, v, m, b, e); });
  });
  for (auto& m : priv)
    for (int64_t i = 0; i < cells; ++i) out[i] += m[i];
  return ffi::Error::Success();
}

// out[p, c] = sum_corners w * field[idx, c] for the first `limit` points, 0 for the others
template <typename T>
void ReadPoints(const Geometry& g, const T* f, const T* d, T* o, int64_t limit) {
  const int64_t n = g.npx * g.npy * g.npz;
  limit = std::min(std::max<int64_t>(limit, 0), n);
  std::fill(o + limit * g.C, o + n * g.C, T(0));
  parallel_for(limit, n_threads(limit), [&](int, int64_t b, int64_t e) {
    by_channels(g.C, [&](auto nc) { read_range<decltype(nc)::value>(g, f, d, o, b, e); });
  });
}

template <ffi::DataType DT>
ffi::Error Read(ffi::Buffer<DT> field, ffi::Buffer<DT> disp, ffi::ResultBuffer<DT> out,
                int64_t mesh_factor, int64_t offset, int64_t wrap_xy) {
  const Geometry g = geometry(disp.dimensions(), field.dimensions(), mesh_factor, offset, wrap_xy);
  ReadPoints(g, field.typed_data(), disp.typed_data(), out->typed_data(), g.npx * g.npy * g.npz);
  return ffi::Error::Success();
}

// Read of the first `count` points only (the others 0): a lightcone step's ray samples beyond its
// shell carry weight 0, and they are the tail of the block (samples-major order).
template <ffi::DataType DT>
ffi::Error ReadFirst(ffi::Buffer<DT> field, ffi::Buffer<DT> disp, ffi::Buffer<ffi::S32> count,
                     ffi::ResultBuffer<DT> out, int64_t mesh_factor, int64_t offset,
                     int64_t wrap_xy) {
  const Geometry g = geometry(disp.dimensions(), field.dimensions(), mesh_factor, offset, wrap_xy);
  ReadPoints(g, field.typed_data(), disp.typed_data(), out->typed_data(),
             static_cast<int64_t>(count.typed_data()[0]));
  return ffi::Error::Success();
}

// Gradient of sum_p,c ct[p, c] * read(field)[p, c] with respect to the displacements:
// out[p, a] = sum_corners dw_a * sum_c field[idx, c] * ct[p, c].
template <ffi::DataType DT>
ffi::Error ReadGrad(ffi::Buffer<DT> field, ffi::Buffer<DT> disp, ffi::Buffer<DT> ct,
                    ffi::ResultBuffer<DT> out, int64_t mesh_factor, int64_t offset, int64_t wrap_xy) {
  using T = ffi::NativeType<DT>;
  const Geometry g = geometry(disp.dimensions(), field.dimensions(), mesh_factor, offset, wrap_xy);
  const int64_t n = g.npx * g.npy * g.npz;
  const T* f = field.typed_data();
  const T* d = disp.typed_data();
  const T* w = ct.typed_data();
  T* o = out->typed_data();
  parallel_for(n, n_threads(n), [&](int, int64_t b, int64_t e) {
    by_channels(g.C, [&](auto nc) { read_grad_range<decltype(nc)::value>(g, f, d, w, o, b, e); });
  });
  return ffi::Error::Success();
}

}  // namespace

#define LB_ATTRS                                   \
  .Attr<int64_t>("mesh_factor").Attr<int64_t>("offset").Attr<int64_t>("wrap_xy")

#define LB_DEFINE(DT, SUFFIX)                                                                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(lb_cic_paint_##SUFFIX, Paint<DT>,                               \
                                ffi::Ffi::Bind()                                                \
                                    .Arg<ffi::Buffer<DT>>()                                     \
                                    .Arg<ffi::Buffer<DT>>()                                     \
                                    .Ret<ffi::Buffer<DT>>() LB_ATTRS);                          \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(lb_cic_read_##SUFFIX, Read<DT>,                                 \
                                ffi::Ffi::Bind()                                                \
                                    .Arg<ffi::Buffer<DT>>()                                     \
                                    .Arg<ffi::Buffer<DT>>()                                     \
                                    .Ret<ffi::Buffer<DT>>() LB_ATTRS);                          \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(lb_cic_read_first_##SUFFIX, ReadFirst<DT>,                     \
                                ffi::Ffi::Bind()                                                \
                                    .Arg<ffi::Buffer<DT>>()                                     \
                                    .Arg<ffi::Buffer<DT>>()                                     \
                                    .Arg<ffi::Buffer<ffi::S32>>()                               \
                                    .Ret<ffi::Buffer<DT>>() LB_ATTRS);                          \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(lb_cic_read_grad_##SUFFIX, ReadGrad<DT>,                        \
                                ffi::Ffi::Bind()                                                \
                                    .Arg<ffi::Buffer<DT>>()                                     \
                                    .Arg<ffi::Buffer<DT>>()                                     \
                                    .Arg<ffi::Buffer<DT>>()                                     \
                                    .Ret<ffi::Buffer<DT>>() LB_ATTRS);

LB_DEFINE(ffi::F32, f32)
LB_DEFINE(ffi::F64, f64)
