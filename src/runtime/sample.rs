//! Reproducible weighted sampling without replacement.
//!
//! A loss that mines, say, `count` negatives per anchor row draws them "with
//! probability proportional to weight `w_j`, without replacement", like
//! `torch.multinomial(w, count, replacement=False)`. This module does that
//! reproducibly: the result depends only on the log-weights, `count` and the
//! `(seed, site, anchor)` triple that names the random stream, never on the
//! machine, thread count or evaluation order.
//!
//! # Algorithm: Gumbel-top-k
//!
//! Weights are passed as natural logarithms `l_j = ln w_j`, so huge weights
//! never overflow and `l_j = -inf` encodes `w_j = 0` (never drawn). For every
//! member `j = 0, 1, ..., n-1`, in index order, one uniform `u_j` in the open
//! interval `(0, 1)` is drawn and turned into a standard Gumbel variate
//! `G_j = -ln(-ln u_j)`. The key of member `j` is `k_j = l_j + G_j`, and the
//! result is the `count` members with the largest keys, largest first (equal
//! keys: lower index first).
//!
//! This is *exactly* sequential sampling without replacement: the arg-max of
//! `l_j + G_j` is member `j` with probability `w_j / W` (the Gumbel-max
//! trick), and conditioned on which member attains the maximum, the remaining
//! keys are again independent Gumbels shifted by their `l_j`, so the second
//! largest key is distributed like a fresh Gumbel-max draw over the remaining
//! members, and so on (Vieira 2014; Kool, van Hoof & Welling 2019,
//! "Stochastic Beams and Where to Find Them"). Hence the ordered pair
//! `(a, b)` comes first with probability `w_a / W * w_b / (W - w_a)`.
//!
//! # Reproducing the stream in another implementation
//!
//! * **Stream derivation** ([`stream`]): let `mix(z)` be the SplitMix64
//!   finaliser
//!   `z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31`
//!   (all arithmetic wrapping modulo 2^64) and `γ = 0x9E3779B97F4A7C15`, so
//!   that the `i`-th output (`i = 1, 2, ...`) of SplitMix64 started from state
//!   `s` is `mix(s + i·γ)`. Then
//!   1. `h = mix(seed + γ)` (first SplitMix64 output from `seed`);
//!   2. `t = h ^ ((site << 32) | anchor)` (`site`, `anchor` widened to 64 bits);
//!   3. `lo = mix(t + γ)`, `hi = mix(t + 2γ)` (first two outputs from `t`);
//!   4. the generator is PCG-64 MCG (`Mcg128Xsl64`, "XSL RR" output, 128-bit
//!      multiplier `0x2360ED051FC65DA44385DF649FCCF645`) with initial state
//!      `((hi << 64) | lo) | 1`, i.e. `rand_pcg::Pcg64Mcg::new((hi << 64) | lo)`.
//!
//!   For a fixed `seed`, distinct `(site, anchor)` pairs give distinct
//!   SplitMix64 states `t` and hence unrelated PCG states.
//! * **Uniforms**: each member consumes one 64-bit output `x` (also members
//!   with weight zero), mapped to `u = ((x >> 12) + 0.5) · 2^-52`, which is
//!   exact in `f64` and lies in `[2^-53, 1 - 2^-53]`, so both logarithms below
//!   are finite. A successful call consumes exactly `log_weights.len()`
//!   outputs (also when `count == 0`); a failing call consumes none.
//! * **Logarithm**: `ln` is computed by a port of fdlibm's `e_log.c`
//!   (below 1 ulp of error) that uses only IEEE `+ - * /` and bit
//!   manipulation, so keys are bit-identical on every platform rather than
//!   depending on the system `libm`.

use std::cmp::Ordering;

use rand_pcg::Pcg64Mcg;
use rand_pcg::rand_core::Rng;
use thiserror::Error;

/// Errors reported by [`sample_without_replacement`] and
/// [`WeightedSampler::sample`].
#[derive(Debug, Clone, Copy, PartialEq, Error)]
pub enum SampleError {
    /// A log-weight was NaN or `+inf` (an infinite weight has no
    /// proportional probability). `-inf` is valid and means weight zero.
    #[error(
        "log-weight of member {index} is {value}; log-weights must be finite, or -inf for weight zero"
    )]
    InvalidLogWeight {
        /// Position of the offending entry in the log-weight slice.
        index: usize,
        /// The offending log-weight.
        value: f64,
    },
}

/// SplitMix64 increment ("golden gamma"), `floor(2^64 / φ)` made odd.
const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 output finaliser (Stafford's "Mix13").
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A reproducible random stream for one `(seed, site, anchor)` triple.
///
/// `seed` is the user-visible seed, `site` identifies the call site (e.g. the
/// sampling statement within a loss) and `anchor` the anchor row. The
/// derivation (SplitMix64 mixing into a PCG-64 MCG state) is spelled out in
/// the [module documentation](self) so that other implementations can
/// reproduce it bit for bit.
#[must_use]
pub fn stream(seed: u64, site: u32, anchor: u32) -> Pcg64Mcg {
    let key = (u64::from(site) << 32) | u64::from(anchor);
    let t = mix64(seed.wrapping_add(GOLDEN_GAMMA)) ^ key;
    let lo = mix64(t.wrapping_add(GOLDEN_GAMMA));
    let hi = mix64(t.wrapping_add(GOLDEN_GAMMA.wrapping_mul(2)));
    Pcg64Mcg::new((u128::from(hi) << 64) | u128::from(lo))
}

/// Maps 64 random bits to a uniform in the open interval `(0, 1)`:
/// `((x >> 12) + 0.5) · 2^-52`, exact in `f64`, within `[2^-53, 1 - 2^-53]`.
fn open_unit(bits: u64) -> f64 {
    // Both operands are exact: (bits >> 12) < 2^52, so adding 0.5 needs at
    // most 53 significant bits, and the product is a power-of-two scaling.
    ((bits >> 12) as f64 + 0.5) * f64::EPSILON
}

/// A standard Gumbel variate `-ln(-ln u)` with `u = open_unit(bits)`.
fn gumbel(bits: u64) -> f64 {
    -ln(-ln(open_unit(bits)))
}

/// Natural logarithm of a positive, finite, normal `x`, bit-identical on every
/// platform (only IEEE `+ - * /` and bit manipulation; error below 1 ulp).
///
/// Port of the table-free logarithm of fdlibm / FreeBSD msun `e_log.c`,
/// restricted to the inputs this module produces: `open_unit` returns values
/// in `[2^-53, 1 - 2^-53]`, whose negated logarithms lie in
/// `[1.1e-16, 36.8]`; all are positive normal numbers.
///
/// Method: write `x = 2^k · (1 + f)` with `sqrt(2)/2 < 1 + f < sqrt(2)`; then
/// `ln x = k · ln 2 + ln(1 + f)`, where with `s = f / (2 + f)`,
/// `ln(1 + f) = f - (f²/2 - s · (f²/2 + R(s²)))` and `R` is a degree-14
/// Remez polynomial; `ln 2` is split into `LN2_HI + LN2_LO` so that
/// `k · LN2_HI` is exact.
///
/// ```text
/// Copyright (C) 1993 by Sun Microsystems, Inc. All rights reserved.
///
/// Developed at SunSoft, a Sun Microsystems, Inc. business.
/// Permission to use, copy, modify, and distribute this
/// software is freely granted, provided that this notice
/// is preserved.
/// ```
fn ln(x: f64) -> f64 {
    const LN2_HI: f64 = f64::from_bits(0x3FE6_2E42_FEE0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3DEA_39EF_3579_3C76);
    const LG1: f64 = f64::from_bits(0x3FE5_5555_5555_5593);
    const LG2: f64 = f64::from_bits(0x3FD9_9999_9997_FA04);
    const LG3: f64 = f64::from_bits(0x3FD2_4924_9422_9359);
    const LG4: f64 = f64::from_bits(0x3FCC_71C5_1D8E_78AF);
    const LG5: f64 = f64::from_bits(0x3FC7_4664_96CB_03DE);
    const LG6: f64 = f64::from_bits(0x3FC3_9A09_D078_C69F);
    const LG7: f64 = f64::from_bits(0x3FC2_F112_DF3E_5244);

    let bits = x.to_bits();
    // High word shifted so that the mantissa of `1 + f` lands in
    // [sqrt(2)/2, sqrt(2)); the overflow into the exponent field gives `k`.
    let hx = (bits >> 32) as u32 + (0x3FF0_0000 - 0x3FE6_A09E);
    let k = (hx >> 20) as i32 - 0x3FF;
    let hx = (hx & 0x000F_FFFF) + 0x3FE6_A09E;
    let reduced = f64::from_bits((u64::from(hx) << 32) | (bits & 0xFFFF_FFFF));

    let f = reduced - 1.0;
    let hfsq = 0.5 * f * f;
    let s = f / (2.0 + f);
    let z = s * s;
    let w = z * z;
    let t1 = w * (LG2 + w * (LG4 + w * LG6));
    let t2 = z * (LG1 + w * (LG3 + w * (LG5 + w * LG7)));
    let r = t2 + t1;
    let dk = f64::from(k);
    s * (hfsq + r) + dk * LN2_LO - hfsq + f + dk * LN2_HI
}

/// Ranking of `(key, index)` candidates: larger key first, then lower index.
///
/// Keys are finite (finite log-weight plus finite Gumbel, rounding saturates
/// at `f64::MAX`), so numeric comparison is a total order here, and `-0.0`
/// and `0.0` correctly compare equal.
fn by_rank(a: &(f64, usize), b: &(f64, usize)) -> Ordering {
    if a.0 > b.0 {
        Ordering::Less
    } else if a.0 < b.0 {
        Ordering::Greater
    } else {
        a.1.cmp(&b.1)
    }
}

/// Reusable, allocation-free (after warm-up) weighted sampler.
///
/// Holds the scratch buffers of the Gumbel-top-k selection. A sampler only
/// allocates when a call has more members than any previous call, so keeping
/// one per worker and calling [`sample`](Self::sample) for every anchor row
/// is allocation-free in steady state. Its contents never influence results.
#[derive(Debug, Clone, Default)]
pub struct WeightedSampler {
    /// `(key, index)` of every member with non-zero weight.
    candidates: Vec<(f64, usize)>,
    /// The drawn indices returned by the last call.
    drawn: Vec<usize>,
}

impl WeightedSampler {
    /// An empty sampler; buffers grow on first use.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// A sampler whose buffers already hold `members` entries, so calls with
    /// at most that many log-weights never allocate.
    #[must_use]
    pub fn with_capacity(members: usize) -> Self {
        Self {
            candidates: Vec::with_capacity(members),
            drawn: Vec::with_capacity(members),
        }
    }

    /// Draws `count` members without replacement, with probability
    /// proportional to `exp(log_weights[j])`, and returns their indices
    /// (positions into `log_weights`) in draw order.
    ///
    /// * A log-weight of `-inf` means weight zero: that member is never drawn.
    /// * If `count` exceeds the number of members with finite log-weight,
    ///   all of those are returned (a random permutation of them, still in
    ///   draw order); `count == 0` returns an empty slice.
    /// * On success exactly `log_weights.len()` outputs of `rng` are consumed
    ///   (one per member, in index order, also for weight-zero members).
    ///
    /// # Errors
    ///
    /// [`SampleError::InvalidLogWeight`] if some log-weight is NaN or `+inf`
    /// (the first such index is reported); `rng` is then left untouched.
    pub fn sample<R: Rng + ?Sized>(
        &mut self,
        log_weights: &[f64],
        count: usize,
        rng: &mut R,
    ) -> Result<&[usize], SampleError> {
        if let Some((index, &value)) = log_weights
            .iter()
            .enumerate()
            .find(|&(_, &l)| l.is_nan() || l == f64::INFINITY)
        {
            return Err(SampleError::InvalidLogWeight { index, value });
        }

        self.candidates.clear();
        for (index, &log_weight) in log_weights.iter().enumerate() {
            let g = gumbel(rng.next_u64());
            if log_weight > f64::NEG_INFINITY {
                self.candidates.push((log_weight + g, index));
            }
        }

        let take = count.min(self.candidates.len());
        if take < self.candidates.len() && take > 0 {
            self.candidates.select_nth_unstable_by(take - 1, by_rank);
        }
        let top = &mut self.candidates[..take];
        top.sort_unstable_by(by_rank);

        self.drawn.clear();
        self.drawn.extend(top.iter().map(|&(_, index)| index));
        Ok(&self.drawn)
    }
}

/// Draws `count` members without replacement, with probability proportional
/// to `exp(log_weights[j])`, returning their indices in draw order.
///
/// Convenience wrapper around [`WeightedSampler::sample`] (same semantics and
/// errors) that allocates its result; use a [`WeightedSampler`] on hot paths.
///
/// # Errors
///
/// [`SampleError::InvalidLogWeight`] if some log-weight is NaN or `+inf`.
pub fn sample_without_replacement<R: Rng + ?Sized>(
    log_weights: &[f64],
    count: usize,
    rng: &mut R,
) -> Result<Vec<usize>, SampleError> {
    WeightedSampler::new()
        .sample(log_weights, count, rng)
        .map(<[usize]>::to_vec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_pcg::rand_core::{Infallible, TryRng};

    /// Number of independent anchors in the goodness-of-fit tests.
    const DRAWS: u32 = 200_000;

    /// Upper 0.1 % quantiles of the chi-square distribution (p = 0.001),
    /// indexed by degrees of freedom (checked against mpmath's regularised
    /// upper incomplete gamma function).
    const CHI2_CRITICAL_P001: &[(usize, f64)] = &[(4, 18.467), (19, 43.820)];

    fn critical(df: usize) -> f64 {
        CHI2_CRITICAL_P001
            .iter()
            .find(|&&(d, _)| d == df)
            .map(|&(_, c)| c)
            .expect("degrees of freedom missing from the table")
    }

    /// Pearson's statistic `Σ (O - E)² / E` with `E = draws · p`.
    fn chi_square(observed: &[u64], probabilities: &[f64], draws: u32) -> f64 {
        observed
            .iter()
            .zip(probabilities)
            .map(|(&o, &p)| {
                let e = f64::from(draws) * p;
                (o as f64 - e).powi(2) / e
            })
            .sum()
    }

    /// An `Rng` returning the same word forever (to force equal keys).
    struct ConstRng(u64);

    impl TryRng for ConstRng {
        type Error = Infallible;

        fn try_next_u32(&mut self) -> Result<u32, Infallible> {
            Ok(self.0 as u32)
        }

        fn try_next_u64(&mut self) -> Result<u64, Infallible> {
            Ok(self.0)
        }

        fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
            dst.fill(self.0 as u8);
            Ok(())
        }
    }

    #[test]
    fn splitmix_finaliser_matches_reference_outputs() {
        // Reference SplitMix64 sequence for seed 1234567 (Vigna's splitmix64.c).
        let expected = [
            6_457_827_717_110_365_317_u64,
            3_203_168_211_198_807_973,
            9_817_491_932_198_370_423,
            4_593_380_528_125_082_431,
            16_408_922_859_458_223_821,
        ];
        let mut state = 1_234_567_u64;
        for want in expected {
            state = state.wrapping_add(GOLDEN_GAMMA);
            assert_eq!(mix64(state), want);
        }
    }

    /// First outputs of `stream(0, 0, 0)` (cross-checked against an independent
    /// Python implementation of the documented derivation).
    const GOLDEN_STREAM_0_0_0: [u64; 3] = [
        17_100_713_113_869_724_096,
        15_360_412_085_605_880_464,
        18_430_683_054_653_704_910,
    ];
    /// `sample_without_replacement(&[0.0; 6], 4, &mut stream(42, 1, 7))`.
    const GOLDEN_DRAW_42_1_7: [usize; 4] = [5, 0, 4, 3];

    #[test]
    fn stream_is_pinned() {
        // Golden values: changing them breaks reproducibility of saved runs.
        let mut rng = stream(0, 0, 0);
        let first: Vec<u64> = (0..3).map(|_| rng.next_u64()).collect();
        assert_eq!(first, GOLDEN_STREAM_0_0_0);
        let drawn = sample_without_replacement(&[0.0; 6], 4, &mut stream(42, 1, 7)).unwrap();
        assert_eq!(drawn, GOLDEN_DRAW_42_1_7);
    }

    #[test]
    fn identical_triples_give_identical_output() {
        let log_w = [0.3, -1.0, 2.0, f64::NEG_INFINITY, 0.0, 1.5, -0.2];
        for anchor in 0..100 {
            let a = sample_without_replacement(&log_w, 4, &mut stream(9, 3, anchor)).unwrap();
            let b = sample_without_replacement(&log_w, 4, &mut stream(9, 3, anchor)).unwrap();
            assert_eq!(a, b);
        }
    }

    #[test]
    fn distinct_triples_give_distinct_streams() {
        let mut firsts = Vec::new();
        for seed in [0, 1, 2, u64::MAX] {
            for site in [0, 1, 2, u32::MAX] {
                for anchor in 0..1000 {
                    firsts.push(stream(seed, site, anchor).next_u64());
                }
            }
        }
        let total = firsts.len();
        firsts.sort_unstable();
        firsts.dedup();
        assert_eq!(firsts.len(), total);

        // Neighbouring anchors also disagree on the sample itself.
        let log_w = [0.0; 10];
        let differing = (0..100)
            .filter(|&a| {
                sample_without_replacement(&log_w, 10, &mut stream(5, 0, a)).unwrap()
                    != sample_without_replacement(&log_w, 10, &mut stream(5, 0, a + 1)).unwrap()
            })
            .count();
        assert!(differing >= 95, "only {differing} of 100 neighbours differ");
    }

    #[test]
    fn uniforms_stay_inside_the_open_interval() {
        assert_eq!(open_unit(0), 2f64.powi(-53));
        assert_eq!(open_unit(u64::MAX), 1.0 - 2f64.powi(-53));
        assert!(gumbel(0).is_finite() && gumbel(u64::MAX).is_finite());
        assert!(gumbel(0) < gumbel(1 << 12) && gumbel(u64::MAX - (1 << 12)) < gumbel(u64::MAX));
    }

    #[test]
    fn portable_ln_is_within_one_ulp_of_std() {
        assert_eq!(ln(1.0), 0.0);
        assert_eq!(ln(2.0), std::f64::consts::LN_2);
        let mut rng = stream(1, 2, 3);
        let mut worst = 0;
        for i in 0..200_000 {
            let x = if i % 2 == 0 {
                -open_unit(rng.next_u64()).ln()
            } else {
                open_unit(rng.next_u64())
            };
            let ulps = ln(x).to_bits().abs_diff(x.ln().to_bits());
            worst = worst.max(ulps);
        }
        for x in [
            2f64.powi(-53),
            1.0 - 2f64.powi(-53),
            1e-16,
            36.8,
            0.5,
            0.999,
        ] {
            worst = worst.max(ln(x).to_bits().abs_diff(x.ln().to_bits()));
        }
        assert!(worst <= 1, "portable ln is {worst} ulps away from std");
    }

    #[test]
    fn count_one_matches_normalised_weights() {
        // Member 1 has weight zero and must never be drawn.
        let weights = [1.0, 0.0, 2.0, 3.0, 4.0, 10.0];
        let log_w: Vec<f64> = weights.iter().map(|w: &f64| w.ln()).collect();
        let total: f64 = weights.iter().sum();

        let mut sampler = WeightedSampler::new();
        let mut counts = [0_u64; 6];
        for anchor in 0..DRAWS {
            let drawn = sampler
                .sample(&log_w, 1, &mut stream(2024, 1, anchor))
                .unwrap();
            assert_eq!(drawn.len(), 1);
            counts[drawn[0]] += 1;
        }
        assert_eq!(counts[1], 0);

        let members = [0, 2, 3, 4, 5];
        let observed: Vec<u64> = members.iter().map(|&j| counts[j]).collect();
        let expected: Vec<f64> = members.iter().map(|&j| weights[j] / total).collect();
        let df = members.len() - 1;
        let stat = chi_square(&observed, &expected, DRAWS);
        println!(
            "count = 1: chi2 = {stat:.3}, df = {df}, critical(p=0.001) = {}",
            critical(df)
        );
        assert!(stat < critical(df), "chi2 = {stat} >= {}", critical(df));

        // Power check: the same counts decisively reject uniform sampling.
        let uniform = vec![1.0 / members.len() as f64; members.len()];
        assert!(chi_square(&observed, &uniform, DRAWS) > 100.0 * critical(df));
    }

    #[test]
    fn count_two_matches_ordered_pair_probabilities() {
        let weights = [1.0, 2.0, 0.0, 3.0, 4.0, 10.0];
        let log_w: Vec<f64> = weights.iter().map(|w: &f64| w.ln()).collect();
        let total: f64 = weights.iter().sum();
        let members = [0, 1, 3, 4, 5];
        let pairs: Vec<(usize, usize)> = members
            .iter()
            .flat_map(|&a| {
                members
                    .iter()
                    .filter(move |&&b| b != a)
                    .map(move |&b| (a, b))
            })
            .collect();

        let mut sampler = WeightedSampler::with_capacity(weights.len());
        let mut counts = vec![0_u64; pairs.len()];
        for anchor in 0..DRAWS {
            let drawn = sampler
                .sample(&log_w, 2, &mut stream(2024, 2, anchor))
                .unwrap();
            let pair = (drawn[0], drawn[1]);
            let slot = pairs.iter().position(|&p| p == pair);
            counts[slot.expect("drew a weight-zero member or a repeat")] += 1;
        }

        let exact: Vec<f64> = pairs
            .iter()
            .map(|&(a, b)| weights[a] / total * weights[b] / (total - weights[a]))
            .collect();
        assert!((exact.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        let df = pairs.len() - 1;
        let stat = chi_square(&counts, &exact, DRAWS);
        println!(
            "count = 2: chi2 = {stat:.3}, df = {df}, critical(p=0.001) = {}",
            critical(df)
        );
        assert!(stat < critical(df), "chi2 = {stat} >= {}", critical(df));

        // Power check: a symmetric "w_a · w_b" rule (a common mistake) is rejected.
        let naive_norm: f64 = pairs.iter().map(|&(a, b)| weights[a] * weights[b]).sum();
        let naive: Vec<f64> = pairs
            .iter()
            .map(|&(a, b)| weights[a] * weights[b] / naive_norm)
            .collect();
        assert!(chi_square(&counts, &naive, DRAWS) > 100.0 * critical(df));
    }

    #[test]
    fn weight_zero_members_are_never_drawn() {
        let log_w = [
            f64::NEG_INFINITY,
            0.0,
            f64::NEG_INFINITY,
            5.0,
            f64::NEG_INFINITY,
        ];
        for anchor in 0..1000 {
            let drawn = sample_without_replacement(&log_w, 2, &mut stream(3, 0, anchor)).unwrap();
            let mut sorted = drawn.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, [1, 3]);
        }
        let none = [f64::NEG_INFINITY; 4];
        assert!(
            sample_without_replacement(&none, 3, &mut stream(3, 0, 0))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn huge_log_weights_stay_finite_and_shift_invariant() {
        let base = [0.0, 2f64.ln(), -1.0, 0.5, f64::NEG_INFINITY, 1.0];
        let shifted: Vec<f64> = base.iter().map(|l| l + 1e3).collect();
        let lowered: Vec<f64> = base.iter().map(|l| l - 1e3).collect();
        for anchor in 0..2000 {
            let a = sample_without_replacement(&base, 3, &mut stream(11, 4, anchor)).unwrap();
            let b = sample_without_replacement(&shifted, 3, &mut stream(11, 4, anchor)).unwrap();
            let c = sample_without_replacement(&lowered, 3, &mut stream(11, 4, anchor)).unwrap();
            assert_eq!(a, b);
            assert_eq!(a, c);
        }
        // e^1000 dominates e^0 completely; extreme magnitudes do not overflow.
        for anchor in 0..1000 {
            let drawn =
                sample_without_replacement(&[0.0, 1e3, 0.0], 3, &mut stream(1, 1, anchor)).unwrap();
            assert_eq!(drawn[0], 1);
        }
        let extreme = [f64::MAX, -f64::MAX, 0.0];
        let drawn = sample_without_replacement(&extreme, 3, &mut stream(1, 1, 1)).unwrap();
        assert_eq!(drawn, [0, 2, 1]);
    }

    #[test]
    fn count_beyond_members_returns_every_member() {
        let log_w = [0.0, f64::NEG_INFINITY, 1.0, -3.0];
        for anchor in 0..200 {
            let drawn = sample_without_replacement(&log_w, 10, &mut stream(8, 8, anchor)).unwrap();
            let mut sorted = drawn.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, [0, 2, 3]);
            // Draw order is the prefix of the full ranking.
            let two = sample_without_replacement(&log_w, 2, &mut stream(8, 8, anchor)).unwrap();
            assert_eq!(two, drawn[..2]);
        }
    }

    #[test]
    fn zero_count_and_empty_input_give_empty_results() {
        assert!(
            sample_without_replacement(&[0.0, 1.0], 0, &mut stream(0, 0, 0))
                .unwrap()
                .is_empty()
        );
        assert!(
            sample_without_replacement(&[], 3, &mut stream(0, 0, 0))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn invalid_log_weights_are_errors_and_leave_rng_untouched() {
        for (bad, index) in [(f64::NAN, 2), (f64::INFINITY, 2)] {
            let log_w = [0.0, 1.0, bad, f64::NAN];
            let mut rng = stream(6, 6, 6);
            let err = sample_without_replacement(&log_w, 0, &mut rng).unwrap_err();
            assert!(matches!(err, SampleError::InvalidLogWeight { index: i, .. } if i == index));
            assert!(err.to_string().contains("member 2"));
            assert_eq!(rng.next_u64(), stream(6, 6, 6).next_u64());
        }
    }

    #[test]
    fn successful_calls_consume_one_output_per_member() {
        let log_w = [0.0, f64::NEG_INFINITY, 1.0];
        for count in [0, 1, 5] {
            let mut rng = stream(4, 4, 4);
            sample_without_replacement(&log_w, count, &mut rng).unwrap();
            let mut reference = stream(4, 4, 4);
            for _ in 0..log_w.len() {
                reference.next_u64();
            }
            assert_eq!(rng.next_u64(), reference.next_u64());
        }
    }

    #[test]
    fn equal_keys_rank_lower_index_first() {
        let drawn =
            sample_without_replacement(&[1.0, 2.0, 1.0, 2.0, 1.0], 5, &mut ConstRng(1 << 40))
                .unwrap();
        assert_eq!(drawn, [1, 3, 0, 2, 4]);
    }

    #[test]
    fn sampler_reuse_matches_and_does_not_reallocate() {
        let log_w: Vec<f64> = (0..64).map(|i| f64::from(i % 7) - 3.0).collect();
        let mut sampler = WeightedSampler::with_capacity(log_w.len());
        let buffers = |s: &WeightedSampler| {
            (
                s.candidates.as_ptr(),
                s.candidates.capacity(),
                s.drawn.as_ptr(),
                s.drawn.capacity(),
            )
        };
        let before = buffers(&sampler);
        for anchor in 0..100 {
            let fresh = sample_without_replacement(&log_w, 9, &mut stream(1, 9, anchor)).unwrap();
            let reused = sampler
                .sample(&log_w, 9, &mut stream(1, 9, anchor))
                .unwrap();
            assert_eq!(reused, fresh);
        }
        assert_eq!(buffers(&sampler), before);
    }
}
