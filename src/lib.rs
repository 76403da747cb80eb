//! losscc: a compiler for deep-metric-learning losses.
//! (The essay on the pipeline is written once the pipeline exists.)

pub mod diagnostic;
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
