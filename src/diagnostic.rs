//! Source locations and rendered diagnostics.
//!
//! Every stage reports errors through its own `thiserror` enum; the ones that point into a
//! spec convert into a [`Diagnostic`], which [`Sources::render`] prints the way rustc
//! does: `error[E0007]: message`, `--> file:line:col`, the source line and a caret.
//! The codes are listed, one line each, in [`CODES`] and in `docs/language.md`.

use codespan_reporting::diagnostic as cs;
use codespan_reporting::files::{Files, SimpleFiles};
use codespan_reporting::term;
use std::fmt;
use std::ops::Range;

/// A file loaded into [`Sources`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct FileId(pub u32);

/// A byte range in one source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Span {
    pub file: FileId,
    pub start: u32,
    pub end: u32,
}

impl Span {
    pub fn new(file: FileId, range: Range<usize>) -> Span {
        let clamp = |offset: usize| u32::try_from(offset).unwrap_or(u32::MAX);
        Span {
            file,
            start: clamp(range.start),
            end: clamp(range.end),
        }
    }

    /// The smallest span covering both (they must be in the same file).
    pub fn to(self, other: Span) -> Span {
        Span {
            file: self.file,
            start: self.start.min(other.start),
            end: self.end.max(other.end),
        }
    }

    pub fn range(self) -> Range<usize> {
        self.start as usize..self.end as usize
    }
}

/// The source files of one compilation: the spec and the specs it `use`s.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    files: SimpleFiles<String, String>,
    count: u32,
}

impl Sources {
    pub fn new() -> Sources {
        Sources::default()
    }

    pub fn add(&mut self, name: impl Into<String>, source: impl Into<String>) -> FileId {
        let id = self.files.add(name.into(), source.into());
        debug_assert_eq!(id, self.count as usize);
        self.count += 1;
        FileId(id as u32)
    }

    pub fn source(&self, file: FileId) -> &str {
        self.files
            .get(file.0 as usize)
            .map(|f| f.source().as_str())
            .unwrap_or("")
    }

    pub fn name(&self, file: FileId) -> &str {
        self.files
            .get(file.0 as usize)
            .map(|f| f.name().as_str())
            .unwrap_or("<unknown>")
    }

    /// `file:line:col` of the start of a span (1-based line and column).
    pub fn location(&self, span: Span) -> String {
        let id = span.file.0 as usize;
        match self.files.location(id, span.start as usize) {
            Ok(loc) => format!(
                "{}:{}:{}",
                self.name(span.file),
                loc.line_number,
                loc.column_number
            ),
            Err(_) => self.name(span.file).to_string(),
        }
    }

    /// The diagnostic as text, with source snippets and carets, without colour.
    pub fn render(&self, diagnostic: &Diagnostic) -> String {
        let config = term::Config::default();
        let rendered = term::emit_into_string(&config, &self.files, &diagnostic.to_codespan());
        rendered.unwrap_or_else(|_| format!("error[{}]: {}\n", diagnostic.code, diagnostic.message))
    }
}

/// An error code: a stable name for one kind of mistake, explained in [`CODES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Code(pub u16);

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "E{:04}", self.0)
    }
}

impl Code {
    /// The one-line explanation of the code.
    pub fn explanation(self) -> &'static str {
        CODES
            .iter()
            .find(|(code, _)| *code == self)
            .map(|(_, text)| *text)
            .unwrap_or("")
    }
}

/// Every error code and what it means.
pub const CODES: &[(Code, &str)] = &[
    (
        Code(1),
        "syntax error: the text does not follow the grammar",
    ),
    (Code(2), "a doc comment (`///`) that documents nothing"),
    (
        Code(3),
        "unknown name: not a parameter, a binding, an input or a built-in",
    ),
    (Code(4), "a name defined twice in the same scope"),
    (Code(5), "unknown function"),
    (Code(6), "wrong number of arguments"),
    (Code(7), "unknown or repeated named argument"),
    (
        Code(8),
        "type mismatch: a value of the wrong kind (number, boolean, set, embedding, list...)",
    ),
    (
        Code(9),
        "level error: a per-member value used outside a set, or a per-anchor value at batch level",
    ),
    (Code(10), "statement not allowed here"),
    (Code(11), "the spec sets no `loss`"),
    (
        Code(12),
        "bad parameter value (a count that is not a positive integer, slices not increasing...)",
    ),
    (Code(13), "a reduction over a set that is provably empty"),
    (
        Code(14),
        "mismatched pair matrices: values from matrices with different rows or columns combined",
    ),
    (Code(15), "`use` of a spec that cannot be found"),
    (Code(16), "recursive `use` or recursive call"),
    (
        Code(17),
        "the file defines no `loss`, or several and none named like the file; or a called spec defines no `loss`",
    ),
    (
        Code(18),
        "a parameter override that names no parameter or has the wrong type",
    ),
    (
        Code(19),
        "a construct the compiler does not support (a non-constant exponent, `count` of a list, `split` by other than `labels`...)",
    ),
    (
        Code(20),
        "a number that is not finite (overflow in a literal or a folded constant)",
    ),
];

/// How serious a diagnostic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// A message about a place in a spec, with optional secondary places, notes and a help line.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub code: Code,
    pub message: String,
    pub primary: Span,
    pub label: String,
    pub secondary: Vec<(Span, String)>,
    pub notes: Vec<String>,
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn error(code: Code, message: impl Into<String>, primary: Span) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            code,
            message: message.into(),
            primary,
            label: String::new(),
            secondary: Vec::new(),
            notes: Vec::new(),
            help: None,
        }
    }

    pub fn warning(code: Code, message: impl Into<String>, primary: Span) -> Diagnostic {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(code, message, primary)
        }
    }

    pub fn with_label(mut self, label: impl Into<String>) -> Diagnostic {
        self.label = label.into();
        self
    }

    pub fn with_secondary(mut self, span: Span, label: impl Into<String>) -> Diagnostic {
        self.secondary.push((span, label.into()));
        self
    }

    pub fn with_note(mut self, note: impl Into<String>) -> Diagnostic {
        self.notes.push(note.into());
        self
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = Some(help.into());
        self
    }

    fn to_codespan(&self) -> cs::Diagnostic<usize> {
        let base = match self.severity {
            Severity::Error => cs::Diagnostic::error(),
            Severity::Warning => cs::Diagnostic::warning(),
        };
        let mut labels = vec![
            cs::Label::primary(self.primary.file.0 as usize, self.primary.range())
                .with_message(self.label.clone()),
        ];
        labels.extend(self.secondary.iter().map(|(span, message)| {
            cs::Label::secondary(span.file.0 as usize, span.range()).with_message(message.clone())
        }));
        let mut notes = self.notes.clone();
        if let Some(help) = &self.help {
            notes.push(format!("help: {help}"));
        }
        base.with_code(self.code.to_string())
            .with_message(self.message.clone())
            .with_labels(labels)
            .with_notes(notes)
    }
}
