//! The sampling losses: reproducible for a seed, different across seeds, and drawing with
//! the frequencies their weights say.

mod common;

use common::*;
use losscc::interp::{Precision, evaluate_with_gradient};
use losscc::runtime::Batch;

#[test]
fn same_seed_same_result_and_seeds_differ() {
    let (x, labels) = batch_with_overlap(&[4, 4, 4, 4, 4], 9, 21, 0.1, 0.3);
    for name in STOCHASTIC {
        let module = lower(name, &small_params(name, x.nrows(), 9));
        let gradient = losscc::grad::differentiate(&module).unwrap();
        let run = |seed| {
            let batch = Batch {
                x: x.view(),
                labels: &labels,
                inputs: &[],
                seed,
            };
            evaluate_with_gradient(&gradient, &batch, Precision::F64).unwrap()
        };
        let first = run(7);
        assert_eq!(
            first,
            run(7),
            "{name}: the same seed must give the same loss and gradient"
        );
        let differs = (0..20).any(|seed| run(seed).loss != first.loss);
        assert!(
            differs,
            "{name}: 20 seeds all gave the same loss, so the seed is not used"
        );
    }
}

/// Draws one negative per anchor with weight exp(8 s) and checks, over many seeds, that
/// anchor 0 draws each of its five negatives as often as the weights say (chi-square).
/// Every other anchor has anchor 0 as its only negative, so its pick is fixed and anchor
/// 0's pick is the loss minus theirs.
#[test]
fn draws_follow_the_weights() {
    let source = "loss draw() {\n    s = dot(x)\n    per anchor {\n        neg = s where !same\n        picked = sum(sample(neg, 1, exp(8 * v)))\n    }\n    loss = sum(picked)\n}\n";
    let mut sources = losscc::diagnostic::Sources::new();
    let program =
        losscc::syntax::load_source("draw.loss", "draw", source.into(), &mut sources, |_| None)
            .unwrap();
    let module = losscc::ir::lower(&program, &Vec::new()).unwrap();
    let (x, _) = batch(&[6], 4, 5, 0.0);
    let labels = vec![0, 1, 1, 1, 1, 1];
    let sims: Vec<f64> = (1..6).map(|j| x.row(0).dot(&x.row(j))).collect();
    let fixed: f64 = sims.iter().sum();
    let weights: Vec<f64> = sims.iter().map(|s| (8.0 * s).exp()).collect();
    let total: f64 = weights.iter().sum();
    let draws = 20_000u64;
    let mut counts = [0usize; 5];
    for seed in 0..draws {
        let batch = Batch {
            x: x.view(),
            labels: &labels,
            inputs: &[],
            seed,
        };
        let out = losscc::interp::evaluate(&module, &batch, Precision::F64).unwrap();
        let picked = out.loss - fixed;
        let index = sims
            .iter()
            .position(|s| (s - picked).abs() < 1e-9)
            .expect("the pick is one of the negatives");
        counts[index] += 1;
    }
    let chi2: f64 = counts
        .iter()
        .zip(&weights)
        .map(|(&c, w)| {
            let expected = draws as f64 * w / total;
            (c as f64 - expected).powi(2) / expected
        })
        .sum();
    // 4 degrees of freedom: the 0.1% critical value is 18.47.
    assert!(
        chi2 < 18.47,
        "chi-square {chi2:.2} over counts {counts:?} for weights {weights:?}"
    );
    // And the test can fail: the same counts against uniform weights are far off.
    let uniform: f64 = counts
        .iter()
        .map(|&c| (c as f64 - draws as f64 / 5.0).powi(2) / (draws as f64 / 5.0))
        .sum();
    assert!(
        uniform > 10.0 * 18.47,
        "the weights are too even for the test to discriminate ({uniform:.1})"
    );
}
