//! Loading a spec and, transitively, the specs it `use`s.

use super::ast::SourceFile;
use super::{ParseError, parse};
use crate::diagnostic::{Code, Diagnostic, FileId, Sources, Span};
use std::path::{Path, PathBuf};

/// A parsed file and the name other specs `use` it by (its file stem).
#[derive(Debug, Clone)]
pub struct ParsedFile {
    pub file: FileId,
    pub name: String,
    pub ast: SourceFile,
}

/// A spec and every spec it uses, parsed; `main` is the spec itself.
#[derive(Debug, Clone)]
pub struct Program {
    pub files: Vec<ParsedFile>,
    pub main: usize,
}

impl Program {
    pub fn main_file(&self) -> &ParsedFile {
        &self.files[self.main]
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {message}")]
    Io { path: String, message: String },
    #[error(transparent)]
    Parse(#[from] ParseError),
    #[error("cannot find the spec `{name}` that this file uses")]
    MissingUse {
        name: String,
        span: Span,
        looked_for: String,
    },
    #[error("`{name}` uses itself")]
    Cycle { name: String, span: Span },
}

impl LoadError {
    /// The diagnostic, when the error points into a spec.
    pub fn to_diagnostic(&self) -> Option<Diagnostic> {
        match self {
            LoadError::Io { .. } => None,
            LoadError::Parse(e) => Some(e.to_diagnostic()),
            LoadError::MissingUse {
                span, looked_for, ..
            } => Some(
                Diagnostic::error(Code(15), self.to_string(), *span)
                    .with_label("used here")
                    .with_note(format!("looked for {looked_for}")),
            ),
            LoadError::Cycle { span, .. } => Some(
                Diagnostic::error(Code(16), self.to_string(), *span)
                    .with_label("this `use` closes a cycle"),
            ),
        }
    }
}

/// The stem of a path, which is the name a spec is used by.
fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Reads and parses the spec at `path` and the specs it uses, found beside it as `NAME.loss`.
pub fn load_program(path: &Path, sources: &mut Sources) -> Result<Program, LoadError> {
    let source = std::fs::read_to_string(path).map_err(|e| LoadError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    load_source(
        &path.display().to_string(),
        &stem(path),
        source,
        sources,
        |name| {
            let candidate = dir.join(format!("{name}.loss"));
            let text = std::fs::read_to_string(&candidate).ok()?;
            Some((candidate.display().to_string(), text))
        },
    )
}

/// Parses `source` (shown as `display_name`, used as `name`) and the specs it uses, which
/// `resolve` finds by name as (display name, text).
pub fn load_source(
    display_name: &str,
    name: &str,
    source: String,
    sources: &mut Sources,
    resolve: impl Fn(&str) -> Option<(String, String)>,
) -> Result<Program, LoadError> {
    let file = sources.add(display_name, source);
    let ast = parse(sources.source(file), file)?;
    let mut program = Program {
        files: vec![ParsedFile {
            file,
            name: name.to_string(),
            ast,
        }],
        main: 0,
    };
    let mut pending = vec![0usize];
    while let Some(index) = pending.pop() {
        let uses = program.files[index].ast.uses.clone();
        for used in uses {
            if program.files.iter().any(|f| f.name == used.name) {
                if program.files[0].name == used.name {
                    return Err(LoadError::Cycle {
                        name: used.name.clone(),
                        span: used.span,
                    });
                }
                continue;
            }
            let Some((display, text)) = resolve(&used.name) else {
                let dir_note = PathBuf::from(format!("{}.loss", used.name));
                return Err(LoadError::MissingUse {
                    name: used.name.clone(),
                    span: used.span,
                    looked_for: format!("`{}` beside the spec", dir_note.display()),
                });
            };
            let file = sources.add(display, text);
            let ast = parse(sources.source(file), file)?;
            program.files.push(ParsedFile {
                file,
                name: used.name.clone(),
                ast,
            });
            pending.push(program.files.len() - 1);
        }
    }
    Ok(program)
}
