//! Golden parity: every deterministic loss of LOSSES.md against the independent PyTorch
//! values in tests/data/golden, through the interpreter, in float64 and float32.

mod common;

use common::ReferenceCase;
use losscc::interp::Precision;
use std::path::Path;

const CASES: &[&str] = &["p8k4_d16", "p16k4_d32", "p8k8_d24", "uneven_d12"];

fn load_case(name: &str) -> ReferenceCase {
    ReferenceCase::load(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/golden")
            .join(name),
    )
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
            match case.interpreter_errors(name, entry, precision) {
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
