//! The front end: source text -> AST, and AST -> canonical text.

pub mod ast;
mod fmt;
mod load;
mod parser;

pub use fmt::{expr as format_expr, format_file, format_number};
pub use load::{LoadError, ParsedFile, Program, load_program, load_source};
pub use parser::parse;

use crate::diagnostic::{Code, Diagnostic, Span};

/// Errors of the parsing stage.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParseError {
    #[error("syntax error: {message}")]
    Syntax { message: String, span: Span },
    #[error("number literal overflows")]
    NumberOverflow { span: Span },
    #[error("doc comment documents nothing")]
    StrayDoc { span: Span },
    /// A parse tree that does not match the grammar's shape: a bug in losscc, never the user's.
    #[error("internal parser error: {what}")]
    Internal { what: String },
}

impl ParseError {
    pub fn to_diagnostic(&self) -> Diagnostic {
        match self {
            ParseError::Syntax { message, span } => {
                // The message says what was expected; the label what was found there.
                let label = match message.rsplit_once(", found ") {
                    Some((_, found)) => {
                        format!("unexpected {}", found.trim_start_matches("the "))
                    }
                    None => message.clone(),
                };
                Diagnostic::error(Code(1), format!("syntax error: {message}"), *span)
                    .with_label(label)
            }
            ParseError::NumberOverflow { span } => {
                Diagnostic::error(Code(20), "number literal is too large", *span)
                    .with_label("not a finite number")
            }
            ParseError::StrayDoc { span } => {
                Diagnostic::error(Code(2), "doc comment documents nothing", *span)
                    .with_label("`///` documents the `loss` or `fn` that follows it")
                    .with_help("use `//` for a comment inside a block")
            }
            ParseError::Internal { what } => Diagnostic::error(
                Code(1),
                format!("internal parser error: {what}"),
                Span::default(),
            ),
        }
    }
}
