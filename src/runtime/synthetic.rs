//! Seeded synthetic batches: the demo batch of `losscc run` and the batch of `losscc bench`.

use super::sample::stream;
use ndarray::Array2;
use rand_pcg::rand_core::Rng;

/// `n` unit-length rows of dimension `d`, `per_class` consecutive rows per class, each
/// class a random direction plus Gaussian noise of the same scale, so that positives are
/// markedly more similar than negatives. The same arguments give the same batch on every
/// machine.
pub fn clustered_batch(n: usize, d: usize, per_class: usize, seed: u64) -> (Array2<f64>, Vec<i64>) {
    let per_class = per_class.max(1);
    let classes = n.div_ceil(per_class);
    let mut rng = stream(seed, u32::MAX - 1, 0);
    let mut gaussian = move || {
        // Box-Muller on two uniforms in (0, 1].
        let u = ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let v = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    };
    let centres = Array2::from_shape_simple_fn((classes, d), &mut gaussian);
    let noise = 2.5;
    let mut x = Array2::from_shape_fn((n, d), |(i, k)| centres[(i / per_class, k)]);
    x.mapv_inplace(|v| v + noise * gaussian());
    for mut row in x.rows_mut() {
        let norm = row.dot(&row).sqrt();
        if norm > 0.0 {
            row.mapv_inplace(|v| v / norm);
        }
    }
    let labels = (0..n).map(|i| (i / per_class) as i64).collect();
    (x, labels)
}
