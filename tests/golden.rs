//! Golden parity: every deterministic loss of LOSSES.md against the independent PyTorch
//! values in tests/data/golden, through the interpreter, in float64 and float32.

use losscc::Spec;
use losscc::interp::{Precision, evaluate_with_gradient};
use losscc::ir::{ParamValue, Params};
use losscc::runtime::Batch;
use ndarray::{Array1, Array2};
use ndarray_npy::read_npy;
use std::path::{Path, PathBuf};

const CASES: &[&str] = &["p8k4_d16", "p16k4_d32", "p8k8_d24", "uneven_d12"];

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden")
}

struct Case {
    x: Array2<f64>,
    labels: Vec<i64>,
    manifest: serde_json::Value,
    dir: PathBuf,
}

fn load_case(name: &str) -> Case {
    let dir = golden_dir().join(name);
    let x: Array2<f32> = read_npy(dir.join("x.npy")).expect("x.npy");
    let labels: Array1<i64> = read_npy(dir.join("labels.npy")).expect("labels.npy");
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("manifest.json")).expect("manifest"),
    )
    .expect("json");
    Case {
        x: x.mapv(f64::from),
        labels: labels.to_vec(),
        manifest,
        dir,
    }
}

fn params(entry: &serde_json::Value) -> Params {
    let mut params = Params::new();
    if let Some(map) = entry.get("params").and_then(|p| p.as_object()) {
        for (name, value) in map {
            let value = match value {
                serde_json::Value::Array(items) => {
                    ParamValue::List(items.iter().map(|v| v.as_f64().unwrap()).collect())
                }
                other => ParamValue::Num(other.as_f64().unwrap()),
            };
            params.push((name.clone(), value));
        }
    }
    params
}

/// The worst errors of one loss on one case: (relative loss error, gradient error relative
/// to the largest gradient entry).
fn check(
    case: &Case,
    name: &str,
    entry: &serde_json::Value,
    precision: Precision,
) -> Result<(f64, f64), String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("losses")
        .join(format!("{name}.loss"));
    let spec = Spec::load(&path).map_err(|(s, e)| losscc::render(&s, &e))?;
    let module = spec.lower(&params(entry)).map_err(|e| spec.render(&e))?;
    let gradient = losscc::grad::differentiate(&module).map_err(|e| e.to_string())?;
    let mut inputs = Vec::new();
    if let Some(map) = entry.get("inputs").and_then(|i| i.as_object()) {
        for (input, file) in map {
            let values: Array1<i64> =
                read_npy(case.dir.join(file.as_str().unwrap())).map_err(|e| e.to_string())?;
            inputs.push((input.clone(), values.to_vec()));
        }
    }
    let batch = Batch {
        x: case.x.view(),
        labels: &case.labels,
        inputs: &inputs,
        seed: 0,
    };
    let out = evaluate_with_gradient(&gradient, &batch, precision).map_err(|e| e.to_string())?;
    let expected_loss = entry["loss"].as_f64().unwrap();
    let expected_grad: Array2<f64> =
        read_npy(case.dir.join(entry["grad"].as_str().unwrap())).map_err(|e| e.to_string())?;
    let loss_error = (out.loss - expected_loss).abs() / expected_loss.abs().max(f64::MIN_POSITIVE);
    let grad = out.grad.unwrap();
    let scale = expected_grad.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let grad_error = (&grad - &expected_grad)
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs()))
        / scale.max(f64::MIN_POSITIVE);
    Ok((loss_error, grad_error))
}

fn parity(precision: Precision, loss_tol: f64, grad_tol: f64) {
    let mut failures = Vec::new();
    let mut checks = 0;
    // Per loss: the worst loss and gradient errors over the cases.
    let mut worst: std::collections::BTreeMap<String, (f64, f64)> = Default::default();
    for case_name in CASES {
        let case = load_case(case_name);
        let losses = case.manifest["losses"].as_object().unwrap();
        for (name, entry) in losses {
            checks += 1;
            match check(&case, name, entry, precision) {
                Ok((loss_error, grad_error)) => {
                    let w = worst.entry(name.clone()).or_default();
                    *w = (w.0.max(loss_error), w.1.max(grad_error));
                    if loss_error > loss_tol || grad_error > grad_tol {
                        failures.push(format!("{case_name}/{name}: loss error {loss_error:.2e}, gradient error {grad_error:.2e}"));
                    }
                }
                Err(e) => failures.push(format!("{case_name}/{name}: {e}")),
            }
        }
    }
    println!("{precision:?}: worst relative loss error, worst gradient error / largest entry");
    for (name, (loss_error, grad_error)) in &worst {
        println!("  {name:<20} {loss_error:.1e} {grad_error:.1e}");
    }
    assert_eq!(checks, 132, "4 cases x 33 losses");
    assert!(
        failures.is_empty(),
        "{} of {checks} checks failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn golden_parity_f64() {
    parity(Precision::F64, 1e-9, 1e-7);
}

#[test]
fn golden_parity_f32() {
    parity(Precision::F32, 1e-4, 1e-4);
}
