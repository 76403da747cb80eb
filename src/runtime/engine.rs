//! Running a compiled loss: the phases of its plan, the kernels over anchor rows on worker
//! threads, the GEMM-backed tensor work, and the interpreter as the authority when a
//! kernel reports a condition it cannot decide alone.

use super::batch::Batch;
use super::batch_eval::{self, BatchValues, RowStore, Stored};
use super::cut;
use super::error::RunError;
use super::gemm;
use super::groups::{GroupValues, evaluate_groupings};
use super::real::{self, Real};
use super::spare;
use super::sparse::{Compressed, Scan};
use super::tensors::{self, Earlier};
use crate::grad::{AdjointSlot, Gradient};
use crate::interp::{self, Precision};
use crate::ir::*;
use crate::jit::abi::{KernelArgs, RowBuffer, domain_slot};
use crate::jit::{CompiledPass, Kernels, Target};
use crate::opt::Plan;
use ndarray::{Array2, ArrayView2, Axis};
use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How to run: worker threads, the seed of k-means and sampling, named inputs.
#[derive(Debug, Clone, Copy)]
pub struct Options<'a> {
    pub threads: usize,
    pub seed: u64,
    pub inputs: &'a [(String, Vec<i64>)],
}

impl Default for Options<'_> {
    fn default() -> Self {
        Options {
            threads: default_threads(),
            seed: 0,
            inputs: &[],
        }
    }
}

/// All the cores of the machine.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Which evaluator produced a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evaluator {
    /// The compiled kernels.
    Jit,
    /// The interpreter, because a kernel reported a condition (an empty mean, a rank out of
    /// range) or the plan has batch-level work the kernels do not do.
    Interpreter,
}

/// The result of one evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct Output<F> {
    pub loss: f64,
    pub stats: Vec<(String, f64)>,
    /// `dL/dx`, when the gradient was asked for.
    pub grad: Option<Array2<F>>,
    pub evaluator: Evaluator,
    /// Where the compiled evaluation spent its time; `None` from the interpreter.
    pub stages: Option<Stages>,
}

/// Wall time of the stages of one compiled evaluation, in milliseconds: what `losscc
/// bench` reports so a slow loss shows which stage limits it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stages {
    /// Per-sample tensors: normalisation, slices, group centres.
    pub tensors_ms: f64,
    /// The pair matrices (the forward GEMMs).
    pub matrices_ms: f64,
    /// The compiled row kernels, all phases.
    pub kernels_ms: f64,
    /// Batch-level expressions between the phases.
    pub batch_ms: f64,
    /// From the matrix adjoints to `dL/dx` (the backward GEMMs).
    pub backward_ms: f64,
}

fn elapsed_ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// A compiled loss: its module and gradient, the plans of the native backend and (built
/// on first use, per float type) its kernels. Compile once, call per training step; a
/// `Loss` is `Send + Sync`, so one can serve several threads.
///
/// ```
/// use losscc::Loss;
/// use ndarray::Array2;
///
/// let loss = Loss::compile(
///     "loss contrastive(margin = 0.5) {
///          d = euclid(x)
///          per anchor {
///              term = mean(d where same and !self) + mean(d where !same, relu(margin - v))
///          }
///          loss = mean(term)
///      }",
///     &vec![],
/// )?;
/// let x = Array2::from_shape_fn((8, 4), |(i, k)| ((i * 7 + k * 3) % 5) as f32 / 5.0);
/// let labels = [0, 0, 1, 1, 2, 2, 3, 3];
/// let out = loss.forward_backward(x.view(), &labels)?;
/// assert!(out.loss.is_finite());
/// assert_eq!(out.grad.unwrap().dim(), (8, 4));
/// # Ok::<(), losscc::Error>(())
/// ```
pub struct Loss {
    module: Module,
    gradient: Gradient,
    forward: Plan,
    backward: Plan,
    /// Kernels per (float type, with gradient).
    kernels: [[OnceLock<Result<Kernels, crate::jit::CodegenError>>; 2]; 2],
    /// Matrices and adjoints kept between calls, so that a training loop does not allocate
    /// (and page in) n x m floats every step.
    workspaces: Mutex<Vec<Box<dyn Any + Send>>>,
    /// The instructions its kernels are built for.
    target: Target,
}

/// The large buffers of a run, reused by the next (allocated afresh, they would be
/// faulted in every call: see [`super::spare`]; histogram's per-anchor histograms cost it
/// 0.8 ms a call so).
struct Workspace<F> {
    tensors: Vec<Array2<F>>,
    /// The derived tensors' gradients.
    gradients: Vec<Array2<F>>,
    /// The k-means features, widened.
    features: Array2<f64>,
    matrices: Vec<Array2<F>>,
    adjoints: Vec<Array2<F>>,
    /// The row passes' output buffers, in the run's float type and in f64.
    outputs: Buffers<F>,
}

impl<F> Default for Workspace<F> {
    fn default() -> Self {
        Workspace {
            tensors: Vec::new(),
            gradients: Vec::new(),
            features: Array2::zeros((0, 0)),
            matrices: Vec::new(),
            adjoints: Vec::new(),
            outputs: Buffers::default(),
        }
    }
}

/// Spare buffers for the row passes' outputs: as the kernels write them, and widened for
/// the batch phases.
struct Buffers<F> {
    written: Vec<Vec<F>>,
    widened: Vec<Vec<f64>>,
}

impl<F> Default for Buffers<F> {
    fn default() -> Self {
        Buffers {
            written: Vec::new(),
            widened: Vec::new(),
        }
    }
}

impl<F: Real> Buffers<F> {
    /// `len` zeros, in a spare buffer when there is one.
    fn zeros(&mut self, len: usize) -> Vec<F> {
        let mut buffer = self.written.pop().unwrap_or_default();
        buffer.clear();
        buffer.resize(len, F::ZERO);
        buffer
    }

    /// `values` in f64, in a spare buffer when there is one; `values`' buffer is kept.
    fn widen(&mut self, values: Vec<F>) -> Vec<f64> {
        let mut wide = self.widened.pop().unwrap_or_default();
        wide.clear();
        wide.extend(values.iter().map(|v| v.to_f64()));
        self.written.push(values);
        wide
    }
}

impl Loss {
    /// Compiles a spec given as text; `use` finds the shipped losses.
    pub fn compile(source: &str, params: &crate::ir::Params) -> Result<Loss, crate::Error> {
        let spec = crate::Spec::from_source("<spec>", source)?;
        Loss::from_spec(&spec, params)
    }

    /// Compiles the spec at `path` (its `use`s found beside it).
    pub fn load(path: &std::path::Path, params: &crate::ir::Params) -> Result<Loss, crate::Error> {
        let spec = crate::Spec::load(path)
            .map_err(|(sources, error)| crate::Error::spec(&sources, error))?;
        Loss::from_spec(&spec, params)
    }

    /// Compiles a loaded spec with parameter overrides.
    pub fn from_spec(spec: &crate::Spec, params: &crate::ir::Params) -> Result<Loss, crate::Error> {
        let module = spec
            .lower(params)
            .map_err(|error| crate::Error::spec(&spec.sources, error))?;
        let gradient = crate::grad::differentiate(&module)?;
        Ok(Loss::new(module, gradient))
    }

    /// A loss from a module and its gradient.
    pub fn new(module: Module, gradient: Gradient) -> Loss {
        let forward = crate::opt::forward_plan(&module);
        let backward = crate::opt::gradient_plan(&gradient);
        Loss {
            module,
            gradient,
            forward,
            backward,
            kernels: Default::default(),
            workspaces: Mutex::new(Vec::new()),
            target: Target::Native,
        }
    }

    /// The same loss, its kernels built for `target` (the native one by default).
    pub fn with_target(self, target: Target) -> Loss {
        Loss {
            kernels: Default::default(),
            target,
            ..self
        }
    }

    /// The loss and stats, with the default options.
    pub fn forward<F: Real>(
        &self,
        x: ArrayView2<F>,
        labels: &[i64],
    ) -> Result<Output<F>, RunError> {
        self.run(x, labels, &Options::default(), false)
    }

    /// The loss, stats and `dL/dx`, with the default options.
    pub fn forward_backward<F: Real>(
        &self,
        x: ArrayView2<F>,
        labels: &[i64],
    ) -> Result<Output<F>, RunError> {
        self.run(x, labels, &Options::default(), true)
    }

    /// Builds the kernels for a float type now rather than at the first call: the
    /// forward-only ones beside the forward+backward ones.
    pub fn prepare(&self, precision: Precision) -> Result<(), RunError> {
        let (forward, backward) = rayon::join(
            || self.kernels(precision, false).map(|_| ()),
            || self.kernels(precision, true).map(|_| ()),
        );
        forward.and(backward)
    }

    pub fn module(&self) -> &Module {
        &self.module
    }

    pub fn gradient(&self) -> &Gradient {
        &self.gradient
    }

    pub fn plan(&self, with_gradient: bool) -> &Plan {
        if with_gradient {
            &self.backward
        } else {
            &self.forward
        }
    }

    /// The kernels for a float type, compiled on first use.
    pub fn kernels(&self, precision: Precision, with_gradient: bool) -> Result<&Kernels, RunError> {
        let slot =
            &self.kernels[usize::from(precision == Precision::F64)][usize::from(with_gradient)];
        slot.get_or_init(|| crate::jit::compile(self.plan(with_gradient), precision, self.target))
            .as_ref()
            .map_err(|e| RunError::Internal {
                what: e.to_string(),
            })
    }

    /// Evaluates the loss (and `dL/dx` when `with_gradient`) on a batch.
    pub fn run<F: Real>(
        &self,
        x: ArrayView2<F>,
        labels: &[i64],
        options: &Options<'_>,
        with_gradient: bool,
    ) -> Result<Output<F>, RunError> {
        let batch = Batch {
            x,
            labels,
            inputs: options.inputs,
            seed: options.seed,
        };
        let plan = self.plan(with_gradient);
        let threads = options.threads.max(1);
        if plan.row_local {
            let kernels = self.kernels(F::PRECISION, with_gradient)?;
            let mut workspace = self.take_workspace::<F>();
            // Checked on the pool, whose threads are then awake to share the check.
            let outcome = on_pool(threads, || {
                batch.validate(&self.module, threads)?;
                Run::new(plan, kernels, &batch, threads, &mut workspace).and_then(|mut run| {
                    let outcome = run.execute(with_gradient);
                    run.release(&mut workspace);
                    outcome
                })
            });
            self.keep_workspace(workspace);
            if let Some(output) = outcome? {
                return Ok(output);
            }
        } else {
            batch.validate(&self.module, threads)?;
        }
        let matrices = self.pair_matrices(&batch, with_gradient, threads)?;
        self.interpret_batch(&batch, with_gradient, Some(matrices))
    }

    /// The pair matrices of the module the interpreter will evaluate, from the GEMMs.
    fn pair_matrices<F: Real>(
        &self,
        batch: &Batch<'_, F>,
        with_gradient: bool,
        threads: usize,
    ) -> Result<Vec<Array2<f64>>, RunError> {
        let module = if with_gradient {
            &self.gradient.module
        } else {
            &self.module
        };
        let tensors = batch_tensors(module, batch, threads)?;
        let mut values = Array2::zeros((0, 0));
        let mut matrices = Vec::with_capacity(module.matrices.len());
        for (_, m) in module.matrices.iter() {
            let (left, right) = (&tensors[m.left.index()], &tensors[m.right.index()]);
            tensors::pair_matrix(m, left, right, threads, &mut values);
            matrices.push(values.mapv(|v| v.to_f64()));
        }
        Ok(matrices)
    }

    /// The buffers a previous call left for this float type, or new ones.
    fn take_workspace<F: Real>(&self) -> Workspace<F> {
        let mut pool = self
            .workspaces
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match pool.iter().position(|w| w.is::<Workspace<F>>()) {
            Some(at) => pool
                .swap_remove(at)
                .downcast::<Workspace<F>>()
                .map_or_else(|_| Workspace::default(), |w| *w),
            None => Workspace::default(),
        }
    }

    fn keep_workspace<F: Real>(&self, workspace: Workspace<F>) {
        let mut pool = self
            .workspaces
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // One per float type and thread that called at the same time, at most a few.
        if pool.len() < 4 {
            pool.push(Box::new(workspace));
        }
    }

    /// The interpreter's evaluation of a batch (`--backend interp`).
    pub fn interpret<F: Real>(
        &self,
        x: ArrayView2<F>,
        labels: &[i64],
        options: &Options<'_>,
        with_gradient: bool,
    ) -> Result<Output<F>, RunError> {
        let batch = Batch {
            x,
            labels,
            inputs: options.inputs,
            seed: options.seed,
        };
        self.interpret_batch(&batch, with_gradient, None)
    }

    /// The time of the GEMM work of one forward+backward alone, in milliseconds: every
    /// pair matrix's product and its backward products, on this batch's tensors, in
    /// buffers already used once.
    pub fn gemm_time<F: Real>(&self, x: ArrayView2<F>, labels: &[i64], threads: usize) -> f64 {
        let batch = Batch {
            x,
            labels,
            inputs: &[],
            seed: 0,
        };
        let module = &self.backward.module;
        let Ok(tensors) = batch_tensors(module, &batch, threads) else {
            return f64::NAN;
        };
        let reaches = crate::grad::tensors::reaches_embedding(module);
        let mut work: Vec<_> = module
            .matrices
            .iter()
            .map(|(_, m)| {
                let (a, b) = (&tensors[m.left.index()], &tensors[m.right.index()]);
                tensors::GemmWork::new(m, a, b, &reaches)
            })
            .collect();
        // Once to touch the buffers (as a training loop's later steps find them), once timed,
        // on the pool as a run is.
        work.iter_mut().for_each(|w| w.run(threads));
        let start = Instant::now();
        on_pool(threads, || work.iter_mut().for_each(|w| w.run(threads)));
        elapsed_ms(start)
    }

    /// The interpreter's evaluation of the same batch, on the given pair matrices or its own.
    fn interpret_batch<F: Real>(
        &self,
        batch: &Batch<'_, F>,
        with_gradient: bool,
        matrices: Option<Vec<Array2<f64>>>,
    ) -> Result<Output<F>, RunError> {
        let x = batch.x.mapv(|v| v.to_f64());
        let batch64 = Batch {
            x: x.view(),
            labels: batch.labels,
            inputs: batch.inputs,
            seed: batch.seed,
        };
        let precision = F::PRECISION;
        let out = match (with_gradient, matrices) {
            (true, None) => interp::evaluate_with_gradient(&self.gradient, &batch64, precision)?,
            (true, Some(m)) => {
                interp::evaluate_with_gradient_on(&self.gradient, &batch64, precision, m)?
            }
            (false, None) => interp::evaluate(&self.module, &batch64, precision)?,
            (false, Some(m)) => interp::evaluate_on(&self.module, &batch64, precision, m)?,
        };
        Ok(Output {
            loss: out.loss,
            stats: out.stats,
            grad: out.grad.map(|g| g.mapv(F::from_f64)),
            evaluator: Evaluator::Interpreter,
            stages: None,
        })
    }
}

/// The tensors of a batch (after its groupings), in fresh buffers.
fn batch_tensors<F: Real>(
    module: &Module,
    batch: &Batch<'_, F>,
    threads: usize,
) -> Result<Vec<Array2<F>>, RunError> {
    let mut earlier = Earlier::default();
    let scratch = (&mut earlier, &mut Array2::zeros((0, 0)));
    let groups = batch_groupings(module, batch, threads, scratch)?;
    let buffers = (earlier, threads);
    tensors::tensors(module, batch.x, &groups, batch.seed, None, buffers)
}

/// The groupings of a batch, k-means on the tensors it clusters. The features are
/// computed in `spare`'s tensor buffers of an earlier call, which they are left in as
/// this call's values (its `computed` counts them) for the tensors of this call, and
/// widened into `points`: fresh arrays, faulted in page by page, took a few milliseconds
/// of cluster_nca's call.
fn batch_groupings<F: Real>(
    module: &Module,
    batch: &Batch<'_, F>,
    threads: usize,
    (spare, points): (&mut Earlier<F>, &mut Array2<f64>),
) -> Result<Vec<GroupValues>, RunError> {
    spare.computed = 0;
    let features = |tensor: Handle<Tensor>, groups: &[GroupValues], points: &mut Array2<f64>| {
        // The tensors up to the features', in their buffers; the later ones' kept aside.
        let buffers = &mut spare.buffers;
        let later = buffers.split_off((tensor.index() + 1).min(buffers.len()));
        let earlier = Earlier {
            buffers: std::mem::take(buffers),
            computed: spare.computed,
        };
        match tensors::tensors(
            module,
            batch.x,
            groups,
            batch.seed,
            Some(tensor),
            (earlier, threads),
        ) {
            Ok(mut values) => {
                let value = &values[tensor.index()];
                if points.dim() != value.dim() {
                    *points = Array2::zeros(value.dim());
                }
                let blocks: Vec<_> = (points.axis_chunks_iter_mut(Axis(0), ROWS_PER_TASK))
                    .zip(value.axis_chunks_iter(Axis(0), ROWS_PER_TASK))
                    .collect();
                gemm::run_tasks(blocks, threads, |(mut points, value)| {
                    points.zip_mut_with(&value, |p, &v| *p = v.to_f64())
                });
                spare.computed = spare.computed.max(values.len());
                values.extend(later);
                spare.buffers = values;
            }
            // No points, which k-means reports, as it does in the interpreter.
            Err(_) => *points = Array2::zeros((0, 0)),
        }
    };
    evaluate_groupings(module, batch, (points, threads), features).map_err(RunError::from)
}

/// The state of one evaluation.
struct Run<'r, F: Real> {
    plan: &'r Plan,
    kernels: &'r Kernels,
    labels: &'r [i64],
    seed: u64,
    threads: usize,
    groups: Vec<GroupValues>,
    tensors: Vec<Array2<F>>,
    /// The tensors' gradients of an earlier call, to be written again.
    gradients: Vec<Array2<F>>,
    matrices: Vec<Array2<F>>,
    /// Per matrix: its adjoint, for the matrices the plan scatters into.
    adjoints: Vec<Option<Array2<F>>>,
    /// Per adjoint slot: whether it holds an earlier call's values, not yet zeroed.
    unzeroed: Vec<bool>,
    /// Per adjoint slot: what the pass that writes it found of its entries, when it
    /// scanned its rows as they were written.
    scanned: Vec<Option<Scan<F>>>,
    values: BatchValues,
    rows: RowStore,
    /// The cuts found, by (set, count, largest).
    cuts: HashMap<(Handle<Set>, Handle<Expr>, bool), Option<cut::Cut>>,
    outputs: Buffers<F>,
    stages: Stages,
}

impl<'r, F: Real> Run<'r, F> {
    fn new(
        plan: &'r Plan,
        kernels: &'r Kernels,
        batch: &Batch<'r, F>,
        threads: usize,
        workspace: &mut Workspace<F>,
    ) -> Result<Self, RunError> {
        let module = &plan.module;
        let mut earlier = Earlier {
            buffers: std::mem::take(&mut workspace.tensors),
            computed: 0,
        };
        let scratch = (&mut earlier, &mut workspace.features);
        let groups = batch_groupings(module, batch, threads, scratch)?;
        let mut stages = Stages::default();
        let started = Instant::now();
        let buffers = (earlier, threads);
        let tensors = tensors::tensors(module, batch.x, &groups, batch.seed, None, buffers)?;
        stages.tensors_ms = elapsed_ms(started);
        let started = Instant::now();
        let mut matrices = std::mem::take(&mut workspace.matrices);
        matrices.resize_with(module.matrices.len(), || Array2::zeros((0, 0)));
        for ((_, m), values) in module.matrices.iter().zip(matrices.iter_mut()) {
            tensors::pair_matrix(
                m,
                &tensors[m.left.index()],
                &tensors[m.right.index()],
                threads,
                values,
            );
        }
        stages.matrices_ms = elapsed_ms(started);
        let mut spare = std::mem::take(&mut workspace.adjoints);
        let mut adjoints: Vec<Option<Array2<F>>> = vec![None; plan.slots.len()];
        let mut unzeroed = vec![false; plan.slots.len()];
        for scatter in &plan.scatters {
            if adjoints[scatter.slot].is_none() {
                let dim = matrices[scatter.matrix.index()].dim();
                // A buffer of an earlier call is zeroed by the first pass that writes it, a
                // row just before its anchor's kernel (see `run_pass`).
                adjoints[scatter.slot] = Some(match spare.iter().position(|a| a.dim() == dim) {
                    Some(at) => {
                        unzeroed[scatter.slot] = true;
                        spare.swap_remove(at)
                    }
                    None => tensors::padded_zeros(dim),
                });
            }
        }
        Ok(Run {
            plan,
            kernels,
            labels: batch.labels,
            seed: batch.seed,
            threads,
            groups,
            tensors,
            gradients: std::mem::take(&mut workspace.gradients),
            matrices,
            adjoints,
            unzeroed,
            scanned: (0..plan.slots.len()).map(|_| None).collect(),
            values: BatchValues::new(module),
            rows: RowStore::default(),
            cuts: HashMap::new(),
            outputs: std::mem::take(&mut workspace.outputs),
            stages,
        })
    }

    fn domain_len(&self, domain: Domain) -> usize {
        match domain {
            Domain::Samples => self.labels.len(),
            Domain::Groups(g) => self.groups[g.index()].count(),
        }
    }

    /// Gives the large buffers back for the next call.
    fn release(&mut self, workspace: &mut Workspace<F>) {
        workspace.tensors = std::mem::take(&mut self.tensors);
        workspace.gradients = std::mem::take(&mut self.gradients);
        workspace.matrices = std::mem::take(&mut self.matrices);
        workspace.adjoints = self.adjoints.iter_mut().filter_map(Option::take).collect();
        let stored = self.rows.outputs.drain().map(|(_, stored)| stored.values);
        self.outputs.widened.extend(stored);
        workspace.outputs = std::mem::take(&mut self.outputs);
    }

    /// Runs the phases; `None` when a kernel reported a condition, a result is not finite
    /// or a cut is not found, for the interpreter to decide.
    fn execute(&mut self, with_gradient: bool) -> Result<Option<Output<F>>, RunError> {
        let module = &self.plan.module;
        let n = self.labels.len();
        for (index, phase) in self.plan.schedule.phases.iter().enumerate() {
            match phase {
                Phase::Batch { exprs, .. } => {
                    let started = Instant::now();
                    for &h in exprs {
                        if let ExprKind::Cut { .. } = module.exprs[h].kind {
                            let Some(part) = self.cut_part(h) else {
                                return Ok(None);
                            };
                            self.values.numbers[h.index()] = part;
                            continue;
                        }
                        batch_eval::evaluate(
                            module,
                            h,
                            &mut self.values,
                            &self.rows,
                            n,
                            F::PRECISION,
                        )?;
                    }
                    self.stages.batch_ms += elapsed_ms(started);
                }
                Phase::Rows { .. } => {
                    let pass = self
                        .kernels
                        .passes
                        .iter()
                        .find(|p| p.phase == index)
                        .ok_or_else(|| RunError::Internal {
                            what: format!("no kernel for phase {index}"),
                        })?;
                    let started = Instant::now();
                    let status = self.run_pass(pass);
                    self.stages.kernels_ms += elapsed_ms(started);
                    if status != 0 {
                        return Ok(None);
                    }
                }
            }
        }
        if self.reads_an_empty_mean(with_gradient) {
            return Ok(None);
        }
        let loss = self.values.numbers[module.loss_expr().index()];
        let stats: Vec<(String, f64)> = module
            .stats
            .iter()
            .map(|(name, h)| (name.clone(), self.values.numbers[h.index()]))
            .collect();
        if !loss.is_finite() || stats.iter().any(|(_, v)| !v.is_finite()) {
            return Ok(None);
        }
        let grad = if with_gradient {
            let forward = tensors::Forward {
                module,
                tensors: &self.tensors,
                matrices: &self.matrices,
                groups: &self.groups,
                seed: self.seed,
            };
            let started = Instant::now();
            // A slot that no pass wrote (no plan has one) must not bring an earlier call's
            // values to the backward.
            for (adjoint, unzeroed) in self.adjoints.iter_mut().zip(&mut self.unzeroed) {
                if let (Some(adjoint), true) = (adjoint, std::mem::take(unzeroed)) {
                    tensors::zero_on_threads(adjoint, self.threads);
                }
            }
            let matrices = module.matrices.len();
            let scales = fold_slots(
                &self.plan.slots,
                matrices,
                &self.values,
                &mut self.adjoints,
                self.threads,
            );
            let grad = tensors::backward(
                &forward,
                &self.plan.tensor_steps,
                &mut self.adjoints[..matrices],
                &mut self.scanned[..matrices],
                &scales,
                &mut self.gradients,
                self.threads,
            );
            self.stages.backward_ms = elapsed_ms(started);
            let finite = match grad.as_slice_memory_order() {
                Some(values) => real::all_finite_on_threads(values, self.threads),
                None => grad.iter().all(|v| v.is_finite()),
            };
            if !finite {
                return Ok(None);
            }
            Some(grad)
        } else {
            None
        };
        Ok(Some(Output {
            loss,
            stats,
            grad,
            evaluator: Evaluator::Jit,
            stages: Some(self.stages),
        }))
    }

    /// Whether the result reads a batch-level mean over no member, which the interpreter
    /// (evaluating only what the result reads: the branch a choice takes, the weights of
    /// scatters that find members) reports as an error. The kernels computed it anyway, as
    /// 0 / 0. Through per-member and per-anchor values every operand counts as read.
    fn reads_an_empty_mean(&self, with_gradient: bool) -> bool {
        let module = &self.plan.module;
        let numbers = &self.values.numbers;
        let empty: Vec<Handle<Expr>> = (self.plan.means.iter())
            .filter(|&&(_, count)| numbers[count.index()] == 0.0)
            .map(|&(mean, _)| mean)
            .collect();
        if empty.is_empty() {
            return false;
        }
        let mut stack: Vec<Node> = std::iter::once(module.loss_expr())
            .chain(module.stats.iter().map(|s| s.1))
            .map(Node::Expr)
            .collect();
        if with_gradient {
            let written = |slot: usize| {
                (self.adjoints[slot].as_ref()).is_some_and(|a| a.iter().any(|&v| v != F::ZERO))
            };
            for scatter in self.plan.scatters.iter().filter(|s| written(s.slot)) {
                let effect = crate::grad::effect(module, scatter);
                stack.extend(effect.deps.iter().map(|&h| Node::Expr(h)));
                stack.extend(effect.sets.iter().map(|&s| Node::Set(s)));
                stack.extend(self.plan.slots[scatter.slot].scale.map(Node::Expr));
            }
        }
        let mut seen = std::collections::HashSet::new();
        while let Some(node) = stack.pop() {
            if !seen.insert(node) {
                continue;
            }
            match node {
                Node::Expr(h) if empty.contains(&h) => return true,
                Node::Expr(h) => match module.exprs[h].kind {
                    ExprKind::Select {
                        cond,
                        then,
                        otherwise,
                    } if module.exprs[h].level == Level::Batch => {
                        let taken = if numbers[cond.index()] != 0.0 {
                            then
                        } else {
                            otherwise
                        };
                        stack.extend([Node::Expr(cond), Node::Expr(taken)]);
                    }
                    ref kind => stack.extend(expr_refs(kind)),
                },
                Node::Set(s) => {
                    stack.push(Node::Expr(module.sets[s].value));
                    stack.extend(set_refs(&module.sets[s].kind));
                }
            }
        }
        false
    }

    /// A part of a cut ([`ExprKind::Cut`]), the cut found once for its three parts; `None`
    /// when it cannot be: a member's value is NaN, the count is not a whole number, or the
    /// set is not one the plan cuts.
    fn cut_part(&mut self, h: Handle<Expr>) -> Option<f64> {
        let module = &self.plan.module;
        let ExprKind::Cut {
            set,
            count,
            largest,
            part,
        } = module.exprs[h].kind
        else {
            return None;
        };
        let found = match self.cuts.get(&(set, count, largest)) {
            Some(&found) => found,
            None => {
                let kept = match module.exprs[count].kind {
                    ExprKind::Const(Real(c)) => c,
                    _ => self.values.numbers[count.index()],
                };
                let chosen = module.labelled_entries(set)?;
                if !(kept >= 0.0 && kept == kept.trunc() && kept.is_finite()) {
                    return None;
                }
                let candidates = cut::Candidates {
                    matrix: self.matrices[chosen.matrix.index()].view(),
                    labels: self.labels,
                    chosen,
                    largest,
                };
                let found = cut::find(&candidates, kept as usize, self.threads).ok()?;
                self.cuts.insert((set, count, largest), found);
                found
            }
        };
        Some(match (found, part) {
            (Some(cut), CutPart::Value) => cut.value,
            (Some(cut), CutPart::Row) => cut.row as f64,
            (Some(cut), CutPart::Col) => cut.col as f64,
            (None, CutPart::Value) if largest => f64::INFINITY,
            (None, CutPart::Value) => f64::NEG_INFINITY,
            (None, CutPart::Row | CutPart::Col) => -1.0,
        })
    }

    /// The adjoints `pass` is to scan for their nonzero entries, a chunk of anchors' rows
    /// as soon as their kernels wrote them (the backward's scan of a 4 MB adjoint reads it
    /// back from memory): `(slot, address, row stride, columns)` of each matrix's own slot
    /// with a row per anchor that this pass alone writes and no other slot adds into.
    fn scans(&self, pass: &CompiledPass, rows: usize) -> Vec<(usize, usize, usize, usize)> {
        let matrices = self.plan.module.matrices.len();
        let writers = |slot: usize| {
            (self.kernels.passes.iter())
                .filter(|p| p.layout.bindings.slots.contains(&slot))
                .count()
        };
        (pass.layout.bindings.slots.iter())
            .filter(|&&slot| {
                slot < matrices
                    && !self.plan.slots[matrices..]
                        .iter()
                        .any(|s| s.matrix.index() == slot)
                    && writers(slot) == 1
            })
            .filter_map(|&slot| {
                let adjoint = self.adjoints[slot].as_ref()?;
                match (adjoint.nrows() == rows, adjoint.strides()) {
                    (true, &[stride, 1]) if stride >= 0 => Some((
                        slot,
                        adjoint.as_ptr() as usize,
                        stride.unsigned_abs(),
                        adjoint.ncols(),
                    )),
                    _ => None,
                }
            })
            .collect()
    }

    /// Runs one pass over every anchor of its block; returns the union of the statuses.
    fn run_pass(&mut self, pass: &CompiledPass) -> u32 {
        let module = &self.plan.module;
        let rows = self.domain_len(module.blocks[pass.layout.block].rows);
        let mut outputs: Vec<Vec<F>> = (pass.layout.outputs.iter())
            .map(|&(_, width)| self.outputs.zeros(rows * width))
            .collect();
        let mut skipped = vec![0u8; rows];

        // The tables the kernel reads, alive until the pass ends.
        let bound = &pass.layout.bindings;
        let matrix_ptrs: Vec<*const u8> = bound
            .matrices
            .iter()
            .map(|m| self.matrices[m.index()].as_ptr() as *const u8)
            .collect();
        let matrix_strides: Vec<u64> = bound
            .matrices
            .iter()
            .map(|m| self.matrices[m.index()].strides()[0] as u64)
            .collect();
        let batch: Vec<f64> = bound
            .batch
            .iter()
            .map(|h| self.values.numbers[h.index()])
            .collect();
        let vector_ptrs: Vec<*const f64> = bound
            .vectors
            .iter()
            .map(|h| {
                self.values.vectors[h.index()]
                    .as_ref()
                    .map_or(std::ptr::null(), |v| v.as_ptr())
            })
            .collect();
        let output_ptrs: Vec<*mut u8> = outputs
            .iter_mut()
            .map(|o| o.as_mut_ptr() as *mut u8)
            .collect();
        let grad_ptrs: Vec<*mut u8> = bound
            .slots
            .iter()
            .map(|&slot| {
                self.adjoints[slot]
                    .as_mut()
                    .map_or(std::ptr::null_mut(), |a| a.as_mut_ptr() as *mut u8)
            })
            .collect();
        // Adjoint rows are padded (see `tensors::padded_zeros`); their columns are adjacent.
        let grad_strides: Vec<u64> = bound
            .slots
            .iter()
            .map(|&slot| {
                self.adjoints[slot]
                    .as_ref()
                    .map_or(0, |a| a.strides()[0].unsigned_abs() as u64)
            })
            .collect();
        // The adjoints this pass writes first: their rows are zeroed one anchor at a time,
        // just before its kernel adds into them (in cache), rather than in a pass of their
        // own; a slot whose rows are not this pass's anchors is zeroed here.
        let mut zero_rows: Vec<(usize, usize, usize)> = Vec::new();
        for &slot in &bound.slots {
            if !std::mem::take(&mut self.unzeroed[slot]) {
                continue;
            }
            let Some(adjoint) = self.adjoints[slot].as_mut() else {
                continue;
            };
            match (adjoint.nrows() == rows, adjoint.strides()) {
                (true, &[stride, 1]) if stride >= 0 => zero_rows.push((
                    adjoint.as_mut_ptr() as usize,
                    stride.unsigned_abs(),
                    adjoint.ncols(),
                )),
                _ => tensors::zero_on_threads(adjoint, self.threads),
            }
        }
        let scans = self.scans(pass, rows);
        let domains = 1 + module.groupings.len();
        let mut labels: Vec<Vec<i64>> = vec![self.labels.to_vec()];
        let mut lens: Vec<u64> = vec![self.labels.len() as u64];
        for group in &self.groups {
            labels.push(
                group
                    .labels
                    .clone()
                    .unwrap_or_else(|| vec![-1; group.count()]),
            );
            lens.push(group.count() as u64);
        }
        debug_assert_eq!(labels.len(), domains);
        let label_ptrs: Vec<*const i64> = labels.iter().map(|l| l.as_ptr()).collect();
        // Class ids for the vector loops: each label's position among the classes, padded
        // so that a vector load at the last full chunk stays inside the buffer.
        let classes: &[i64] = self
            .groups
            .first()
            .and_then(|g| g.labels.as_deref())
            .unwrap_or(&[]);
        let ids: Vec<Vec<i32>> = labels
            .iter()
            .map(|domain| {
                domain
                    .iter()
                    .map(|label| classes.binary_search(label).map_or(-2, |c| c as i32))
                    .chain(std::iter::repeat_n(-3, PADDING))
                    .collect()
            })
            .collect();
        let id_ptrs: Vec<*const i32> = ids.iter().map(|i| i.as_ptr()).collect();
        let of_sample: Vec<Vec<u32>> = self
            .groups
            .iter()
            .map(|g| {
                g.of_sample
                    .iter()
                    .map(|&s| s as u32)
                    .chain(std::iter::repeat_n(u32::MAX, PADDING))
                    .collect()
            })
            .collect();
        let group_ptrs: Vec<*const u32> = of_sample.iter().map(|g| g.as_ptr()).collect();
        let sizes: Vec<Vec<u32>> = self
            .groups
            .iter()
            .map(|g| {
                (g.sizes.iter())
                    .map(|&s| u32::try_from(s).unwrap_or(u32::MAX))
                    .chain(std::iter::repeat_n(0, PADDING))
                    .collect()
            })
            .collect();
        let size_ptrs: Vec<*const u32> = sizes.iter().map(|s| s.as_ptr()).collect();
        let was_skipped = self
            .rows
            .skipped
            .get(&pass.layout.block)
            .cloned()
            .unwrap_or_else(|| vec![0; rows]);
        let stored: Vec<*const f64> = bound
            .stored
            .iter()
            .map(|&h| {
                self.rows
                    .outputs
                    .get(&(pass.layout.block, h))
                    .filter(|values| values.width == 1)
                    .map_or(std::ptr::null(), |values| values.values.as_ptr())
            })
            .collect();
        let (class_starts, class_members) = self
            .groups
            .first()
            .map(GroupValues::member_lists)
            .unwrap_or_default();
        let args = Shared(KernelArgs {
            matrices: matrix_ptrs.as_ptr(),
            matrix_strides: matrix_strides.as_ptr(),
            batch: batch.as_ptr(),
            vectors: vector_ptrs.as_ptr(),
            stored: stored.as_ptr(),
            outputs: output_ptrs.as_ptr(),
            skipped: skipped.as_mut_ptr(),
            was_skipped: was_skipped.as_ptr(),
            grads: grad_ptrs.as_ptr(),
            grad_strides: grad_strides.as_ptr(),
            labels: label_ptrs.as_ptr(),
            ids: id_ptrs.as_ptr(),
            class_starts: class_starts.as_ptr(),
            class_members: class_members.as_ptr(),
            domain_len: lens.as_ptr(),
            groups: group_ptrs.as_ptr(),
            sizes: size_ptrs.as_ptr(),
            seed: self.seed,
        });
        let buffers: Vec<(RowBuffer, usize)> = pass
            .layout
            .buffers
            .iter()
            .map(|&b| (b, lens[domain_slot(b.domain())] as usize))
            .collect();
        let scratch = lens.iter().copied().max().unwrap_or(0) as usize;
        let page_offset = matrix_ptrs.first().map_or(0, |&m| m as usize % PAGE);
        // Anchors are handed out in small chunks as the workers ask for them: with one
        // contiguous half per thread, a core that another tenant slowed (or the costlier
        // anchors of a mining loss) held the whole pass back.
        let chunks = rows.div_ceil(ANCHORS_PER_CHUNK);
        let workers = self.threads.min(chunks).max(1);
        let code = pass.code;
        let next_chunk = AtomicUsize::new(0);
        let status = AtomicU32::new(0);
        let (args, buffers, next, flags_of_all) = (&args, &buffers, &next_chunk, &status);
        let zero_rows = &zero_rows;
        let chunk_scans = Mutex::new(Vec::new());
        let dense: Vec<AtomicBool> = scans.iter().map(|_| AtomicBool::new(false)).collect();
        let (scans, chunk_scans, dense) = (&scans, &chunk_scans, &dense);
        let work = move || {
            let row_buffers = RowBuffers::<F>::new(buffers, scratch, page_offset);
            let mut flags = 0;
            // This worker's scans: each adjoint's rows of its chunks, in the order taken, and
            // where each chunk's rows start in each (a scan that found its adjoint dense
            // stops short).
            let mut found: Vec<Compressed<F>> = scans.iter().map(|_| Compressed::empty()).collect();
            let mut taken: Vec<(usize, Vec<usize>)> = Vec::new();
            loop {
                let start = next.fetch_add(1, Ordering::Relaxed) * ANCHORS_PER_CHUNK;
                if start >= rows {
                    break;
                }
                for anchor in start..(start + ANCHORS_PER_CHUNK).min(rows) {
                    for &(base, stride, cols) in zero_rows {
                        // SAFETY: the adjoint has a row per anchor, `stride` elements
                        // apart, `cols` long; each anchor is taken by one worker.
                        unsafe {
                            let row = (base as *mut F).add(anchor * stride);
                            std::ptr::write_bytes(row, 0, cols);
                        }
                    }
                    // SAFETY: `args` points at tables that outlive the scope, sized for this
                    // module and batch as the kernel's layout requires; each row buffer and
                    // scratch buffer is as long as the domain it holds an entry per column
                    // of; each anchor is taken by one worker, and a kernel writes only its
                    // anchor's outputs, skip flag and adjoint rows.
                    flags |= unsafe {
                        code(
                            &args.0,
                            anchor as u64,
                            row_buffers.addresses.as_ptr(),
                            row_buffers.values,
                            row_buffers.indices.cast::<u32>(),
                        )
                    };
                }
                // The chunk's rows of the adjoints scanned for their nonzero entries while
                // they are in this core's cache.
                let anchors = start..(start + ANCHORS_PER_CHUNK).min(rows);
                if !scans.is_empty() {
                    let firsts = found.iter().map(Compressed::rows).collect();
                    taken.push((start / ANCHORS_PER_CHUNK, firsts));
                }
                for ((&(_, base, stride, cols), found), dense) in
                    scans.iter().zip(&mut found).zip(dense)
                {
                    let rows = anchors.clone().map(|anchor| {
                        // SAFETY: as for the zeroing above; the kernels that wrote these rows
                        // have returned, and no other worker touches them.
                        unsafe {
                            std::slice::from_raw_parts(
                                (base as *const F).add(anchor * stride),
                                cols,
                            )
                        }
                    });
                    found.append_rows(rows, dense);
                    // The worker's rows so far are the sample `Compressed::of` takes.
                    if found.tells_dense(cols) {
                        dense.store(true, Ordering::Relaxed);
                    }
                }
            }
            flags_of_all.fetch_or(flags, Ordering::Relaxed);
            // Once a worker, at its end: a lock the workers met at every chunk put them to
            // sleep and woke them (tens of microseconds each on this VM).
            if !taken.is_empty() {
                let mut scanned = chunk_scans.lock().unwrap_or_else(|e| e.into_inner());
                scanned.push((found, taken));
            }
        };
        // The pool's threads are already running: a pass costs no thread start.
        rayon::scope(|scope| {
            for _ in 1..workers {
                scope.spawn(move |_| work());
            }
            work();
        });
        let status = status.into_inner();
        let by_worker = std::mem::take(&mut *chunk_scans.lock().unwrap_or_else(|e| e.into_inner()));
        // Chunk c's rows: worker w's, from the rows its t-th chunk starts at on.
        let mut chunk_at = vec![(0, 0); chunks];
        for (w, (_, taken)) in by_worker.iter().enumerate() {
            for (t, (c, _)) in taken.iter().enumerate() {
                chunk_at[*c] = (w, t);
            }
        }
        for (k, (&(slot, _, _, cols), dense)) in scans.iter().zip(dense).enumerate() {
            let pieces = chunk_at.iter().enumerate().map(|(c, &(w, t))| {
                let len = ANCHORS_PER_CHUNK.min(rows - c * ANCHORS_PER_CHUNK);
                let (found, taken) = &by_worker[w];
                let first = taken[t].1[k];
                (&found[k], first..first + len)
            });
            let dense = dense.load(Ordering::Relaxed);
            let joined = (!dense)
                .then(|| Compressed::join(pieces, (rows, cols)))
                .flatten();
            self.scanned[slot] = Some(joined.map_or(Scan::Dense, Scan::Sparse));
        }
        for ((h, width), values) in pass.layout.outputs.iter().zip(outputs) {
            let values = self.outputs.widen(values);
            self.rows.outputs.insert(
                (pass.layout.block, *h),
                Stored {
                    values,
                    width: *width,
                },
            );
        }
        self.rows.skipped.insert(pass.layout.block, skipped);
        status
    }
}

/// Anchors a worker takes at a time in a row pass.
const ANCHORS_PER_CHUNK: usize = 16;

/// Entries past the end of the per-domain tables that vector loads may touch.
const PADDING: usize = 8;

/// Kernel arguments shared by the worker threads of a pass.
struct Shared(KernelArgs);

// SAFETY: the pointers in the arguments are only read by the kernels, except the outputs,
// skip flags and adjoints, which each kernel writes at its own anchor only; the pass joins
// every thread before the tables are touched again.
unsafe impl Sync for Shared {}

/// Adds each extra adjoint slot, times its scale, into its matrix's own slot (scaled
/// first by its own factor); returns the scale each matrix's own slot is still to be taken
/// with: its factor when it has no extra slot, else one.
fn fold_slots<F: Real>(
    slots: &[AdjointSlot],
    matrices: usize,
    values: &BatchValues,
    adjoints: &mut [Option<Array2<F>>],
    threads: usize,
) -> Vec<F> {
    // A factor taken out of the weights of scatters that found no member (a mean over an
    // empty set, 0 / 0) scales nothing: the interpreter, which applies it member by
    // member, never computes it, so an adjoint of zeros keeps it out.
    let scale_of = |slot: &AdjointSlot, adjoint: Option<&Array2<F>>| {
        let scale = (slot.scale).map_or(F::ONE, |h| F::from_f64(values.numbers[h.index()]));
        let unused = || adjoint.is_none_or(|a| a.iter().all(|&v| v == F::ZERO));
        if !scale.is_finite() && unused() {
            F::ZERO
        } else {
            scale
        }
    };
    let mut scales: Vec<F> = (slots[..matrices].iter())
        .zip(&adjoints[..matrices])
        .map(|(slot, adjoint)| scale_of(slot, adjoint.as_ref()))
        .collect();
    let (own, extra) = adjoints.split_at_mut(matrices);
    for (slot, values) in slots[matrices..].iter().zip(extra) {
        let Some(values) = values.as_ref() else {
            continue;
        };
        let m = slot.matrix.index();
        let target = own[m].get_or_insert_with(|| tensors::padded_zeros(values.dim()));
        let (own_scale, scale) = (scales[m], scale_of(slot, Some(values)));
        scaled_add_on_threads(target, own_scale, values, scale, threads);
        scales[m] = F::ONE;
    }
    scales
}

/// `a = a_scale · a + b_scale · b`, elementwise, blocks of rows on the threads.
fn scaled_add_on_threads<F: Real>(
    a: &mut Array2<F>,
    a_scale: F,
    b: &Array2<F>,
    b_scale: F,
    threads: usize,
) {
    let tasks = a
        .axis_chunks_iter_mut(Axis(0), ROWS_PER_TASK)
        .zip(b.axis_chunks_iter(Axis(0), ROWS_PER_TASK))
        .collect();
    gemm::run_tasks(tasks, threads, |(mut a, b)| {
        a.zip_mut_with(&b, |x, &y| *x = a_scale * *x + b_scale * y)
    });
}

/// Rows per task of the elementwise passes over an adjoint.
const ROWS_PER_TASK: usize = 64;

/// How long a helper of [`on_pool`] looks for work before it leaves: longer than the gaps
/// between a call's parallel steps. Some calls have serial stretches past 300 us, and a
/// helper gone after one left the row passes that followed short of a thread for long
/// stretches: with 3 ms rather than 300 us, js_div_knn_softmax's kernels 93 -> 81 ms,
/// cluster_nca 24.0 -> 21.3 ms (A/B, medians).
const HELPER_PATIENCE: Duration = Duration::from_millis(3);

/// `work`, on a thread of the rayon pool when more than one thread is asked for: the
/// parallel steps inside it then hand their tasks to the pool's other threads from within,
/// rather than each waking the pool from outside and waiting for it (a call has a dozen
/// such steps: products, passes, symmetrisation, checks).
///
/// The threads that are to help stay awake until `work` returns, looking for its tasks:
/// an idle rayon thread falls asleep within tens of microseconds, and woken, took 35-40 us
/// on this VM to start a task, at every one of the call's parallel steps. A helper that
/// finds nothing to do for [`HELPER_PATIENCE`] leaves: a pool thread that waits inside
/// one call may have picked up another call's helper, and two such threads could each wait
/// for the other's call to end.
fn on_pool<R: Send>(threads: usize, work: impl FnOnce() -> R + Send) -> R {
    if threads <= 1 {
        return work();
    }
    let done = AtomicBool::new(false);
    rayon::scope(|scope| {
        let helpers = threads.min(rayon::current_num_threads()).saturating_sub(1);
        for _ in 0..helpers {
            scope.spawn(|_| {
                let mut busy = Instant::now();
                while !done.load(Ordering::Acquire) {
                    if rayon::yield_now() == Some(rayon::Yield::Executed) {
                        busy = Instant::now();
                    } else if busy.elapsed() > HELPER_PATIENCE {
                        break;
                    } else {
                        std::hint::spin_loop();
                    }
                }
            });
        }
        let result = work();
        done.store(true, Ordering::Release);
        result
    })
}

/// The span of addresses whose low bits the CPU compares to match a load with the stores
/// before it.
const PAGE: usize = 4096;

/// One thread's row buffers ([`RowBuffer`]), each as long as its domain (at least 1), and
/// its scratch buffers for the helpers (`values`, `indices`), zeroed, carved from one block.
///
/// Each buffer starts half a page (and a few cache lines per buffer) away from the
/// matrices' rows modulo 4 KiB. A kernel that reads column j of a row while it writes
/// entry j or so of a buffer (the compaction of a dense set does) would otherwise have its
/// loads wait for its stores, which the CPU matched by their addresses' low 12 bits: a
/// kernel of nca ran 60 % slower with one buffer placed so.
struct RowBuffers<F> {
    block: Vec<u64>,
    addresses: Vec<*mut u8>,
    values: *mut u8,
    indices: *mut u8,
    _floats: std::marker::PhantomData<F>,
}

impl<F> Drop for RowBuffers<F> {
    fn drop(&mut self) {
        spare::keep(std::mem::take(&mut self.block));
    }
}

impl<F: Real> RowBuffers<F> {
    /// The row buffers `buffers` (each with its length) and scratch buffers of `scratch`
    /// entries, placed against matrices whose rows start at `page_offset` modulo a page.
    fn new(buffers: &[(RowBuffer, usize)], scratch: usize, page_offset: usize) -> Self {
        let float = size_of::<F>();
        let bytes: Vec<usize> = buffers
            .iter()
            .map(|&(kind, len)| match kind {
                RowBuffer::Indices(_) => 4 * len.max(1),
                RowBuffer::Floats(_) => float * len.max(1),
            })
            .chain([float * scratch.max(1), 4 * scratch.max(1)])
            .collect();
        let total: usize = bytes.iter().map(|b| b + PAGE).sum::<usize>() + PAGE;
        // This thread's spare block, zeroed (js_div's dozens of buffers take over 128 KiB).
        let mut block = spare::take();
        block.clear();
        block.resize(total.div_ceil(8), 0);
        let base = block.as_mut_ptr().cast::<u8>();
        let mut cursor = 0;
        let mut starts: Vec<*mut u8> = Vec::with_capacity(bytes.len());
        for (k, &len) in bytes.iter().enumerate() {
            let wanted = (page_offset + PAGE / 2 + 5 * 64 * k) % PAGE;
            let at = (base as usize + cursor) % PAGE;
            cursor += (wanted + PAGE - at) % PAGE;
            // SAFETY: `cursor + len` stays within `total` bytes: each buffer advances it by
            // less than a page plus its length, and `total` counts both for each.
            starts.push(unsafe { base.add(cursor) });
            cursor += len;
        }
        let indices = starts.pop().unwrap_or(base);
        let values = starts.pop().unwrap_or(base);
        // A vector's heap block does not move when the vector does: the addresses stay
        // valid as the block is kept below.
        RowBuffers {
            block,
            addresses: starts,
            values,
            indices,
            _floats: std::marker::PhantomData,
        }
    }
}
