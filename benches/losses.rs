//! Criterion benchmarks of every deterministic loss: compile, forward, forward+backward and
//! the GEMM floor, at n in {256, 1024} and d in {128, 256}, float32, on the seeded
//! synthetic batch of `losscc bench` (4 members per class, unit rows).
//!
//! `cargo bench --bench losses` runs them all (about half an hour);
//! `cargo bench --bench losses -- multi_similarity` runs one loss.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use losscc::ir::{ParamValue, Params};
use losscc::{Loss, Options, Spec};
use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

/// The losses without sampling (the ones with golden values).
const LOSSES: &[&str] = &[
    "a_batch_all",
    "a_hard_pair",
    "a_triplet",
    "batch_all",
    "batch_all_ranking",
    "batch_hard",
    "bin_branch",
    "bin_deviance",
    "binomial",
    "binomial_hard",
    "branch_knn_softmax",
    "center_loss",
    "center_nca",
    "center_triplet",
    "cluster_nca",
    "contrastive",
    "contrastive_sim",
    "gaussian_metric",
    "grad_nca",
    "hard_mining",
    "histogram",
    "js_div_knn_softmax",
    "knn_softmax",
    "lifted_structure",
    "margin_deviance",
    "margin_positive",
    "multi_similarity",
    "nca",
    "neighbour",
    "neighbour_hard",
    "semi_hard",
    "softmax_neig",
    "triplet",
];

/// Parameters that fit d columns (the defaults assume 512).
fn params(name: &str, d: usize) -> Params {
    let list = |cuts: &[usize]| ParamValue::List(cuts.iter().map(|&c| c as f64).collect());
    match name {
        "bin_branch" => vec![("slices".into(), list(&[0, d / 3, 2 * d / 3, d]))],
        "branch_knn_softmax" | "js_div_knn_softmax" => {
            vec![("slices".into(), list(&[0, d / 4, d / 2, 3 * d / 4, d]))]
        }
        _ => Vec::new(),
    }
}

fn compile(name: &str, d: usize) -> Loss {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("losses")
        .join(format!("{name}.loss"));
    let spec =
        Spec::load(&path).unwrap_or_else(|(sources, e)| panic!("{}", losscc::render(&sources, &e)));
    Loss::from_spec(&spec, &params(name, d)).unwrap_or_else(|e| panic!("{e}"))
}

fn losses(c: &mut Criterion) {
    let threads = losscc::runtime::engine::default_threads();
    for &(n, d) in &[(256usize, 128usize), (256, 256), (1024, 128), (1024, 256)] {
        let (x, labels) = losscc::runtime::synthetic::clustered_batch(n, d, 4, 0);
        let x = x.mapv(|v| v as f32);
        let options = Options {
            threads,
            seed: 0,
            inputs: &[],
        };
        for &name in LOSSES {
            let mut group = c.benchmark_group(name);
            group
                .sample_size(10)
                .warm_up_time(Duration::from_millis(300))
                .measurement_time(Duration::from_secs(2));
            let shape = format!("{n}x{d}");
            group.bench_function(BenchmarkId::new("compile", &shape), |b| {
                b.iter(|| {
                    let loss = compile(name, d);
                    loss.prepare(losscc::interp::Precision::F32).unwrap();
                    black_box(loss)
                })
            });
            let loss = compile(name, d);
            group.bench_function(BenchmarkId::new("forward", &shape), |b| {
                b.iter(|| black_box(loss.run(x.view(), &labels, &options, false).unwrap().loss))
            });
            group.bench_function(BenchmarkId::new("forward_backward", &shape), |b| {
                b.iter(|| black_box(loss.run(x.view(), &labels, &options, true).unwrap().loss))
            });
            group.bench_function(BenchmarkId::new("gemm", &shape), |b| {
                b.iter(|| black_box(loss.gemm_time(x.view(), &labels, threads)))
            });
            group.finish();
        }
    }
}

criterion_group!(benches, losses);
criterion_main!(benches);
