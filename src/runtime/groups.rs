//! Evaluating groupings: classes, k-means clusters, supplied groups, splits by label.

use super::batch::Batch;
use super::error::RunError;
use super::kmeans::{KMeansError, kmeans_on};
use super::real::Real;
use crate::ir::{Grouping, Handle, Module, Tensor};
use ndarray::{Array2, ArrayView2};

/// One grouping of the samples.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupValues {
    /// The group of each sample.
    pub of_sample: Vec<usize>,
    /// The label of each group, when the groups have labels.
    pub labels: Option<Vec<i64>>,
    /// How many samples each group has.
    pub sizes: Vec<usize>,
}

impl GroupValues {
    pub fn count(&self) -> usize {
        self.sizes.len()
    }

    /// The members of every group, in index order, group after group, and where each
    /// group's start (`starts[g]..starts[g + 1]`): what a loop over one group reads.
    pub fn member_lists(&self) -> (Vec<u32>, Vec<u32>) {
        let mut starts = vec![0u32; self.count() + 1];
        for &g in &self.of_sample {
            starts[g + 1] += 1;
        }
        for g in 0..self.count() {
            starts[g + 1] += starts[g];
        }
        let mut next = starts.clone();
        let mut members = vec![0u32; self.of_sample.len()];
        for (sample, &g) in self.of_sample.iter().enumerate() {
            members[next[g] as usize] = sample as u32;
            next[g] += 1;
        }
        (starts, members)
    }

    fn from_keys<K: Ord + Copy>(keys: &[K], label: impl Fn(K) -> Option<i64>) -> GroupValues {
        let mut distinct: Vec<K> = keys.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let of_sample: Vec<usize> = keys
            .iter()
            .map(|k| distinct.binary_search(k).unwrap_or(0))
            .collect();
        let mut sizes = vec![0; distinct.len()];
        for &g in &of_sample {
            sizes[g] += 1;
        }
        let labels: Option<Vec<i64>> = distinct.iter().map(|&k| label(k)).collect();
        GroupValues {
            of_sample,
            labels,
            sizes,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GroupError {
    #[error("k-means: {0}")]
    KMeans(#[from] KMeansError),
}

/// Evaluates every grouping of the module. `features` writes the values of a tensor (the
/// k-means features), computed by the caller's backend, into `points` (reshaping it if
/// need be), where k-means scales them in place; k-means runs on `threads`.
pub fn evaluate_groupings<F: Real>(
    module: &Module,
    batch: &Batch<'_, F>,
    (points, threads): (&mut Array2<f64>, usize),
    mut features: impl FnMut(Handle<Tensor>, &[GroupValues], &mut Array2<f64>),
) -> Result<Vec<GroupValues>, GroupError> {
    let mut values: Vec<GroupValues> = Vec::with_capacity(module.groupings.len());
    for (_, grouping) in module.groupings.iter() {
        let value = match grouping {
            Grouping::Labels => GroupValues::from_keys(batch.labels, Some),
            Grouping::Input { name, default } => match batch.input(name) {
                Some(groups) => GroupValues::from_keys(groups, |_| None),
                None => values[default.index()].clone(),
            },
            Grouping::KMeans {
                features: tensor,
                clusters,
                site,
            } => {
                features(*tensor, &values, points);
                let assignment = kmeans_on(points, *clusters, mix(batch.seed, *site), threads)?;
                GroupValues::from_keys(&assignment, |_| None)
            }
            Grouping::SplitByLabel { groups } => {
                let inner = &values[groups.index()];
                let keys: Vec<(usize, i64)> = inner
                    .of_sample
                    .iter()
                    .zip(batch.labels)
                    .map(|(&g, &label)| (g, label))
                    .collect();
                GroupValues::from_keys(&keys, |(_, label)| Some(label))
            }
        };
        values.push(value);
    }
    Ok(values)
}

/// The seed of the random draw at `site`: distinct sites get unrelated streams.
pub fn mix(seed: u64, site: u32) -> u64 {
    let mut z = seed ^ (u64::from(site).wrapping_add(1)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The column permutation of a seeded partition: a Fisher-Yates shuffle of `0..cols`.
fn permutation(cols: usize, seed: u64, site: u32) -> Vec<usize> {
    use rand_pcg::rand_core::Rng;
    let mut rng = super::sample::stream(seed, site, u32::MAX);
    let mut order: Vec<usize> = (0..cols).collect();
    for i in (1..cols).rev() {
        let j = ((u128::from(rng.next_u64()) * (i as u128 + 1)) >> 64) as usize;
        order.swap(i, j);
    }
    order
}

/// The columns of part `part` when `cols` columns, permuted by the stream of `seed` and
/// `site`, are cut into parts of `sizes`.
pub fn partition_columns(
    cols: usize,
    sizes: &[usize],
    part: usize,
    (seed, site): (u64, u32),
) -> Vec<usize> {
    let order = permutation(cols, seed, site);
    let start: usize = sizes[..part].iter().sum();
    order[start..start + sizes[part]].to_vec()
}

/// Columns `start..end` of `a`, the source of `tensor`.
pub fn column_range<T>(
    a: &Array2<T>,
    start: usize,
    end: usize,
    tensor: Handle<Tensor>,
) -> Result<ArrayView2<'_, T>, RunError> {
    if end > a.ncols() {
        return Err(RunError::ColumnsOutOfRange {
            start,
            end,
            cols: a.ncols(),
            tensor,
        });
    }
    Ok(a.slice(ndarray::s![.., start..end]))
}

/// The columns, in order, of part `part` of the `cols` columns of `tensor`'s source,
/// permuted by the stream of `seed` and `site` and cut into parts of `sizes`.
pub fn column_part(
    cols: usize,
    sizes: &[usize],
    part: usize,
    (seed, site): (u64, u32),
    tensor: Handle<Tensor>,
) -> Result<Vec<usize>, RunError> {
    let sum: usize = sizes.iter().sum();
    if sum != cols {
        return Err(RunError::PartitionWidth { sum, cols, tensor });
    }
    Ok(partition_columns(cols, sizes, part, (seed, site)))
}
