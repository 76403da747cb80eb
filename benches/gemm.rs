//! Why the runtime's GEMMs go through the `gemm` crate: the two products of every
//! dense loss, `X Xᵀ` and `G X` (n = 1024, d = 256, float32, one thread), by ndarray's
//! own `dot` (the `matrixmultiply` crate) against `losscc::runtime::gemm` (the `gemm`
//! crate, x86-v4 kernels where the CPU has AVX-512).
//!
//! `cargo bench --bench gemm`.

use criterion::{Criterion, criterion_group, criterion_main};
use losscc::runtime::gemm;
use ndarray::{Array2, ShapeBuilder};
use std::hint::black_box;
use std::time::Duration;

/// A seeded n×d matrix with entries in [-1, 1).
fn matrix(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
    let mut state = seed;
    Array2::from_shape_fn((rows, cols).f(), |_| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    })
    .as_standard_layout()
    .to_owned()
}

fn products(c: &mut Criterion) {
    let (n, d) = (1024, 256);
    let x = matrix(n, d, 1);
    let g = matrix(n, n, 2);
    let mut group = c.benchmark_group("gemm_1024x256_f32_1_thread");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    group.bench_function("x_xt/matrixmultiply", |b| {
        b.iter(|| black_box(x.dot(&x.t())))
    });
    let mut gram = Array2::<f32>::zeros((n, n));
    group.bench_function("x_xt/gemm_crate", |b| {
        b.iter(|| gemm::abt(x.view(), x.view(), gram.view_mut(), 1))
    });
    group.bench_function("x_xt/gemm_crate_lower_triangle_mirrored", |b| {
        b.iter(|| gemm::gram(x.view(), gram.view_mut(), 1))
    });
    group.bench_function("g_x/matrixmultiply", |b| b.iter(|| black_box(g.dot(&x))));
    let mut out = Array2::<f32>::zeros((n, d));
    group.bench_function("g_x/gemm_crate", |b| {
        b.iter(|| {
            out.fill(0.0);
            gemm::ab_acc(1.0, g.view(), x.view(), out.view_mut(), 1)
        })
    });
    group.finish();
}

criterion_group!(benches, products);
criterion_main!(benches);
