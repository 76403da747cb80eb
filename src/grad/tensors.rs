//! The backward of the tensor level: from the matrices' adjoints to `dL/dx`.

use crate::ir::*;

/// One step of the tensor-level backward pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TensorStep {
    /// From a matrix's adjoint to the adjoints of its two tensors, through its metric.
    Metric(Handle<Matrix>),
    /// From a derived tensor's adjoint to its source's.
    Tensor(Handle<Tensor>),
}

/// The steps, in order: every matrix, then the tensors from last to first, keeping only
/// those through which gradient reaches `x`.
pub fn steps(module: &Module) -> Vec<TensorStep> {
    let reaches = reaches_embedding(module);
    let mut steps: Vec<TensorStep> = module
        .matrices
        .iter()
        .filter(|(_, m)| reaches[m.left.index()] || reaches[m.right.index()])
        .map(|(h, _)| TensorStep::Metric(h))
        .collect();
    for (h, t) in module.tensors.iter().rev() {
        if reaches[h.index()] && t.op != TensorOp::Embedding {
            steps.push(TensorStep::Tensor(h));
        }
    }
    steps
}

/// Whether gradient can flow from each tensor to the embedding.
pub fn reaches_embedding(module: &Module) -> Vec<bool> {
    let mut reaches = vec![false; module.tensors.len()];
    for (h, t) in module.tensors.iter() {
        reaches[h.index()] = match &t.op {
            TensorOp::Embedding => true,
            op if !op.carries_gradient() => false,
            TensorOp::Columns { source, .. }
            | TensorOp::Partition { source, .. }
            | TensorOp::Normalize { source }
            | TensorOp::Centres { source, .. }
            | TensorOp::Scale { source, .. } => reaches[source.index()],
            _ => false,
        };
    }
    reaches
}
