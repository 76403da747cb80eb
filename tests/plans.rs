//! The compiled backend's plans (batch-level pair work split into row passes) mean the
//! same as the modules they come from: the interpreter gives the same loss and gradient
//! for both, for every shipped spec.

mod common;

use common::*;
use losscc::grad::Gradient;
use losscc::interp::{Precision, evaluate, evaluate_with_gradient};
use losscc::runtime::Batch;

#[test]
fn plans_evaluate_like_their_modules() {
    let (x, labels) = batch_with_overlap(&[4, 4, 4, 4, 4], 9, 77, 0.2, 0.3);
    let batch = Batch {
        x: x.view(),
        labels: &labels,
        inputs: &[],
        seed: 9,
    };
    let mut not_row_local = Vec::new();
    for name in loss_names() {
        let module = lower(&name, &small_params(&name, x.nrows(), 9));
        let gradient = losscc::grad::differentiate(&module).unwrap();
        let reference = evaluate_with_gradient(&gradient, &batch, Precision::F64);

        let plan = losscc::opt::gradient_plan(&gradient);
        losscc::ir::validate(&plan.module).unwrap_or_else(|e| panic!("{name}: {e}"));
        if !plan.row_local {
            not_row_local.push(name.clone());
        }
        let as_gradient = Gradient {
            module: plan.module.clone(),
            scatters: plan.scatters.clone(),
            scales: plan.scales.clone(),
            tensor_steps: plan.tensor_steps.clone(),
            schedule: plan.schedule.clone(),
        };
        let planned = evaluate_with_gradient(&as_gradient, &batch, Precision::F64);
        match (&reference, &planned) {
            (Ok(a), Ok(b)) => {
                assert!(
                    (a.loss - b.loss).abs() <= 1e-12 * a.loss.abs().max(1.0),
                    "{name}: {} vs {}",
                    a.loss,
                    b.loss
                );
                let (ga, gb) = (a.grad.as_ref().unwrap(), b.grad.as_ref().unwrap());
                let diff = (ga - gb).iter().fold(0.0f64, |m, v| m.max(v.abs()));
                assert!(
                    diff <= 1e-12 * ga.iter().fold(1.0f64, |m, v| m.max(v.abs())),
                    "{name}: gradient differs by {diff}"
                );
            }
            (Err(a), Err(b)) => assert_eq!(a.code(), b.code(), "{name}: {a} vs {b}"),
            _ => panic!("{name}: {reference:?} vs {planned:?}"),
        }

        let forward = losscc::opt::forward_plan(&module);
        losscc::ir::validate(&forward.module).unwrap_or_else(|e| panic!("{name}: {e}"));
        let a = evaluate(&module, &batch, Precision::F64).map(|o| o.loss);
        let b = evaluate(&forward.module, &batch, Precision::F64).map(|o| o.loss);
        match (a, b) {
            (Ok(a), Ok(b)) => assert!(
                (a - b).abs() <= 1e-12 * a.abs().max(1.0),
                "{name}: {a} vs {b}"
            ),
            (Err(a), Err(b)) => assert_eq!(a.code(), b.code()),
            (a, b) => panic!("{name}: {a:?} vs {b:?}"),
        }
    }
    // Only the global selection of gaussian_metric stays at batch level.
    assert_eq!(not_row_local, vec!["gaussian_metric".to_string()]);
}
