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
/// those through which gradient reaches `x`: a derived tensor no gradient arrives at (the
/// centres under a `stop`) has no step.
pub fn steps(module: &Module) -> Vec<TensorStep> {
    let reaches = reaches_embedding(module);
    let on_path = on_gradient_path(module);
    let mut steps: Vec<TensorStep> = module
        .matrices
        .iter()
        .filter(|(_, m)| reaches[m.left.index()] || reaches[m.right.index()])
        .map(|(h, _)| TensorStep::Metric(h))
        .collect();
    for (h, t) in module.tensors.iter().rev() {
        if on_path[h.index()] && t.op != TensorOp::Embedding {
            steps.push(TensorStep::Tensor(h));
        }
    }
    steps
}

/// Whether gradient from the loss passes through each tensor on its way to the embedding:
/// it arrives there (a matrix reads the tensor, or a tensor derived from it through an op
/// that carries gradient receives some) and flows on to `x`.
pub fn on_gradient_path(module: &Module) -> Vec<bool> {
    let mut receives = vec![false; module.tensors.len()];
    for (_, m) in module.matrices.iter() {
        receives[m.left.index()] = true;
        receives[m.right.index()] = true;
    }
    for (h, t) in module.tensors.iter().rev() {
        if !receives[h.index()] {
            continue;
        }
        match &t.op {
            TensorOp::Columns { source, .. }
            | TensorOp::Partition { source, .. }
            | TensorOp::Normalize { source }
            | TensorOp::Centres { source, .. }
            | TensorOp::Scale { source, .. } => receives[source.index()] = true,
            TensorOp::Embedding
            | TensorOp::Stop { .. }
            | TensorOp::Concat { .. }
            | TensorOp::OneHot { .. } => {}
        }
    }
    let reaches = reaches_embedding(module);
    (receives.iter().zip(&reaches))
        .map(|(&receives, &reaches)| receives && reaches)
        .collect()
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
