//! The Cranelift backend: one native kernel per row pass of a plan.
//!
//! [`compile`] turns each `Rows` phase of a [`Plan`] into a function (see [`kernel`]) and
//! links them, with the [`helpers`] they call and the table of vector [`constants`] their
//! loops read, into one JIT module for the run's float type. Passes whose functions come
//! out the same (they differ only in which matrices and values they read: see
//! [`kernel::Bindings`]) share one compiled kernel. The runtime calls a kernel once per
//! anchor, from as many threads as it likes: kernels write only their anchor's outputs and
//! matrix-adjoint rows.
//!
//! Kernels use what the processor offers beyond its architecture's baseline (FMA, byte
//! shuffles, blends; [`Target::Native`]); [`Target::Baseline`] builds without, so that the
//! tests run the portable code paths too.

pub mod abi;
pub mod constants;
pub mod helpers;
pub mod kernel;
pub mod math;

use crate::interp::Precision;
use crate::ir::{Block, Expr, ExprKind, Handle, Level, Node, Phase, Type, dependencies};
use crate::opt::Plan;
use abi::{KernelFn, RowBuffer};
use constants::ConstantTable;
use cranelift_codegen::Context;
use cranelift_codegen::control::ControlPlane;
use cranelift_codegen::ir::types::{F32, F64, I32, I64};
use cranelift_codegen::ir::{AbiParam, Signature};
use cranelift_codegen::isa::TargetIsa;
use cranelift_codegen::settings::{self, Configurable};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{FuncId, Linkage, Module, ModuleReloc, default_libcall_names};
use kernel::{Helpers, PassLayout};
use rayon::prelude::*;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodegenError {
    #[error("cannot build a code generator for this machine: {0}")]
    Isa(String),
    #[error("Cranelift rejected a kernel: {0}")]
    Module(String),
    #[error("the compiled backend cannot run this: {0}")]
    Unsupported(String),
}

/// A compiled row pass: the phase it runs, what it reads and writes, and its entry point.
#[derive(Debug, Clone)]
pub struct CompiledPass {
    pub phase: usize,
    pub layout: PassLayout,
    pub code: KernelFn,
}

/// The kernels of a plan for one float type.
pub struct Kernels {
    pub passes: Vec<CompiledPass>,
    /// Owns the executable memory the passes point into.
    _module: JITModule,
    /// The vector constants the passes read.
    _constants: ConstantTable,
}

// SAFETY: after `finalize_definitions` the module is never used again except to keep its
// code mapped; the kernels are plain functions of their arguments, with no shared mutable
// state (the sampling helper keeps its scratch space in thread-locals).
unsafe impl Send for Kernels {}
// SAFETY: as above; nothing reachable through `&Kernels` can mutate the module.
unsafe impl Sync for Kernels {}

fn cranelift_type(precision: Precision) -> cranelift_codegen::ir::Type {
    match precision {
        Precision::F32 => F32,
        Precision::F64 => F64,
    }
}

/// The instructions the kernels may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Target {
    /// Every extension this machine's processor has (x86-64: FMA, SSSE3, SSE4.1, AVX...).
    #[default]
    Native,
    /// The host architecture's baseline alone (x86-64: SSE2): the code paths a processor
    /// without those extensions takes, slower here.
    Baseline,
}

fn new_module(target: Target) -> Result<JITModule, CodegenError> {
    let isa_error = |e: &dyn std::fmt::Display| CodegenError::Isa(e.to_string());
    let mut flags = settings::builder();
    // The verifier takes a tenth of the compile time; `emit_clif` (`losscc compile --emit
    // clif`, and the tests through it) runs it on every kernel instead.
    for (name, value) in [
        ("opt_level", "speed"),
        ("is_pic", "false"),
        ("use_colocated_libcalls", "false"),
        ("enable_verifier", "false"),
    ] {
        flags.set(name, value).map_err(|e| isa_error(&e))?;
    }
    let isa = cranelift_native::builder_with_options(target == Target::Native)
        .map_err(|e| isa_error(&e))?
        .finish(settings::Flags::new(flags))
        .map_err(|e| isa_error(&e))?;
    let mut builder = JITBuilder::with_isa(isa, default_libcall_names());
    for (name, address) in helpers::symbols() {
        builder.symbol(name, address);
    }
    Ok(JITModule::new(builder))
}

/// A row pass's block and every expression the pass computes.
type BlockNeeds = (Handle<Block>, Vec<Handle<Expr>>);

/// Per phase: the per-anchor reductions it computes that a later pass over its block
/// needs too, and that it does not store already. The pass stores them for that one.
fn shared_reductions(plan: &Plan) -> Vec<Vec<Handle<Expr>>> {
    let module = &plan.module;
    // Per phase: for a row pass, its block and what it computes.
    let needs: Vec<Option<BlockNeeds>> = plan
        .schedule
        .phases
        .iter()
        .map(|p| match p {
            Phase::Rows {
                block,
                outputs,
                effects,
            } => {
                let roots = kernel::pass_roots(plan, *block, outputs, effects);
                Some((
                    *block,
                    dependencies(module, roots.into_iter().map(Node::Expr)),
                ))
            }
            Phase::Batch { .. } => None,
        })
        .collect();
    let shareable = |h: Handle<Expr>, block: Handle<Block>| {
        let e = &module.exprs[h];
        e.level == Level::Row(block)
            && e.ty == Type::Num
            && matches!(e.kind, ExprKind::Reduce { .. } | ExprKind::Rank { .. })
    };
    needs
        .iter()
        .enumerate()
        .map(|(phase, need)| {
            let Some((block, deps)) = need else {
                return Vec::new();
            };
            let Phase::Rows { outputs, .. } = &plan.schedule.phases[phase] else {
                return Vec::new();
            };
            deps.iter()
                .copied()
                .filter(|&h| shareable(h, *block) && !outputs.contains(&h))
                .filter(|h| {
                    needs[phase + 1..]
                        .iter()
                        .flatten()
                        .any(|(later, deps)| later == block && deps.binary_search(h).is_ok())
                })
                .collect()
        })
        .collect()
}

fn signature(
    module: &JITModule,
    params: &[cranelift_codegen::ir::Type],
    ret: cranelift_codegen::ir::Type,
) -> Signature {
    let mut sig = module.make_signature();
    sig.params.extend(params.iter().map(|&t| AbiParam::new(t)));
    sig.returns.push(AbiParam::new(ret));
    sig
}

/// The kernels of every row pass of `plan`, and the Cranelift IR of each when `clif`.
fn build(
    plan: &Plan,
    precision: Precision,
    target: Target,
    clif: bool,
) -> Result<(Kernels, Vec<String>), CodegenError> {
    let module_error = |e: cranelift_module::ModuleError| CodegenError::Module(e.to_string());
    let mut module = new_module(target)?;
    let float = cranelift_type(precision);
    let suffix = if precision == Precision::F32 {
        "f32"
    } else {
        "f64"
    };
    let imports = [
        (
            "losscc_union".to_string(),
            signature(&module, &[I64, I64, I64, I64, I64], I64),
        ),
        (
            format!("losscc_extreme_{suffix}"),
            signature(&module, &[I64, I64, I64, F64, I32, I64], I64),
        ),
        (
            format!("losscc_rank_{suffix}"),
            signature(&module, &[I64, I64, F64], I64),
        ),
        (
            format!("losscc_sample_{suffix}"),
            signature(&module, &[I64, I64, I64, F64, I64, I32, I64, I64], I64),
        ),
    ];
    let mut import_ids = Vec::new();
    for (name, sig) in &imports {
        import_ids.push(
            module
                .declare_function(name, Linkage::Import, sig)
                .map_err(module_error)?,
        );
    }
    let kernel_sig = signature(&module, &[I64, I64, I64, I64, I64], I32);
    let math = math::MathBuilder::new(module.isa());
    let constants = RefCell::new(ConstantTable::new());
    let lanes = lane_ops(module.isa());
    let frontend = module.target_config();
    // Per pass: its phase, layout and the index of its code in `distinct`, which holds
    // each different kernel once, with the row buffers it expects.
    let mut passes = Vec::new();
    let mut distinct: Vec<(FuncId, Context, Vec<RowBuffer>)> = Vec::new();
    let mut by_size: HashMap<(usize, usize, usize), Vec<usize>> = HashMap::new();
    let mut texts = Vec::new();
    // Per block with a pass built: the per-anchor numbers its passes stored, which later
    // passes load (as they load which anchors are skipped) instead of computing again.
    let mut stored: HashMap<Handle<Block>, HashSet<Handle<Expr>>> = HashMap::new();
    let shared = shared_reductions(plan);
    for (phase, p) in plan.schedule.phases.iter().enumerate() {
        let Phase::Rows {
            block,
            outputs,
            effects,
        } = p
        else {
            continue;
        };
        let outputs: Vec<Handle<Expr>> = outputs.iter().chain(&shared[phase]).copied().collect();
        let outputs = &outputs;
        let mut ctx = module.make_context();
        ctx.func.signature = kernel_sig.clone();
        let refs: Vec<_> = import_ids
            .iter()
            .map(|&id| module.declare_func_in_func(id, &mut ctx.func))
            .collect();
        let helpers = Helpers {
            union: refs[0],
            extreme: refs[1],
            rank: refs[2],
            sample: refs[3],
        };
        let mut fctx = FunctionBuilderContext::new();
        let builder = FunctionBuilder::new(&mut ctx.func, &mut fctx);
        let machine = kernel::Machine {
            math,
            float,
            helpers,
            target: frontend,
            constants: &constants,
            lanes,
        };
        let layout = kernel::build(
            plan,
            *block,
            outputs,
            effects,
            stored.get(block),
            builder,
            &machine,
        )?;
        stored.entry(*block).or_default().extend(
            outputs
                .iter()
                .filter(|&&h| matches!(plan.module.exprs[h].ty, Type::Num | Type::Bool)),
        );
        if clif {
            cranelift_codegen::verify_function(&ctx.func, module.isa()).map_err(|errors| {
                CodegenError::Module(cranelift_codegen::print_errors::pretty_verifier_error(
                    &ctx.func, None, errors,
                ))
            })?;
            texts.push(format!(
                "; phase {phase}: rows {block}\n{}",
                ctx.func.display()
            ));
        }
        // Kernels of different passes nearly always differ in size: only those of one
        // size are compared in full.
        let dfg = &ctx.func.dfg;
        let size = (dfg.num_insts(), dfg.num_values(), dfg.num_blocks());
        let candidates = by_size.entry(size).or_default();
        let same = candidates.iter().copied().find(|&at| {
            let (_, other, buffers) = &distinct[at];
            other.func == ctx.func && *buffers == layout.buffers
        });
        let code = match same {
            Some(at) => at,
            None => {
                let id = module
                    .declare_function(&format!("pass{phase}"), Linkage::Local, &kernel_sig)
                    .map_err(module_error)?;
                candidates.push(distinct.len());
                distinct.push((id, ctx, layout.buffers.clone()));
                distinct.len() - 1
            }
        };
        passes.push((phase, layout, code));
    }
    // Cranelift compiles the kernels (the larger part of the compile time) side by side;
    // the module links them in order.
    let isa = module.isa();
    let machine_code: Vec<Result<MachineCode, CodegenError>> = distinct
        .par_iter_mut()
        .map(|(id, ctx, _)| machine_code(isa, *id, ctx))
        .collect();
    for ((id, _, _), code) in distinct.iter().zip(machine_code) {
        let code = code?;
        module
            .define_function_bytes(*id, code.alignment, &code.bytes, &code.relocs)
            .map_err(module_error)?;
    }
    module.finalize_definitions().map_err(module_error)?;
    let passes = passes
        .into_iter()
        .map(|(phase, layout, code)| {
            let address = module.get_finalized_function(distinct[code].0);
            // SAFETY: `address` is the entry of a function just defined with `kernel_sig`
            // (five pointer-sized integers in, a 32-bit integer out, the host's C calling
            // convention), which is `KernelFn`'s signature; the module that owns the code
            // is kept in the returned `Kernels`.
            let code = unsafe { std::mem::transmute::<*const u8, KernelFn>(address) };
            CompiledPass {
                phase,
                layout,
                code,
            }
        })
        .collect();
    Ok((
        Kernels {
            passes,
            _module: module,
            _constants: constants.into_inner(),
        },
        texts,
    ))
}

/// The lane instructions beyond Cranelift's portable set that `isa` has: `swizzle` on
/// x86-64 from SSSE3 on (as `pshufb` itself) and on every other target; `blendv`, an x86
/// instruction, from SSE4.1 on; memory operands at any address on x86-64 from AVX on.
fn lane_ops(isa: &dyn TargetIsa) -> kernel::LaneOps {
    let x64 = isa.name() == "x64";
    let flags = isa.isa_flags();
    let has = |name: &str| {
        flags
            .iter()
            .any(|flag| flag.name == name && flag.as_bool() == Some(true))
    };
    kernel::LaneOps {
        shuffles: !x64 || has("has_ssse3"),
        pshufb: x64 && has("has_ssse3"),
        blend: x64 && has("has_sse41"),
        unaligned_operands: !x64 || has("has_avx"),
    }
}

/// One kernel's compiled bytes, with what linking them needs.
struct MachineCode {
    alignment: u64,
    bytes: Vec<u8>,
    relocs: Vec<ModuleReloc>,
}

fn machine_code(
    isa: &dyn TargetIsa,
    id: FuncId,
    ctx: &mut Context,
) -> Result<MachineCode, CodegenError> {
    ctx.compile(isa, &mut ControlPlane::default())
        .map_err(|e| match e.inner {
            cranelift_codegen::CodegenError::Verifier(errors) => CodegenError::Module(
                cranelift_codegen::print_errors::pretty_verifier_error(e.func, None, errors),
            ),
            other => CodegenError::Module(other.to_string()),
        })?;
    let compiled = (ctx.compiled_code())
        .ok_or_else(|| CodegenError::Module("a kernel compiled to nothing".into()))?;
    let alignment = u64::from(compiled.buffer.alignment);
    let bytes = compiled.code_buffer().to_vec();
    let relocs = (compiled.buffer.relocs().iter())
        .map(|reloc| ModuleReloc::from_mach_reloc(reloc, &ctx.func, id))
        .collect();
    Ok(MachineCode {
        alignment,
        bytes,
        relocs,
    })
}

/// The kernels of every row pass of `plan`, for the given float type and target.
pub fn compile(plan: &Plan, precision: Precision, target: Target) -> Result<Kernels, CodegenError> {
    build(plan, precision, target, false).map(|(kernels, _)| kernels)
}

/// The Cranelift IR of every row pass of `plan` (`losscc compile --emit clif`).
pub fn emit_clif(
    plan: &Plan,
    precision: Precision,
    target: Target,
) -> Result<String, CodegenError> {
    build(plan, precision, target, true).map(|(_, texts)| texts.join("\n"))
}
