//! Embedding losscc in Rust training code: compile a loss once, then call it every step.
//!
//! Here the "model" is the embedding matrix itself: a few steps of gradient descent on
//! random unit vectors under the Multi-Similarity loss pull each class together.
//! Run with `cargo run --release --example embed`.

use losscc::Loss;
use ndarray::Array2;

fn main() -> Result<(), losscc::Error> {
    // The shipped Multi-Similarity spec, from the library built into losscc.
    let spec = losscc::library::find("multi_similarity").expect("a shipped loss");
    let loss = Loss::compile(spec, &vec![])?;

    // 64 samples of 16 classes, 32 dimensions, seeded.
    let (n, d, per_class) = (64, 32, 4);
    let (x, labels) = losscc::runtime::synthetic::clustered_batch(n, d, per_class, 7);
    let mut x: Array2<f32> = x.mapv(|v| v as f32);
    let rate = 2.0f32;
    for step in 0..15 {
        let out = loss.forward_backward(x.view(), &labels)?;
        println!(
            "step {step:2}: loss {:.5}, skipped anchors {:.2}",
            out.loss,
            stat(&out.stats, "skipped")
        );
        let grad = out.grad.expect("forward_backward returns dL/dx");
        x.zip_mut_with(&grad, |v, g| *v -= rate * g);
        // Keep the embeddings on the unit sphere, as a normalisation layer would.
        for mut row in x.rows_mut() {
            let norm = row.dot(&row).sqrt();
            row.mapv_inplace(|v| v / norm);
        }
    }
    Ok(())
}

fn stat(stats: &[(String, f64)], name: &str) -> f64 {
    stats
        .iter()
        .find(|(n, _)| n == name)
        .map_or(f64::NAN, |(_, v)| *v)
}
