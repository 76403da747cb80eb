//! The compiled backend against the interpreter.

mod common;

use common::*;
use losscc::interp::{Precision, evaluate_with_gradient};
use losscc::runtime::Batch;
use losscc::runtime::engine::{Evaluator, Loss, Options};

#[test]
fn jit_matches_interpreter_on_a_batch() {
    let (x, labels) = batch_with_overlap(&[4, 4, 4, 4, 4], 9, 77, 0.2, 0.3);
    let mut failures = Vec::new();
    for name in loss_names() {
        let module = lower(&name, &small_params(&name, x.nrows(), 9));
        let gradient = losscc::grad::differentiate(&module).unwrap();
        let batch = Batch {
            x: x.view(),
            labels: &labels,
            inputs: &[],
            seed: 9,
        };
        let reference = evaluate_with_gradient(&gradient, &batch, Precision::F64);
        let compiled = Loss::new(module, gradient);
        let options = Options {
            threads: 2,
            seed: 9,
            inputs: &[],
        };
        let jit = compiled.run(x.view(), &labels, &options, true);
        match (reference, jit) {
            (Ok(a), Ok(b)) => {
                let loss_error = (a.loss - b.loss).abs() / a.loss.abs().max(1e-300);
                let ga = a.grad.unwrap();
                let gb = b.grad.unwrap();
                let scale = ga.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-300);
                let grad_error = (&ga - &gb).iter().fold(0.0f64, |m, v| m.max(v.abs())) / scale;
                println!(
                    "{name}: {:?} loss {loss_error:.1e} grad {grad_error:.1e}",
                    b.evaluator
                );
                if loss_error > 1e-10 || grad_error > 1e-10 {
                    failures.push(format!(
                        "{name}: loss {loss_error:.2e}, grad {grad_error:.2e}"
                    ));
                }
                if b.evaluator != Evaluator::Jit && name != "gaussian_metric" {
                    failures.push(format!("{name}: fell back to the interpreter"));
                }
            }
            (Err(a), Err(b)) => println!("{name}: both fail: {a} / {b}"),
            (a, b) => failures.push(format!("{name}: {a:?} vs {b:?}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn each_spec_compiles() {
    let mut failures = Vec::new();
    for name in loss_names() {
        let module = lower(&name, &small_params(&name, 20, 9));
        let gradient = losscc::grad::differentiate(&module).unwrap();
        for with_gradient in [false, true] {
            let plan = if with_gradient {
                losscc::opt::gradient_plan(&gradient)
            } else {
                losscc::opt::forward_plan(&module)
            };
            let result = std::panic::catch_unwind(|| {
                losscc::jit::compile(&plan, Precision::F64).map(|_| ())
            });
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failures.push(format!("{name} (gradient {with_gradient}): {e}")),
                Err(_) => failures.push(format!("{name} (gradient {with_gradient}): panicked")),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
