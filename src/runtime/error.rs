//! Errors of evaluating a loss on a batch, shared by every backend so that they fail alike.

use super::batch::InputError;
use super::groups::GroupError;
use super::sample::SampleError;
use crate::diagnostic::{Code, Diagnostic};
use crate::ir::{Expr, Handle, Module, Set, Tensor};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Groups(#[from] GroupError),
    #[error("`{op}` over an empty set{}", at_anchor(*anchor))]
    EmptyReduction {
        op: &'static str,
        expr: Handle<Expr>,
        anchor: Option<usize>,
    },
    #[error("rank {k} of a set of {count} members{}", at_anchor(*anchor))]
    RankOutOfRange {
        k: f64,
        count: usize,
        expr: Handle<Expr>,
        anchor: Option<usize>,
    },
    #[error("a count must be a non-negative integer, found {value}{}", at_anchor(*anchor))]
    BadCount {
        value: f64,
        set: Handle<Set>,
        anchor: Option<usize>,
    },
    #[error("columns {start}..{end} do not fit an embedding of {cols} columns")]
    ColumnsOutOfRange {
        start: usize,
        end: usize,
        cols: usize,
        tensor: Handle<Tensor>,
    },
    #[error(
        "a partition into parts of {sum} columns in all does not fit an embedding of {cols} columns"
    )]
    PartitionWidth {
        sum: usize,
        cols: usize,
        tensor: Handle<Tensor>,
    },
    #[error("row {row} has zero length and cannot be normalised")]
    ZeroRow { row: usize, tensor: Handle<Tensor> },
    #[error("sampling{}: {error}", at_anchor(Some(*anchor)))]
    Sampling {
        anchor: usize,
        set: Handle<Set>,
        error: SampleError,
    },
    #[error("the {what} is {value}{}", origin.map(|o| o.describe()).unwrap_or_default())]
    NotFinite {
        what: String,
        value: f64,
        origin: Option<Origin>,
    },
    /// An evaluation the IR's invariants rule out: a bug in losscc.
    #[error("internal error: {what}")]
    Internal { what: String },
}

/// Where a non-finite value first arose from finite inputs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Origin {
    pub expr: Handle<Expr>,
    pub anchor: Option<usize>,
    pub value: f64,
    /// Whether it is a reduction over an empty set.
    pub empty_set: bool,
}

impl Origin {
    fn describe(&self) -> String {
        let what = if self.empty_set {
            "a reduction over an empty set"
        } else {
            "an operation on finite values"
        };
        format!(": {what}{} gives {}", at_anchor(self.anchor), self.value)
    }
}

fn at_anchor(anchor: Option<usize>) -> String {
    anchor
        .map(|a| format!(" at anchor {a}"))
        .unwrap_or_default()
}

impl RunError {
    pub fn code(&self) -> Code {
        Code(match self {
            RunError::Input(_) => 101,
            RunError::Groups(_) => 102,
            RunError::EmptyReduction { .. } => 103,
            RunError::RankOutOfRange { .. } => 104,
            RunError::BadCount { .. } => 105,
            RunError::ColumnsOutOfRange { .. } | RunError::PartitionWidth { .. } => 106,
            RunError::ZeroRow { .. } => 107,
            RunError::Sampling { .. } => 108,
            RunError::NotFinite { .. } => 109,
            RunError::Internal { .. } => 199,
        })
    }

    /// The diagnostic pointing at the part of the spec that failed, when there is one.
    pub fn to_diagnostic(&self, module: &Module) -> Option<Diagnostic> {
        let spans = &module.spans;
        let (span, label, help) = match self {
            RunError::EmptyReduction { expr, .. } => (
                spans.exprs.get(*expr)?,
                "this reduction",
                Some("skip such anchors first, e.g. `skip if empty(pos)`"),
            ),
            RunError::RankOutOfRange { expr, .. } => (
                spans.exprs.get(*expr)?,
                "this rank",
                Some("the batch has too few members for this rank; lower `k`"),
            ),
            RunError::BadCount { set, .. } | RunError::Sampling { set, .. } => {
                (spans.sets.get(*set)?, "this set", None)
            }
            RunError::NotFinite {
                origin: Some(origin),
                ..
            } => (
                spans.exprs.get(origin.expr)?,
                "not finite here",
                Some(if origin.empty_set {
                    "`min`, `max` and `lse` of an empty set are +inf, -inf and -inf; skip such anchors first, e.g. `skip if empty(pos)`"
                } else {
                    "a log of 0, a division by 0 or an overflowing exp"
                }),
            ),
            RunError::ColumnsOutOfRange { tensor, .. }
            | RunError::PartitionWidth { tensor, .. }
            | RunError::ZeroRow { tensor, .. } => {
                (spans.tensors.get(*tensor)?, "this embedding", None)
            }
            _ => return None,
        };
        let diagnostic = Diagnostic::error(self.code(), self.to_string(), *span).with_label(label);
        Some(match help {
            Some(h) => diagnostic.with_help(h),
            None => diagnostic,
        })
    }
}
