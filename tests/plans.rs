//! The compiled backend's plans (batch-level pair work split into row passes) mean the
//! same as the modules they come from: the interpreter gives the same loss and gradient
//! for both, for every shipped spec.

mod common;

use common::*;
use losscc::interp::{Precision, evaluate, evaluate_with_gradient};
use losscc::ir::Phase;
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
        let as_gradient = plan.to_gradient();
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
    // gaussian_metric's global selections are filters against their cuts.
    assert_eq!(not_row_local, Vec::<String>::new());
}

/// A loss normalised by a batch total (a mean over anchors, `sum(term) / sum(count)`) has
/// that total as a factor of every scatter weight; the plan moves it to the matrix scale,
/// so that the scatters run in the forward's row pass instead of a second pass that
/// redoes each row (a matrix whose scatters carry different totals, as
/// js_div_knn_softmax's, takes one adjoint slot per total). Only histogram, whose weights
/// read the batch histograms, keeps a pass of scatters alone.
#[test]
fn scatters_join_the_forward_row_pass() {
    let mut second_pass = Vec::new();
    for name in loss_names() {
        let module = lower(&name, &small_params(&name, 20, 9));
        let gradient = losscc::grad::differentiate(&module).unwrap();
        let plan = losscc::opt::gradient_plan(&gradient);
        let scatters_alone = plan.schedule.phases.iter().any(|phase| {
            matches!(phase, Phase::Rows { outputs, effects, .. }
                if outputs.is_empty() && !effects.is_empty())
        });
        if scatters_alone {
            second_pass.push(name.clone());
        }
    }
    assert_eq!(second_pass, ["histogram"]);
}

/// A per-anchor factor that every weight into an adjoint slot shares, and that reads a
/// reduction over the scatters' own set (triplet's `1 / count(valid)`), comes out of the
/// weights as the scatters' row scale; where the rest of the weights reads such a
/// reduction too (a softmax over the set, as in multi_similarity), it stays in.
#[test]
fn per_anchor_factors_over_the_scattered_set_become_row_scales() {
    let mut scaled = Vec::new();
    for name in loss_names() {
        let module = lower(&name, &small_params(&name, 20, 9));
        let gradient = losscc::grad::differentiate(&module).unwrap();
        let plan = losscc::opt::gradient_plan(&gradient);
        let with_scale = plan.scatters.iter().filter(|s| s.row_scale.is_some());
        if with_scale.clone().count() > 0 {
            // Every scatter into the slot carries the same factor.
            for s in with_scale {
                let same_slot = plan.scatters.iter().filter(|t| t.slot == s.slot);
                assert!(
                    same_slot.clone().all(|t| t.row_scale == s.row_scale),
                    "{name}"
                );
            }
            scaled.push(name.clone());
        }
    }
    assert_eq!(scaled, ["a_triplet", "batch_all_ranking", "triplet"]);
}

/// Triplet mining conditions `softplus(p - q) > c` compare `p - q` with `ln(e^c - 1)` in
/// the plan: no comparison of a shipped loss's plan is left on `exp` or `softplus` of a
/// value, and the triplet plans hold the moved threshold.
#[test]
fn comparisons_move_to_the_arguments_of_increasing_functions() {
    use losscc::ir::{BinaryOp, ExprKind, UnaryOp};
    for name in loss_names() {
        let module = lower(&name, &small_params(&name, 20, 9));
        let gradient = losscc::grad::differentiate(&module).unwrap();
        let plan = losscc::opt::gradient_plan(&gradient);
        let exprs = &plan.module.exprs;
        let increasing = |h| {
            matches!(
                exprs[h].kind,
                ExprKind::Unary {
                    op: UnaryOp::Exp | UnaryOp::Softplus,
                    ..
                }
            )
        };
        let constant = |h| matches!(exprs[h].kind, ExprKind::Const(c) if c.0 > 0.0);
        for (h, e) in exprs.iter() {
            if let ExprKind::Binary { op, lhs, rhs } = e.kind
                && matches!(
                    op,
                    BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge
                )
            {
                let left = increasing(lhs) && constant(rhs);
                let right = increasing(rhs) && constant(lhs);
                assert!(
                    !left && !right,
                    "{name}: {h} still compares a transcendental"
                );
            }
        }
        if name == "triplet" {
            let threshold = 0.7f64.exp_m1().ln();
            let moved = exprs.iter().any(
                |(_, e)| matches!(e.kind, ExprKind::Const(c) if (c.0 - threshold).abs() < 1e-15),
            );
            assert!(moved, "triplet's plan compares p - q with {threshold}");
        }
    }
}
