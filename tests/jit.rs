//! The compiled backend held against the interpreter: the golden cases in both float types,
//! seeded random batches of many shapes, degenerate batches (same errors), thread counts
//! (bitwise the same), and the sampling losses (the same draws).

mod common;

use common::*;
use losscc::interp::{Precision, evaluate_with_gradient};
use losscc::jit::Target;
use losscc::runtime::engine::{Evaluator, Loss, Options};
use losscc::runtime::{Batch, RunError};
use ndarray::Array2;
use std::path::Path;

/// Largest |a - b| over the largest |a|, or over 1e-12 when every entry is smaller: a
/// gradient is accumulated from terms of order 1 / n, so in float64 its entries are only
/// defined to about 1e-16 in absolute terms. (One class in js_div_knn_softmax: the knn
/// part's two log-sum-exps cancel to 0 while the JS part contributes 1e-46, and the order
/// of accumulation decides what survives of it.)
fn relative_gap(a: &Array2<f64>, b: &Array2<f64>) -> f64 {
    let scale = a.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-12);
    (a - b).iter().fold(0.0f64, |m, v| m.max(v.abs())) / scale
}

/// |value - reference| over |reference| (a zero reference only meets itself).
fn relative_loss_gap(value: f64, reference: f64) -> f64 {
    (value - reference).abs() / reference.abs().max(1e-300)
}

/// Whether the compiled loss fell back to the interpreter, which no shipped spec does.
fn check_evaluator(name: &str, evaluator: Evaluator, failures: &mut Vec<String>) {
    if evaluator != Evaluator::Jit {
        failures.push(format!(
            "{name}: evaluated by the interpreter, not the kernels"
        ));
    }
}

/// The golden cases in float32 and float64, on the kernels built for this machine and for
/// the architecture's baseline (no FMA, byte shuffles or blends: the portable code paths).
#[test]
fn golden_cases_in_both_float_types() {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden");
    let mut failures = Vec::new();
    let mut checks = 0;
    for case in ["p8k4_d16", "p16k4_d32", "p8k8_d24", "uneven_d12"] {
        let reference_case = ReferenceCase::load(&golden.join(case));
        let (x64, labels) = (&reference_case.x, &reference_case.labels);
        let x = x64.mapv(|v| v as f32);
        for (name, entry) in reference_case.manifest["losses"].as_object().unwrap() {
            let params = manifest_params(entry);
            let inputs = reference_case.inputs(entry);
            let module = lower(name, &params);
            let gradient = losscc::grad::differentiate(&module).unwrap();
            let options = Options {
                threads: 2,
                seed: 0,
                inputs: &inputs,
            };
            let batch = Batch {
                x: x64.view(),
                labels,
                inputs: &inputs,
                seed: 0,
            };
            for target in [Target::Native, Target::Baseline] {
                let loss = Loss::new(module.clone(), gradient.clone()).with_target(target);
                for precision in [Precision::F64, Precision::F32] {
                    checks += 1;
                    let reference =
                        evaluate_with_gradient(loss.gradient(), &batch, precision).unwrap();
                    let (value, grad, evaluator) = match precision {
                        Precision::F64 => {
                            let out = loss.run(x64.view(), labels, &options, true).unwrap();
                            (out.loss, out.grad.unwrap(), out.evaluator)
                        }
                        Precision::F32 => {
                            let out = loss.run(x.view(), labels, &options, true).unwrap();
                            (out.loss, out.grad.unwrap().mapv(f64::from), out.evaluator)
                        }
                    };
                    let tolerance = if precision == Precision::F64 {
                        1e-10
                    } else {
                        1e-4
                    };
                    let loss_gap = relative_loss_gap(value, reference.loss);
                    let grad_gap = relative_gap(reference.grad.as_ref().unwrap(), &grad);
                    if loss_gap > tolerance || grad_gap > tolerance {
                        failures.push(format!(
                            "{case}/{name}/{precision:?}/{target:?}: loss {loss_gap:.1e}, gradient {grad_gap:.1e}"
                        ));
                    }
                    // And against the golden values themselves.
                    let (loss_tolerance, grad_tolerance) = if precision == Precision::F64 {
                        (1e-9, 1e-7)
                    } else {
                        (1e-4, 1e-4)
                    };
                    let expected_grad = reference_case.expected_grad(entry);
                    let (loss_gap, grad_gap) = errors(value, &grad, entry, &expected_grad);
                    if loss_gap > loss_tolerance || grad_gap > grad_tolerance {
                        failures.push(format!(
                            "{case}/{name}/{precision:?}/{target:?} against golden: loss {loss_gap:.1e}, gradient {grad_gap:.1e}"
                        ));
                    }
                    check_evaluator(name, evaluator, &mut failures);
                }
            }
        }
    }
    assert_eq!(checks, 528);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Random batches: n from 1 to 300, d from 1 to 64, every class layout.
#[test]
fn random_shapes_match_the_interpreter() {
    let layouts: Vec<(&str, Vec<usize>, usize, f64)> = vec![
        ("n = 1", vec![1], 3, 0.0),
        ("n = 2", vec![2], 1, 0.0),
        ("one class", vec![7], 5, 0.2),
        ("singletons", vec![1; 9], 4, 0.0),
        ("uneven", vec![2, 7, 3, 1, 5, 4], 11, 0.3),
        ("4 per class, d 64", vec![4; 24], 64, 0.0),
        ("n = 300", vec![5; 60], 24, 0.1),
    ];
    let mut failures = Vec::new();
    let mut compared = 0;
    for name in loss_names() {
        for (index, (label, classes, d, scale)) in layouts.iter().enumerate() {
            let (x, labels) = batch_with_overlap(classes, *d, 500 + index as u64, *scale, 0.4);
            let params = small_params(&name, x.nrows(), *d);
            // Parameters no batch this small can satisfy (two branches of one column) are
            // rejected at compile time; the diagnostics tests cover that.
            let Some(module) = try_lower(&name, &params) else {
                continue;
            };
            let gradient = losscc::grad::differentiate(&module).unwrap();
            let batch = Batch {
                x: x.view(),
                labels: &labels,
                inputs: &[],
                seed: 4,
            };
            let reference = evaluate_with_gradient(&gradient, &batch, Precision::F64);
            let loss = Loss::new(module, gradient);
            let options = Options {
                threads: 3,
                seed: 4,
                inputs: &[],
            };
            match (reference, loss.run(x.view(), &labels, &options, true)) {
                (Ok(a), Ok(b)) => {
                    compared += 1;
                    let loss_gap = relative_loss_gap(b.loss, a.loss);
                    let grad_gap = relative_gap(a.grad.as_ref().unwrap(), b.grad.as_ref().unwrap());
                    if loss_gap > 1e-10 || grad_gap > 1e-10 {
                        failures.push(format!(
                            "{name} on {label}: loss {loss_gap:.1e}, gradient {grad_gap:.1e}"
                        ));
                    }
                    // In f32 too, where the kernels take other paths (four lanes, rows
                    // compacted by shuffles), on this machine's instructions and on the
                    // baseline's; a regular batch must not need the interpreter.
                    // The tolerance widens with the float32 interpreter's own error: an
                    // ill-conditioned loss (a small difference of log-sum-exps) is only
                    // defined so far in float32.
                    let single = evaluate_with_gradient(loss.gradient(), &batch, Precision::F32);
                    let x32 = x.mapv(|v| v as f32);
                    let baseline = Loss::new(loss.module().clone(), loss.gradient().clone())
                        .with_target(Target::Baseline);
                    for (compiled, target) in
                        [(&loss, Target::Native), (&baseline, Target::Baseline)]
                    {
                        match (&single, compiled.run(x32.view(), &labels, &options, true)) {
                            (Ok(s), Ok(b32)) => {
                                let (a_grad, s_grad) =
                                    (a.grad.as_ref().unwrap(), s.grad.as_ref().unwrap());
                                let loss_limit = 1e-4 + 2.0 * relative_loss_gap(s.loss, a.loss);
                                let grad_limit = 1e-4 + 2.0 * relative_gap(a_grad, s_grad);
                                let grad = b32.grad.as_ref().unwrap().mapv(f64::from);
                                let loss_gap = relative_loss_gap(b32.loss, s.loss);
                                let grad_gap = relative_gap(s_grad, &grad);
                                if loss_gap > loss_limit || grad_gap > grad_limit {
                                    failures.push(format!(
                                        "{name} on {label} in f32 ({target:?}): loss {loss_gap:.1e} (limit {loss_limit:.1e}), gradient {grad_gap:.1e} (limit {grad_limit:.1e})"
                                    ));
                                }
                                if classes.iter().all(|&c| c == 4 || c == 5) {
                                    check_evaluator(&name, b32.evaluator, &mut failures);
                                }
                            }
                            (a, b) => failures.push(format!(
                                "{name} on {label} in f32 ({target:?}): {a:?} vs {b:?}"
                            )),
                        }
                    }
                }
                (Err(a), Err(b)) => {
                    if a.to_string() != b.to_string() {
                        failures.push(format!("{name} on {label}: different errors: {a} / {b}"));
                    }
                }
                (a, b) => failures.push(format!("{name} on {label}: {a:?} vs {b:?}")),
            }
        }
    }
    assert!(compared > 150, "only {compared} comparisons succeeded");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The result does not depend on how anchors are split between threads.
/// A softmax scatter added over a whole row (no mask: the softmax is zero off its set)
/// must add nothing for an anchor whose set is empty and not skipped, where `1 / sum` is
/// infinite: semi_hard's semi-hard negatives of a singleton class, in both float types.
#[test]
fn an_empty_softmax_set_keeps_the_kernels() {
    let (x, labels) = batch_with_overlap(&[1, 4, 4, 4, 4, 4, 4, 4], 16, 77, 0.2, 0.4);
    let module = lower("semi_hard", &small_params("semi_hard", x.nrows(), 16));
    let gradient = losscc::grad::differentiate(&module).unwrap();
    let batch = Batch {
        x: x.view(),
        labels: &labels,
        inputs: &[],
        seed: 0,
    };
    let reference = evaluate_with_gradient(&gradient, &batch, Precision::F64).unwrap();
    let loss = Loss::new(module, gradient);
    let options = Options {
        threads: 2,
        seed: 0,
        inputs: &[],
    };
    let single = loss
        .run(x.mapv(|v| v as f32).view(), &labels, &options, true)
        .unwrap();
    let double = loss.run(x.view(), &labels, &options, true).unwrap();
    for (evaluator, loss_value, grad, limit) in [
        (
            single.evaluator,
            single.loss,
            single.grad.unwrap().mapv(f64::from),
            1e-4,
        ),
        (double.evaluator, double.loss, double.grad.unwrap(), 1e-10),
    ] {
        assert_eq!(evaluator, Evaluator::Jit);
        let gap = (loss_value - reference.loss).abs() / reference.loss.abs();
        assert!(gap < limit, "loss {loss_value} vs {}", reference.loss);
        let grad_gap = relative_gap(reference.grad.as_ref().unwrap(), &grad);
        assert!(grad_gap < limit, "gradient off by {grad_gap:.1e}");
    }
}

#[test]
fn thread_counts_give_identical_bits() {
    let (x, labels) = batch_with_overlap(&[4; 30], 16, 900, 0.2, 0.4);
    let x = x.mapv(|v| v as f32);
    let mut failures = Vec::new();
    for name in loss_names() {
        let params = small_params(&name, x.nrows(), 16);
        let module = lower(&name, &params);
        let loss = Loss::new(
            module.clone(),
            losscc::grad::differentiate(&module).unwrap(),
        );
        let run = |threads| {
            loss.run(
                x.view(),
                &labels,
                &Options {
                    threads,
                    seed: 1,
                    inputs: &[],
                },
                true,
            )
        };
        let one = run(1);
        for threads in [2, 3] {
            let other = run(threads);
            let same = match (&one, &other) {
                (Ok(a), Ok(b)) => {
                    a.loss.to_bits() == b.loss.to_bits()
                        && a.grad
                            .as_ref()
                            .unwrap()
                            .iter()
                            .zip(b.grad.as_ref().unwrap())
                            .all(|(p, q)| p.to_bits() == q.to_bits())
                }
                (Err(a), Err(b)) => a == b,
                _ => false,
            };
            if !same {
                failures.push(format!("{name}: 1 and {threads} threads differ"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A loss keeps the buffers of one call (tensors, matrices, adjoints, gradients) for the
/// next; a call finds nothing of the calls before it, whatever their shapes: each gives
/// the bits a freshly compiled loss gives.
#[test]
fn calls_before_leave_no_trace() {
    let batches: Vec<(Array2<f32>, Vec<i64>)> = [
        (&[4; 30][..], 900),
        (&[3; 20][..], 901),
        (&[4; 30][..], 902),
    ]
    .into_iter()
    .map(|(classes, seed)| {
        let (x, mut labels) = batch_with_overlap(classes, 16, seed, 0.2, 0.4);
        // Batches of one shape differ in their labels' layout too (one-hot labels, say).
        labels.rotate_left(seed as usize % 3);
        (x.mapv(|v| v as f32), labels)
    })
    .collect();
    let options = Options {
        threads: 2,
        seed: 1,
        inputs: &[],
    };
    let mut failures = Vec::new();
    for name in loss_names() {
        let module = lower(&name, &small_params(&name, 60, 16));
        let compile = || {
            Loss::new(
                module.clone(),
                losscc::grad::differentiate(&module).unwrap(),
            )
        };
        let bits = |loss: &Loss, (x, labels): &(Array2<f32>, Vec<i64>)| {
            loss.run(x.view(), labels, &options, true).map(|out| {
                let grad: Vec<u32> = out.grad.unwrap().iter().map(|v| v.to_bits()).collect();
                (out.loss.to_bits(), grad)
            })
        };
        let kept = compile();
        for (call, batch) in batches.iter().chain(&batches[..1]).enumerate() {
            if bits(&kept, batch) != bits(&compile(), batch) {
                failures.push(format!("{name}: call {call} differs from a fresh loss's"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A minimum, maximum or rank over a row that meets a NaN is NaN, whichever lane (or the
/// scalar tail) it falls in, and a mining that compares with it selects nothing: as in the
/// interpreter. Here `log(v)` is NaN wherever a similarity is negative, which some anchors'
/// rows have in a few columns and others in none.
#[test]
fn extremes_over_nan_match_the_interpreter() {
    let source = "loss nan_extremes() {
        s = dot(x)
        per anchor {
            neg = s where !same
            top = max(neg, log(v))
            low = min(neg, log(v))
            third = rank(neg, 2)
            above = neg where log(v) > top - 1
            below = neg where log(v) < low + 1
            near = neg where log(v) <= third
            term = sum(above) + count(below) + count(near)
        }
        loss = sum(term)
    }";
    let loss = Loss::compile(source, &vec![]).expect("compiles");
    let mut compared = 0;
    for (classes, seed) in [
        (vec![4; 6], 31),
        (vec![5, 4, 4, 4, 4, 5], 32),
        (vec![3; 9], 33),
    ] {
        let (mut x, labels) = batch_with_overlap(&classes, 6, seed, 0.0, 0.9);
        // All entries positive but a few: most rows meet no negative similarity.
        x.mapv_inplace(f64::abs);
        for (row, col) in [(2, 1), (9, 4), (13, 0), (20, 5)] {
            x[(row, col)] = -4.0;
        }
        for threads in [1, 2] {
            same_loss_both_ways(&loss, (&x, &labels), threads, &format!("{classes:?}"));
            compared += 1;
        }
    }
    assert_eq!(compared, 6);
}

/// A log-sum-exp sums its exponentials in the loop that finds its maximum, on a shift the
/// loop moves up when a member lies far above it; a sum with a moved shift is done again on
/// the maximum. The samples lie around a circle in order, so that each anchor's row climbs
/// from far below its maximum (at a scale of 100, by up to 200: the shift moves) or starts
/// near it (it does not), in vectors and in the scalar tail (50 columns); at a scale of 5
/// the shift never moves. Loss and gradient as the interpreter has them.
#[test]
fn a_log_sum_exp_on_a_moving_shift_matches_the_interpreter() {
    let n = 50;
    let angle = |i: usize| std::f64::consts::PI * (1.0 - i as f64 / (n - 1) as f64);
    let x = Array2::from_shape_fn((n, 2), |(i, k)| match k {
        0 => angle(i).cos(),
        _ => angle(i).sin(),
    });
    let labels: Vec<i64> = (0..n as i64).map(|i| i % 7).collect();
    for scale in [100.0, 5.0] {
        let source = format!(
            "loss moving_shift(scale = {scale}) {{
                s = dot(x)
                per anchor {{
                    neg = s where !same
                    term = lse(neg, scale * v)
                }}
                loss = sum(term)
            }}"
        );
        let loss = Loss::compile(&source, &vec![]).expect("compiles");
        for threads in [1, 2] {
            let case = format!("scale {scale}");
            let (reference, out) = same_loss_both_ways(&loss, (&x, &labels), threads, &case);
            let grads = (out.grad.as_ref(), reference.grad.as_ref());
            let (Some(grad), Some(expected)) = grads else {
                panic!("scale {scale}: a gradient is missing");
            };
            let gap = relative_gap(grad, expected);
            assert!(gap < 1e-10, "scale {scale}: the gradient is off by {gap:e}");
        }
    }
}

/// Batch-level selections of entries chosen by labels run in the kernels, filtered against
/// their cut: the smallest and the largest, none kept, one, some, all; the distances' ties
/// come in pairs (i, j), (j, i), which the cut splits by position. Loss and gradient as the
/// interpreter has them. A selection of entries chosen by value stays with the interpreter.
#[test]
fn batch_selections_run_against_their_cut() {
    let (x, labels) = batch_with_overlap(&[4, 3, 5, 4, 2, 6], 7, 43, 0.2, 0.4);
    // The counts are computed (a constant count must be positive), as fractions of the sets.
    for (a, b) in [
        (0.0, 0.3),
        (0.003, 0.0),
        (0.05, 0.2),
        (0.5, 0.7),
        (2.0, 2.0),
    ] {
        let source = format!(
            "loss cut_both(a = {a}, b = {b}) {{
                d = euclid(x)
                neg = d where !same
                pos = d where same
                near = smallest(neg, floor(a * count(neg)))
                far = largest(pos, floor(b * count(pos)))
                loss = sum(near, v * v) - 0.5 * sum(far)
            }}"
        );
        let loss = Loss::compile(&source, &vec![]).expect("compiles");
        for threads in [1, 3] {
            let case = format!("fractions {a} and {b}, {threads} threads");
            let (reference, out) = same_loss_both_ways(&loss, (&x, &labels), threads, &case);
            let gap = relative_gap(out.grad.as_ref().unwrap(), reference.grad.as_ref().unwrap());
            assert!(gap < 1e-10, "{case}: the gradient is off by {gap:e}");
        }
    }
    let by_value = "loss by_value() {
        d = euclid(x)
        loss = mean(smallest(d where v > 0.9, 5))
    }";
    let loss = Loss::compile(by_value, &vec![]).expect("compiles");
    let (reference, out) = both_ways(&loss, &x, &labels, 2);
    let (reference, out) = (reference.unwrap(), out.unwrap());
    assert_eq!(out.evaluator, Evaluator::Interpreter);
    assert_eq!(out.loss, reference.loss);
}

/// A rank the set does not have fails as in the interpreter, also where the row is ranked
/// whole (the kernels pad it to the row's length): 21 of a set of 20 in a row of 24. (The
/// rank is stopped, since its gradient would pick its member by position on another path,
/// and bounded, since an infinite loss would go to the interpreter anyway.)
#[test]
fn a_rank_beyond_the_members_fails_alike() {
    let source = "loss beyond(k = 21) {
        s = dot(x)
        per anchor {
            neg = s where !same
            th = stop(rank(neg, k))
            term = (if th > 5 then 5 else th) + sum(neg)
        }
        loss = sum(term)
    }";
    let (x, labels) = batch_with_overlap(&[4; 6], 5, 41, 0.0, 0.5);
    let loss = Loss::compile(source, &vec![]).expect("compiles");
    let (reference, compiled) = both_ways(&loss, &x, &labels, 2);
    let reference = reference.expect_err("no rank 21 among 20");
    let compiled = compiled.expect_err("fails");
    assert_eq!(compiled.to_string(), reference.to_string());
}

/// `loss` with its gradient on a batch (seed 0): by the float64 interpreter, and by the
/// compiled backend on `threads`.
fn both_ways(
    loss: &Loss,
    x: &Array2<f64>,
    labels: &[i64],
    threads: usize,
) -> (
    Result<losscc::interp::Output, RunError>,
    Result<losscc::runtime::engine::Output<f64>, RunError>,
) {
    let batch = Batch {
        x: x.view(),
        labels,
        inputs: &[],
        seed: 0,
    };
    let reference = evaluate_with_gradient(loss.gradient(), &batch, Precision::F64);
    let options = Options {
        threads,
        seed: 0,
        inputs: &[],
    };
    (reference, loss.run(x.view(), labels, &options, true))
}

/// [`both_ways`], both succeeding, the kernels' loss within 1e-12 of the interpreter's
/// (`case` names the batch in a failure).
fn same_loss_both_ways(
    loss: &Loss,
    (x, labels): (&Array2<f64>, &[i64]),
    threads: usize,
    case: &str,
) -> (losscc::interp::Output, losscc::runtime::engine::Output<f64>) {
    let (reference, out) = both_ways(loss, x, labels, threads);
    let reference = reference.expect("the interpreter evaluates it");
    let out = out.expect("runs");
    assert_kernels_loss(&out, &reference, case);
    (reference, out)
}

/// The kernels (not the interpreter) computed `out`, its loss within 1e-12 of the
/// reference's.
fn assert_kernels_loss(
    out: &losscc::runtime::engine::Output<f64>,
    reference: &losscc::interp::Output,
    case: &str,
) {
    assert_eq!(out.evaluator, Evaluator::Jit, "{case}");
    let gap = relative_loss_gap(out.loss, reference.loss);
    assert!(
        gap < 1e-12,
        "{case}: compiled {} against {}",
        out.loss,
        reference.loss
    );
}

/// Calls from several threads at once into one loss, each asking for two threads of the
/// pool (whose helpers wait for work), all finish, with the bits of a call made alone.
#[test]
fn concurrent_calls_finish_alike() {
    let (x, labels) = batch_with_overlap(&[4; 150], 64, 31, 0.2, 0.4);
    let x = x.mapv(|v| v as f32);
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for name in ["multi_similarity", "batch_all", "histogram"] {
            let module = lower(name, &small_params(name, x.nrows(), 64));
            let loss = Loss::new(
                module.clone(),
                losscc::grad::differentiate(&module).unwrap(),
            );
            let options = Options {
                threads: 2,
                seed: 0,
                inputs: &[],
            };
            let bits = |out: losscc::runtime::engine::Output<f32>| {
                let grad = out.grad.unwrap();
                let grad: Vec<u32> = grad.iter().map(|v| v.to_bits()).collect();
                (out.loss.to_bits(), grad)
            };
            let alone = bits(loss.run(x.view(), &labels, &options, true).unwrap());
            std::thread::scope(|scope| {
                for _ in 0..4 {
                    scope.spawn(|| {
                        for _ in 0..25 {
                            let out = loss.run(x.view(), &labels, &options, true).unwrap();
                            assert!(bits(out) == alone, "{name}: a concurrent call differs");
                        }
                    });
                }
            });
        }
        done.send(()).unwrap();
    });
    let outcome = finished.recv_timeout(std::time::Duration::from_secs(300));
    assert!(
        outcome.is_ok(),
        "concurrent calls did not finish within 300 s"
    );
}

/// The kernels draw the same samples as the interpreter: the same losses and gradients in
/// float64, for several seeds.
#[test]
fn sampling_losses_draw_the_same_samples() {
    let (x, labels) = batch_with_overlap(&[5; 8], 12, 33, 0.1, 0.4);
    for name in STOCHASTIC {
        let module = lower(name, &small_params(name, x.nrows(), 12));
        let gradient = losscc::grad::differentiate(&module).unwrap();
        let loss = Loss::new(module, gradient.clone());
        for seed in 0..5 {
            let batch = Batch {
                x: x.view(),
                labels: &labels,
                inputs: &[],
                seed,
            };
            let reference = evaluate_with_gradient(&gradient, &batch, Precision::F64).unwrap();
            let out = loss
                .run(
                    x.view(),
                    &labels,
                    &Options {
                        threads: 2,
                        seed,
                        inputs: &[],
                    },
                    true,
                )
                .unwrap();
            assert_kernels_loss(&out, &reference, &format!("{name} seed {seed}"));
            assert!(
                relative_gap(reference.grad.as_ref().unwrap(), out.grad.as_ref().unwrap()) < 1e-12,
                "{name} seed {seed}"
            );
        }
    }
}

/// Invalid input fails with the same error on both backends.
#[test]
fn invalid_input_fails_alike() {
    let module = lower("bin_deviance", &Vec::new());
    let loss = Loss::new(
        module,
        losscc::grad::differentiate(&lower("bin_deviance", &Vec::new())).unwrap(),
    );
    let options = Options {
        threads: 2,
        seed: 0,
        inputs: &[],
    };
    let mut x = Array2::<f64>::zeros((4, 3));
    x[(2, 1)] = f64::NAN;
    let labels = [0, 0, 1, 1];
    // (Compared as text: a NaN in the error is not equal to itself.)
    let jit = loss.run(x.view(), &labels, &options, true).unwrap_err();
    let interp = loss
        .interpret(x.view(), &labels, &options, true)
        .unwrap_err();
    assert_eq!(jit.to_string(), interp.to_string());
    assert!(jit.to_string().contains("x[2, 1] is NaN"), "{jit}");
    let jit = loss
        .run(
            Array2::<f64>::zeros((4, 3)).view(),
            &labels[..3],
            &options,
            true,
        )
        .unwrap_err();
    let interp = loss
        .interpret(
            Array2::<f64>::zeros((4, 3)).view(),
            &labels[..3],
            &options,
            true,
        )
        .unwrap_err();
    assert_eq!(jit, interp);
}

/// The kernels are built without Cranelift's verifier (it costs a tenth of the compile
/// time); this holds every kernel of every spec, forward and backward, in both float
/// types, to it.
#[test]
fn every_kernel_passes_the_verifier() {
    for name in loss_names() {
        let module = lower(&name, &Vec::new());
        let gradient = losscc::grad::differentiate(&module).unwrap();
        let plans = [
            losscc::opt::forward_plan(&module),
            losscc::opt::gradient_plan(&gradient),
        ];
        for plan in &plans {
            for precision in [Precision::F32, Precision::F64] {
                for target in [Target::Native, Target::Baseline] {
                    if let Err(e) = losscc::jit::emit_clif(plan, precision, target) {
                        panic!("{name} ({precision:?}, {target:?}): {e}");
                    }
                }
            }
        }
    }
}

/// Passes that differ only in what they read (one branch of a loss and the next) run one
/// compiled kernel: js_div_knn_softmax's four knn_softmax passes share theirs, and its six
/// passes over pairs of branches need at most two (the first pair adds into each branch's
/// own adjoint, the others into separately scaled ones).
#[test]
fn passes_alike_share_a_kernel() {
    let module = lower("js_div_knn_softmax", &Vec::new());
    let gradient = losscc::grad::differentiate(&module).unwrap();
    let plan = losscc::opt::gradient_plan(&gradient);
    let kernels = losscc::jit::compile(&plan, Precision::F32, Target::Native).unwrap();
    let codes: Vec<usize> = kernels.passes.iter().map(|p| p.code as usize).collect();
    assert_eq!(codes.len(), 10, "4 knn_softmax passes and 6 pair passes");
    let distinct = |codes: &[usize]| {
        let mut codes = codes.to_vec();
        codes.sort_unstable();
        codes.dedup();
        codes.len()
    };
    assert_eq!(distinct(&codes[..4]), 1, "{codes:x?}");
    assert!(distinct(&codes[4..]) <= 2, "{codes:x?}");
    assert_eq!(
        distinct(&codes),
        distinct(&codes[..4]) + distinct(&codes[4..])
    );
}
