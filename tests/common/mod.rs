//! Shared helpers of the integration tests: loading specs, small batches, parameters that
//! fit them.
#![allow(dead_code)]

use losscc::Spec;
use losscc::ir::{Module, ParamValue, Params};
use ndarray::Array2;
use std::path::{Path, PathBuf};

pub fn losses_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("losses")
}

/// Every shipped spec's name, sorted.
pub fn loss_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(losses_dir())
        .expect("losses/")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "loss"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The losses that draw random samples (no golden values; tested for reproducibility).
pub const STOCHASTIC: &[&str] = &[
    "dist_weight_neighbour",
    "dist_weight_contrastive",
    "dist_weight_deviance",
    "dist_weight",
    "distance_match",
    "bdw_neighbour",
    "dist_weight_dev_branch",
    "ensemble_dw_neighbour",
];

/// Parameters that fit a batch of `n` rows and `d` columns.
pub fn small_params(name: &str, n: usize, d: usize) -> Params {
    let num = |v: f64| ParamValue::Num(v);
    let list = |v: &[usize]| ParamValue::List(v.iter().map(|&x| x as f64).collect());
    let k = (n.saturating_sub(2)).min(4) as f64;
    match name {
        "knn_softmax" | "nca" | "grad_nca" => vec![("k".into(), num(k))],
        "branch_knn_softmax" | "js_div_knn_softmax" => {
            vec![
                ("k".into(), num(k)),
                ("slices".into(), list(&[0, d / 2, d])),
            ]
        }
        "bin_branch" | "bdw_neighbour" | "dist_weight_dev_branch" => {
            vec![("slices".into(), list(&[0, d / 3, 2 * d / 3, d]))]
        }
        "ensemble_dw_neighbour" => vec![("parts".into(), list(&[d / 3, d / 3, d - 2 * (d / 3)]))],
        "cluster_nca" => vec![("n_cluster".into(), num((n / 4).max(1) as f64))],
        "center_loss" => vec![
            ("an_margin".into(), num(1.0)),
            ("ap_margin".into(), num(0.5)),
        ],
        _ => Vec::new(),
    }
}

/// The module of a shipped spec, or `None` when lowering rejects the parameters.
pub fn try_lower(name: &str, params: &Params) -> Option<Module> {
    let spec = Spec::load(&losses_dir().join(format!("{name}.loss"))).ok()?;
    spec.lower(params).ok()
}

pub fn lower(name: &str, params: &Params) -> Module {
    let spec = Spec::load(&losses_dir().join(format!("{name}.loss")))
        .unwrap_or_else(|(s, e)| panic!("{}", losscc::render(&s, &e)));
    spec.lower(params)
        .unwrap_or_else(|e| panic!("{}", spec.render(&e)))
}

/// A seeded batch: `classes` gives each class's size; rows unit length unless `scale`
/// spreads their norms over [1 - scale, 1 + scale]. Classes are well separated.
pub fn batch(classes: &[usize], d: usize, seed: u64, scale: f64) -> (Array2<f64>, Vec<i64>) {
    batch_with_overlap(classes, d, seed, scale, 0.8)
}

/// As [`batch`], `pull` saying how strongly rows lean towards their class (0.8: well
/// separated, 0.2: overlapping classes).
pub fn batch_with_overlap(
    classes: &[usize],
    d: usize,
    seed: u64,
    scale: f64,
    pull: f64,
) -> (Array2<f64>, Vec<i64>) {
    let n: usize = classes.iter().sum();
    let (mut x, _) = losscc::runtime::synthetic::clustered_batch(n, d, 1, seed);
    let mut labels = Vec::with_capacity(n);
    for (class, &size) in classes.iter().enumerate() {
        labels.extend(std::iter::repeat_n(class as i64, size));
    }
    // Pull each row towards its class's first row so that classes are similar.
    let mut start = 0;
    for &size in classes {
        let anchor = x.row(start).to_owned();
        for i in start..start + size {
            let mut row = x.row_mut(i);
            row.zip_mut_with(&anchor, |v, &a| *v = 0.6 * *v + pull * a);
            let norm = row.dot(&row).sqrt();
            let target = 1.0 + scale * (((i * 7919) % 13) as f64 / 6.0 - 1.0);
            row.mapv_inplace(|v| v / norm * target);
        }
        start += size;
    }
    (x, labels)
}
