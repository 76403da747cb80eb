//! The gradient as text (`losscc compile --emit grad`, and the insta snapshots).

use super::{Gradient, ScatterTarget, TensorStep};
use crate::ir::{Scope, Side, TensorOp, print_module, print_schedule};
use std::fmt::Write;

/// The forward module with its adjoint nodes, the scatters into the matrices' adjoints,
/// the tensor-level backward steps and the schedule.
pub fn print_gradient(gradient: &Gradient) -> String {
    let module = &gradient.module;
    let mut out = print_module(module);
    for (index, scatter) in gradient.scatters.iter().enumerate() {
        let target = match scatter.target {
            ScatterTarget::Members {
                set,
                scope: Scope::Row(b),
            } => format!("each member of {set} in {b}"),
            ScatterTarget::Members {
                set,
                scope: Scope::Batch,
            } => format!("each member of {set}"),
            ScatterTarget::At { index } => format!("the member {index}"),
            ScatterTarget::Cross { set, side } => {
                format!(
                    "the {} member of each pair of {set}",
                    if side == Side::Left { "p" } else { "q" }
                )
            }
        };
        let slot = if scatter.slot == scatter.matrix.index() {
            String::new()
        } else {
            format!(" (adjoint slot {})", scatter.slot)
        };
        let row_scale = scatter
            .row_scale
            .map_or(String::new(), |h| format!(", times {h} per anchor"));
        let _ = writeln!(
            out,
            "scatter{index}: d{}{slot} += {} at {target}{row_scale}",
            scatter.matrix, scatter.weight
        );
    }
    for (index, slot) in gradient.slots.iter().enumerate() {
        let own = index == slot.matrix.index();
        let _ = match (own, slot.scale) {
            (true, Some(scale)) => writeln!(out, "scale d{} by {scale}", slot.matrix),
            (true, None) => Ok(()),
            (false, Some(scale)) => {
                writeln!(
                    out,
                    "add adjoint slot {index} to d{} times {scale}",
                    slot.matrix
                )
            }
            (false, None) => writeln!(out, "add adjoint slot {index} to d{}", slot.matrix),
        };
    }
    for step in &gradient.tensor_steps {
        let _ = match *step {
            TensorStep::Metric(m) => {
                let matrix = &module.matrices[m];
                writeln!(out, "backward d{m} -> d{}, d{}", matrix.left, matrix.right)
            }
            TensorStep::Tensor(t) => {
                let op = &module.tensors[t].op;
                let sources = match op {
                    TensorOp::Columns { source, .. }
                    | TensorOp::Partition { source, .. }
                    | TensorOp::Normalize { source }
                    | TensorOp::Centres { source, .. }
                    | TensorOp::Scale { source, .. } => format!("d{source}"),
                    _ => String::new(),
                };
                writeln!(out, "backward d{t} -> {sources}")
            }
        };
    }
    out.push_str(&print_schedule(&gradient.schedule));
    out
}
