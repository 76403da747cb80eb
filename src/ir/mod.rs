//! The typed IR: what a loss computes, with every value's level made explicit.
//!
//! A [`Module`] holds six arenas. Groupings (classes, k-means clusters) and tensors
//! (the embedding, its branches, centres) are evaluated once per call; matrices are the
//! pair matrices between two tensors; blocks are the per-anchor row loops; sets and
//! expressions are the computation itself. Every expression has a [`Level`] (constant,
//! batch, one anchor row, one member of a set, one pair of a cross set) and a [`Type`].
//! Sets are index sets: the members of a row (or of the whole matrix) chosen by structure
//! (`same`, `self`, `i < j`), by predicates on values, by rank or by sampling, each with a
//! value expression that `v` stands for.
//!
//! The [`Schedule`] orders the work in phases: a batch value that feeds a row loop is
//! computed in an earlier phase than that loop, never recomputed inside it.

pub mod arena;
pub mod build;
mod error;
mod lower;
mod print;
pub mod rewrite;
mod schedule;
mod validate;

pub use arena::{Arena, Entity, Handle, HandleMap};
pub use build::Builder;
pub use error::LowerError;
pub use lower::{BUILTINS, ParamValue, Params, entry_loss, lower};
pub use print::{print_module, print_program, print_schedule};
pub use schedule::{Effect, Phase, Schedule, anchor_inputs, schedule};
pub use validate::{ValidationError, proof_of_emptiness, validate};
pub(crate) use validate::{dependencies, expr_refs, set_refs};

use crate::diagnostic::Span;

/// The compiled form of one loss: the whole program, all calls inlined.
#[derive(Debug, Clone, Default)]
pub struct Module {
    pub name: String,
    /// The parameters after defaults and overrides, as folded into the IR (for printing).
    pub params: Vec<(String, ParamValue)>,
    /// Named inputs a caller may supply (`input groups = ...`).
    pub inputs: Vec<Input>,
    pub groupings: Arena<Grouping>,
    pub tensors: Arena<Tensor>,
    pub matrices: Arena<Matrix>,
    pub blocks: Arena<Block>,
    pub sets: Arena<Set>,
    pub exprs: Arena<Expr>,
    /// Creation order across the set and expression arenas, for printing.
    pub order: Vec<Node>,
    pub loss: Option<Handle<Expr>>,
    pub stats: Vec<(String, Handle<Expr>)>,
    pub spans: Spans,
    /// How many `sample(...)` call sites and seeded tensors the module has.
    pub random_sites: u32,
}

impl Module {
    /// The loss expression; lowering guarantees it exists.
    pub fn loss_expr(&self) -> Handle<Expr> {
        self.loss.unwrap_or_else(|| Handle::from_index(0))
    }

    /// The rows and columns of a matrix.
    pub fn space_of(&self, matrix: Handle<Matrix>) -> Space {
        let m = &self.matrices[matrix];
        Space::new(self.tensors[m.left].rows, self.tensors[m.right].rows)
    }

    /// `set` as entries of a matrix of the samples against themselves, valued by the entry
    /// and filtered on labels alone (`same`, `self`, `not`, `and`, `or`, `==`, `!=`,
    /// constants): which pairs it keeps then needs no other value.
    pub fn labelled_entries(&self, set: Handle<Set>) -> Option<LabelledEntries> {
        let ExprKind::Entry(matrix) = self.exprs[self.sets[set].value].kind else {
            return None;
        };
        if self.space_of(matrix) != Space::new(Domain::Samples, Domain::Samples) {
            return None;
        }
        let mut predicates = Vec::new();
        let mut current = set;
        while let SetKind::Filter { base, predicate } = self.sets[current].kind {
            predicates.push(predicate);
            current = base;
        }
        if self.sets[current].kind != SetKind::Entries {
            return None;
        }
        let mut keeps = [[true; 2]; 2];
        for (same, row) in keeps.iter_mut().enumerate() {
            for (is_self, keep) in row.iter_mut().enumerate() {
                for &p in &predicates {
                    *keep &= self.holds_on_labels(p, same == 1, is_self == 1)?;
                }
            }
        }
        Some(LabelledEntries { matrix, keeps })
    }

    /// A predicate's truth for a pair with and without a shared label and sample, when it
    /// reads nothing else.
    fn holds_on_labels(&self, predicate: Handle<Expr>, same: bool, is_self: bool) -> Option<bool> {
        let holds = |p| self.holds_on_labels(p, same, is_self);
        Some(match self.exprs[predicate].kind {
            ExprKind::Bool(b) => b,
            ExprKind::Same => same,
            ExprKind::IsSelf => is_self,
            ExprKind::Unary {
                op: UnaryOp::Not,
                arg,
            } => !holds(arg)?,
            ExprKind::Binary { op, lhs, rhs } => {
                let (a, b) = (holds(lhs)?, holds(rhs)?);
                match op {
                    BinaryOp::And => a && b,
                    BinaryOp::Or => a || b,
                    BinaryOp::Eq => a == b,
                    BinaryOp::Ne => a != b,
                    _ => return None,
                }
            }
            _ => return None,
        })
    }
}

/// A set of a matrix's entries chosen by labels alone ([`Module::labelled_entries`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabelledEntries {
    pub matrix: Handle<Matrix>,
    /// Whether the set keeps a pair, by `[same label][same sample]`.
    pub keeps: [[bool; 2]; 2],
}

/// Either arena's entry, in creation order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Node {
    Set(Handle<Set>),
    Expr(Handle<Expr>),
}

/// Source spans kept beside the IR, not inside its nodes.
#[derive(Debug, Clone, Default)]
pub struct Spans {
    pub exprs: HandleMap<Expr, Span>,
    pub sets: HandleMap<Set, Span>,
    pub blocks: HandleMap<Block, Span>,
    pub tensors: HandleMap<Tensor, Span>,
    pub groupings: HandleMap<Grouping, Span>,
}

/// A named input and the grouping it feeds.
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    pub name: String,
    pub grouping: Handle<Grouping>,
}

// ---- groupings and tensors -----------------------------------------------------------------

/// A partition of the samples into groups.
#[derive(Debug, Clone, PartialEq)]
pub enum Grouping {
    /// The classes, in ascending label order; a group's label is its class.
    Labels,
    /// Seeded k-means on the rows of a tensor; the groups have no labels.
    KMeans {
        features: Handle<Tensor>,
        clusters: usize,
        site: u32,
    },
    /// An array the caller supplies (`--input name=F.npy`), else `default`.
    Input {
        name: String,
        default: Handle<Grouping>,
    },
    /// Every non-empty intersection of a group of `groups` with a class, ordered by
    /// (group, class); labelled by the class.
    SplitByLabel { groups: Handle<Grouping> },
}

impl Grouping {
    /// Whether groups carry a class label (so that `same` is defined against them).
    pub fn is_labelled(&self, groupings: &Arena<Grouping>) -> bool {
        match self {
            Grouping::Labels | Grouping::SplitByLabel { .. } => true,
            Grouping::KMeans { .. } => false,
            Grouping::Input { default, .. } => groupings[*default].is_labelled(groupings),
        }
    }
}

/// What the rows of a tensor, and the rows or columns of a matrix, range over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Domain {
    Samples,
    Groups(Handle<Grouping>),
}

/// A matrix of embeddings (one row per sample or per group), computed once per call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub op: TensorOp,
    pub rows: Domain,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TensorOp {
    /// The batch `x`.
    Embedding,
    /// Columns `start..end` of the source.
    Columns {
        source: Handle<Tensor>,
        start: usize,
        end: usize,
    },
    /// Part `part` of a seeded random permutation of the source's columns cut into parts
    /// of the given sizes.
    Partition {
        source: Handle<Tensor>,
        sizes: Vec<usize>,
        part: usize,
        site: u32,
    },
    /// Every row scaled to unit length.
    Normalize { source: Handle<Tensor> },
    /// The mean of each group's rows.
    Centres {
        source: Handle<Tensor>,
        groups: Handle<Grouping>,
    },
    /// The source, without gradient.
    Stop { source: Handle<Tensor> },
    /// `[a, b]` side by side (no gradient: k-means features only).
    Concat {
        left: Handle<Tensor>,
        right: Handle<Tensor>,
    },
    /// One column per class, 1 in the sample's class (no gradient).
    OneHot { groups: Handle<Grouping> },
    /// The source times a constant.
    Scale { source: Handle<Tensor>, factor: f64 },
}

impl TensorOp {
    /// Whether gradient flows through this tensor to its sources.
    pub fn carries_gradient(&self) -> bool {
        !matches!(
            self,
            TensorOp::Stop { .. } | TensorOp::Concat { .. } | TensorOp::OneHot { .. }
        )
    }
}

/// A pair matrix: `metric(left_i, right_j)` for every row i of `left` and j of `right`.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub metric: Metric,
    pub left: Handle<Tensor>,
    pub right: Handle<Tensor>,
}

impl Matrix {
    /// A matrix of a tensor against itself: symmetric, with an exact zero-distance diagonal.
    pub fn is_symmetric(&self) -> bool {
        self.left == self.right
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Metric {
    /// `a . b`
    Dot,
    /// `sqrt(max(|a - b|^2, eps))`, zero gradient where the clamp holds.
    Euclid { eps: f64 },
    /// `|a - b|^2`
    SqEuclid,
}

// ---- blocks ----------------------------------------------------------------------------------

/// A per-anchor row loop: its row values are computed once for every row of `rows`.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    pub rows: Domain,
    /// Conditions, in order, under which an anchor is skipped: it then contributes nothing,
    /// and none of its other row values is evaluated.
    pub skips: Vec<Handle<Expr>>,
}

// ---- levels, spaces and types ----------------------------------------------------------------

/// The rows and columns a per-member value ranges over; `None` where a value works in
/// any space (`same`, `self`, `i`, `j`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Space {
    pub rows: Option<Domain>,
    pub cols: Option<Domain>,
}

impl Space {
    pub fn new(rows: Domain, cols: Domain) -> Space {
        Space {
            rows: Some(rows),
            cols: Some(cols),
        }
    }

    pub const ANY: Space = Space {
        rows: None,
        cols: None,
    };

    /// The space both values fit, if they are compatible.
    pub fn unify(self, other: Space) -> Option<Space> {
        fn one(a: Option<Domain>, b: Option<Domain>) -> Option<Option<Domain>> {
            match (a, b) {
                (Some(x), Some(y)) if x != y => None,
                (Some(x), _) | (_, Some(x)) => Some(Some(x)),
                (None, None) => Some(None),
            }
        }
        Some(Space {
            rows: one(self.rows, other.rows)?,
            cols: one(self.cols, other.cols)?,
        })
    }

    pub fn is_complete(self) -> bool {
        self.rows.is_some() && self.cols.is_some()
    }
}

/// Where a value varies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Level {
    /// Known at compile time.
    Const,
    /// One value per call.
    Batch,
    /// One value per anchor of a block.
    Row(Handle<Block>),
    /// One value per (row, column) entry of a space; `block` when it uses a row value.
    Member {
        space: Space,
        block: Option<Handle<Block>>,
    },
    /// One value per pair (p, q) of members of one anchor's two sets.
    Cross { space: Space, block: Handle<Block> },
}

impl Level {
    /// The block whose rows this value depends on, if any.
    pub fn block(self) -> Option<Handle<Block>> {
        match self {
            Level::Row(b) | Level::Cross { block: b, .. } => Some(b),
            Level::Member { block, .. } => block,
            Level::Const | Level::Batch => None,
        }
    }

    pub fn rank(self) -> u8 {
        match self {
            Level::Const => 0,
            Level::Batch => 1,
            Level::Row(_) => 2,
            Level::Member { .. } => 3,
            Level::Cross { .. } => 4,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Type {
    Num,
    Bool,
    /// A batch-level vector of this length (histograms).
    Vector(u32),
    /// The position of a member: a column within a row, or an entry of the whole matrix.
    Index,
}

// ---- sets ------------------------------------------------------------------------------------

/// An index set and the value each member has (`v`).
#[derive(Debug, Clone, PartialEq)]
pub struct Set {
    pub kind: SetKind,
    pub value: Handle<Expr>,
    pub shape: SetShape,
    /// The block whose row values the set's definition uses, if any.
    pub block: Option<Handle<Block>>,
}

/// What a set's members are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SetShape {
    /// Entries of a space: the columns of one row inside a block, every entry at batch level.
    Members(Space),
    /// Pairs (p, q) of members of two sets of one anchor.
    Cross(Space),
    /// The anchors of a block (at batch level).
    Anchors(Handle<Block>),
    /// The entries of a batch-level vector.
    Vector(u32),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SetKind {
    /// Every entry of the space.
    Entries,
    /// The members of `base` for which `predicate` holds.
    Filter {
        base: Handle<Set>,
        predicate: Handle<Expr>,
    },
    /// The `count` members of `base` with the smallest (or largest) values, ties to the
    /// lower index; all of them when there are fewer.
    Extreme {
        base: Handle<Set>,
        count: Handle<Expr>,
        largest: bool,
    },
    /// `count` members of `base` drawn without replacement with probability proportional
    /// to `exp(log_weight)`, from the seeded stream of (seed, site, anchor).
    Sample {
        base: Handle<Set>,
        count: Handle<Expr>,
        log_weight: Handle<Expr>,
        site: u32,
    },
    /// Members of either set (same space and value).
    Union {
        left: Handle<Set>,
        right: Handle<Set>,
    },
    /// `primary`, or `fallback` when `primary` is empty.
    Fallback {
        primary: Handle<Set>,
        fallback: Handle<Set>,
    },
    /// Every pair of a member of `left` and a member of `right`.
    Cross {
        left: Handle<Set>,
        right: Handle<Set>,
    },
    /// The anchors of the block that are not skipped.
    Anchors,
    /// The anchors of the block that are skipped.
    Skipped,
    /// The entries of a vector.
    VectorEntries,
}

// ---- expressions -----------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub ty: Type,
    pub level: Level,
}

/// A float that compares and hashes by its bits, so constants can be interned.
#[derive(Debug, Clone, Copy)]
pub struct Real(pub f64);

impl PartialEq for Real {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}
impl Eq for Real {}
impl std::hash::Hash for Real {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.to_bits().hash(state)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// `p`: the member of the cross set's left set.
    Left,
    /// `q`: the member of its right set.
    Right,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Axis {
    Row,
    Col,
}

/// Where a reduction runs: over one anchor's members, or over the whole batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    Row(Handle<Block>),
    Batch,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ExprKind {
    Const(Real),
    Bool(bool),
    /// `n`, the number of samples.
    BatchSize,
    /// The current member's entry of a matrix.
    Entry(Handle<Matrix>),
    /// The row and column have the same label.
    Same,
    /// The column is the row itself (a sample and itself, a sample and its own group).
    IsSelf,
    /// The current member's row or column index.
    Index(Axis),
    /// The size of the group at the row or column.
    GroupSize {
        groups: Handle<Grouping>,
        axis: Axis,
    },
    /// A per-member value taken at the left (`p`) or right (`q`) member of a cross pair.
    CrossSide {
        side: Side,
        value: Handle<Expr>,
    },
    Unary {
        op: UnaryOp,
        arg: Handle<Expr>,
    },
    Binary {
        op: BinaryOp,
        lhs: Handle<Expr>,
        rhs: Handle<Expr>,
    },
    Select {
        cond: Handle<Expr>,
        then: Handle<Expr>,
        otherwise: Handle<Expr>,
    },
    /// The value, with zero gradient.
    Stop(Handle<Expr>),
    Reduce {
        op: ReduceOp,
        set: Handle<Set>,
        body: Handle<Expr>,
        scope: Scope,
    },
    /// The value at position `k` (0-based) of the set's values sorted ascending.
    Rank {
        set: Handle<Set>,
        k: Handle<Expr>,
        scope: Scope,
    },
    /// The histogram of the set's values over `bins` nodes spread evenly on [lo, hi], by
    /// linear interpolation between the two nearest nodes (values clamped into range).
    Hist {
        set: Handle<Set>,
        bins: u32,
        lo: Real,
        hi: Real,
        scope: Scope,
    },
    /// Of the `count` members of `set` with the smallest (or largest) values, ties to the
    /// lower index (the members an `Extreme` set keeps), the last: its value, row or column
    /// (batch level, over a matrix's entries). With it a batch-level `smallest` becomes a
    /// filter a row pass can apply, `v < value or v == value and (i, j) <= (row, col)`.
    /// No member kept gives (-inf, or +inf when `largest`; -1; -1).
    Cut {
        set: Handle<Set>,
        count: Handle<Expr>,
        largest: bool,
        part: CutPart,
    },
    /// Running sum of a vector.
    Cumsum(Handle<Expr>),
    /// Running sum from the end (the adjoint of `Cumsum`).
    ReverseCumsum(Handle<Expr>),
    /// The member chosen by `min`, `max` or `rank` (gradient pass only).
    ArgReduce {
        op: ArgOp,
        set: Handle<Set>,
        body: Handle<Expr>,
        scope: Scope,
    },
    /// The member value `value` evaluated at the member `at` (gradient pass only).
    At {
        value: Handle<Expr>,
        at: Handle<Expr>,
    },
    /// The derivative of `hist` with respect to one member: the difference of the
    /// adjoint vector at the member's two nodes, over the node spacing (gradient pass only).
    HistSlope {
        adjoint: Handle<Expr>,
        value: Handle<Expr>,
        bins: u32,
        lo: Real,
        hi: Real,
    },
}

/// Which part of the last kept member a [`ExprKind::Cut`] gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CutPart {
    Value,
    Row,
    Col,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ArgOp {
    Min,
    Max,
    /// The member at the position given by the expression.
    Rank(Handle<Expr>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    Neg,
    Not,
    Exp,
    Log,
    Log1p,
    Sqrt,
    Softplus,
    Sigmoid,
    Relu,
    Abs,
    Floor,
    /// `1` where the argument is positive, else `0` (the derivative of relu).
    Step,
}

impl UnaryOp {
    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Not => "not",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Log1p => "log1p",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Softplus => "softplus",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Relu => "relu",
            UnaryOp::Abs => "abs",
            UnaryOp::Floor => "floor",
            UnaryOp::Step => "step",
        }
    }

    pub fn apply(self, x: f64) -> f64 {
        match self {
            UnaryOp::Neg => -x,
            UnaryOp::Not => f64::from(x == 0.0),
            UnaryOp::Exp => x.exp(),
            UnaryOp::Log => x.ln(),
            UnaryOp::Log1p => x.ln_1p(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Softplus => softplus(x),
            UnaryOp::Sigmoid => sigmoid(x),
            UnaryOp::Relu => x.max(0.0),
            UnaryOp::Abs => x.abs(),
            UnaryOp::Floor => x.floor(),
            UnaryOp::Step => f64::from(x > 0.0),
        }
    }
}

/// `log(1 + exp(x))` without overflow.
pub fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// `1 / (1 + exp(-x))` without overflow.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    /// `lhs ^ rhs`, the exponent a constant.
    Pow,
    /// Elementwise minimum; ties take the left operand's gradient.
    Min,
    /// Elementwise maximum; ties take the left operand's gradient.
    Max,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    And,
    Or,
}

impl BinaryOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinaryOp::Add => "+",
            BinaryOp::Sub => "-",
            BinaryOp::Mul => "*",
            BinaryOp::Div => "/",
            BinaryOp::Pow => "^",
            BinaryOp::Min => "min",
            BinaryOp::Max => "max",
            BinaryOp::Lt => "<",
            BinaryOp::Le => "<=",
            BinaryOp::Gt => ">",
            BinaryOp::Ge => ">=",
            BinaryOp::Eq => "==",
            BinaryOp::Ne => "!=",
            BinaryOp::And => "and",
            BinaryOp::Or => "or",
        }
    }

    pub fn is_predicate(self) -> bool {
        !matches!(
            self,
            BinaryOp::Add
                | BinaryOp::Sub
                | BinaryOp::Mul
                | BinaryOp::Div
                | BinaryOp::Pow
                | BinaryOp::Min
                | BinaryOp::Max
        )
    }

    pub fn apply(self, a: f64, b: f64) -> f64 {
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
            BinaryOp::Pow => power(a, b),
            BinaryOp::Min => {
                if b < a {
                    b
                } else {
                    a
                }
            }
            BinaryOp::Max => {
                if b > a {
                    b
                } else {
                    a
                }
            }
            BinaryOp::Lt => f64::from(a < b),
            BinaryOp::Le => f64::from(a <= b),
            BinaryOp::Gt => f64::from(a > b),
            BinaryOp::Ge => f64::from(a >= b),
            BinaryOp::Eq => f64::from(a == b),
            BinaryOp::Ne => f64::from(a != b),
            BinaryOp::And => f64::from(a != 0.0 && b != 0.0),
            BinaryOp::Or => f64::from(a != 0.0 || b != 0.0),
        }
    }
}

/// `a ^ b`, exact repeated multiplication for small integer exponents.
pub fn power(a: f64, b: f64) -> f64 {
    if b == b.trunc() && b.abs() <= 64.0 {
        a.powi(b as i32)
    } else {
        a.powf(b)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Mean,
    Min,
    Max,
    Count,
    /// `log sum exp`, max-shifted; `-inf` for an empty set.
    Lse,
    /// Population standard deviation.
    Std,
}

impl ReduceOp {
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Mean => "mean",
            ReduceOp::Min => "min",
            ReduceOp::Max => "max",
            ReduceOp::Count => "count",
            ReduceOp::Lse => "lse",
            ReduceOp::Std => "std",
        }
    }

    /// The reduction of `values` (of `count` members: a count needs no values), every
    /// operation's result passed through `round` (the run's float type). Sums run in
    /// member order; the minimum and maximum keep the first extreme and any NaN; the
    /// log-sum-exp is max-shifted and is the maximum itself when that is not finite.
    pub fn fold(self, values: &[f64], count: usize, round: impl Fn(f64) -> f64) -> f64 {
        let r = &round;
        let sum = |values: &[f64]| values.iter().fold(0.0, |acc, &v| r(acc + v));
        match self {
            ReduceOp::Count => count as f64,
            ReduceOp::Sum => sum(values),
            ReduceOp::Mean => r(sum(values) / count as f64),
            ReduceOp::Min => {
                values.iter().fold(
                    f64::INFINITY,
                    |acc, &v| if v < acc || v.is_nan() { v } else { acc },
                )
            }
            ReduceOp::Max => values.iter().fold(f64::NEG_INFINITY, |acc, &v| {
                if v > acc || v.is_nan() { v } else { acc }
            }),
            ReduceOp::Lse => {
                let max = values.iter().fold(f64::NEG_INFINITY, |acc, &v| acc.max(v));
                if !max.is_finite() {
                    max
                } else {
                    let total = values
                        .iter()
                        .fold(0.0, |acc, &v| r(acc + r(r(v - max).exp())));
                    r(max + r(total.ln()))
                }
            }
            ReduceOp::Std => {
                let mean = r(sum(values) / count as f64);
                let squares = values.iter().fold(0.0, |acc, &v| {
                    let d = r(v - mean);
                    r(acc + r(d * d))
                });
                r(r(squares / count as f64).sqrt())
            }
        }
    }

    /// Whether the reduction of an empty set has no value (an error at run time).
    pub fn needs_members(self) -> bool {
        matches!(self, ReduceOp::Mean | ReduceOp::Std)
    }
}

impl Entity for Grouping {
    const PREFIX: &'static str = "g";
}
impl Entity for Tensor {
    const PREFIX: &'static str = "t";
}
impl Entity for Matrix {
    const PREFIX: &'static str = "m";
}
impl Entity for Block {
    const PREFIX: &'static str = "row";
}
impl Entity for Set {
    const PREFIX: &'static str = "s";
}
impl Entity for Expr {
    const PREFIX: &'static str = "e";
}
