//! losscc: a compiler for deep-metric-learning losses.
//!
//! A loss is a short spec: which pairs of a batch to compare, which to mine, how to weight
//! them and how to aggregate. losscc turns it into a function of the embeddings `x` and
//! the labels that returns the loss, its statistics and `dL/dx`. The stages, each a module
//! with its own error type, are:
//!
//! 1. [`syntax`]: the pest grammar (`grammar/loss.pest`) gives an AST whose nodes carry
//!    byte spans; `use` pulls in other specs, `fn` helpers are inlined later. The formatter
//!    prints the canonical form.
//! 2. [`ir`]: lowering resolves names, folds parameters, infers every value's level and
//!    type, and rejects what cannot be evaluated (a reduction over a set proven empty, a
//!    member value used outside its set). Errors become [`diagnostic`]s with the source
//!    line and a caret; the spans live in side tables, not in the IR.
//! 3. [`grad`]: reverse-mode differentiation from IR to IR. The adjoints are expressions
//!    in the same arenas; per-member weights end in scatters into the adjoints of the pair
//!    matrices, and tensor steps carry those back to `x`.
//! 4. [`opt`]: plans for the compiled backend, which moves batch-level work over pairs
//!    into per-row passes (a batch-level `smallest` of entries chosen by labels becomes a
//!    filter against its cut, a batch value), takes batch-level factors out of scatter
//!    weights into the
//!    scales of adjoint slots (so scatters run in the forward's row pass) and per-anchor
//!    ones read from the scattered set into row scales (so the set's count runs in the
//!    scatters' loop), compares the arguments of increasing functions against inverted
//!    constants, and schedules the result in phases.
//! 5. [`interp`]: the reference evaluator, in float64 (or rounding like float32), for
//!    every module: the oracle of the golden, finite-difference and JIT tests.
//! 6. [`jit`]: one Cranelift function per row phase: one anchor's row end to end, with
//!    its sets as loops (a vector of lanes at a time where the body allows, their
//!    constants read from a table rather than held in registers, dense rows compacted by
//!    shuffles), its reductions fused where they share a set, its scatters writing the
//!    row of `dL/dM`.
//! 7. [`runtime`]: validates batches, computes groupings and tensors, runs the GEMMs
//!    (`X X^T`, `(G + G^T) X`), finds the cuts between the row passes, shares anchors out
//!    between threads and falls back to the interpreter when a kernel reports a condition
//!    it does not decide (an empty mean that the result reads, say). [`Loss`] is the embedding API; `src/main.rs` the `losscc` command.
//!
//! The IR ([`ir::Module`]) is a set of typed arenas: groupings, tensors, matrices, blocks
//! (per-anchor row loops), sets and expressions, each node named by a typed
//! [`ir::arena::Handle`] and printed as `g0`, `t1`, `m0`, `row0`, `s3`, `e12`. Its
//! invariants, checked once by [`ir::validate`] so that later stages index without
//! checks:
//!
//! - a node refers only to nodes created before it, so arena order is a topological
//!   order (evaluation front to back, differentiation back to front);
//! - every expression has a level (constant, batch, anchor row, set member, cross pair)
//!   no lower than its operands' except through a reduction, and a type (number,
//!   condition, index, fixed-length vector);
//! - nodes are hash-consed: an expression is built once, so equal handles mean equal
//!   values;
//! - a batch value that feeds a row loop is computed in an earlier phase of the
//!   schedule than the loop, never inside it.

pub mod diagnostic;

/// The shipped loss family, embedded: (name, spec text).
pub mod library {
    include!(concat!(env!("OUT_DIR"), "/library.rs"));

    /// The text of a shipped loss.
    pub fn find(name: &str) -> Option<&'static str> {
        LIBRARY
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, text)| *text)
    }
}
pub mod grad;
pub mod interp;
pub mod ir;
pub mod jit;
pub mod opt;
pub mod runtime;
pub mod syntax;

use diagnostic::{Diagnostic, Sources};
use std::path::Path;

/// Any error of the front end (loading, parsing, lowering), with what it needs to be shown.
#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    #[error(transparent)]
    Load(#[from] syntax::LoadError),
    #[error(transparent)]
    Lower(#[from] ir::LowerError),
    #[error("internal compiler error: {0}")]
    Invalid(#[from] ir::ValidationError),
}

impl FrontError {
    pub fn to_diagnostic(&self) -> Option<Diagnostic> {
        match self {
            FrontError::Load(e) => e.to_diagnostic(),
            FrontError::Lower(e) => Some(e.to_diagnostic()),
            FrontError::Invalid(_) => None,
        }
    }
}

pub use runtime::engine::{Loss, Options, Output, Stages};

/// The README's Rust examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// An error of compiling or running a loss, as a library user sees it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A mistake in a spec, with its diagnostic rendered against the spec's text.
    #[error("{rendered}")]
    Spec { error: FrontError, rendered: String },
    #[error(transparent)]
    Grad(#[from] grad::GradError),
    #[error(transparent)]
    Run(#[from] runtime::RunError),
}

impl Error {
    pub fn spec(sources: &Sources, error: FrontError) -> Error {
        let rendered = render(sources, &error);
        Error::Spec { error, rendered }
    }
}

/// A loaded spec: its sources (for diagnostics) and its parsed files.
#[derive(Debug, Clone)]
pub struct Spec {
    pub sources: Sources,
    pub program: syntax::Program,
}

impl Spec {
    /// Reads the spec at `path` and the specs it uses (found beside it).
    pub fn load(path: &Path) -> Result<Spec, (Sources, FrontError)> {
        let mut sources = Sources::new();
        match syntax::load_program(path, &mut sources) {
            Ok(program) => Ok(Spec { sources, program }),
            Err(e) => Err((sources, e.into())),
        }
    }

    /// Parses a spec given as text; `use` finds the shipped losses.
    pub fn from_source(name: &str, source: &str) -> Result<Spec, Error> {
        let mut sources = Sources::new();
        let stem = name.strip_suffix(".loss").unwrap_or(name);
        let loaded = syntax::load_source(name, stem, source.to_string(), &mut sources, |used| {
            library::find(used).map(|text| (format!("losses/{used}.loss"), text.to_string()))
        });
        match loaded {
            Ok(program) => Ok(Spec { sources, program }),
            Err(e) => Err(Error::spec(&sources, e.into())),
        }
    }

    /// The IR of the spec's loss with the given parameter overrides, validated.
    pub fn lower(&self, overrides: &ir::Params) -> Result<ir::Module, FrontError> {
        let module = ir::rewrite::prune(&ir::lower(&self.program, overrides)?);
        ir::validate(&module)?;
        Ok(module)
    }

    /// An error rendered against this spec's sources.
    pub fn render(&self, error: &FrontError) -> String {
        render(&self.sources, error)
    }
}

/// An error as text: the diagnostic with its source line and caret when it has one.
pub fn render(sources: &Sources, error: &FrontError) -> String {
    match error.to_diagnostic() {
        Some(d) => sources.render(&d),
        None => format!("error: {error}\n"),
    }
}
