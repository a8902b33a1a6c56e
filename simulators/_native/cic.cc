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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
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
struct Stencil {
  int64_t idx[8];
  T w[8];
  T dw[8][3];
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

template <bool Grad = false, typename T>
inline void stencil(const Geometry& g, const T* disp, int64_t p, const Lagrangian& q,
                    Stencil<T>* s) {
  const int64_t i = q.i, j = q.j, k = q.k;
  const T x = static_cast<T>(i * g.mesh_factor + g.offset) + disp[3 * p];
  const T y = static_cast<T>(j * g.mesh_factor + g.offset) + disp[3 * p + 1];
  const T z = static_cast<T>(k * g.mesh_factor) + disp[3 * p + 2];
  int64_t cx[2], cy[2], cz[2];
  T fx, fy, fz;
  axis_cells(x, g.nx, g.wrap_xy, &cx[0], &cx[1], &fx);
  axis_cells(y, g.ny, g.wrap_xy, &cy[0], &cy[1], &fy);
  axis_cells(z, g.nz, true, &cz[0], &cz[1], &fz);
  const T wx[2] = {1 - fx, fx}, wy[2] = {1 - fy, fy}, wz[2] = {1 - fz, fz};
  const T dw[2] = {-1, 1};
  int c = 0;
  for (int a = 0; a < 2; ++a)
    for (int b = 0; b < 2; ++b)
      for (int d = 0; d < 2; ++d, ++c) {
        s->idx[c] = (cx[a] * g.ny + cy[b]) * g.nz + cz[d];
        s->w[c] = wx[a] * wy[b] * wz[d];
        if (Grad) {
          s->dw[c][0] = dw[a] * wy[b] * wz[d];
          s->dw[c][1] = wx[a] * dw[b] * wz[d];
          s->dw[c][2] = wx[a] * wy[b] * dw[d];
        }
      }
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
  parallel_for(n, threads, [&, g](int t, int64_t b, int64_t e) {  // g by value: kept in registers
    T* m = out;
    if (t > 0) {
      priv[t - 1].assign(cells, T(0));
      m = priv[t - 1].data();
    } else {
      std::memset(out, 0, sizeof(T) * cells);
    }
    Stencil<T> s;
    Lagrangian q(g, b);
    for (int64_t p = b; p < e; ++p, q.next(g)) {
      // a point whose values are all zero adds nothing: the lightcone's adjoint paints ray-sample
      // cotangents, about half of them zero (samples of a step's window outside its shell)
      bool zero = true;
      for (int64_t ch = 0; ch < g.C; ++ch) zero = zero && v[p * g.C + ch] == T(0);
      if (zero) continue;
      stencil(g, d, p, q, &s);
      if (g.C == 1) {  // the density
        const T vp = v[p];
        for (int c = 0; c < 8; ++c) m[s.idx[c]] += s.w[c] * vp;
        continue;
      }
      for (int c = 0; c < 8; ++c)
        for (int64_t ch = 0; ch < g.C; ++ch) m[s.idx[c] * g.C + ch] += s.w[c] * v[p * g.C + ch];
    }
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
  parallel_for(limit, n_threads(limit), [&, g](int, int64_t b, int64_t e) {
    Stencil<T> s;
    Lagrangian q(g, b);
    for (int64_t p = b; p < e; ++p, q.next(g)) {
      stencil(g, d, p, q, &s);
      if (g.C == 3) {  // the force: three interleaved components
        T a0 = 0, a1 = 0, a2 = 0;
        for (int c = 0; c < 8; ++c) {
          const T* r = f + s.idx[c] * 3;
          a0 += s.w[c] * r[0];
          a1 += s.w[c] * r[1];
          a2 += s.w[c] * r[2];
        }
        o[3 * p] = a0;
        o[3 * p + 1] = a1;
        o[3 * p + 2] = a2;
        continue;
      }
      for (int64_t ch = 0; ch < g.C; ++ch) {
        T acc = 0;
        for (int c = 0; c < 8; ++c) acc += s.w[c] * f[s.idx[c] * g.C + ch];
        o[p * g.C + ch] = acc;
      }
    }
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
  parallel_for(n, n_threads(n), [&, g](int, int64_t b, int64_t e) {
    Stencil<T> s;
    Lagrangian q(g, b);
    for (int64_t p = b; p < e; ++p, q.next(g)) {
      stencil<true>(g, d, p, q, &s);
      T gx = 0, gy = 0, gz = 0;
      for (int c = 0; c < 8; ++c) {
        T acc = 0;
        for (int64_t ch = 0; ch < g.C; ++ch) acc += f[s.idx[c] * g.C + ch] * w[p * g.C + ch];
        gx += s.dw[c][0] * acc;
        gy += s.dw[c][1] * acc;
        gz += s.dw[c][2] * acc;
      }
      o[3 * p] = gx;
      o[3 * p + 1] = gy;
      o[3 * p + 2] = gz;
    }
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
