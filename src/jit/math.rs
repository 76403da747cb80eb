//! Inline, branch-free transcendental functions emitted as Cranelift IR.
//!
//! [`MathBuilder`] appends the instructions computing `exp`, `ln`, `log1p`,
//! `softplus` and `sigmoid` of a value to the block a
//! [`FunctionBuilder`] is positioned in. The value may be an `f32`, `f64`,
//! `f32x4` or `f64x2`; one generic code path serves all four, parameterised by
//! the lane precision, and vectors are handled lane-wise: special cases are
//! resolved with `select`/`bitselect`, never with branches.
//!
//! # Algorithms
//!
//! * `exp`: Cody–Waite reduction `x = k ln2 + r` with `|r| <= ln2/2` (`k` is
//!   rounded with the `1.5 * 2^p` "magic number" trick, which also leaves `k`
//!   as an integer in the low mantissa bits). For `f64`, `r` is kept to double
//!   precision as `r + r_lo` and `exp(r) = (1 + r) + (r_lo + r^2 Q(r))` with
//!   `1 + r` split exactly; for `f32`, plainly `1 + (r + r^2 Q(r))` (within
//!   1 ulp all the same, and much cheaper in the kernels' loops). `Q` is
//!   near-minimax, of degree 5 for `f32` and 10 for `f64`. The result is scaled
//!   by `2^k` as two factors
//!   `2^(k/2) * 2^(k - k/2)` built in the exponent bits, so that no factor
//!   overflows on its own and subnormal results are produced by one final
//!   rounding (gradual underflow, no flush to zero).
//! * `ln`: subnormal inputs are first scaled by `2^p`; the bits are split into
//!   `x = 2^k (1 + f)` with `1 + f` in `[sqrt(1/2), sqrt(2))`, and with
//!   `s = f / (2 + f)`: `ln(1 + f) = f - f^2/2 + s (f^2/2 + s^2 G(s^2))`, with a
//!   near-minimax `G` (degree 3 for `f32`, 6 for `f64`); `k ln2` is added in
//!   two parts.
//! * `log1p`: the same on `u = 1 + x`, except that `f = x` exactly when
//!   `k = 0`, and otherwise the rounding error of `u` is added back as
//!   `(x - (u - 1)) / u`.
//! * `softplus(x) = max(x, 0) + log1p(exp(-|x|))`, which neither overflows nor
//!   loses the tiny result `exp(x)` for very negative `x`.
//! * `sigmoid(x) = n / (1 + exp(-|x|))` with `n = 1` for `x >= 0` and
//!   `n = exp(-|x|)` otherwise, corrected for the rounding of the
//!   denominator.
//!
//! Polynomials are evaluated by Estrin's scheme (short dependency chains, so
//! that consecutive loop iterations overlap). `fma` is used for every
//! multiply-add when the target ISA has a native fused multiply-add
//! ([`TargetIsa::has_native_fma`]), plain `fmul` + `fadd` otherwise; both
//! paths meet the accuracy below.
//!
//! # Accuracy and special values
//!
//! Over the whole input range, subnormal inputs and outputs included, and for
//! all four types with and without `fma` (see the tests):
//!
//! * `exp`, `exp_bounded` (on its domain), `ln`, `log1p`: at most 1 ulp
//!   from Rust's `std` (`exp`, `ln`, `ln_1p`); checked exhaustively for `f32`
//!   (ignored test `exhaustive_f32`), by sampling for `f64`.
//! * `softplus`, `sigmoid`: at most 2 ulp from the correctly rounded result
//!   (errors of at most about 1.5 and 1.8 ulp before rounding); softplus is
//!   checked exhaustively for `f32` too, against its formula in `f64`.
//!
//! Special values follow `std`:
//!
//! | function   | `-inf` | `+inf` | NaN | other                                    |
//! |------------|--------|--------|-----|------------------------------------------|
//! | `exp`      | 0      | inf    | NaN | overflow gives inf, underflow gives 0    |
//! | `ln`       | NaN    | inf    | NaN | `ln(±0) = -inf`, `ln(x < 0) = NaN`        |
//! | `log1p`    | NaN    | inf    | NaN | `log1p(-1) = -inf`, `log1p(x < -1) = NaN` |
//! | `softplus` | 0      | inf    | NaN |                                          |
//! | `sigmoid`  | 0      | 1      | NaN |                                          |
//!
//! The sign of a zero result is not specified (`log1p(-0.0)` is `+0.0`).

use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::types::{F32, F32X4, F64, F64X2};
use cranelift_codegen::ir::{InstBuilder, MemFlagsData, Type, Value};
use cranelift_codegen::isa::TargetIsa;
use cranelift_frontend::FunctionBuilder;

use super::constants::Constants;

/// The largest argument [`MathBuilder::exp_bounded`] takes: its scaling by `2^(k + 64)`
/// then stays normal in f32 (`k <= 58`).
pub const EXP_BOUNDED_MAX: f64 = 40.0;

/// Emits inline transcendental functions into Cranelift functions.
///
/// Every method takes the value to transform, reads its type (`f32`, `f64`,
/// `f32x4` or `f64x2`) and returns a value of the same type. The instructions
/// are appended at the builder's current position; no block, branch, stack
/// slot or call is created. Vector constants come from `constants` (see
/// [`super::constants`]) when it has them.
///
/// # Panics
///
/// Every method panics if the value has any other type (see
/// [`MathBuilder::supports`]).
#[derive(Clone, Copy, Debug)]
pub struct MathBuilder {
    fma: bool,
}

impl MathBuilder {
    /// A builder for code that will run on `isa`: multiply-adds are fused
    /// exactly when `isa` has a native `fma`.
    pub fn new(isa: &dyn TargetIsa) -> Self {
        Self {
            fma: isa.has_native_fma(),
        }
    }

    /// Whether the emitted code uses the `fma` instruction.
    pub fn uses_fma(&self) -> bool {
        self.fma
    }

    /// Whether values of type `ty` are supported: `f32`, `f64`, `f32x4`,
    /// `f64x2`.
    pub fn supports(ty: Type) -> bool {
        [F32, F64, F32X4, F64X2].contains(&ty)
    }

    /// `e^x`.
    pub fn exp(&self, b: &mut FunctionBuilder<'_>, x: Value, constants: Constants<'_>) -> Value {
        self.emitter(b, x, constants).exp(x)
    }

    /// `e^x` for `x <= EXP_BOUNDED_MAX` (or NaN): the shifted exponentials of a
    /// log-sum-exp, whose shift is the maximum or not far below it. Other `x` give
    /// unspecified results (a masked lane's).
    pub fn exp_bounded(
        &self,
        b: &mut FunctionBuilder<'_>,
        x: Value,
        constants: Constants<'_>,
    ) -> Value {
        self.emitter(b, x, constants)
            .exp_scaled(x, Scaling::Bounded)
    }

    /// Natural logarithm of `x`.
    pub fn ln(&self, b: &mut FunctionBuilder<'_>, x: Value, constants: Constants<'_>) -> Value {
        self.emitter(b, x, constants).ln(x)
    }

    /// `ln(1 + x)`, accurate for tiny `x`.
    pub fn log1p(&self, b: &mut FunctionBuilder<'_>, x: Value, constants: Constants<'_>) -> Value {
        self.emitter(b, x, constants).log1p(x)
    }

    /// `ln(1 + e^x)`, without overflow for large `x` and without underflow to
    /// 0 before `e^x` itself does.
    pub fn softplus(
        &self,
        b: &mut FunctionBuilder<'_>,
        x: Value,
        constants: Constants<'_>,
    ) -> Value {
        self.emitter(b, x, constants).softplus(x)
    }

    /// The logistic function `1 / (1 + e^-x)`.
    pub fn sigmoid(
        &self,
        b: &mut FunctionBuilder<'_>,
        x: Value,
        constants: Constants<'_>,
    ) -> Value {
        self.emitter(b, x, constants).sigmoid(x)
    }

    fn emitter<'a, 'f, 't>(
        &self,
        b: &'a mut FunctionBuilder<'f>,
        x: Value,
        constants: Constants<'t>,
    ) -> Emitter<'a, 'f, 't> {
        let ty = b.func.dfg.value_type(x);
        assert!(
            Self::supports(ty),
            "MathBuilder: unsupported type {ty} (expected f32, f64, f32x4 or f64x2)"
        );
        let fmt = if ty.lane_type() == F32 {
            &BINARY32
        } else {
            &BINARY64
        };
        Emitter {
            b,
            fma: self.fma,
            ty,
            fmt,
            constants,
        }
    }
}

/// The constants of one floating-point format. Every value is exactly
/// representable in that format.
struct Format {
    /// Explicit mantissa bits.
    mant_bits: i64,
    /// Exponent bias.
    bias: i64,
    /// `1.5 * 2^mant_bits`: adding it to `|t| < 2^(mant_bits - 1)` rounds `t`
    /// to an integer, which then sits in the low mantissa bits of the sum.
    round_magic: f64,
    /// Bits of the format's nearest value to `sqrt(1/2)`.
    sqrt_half_bits: i64,
    /// Bits of `1.0`.
    one_bits: i64,
    /// Smallest positive normal number.
    min_normal: f64,
    /// `exp` returns 0 for inputs below this bound and inf above `exp_hi`;
    /// the clamp keeps `k` within the two-factor scaling's range.
    exp_lo: f64,
    exp_hi: f64,
    log2_e: f64,
    /// `ln 2 = ln2_hi + ln2_lo`, where `ln2_hi` has so few significant bits
    /// that `k * ln2_hi` is exact for every `k` that occurs.
    ln2_hi: f64,
    ln2_lo: f64,
    /// Whether `exp` carries what the reduction and `1 + r` lose in a second word. Float32
    /// does without: the exhaustive test holds it within 1 ulp of `std` all the same, and a
    /// kernel with two exponentials per member ran in less than half the time (a_hard_pair:
    /// 5.6 -> 2.5 ms).
    exp_compensated: bool,
    /// `Q(r) ~ (e^r - 1 - r) / r^2` on `|r| <= ln2/2`, ascending powers.
    exp_poly: &'static [f64],
    /// `G(z) ~ (ln((1+s)/(1-s)) - 2s) / s^3` with `z = s^2`, on
    /// `0 <= z <= (3 - 2 sqrt 2)^2`, ascending powers.
    ln_poly: &'static [f64],
}

// The polynomial coefficients are Chebyshev interpolants of the functions
// named above (computed with 60-digit arithmetic), rounded to the format.
const BINARY32: Format = Format {
    mant_bits: 23,
    bias: 127,
    round_magic: 12_582_912.0,
    sqrt_half_bits: 0x3f35_04f3,
    one_bits: 0x3f80_0000,
    min_normal: f32::MIN_POSITIVE as f64,
    exp_lo: -104.0,
    exp_hi: 89.0,
    log2_e: std::f32::consts::LOG2_E as f64,
    ln2_hi: 0.693_115_234_375,
    ln2_lo: 3.194_618_329_871_446e-5,
    exp_compensated: false,
    exp_poly: &[
        0.5,
        0.166_666_671_633_720_4,
        0.041_666_455_566_883_09,
        0.008_333_309_553_563_595,
        0.001_393_454_847_857_356,
        0.000_198_919_893_591_664_73,
    ],
    ln_poly: &[
        0.666_666_686_534_881_6,
        0.400_001_257_658_004_76,
        0.285_503_983_497_619_63,
        0.233_419_433_236_122_13,
    ],
};

const BINARY64: Format = Format {
    mant_bits: 52,
    bias: 1023,
    round_magic: 6_755_399_441_055_744.0,
    sqrt_half_bits: 0x3fe6_a09e_667f_3bcd,
    one_bits: 0x3ff0_0000_0000_0000,
    min_normal: f64::MIN_POSITIVE,
    exp_lo: -746.0,
    exp_hi: 710.0,
    log2_e: std::f64::consts::LOG2_E,
    ln2_hi: 0.693_147_180_369_123_8,
    ln2_lo: 1.908_214_929_270_587_7e-10,
    exp_compensated: true,
    exp_poly: &[
        0.5,
        0.166_666_666_666_666_7,
        0.041_666_666_666_666_67,
        0.008_333_333_333_325_539,
        0.001_388_888_888_888_332_3,
        0.000_198_412_698_768_806_4,
        2.480_158_732_701_881_5e-5,
        2.755_725_281_326_45e-6,
        2.755_727_179_575_745_4e-7,
        2.510_628_299_752_617e-8,
        2.091_544_819_909_718_6e-9,
    ],
    ln_poly: &[
        0.666_666_666_666_667,
        0.399_999_999_998_932_2,
        0.285_714_286_288_109_96,
        0.222_222_106_742_385_16,
        0.181_829_225_135_159_42,
        0.153_306_173_067_433_05,
        0.146_300_313_641_228_6,
    ],
};

/// Emits the instructions for one value type.
struct Emitter<'a, 'f, 't> {
    b: &'a mut FunctionBuilder<'f>,
    fma: bool,
    /// The float type operated on (scalar or vector).
    ty: Type,
    fmt: &'static Format,
    constants: Constants<'t>,
}

/// How `exp` scales its reduced result `y` by `2^k`.
#[derive(Clone, Copy, PartialEq)]
enum Scaling {
    /// Any `x`: `2^k` as two factors, each a normal number over the whole range.
    Any,
    /// `x <= EXP_BOUNDED_MAX`, `k <= 58`: `2^(k + 64)` is normal from the smallest
    /// subnormal result up (to `2^122`, below f32's largest power `2^127`), and `2^-64` a
    /// constant.
    Bounded,
}

impl Emitter<'_, '_, '_> {
    fn exp(&mut self, x: Value) -> Value {
        self.exp_scaled(x, Scaling::Any)
    }

    fn exp_scaled(&mut self, x: Value, scaling: Scaling) -> Value {
        let f = self.fmt;
        // A bounded x needs no upper clamp (an instruction and a constant fewer in the
        // log-sum-exp loops).
        let x = match scaling {
            Scaling::Any => self.min_keep_nan(x, f.exp_hi),
            Scaling::Bounded => x,
        };
        let x = self.max_keep_nan(x, f.exp_lo);
        // k = round(x / ln2), as a float (`kf`) and in the low bits of `kbig` (with FMA, of
        // the exact product: one rounding and one instruction fewer on the chain).
        let log2_e = self.fconst(f.log2_e);
        let magic = self.fconst(f.round_magic);
        let kbig = self.mul_add(x, log2_e, magic);
        let kf = self.b.ins().fsub(kbig, magic);
        // r + r_lo = x - k ln2, where x - k ln2_hi is exact and r_lo holds
        // what rounding r lost.
        let neg_ln2_hi = self.fconst(-f.ln2_hi);
        let r_hi = self.mul_add(kf, neg_ln2_hi, x);
        let y = if f.exp_compensated {
            let ln2_lo = self.fconst(f.ln2_lo);
            let k_lo = self.b.ins().fmul(kf, ln2_lo);
            let r = self.b.ins().fsub(r_hi, k_lo);
            let lost = self.b.ins().fsub(r_hi, r);
            let r_lo = self.b.ins().fsub(lost, k_lo);
            // e^(r + r_lo) = (1 + r) + (r_lo + r^2 Q(r)), with 1 + r = hi + lo
            // split exactly, so that only the final addition rounds noticeably.
            let one = self.fconst(1.0);
            let hi = self.b.ins().fadd(one, r);
            let hi_r = self.b.ins().fsub(hi, one);
            let lo = self.b.ins().fsub(r, hi_r);
            let q = self.poly(r, f.exp_poly);
            let r2 = self.b.ins().fmul(r, r);
            let tail = self.b.ins().fadd(lo, r_lo);
            let tail = self.mul_add(r2, q, tail);
            self.b.ins().fadd(hi, tail)
        } else {
            // e^r = 1 + (r + r^2 Q(r)), rounded twice.
            let neg_ln2_lo = self.fconst(-f.ln2_lo);
            let r = self.mul_add(kf, neg_ln2_lo, r_hi);
            let q = self.poly(r, f.exp_poly);
            let r2 = self.b.ins().fmul(r, r);
            let t = self.mul_add(r2, q, r);
            let one = self.fconst(1.0);
            self.b.ins().fadd(one, t)
        };
        let magic_bits = self.iconst(self.const_bits(f.round_magic));
        let kbits = self.bitcast_int(kbig);
        let k = self.b.ins().isub(kbits, magic_bits);
        if scaling == Scaling::Bounded {
            let s = self.pow2(k, 64);
            let y = self.b.ins().fmul(y, s);
            let drop = self.fconst(2f64.powi(-64));
            return self.b.ins().fmul(y, drop);
        }
        // y 2^k, as y 2^k1 2^k2 with k1 = floor(k/2), k2 = k - k1.
        let k1 = self.b.ins().sshr_imm_u(k, 1);
        let k2 = self.b.ins().isub(k, k1);
        let s1 = self.pow2(k1, 0);
        let s2 = self.pow2(k2, 0);
        let y = self.b.ins().fmul(y, s1);
        self.b.ins().fmul(y, s2)
    }

    fn ln(&mut self, x: Value) -> Value {
        let (kf, f) = self.reduce(x, true);
        let y = self.log_reduced(kf, f, None);
        self.log_special_cases(x, y)
    }

    fn log1p(&mut self, x: Value) -> Value {
        let one = self.fconst(1.0);
        let u = self.b.ins().fadd(x, one);
        let y = self.log1p_finite(x);
        self.log_special_cases(u, y)
    }

    fn softplus(&mut self, x: Value) -> Value {
        let e = self.exp_neg_abs(x);
        let l = self.log1p_unit(e);
        // max(x, 0) keeps a NaN x, which `l` does not carry.
        let pos = self.max_keep_nan(x, 0.0);
        self.b.ins().fadd(pos, l)
    }

    fn sigmoid(&mut self, x: Value) -> Value {
        let e = self.exp_neg_abs(x);
        let one = self.fconst(1.0);
        let d = self.b.ins().fadd(e, one);
        let zero = self.fconst(0.0);
        let neg = self.b.ins().fcmp(FloatCC::LessThan, x, zero);
        let num = self.select(neg, e, one);
        let q = self.b.ins().fdiv(num, d);
        // The denominator is really d + d_lo (d_lo: what rounding 1 + e lost),
        // so q is too large by the factor 1 + d_lo / d. Below 2^-(p+1), e is
        // all of d_lo and the correction less than half an ulp of q, while
        // q d_lo would be subnormal (slow on x86): it is left out there.
        let d_r = self.b.ins().fsub(d, one);
        let d_lo = self.b.ins().fsub(e, d_r);
        let tiny = self.fconst(2f64.powi(-(self.fmt.mant_bits as i32 + 1)));
        let small = self.b.ins().fcmp(FloatCC::LessThan, e, tiny);
        let d_lo = self.select(small, zero, d_lo);
        let q_lo = self.b.ins().fmul(q, d_lo);
        let q_lo = self.b.ins().fdiv(q_lo, d);
        self.b.ins().fsub(q, q_lo)
    }

    /// `e^-|x|`, in `[0, 1]` (or NaN).
    fn exp_neg_abs(&mut self, x: Value) -> Value {
        // `-|x|` is `x` with its sign bit set: one `or` with a constant, where `fabs` and
        // `fneg` each build their mask in the loop (Cranelift makes them from all-ones).
        let sign = self.fconst(-0.0);
        let na = self.b.ins().bor(x, sign);
        self.exp_scaled(na, Scaling::Bounded)
    }

    /// `ln(1 + x)` for `1 + x` positive and finite; other inputs give
    /// unspecified results.
    fn log1p_finite(&mut self, x: Value) -> Value {
        // Where |x| < 2^-(p+1), ln(1 + x) rounds to x, and the polynomial's
        // terms (x^3 and smaller) would be subnormal: x86 takes a microcode
        // assist of ~100 cycles for each. So such x are evaluated at the
        // bound, and the result replaced.
        let tiny = self.fconst(2f64.powi(-(self.fmt.mant_bits as i32 + 1)));
        let magnitude = self.b.ins().fabs(x);
        let small = self.b.ins().fcmp(FloatCC::LessThan, magnitude, tiny);
        let x_eval = self.select(small, tiny, x);
        let y = self.log1p_normal(x_eval);
        self.select(small, x, y)
    }

    /// `ln(1 + e)` for `e` in `[0, 1]` (or NaN), as [`Self::log1p_finite`] computes it but
    /// for the reduction: `1 + e` is in `[1, 2]`, so `k` is 1 from `sqrt(2)` on and `f`
    /// is `(1 + e) / 2 - 1`, both exact, and the part `c` of `1 + e` that rounding lost
    /// (below half an ulp) needs `1 / (1 + e)` only to a few percent: a line through its
    /// ends on `[sqrt(2), 2]` instead of a division. (softplus's `ln(1 + e^-|x|)`.)
    fn log1p_unit(&mut self, e: Value) -> Value {
        // Tiny `e` is evaluated at the bound, as in `log1p_finite` (subnormal terms).
        let tiny = self.fconst(2f64.powi(-(self.fmt.mant_bits as i32 + 1)));
        let small = self.b.ins().fcmp(FloatCC::LessThan, e, tiny);
        let e_eval = self.select(small, tiny, e);
        let one = self.fconst(1.0);
        let u = self.b.ins().fadd(e_eval, one);
        let sqrt2 = self.fconst(std::f64::consts::SQRT_2);
        let halved = self.b.ins().fcmp(FloatCC::GreaterThanOrEqual, u, sqrt2);
        let half = self.fconst(0.5);
        let minus_one = self.fconst(-1.0);
        let f_halved = self.mul_add(u, half, minus_one);
        // Below sqrt(2), `1 + e` is `1 + f` with `f = e` exactly.
        let f = self.select(halved, f_halved, e_eval);
        let zero = self.fconst(0.0);
        let kf = self.select(halved, one, zero);
        let u1 = self.b.ins().fsub(u, one);
        let c = self.b.ins().fsub(e_eval, u1);
        let slope = self.fconst(-std::f64::consts::FRAC_1_SQRT_2 / 2.0);
        let at_zero = self.fconst(0.5 + std::f64::consts::FRAC_1_SQRT_2);
        let inverse = self.mul_add(u, slope, at_zero);
        let c_u = self.b.ins().fmul(c, inverse);
        let c_u = self.select(halved, c_u, zero);
        let y = self.log_reduced(kf, f, Some(c_u));
        self.select(small, e, y)
    }

    /// [`Self::log1p_finite`] for `x` not tiny.
    fn log1p_normal(&mut self, x: Value) -> Value {
        let one = self.fconst(1.0);
        let u = self.b.ins().fadd(x, one);
        // u = 2^k (1 + f), but 1 + x = u + c exactly.
        let (kf, f) = self.reduce(u, false);
        let one = self.fconst(1.0);
        let u1 = self.b.ins().fsub(u, one);
        let c = self.b.ins().fsub(x, u1);
        // For k = 0 the exact f is x itself; otherwise the result is at least
        // ln(2)/2 in magnitude and c/u suffices as a low-order correction.
        let zero = self.fconst(0.0);
        let k_is_0 = self.b.ins().fcmp(FloatCC::Equal, kf, zero);
        let f = self.select(k_is_0, x, f);
        let c_u = self.b.ins().fdiv(c, u);
        let c_u = self.select(k_is_0, zero, c_u);
        self.log_reduced(kf, f, Some(c_u))
    }

    /// Replaces `y = ln(x)`, valid for positive finite `x`, by the special
    /// values: `-inf` for `±0`, NaN for negative or NaN `x`, `inf` for `inf`.
    fn log_special_cases(&mut self, x: Value, y: Value) -> Value {
        let zero = self.fconst(0.0);
        let inf = self.fconst(f64::INFINITY);
        let is_zero = self.b.ins().fcmp(FloatCC::Equal, x, zero);
        let neg_inf = self.fconst(f64::NEG_INFINITY);
        let nan = self.fconst(f64::NAN);
        let not_positive = self.select(is_zero, neg_inf, nan);
        let is_positive = self.b.ins().fcmp(FloatCC::GreaterThan, x, zero);
        let y = self.select(is_positive, y, not_positive);
        let is_inf = self.b.ins().fcmp(FloatCC::Equal, x, inf);
        self.select(is_inf, inf, y)
    }

    /// Splits a positive finite `x` into `2^k (1 + f)` with `1 + f` in
    /// `[sqrt(1/2), sqrt(2))` and returns `(k, f)`, `k` as a float. Other
    /// inputs give unspecified results; subnormal `x` are handled only if
    /// `subnormals` is set.
    fn reduce(&mut self, x: Value, subnormals: bool) -> (Value, Value) {
        let f = self.fmt;
        let (x, k_offset) = if subnormals {
            let min_normal = self.fconst(f.min_normal);
            let tiny = self.b.ins().fcmp(FloatCC::LessThan, x, min_normal);
            let scale = self.fconst(2f64.powi(f.mant_bits as i32));
            let scaled = self.b.ins().fmul(x, scale);
            let x = self.select(tiny, scaled, x);
            let scaled_offset = self.fconst(f.round_magic + (f.bias + f.mant_bits) as f64);
            let offset = self.fconst(f.round_magic + f.bias as f64);
            (x, self.select(tiny, scaled_offset, offset))
        } else {
            (x, self.fconst(f.round_magic + f.bias as f64))
        };
        // Adding 1 - sqrt(1/2) to the bits carries into the exponent exactly
        // when the mantissa is >= sqrt(2); adding sqrt(1/2) back to the low
        // bits then rebuilds the mantissa 1 + f.
        let bits = self.bitcast_int(x);
        let shift = self.iconst(f.one_bits - f.sqrt_half_bits);
        let bits = self.b.ins().iadd(bits, shift);
        // k: the biased exponent, placed in the low bits of `round_magic`.
        let biased = self.b.ins().ushr_imm_u(bits, f.mant_bits);
        let magic_bits = self.iconst(self.const_bits(f.round_magic));
        let kbig = self.b.ins().bor(biased, magic_bits);
        let kbig = self.bitcast_float(kbig);
        let kf = self.b.ins().fsub(kbig, k_offset);
        let mant_mask = self.iconst((1 << f.mant_bits) - 1);
        let m = self.b.ins().band(bits, mant_mask);
        let sqrt_half = self.iconst(f.sqrt_half_bits);
        let m = self.b.ins().iadd(m, sqrt_half);
        let m = self.bitcast_float(m);
        let one = self.fconst(1.0);
        (kf, self.b.ins().fsub(m, one))
    }

    /// `k ln2 + ln(1 + f) + c` for `1 + f` in `[sqrt(1/2), sqrt(2)]` and a
    /// small correction `c`:
    /// `ln(1 + f) = f - hfsq + s (hfsq + R)` with `s = f / (2 + f)`,
    /// `hfsq = f^2 / 2` and `R = s^2 G(s^2)`.
    fn log_reduced(&mut self, kf: Value, f: Value, c: Option<Value>) -> Value {
        let fmt = self.fmt;
        let half = self.fconst(0.5);
        let half_f = self.b.ins().fmul(f, half);
        let hfsq = self.b.ins().fmul(f, half_f);
        let two = self.fconst(2.0);
        let den = self.b.ins().fadd(f, two);
        let s = self.b.ins().fdiv(f, den);
        let z = self.b.ins().fmul(s, s);
        let g = self.poly(z, fmt.ln_poly);
        let r = self.b.ins().fmul(z, g);
        let t = self.b.ins().fadd(hfsq, r);
        let ln2_lo = self.fconst(fmt.ln2_lo);
        let low = self.b.ins().fmul(kf, ln2_lo);
        let low = match c {
            Some(c) => self.b.ins().fadd(low, c),
            None => low,
        };
        let t = self.mul_add(s, t, low);
        let t = self.b.ins().fsub(hfsq, t);
        let t = self.b.ins().fsub(f, t);
        let ln2_hi = self.fconst(fmt.ln2_hi);
        self.mul_add(kf, ln2_hi, t)
    }

    /// `2^(k + offset)` for an integer `k` (in the integer type matching `self.ty`), the
    /// sum within the normal exponent range.
    fn pow2(&mut self, k: Value, offset: i64) -> Value {
        let bias = self.iconst(self.fmt.bias + offset);
        let e = self.b.ins().iadd(k, bias);
        let bits = self.b.ins().ishl_imm_u(e, self.fmt.mant_bits);
        self.bitcast_float(bits)
    }

    /// Polynomial with coefficients `c` (ascending powers) at `x`, by
    /// Estrin's scheme: `c0 + c1 x`, `c2 + c3 x`, ... are combined pairwise
    /// with `x^2`, then with `x^4`, and so on. Its dependency chains are
    /// logarithmic in the degree instead of linear (Horner), which lets
    /// more loop iterations overlap.
    fn poly(&mut self, x: Value, c: &[f64]) -> Value {
        let mut terms: Vec<Value> = c
            .chunks(2)
            .map(|pair| {
                let lo = self.fconst(pair[0]);
                match pair.get(1) {
                    Some(&hi) => {
                        let hi = self.fconst(hi);
                        self.mul_add(hi, x, lo)
                    }
                    None => lo,
                }
            })
            .collect();
        let mut power = x;
        while terms.len() > 1 {
            power = self.b.ins().fmul(power, power);
            terms = terms
                .chunks(2)
                .map(|pair| match *pair {
                    [lo, hi] => self.mul_add(hi, power, lo),
                    [lo] => lo,
                    _ => unreachable!(),
                })
                .collect();
        }
        terms[0]
    }

    /// `a * b + c`, fused if the target supports it.
    fn mul_add(&mut self, a: Value, b: Value, c: Value) -> Value {
        if self.fma {
            self.b.ins().fma(a, b, c)
        } else {
            let p = self.b.ins().fmul(a, b);
            self.b.ins().fadd(p, c)
        }
    }

    /// `min(x, hi)`, returning `x` if it is NaN. Shaped so that x86-64
    /// lowers it to a single `minss`/`minps`-like instruction.
    fn min_keep_nan(&mut self, x: Value, hi: f64) -> Value {
        let hi = self.fconst(hi);
        let above = self.b.ins().fcmp(FloatCC::LessThan, hi, x);
        self.select(above, hi, x)
    }

    /// `max(x, lo)`, returning `x` if it is NaN (see [`Self::min_keep_nan`]).
    fn max_keep_nan(&mut self, x: Value, lo: f64) -> Value {
        let lo = self.fconst(lo);
        let below = self.b.ins().fcmp(FloatCC::LessThan, x, lo);
        self.select(below, lo, x)
    }

    /// Lane-wise `cond ? a : b` for the result `cond` of an `fcmp` on
    /// `self.ty` values.
    fn select(&mut self, cond: Value, a: Value, b: Value) -> Value {
        if self.ty.is_vector() {
            let mask = self.b.ins().bitcast(self.ty, MemFlagsData::new(), cond);
            self.b.ins().bitselect(mask, a, b)
        } else {
            self.b.ins().select(cond, a, b)
        }
    }

    /// A float constant of type `self.ty` (splatted for vectors).
    fn fconst(&mut self, v: f64) -> Value {
        let bits = self.const_bits(v) as u64;
        if let Some(loaded) = self.constants.vector(self.b, self.ty, bits) {
            return loaded;
        }
        let c = if self.ty.lane_type() == F32 {
            self.b.ins().f32const(v as f32)
        } else {
            self.b.ins().f64const(v)
        };
        self.splat(self.ty, c)
    }

    /// An integer constant of the integer type matching `self.ty`.
    fn iconst(&mut self, v: i64) -> Value {
        let lane = self.ty.lane_type().as_int();
        let mask = u64::MAX >> (64 - lane.bits());
        // The immediate must be zero-extended from the lane width.
        let bits = v as u64 & mask;
        if let Some(loaded) = self.constants.vector(self.b, self.ty.as_int(), bits) {
            return loaded;
        }
        let c = self.b.ins().iconst(lane, bits as i64);
        self.splat(self.ty.as_int(), c)
    }

    /// `scalar` broadcast to `ty` if that is a vector type.
    fn splat(&mut self, ty: Type, scalar: Value) -> Value {
        if ty.is_vector() {
            self.b.ins().splat(ty, scalar)
        } else {
            scalar
        }
    }

    /// The bit pattern of `v` in the current format.
    fn const_bits(&self, v: f64) -> i64 {
        if self.ty.lane_type() == F32 {
            i64::from((v as f32).to_bits())
        } else {
            v.to_bits() as i64
        }
    }

    /// The bits of float `v`, as the integer type with the same lanes.
    fn bitcast_int(&mut self, v: Value) -> Value {
        self.b
            .ins()
            .bitcast(self.ty.as_int(), MemFlagsData::new(), v)
    }

    /// The float of type `self.ty` whose bits are the integer `v`.
    fn bitcast_float(&mut self, v: Value) -> Value {
        self.b.ins().bitcast(self.ty, MemFlagsData::new(), v)
    }
}

#[cfg(test)]
mod tests {
    //! Accuracy (ulp against `std` or a double-double reference), special
    //! values, and (ignored) throughput of JIT-compiled loops applying each
    //! function to a buffer, for each type, with and without `fma`.

    use super::{EXP_BOUNDED_MAX, MathBuilder};
    use crate::jit::constants::{ConstantTable, Constants, LoopBase};
    use cranelift_codegen::ir::condcodes::IntCC;
    use cranelift_codegen::ir::types::{F32, F32X4, F64, F64X2};
    use cranelift_codegen::ir::{AbiParam, InstBuilder, MemFlagsData, Type, Value};
    use cranelift_codegen::settings::{self, Configurable};
    use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
    use cranelift_jit::{JITBuilder, JITModule};
    use cranelift_module::{Linkage, Module, default_libcall_names};
    use std::cell::RefCell;
    use std::hint::black_box;
    use std::time::{Duration, Instant};

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Op {
        Exp,
        /// `exp_bounded(min(x, EXP_BOUNDED_MAX))`: its domain, whatever the input.
        ExpBounded,
        Ln,
        Log1p,
        Softplus,
        Sigmoid,
    }

    impl Op {
        fn emit(
            self,
            math: &MathBuilder,
            b: &mut FunctionBuilder<'_>,
            x: Value,
            constants: Constants<'_>,
        ) -> Value {
            match self {
                Op::Exp => math.exp(b, x, constants),
                Op::ExpBounded => {
                    let bound = match b.func.dfg.value_type(x).lane_type() {
                        F32 => b.ins().f32const(EXP_BOUNDED_MAX as f32),
                        _ => b.ins().f64const(EXP_BOUNDED_MAX),
                    };
                    let bound = match b.func.dfg.value_type(x) {
                        ty if ty.is_vector() => b.ins().splat(ty, bound),
                        _ => bound,
                    };
                    let x = b.ins().fmin(x, bound);
                    math.exp_bounded(b, x, constants)
                }
                Op::Ln => math.ln(b, x, constants),
                Op::Log1p => math.log1p(b, x, constants),
                Op::Softplus => math.softplus(b, x, constants),
                Op::Sigmoid => math.sigmoid(b, x, constants),
            }
        }

        /// The interval swept densely (linearly) for this function.
        fn interval(self, single: bool) -> (f64, f64) {
            match (self, single) {
                (Op::Exp, true) => (-105.0, 90.0),
                (Op::Exp, false) => (-750.0, 712.0),
                (Op::ExpBounded, true) => (-105.0, EXP_BOUNDED_MAX),
                (Op::ExpBounded, false) => (-750.0, EXP_BOUNDED_MAX),
                (Op::Ln, _) => (0.0, 4.0),
                (Op::Log1p, _) => (-1.0, 3.0),
                (Op::Softplus | Op::Sigmoid, true) => (-110.0, 30.0),
                (Op::Softplus | Op::Sigmoid, false) => (-750.0, 50.0),
            }
        }
    }

    /// `f32` or `f64`, with what the tests need to know about it.
    trait Float: Copy + std::fmt::Debug + std::fmt::LowerExp + 'static {
        const SCALAR: Type;
        const VECTOR: Type;
        const MAX: Self;
        fn from_f64(v: f64) -> Self;
        fn to_f64(self) -> f64;
        /// The float whose bits are the low bits of `bits`.
        fn from_random(bits: u64) -> Self;
        /// Position in the ordered sequence of floats: neighbours differ by
        /// 1, and `-0.0` and `0.0` are both 0.
        fn ordinal(self) -> i64;
        fn from_ordinal(i: i64) -> Self;
        /// The reference result: `std` where it has the function.
        fn reference(op: Op, x: Self) -> Self;
    }

    impl Float for f32 {
        const SCALAR: Type = F32;
        const VECTOR: Type = F32X4;
        const MAX: Self = f32::MAX;
        fn from_f64(v: f64) -> Self {
            v as f32
        }
        fn to_f64(self) -> f64 {
            f64::from(self)
        }
        fn from_random(bits: u64) -> Self {
            f32::from_bits(bits as u32)
        }
        fn ordinal(self) -> i64 {
            let b = self.to_bits() as i32;
            i64::from(if b < 0 { -(b & i32::MAX) } else { b })
        }
        fn from_ordinal(i: i64) -> Self {
            let b = i.unsigned_abs() as u32;
            f32::from_bits(if i < 0 { b | 1 << 31 } else { b })
        }
        fn reference(op: Op, x: Self) -> Self {
            match op {
                Op::Exp => x.exp(),
                Op::ExpBounded if x.is_nan() => x,
                Op::ExpBounded => x.min(EXP_BOUNDED_MAX as Self).exp(),
                Op::Ln => x.ln(),
                Op::Log1p => x.ln_1p(),
                Op::Softplus => dd::softplus(x.into()) as f32,
                Op::Sigmoid => dd::sigmoid(x.into()) as f32,
            }
        }
    }

    impl Float for f64 {
        const SCALAR: Type = F64;
        const VECTOR: Type = F64X2;
        const MAX: Self = f64::MAX;
        fn from_f64(v: f64) -> Self {
            v
        }
        fn to_f64(self) -> f64 {
            self
        }
        fn from_random(bits: u64) -> Self {
            f64::from_bits(bits)
        }
        fn ordinal(self) -> i64 {
            let b = self.to_bits() as i64;
            if b < 0 { -(b & i64::MAX) } else { b }
        }
        fn from_ordinal(i: i64) -> Self {
            let b = i.unsigned_abs();
            f64::from_bits(if i < 0 { b | 1 << 63 } else { b })
        }
        fn reference(op: Op, x: Self) -> Self {
            match op {
                Op::Exp => x.exp(),
                Op::ExpBounded if x.is_nan() => x,
                Op::ExpBounded => x.min(EXP_BOUNDED_MAX as Self).exp(),
                Op::Ln => x.ln(),
                Op::Log1p => x.ln_1p(),
                Op::Softplus => dd::softplus(x),
                Op::Sigmoid => dd::sigmoid(x),
            }
        }
    }

    /// Distance in ulps; 0 for two NaNs, `u64::MAX` for NaN and a number.
    fn ulps<T: Float>(a: T, b: T) -> u64 {
        match (a.to_f64().is_nan(), b.to_f64().is_nan()) {
            (true, true) => 0,
            (false, false) => a.ordinal().abs_diff(b.ordinal()),
            _ => u64::MAX,
        }
    }

    /// A JIT module for the host, with `fma` disabled if `fma` is false.
    fn jit_module(fma: bool) -> JITModule {
        let mut flags = settings::builder();
        flags.set("opt_level", "speed").unwrap();
        flags.set("is_pic", "false").unwrap();
        flags.set("use_colocated_libcalls", "false").unwrap();
        let mut isa = cranelift_native::builder().unwrap();
        if !fma {
            isa.set("has_fma", "false").unwrap();
        }
        let isa = isa.finish(settings::Flags::new(flags)).unwrap();
        JITModule::new(JITBuilder::with_isa(isa, default_libcall_names()))
    }

    /// A compiled loop `dst[i] = op(src[i])` loading and storing one value of
    /// type `ty` (one or several `T` lanes) per iteration.
    struct Kernel<T> {
        code: unsafe extern "C" fn(*const T, *mut T, usize),
        lanes: usize,
        uses_fma: bool,
        /// Owns the memory `code` points into (it is never freed).
        _module: JITModule,
        /// The vector constants `code` reads, as in the kernels.
        _constants: RefCell<ConstantTable>,
    }

    impl<T: Float> Kernel<T> {
        fn new(op: Op, ty: Type, fma: bool) -> Self {
            assert_eq!(ty.lane_type(), T::SCALAR);
            let mut module = jit_module(fma);
            let math = MathBuilder::new(module.isa());
            let ptr = module.target_config().pointer_type();
            let mut ctx = module.make_context();
            ctx.func.signature.params = vec![AbiParam::new(ptr); 3];
            let mut fctx = FunctionBuilderContext::new();
            let mut b = FunctionBuilder::new(&mut ctx.func, &mut fctx);
            let [entry, head, body, exit] = [(); 4].map(|()| b.create_block());
            b.append_block_params_for_function_params(entry);
            let offset = b.append_block_param(head, ptr);

            b.switch_to_block(entry);
            let &[src, dst, n] = b.block_params(entry) else {
                unreachable!()
            };
            let end = b.ins().imul_imm_u(n, i64::from(T::SCALAR.bytes()));
            let zero = b.ins().iconst(ptr, 0);
            let constants = RefCell::new(ConstantTable::new());
            let base = LoopBase::before_loop(&mut b, &constants);
            b.ins().jump(head, &[zero.into()]);

            b.switch_to_block(head);
            let more = b.ins().icmp(IntCC::UnsignedLessThan, offset, end);
            b.ins().brif(more, body, &[], exit, &[]);

            b.switch_to_block(body);
            // Not `trusted()`: the buffers are only aligned to `T`.
            let flags = MemFlagsData::new().with_notrap();
            let src_at = b.ins().iadd(src, offset);
            let x = b.ins().load(ty, flags, src_at, 0);
            let base = base.in_iteration(&mut b);
            let y = op.emit(
                &math,
                &mut b,
                x,
                Constants::Table {
                    table: &constants,
                    base,
                },
            );
            let dst_at = b.ins().iadd(dst, offset);
            b.ins().store(flags, y, dst_at, 0);
            let next = b.ins().iadd_imm_u(offset, i64::from(ty.bytes()));
            b.ins().jump(head, &[next.into()]);

            b.switch_to_block(exit);
            b.ins().return_(&[]);
            b.seal_all_blocks();
            b.finalize(module.target_config());

            let id = module
                .declare_function("kernel", Linkage::Local, &ctx.func.signature)
                .unwrap();
            module.define_function(id, &mut ctx).unwrap();
            module.finalize_definitions().unwrap();
            let code = module.get_finalized_function(id);
            // SAFETY: `code` is the finalized entry point of the function just
            // defined, whose signature is three pointer-sized integer
            // parameters and no result in the ISA's default calling
            // convention, i.e. the host C ABI, matching this `extern "C"`
            // pointer type. `_module` keeps the code mapped for as long as
            // the pointer is stored.
            let code = unsafe {
                std::mem::transmute::<*const u8, unsafe extern "C" fn(*const T, *mut T, usize)>(
                    code,
                )
            };
            Kernel {
                code,
                lanes: ty.lane_count() as usize,
                uses_fma: math.uses_fma(),
                _module: module,
                _constants: constants,
            }
        }

        fn run(&self, src: &[T], dst: &mut [T]) {
            assert_eq!(src.len(), dst.len());
            assert_eq!(
                src.len() % self.lanes,
                0,
                "length must be a multiple of the lane count"
            );
            // SAFETY: the kernel reads `src.len()` elements of `src` and writes
            // as many to `dst`, both valid for that many elements (checked
            // above); it makes unaligned accesses only, needs no other memory,
            // and the exclusive borrow of `dst` rules out overlap.
            unsafe { (self.code)(src.as_ptr(), dst.as_mut_ptr(), src.len()) }
        }
    }

    /// SplitMix64: a fixed, dependency-free source of random bit patterns.
    struct SplitMix64(u64);

    impl Iterator for SplitMix64 {
        type Item = u64;
        fn next(&mut self) -> Option<u64> {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            Some(z ^ (z >> 31))
        }
    }

    const SWEEP: usize = 300_000;

    /// Test inputs: a linear sweep over the function's interval, a sweep in
    /// equal ordinal steps over all finite values (each binade sampled
    /// evenly), and random bit patterns (NaNs and infinities included).
    /// The length is a multiple of 4.
    fn inputs<T: Float>(op: Op) -> Vec<T> {
        let (lo, hi) = op.interval(T::SCALAR == F32);
        let linear = (0..SWEEP).map(|i| T::from_f64(lo + (hi - lo) * i as f64 / SWEEP as f64));
        let top = i128::from(T::MAX.ordinal());
        let binades = (0..=SWEEP).map(|i| {
            let i = i as i128;
            T::from_ordinal((-top + 2 * top * i / SWEEP as i128) as i64)
        });
        let random = SplitMix64(op as u64).take(SWEEP).map(T::from_random);
        let mut xs: Vec<T> = linear.chain(binades).chain(random).collect();
        xs.resize(xs.len().next_multiple_of(4), T::from_f64(1.0));
        xs
    }

    /// Checks `op` for both types of precision `T` (scalar and vector), with
    /// and without `fma`, against the reference; returns the report lines.
    fn check_accuracy<T: Float>(op: Op) -> Vec<String> {
        let xs = inputs::<T>(op);
        let want: Vec<T> = xs.iter().map(|&x| T::reference(op, x)).collect();
        let mut report = Vec::new();
        for fma in [true, false] {
            let mut scalar_out = None;
            for ty in [T::SCALAR, T::VECTOR] {
                let kernel = Kernel::<T>::new(op, ty, fma);
                let mut got = vec![T::from_f64(0.0); xs.len()];
                kernel.run(&xs, &mut got);
                let (err, i) = (0..xs.len())
                    .map(|i| (ulps(got[i], want[i]), i))
                    .max()
                    .unwrap();
                let fma_note = if kernel.uses_fma { "fma" } else { "mul+add" };
                report.push(format!(
                    "{op:?} {ty} ({fma_note}): max {err} ulp, at x = {:e} (got {:e}, want {:e})",
                    xs[i], got[i], want[i]
                ));
                assert!(err <= 2, "{}", report.last().unwrap());
                // Vector lanes compute exactly what the scalar code does.
                let scalar = scalar_out.get_or_insert_with(|| got.clone());
                if let Some(j) = (0..xs.len()).find(|&j| ulps(scalar[j], got[j]) != 0) {
                    panic!(
                        "{op:?} {ty}: x = {:e} gives {:e}, scalar {:e}",
                        xs[j], got[j], scalar[j]
                    );
                }
            }
        }
        report
    }

    fn accuracy(op: Op) {
        let mut report = check_accuracy::<f32>(op);
        report.extend(check_accuracy::<f64>(op));
        println!("{}", report.join("\n"));
    }

    #[test]
    fn exp_accuracy() {
        accuracy(Op::Exp);
    }

    #[test]
    fn exp_bounded_accuracy() {
        accuracy(Op::ExpBounded);
    }

    #[test]
    fn ln_accuracy() {
        accuracy(Op::Ln);
    }

    #[test]
    fn log1p_accuracy() {
        accuracy(Op::Log1p);
    }

    #[test]
    fn softplus_accuracy() {
        accuracy(Op::Softplus);
    }

    #[test]
    fn sigmoid_accuracy() {
        accuracy(Op::Sigmoid);
    }

    fn check_special_values<T: Float>() {
        let (inf, nan) = (f64::INFINITY, f64::NAN);
        let max = T::MAX.to_f64();
        // exp's result is 0 below and inf above these bounds.
        let (underflow, overflow) = if T::SCALAR == F32 {
            (-104.0, 89.0)
        } else {
            (-746.0, 710.0)
        };
        let cases: &[(Op, &[(f64, f64)])] = &[
            (
                Op::Exp,
                &[
                    (-inf, 0.0),
                    (inf, inf),
                    (nan, nan),
                    (0.0, 1.0),
                    (-0.0, 1.0),
                    (overflow, inf),
                    (max, inf),
                    (underflow, 0.0),
                    (-max, 0.0),
                ],
            ),
            (
                Op::ExpBounded,
                &[
                    (-inf, 0.0),
                    (nan, nan),
                    (0.0, 1.0),
                    (-0.0, 1.0),
                    (underflow, 0.0),
                    (-max, 0.0),
                ],
            ),
            (
                Op::Ln,
                &[
                    (0.0, -inf),
                    (-0.0, -inf),
                    (-1.0, nan),
                    (-max, nan),
                    (-inf, nan),
                    (inf, inf),
                    (nan, nan),
                    (1.0, 0.0),
                ],
            ),
            (
                Op::Log1p,
                &[
                    (-1.0, -inf),
                    (-2.0, nan),
                    (-inf, nan),
                    (inf, inf),
                    (nan, nan),
                    (0.0, 0.0),
                ],
            ),
            (
                Op::Softplus,
                &[(-inf, 0.0), (inf, inf), (nan, nan), (max, max), (-max, 0.0)],
            ),
            (
                Op::Sigmoid,
                &[
                    (-inf, 0.0),
                    (inf, 1.0),
                    (nan, nan),
                    (0.0, 0.5),
                    (max, 1.0),
                    (-max, 0.0),
                ],
            ),
        ];
        for &(op, pairs) in cases {
            let mut xs: Vec<T> = pairs.iter().map(|&(x, _)| T::from_f64(x)).collect();
            xs.resize(xs.len().next_multiple_of(4), T::from_f64(0.0));
            for fma in [true, false] {
                for ty in [T::SCALAR, T::VECTOR] {
                    let kernel = Kernel::<T>::new(op, ty, fma);
                    let mut got = xs.clone();
                    kernel.run(&xs, &mut got);
                    for (&(x, want), got) in pairs.iter().zip(got) {
                        let want = T::from_f64(want);
                        assert_eq!(
                            ulps(got, want),
                            0,
                            "{op:?} {ty} ({x}): got {got:e}, want {want:e}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn special_values() {
        check_special_values::<f32>();
        check_special_values::<f64>();
    }

    #[test]
    #[should_panic(expected = "unsupported type")]
    fn rejects_other_types() {
        Kernel::<f32>::new(Op::Exp, cranelift_codegen::ir::types::F32X8, true);
    }

    /// Every `f32` through the `f32x4` kernels of `exp`, `ln` and `log1p`,
    /// with and without `fma`: at most 1 ulp from `std`.
    #[test]
    #[ignore = "exhaustive, takes minutes; run with `cargo test --release -- --ignored exhaustive_f32`"]
    fn exhaustive_f32() {
        const CHUNK: u64 = 1 << 20;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        // softplus against its formula in f64 (a double-double reference for every input
        // would take most of an hour), over the inputs whose result is neither `x` nor 0.
        let softplus = |x: f32| {
            let x = f64::from(x);
            (x.max(0.0) + (-x.abs()).exp().ln_1p()) as f32
        };
        type Reference<'r> = &'r (dyn Fn(f32) -> f32 + Sync);
        let cases: [(Op, Reference<'_>, u64); 5] = [
            (Op::Exp, &|x| f32::reference(Op::Exp, x), 1),
            (Op::ExpBounded, &|x| f32::reference(Op::ExpBounded, x), 1),
            (Op::Ln, &|x| f32::reference(Op::Ln, x), 1),
            (Op::Log1p, &|x| f32::reference(Op::Log1p, x), 1),
            (Op::Softplus, &softplus, 2),
        ];
        for (op, reference, bound) in cases {
            for fma in [true, false] {
                let (err, x) = std::thread::scope(|scope| {
                    let workers: Vec<_> = (0..threads)
                        .map(|t| {
                            scope.spawn(move || {
                                let kernel = Kernel::<f32>::new(op, F32X4, fma);
                                let mut xs = vec![0f32; CHUNK as usize];
                                let mut got = xs.clone();
                                let mut worst = (0, 0f32);
                                for start in
                                    (t as u64 * CHUNK..1 << 32).step_by(threads * CHUNK as usize)
                                {
                                    for (i, x) in (start..).zip(&mut xs) {
                                        *x = f32::from_bits(i as u32);
                                    }
                                    kernel.run(&xs, &mut got);
                                    for (&x, &y) in xs.iter().zip(&got) {
                                        if op == Op::Softplus && !(-110.0..30.0).contains(&x) {
                                            continue;
                                        }
                                        let err = ulps(y, reference(x));
                                        if err > worst.0 {
                                            worst = (err, x);
                                        }
                                    }
                                }
                                worst
                            })
                        })
                        .collect();
                    let results = workers.into_iter().map(|w| w.join().unwrap());
                    results.max_by(|a, b| a.0.cmp(&b.0)).unwrap()
                });
                println!(
                    "{op:?} f32x4 (fma allowed: {fma}): max {err} ulp over all inputs, at x = {x:e}"
                );
                assert!(err <= bound, "{op:?}: {err} ulp at x = {x:e}");
            }
        }
    }

    /// Nanoseconds per element of `f` applied to buffers of `n` elements:
    /// the best of 40 samples of about 5 ms each (robust against other load
    /// on the machine).
    fn ns_per_element(n: usize, mut f: impl FnMut()) -> f64 {
        let start = Instant::now();
        let mut runs = 0u32;
        while start.elapsed() < Duration::from_millis(5) {
            f();
            runs += 1;
        }
        (0..40)
            .map(|_| {
                let start = Instant::now();
                for _ in 0..runs {
                    f();
                }
                start.elapsed().as_nanos() as f64 / (f64::from(runs) * n as f64)
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// JIT code versus `std` (libm) through a Rust loop, for inputs in
    /// `[lo, hi]`.
    fn compare_throughput<T: Float>(op: Op, lo: f64, hi: f64, libm: impl Fn(T) -> T) {
        const N: usize = 4096;
        let xs: Vec<T> = (0..N)
            .map(|i| T::from_f64(lo + (hi - lo) * i as f64 / N as f64))
            .collect();
        let mut out = xs.clone();
        let mut line = format!("{op:?} {}:", T::SCALAR);
        for ty in [T::SCALAR, T::VECTOR] {
            let kernel = Kernel::<T>::new(op, ty, true);
            let ns = ns_per_element(N, || kernel.run(black_box(&xs), black_box(&mut out)));
            line += &format!(" jit {ty} {ns:.2} ns,");
        }
        let ns = ns_per_element(N, || {
            for (y, &x) in out.iter_mut().zip(black_box(&xs)) {
                *y = libm(x);
            }
            black_box(&mut out);
        });
        println!("{line} std {ns:.2} ns");
    }

    #[test]
    #[ignore = "timing; run with `cargo test --release -- --ignored --nocapture throughput`"]
    fn throughput() {
        compare_throughput::<f32>(Op::Exp, -80.0, 80.0, f32::exp);
        compare_throughput::<f64>(Op::Exp, -700.0, 700.0, f64::exp);
        compare_throughput::<f32>(Op::Ln, 1e-3, 1e3, f32::ln);
        compare_throughput::<f64>(Op::Ln, 1e-3, 1e3, f64::ln);
        compare_throughput::<f32>(Op::Softplus, -20.0, 20.0, |x: f32| {
            x.max(0.0) + (-x.abs()).exp().ln_1p()
        });
        compare_throughput::<f64>(Op::Softplus, -20.0, 20.0, |x: f64| {
            x.max(0.0) + (-x.abs()).exp().ln_1p()
        });
    }

    /// Double-double reference values for the functions `std` lacks.
    mod dd {
        /// `hi + lo` with `|lo| <= ulp(hi) / 2`.
        #[derive(Clone, Copy)]
        struct Dd {
            hi: f64,
            lo: f64,
        }

        /// ln 2 to about 107 bits.
        const LN2: Dd = Dd {
            hi: std::f64::consts::LN_2,
            lo: 2.319_046_813_846_299_6e-17,
        };

        impl Dd {
            fn new(v: f64) -> Dd {
                Dd { hi: v, lo: 0.0 }
            }

            /// Exact `a + b` (Knuth's two-sum).
            fn sum(a: f64, b: f64) -> Dd {
                let hi = a + b;
                let bv = hi - a;
                Dd {
                    hi,
                    lo: (a - (hi - bv)) + (b - bv),
                }
            }

            /// Exact `a + b` for `|a| >= |b|`.
            fn fast_sum(a: f64, b: f64) -> Dd {
                let hi = a + b;
                Dd {
                    hi,
                    lo: b - (hi - a),
                }
            }

            fn add(self, o: Dd) -> Dd {
                let s = Dd::sum(self.hi, o.hi);
                let t = Dd::sum(self.lo, o.lo);
                let s = Dd::fast_sum(s.hi, s.lo + t.hi);
                Dd::fast_sum(s.hi, s.lo + t.lo)
            }

            fn mul(self, o: Dd) -> Dd {
                let hi = self.hi * o.hi;
                let lo = self.hi.mul_add(o.hi, -hi) + (self.hi * o.lo + self.lo * o.hi);
                Dd::fast_sum(hi, lo)
            }

            fn div(self, o: Dd) -> Dd {
                let q1 = self.hi / o.hi;
                let r = self.add(o.mul(Dd::new(-q1)));
                let q2 = r.hi / o.hi;
                let r = r.add(o.mul(Dd::new(-q2)));
                Dd::fast_sum(q1, q2).add(Dd::new(r.hi / o.hi))
            }

            /// `self * 2^k`, exact unless the result is subnormal.
            fn ldexp(self, k: i32) -> Dd {
                Dd {
                    hi: ldexp(self.hi, k),
                    lo: ldexp(self.lo, k),
                }
            }
        }

        /// `v * 2^k` with a single rounding, for `|k| <= 2044`.
        fn ldexp(v: f64, k: i32) -> f64 {
            let pow2 = |k: i32| f64::from_bits(((k + 1023) as u64) << 52);
            v * pow2(k / 2) * pow2(k - k / 2)
        }

        /// `e^x = m 2^k` for `-1100 <= x <= 1`, with `m` in `[0.7, 1.5]`.
        fn exp(x: f64) -> (Dd, i32) {
            let k = (x * std::f64::consts::LOG2_E).round();
            let r = Dd::new(x).add(Dd::new(-k).mul(LN2)).ldexp(-10);
            // e^r by Taylor series (|r| < 2^-11), then squared 10 times.
            let mut m = Dd::new(1.0);
            for i in (1..=8).rev() {
                m = Dd::new(1.0).add(r.mul(m).div(Dd::new(f64::from(i))));
            }
            for _ in 0..10 {
                m = m.mul(m);
            }
            (m, k as i32)
        }

        /// `ln(1 + m 2^k)` for the result of [`exp`] with `k <= 0`.
        fn log1p_of_exp(m: Dd, k: i32) -> Dd {
            if k < -40 {
                // e = m 2^k < 2^-40: ln(1 + e) = e (1 - e/2) to 2^-80.
                let e = ldexp(m.hi, k);
                return m.mul(Dd::sum(1.0, -e / 2.0)).ldexp(k);
            }
            let u = Dd::new(1.0).add(m.ldexp(k));
            // One Newton step on e^y = u from the f64 logarithm.
            let y = u.hi.ln() + u.lo / u.hi;
            let (em, ek) = exp(y);
            let ey = em.ldexp(ek);
            let step = u.add(Dd {
                hi: -ey.hi,
                lo: -ey.lo,
            });
            Dd::sum(y, step.hi / ey.hi)
        }

        pub fn softplus(x: f64) -> f64 {
            if x.is_nan() {
                return x;
            }
            let (m, k) = exp(-x.abs().min(1100.0));
            Dd::new(x.max(0.0)).add(log1p_of_exp(m, k)).hi
        }

        pub fn sigmoid(x: f64) -> f64 {
            if x.is_nan() {
                return x;
            }
            let (m, k) = exp(-x.abs().min(1100.0));
            if k < -60 {
                // e / (1 + e) = e to 2^-60.
                return if x < 0.0 { ldexp(m.hi, k) } else { 1.0 };
            }
            let e = m.ldexp(k);
            let num = if x < 0.0 { e } else { Dd::new(1.0) };
            num.div(Dd::new(1.0).add(e)).hi
        }
    }
}
