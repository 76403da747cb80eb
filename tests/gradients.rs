//! The symbolic gradient against central finite differences of the interpreter, for every
//! shipped spec on seeded batches of several shapes, unit and non-unit rows.

mod common;

use common::*;
use losscc::interp::{Frozen, Precision, evaluate_frozen, evaluate_with_gradient, freeze};
use losscc::runtime::Batch;
use ndarray::Array2;

struct Shape {
    classes: &'static [usize],
    d: usize,
    seed: u64,
    scale: f64,
    pull: f64,
}

const SHAPES: &[Shape] = &[
    Shape {
        classes: &[3, 3, 3, 3],
        d: 6,
        seed: 11,
        scale: 0.0,
        pull: 0.8,
    },
    Shape {
        classes: &[4, 4, 4, 4],
        d: 9,
        seed: 12,
        scale: 0.3,
        pull: 0.8,
    },
    Shape {
        classes: &[2, 5, 3, 6],
        d: 7,
        seed: 13,
        scale: 0.2,
        pull: 0.8,
    },
    Shape {
        classes: &[5, 5, 5, 5],
        d: 6,
        seed: 14,
        scale: 0.0,
        pull: 0.25,
    },
];

/// Richardson-extrapolated central differences of the loss along x[i, k], with the
/// `stop`s and samples of the unmoved batch held fixed: at steps (h, h/2) and (h/2, h/4).
/// Where the two disagree a mining decision flips inside the step.
fn differences(
    module: &losscc::ir::Module,
    x: &Array2<f64>,
    labels: &[i64],
    (i, k): (usize, usize),
    frozen: &mut Option<Frozen>,
) -> Option<(f64, f64)> {
    let mut at = |delta: f64| {
        let mut moved = x.clone();
        moved[(i, k)] += delta;
        let batch = Batch {
            x: moved.view(),
            labels,
            inputs: &[],
            seed: 5,
        };
        let (out, kept) = evaluate_frozen(module, &batch, Precision::F64, frozen.take()?).ok()?;
        *frozen = Some(kept);
        Some(out.loss)
    };
    let h = 1e-4;
    let mut central = |step: f64| -> Option<f64> { Some((at(step)? - at(-step)?) / (2.0 * step)) };
    let (d1, d2, d4) = (central(h)?, central(h / 2.0)?, central(h / 4.0)?);
    Some(((4.0 * d2 - d1) / 3.0, (4.0 * d4 - d2) / 3.0))
}

#[test]
fn symbolic_gradient_matches_finite_differences() {
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for name in loss_names() {
        let mut worst: f64 = 0.0;
        let mut compared = 0usize;
        let mut near_boundary = 0usize;
        let mut largest: f64 = 0.0;
        for shape in SHAPES {
            let (x, labels) =
                batch_with_overlap(shape.classes, shape.d, shape.seed, shape.scale, shape.pull);
            let module = lower(&name, &small_params(&name, x.nrows(), shape.d));
            let gradient = losscc::grad::differentiate(&module).expect("differentiates");
            let batch = Batch {
                x: x.view(),
                labels: &labels,
                inputs: &[],
                seed: 5,
            };
            let symbolic = match evaluate_with_gradient(&gradient, &batch, Precision::F64) {
                Ok(out) => out.grad.expect("gradient"),
                // A batch the loss rejects (too few positives for a rank, say) is tested
                // in the edge-case tests; here another shape must do.
                Err(e)
                    if !matches!(
                        e,
                        losscc::runtime::RunError::Internal { .. }
                            | losscc::runtime::RunError::NotFinite { .. }
                    ) =>
                {
                    continue;
                }
                Err(e) => {
                    failures.push(format!("{name}: {e}"));
                    continue;
                }
            };
            let scale = symbolic.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            largest = largest.max(scale);
            let scale = scale.max(1e-12);
            let mut frozen =
                Some(freeze(&module, &batch, Precision::F64).expect("reference evaluation"));
            for ((i, k), &g) in symbolic.indexed_iter() {
                let Some((coarse, fine)) = differences(&module, &x, &labels, (i, k), &mut frozen)
                else {
                    near_boundary += 1;
                    frozen = Some(
                        freeze(&module, &batch, Precision::F64).expect("reference evaluation"),
                    );
                    continue;
                };
                // Differences of a float64 loss cannot resolve a derivative much below 1e-4
                // to 1e-6: the entries are compared relative to that floor at least.
                let magnitude = g.abs().max(1e-3 * scale).max(1e-4);
                if (coarse - fine).abs() > 1e-6 * magnitude {
                    near_boundary += 1;
                    continue;
                }
                compared += 1;
                worst = worst.max((fine - g).abs() / magnitude);
            }
        }
        report.push(format!(
            "{name}: {compared} entries, worst relative error {worst:.1e}, {near_boundary} near a selection boundary, largest |g| {largest:.1e}"
        ));
        if worst > 1e-6 {
            failures.push(format!("{name}: worst relative error {worst:.2e}"));
        }
        if largest == 0.0 {
            failures.push(format!(
                "{name}: the gradient is zero on every shape, which tests nothing"
            ));
        }
        if compared == 0 {
            failures.push(format!("{name}: no shape could be compared"));
        }
        if near_boundary * 10 > compared + near_boundary {
            failures.push(format!(
                "{name}: {near_boundary} of {} entries near a selection boundary",
                compared + near_boundary
            ));
        }
    }
    println!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
