//! Shared helpers of the integration tests: loading specs, small batches, parameters that
//! fit them.
#![allow(dead_code)]

use losscc::Spec;
use losscc::interp::{Precision, evaluate_with_gradient};
use losscc::ir::{Module, ParamValue, Params};
use losscc::runtime::Batch;
use ndarray::{Array1, Array2};
use ndarray_npy::read_npy;
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

/// A batch with reference values (a folder of tests/data/golden or tests/data/unseen): the
/// embedding, the labels and the manifest of expected losses and gradients.
pub struct ReferenceCase {
    pub x: Array2<f64>,
    pub labels: Vec<i64>,
    pub manifest: serde_json::Value,
    pub dir: PathBuf,
}

impl ReferenceCase {
    pub fn load(dir: &Path) -> ReferenceCase {
        let x: Array2<f32> = read_npy(dir.join("x.npy")).expect("x.npy");
        let labels: Array1<i64> = read_npy(dir.join("labels.npy")).expect("labels.npy");
        ReferenceCase {
            x: x.mapv(f64::from),
            labels: labels.to_vec(),
            manifest: read_json(&dir.join("manifest.json")),
            dir: dir.to_path_buf(),
        }
    }

    /// The inputs a manifest entry supplies (cluster_nca's groups).
    pub fn inputs(&self, entry: &serde_json::Value) -> Vec<(String, Vec<i64>)> {
        let mut inputs = Vec::new();
        if let Some(map) = entry.get("inputs").and_then(|i| i.as_object()) {
            for (input, file) in map {
                let values: Array1<i64> =
                    read_npy(self.dir.join(file.as_str().expect("a file name"))).expect("input");
                inputs.push((input.clone(), values.to_vec()));
            }
        }
        inputs
    }

    /// The expected gradient of a manifest entry.
    pub fn expected_grad(&self, entry: &serde_json::Value) -> Array2<f64> {
        read_npy(self.dir.join(entry["grad"].as_str().expect("a file name"))).expect("grad")
    }

    /// The interpreter's errors on one loss of the manifest: the loss's relative error and
    /// the gradient's largest error relative to its largest expected entry.
    pub fn interpreter_errors(
        &self,
        name: &str,
        entry: &serde_json::Value,
        precision: Precision,
    ) -> Result<(f64, f64), String> {
        let spec = Spec::load(&losses_dir().join(format!("{name}.loss")))
            .map_err(|(s, e)| losscc::render(&s, &e))?;
        let module = spec
            .lower(&manifest_params(entry))
            .map_err(|e| spec.render(&e))?;
        let gradient = losscc::grad::differentiate(&module).map_err(|e| e.to_string())?;
        let inputs = self.inputs(entry);
        let batch = Batch {
            x: self.x.view(),
            labels: &self.labels,
            inputs: &inputs,
            seed: 0,
        };
        let out =
            evaluate_with_gradient(&gradient, &batch, precision).map_err(|e| e.to_string())?;
        let grad = out.grad.ok_or("no gradient")?;
        Ok(errors(out.loss, &grad, entry, &self.expected_grad(entry)))
    }
}

/// A loss's relative error against a manifest entry, and a gradient's largest error
/// relative to the largest entry of the expected one.
pub fn errors(
    loss: f64,
    grad: &Array2<f64>,
    entry: &serde_json::Value,
    expected_grad: &Array2<f64>,
) -> (f64, f64) {
    let expected_loss = entry["loss"].as_f64().expect("a loss");
    let loss_error = (loss - expected_loss).abs() / expected_loss.abs().max(f64::MIN_POSITIVE);
    let scale = expected_grad.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let grad_error = (grad - expected_grad)
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs()))
        / scale.max(f64::MIN_POSITIVE);
    (loss_error, grad_error)
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("a JSON file")).expect("JSON")
}

/// The parameters a manifest entry sets.
pub fn manifest_params(entry: &serde_json::Value) -> Params {
    let mut params = Params::new();
    if let Some(map) = entry.get("params").and_then(|p| p.as_object()) {
        for (name, value) in map {
            let value = match value {
                serde_json::Value::Array(items) => ParamValue::List(
                    items
                        .iter()
                        .map(|v| v.as_f64().expect("a number"))
                        .collect(),
                ),
                other => ParamValue::Num(other.as_f64().expect("a number")),
            };
            params.push((name.clone(), value));
        }
    }
    params
}
