//! The IR as stable, readable text (`losscc compile --emit ir`, and the insta snapshots).
//!
//! One line per node, in creation order: `e12 = lse(s4, e9) @row0`. After the `@` comes
//! the level (`batch`, `row0`, `member`, `member@row0`, `cross@row0`); constants have none.

use super::*;
use std::fmt::Write;

/// The whole module as text.
pub fn print_module(module: &Module) -> String {
    let mut out = String::new();
    let params: Vec<String> = module
        .params
        .iter()
        .map(|(n, v)| format!("{n} = {v}"))
        .collect();
    let _ = writeln!(out, "loss {}({})", module.name, params.join(", "));
    for (h, g) in module.groupings.iter() {
        let _ = writeln!(out, "{h} = {}", grouping(g));
    }
    for input in &module.inputs {
        let _ = writeln!(out, "input {} -> {}", input.name, input.grouping);
    }
    for (h, t) in module.tensors.iter() {
        let _ = writeln!(out, "{h} = {}  [{}]", tensor(&t.op), domain(t.rows));
    }
    for (h, m) in module.matrices.iter() {
        let _ = writeln!(
            out,
            "{h} = {}({}, {})  [{} x {}]",
            metric(m.metric),
            m.left,
            m.right,
            domain(module.tensors[m.left].rows),
            domain(module.tensors[m.right].rows)
        );
    }
    for (h, b) in module.blocks.iter() {
        let skips: Vec<String> = b.skips.iter().map(|s| s.to_string()).collect();
        let _ = write!(out, "{h} = per anchor over {}", domain(b.rows));
        if !skips.is_empty() {
            let _ = write!(out, ", skip if {}", skips.join(" or "));
        }
        out.push('\n');
    }
    for node in &module.order {
        match *node {
            Node::Set(h) => {
                let _ = writeln!(out, "{}", set_line(module, h));
            }
            Node::Expr(h) => {
                let _ = writeln!(out, "{}", expr_line(module, h));
            }
        }
    }
    let _ = writeln!(out, "loss = {}", module.loss_expr());
    for (name, h) in &module.stats {
        let _ = writeln!(out, "stat {name} = {h}");
    }
    out
}

/// The module followed by the phases of its forward schedule: `losscc compile --emit ir`.
pub fn print_program(module: &Module) -> String {
    let roots: Vec<Handle<Expr>> = std::iter::once(module.loss_expr())
        .chain(module.stats.iter().map(|s| s.1))
        .collect();
    print_module(module) + &print_schedule(&schedule(module, &roots, &[]))
}

/// The phases of a schedule, one line each.
pub fn print_schedule(schedule: &Schedule) -> String {
    let list = |items: &[Handle<Expr>]| {
        items
            .iter()
            .map(|h| h.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let effects = |items: &[usize]| {
        items
            .iter()
            .map(|i| format!("scatter{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = String::new();
    for (index, phase) in schedule.phases.iter().enumerate() {
        let _ = match phase {
            Phase::Batch { exprs, effects: e } => {
                let mut parts = vec![];
                if !exprs.is_empty() {
                    parts.push(list(exprs));
                }
                if !e.is_empty() {
                    parts.push(effects(e));
                }
                writeln!(out, "phase {index}: batch {}", parts.join("; "))
            }
            Phase::Rows {
                block,
                outputs,
                effects: e,
            } => {
                let mut parts = vec![];
                if !outputs.is_empty() {
                    parts.push(format!("out {}", list(outputs)));
                }
                if !e.is_empty() {
                    parts.push(effects(e));
                }
                writeln!(out, "phase {index}: rows {block}: {}", parts.join("; "))
            }
        };
    }
    out
}

pub(crate) fn domain(d: Domain) -> String {
    match d {
        Domain::Samples => "samples".into(),
        Domain::Groups(g) => format!("groups {g}"),
    }
}

fn grouping(g: &Grouping) -> String {
    match g {
        Grouping::Labels => "labels".into(),
        Grouping::KMeans {
            features,
            clusters,
            site,
        } => format!("kmeans({features}, {clusters}, site {site})"),
        Grouping::Input { name, default } => format!("input {name:?} else {default}"),
        Grouping::SplitByLabel { groups } => format!("split({groups}, labels)"),
    }
}

fn tensor(op: &TensorOp) -> String {
    match op {
        TensorOp::Embedding => "x".into(),
        TensorOp::Columns { source, start, end } => format!("{source}[:, {start}..{end}]"),
        TensorOp::Partition {
            source,
            sizes,
            part,
            site,
        } => {
            let sizes: Vec<String> = sizes.iter().map(|s| s.to_string()).collect();
            format!(
                "partition({source}, [{}], part {part}, site {site})",
                sizes.join(", ")
            )
        }
        TensorOp::Normalize { source } => format!("normalize({source})"),
        TensorOp::Centres { source, groups } => format!("centres({source}, {groups})"),
        TensorOp::Stop { source } => format!("stop({source})"),
        TensorOp::Concat { left, right } => format!("concat({left}, {right})"),
        TensorOp::OneHot { groups } => format!("onehot({groups})"),
        TensorOp::Scale { source, factor } => {
            format!("{} * {source}", crate::syntax::format_number(*factor))
        }
    }
}

fn metric(m: Metric) -> String {
    match m {
        Metric::Dot => "dot".into(),
        Metric::Euclid { eps } => format!("euclid[eps={}]", crate::syntax::format_number(eps)),
        Metric::SqEuclid => "sqeuclid".into(),
    }
}

pub(crate) fn level(l: Level) -> String {
    match l {
        Level::Const => String::new(),
        Level::Batch => " @batch".into(),
        Level::Row(b) => format!(" @{b}"),
        Level::Member { block: None, .. } => " @member".into(),
        Level::Member { block: Some(b), .. } => format!(" @member@{b}"),
        Level::Cross { block, .. } => format!(" @cross@{block}"),
    }
}

fn scope(s: Scope) -> String {
    match s {
        Scope::Row(b) => b.to_string(),
        Scope::Batch => "batch".into(),
    }
}

pub(crate) fn set_line(module: &Module, h: Handle<Set>) -> String {
    let s = &module.sets[h];
    let def = match &s.kind {
        SetKind::Entries => "entries".to_string(),
        SetKind::Filter { base, predicate } => format!("{base} where {predicate}"),
        SetKind::Extreme {
            base,
            count,
            largest,
        } => {
            format!(
                "{}({base}, {count})",
                if *largest { "largest" } else { "smallest" }
            )
        }
        SetKind::Sample {
            base,
            count,
            log_weight,
            site,
        } => {
            format!("sample({base}, {count}, log_weight {log_weight}, site {site})")
        }
        SetKind::Union { left, right } => format!("{left} | {right}"),
        SetKind::Fallback { primary, fallback } => format!("{primary} else {fallback}"),
        SetKind::Cross { left, right } => format!("cross({left}, {right})"),
        SetKind::Anchors => "anchors".into(),
        SetKind::Skipped => "skipped".into(),
        SetKind::VectorEntries => "vector entries".into(),
    };
    let shape = match s.shape {
        SetShape::Members(space) => format!("members {}", space_text(space)),
        SetShape::Cross(space) => format!("cross {}", space_text(space)),
        SetShape::Anchors(b) => format!("anchors of {b}"),
        SetShape::Vector(n) => format!("vector {n}"),
    };
    let block = s.block.map(|b| format!("@{b}")).unwrap_or_default();
    format!(
        "{h} = {def}, v = {}  [{shape}]{}{block}",
        s.value,
        if block.is_empty() { "" } else { " " }
    )
}

fn space_text(space: Space) -> String {
    let d = |d: Option<Domain>| d.map(domain).unwrap_or_else(|| "any".into());
    format!("{} x {}", d(space.rows), d(space.cols))
}

fn ty_suffix(ty: Type) -> String {
    match ty {
        Type::Num => String::new(),
        Type::Bool => ": bool".into(),
        Type::Vector(n) => format!(": vec{n}"),
        Type::Index => ": index".into(),
    }
}

pub(crate) fn expr_text(kind: &ExprKind) -> String {
    match kind {
        ExprKind::Const(Real(v)) => crate::syntax::format_number(*v),
        ExprKind::Bool(b) => b.to_string(),
        ExprKind::BatchSize => "n".into(),
        ExprKind::Entry(m) => format!("{m}[i, j]"),
        ExprKind::Same => "same".into(),
        ExprKind::IsSelf => "self".into(),
        ExprKind::Index(Axis::Row) => "i".into(),
        ExprKind::Index(Axis::Col) => "j".into(),
        ExprKind::GroupSize { groups, axis } => {
            format!(
                "size({groups})[{}]",
                if *axis == Axis::Row { "i" } else { "j" }
            )
        }
        ExprKind::CrossSide { side, value } => {
            format!("{}({value})", if *side == Side::Left { "p" } else { "q" })
        }
        ExprKind::Unary { op, arg } => format!("{}({arg})", op.name()),
        ExprKind::Binary {
            op: op @ (BinaryOp::Min | BinaryOp::Max),
            lhs,
            rhs,
        } => {
            format!("{}({lhs}, {rhs})", op.symbol())
        }
        ExprKind::Binary { op, lhs, rhs } => format!("{lhs} {} {rhs}", op.symbol()),
        ExprKind::Select {
            cond,
            then,
            otherwise,
        } => format!("if {cond} then {then} else {otherwise}"),
        ExprKind::Stop(arg) => format!("stop({arg})"),
        ExprKind::Reduce {
            op,
            set,
            body,
            scope: s,
        } => format!("{}({set}, {body}) in {}", op.name(), scope(*s)),
        ExprKind::Rank { set, k, scope: s } => format!("rank({set}, {k}) in {}", scope(*s)),
        ExprKind::Cut {
            set,
            count,
            largest,
            part,
        } => format!(
            "cut({}({set}, {count})).{}",
            if *largest { "largest" } else { "smallest" },
            match part {
                CutPart::Value => "value",
                CutPart::Row => "row",
                CutPart::Col => "col",
            }
        ),
        ExprKind::Hist {
            set,
            bins,
            lo,
            hi,
            scope: s,
        } => format!(
            "hist({set}, {bins}, {}, {}) in {}",
            crate::syntax::format_number(lo.0),
            crate::syntax::format_number(hi.0),
            scope(*s)
        ),
        ExprKind::Cumsum(v) => format!("cumsum({v})"),
        ExprKind::ReverseCumsum(v) => format!("reverse_cumsum({v})"),
        ExprKind::ArgReduce {
            op,
            set,
            body,
            scope: s,
        } => {
            let op = match op {
                ArgOp::Min => "argmin".to_string(),
                ArgOp::Max => "argmax".to_string(),
                ArgOp::Rank(k) => format!("argrank[{k}]"),
            };
            format!("{op}({set}, {body}) in {}", scope(*s))
        }
        ExprKind::At { value, at } => format!("{value} at {at}"),
        ExprKind::HistSlope {
            adjoint,
            value,
            bins,
            lo,
            hi,
        } => format!(
            "hist_slope({adjoint}, {value}, {bins}, {}, {})",
            crate::syntax::format_number(lo.0),
            crate::syntax::format_number(hi.0)
        ),
    }
}

pub(crate) fn expr_line(module: &Module, h: Handle<Expr>) -> String {
    let e = &module.exprs[h];
    format!(
        "{h} = {}{}{}",
        expr_text(&e.kind),
        ty_suffix(e.ty),
        level(e.level)
    )
}
