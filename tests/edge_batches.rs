//! Degenerate batches for every shipped spec: a class with one member, n = 1 and 2, one
//! class only, every sample its own class. Each loss must either give a finite loss and
//! gradient or fail with a clear error (never an internal one, never a NaN). The outcomes
//! are snapshotted, so the behaviour of every loss on every such batch is on record.

mod common;

use common::*;
use losscc::interp::{Precision, evaluate_with_gradient};
use losscc::runtime::{Batch, RunError};
use std::fmt::Write;

const BATCHES: &[(&str, &[usize])] = &[
    ("a singleton class", &[4, 4, 1]),
    ("n = 1", &[1]),
    ("n = 2, one class", &[2]),
    ("n = 2, two classes", &[1, 1]),
    ("one class", &[6]),
    ("all singletons", &[1, 1, 1, 1, 1, 1]),
];

#[test]
fn degenerate_batches_have_defined_behaviour() {
    let d = 6;
    let mut table = String::new();
    let mut failures = Vec::new();
    for name in loss_names() {
        let _ = writeln!(table, "{name}");
        for (index, (label, classes)) in BATCHES.iter().enumerate() {
            let (x, labels) = batch(classes, d, 40 + index as u64, 0.0);
            let module = lower(&name, &small_params(&name, x.nrows(), d));
            let gradient = losscc::grad::differentiate(&module).expect("differentiates");
            let batch = Batch {
                x: x.view(),
                labels: &labels,
                inputs: &[],
                seed: 3,
            };
            let outcome = match evaluate_with_gradient(&gradient, &batch, Precision::F64) {
                Ok(out) => {
                    let grad = out.grad.expect("gradient");
                    if !out.loss.is_finite() || grad.iter().any(|g| !g.is_finite()) {
                        failures.push(format!(
                            "{name} on {label}: a non-finite result passed as Ok"
                        ));
                    }
                    format!("ok, loss {:.6}", out.loss)
                }
                Err(e @ RunError::Internal { .. }) => {
                    failures.push(format!("{name} on {label}: {e}"));
                    format!("INTERNAL {e}")
                }
                Err(e) => format!("error[{}] {e}", e.code()),
            };
            let _ = writeln!(table, "    {label}: {outcome}");
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    insta::assert_snapshot!("degenerate_batches", table);
}
