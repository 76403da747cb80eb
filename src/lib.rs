//! losscc: a compiler for deep-metric-learning losses.
//! (The essay on the pipeline is written once the pipeline exists.)

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
