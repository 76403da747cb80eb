//! The diagnostics of malformed specs, snapshot-tested.
//!
//! Every file of `tests/malformed/*.loss` holds exactly one mistake, described by its first
//! line. Each is loaded and lowered through the library; the rendered error is checked for
//! a `file:line:col` location in the file itself and an error code, then snapshotted.
//! `tests/malformed/with_use/uses_*.loss` are the cases that `use` a shipped loss; the other
//! files of that folder are their dependencies (symlinks to `losses/`, or helpers).
//!
//! Paths are made relative to the crate root (where cargo runs tests), so snapshots are the
//! same on every machine.

use losscc::Spec;
use losscc::diagnostic::CODES;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The crate root, canonical (insta's glob hands out canonical paths).
fn root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    root.canonicalize().unwrap_or_else(|_| root.to_path_buf())
}

/// `path` relative to the crate root, with `/` separators.
fn relative(path: &Path) -> PathBuf {
    path.strip_prefix(root()).unwrap_or(path).to_path_buf()
}

/// Loads and lowers a spec with its default parameters; the rendered error, or `None` when
/// the spec compiles.
fn compile_error(path: &Path) -> Option<String> {
    match Spec::load(path) {
        Err((sources, error)) => Some(losscc::render(&sources, &error)),
        Ok(spec) => match spec.lower(&Vec::new()) {
            Ok(_) => None,
            Err(error) => Some(spec.render(&error)),
        },
    }
}

/// The `E00NN` of the first `error[E00NN]` in a rendered diagnostic.
fn error_code(rendered: &str) -> Option<&str> {
    let start = rendered.find("error[E")? + "error[".len();
    let code = rendered.get(start..start + 5)?;
    (code.len() == 5 && code[1..].bytes().all(|b| b.is_ascii_digit())).then_some(code)
}

/// The `LINE:COL` after `┌─ FILE:` in a rendered diagnostic, if it points into `file`.
fn location_in<'r>(rendered: &'r str, file: &str) -> Option<(&'r str, &'r str)> {
    let marker = format!("┌─ {file}:");
    let start = rendered.find(&marker)? + marker.len();
    let rest = rendered[start..].lines().next()?;
    let (line, col) = rest.split_once(':')?;
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (numeric(line) && numeric(col.trim_end())).then(|| (line, col.trim_end()))
}

/// Checks one malformed case and snapshots its diagnostic.
fn check_case(group: &str, path: &Path) {
    let path = relative(path);
    let shown = path.to_string_lossy().replace('\\', "/");
    let source = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{shown}: {e}"));
    let what = source
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("// "))
        .unwrap_or_else(|| {
            panic!("{shown}: the first line must be a `// ` comment saying what it tests")
        })
        .to_string();
    let Some(rendered) = compile_error(&path) else {
        panic!("{shown} compiles, but it should fail: {what}");
    };
    let code =
        error_code(&rendered).unwrap_or_else(|| panic!("{shown}: no error code in\n{rendered}"));
    assert!(
        CODES.iter().any(|(c, _)| c.to_string() == code),
        "{shown}: {code} is not a documented code"
    );
    assert!(
        location_in(&rendered, &shown).is_some(),
        "{shown}: the diagnostic does not point into the file itself:\n{rendered}"
    );
    insta::with_settings!({
        description => what,
        omit_expression => true,
    }, {
        insta::assert_snapshot!(group, rendered);
    });
}

#[test]
fn malformed() {
    insta::glob!("malformed/*.loss", |path| check_case("malformed", path));
}

#[test]
fn malformed_with_use() {
    insta::glob!("malformed/with_use/uses_*.loss", |path| {
        check_case("malformed_with_use", path)
    });
}

/// Every malformed case, in a stable order.
fn cases() -> Vec<PathBuf> {
    let mut cases = Vec::new();
    for (dir, prefix) in [
        ("tests/malformed", ""),
        ("tests/malformed/with_use", "uses_"),
    ] {
        for entry in std::fs::read_dir(dir).expect("the malformed corpus") {
            let path = entry.expect("a directory entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".loss") && name.starts_with(prefix) {
                cases.push(path);
            }
        }
    }
    cases.sort();
    cases
}

/// The corpus exercises every documented error code.
#[test]
fn corpus_covers_every_code() {
    let cases = cases();
    assert!(cases.len() >= 30, "only {} malformed cases", cases.len());
    let produced: BTreeSet<String> = cases
        .iter()
        .filter_map(|path| compile_error(path))
        .filter_map(|rendered| error_code(&rendered).map(str::to_string))
        .collect();
    let missing: Vec<String> = CODES
        .iter()
        .map(|(code, _)| code.to_string())
        .filter(|code| !produced.contains(code))
        .collect();
    assert!(missing.is_empty(), "no malformed case produces {missing:?}");
}

// ---- the command line --------------------------------------------------------------------

fn losscc(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_losscc"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("run losscc")
}

#[test]
fn cli_check_fails_on_malformed_specs() {
    for (file, code, excerpt) in [
        (
            "tests/malformed/unknown_name.loss",
            "error[E0003]",
            "did you mean `margin`?",
        ),
        (
            "tests/malformed/syntax_missing_paren.loss",
            "error[E0001]",
            "┌─ tests/malformed/syntax_missing_paren.loss:4:5",
        ),
        (
            "tests/malformed/level_row_at_batch.loss",
            "error[E0009]",
            "reduce it over anchors",
        ),
        (
            "tests/malformed/with_use/uses_unknown_parameter.loss",
            "error[E0007]",
            "its named arguments are: margin",
        ),
    ] {
        let out = losscc(&["check", file]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{file}: {stderr}");
        assert!(out.stdout.is_empty(), "{file}: check printed on stdout");
        assert!(stderr.contains(code), "{file}: no {code} in\n{stderr}");
        assert!(
            stderr.contains(excerpt),
            "{file}: no `{excerpt}` in\n{stderr}"
        );
    }
}

#[test]
fn cli_check_reports_every_failing_file() {
    let out = losscc(&[
        "check",
        "losses/triplet.loss",
        "tests/malformed/no_loss.loss",
        "tests/malformed/rebind_x.loss",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("error[E0011]"), "{stderr}");
    assert!(stderr.contains("error[E0004]"), "{stderr}");
}

#[test]
fn cli_check_accepts_every_shipped_loss() {
    let mut files: Vec<String> = std::fs::read_dir(root().join("losses"))
        .expect("losses/")
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "loss"))
        .map(|path| relative(&path).to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert!(!files.is_empty());
    let mut args = vec!["check"];
    args.extend(files.iter().map(String::as_str));
    let out = losscc(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}
