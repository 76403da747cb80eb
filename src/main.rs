//! The `losscc` command line: check, inspect, format, run and benchmark loss specs.

use clap::{Parser, Subcommand, ValueEnum};
use losscc::ir::{ParamValue, Params};
use losscc::runtime::engine::{Evaluator, Stages, default_threads};
use losscc::{Loss, Options, Spec};
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
    /// Evaluate a loss (and its gradient) on a batch; prints one JSON object.
    Run(RunArgs),
    /// Time compilation, forward and forward+backward on a seeded synthetic batch; prints
    /// one JSON object with medians in milliseconds.
    Bench(BenchArgs),
}

#[derive(clap::Args)]
struct BenchArgs {
    file: PathBuf,
    #[arg(long)]
    n: usize,
    #[arg(long)]
    d: usize,
    /// Members per class.
    #[arg(long = "per-class")]
    per_class: usize,
    #[arg(long, default_value_t = 20)]
    iters: usize,
    #[arg(long, value_enum, default_value = "jit")]
    backend: Backend,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: Dtype,
    #[arg(long)]
    threads: Option<usize>,
    /// Override a parameter, as for `run`.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<String>,
}

#[derive(clap::Args)]
struct RunArgs {
    file: PathBuf,
    /// Embeddings, n x d, float32 or float64 (.npy). Without it: a built-in demo batch.
    #[arg(long, requires = "labels")]
    x: Option<PathBuf>,
    /// Labels, n integers (.npy).
    #[arg(long, requires = "x")]
    labels: Option<PathBuf>,
    /// Override a parameter: `--set k=8`, `--set slices=[0,8,16]`.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<String>,
    /// Supply a named input: `--input groups=G.npy` (integers, one per row).
    #[arg(long = "input", value_name = "NAME=FILE")]
    input: Vec<String>,
    #[arg(long, value_enum, default_value = "jit")]
    backend: Backend,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: Dtype,
    /// Seed of k-means, sampling and random partitions (and of the demo batch).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write dL/dx here (.npy, in the run's dtype).
    #[arg(long)]
    grad_out: Option<PathBuf>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Backend {
    Jit,
    Interp,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Jit => "jit",
            Backend::Interp => "interp",
        }
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Dtype {
    F32,
    F64,
}

impl Dtype {
    fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F64 => "f64",
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Emit {
    Ast,
    Ir,
    Grad,
    /// The compiled backend's plan: the gradient with batch work split into row passes,
    /// scatter factors moved to the scales of adjoint slots, and its phases.
    Plan,
    Clif,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { files } => check(&files),
        Command::Compile { file, emit, set } => compile(&file, emit, &set),
        Command::List { dir } => list(&dir),
        Command::Fmt { file } => fmt(&file),
        Command::Run(args) => run(&args),
        Command::Bench(args) => bench(&args),
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
        Emit::Clif | Emit::Plan => {
            let overrides = parse_overrides(set)?;
            let loss = Loss::from_spec(&spec, &overrides).map_err(|e| format!("{e}"))?;
            let plan = loss.plan(true);
            if let Emit::Plan = emit {
                return Ok(losscc::grad::print_gradient(&plan.to_gradient()));
            }
            let precision = losscc::interp::Precision::F32;
            losscc::jit::emit_clif(plan, precision, losscc::jit::Target::Native)
                .map_err(|e| format!("error: {e}\n"))
        }
        Emit::Ir | Emit::Grad => {
            let overrides = parse_overrides(set)?;
            let module = spec.lower(&overrides).map_err(|e| spec.render(&e))?;
            if let Emit::Ir = emit {
                return Ok(losscc::ir::print_program(&module));
            }
            let gradient =
                losscc::grad::differentiate(&module).map_err(|e| format!("error: {e}\n"))?;
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

/// The demo batch of `run` without `--x`: 128 unit rows of 512 columns, 4 per class,
/// enough for every shipped loss with its default parameters.
const DEMO: (usize, usize, usize) = (128, 512, 4);

fn run(args: &RunArgs) -> Outcome {
    let spec = load(&args.file)?;
    let overrides = parse_overrides(&args.set)?;
    let (x, labels) = match (&args.x, &args.labels) {
        (Some(x), Some(labels)) => (read_embeddings(x)?, read_integers(labels, "labels")?),
        _ => {
            let (n, d, per_class) = DEMO;
            eprintln!(
                "losscc: no --x/--labels given; using the built-in demo batch ({n} x {d}, {per_class} per class, seed {})",
                args.seed
            );
            losscc::runtime::synthetic::clustered_batch(n, d, per_class, args.seed)
        }
    };
    let inputs = args
        .input
        .iter()
        .map(|item| {
            let (name, file) = item
                .split_once('=')
                .ok_or_else(|| format!("error: `--input {item}` is not NAME=FILE"))?;
            Ok((
                name.trim().to_string(),
                read_integers(Path::new(file.trim()), name)?,
            ))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let loss = Loss::from_spec(&spec, &overrides).map_err(|e| format!("{e}"))?;
    let options = Options {
        threads: args.threads.unwrap_or_else(default_threads),
        seed: args.seed,
        inputs: &inputs,
    };
    let (value, stats, grad) = match args.dtype {
        Dtype::F32 => {
            let out = evaluate(
                &loss,
                x.mapv(|v| v as f32).view(),
                &labels,
                &options,
                args.backend,
                &spec,
            )?;
            (out.loss, out.stats, out.grad.map(|g| g.mapv(f64::from)))
        }
        Dtype::F64 => {
            let out = evaluate(&loss, x.view(), &labels, &options, args.backend, &spec)?;
            (out.loss, out.stats, out.grad)
        }
    };
    if let (Some(path), Some(grad)) = (&args.grad_out, &grad) {
        let written = match args.dtype {
            Dtype::F32 => ndarray_npy::write_npy(path, &grad.mapv(|v| v as f32)),
            Dtype::F64 => ndarray_npy::write_npy(path, grad),
        };
        written.map_err(|e| format!("error: cannot write {}: {e}", path.display()))?;
    }
    let stats: serde_json::Map<String, serde_json::Value> = stats
        .iter()
        .map(|(name, value)| (name.clone(), serde_json::json!(value)))
        .collect();
    let json = serde_json::json!({
        "loss": value,
        "stats": stats,
        "backend": args.backend.name(),
        "dtype": args.dtype.name(),
    });
    Ok(format!("{json}\n"))
}

/// The loss and gradient on one backend, errors rendered against the spec.
fn evaluate<F: losscc::runtime::real::Real>(
    loss: &Loss,
    x: ndarray::ArrayView2<F>,
    labels: &[i64],
    options: &Options<'_>,
    backend: Backend,
    spec: &Spec,
) -> Result<losscc::Output<F>, String> {
    let result = match backend {
        Backend::Jit => loss.run(x, labels, options, true),
        Backend::Interp => loss.interpret(x, labels, options, true),
    };
    let output = result.map_err(|e| match e.to_diagnostic(loss.module()) {
        Some(d) => spec.sources.render(&d),
        None => format!("error[{}]: {e}", e.code()),
    })?;
    if backend == Backend::Jit && output.evaluator == Evaluator::Interpreter {
        eprintln!(
            "losscc: this batch was evaluated by the interpreter (see `losscc compile --emit ir`)"
        );
    }
    Ok(output)
}

fn bench(args: &BenchArgs) -> Outcome {
    match args.dtype {
        Dtype::F32 => bench_typed::<f32>(args),
        Dtype::F64 => bench_typed::<f64>(args),
    }
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples.get(samples.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The samples of one timed loop of `losscc bench`.
#[derive(Default)]
struct Timed {
    total_ms: Vec<f64>,
    stages: Vec<Stages>,
    last: Option<(f64, Evaluator)>,
}

impl Timed {
    /// Median time per stage of the compiled evaluations; null when the interpreter ran.
    fn stage_medians(&self) -> serde_json::Value {
        if self.stages.is_empty() {
            return serde_json::Value::Null;
        }
        let stage = |pick: fn(&Stages) -> f64| median(self.stages.iter().map(pick).collect());
        serde_json::json!({
            "tensors": stage(|s| s.tensors_ms),
            "matrices": stage(|s| s.matrices_ms),
            "kernels": stage(|s| s.kernels_ms),
            "batch": stage(|s| s.batch_ms),
            "backward": stage(|s| s.backward_ms),
        })
    }
}

fn bench_typed<F: losscc::runtime::real::Real>(args: &BenchArgs) -> Outcome {
    use std::time::Instant;
    let threads = args.threads.unwrap_or_else(default_threads);
    let overrides = parse_overrides(&args.set)?;
    let started = Instant::now();
    let spec = load(&args.file)?;
    let loss = Loss::from_spec(&spec, &overrides).map_err(|e| format!("{e}"))?;
    if args.backend == Backend::Jit {
        loss.prepare(F::PRECISION)
            .map_err(|e| format!("error: {e}"))?;
    }
    let compile_ms = started.elapsed().as_secs_f64() * 1e3;

    let (x, labels) =
        losscc::runtime::synthetic::clustered_batch(args.n, args.d, args.per_class, 0);
    let x = x.mapv(F::from_f64);
    let options = Options {
        threads,
        seed: 0,
        inputs: &[],
    };
    let time = |with_gradient: bool| -> Result<Timed, String> {
        let mut timed = Timed::default();
        for iteration in 0..args.iters + 2 {
            let start = Instant::now();
            let out = match args.backend {
                Backend::Jit => loss.run(x.view(), &labels, &options, with_gradient),
                Backend::Interp => loss.interpret(x.view(), &labels, &options, with_gradient),
            }
            .map_err(|e| format!("error: {e}"))?;
            if iteration >= 2 {
                timed.total_ms.push(start.elapsed().as_secs_f64() * 1e3);
                timed.stages.extend(out.stages);
            }
            timed.last = Some((out.loss, out.evaluator));
        }
        Ok(timed)
    };
    let forward = time(false)?;
    let forward_backward = time(true)?;
    let (value, evaluator) = forward_backward.last.unwrap_or((f64::NAN, Evaluator::Jit));
    let gemm_ms = median(
        (0..args.iters.max(1))
            .map(|_| loss.gemm_time::<F>(x.view(), &labels, threads))
            .collect(),
    );
    let json = serde_json::json!({
        "compile_ms": compile_ms,
        "forward_ms": median(forward.total_ms),
        "forward_backward_ms": median(forward_backward.total_ms.clone()),
        "gemm_ms": gemm_ms,
        "n": args.n,
        "d": args.d,
        "per_class": args.per_class,
        "threads": threads,
        "iters": args.iters,
        "backend": args.backend.name(),
        "dtype": args.dtype.name(),
        "evaluator": match evaluator { Evaluator::Jit => "jit", Evaluator::Interpreter => "interpreter" },
        "loss": value,
        "stages_ms": forward_backward.stage_medians(),
    });
    Ok(format!("{json}\n"))
}

/// A 2-D float32 or float64 array.
fn read_embeddings(path: &Path) -> Result<ndarray::Array2<f64>, String> {
    use ndarray_npy::read_npy;
    if let Ok(x) = read_npy::<_, ndarray::Array2<f64>>(path) {
        return Ok(x);
    }
    if let Ok(x) = read_npy::<_, ndarray::Array2<f32>>(path) {
        return Ok(x.mapv(f64::from));
    }
    let detail = match read_npy::<_, ndarray::ArrayD<f64>>(path)
        .map(|a| a.ndim())
        .or_else(|_| read_npy::<_, ndarray::ArrayD<f32>>(path).map(|a| a.ndim()))
    {
        Ok(ndim) => format!("it has {ndim} dimensions; embeddings must be 2-D (n x d)"),
        Err(e) => format!("{e}; embeddings must be a 2-D float32 or float64 .npy array"),
    };
    Err(format!("error: cannot read {}: {detail}", path.display()))
}

/// A 1-D array of integers of any width.
fn read_integers(path: &Path, what: &str) -> Result<Vec<i64>, String> {
    use ndarray::Array1;
    use ndarray_npy::read_npy;
    macro_rules! attempt {
        ($($t:ty),*) => {$(
            if let Ok(a) = read_npy::<_, Array1<$t>>(path) {
                return a.iter().map(|&v| i64::try_from(v).map_err(|_| format!("error: {}: {what} value {v} does not fit a 64-bit integer", path.display()))).collect();
            }
        )*};
    }
    attempt!(i64, i32, i16, i8, u64, u32, u16, u8);
    Err(format!(
        "error: cannot read {}: {what} must be a 1-D integer .npy array",
        path.display()
    ))
}
