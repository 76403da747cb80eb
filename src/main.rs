//! The `losscc` command line: check, inspect, format, run and benchmark loss specs.

use clap::{Parser, Subcommand, ValueEnum};
use losscc::Spec;
use losscc::ir::{ParamValue, Params};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "losscc",
    version,
    about = "A compiler for deep-metric-learning losses"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check specs for errors; exit status 1 when any has one.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print a stage of the compilation of a spec.
    Compile {
        file: PathBuf,
        #[arg(long, value_enum, default_value = "ir")]
        emit: Emit,
        /// Override a parameter: `--set k=8`, `--set slices=[0,8,16]`.
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<String>,
    },
    /// List the losses of a directory with their parameters and one-line docs.
    List {
        #[arg(default_value = "losses")]
        dir: PathBuf,
    },
    /// Print the canonical form of a spec.
    Fmt { file: PathBuf },
}

#[derive(Clone, Copy, ValueEnum)]
enum Emit {
    Ast,
    Ir,
    Grad,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { files } => check(&files),
        Command::Compile { file, emit, set } => compile(&file, emit, &set),
        Command::List { dir } => list(&dir),
        Command::Fmt { file } => fmt(&file),
    };
    match result {
        Ok(text) => {
            // A closed pipe (`losscc list | head`) is not an error of ours.
            let mut stdout = std::io::stdout().lock();
            let _ = stdout
                .write_all(text.as_bytes())
                .and_then(|()| stdout.flush());
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprint!("{message}");
            if !message.ends_with('\n') {
                eprintln!();
            }
            ExitCode::FAILURE
        }
    }
}

/// A command's standard output, or its error message rendered for stderr. Output is
/// written only once the command has succeeded, so nothing is half-written.
type Outcome = Result<String, String>;

fn load(path: &Path) -> Result<Spec, String> {
    Spec::load(path).map_err(|(sources, e)| losscc::render(&sources, &e))
}

fn check(files: &[PathBuf]) -> Outcome {
    let mut failures = String::new();
    for file in files {
        let outcome = load(file).and_then(|spec| {
            spec.lower(&Params::new())
                .map(|_| ())
                .map_err(|e| spec.render(&e))
        });
        if let Err(message) = outcome {
            failures.push_str(&message);
        }
    }
    if failures.is_empty() {
        Ok(String::new())
    } else {
        Err(failures)
    }
}

fn compile(file: &Path, emit: Emit, set: &[String]) -> Outcome {
    let spec = load(file)?;
    match emit {
        Emit::Ast => Ok(format!("{:#?}\n", spec.program.main_file().ast)),
        Emit::Ir | Emit::Grad => {
            let overrides = parse_overrides(set)?;
            let module = spec.lower(&overrides).map_err(|e| spec.render(&e))?;
            if let Emit::Ir = emit {
                let roots: Vec<_> =
                    std::iter::once(module.loss_expr()).chain(module.stats.iter().map(|s| s.1)).collect();
                let schedule = losscc::ir::schedule(&module, &roots, &[]);
                return Ok(losscc::ir::print_module(&module) + &losscc::ir::print_schedule(&schedule));
            }
            let gradient = losscc::grad::differentiate(&module).map_err(|e| format!("error: {e}\n"))?;
            Ok(losscc::grad::print_gradient(&gradient))
        }
    }
}

/// `NAME=VALUE` pairs: a number or a bracketed list of numbers.
fn parse_overrides(set: &[String]) -> Result<Params, String> {
    set.iter()
        .map(|item| {
            let (name, value) = item
                .split_once('=')
                .ok_or_else(|| format!("error: `--set {item}` is not NAME=VALUE"))?;
            let value = value.trim();
            let number = |text: &str| {
                text.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .ok_or_else(|| {
                        format!(
                            "error: `--set {item}`: `{}` is not a finite number",
                            text.trim()
                        )
                    })
            };
            let parsed = match value.strip_prefix('[').and_then(|v| v.strip_suffix(']')) {
                Some(inner) if inner.trim().is_empty() => ParamValue::List(Vec::new()),
                Some(inner) => {
                    ParamValue::List(inner.split(',').map(number).collect::<Result<_, _>>()?)
                }
                None => ParamValue::Num(number(value)?),
            };
            Ok((name.trim().to_string(), parsed))
        })
        .collect()
}

fn list(dir: &Path) -> Outcome {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("error: cannot read {}: {e}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "loss"))
        .collect();
    paths.sort();
    let mut failures = String::new();
    let mut out = String::new();
    for path in paths {
        match load(&path) {
            Ok(spec) => {
                let file = spec.program.main_file();
                match losscc::ir::entry_loss(file) {
                    Ok(loss) => {
                        let params: Vec<String> = loss
                            .params
                            .iter()
                            .map(|p| {
                                format!(
                                    "{} = {}",
                                    p.name.name,
                                    losscc::syntax::format_expr(&p.default)
                                )
                            })
                            .collect();
                        let _ = writeln!(out, "{}({})", loss.name.name, params.join(", "));
                        let _ = writeln!(out, "    {}", loss.summary());
                    }
                    Err(e) => failures.push_str(&spec.render(&e.into())),
                }
            }
            Err(message) => failures.push_str(&message),
        }
    }
    if failures.is_empty() {
        Ok(out)
    } else {
        Err(failures)
    }
}

fn fmt(file: &Path) -> Outcome {
    let spec = load(file)?;
    let main = spec.program.main_file();
    Ok(losscc::syntax::format_file(
        &main.ast,
        spec.sources.source(main.file),
    ))
}
