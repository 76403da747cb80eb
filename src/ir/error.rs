//! Errors of the lowering stage (AST -> IR), each pointing into the spec.

use crate::diagnostic::{Code, Diagnostic, Span};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LowerError {
    #[error("unknown name `{name}`")]
    UnknownName {
        name: String,
        span: Span,
        suggestion: Option<String>,
    },
    #[error("`{name}` is defined twice")]
    Duplicate {
        name: String,
        span: Span,
        previous: Option<Span>,
    },
    #[error("unknown function `{name}`")]
    UnknownFunction {
        name: String,
        span: Span,
        suggestion: Option<String>,
    },
    #[error("`{name}` takes {expected}, found {found}")]
    Arity {
        name: String,
        span: Span,
        expected: String,
        found: usize,
    },
    #[error("{message}")]
    NamedArgument {
        message: String,
        span: Span,
        help: String,
    },
    #[error("expected {expected}, found {found}")]
    Type {
        expected: String,
        found: String,
        span: Span,
        help: Option<String>,
    },
    #[error("{message}")]
    Level {
        message: String,
        span: Span,
        help: Option<String>,
    },
    #[error("{message}")]
    Placement {
        message: String,
        span: Span,
        help: Option<String>,
    },
    #[error("`{name}` never sets `loss`")]
    NoLoss { name: String, span: Span },
    #[error("{message}")]
    BadValue {
        message: String,
        span: Span,
        origin: Option<Span>,
    },
    #[error("`{reduction}` over a set that is always empty")]
    EmptySet {
        reduction: String,
        span: Span,
        reason: String,
    },
    #[error("{message}")]
    Mismatch {
        message: String,
        span: Span,
        help: Option<String>,
    },
    #[error("cannot find the spec `{name}` that this file uses")]
    MissingUse {
        name: String,
        span: Span,
        looked_for: String,
    },
    #[error("`{name}` uses or calls itself")]
    Recursion { name: String, span: Span },
    #[error("{message}")]
    NoEntry { message: String, span: Span },
    #[error("{message}")]
    Override {
        message: String,
        span: Span,
        help: Option<String>,
    },
    #[error("{message}")]
    Unsupported { message: String, span: Span },
    #[error("the constant {what} is not a finite number")]
    NotFinite { what: String, span: Span },
}

impl LowerError {
    pub fn span(&self) -> Span {
        match self {
            LowerError::UnknownName { span, .. }
            | LowerError::Duplicate { span, .. }
            | LowerError::UnknownFunction { span, .. }
            | LowerError::Arity { span, .. }
            | LowerError::NamedArgument { span, .. }
            | LowerError::Type { span, .. }
            | LowerError::Level { span, .. }
            | LowerError::Placement { span, .. }
            | LowerError::NoLoss { span, .. }
            | LowerError::BadValue { span, .. }
            | LowerError::EmptySet { span, .. }
            | LowerError::Mismatch { span, .. }
            | LowerError::MissingUse { span, .. }
            | LowerError::Recursion { span, .. }
            | LowerError::NoEntry { span, .. }
            | LowerError::Override { span, .. }
            | LowerError::Unsupported { span, .. }
            | LowerError::NotFinite { span, .. } => *span,
        }
    }

    pub fn code(&self) -> Code {
        Code(match self {
            LowerError::UnknownName { .. } => 3,
            LowerError::Duplicate { .. } => 4,
            LowerError::UnknownFunction { .. } => 5,
            LowerError::Arity { .. } => 6,
            LowerError::NamedArgument { .. } => 7,
            LowerError::Type { .. } => 8,
            LowerError::Level { .. } => 9,
            LowerError::Placement { .. } => 10,
            LowerError::NoLoss { .. } => 11,
            LowerError::BadValue { .. } => 12,
            LowerError::EmptySet { .. } => 13,
            LowerError::Mismatch { .. } => 14,
            LowerError::MissingUse { .. } => 15,
            LowerError::Recursion { .. } => 16,
            LowerError::NoEntry { .. } => 17,
            LowerError::Override { .. } => 18,
            LowerError::Unsupported { .. } => 19,
            LowerError::NotFinite { .. } => 20,
        })
    }

    pub fn to_diagnostic(&self) -> Diagnostic {
        let base = Diagnostic::error(self.code(), self.to_string(), self.span());
        match self {
            LowerError::UnknownName { suggestion, .. } => {
                let d = base.with_label("not defined here or above");
                match suggestion {
                    Some(s) => d.with_help(format!("did you mean `{s}`?")),
                    None => d,
                }
            }
            LowerError::Duplicate { name, previous, .. } => match previous {
                Some(p) => base
                    .with_label("defined again here")
                    .with_secondary(*p, "first defined here"),
                // Only the built-in names have no definition to point at.
                None => Diagnostic {
                    message: format!("`{name}` is a built-in name and cannot be redefined"),
                    ..base
                }
                .with_label("this name is built in")
                .with_help("choose another name"),
            },
            LowerError::UnknownFunction { suggestion, .. } => {
                let d = base.with_label("no built-in, `fn` or used loss has this name");
                match suggestion {
                    Some(s) => d.with_help(format!("did you mean `{s}`?")),
                    None => d.with_help("a loss from another file needs `use NAME` at the top"),
                }
            }
            LowerError::Arity { .. } => base.with_label("wrong number of arguments"),
            LowerError::NamedArgument { help, .. } => {
                base.with_label("this argument").with_help(help.clone())
            }
            LowerError::Type { expected, help, .. } => {
                let d = base.with_label(format!("expected {expected}"));
                match help {
                    Some(h) => d.with_help(h.clone()),
                    None => d,
                }
            }
            LowerError::Level { help, .. }
            | LowerError::Placement { help, .. }
            | LowerError::Mismatch { help, .. }
            | LowerError::Override { help, .. } => {
                let d = base.with_label("here");
                match help {
                    Some(h) => d.with_help(h.clone()),
                    None => d,
                }
            }
            LowerError::NoLoss { .. } => base
                .with_label("this loss")
                .with_help("add a statement `loss = ...` at the end of its body"),
            LowerError::BadValue { origin, .. } => {
                let d = base.with_label("this value");
                match origin {
                    Some(o) => d.with_secondary(*o, "set here"),
                    None => d,
                }
            }
            LowerError::EmptySet { reason, .. } => {
                base.with_label("this set").with_note(reason.clone())
            }
            LowerError::MissingUse { looked_for, .. } => base
                .with_label("used here")
                .with_note(format!("looked for {looked_for}")),
            LowerError::Recursion { .. } => base.with_label("this call closes a cycle"),
            LowerError::NoEntry { .. }
            | LowerError::Unsupported { .. }
            | LowerError::NotFinite { .. } => base.with_label("here"),
        }
    }
}
