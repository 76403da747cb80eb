//! Lowering: AST -> IR.
//!
//! Resolves names, folds parameters and constants, expands `for` comprehensions and
//! inlines calls of `fn` helpers and of other losses, checks types, levels and spaces,
//! and rejects what cannot be evaluated (a reduction over a set that is provably empty, a
//! count that is not a positive integer, ...). Everything a spec computes ends up in one
//! flat [`Module`].

use super::build::{Builder, Conflict};
use super::error::LowerError;
use super::*;
use crate::diagnostic::Span;
use crate::syntax::ast::{self, ExprKind as Ast, StmtKind};
use crate::syntax::{ParsedFile, Program};
use std::collections::HashMap;

/// A parameter's value: a number or a list of numbers.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    Num(f64),
    List(Vec<f64>),
}

impl std::fmt::Display for ParamValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParamValue::Num(v) => write!(f, "{}", crate::syntax::format_number(*v)),
            ParamValue::List(items) => {
                let items: Vec<String> = items
                    .iter()
                    .map(|v| crate::syntax::format_number(*v))
                    .collect();
                write!(f, "[{}]", items.join(", "))
            }
        }
    }
}

/// Parameter overrides, by name.
pub type Params = Vec<(String, ParamValue)>;

/// The loss a file defines: the one named like the file, else its only loss.
pub fn entry_loss(file: &ParsedFile) -> Result<&ast::LossDef, LowerError> {
    let losses: Vec<&ast::LossDef> = file.ast.losses().collect();
    if let Some(named) = losses.iter().find(|l| l.name.name == file.name) {
        return Ok(named);
    }
    match losses.as_slice() {
        [only] => Ok(only),
        [] => Err(LowerError::NoEntry {
            message: format!("`{}` defines no `loss`", file.name),
            span: Span::new(file.file, 0..0),
        }),
        [first, ..] => Err(LowerError::NoEntry {
            message: format!(
                "`{}` defines several losses and none is named `{}`",
                file.name, file.name
            ),
            span: first.name.span,
        }),
    }
}

/// Rejects two `loss` or `fn` items of one file with the same name: calls would silently
/// pick the first.
fn unique_items(file: &ParsedFile) -> Result<(), LowerError> {
    let names: Vec<&ast::Ident> = file
        .ast
        .items
        .iter()
        .map(|item| match item {
            ast::Item::Loss(l) => &l.name,
            ast::Item::Fn(f) => &f.name,
        })
        .collect();
    for (index, name) in names.iter().enumerate() {
        if let Some(first) = names[..index].iter().find(|n| n.name == name.name) {
            return Err(LowerError::Duplicate {
                name: name.name.clone(),
                span: name.span,
                previous: Some(first.span),
            });
        }
    }
    Ok(())
}

/// Lowers the program's entry loss with its parameters and the given overrides.
pub fn lower(program: &Program, overrides: &Params) -> Result<Module, LowerError> {
    for file in &program.files {
        unique_items(file)?;
    }
    let main = &program.files[program.main];
    let loss = entry_loss(main)?;
    let mut lowerer = Lowerer::new(&program.files);
    lowerer.file = program.main;
    let params = lowerer.bind_params(loss, overrides, None)?;
    let x = lowerer.embedding();
    let result = lowerer.instantiate_loss(program.main, loss, params.clone(), x, loss.name.span)?;
    let mut builder = lowerer.builder;
    builder.module.name = loss.name.name.clone();
    builder.module.params = params
        .into_iter()
        .map(|(name, value, _)| (name, value))
        .collect();
    builder.module.loss = Some(result.loss);
    builder.module.stats = result.stats;
    for (block, rows) in lowerer.block_rows.into_iter().enumerate() {
        builder.module.blocks[Handle::from_index(block)].rows = rows.unwrap_or(Domain::Samples);
    }
    Ok(builder.finish())
}

/// A value during lowering. Numbers, booleans, vectors and per-member values are IR
/// expressions; lists, pairs, tensors and groupings exist only at compile time.
#[derive(Debug, Clone)]
enum Value {
    Expr(Handle<Expr>),
    Set(Handle<Set>),
    Tensor(Handle<Tensor>),
    Groups(Handle<Grouping>),
    GroupSizes(Handle<Grouping>),
    List(Vec<Value>),
    Pair(Box<Value>, Box<Value>),
}

/// A name's value and where it was defined (None for built-ins).
#[derive(Debug, Clone)]
struct Binding {
    value: Value,
    span: Option<Span>,
    /// The `per anchor` block the name was bound in, if any.
    block: Option<Handle<Block>>,
}

/// The bindings of one instantiated body (a loss or a fn).
#[derive(Debug, Default)]
struct Env {
    names: HashMap<String, Binding>,
}

/// Names that only exist in some positions, bound while lowering those positions.
#[derive(Debug, Clone, Copy, Default)]
struct Context {
    /// `v`: the value of the current set member.
    v: Option<Handle<Expr>>,
    /// `p`, `q`: the two members of a cross pair.
    p: Option<Handle<Expr>>,
    q: Option<Handle<Expr>>,
    /// The `per anchor` block being lowered.
    block: Option<Handle<Block>>,
    /// Whether that block was opened by the body being lowered, rather than by the caller
    /// of the `fn` whose body this is.
    own_block: bool,
}

/// What an instantiated loss produced.
struct LossResult {
    loss: Handle<Expr>,
    stats: Vec<(String, Handle<Expr>)>,
}

/// Built-in names that a spec may not rebind.
const RESERVED: &[&str] = &["x", "labels", "n", "v", "p", "q", "i", "j", "same", "self"];

struct Lowerer<'a> {
    files: &'a [ParsedFile],
    builder: Builder,
    /// The row domain of each block, once a set over some matrix fixed it.
    block_rows: Vec<Option<Domain>>,
    /// Losses and fns being instantiated, to reject recursion.
    stack: Vec<(usize, String)>,
    labels: Handle<Grouping>,
    /// The file whose body is being lowered: calls resolve against its items and uses.
    file: usize,
}

type Result<T, E = LowerError> = std::result::Result<T, E>;

impl<'a> Lowerer<'a> {
    fn new(files: &'a [ParsedFile]) -> Lowerer<'a> {
        let mut module = Module::default();
        let labels = module.groupings.append(Grouping::Labels);
        Lowerer {
            files,
            builder: Builder::new(module),
            block_rows: Vec::new(),
            stack: Vec::new(),
            labels,
            file: 0,
        }
    }

    fn embedding(&mut self) -> Handle<Tensor> {
        self.tensor(TensorOp::Embedding, Domain::Samples, None)
    }

    // ---- parameters ----------------------------------------------------------------------

    /// The loss's parameters: defaults, then named overrides. `call_span` is set when the
    /// overrides come from a call in a spec rather than from the command line.
    fn bind_params(
        &mut self,
        loss: &ast::LossDef,
        overrides: &Params,
        call_span: Option<Span>,
    ) -> Result<Vec<(String, ParamValue, Span)>> {
        let mut params: Vec<(String, ParamValue, Span)> = Vec::new();
        for param in &loss.params {
            if params.iter().any(|(name, _, _)| *name == param.name.name) {
                return Err(LowerError::Duplicate {
                    name: param.name.name.clone(),
                    span: param.name.span,
                    previous: loss
                        .params
                        .iter()
                        .find(|p| p.name.name == param.name.name)
                        .map(|p| p.name.span),
                });
            }
            if RESERVED.contains(&param.name.name.as_str()) {
                return Err(LowerError::Duplicate {
                    name: param.name.name.clone(),
                    span: param.name.span,
                    previous: None,
                });
            }
            let value = self.constant_param(&param.default)?;
            params.push((param.name.name.clone(), value, param.default.span));
        }
        for (name, value) in overrides {
            let Some(slot) = params.iter_mut().find(|(n, _, _)| n == name) else {
                let known: Vec<&str> = loss.params.iter().map(|p| p.name.name.as_str()).collect();
                return Err(LowerError::Override {
                    message: format!("`{}` has no parameter `{name}`", loss.name.name),
                    span: call_span.unwrap_or(loss.name.span),
                    help: Some(if known.is_empty() {
                        "this loss has no parameters".to_string()
                    } else {
                        format!("its parameters are: {}", known.join(", "))
                    }),
                });
            };
            let same_kind = matches!(
                (&slot.1, value),
                (ParamValue::Num(_), ParamValue::Num(_))
                    | (ParamValue::List(_), ParamValue::List(_))
            );
            if !same_kind {
                let kind = |v: &ParamValue| match v {
                    ParamValue::Num(_) => "a number",
                    ParamValue::List(_) => "a list of numbers",
                };
                return Err(LowerError::Override {
                    message: format!(
                        "parameter `{name}` is {}, not {}",
                        kind(&slot.1),
                        kind(value)
                    ),
                    span: call_span.unwrap_or(slot.2),
                    help: Some(format!("its default is {}", slot.1)),
                });
            }
            let finite = match value {
                ParamValue::Num(v) => v.is_finite(),
                ParamValue::List(items) => items.iter().all(|v| v.is_finite()),
            };
            if !finite {
                return Err(LowerError::NotFinite {
                    what: format!("value of parameter `{name}`"),
                    span: call_span.unwrap_or(slot.2),
                });
            }
            slot.1 = value.clone();
        }
        Ok(params)
    }

    /// A parameter default: a constant number or a list of constant numbers.
    fn constant_param(&mut self, expr: &ast::Expr) -> Result<ParamValue> {
        let mut env = Env::default();
        let value = self.expr(expr, &mut env, Context::default())?;
        let number = |lowerer: &Self, value: &Value| match value {
            Value::Expr(h) => lowerer.builder.constant(*h),
            _ => None,
        };
        let not_constant = || LowerError::BadValue {
            message: "a parameter's default must be a number or a list of numbers".into(),
            span: expr.span,
            origin: None,
        };
        match &value {
            Value::List(items) => items
                .iter()
                .map(|item| number(self, item).ok_or_else(not_constant))
                .collect::<Result<Vec<f64>>>()
                .map(ParamValue::List),
            other => number(self, other)
                .map(ParamValue::Num)
                .ok_or_else(not_constant),
        }
    }

    fn param_value(&mut self, value: &ParamValue) -> Value {
        match value {
            ParamValue::Num(v) => Value::Expr(self.builder.constant_expr(*v)),
            ParamValue::List(items) => Value::List(
                items
                    .iter()
                    .map(|v| Value::Expr(self.builder.constant_expr(*v)))
                    .collect(),
            ),
        }
    }

    // ---- instantiation -------------------------------------------------------------------

    fn enter(&mut self, file: usize, name: &str, span: Span) -> Result<()> {
        if self.stack.iter().any(|(f, n)| *f == file && n == name) {
            return Err(LowerError::Recursion {
                name: name.to_string(),
                span,
            });
        }
        self.stack.push((file, name.to_string()));
        Ok(())
    }

    fn instantiate_loss(
        &mut self,
        file: usize,
        loss: &ast::LossDef,
        params: Vec<(String, ParamValue, Span)>,
        x: Handle<Tensor>,
        call_span: Span,
    ) -> Result<LossResult> {
        self.enter(file, &loss.name.name, call_span)?;
        let caller_file = std::mem::replace(&mut self.file, file);
        let mut env = Env::default();
        env.names.insert(
            "x".into(),
            Binding {
                value: Value::Tensor(x),
                span: None,
                block: None,
            },
        );
        for (name, value, span) in &params {
            let value = self.param_value(value);
            env.names.insert(
                name.clone(),
                Binding {
                    value,
                    span: Some(*span),
                    block: None,
                },
            );
        }
        let mut outcome = BodyOutcome::default();
        self.body(
            &loss.body,
            &mut env,
            Context::default(),
            BodyKind::Loss,
            &mut outcome,
        )?;
        self.stack.pop();
        self.file = caller_file;
        let loss_value = outcome.loss.ok_or_else(|| LowerError::NoLoss {
            name: loss.name.name.clone(),
            span: loss.name.span,
        })?;
        Ok(LossResult {
            loss: loss_value,
            stats: outcome.stats,
        })
    }

    fn body(
        &mut self,
        block: &ast::Block,
        env: &mut Env,
        ctx: Context,
        kind: BodyKind,
        outcome: &mut BodyOutcome,
    ) -> Result<()> {
        for stmt in &block.stmts {
            self.stmt(stmt, env, ctx, kind, outcome)?;
        }
        Ok(())
    }

    fn stmt(
        &mut self,
        stmt: &ast::Stmt,
        env: &mut Env,
        ctx: Context,
        kind: BodyKind,
        outcome: &mut BodyOutcome,
    ) -> Result<()> {
        let in_block = ctx.block.is_some();
        let placement = |message: &str, help: &str| LowerError::Placement {
            message: message.to_string(),
            span: stmt.span,
            help: Some(help.to_string()),
        };
        match &stmt.kind {
            StmtKind::Let { name, value } => {
                let value = self.expr(value, env, ctx)?;
                self.bind(env, name, value, ctx.block)
            }
            StmtKind::Stat { name, value } => {
                if kind != BodyKind::Loss {
                    return Err(placement("`stat` inside a `fn`", "stats belong to a loss"));
                }
                if in_block {
                    return Err(placement(
                        "`stat` inside `per anchor`",
                        "stats are batch values: move it after the block and reduce over anchors",
                    ));
                }
                let handle = self.expr(value, env, ctx)?;
                let handle = self.batch_number(handle, value.span, "a stat")?;
                if let Some(index) = outcome.stats.iter().position(|(n, _)| *n == name.name) {
                    return Err(LowerError::Duplicate {
                        name: name.name.clone(),
                        span: name.span,
                        previous: outcome.stat_spans.get(index).copied(),
                    });
                }
                outcome.stats.push((name.name.clone(), handle));
                outcome.stat_spans.push(name.span);
                Ok(())
            }
            StmtKind::Input { name, default } => {
                if in_block {
                    return Err(placement(
                        "`input` inside `per anchor`",
                        "declare inputs at batch level",
                    ));
                }
                let value = self.expr(default, env, ctx)?;
                let Value::Groups(default_groups) = value else {
                    return Err(LowerError::Type {
                        expected: "a grouping (e.g. `kmeans(...)`)".into(),
                        found: describe(&value, &self.builder).into(),
                        span: default.span,
                        help: Some("inputs supply groupings of the samples".into()),
                    });
                };
                let grouping = self.grouping(
                    Grouping::Input {
                        name: name.name.clone(),
                        default: default_groups,
                    },
                    Some(stmt.span),
                );
                if !self
                    .builder
                    .module
                    .inputs
                    .iter()
                    .any(|i| i.name == name.name)
                {
                    self.builder.module.inputs.push(Input {
                        name: name.name.clone(),
                        grouping,
                    });
                }
                self.bind(env, name, Value::Groups(grouping), None)
            }
            StmtKind::Skip { cond } => {
                let Some(block) = ctx.block else {
                    return Err(placement(
                        "`skip if` outside `per anchor`",
                        "only an anchor can be skipped: put it inside `per anchor { ... }`",
                    ));
                };
                let handle = self.expr(cond, env, ctx)?;
                let handle = self.expect_bool(handle, cond.span)?;
                let level = self.builder.expr(handle).level;
                if !matches!(level, Level::Const | Level::Batch | Level::Row(_)) {
                    return Err(self.level_error(
                        handle,
                        cond.span,
                        "a skip condition must be one value per anchor",
                    ));
                }
                self.builder.module.blocks[block].skips.push(handle);
                if !env.names.contains_key("skipped") {
                    let skipped = self.skipped_set(block);
                    env.names.insert(
                        "skipped".into(),
                        Binding {
                            value: Value::Set(skipped),
                            span: Some(stmt.span),
                            block: None,
                        },
                    );
                }
                Ok(())
            }
            StmtKind::Return { value } => {
                if kind != BodyKind::Fn {
                    return Err(placement(
                        "`return` outside a `fn` body",
                        "a loss sets its value with `loss = ...`",
                    ));
                }
                if ctx.own_block {
                    return Err(placement(
                        "`return` inside `per anchor`",
                        "a `fn` returns once, at the end of its body, after its blocks",
                    ));
                }
                if outcome.returned.is_some() {
                    return Err(placement(
                        "a second `return`",
                        "a `fn` returns once, at its end",
                    ));
                }
                outcome.returned = Some(self.expr(value, env, ctx)?);
                Ok(())
            }
            StmtKind::Loss { value } => {
                if kind != BodyKind::Loss {
                    return Err(placement(
                        "`loss = ...` outside a loss body",
                        "a `fn` gives its result with `return ...`",
                    ));
                }
                if in_block {
                    return Err(placement(
                        "`loss = ...` inside `per anchor`",
                        "the loss is one value for the batch: set it after the block, e.g. `loss = mean(term)`",
                    ));
                }
                if outcome.loss.is_some() {
                    return Err(placement("the loss is set twice", "set `loss` once"));
                }
                let handle = self.expr(value, env, ctx)?;
                outcome.loss = Some(self.batch_number(handle, value.span, "the loss")?);
                Ok(())
            }
            StmtKind::PerAnchor { body } => {
                if in_block {
                    return Err(placement(
                        "`per anchor` inside `per anchor`",
                        "blocks do not nest",
                    ));
                }
                let block = self.builder.module.blocks.append(Block {
                    rows: Domain::Samples,
                    skips: Vec::new(),
                });
                self.block_rows.push(None);
                self.builder.module.spans.blocks.insert(block, stmt.span);
                let inner = Context {
                    block: Some(block),
                    own_block: true,
                    ..ctx
                };
                self.body(body, env, inner, kind, outcome)
            }
        }
    }

    /// `same` compares labels, so the groups it is evaluated against must have them.
    fn check_labelled(&self, predicate: Handle<Expr>, shape: SetShape, span: Span) -> Result<()> {
        let (SetShape::Members(space) | SetShape::Cross(space)) = shape else {
            return Ok(());
        };
        let module = &self.builder.module;
        let unlabelled = [space.rows, space.cols]
            .into_iter()
            .flatten()
            .any(|d| match d {
                Domain::Groups(g) => !module.groupings[g].is_labelled(&module.groupings),
                Domain::Samples => false,
            });
        if !unlabelled {
            return Ok(());
        }
        let mut stack = vec![predicate];
        while let Some(h) = stack.pop() {
            match module.exprs[h].kind {
                ExprKind::Same => {
                    return Err(LowerError::Type {
                        expected: "groups with labels for `same`".into(),
                        found: "groups without labels (k-means clusters or a supplied grouping)"
                            .into(),
                        span,
                        help: Some(
                            "split the groups by class first: `split(groups, labels)`".into(),
                        ),
                    });
                }
                ExprKind::Unary { arg, .. } => stack.push(arg),
                ExprKind::Binary { lhs, rhs, .. } => stack.extend([lhs, rhs]),
                ExprKind::Select {
                    cond,
                    then,
                    otherwise,
                } => stack.extend([cond, then, otherwise]),
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether a value is a per-member number or a set of pair members.
    fn ranges_over_pairs(&self, value: &Value) -> bool {
        match value {
            Value::Expr(h) => matches!(self.builder.expr(*h).level, Level::Member { .. }),
            Value::Set(s) => matches!(self.builder.set(*s).shape, SetShape::Members(_)),
            _ => false,
        }
    }

    fn skipped_set(&mut self, block: Handle<Block>) -> Handle<Set> {
        let one = self.builder.constant_expr(1.0);
        self.builder
            .add_set(SetKind::Skipped, one, SetShape::Anchors(block), None)
    }

    fn bind(
        &mut self,
        env: &mut Env,
        name: &ast::Ident,
        value: Value,
        block: Option<Handle<Block>>,
    ) -> Result<()> {
        if RESERVED.contains(&name.name.as_str()) {
            return Err(LowerError::Duplicate {
                name: name.name.clone(),
                span: name.span,
                previous: None,
            });
        }
        if let Some(previous) = env.names.get(&name.name) {
            return Err(LowerError::Duplicate {
                name: name.name.clone(),
                span: name.span,
                previous: previous.span,
            });
        }
        if let Value::Expr(h) = value
            && self.builder.module.spans.exprs.get(h).is_none()
        {
            self.builder.module.spans.exprs.insert(h, name.span);
        }
        env.names.insert(
            name.name.clone(),
            Binding {
                value,
                span: Some(name.span),
                block,
            },
        );
        Ok(())
    }

    /// `handle` as a batch-level number (the loss, a stat, a fn's scalar result).
    fn batch_number(&self, handle: Value, span: Span, what: &str) -> Result<Handle<Expr>> {
        let h = self.expect_number(handle, span)?;
        match self.builder.expr(h).level {
            Level::Const | Level::Batch => Ok(h),
            _ => Err(self.level_error(h, span, &format!("{what} must be one value for the batch"))),
        }
    }

    fn level_error(&self, h: Handle<Expr>, span: Span, message: &str) -> LowerError {
        let (found, help) = match self.builder.expr(h).level {
            Level::Row(_) => (
                "it is a per-anchor value",
                "reduce it over anchors, e.g. `sum(term) / n` or `mean(term)`",
            ),
            Level::Member { .. } => (
                "it is a per-member value",
                "reduce it over a set, e.g. `mean(pos)` or `sum(neg, exp(v))`",
            ),
            Level::Cross { .. } => ("it is a per-triplet value", "reduce it, e.g. `sum(valid)`"),
            Level::Const | Level::Batch => ("it is a batch value", ""),
        };
        LowerError::Level {
            message: format!("{message}, but {found}"),
            span,
            help: (!help.is_empty()).then(|| help.to_string()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyKind {
    Loss,
    Fn,
}

#[derive(Debug, Default)]
struct BodyOutcome {
    loss: Option<Handle<Expr>>,
    stats: Vec<(String, Handle<Expr>)>,
    /// Where each stat of `stats` is named.
    stat_spans: Vec<Span>,
    returned: Option<Value>,
}

fn describe(value: &Value, builder: &Builder) -> &'static str {
    match value {
        Value::Expr(h) => match builder.expr(*h).ty {
            Type::Bool => "a boolean",
            Type::Vector(_) => "a vector",
            Type::Index => "an index",
            Type::Num => match builder.expr(*h).level {
                Level::Member { .. } => "a per-member number",
                Level::Row(_) => "a per-anchor number",
                Level::Cross { .. } => "a per-triplet number",
                _ => "a number",
            },
        },
        Value::Set(_) => "a set",
        Value::Tensor(_) => "an embedding",
        Value::Groups(_) => "a grouping",
        Value::GroupSizes(_) => "group sizes",
        Value::List(_) => "a list",
        Value::Pair(..) => "a pair",
    }
}

/// A mistake in the arguments of a built-in.
fn arity(name: &str, expected: &str, found: usize, span: Span) -> LowerError {
    LowerError::Arity {
        name: name.to_string(),
        span,
        expected: expected.to_string(),
        found,
    }
}

/// Levenshtein distance, for "did you mean" suggestions.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let current = row[j + 1];
            row[j + 1] = (previous + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            previous = current;
        }
    }
    row[b.len()]
}

fn suggest<'n>(name: &str, candidates: impl IntoIterator<Item = &'n str>) -> Option<String> {
    candidates
        .into_iter()
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, c)| *d <= 2.max(name.len() / 3) && *d < c.len())
        .min()
        .map(|(_, c)| c.to_string())
}

/// The built-in functions (suggested for a misspelt name).
pub const BUILTINS: &[&str] = &[
    "dot",
    "euclid",
    "sqeuclid",
    "centres",
    "normalize",
    "branches",
    "partition",
    "concat",
    "onehot",
    "kmeans",
    "split",
    "sizes",
    "stop",
    "cross",
    "smallest",
    "largest",
    "sample",
    "sum",
    "mean",
    "min",
    "max",
    "count",
    "lse",
    "std",
    "empty",
    "rank",
    "hist",
    "cumsum",
    "exp",
    "log",
    "log1p",
    "sqrt",
    "softplus",
    "sigmoid",
    "relu",
    "abs",
    "floor",
    "clamp",
    "log_softmax",
    "softmax",
    "range",
    "pairs",
];

/// A call's arguments, lowered lazily: some bodies need `v` bound first.
struct Args<'e> {
    name: &'e str,
    span: Span,
    positional: Vec<&'e ast::Expr>,
    named: Vec<(&'e ast::Ident, &'e ast::Expr)>,
}

impl<'e> Args<'e> {
    fn new(callee: &'e ast::Ident, args: &'e [ast::Arg], span: Span) -> Args<'e> {
        let mut positional = Vec::new();
        let mut named = Vec::new();
        for arg in args {
            match &arg.name {
                Some(name) => named.push((name, &arg.value)),
                None => positional.push(&arg.value),
            }
        }
        Args {
            name: &callee.name,
            span,
            positional,
            named,
        }
    }

    /// Checks the positional count and the allowed named arguments.
    fn expect(&self, min: usize, max: usize, allowed: &[&str]) -> Result<()> {
        let found = self.positional.len();
        if found < min || found > max {
            let expected = match (min, max) {
                (a, b) if a == b => format!("{a} argument{}", if a == 1 { "" } else { "s" }),
                (a, b) => format!("{a} to {b} arguments"),
            };
            return Err(arity(self.name, &expected, found, self.span));
        }
        for (index, (name, _)) in self.named.iter().enumerate() {
            if !allowed.contains(&name.name.as_str()) {
                return Err(LowerError::NamedArgument {
                    message: format!("`{}` has no argument named `{}`", self.name, name.name),
                    span: name.span,
                    help: if allowed.is_empty() {
                        format!("`{}` takes no named arguments", self.name)
                    } else {
                        format!("its named arguments are: {}", allowed.join(", "))
                    },
                });
            }
            if self.named[..index]
                .iter()
                .any(|(other, _)| other.name == name.name)
            {
                return Err(LowerError::NamedArgument {
                    message: format!("`{}` is given twice", name.name),
                    span: name.span,
                    help: "give each named argument once".into(),
                });
            }
        }
        Ok(())
    }

    fn named(&self, name: &str) -> Option<&'e ast::Expr> {
        self.named
            .iter()
            .find(|(n, _)| n.name == name)
            .map(|(_, e)| *e)
    }
}

impl Lowerer<'_> {
    fn conflict(&self, conflict: Conflict, span: Span, what: &str) -> LowerError {
        match conflict {
            Conflict::Blocks => LowerError::Level {
                message: format!("{what} combines values of two different `per anchor` blocks"),
                span,
                help: Some("each block has its own anchors: reduce one of them to a batch value first".into()),
            },
            Conflict::Spaces => LowerError::Mismatch {
                message: format!("{what} combines per-member values of matrices with different rows or columns"),
                span,
                help: Some("both values must range over the same pairs, e.g. two matrices of the same embeddings".into()),
            },
            Conflict::MemberInCross => LowerError::Level {
                message: format!("{what} uses a per-member value inside a cross body"),
                span,
                help: Some("inside `cross(A, B, body)` members are named by `p` (of A) and `q` (of B)".into()),
            },
            Conflict::Types => LowerError::Type {
                expected: "operands of matching kinds".into(),
                found: format!("operands that {what} cannot combine"),
                span,
                help: None,
            },
        }
    }

    /// A type error: `found` where `expected` was.
    fn mismatch(&self, expected: &str, found: &Value, span: Span) -> LowerError {
        LowerError::Type {
            expected: expected.into(),
            found: describe(found, &self.builder).into(),
            span,
            help: None,
        }
    }

    fn expect_number(&self, value: Value, span: Span) -> Result<Handle<Expr>> {
        match value {
            Value::Expr(h) if self.builder.expr(h).ty == Type::Num => Ok(h),
            other => Err(LowerError::Type {
                expected: "a number".into(),
                found: describe(&other, &self.builder).into(),
                span,
                help: match other {
                    Value::Set(_) => Some(
                        "reduce the set to a number first, e.g. `mean(pos)` or `count(pos)`".into(),
                    ),
                    _ => None,
                },
            }),
        }
    }

    fn expect_numeric(&self, value: Value, span: Span) -> Result<Handle<Expr>> {
        match value {
            Value::Expr(h) if matches!(self.builder.expr(h).ty, Type::Num | Type::Vector(_)) => {
                Ok(h)
            }
            other => self.expect_number(other, span),
        }
    }

    fn expect_bool(&self, value: impl Into<ValueOrHandle>, span: Span) -> Result<Handle<Expr>> {
        let value = match value.into() {
            ValueOrHandle::Handle(h) => Value::Expr(h),
            ValueOrHandle::Value(v) => v,
        };
        match value {
            Value::Expr(h) if self.builder.expr(h).ty == Type::Bool => Ok(h),
            other => Err(LowerError::Type {
                expected: "a condition".into(),
                found: describe(&other, &self.builder).into(),
                span,
                help: Some(
                    "conditions compare values, e.g. `v > 0`, `empty(hard)`, `same and !self`"
                        .into(),
                ),
            }),
        }
    }

    fn expect_tensor(&self, value: Value, span: Span) -> Result<Handle<Tensor>> {
        match value {
            Value::Tensor(t) => Ok(t),
            other => {
                Err(self.mismatch("an embedding (like `x`, a branch or centres)", &other, span))
            }
        }
    }

    fn expect_groups(&self, value: Value, span: Span) -> Result<Handle<Grouping>> {
        match value {
            Value::Groups(g) => Ok(g),
            other => {
                Err(self.mismatch("a grouping (like `labels` or `kmeans(...)`)", &other, span))
            }
        }
    }

    fn expect_list(&self, value: Value, span: Span) -> Result<Vec<Value>> {
        match value {
            Value::List(items) => Ok(items),
            other => Err(self.mismatch("a list", &other, span)),
        }
    }

    /// A compile-time number.
    fn constant_of(&self, value: &Value, span: Span, what: &str) -> Result<f64> {
        match value {
            Value::Expr(h) => self
                .builder
                .constant(*h)
                .ok_or_else(|| LowerError::BadValue {
                    message: format!(
                        "{what} must be known at compile time (a number or a parameter)"
                    ),
                    span,
                    origin: None,
                }),
            other => Err(self.mismatch("a number", other, span)),
        }
    }

    fn constant_arg(
        &mut self,
        e: &ast::Expr,
        env: &mut Env,
        ctx: Context,
        what: &str,
    ) -> Result<f64> {
        let value = self.expr(e, env, ctx)?;
        self.constant_of(&value, e.span, what)
    }

    /// A compile-time integer at least `min`.
    fn integer(
        &self,
        value: f64,
        min: i64,
        span: Span,
        what: &str,
        origin: Option<Span>,
    ) -> Result<usize> {
        if value != value.trunc() || value < min as f64 || value > 1e9 {
            let kind = match min {
                0 => "a non-negative integer",
                1 => "a positive integer",
                _ => "an integer of at least 2",
            };
            return Err(LowerError::BadValue {
                message: format!(
                    "{what} must be {kind}, found {}",
                    crate::syntax::format_number(value)
                ),
                span,
                origin,
            });
        }
        Ok(value as usize)
    }

    /// Where a plain name in `expr` was defined, for pointing at a parameter's value.
    fn origin(&self, expr: &ast::Expr, env: &Env) -> Option<Span> {
        match &expr.kind {
            Ast::Name(name) => env.names.get(name).and_then(|b| b.span),
            _ => None,
        }
    }

    /// A count argument: a non-negative integer (positive when `min` is 1), checked now when
    /// it is constant, at run time otherwise.
    fn count_arg(
        &mut self,
        expr: &ast::Expr,
        env: &mut Env,
        ctx: Context,
        min: i64,
        what: &str,
    ) -> Result<Handle<Expr>> {
        let value = self.expr(expr, env, ctx)?;
        let h = self.expect_number(value, expr.span)?;
        if let Some(c) = self.builder.constant(h) {
            let origin = self.origin(expr, env);
            self.integer(c, min, expr.span, what, origin)?;
        }
        match self.builder.expr(h).level {
            Level::Const | Level::Batch | Level::Row(_) => Ok(h),
            _ => Err(self.level_error(
                h,
                expr.span,
                &format!("{what} must be one value per anchor"),
            )),
        }
    }

    fn tensor(&mut self, op: TensorOp, rows: Domain, span: Option<Span>) -> Handle<Tensor> {
        let tensor = Tensor { op, rows };
        if let Some((h, _)) = self
            .builder
            .module
            .tensors
            .iter()
            .find(|(_, t)| **t == tensor)
        {
            return h;
        }
        let h = self.builder.module.tensors.append(tensor);
        if let Some(span) = span {
            self.builder.module.spans.tensors.insert(h, span);
        }
        h
    }

    fn grouping(&mut self, grouping: Grouping, span: Option<Span>) -> Handle<Grouping> {
        if let Some((h, _)) = self
            .builder
            .module
            .groupings
            .iter()
            .find(|(_, g)| **g == grouping)
        {
            return h;
        }
        let h = self.builder.module.groupings.append(grouping);
        if let Some(span) = span {
            self.builder.module.spans.groupings.insert(h, span);
        }
        h
    }

    fn next_site(&mut self) -> u32 {
        let site = self.builder.module.random_sites;
        self.builder.module.random_sites += 1;
        site
    }

    fn record_span(&mut self, h: Handle<Expr>, span: Span) {
        if self.builder.module.spans.exprs.get(h).is_none() {
            self.builder.module.spans.exprs.insert(h, span);
        }
    }

    fn record_set_span(&mut self, h: Handle<Set>, span: Span) {
        if self.builder.module.spans.sets.get(h).is_none() {
            self.builder.module.spans.sets.insert(h, span);
        }
    }

    // ---- expressions -----------------------------------------------------------------------

    fn expr(&mut self, expr: &ast::Expr, env: &mut Env, ctx: Context) -> Result<Value> {
        let span = expr.span;
        let value = match &expr.kind {
            Ast::Number(v) => Value::Expr(self.builder.constant_expr(*v)),
            Ast::Name(name) => self.name(name, span, env, ctx)?,
            Ast::List(items) => Value::List(
                items
                    .iter()
                    .map(|item| self.expr(item, env, ctx))
                    .collect::<Result<_>>()?,
            ),
            Ast::Call { callee, args } => self.call(callee, args, span, env, ctx)?,
            Ast::Index { base, index } => self.index(base, index, env, ctx)?,
            Ast::Unary { op, operand } => {
                let value = self.expr(operand, env, ctx)?;
                match op {
                    ast::UnaryOp::Neg => {
                        let h = self.expect_numeric(value, operand.span)?;
                        Value::Expr(
                            self.builder
                                .unary(UnaryOp::Neg, h)
                                .map_err(|c| self.conflict(c, span, "`-`"))?,
                        )
                    }
                    ast::UnaryOp::Not => {
                        let h = self.expect_bool(value, operand.span)?;
                        Value::Expr(
                            self.builder
                                .unary(UnaryOp::Not, h)
                                .map_err(|c| self.conflict(c, span, "`!`"))?,
                        )
                    }
                }
            }
            Ast::Binary { op, lhs, rhs } => self.binary(*op, lhs, rhs, span, env, ctx)?,
            Ast::Where { set, predicate } => {
                let base = self.expr(set, env, ctx)?;
                let base = self.as_set(base, set.span, ctx)?;
                let base_set = self.builder.set(base).clone();
                let inner = Context {
                    v: Some(base_set.value),
                    p: None,
                    q: None,
                    ..ctx
                };
                let pred = self.expr(predicate, env, inner)?;
                let pred = self.expect_bool(pred, predicate.span)?;
                self.check_labelled(pred, base_set.shape, predicate.span)?;
                let pred_level = self.builder.expr(pred).level;
                let value_level = self.builder.expr(base_set.value).level;
                let level = Builder::combine(pred_level, value_level)
                    .map_err(|c| self.conflict(c, predicate.span, "this condition"))?;
                if let Level::Cross { .. } = pred_level
                    && !matches!(base_set.shape, SetShape::Cross(_))
                {
                    return Err(self.conflict(
                        Conflict::MemberInCross,
                        predicate.span,
                        "this condition",
                    ));
                }
                let block = self.set_block(base_set.block, level.block(), predicate.span)?;
                let h = self.builder.add_set(
                    SetKind::Filter {
                        base,
                        predicate: pred,
                    },
                    base_set.value,
                    base_set.shape,
                    block,
                );
                self.record_set_span(h, span);
                Value::Set(h)
            }
            Ast::Fallback { primary, fallback } => {
                let a = self.expr(primary, env, ctx)?;
                let a = self.as_set(a, primary.span, ctx)?;
                let b = self.expr(fallback, env, ctx)?;
                let b = self.as_set(b, fallback.span, ctx)?;
                let h = self.combine_sets(a, b, span, |primary, fallback| SetKind::Fallback {
                    primary,
                    fallback,
                })?;
                Value::Set(h)
            }
            Ast::If {
                cond,
                then,
                otherwise,
            } => {
                let c = self.expr(cond, env, ctx)?;
                let c = self.expect_bool(c, cond.span)?;
                if let Some(taken) = self.builder.bool_constant(c) {
                    return self.expr(if taken { then } else { otherwise }, env, ctx);
                }
                let t = self.expr(then, env, ctx)?;
                let t = self.expect_numeric(t, then.span)?;
                let o = self.expr(otherwise, env, ctx)?;
                let o = self.expect_numeric(o, otherwise.span)?;
                if self.builder.expr(t).ty != self.builder.expr(o).ty {
                    return Err(LowerError::Type {
                        expected: "both branches of the same kind".into(),
                        found: "a number and a vector".into(),
                        span,
                        help: None,
                    });
                }
                Value::Expr(
                    self.builder
                        .select(c, t, o)
                        .map_err(|k| self.conflict(k, span, "this `if`"))?,
                )
            }
            Ast::For {
                binding,
                iterable,
                body,
            } => {
                let items = self.expr(iterable, env, ctx)?;
                let items = self.expect_list(items, iterable.span)?;
                let names: Vec<&ast::Ident> = match binding {
                    ast::Binding::One(name) => vec![name],
                    ast::Binding::Pair(a, b) => vec![a, b],
                };
                let mut results = Vec::with_capacity(items.len());
                for item in items {
                    let parts = match (binding, item) {
                        (ast::Binding::One(_), item) => vec![item],
                        (ast::Binding::Pair(..), Value::Pair(a, b)) => vec![*a, *b],
                        (ast::Binding::Pair(..), other) => {
                            return Err(LowerError::Type {
                                expected: "a list of pairs, like `pairs(list)`".into(),
                                found: format!("a list of {}", describe(&other, &self.builder)),
                                span: iterable.span,
                                help: None,
                            });
                        }
                    };
                    for (name, part) in names.iter().zip(parts) {
                        self.bind(env, name, part, ctx.block)?;
                    }
                    let result = self.expr(body, env, ctx);
                    for name in &names {
                        env.names.remove(&name.name);
                    }
                    results.push(result?);
                }
                Value::List(results)
            }
        };
        if let Value::Expr(h) = value {
            self.record_span(h, span);
        }
        Ok(value)
    }

    fn name(&mut self, name: &str, span: Span, env: &Env, ctx: Context) -> Result<Value> {
        let missing = |what: &str, help: &str| LowerError::Level {
            message: format!("`{name}` is only defined {what}"),
            span,
            help: Some(help.to_string()),
        };
        Ok(match name {
            "v" => Value::Expr(ctx.v.ok_or_else(|| {
                missing("for a set member", "`v` is the member's value in `S where ...` and in a reduction body like `mean(S, exp(v))`")
            })?),
            "p" => Value::Expr(ctx.p.ok_or_else(|| missing("in a cross body", "`p` is the first member in `cross(A, B, p - q)`"))?),
            "q" => Value::Expr(ctx.q.ok_or_else(|| missing("in a cross body", "`q` is the second member in `cross(A, B, p - q)`"))?),
            "same" => Value::Expr(self.builder.same()),
            "self" => Value::Expr(self.builder.is_self()),
            "i" => Value::Expr(self.builder.index(Axis::Row)),
            "j" => Value::Expr(self.builder.index(Axis::Col)),
            "n" => Value::Expr(self.builder.batch_size()),
            "labels" => Value::Groups(self.labels),
            _ => match env.names.get(name) {
                Some(binding) => {
                    if ctx.block.is_none() && binding.block.is_some() && self.ranges_over_pairs(&binding.value) {
                        return Err(LowerError::Level {
                            message: format!(
                                "`{name}` is defined per member inside `per anchor`; outside it, it would range over every pair of the batch"
                            ),
                            span,
                            help: Some(format!(
                                "reduce `{name}` inside the block to a per-anchor value, or write the pair set at batch level"
                            )),
                        });
                    }
                    binding.value.clone()
                }
                None => {
                    let candidates = env.names.keys().map(String::as_str).chain(RESERVED.iter().copied());
                    return Err(LowerError::UnknownName {
                        name: name.to_string(),
                        span,
                        suggestion: suggest(name, candidates),
                    });
                }
            },
        })
    }

    fn index(
        &mut self,
        base: &ast::Expr,
        index: &ast::Expr,
        env: &mut Env,
        ctx: Context,
    ) -> Result<Value> {
        let value = self.expr(base, env, ctx)?;
        match value {
            Value::List(items) => {
                let at = self.expr(index, env, ctx)?;
                let at = self.constant_of(&at, index.span, "a list index")?;
                let origin = self.origin(index, env);
                let at = self.integer(at, 0, index.span, "a list index", origin)?;
                items.get(at).cloned().ok_or_else(|| LowerError::BadValue {
                    message: format!("index {at} is out of range for a list of {} items", items.len()),
                    span: index.span,
                    origin: None,
                })
            }
            Value::GroupSizes(groups) => match &index.kind {
                Ast::Name(axis) if axis == "i" || axis == "j" => {
                    let axis = if axis == "i" { Axis::Row } else { Axis::Col };
                    Ok(Value::Expr(self.builder.group_size(groups, axis)))
                }
                _ => Err(LowerError::Type {
                    expected: "`i` or `j`".into(),
                    found: "another index".into(),
                    span: index.span,
                    help: Some("group sizes are read at the row (`size[i]`) or column (`size[j]`) of a pair".into()),
                }),
            },
            other => Err(LowerError::Type {
                expected: "a list or group sizes".into(),
                found: describe(&other, &self.builder).into(),
                span: base.span,
                help: None,
            }),
        }
    }

    fn binary(
        &mut self,
        op: ast::BinaryOp,
        lhs: &ast::Expr,
        rhs: &ast::Expr,
        span: Span,
        env: &mut Env,
        ctx: Context,
    ) -> Result<Value> {
        let a = self.expr(lhs, env, ctx)?;
        let b = self.expr(rhs, env, ctx)?;
        let what = format!("`{}`", op.symbol());
        if op == ast::BinaryOp::Union {
            let a = self.as_set(a, lhs.span, ctx)?;
            let b = self.as_set(b, rhs.span, ctx)?;
            if let Some(merged) = self.union_of_filters(a, b, span) {
                return Ok(Value::Set(merged));
            }
            return Ok(Value::Set(self.combine_sets(
                a,
                b,
                span,
                |left, right| SetKind::Union { left, right },
            )?));
        }
        if op == ast::BinaryOp::Mul
            && let (Value::Expr(factor), Value::Tensor(t)) | (Value::Tensor(t), Value::Expr(factor)) =
                (&a, &b)
        {
            let factor = self.constant_of(&Value::Expr(*factor), span, "an embedding's scale")?;
            let rows = self.builder.module.tensors[*t].rows;
            return Ok(Value::Tensor(self.tensor(
                TensorOp::Scale { source: *t, factor },
                rows,
                Some(span),
            )));
        }
        let ir_op = match op {
            ast::BinaryOp::Or => BinaryOp::Or,
            ast::BinaryOp::And => BinaryOp::And,
            ast::BinaryOp::Lt => BinaryOp::Lt,
            ast::BinaryOp::Le => BinaryOp::Le,
            ast::BinaryOp::Gt => BinaryOp::Gt,
            ast::BinaryOp::Ge => BinaryOp::Ge,
            ast::BinaryOp::Eq => BinaryOp::Eq,
            ast::BinaryOp::Ne => BinaryOp::Ne,
            ast::BinaryOp::Add => BinaryOp::Add,
            ast::BinaryOp::Sub => BinaryOp::Sub,
            ast::BinaryOp::Mul => BinaryOp::Mul,
            ast::BinaryOp::Div => BinaryOp::Div,
            ast::BinaryOp::Pow => BinaryOp::Pow,
            ast::BinaryOp::Union => BinaryOp::Or,
        };
        let (a, b) = match ir_op {
            BinaryOp::And | BinaryOp::Or => (
                self.expect_bool(a, lhs.span)?,
                self.expect_bool(b, rhs.span)?,
            ),
            BinaryOp::Eq | BinaryOp::Ne if matches!(&a, Value::Expr(h) if self.builder.expr(*h).ty == Type::Bool) => {
                (
                    self.expect_bool(a, lhs.span)?,
                    self.expect_bool(b, rhs.span)?,
                )
            }
            _ if ir_op.is_predicate() => (
                self.expect_number(a, lhs.span)?,
                self.expect_number(b, rhs.span)?,
            ),
            _ => (
                self.expect_numeric(a, lhs.span)?,
                self.expect_numeric(b, rhs.span)?,
            ),
        };
        if ir_op == BinaryOp::Pow && self.builder.constant(b).is_none() {
            return Err(LowerError::Unsupported {
                message: "the exponent of `^` must be a constant".into(),
                span: rhs.span,
            });
        }
        let h = self
            .builder
            .binary(ir_op, a, b)
            .map_err(|c| self.conflict(c, span, &what))?;
        if let Some(value) = self.builder.constant(h)
            && !value.is_finite()
        {
            return Err(LowerError::NotFinite {
                what: format!("result of {what}"),
                span,
            });
        }
        Ok(Value::Expr(h))
    }

    /// `base where P | base where Q` as the one filter `base where P or Q`: a single pass
    /// over the base instead of two member lists merged.
    fn union_of_filters(
        &mut self,
        a: Handle<Set>,
        b: Handle<Set>,
        span: Span,
    ) -> Option<Handle<Set>> {
        let (sa, sb) = (self.builder.set(a).clone(), self.builder.set(b).clone());
        let (
            SetKind::Filter { base, predicate: p },
            SetKind::Filter {
                base: other,
                predicate: q,
            },
        ) = (sa.kind, sb.kind)
        else {
            return None;
        };
        if base != other || sa.block != sb.block {
            return None;
        }
        let either = self.builder.binary(BinaryOp::Or, p, q).ok()?;
        let kind = SetKind::Filter {
            base,
            predicate: either,
        };
        let h = self.builder.add_set(kind, sa.value, sa.shape, sa.block);
        self.record_set_span(h, span);
        Some(h)
    }

    /// The union or fallback of two sets of the same space and value.
    fn combine_sets(
        &mut self,
        a: Handle<Set>,
        b: Handle<Set>,
        span: Span,
        kind: impl FnOnce(Handle<Set>, Handle<Set>) -> SetKind,
    ) -> Result<Handle<Set>> {
        let sa = self.builder.set(a).clone();
        let sb = self.builder.set(b).clone();
        let (SetShape::Members(space_a), SetShape::Members(space_b)) = (sa.shape, sb.shape) else {
            return Err(LowerError::Type {
                expected: "two sets of pair members".into(),
                found: "a set of another kind".into(),
                span,
                help: None,
            });
        };
        if space_a.unify(space_b).is_none() || sa.value != sb.value {
            return Err(LowerError::Mismatch {
                message: "the two sets have different values".into(),
                span,
                help: Some("`A | B` and `A else B` combine subsets of the same pair values, like `pos | neg`".into()),
            });
        }
        let block = self.set_block(sa.block, sb.block, span)?;
        let h = self.builder.add_set(kind(a, b), sa.value, sa.shape, block);
        self.record_set_span(h, span);
        Ok(h)
    }

    fn set_block(
        &self,
        a: Option<Handle<Block>>,
        b: Option<Handle<Block>>,
        span: Span,
    ) -> Result<Option<Handle<Block>>> {
        match (a, b) {
            (Some(x), Some(y)) if x != y => Err(self.conflict(Conflict::Blocks, span, "this set")),
            (x, y) => Ok(x.or(y)),
        }
    }

    /// A value seen as a set: sets are themselves; a per-member value is the set of all the
    /// entries it ranges over; at batch level a per-anchor value is the set of anchors; a
    /// vector is the set of its entries.
    fn as_set(&mut self, value: Value, span: Span, ctx: Context) -> Result<Handle<Set>> {
        match value {
            Value::Set(s) => Ok(s),
            Value::Expr(h) => {
                let e = self.builder.expr(h).clone();
                let shape_block = match (e.level, e.ty) {
                    (Level::Member { space, block }, Type::Num) if space.is_complete() => {
                        Some((SetShape::Members(space), block))
                    }
                    (Level::Row(block), Type::Num) if ctx.block.is_none() => {
                        Some((SetShape::Anchors(block), None))
                    }
                    (Level::Batch | Level::Const, Type::Vector(n)) => {
                        Some((SetShape::Vector(n), None))
                    }
                    _ => None,
                };
                let Some((shape, block)) = shape_block else {
                    let help = match e.level {
                        Level::Row(_) => {
                            "per-anchor values are reduced over anchors after the block, at batch level"
                        }
                        Level::Member { .. } => {
                            "this value does not say which pairs it ranges over; use a pair matrix"
                        }
                        _ => {
                            "sets are pair matrices (`d`), filtered ones (`d where same`), or per-anchor values at batch level"
                        }
                    };
                    return Err(LowerError::Type {
                        expected: "a set".into(),
                        found: describe(&Value::Expr(h), &self.builder).into(),
                        span,
                        help: Some(help.into()),
                    });
                };
                let kind = match shape {
                    SetShape::Anchors(_) => SetKind::Anchors,
                    SetShape::Vector(_) => SetKind::VectorEntries,
                    _ => SetKind::Entries,
                };
                let s = self.builder.add_set(kind, h, shape, block);
                self.record_set_span(s, span);
                Ok(s)
            }
            other => Err(self.mismatch("a set", &other, span)),
        }
    }

    /// Where a reduction over `set` runs from here, checking that it can.
    fn scope_for(&mut self, set: Handle<Set>, span: Span, ctx: Context) -> Result<Scope> {
        let s = self.builder.set(set).clone();
        match (s.shape, ctx.block) {
            (SetShape::Members(space) | SetShape::Cross(space), Some(block)) => {
                if s.block.is_some_and(|b| b != block) {
                    return Err(self.conflict(Conflict::Blocks, span, "this reduction"));
                }
                if let Some(rows) = space.rows {
                    self.fix_rows(block, rows, span)?;
                }
                Ok(Scope::Row(block))
            }
            (SetShape::Members(_), None) => match s.block {
                Some(_) if s.kind == SetKind::Entries => Err(LowerError::Level {
                    message: "this is a per-member value that depends on the anchor, so it cannot be reduced at batch level".into(),
                    span,
                    help: Some("reduce it over a set inside `per anchor`, e.g. `term = mean(neg, relu(margin - v))`, then combine the per-anchor results".into()),
                }),
                Some(_) => Err(LowerError::Level {
                    message: "this set is defined per anchor, so it cannot be reduced at batch level".into(),
                    span,
                    help: Some("reduce it inside `per anchor`, then combine the per-anchor results, e.g. `sum(term)`".into()),
                }),
                None => Ok(Scope::Batch),
            },
            (SetShape::Cross(_), None) => Err(LowerError::Level {
                message: "a cross set can only be reduced inside `per anchor`".into(),
                span,
                help: None,
            }),
            (SetShape::Anchors(_), Some(_)) => Err(LowerError::Level {
                message: "per-anchor values are reduced over anchors after the block, not inside it".into(),
                span,
                help: Some("move this reduction after the `per anchor` block".into()),
            }),
            (SetShape::Anchors(_) | SetShape::Vector(_), None) | (SetShape::Vector(_), Some(_)) => Ok(Scope::Batch),
        }
    }

    fn fix_rows(&mut self, block: Handle<Block>, rows: Domain, span: Span) -> Result<()> {
        let slot = &mut self.block_rows[block.index()];
        match *slot {
            Some(existing) if existing != rows => Err(LowerError::Mismatch {
                message: "this set's rows are not the anchors of its block".into(),
                span,
                help: Some("one `per anchor` block iterates over one kind of row: samples, or the groups of one grouping".into()),
            }),
            _ => {
                *slot = Some(rows);
                Ok(())
            }
        }
    }

    /// A reduction body with `v` bound to the set's value; `None` means `v` itself.
    fn set_body(
        &mut self,
        set: Handle<Set>,
        body: Option<&ast::Expr>,
        env: &mut Env,
        ctx: Context,
    ) -> Result<Handle<Expr>> {
        let s = self.builder.set(set).clone();
        let Some(body) = body else { return Ok(s.value) };
        let inner = Context {
            v: Some(s.value),
            p: None,
            q: None,
            ..ctx
        };
        let value = self.expr(body, env, inner)?;
        let h = self.expect_number(value, body.span)?;
        Builder::combine(self.builder.expr(h).level, self.builder.expr(s.value).level)
            .map_err(|c| self.conflict(c, body.span, "this body"))?;
        Ok(h)
    }

    /// Rejects a reduction whose set has no member on any batch.
    fn check_not_empty(&self, set: Handle<Set>, span: Span, reduction: &str) -> Result<()> {
        match super::validate::proof_of_emptiness(&self.builder.module, set) {
            Some(reason) => Err(LowerError::EmptySet {
                reduction: reduction.to_string(),
                span,
                reason,
            }),
            None => Ok(()),
        }
    }

    fn reduction(
        &mut self,
        op: ReduceOp,
        args: &Args<'_>,
        env: &mut Env,
        ctx: Context,
    ) -> Result<Value> {
        args.expect(1, 2, &[])?;
        let set_expr = args.positional[0];
        let first = self.expr(set_expr, env, ctx)?;
        if let Value::List(items) = first {
            if args.positional.len() != 1 {
                return Err(arity(
                    args.name,
                    "1 argument for a list",
                    args.positional.len(),
                    args.span,
                ));
            }
            return self.fold_list(op, items, args.span);
        }
        let set = self.as_set(first, set_expr.span, ctx)?;
        let scope = self.scope_for(set, set_expr.span, ctx)?;
        let body = if op == ReduceOp::Count {
            if args.positional.len() > 1 {
                return Err(arity(
                    args.name,
                    "1 argument",
                    args.positional.len(),
                    args.span,
                ));
            }
            self.builder.constant_expr(1.0)
        } else {
            self.set_body(set, args.positional.get(1).copied(), env, ctx)?
        };
        if op != ReduceOp::Count {
            self.check_not_empty(set, set_expr.span, op.name())?;
        }
        let h = self.builder.reduce(op, set, body, scope);
        self.record_span(h, args.span);
        Ok(Value::Expr(h))
    }

    fn fold_list(&mut self, op: ReduceOp, items: Vec<Value>, span: Span) -> Result<Value> {
        if items.is_empty() {
            return Err(LowerError::EmptySet {
                reduction: op.name().into(),
                span,
                reason: "the list is empty".into(),
            });
        }
        let count = items.len();
        let handles = items
            .into_iter()
            .map(|item| self.expect_numeric(item, span))
            .collect::<Result<Vec<_>>>()?;
        let combine = match op {
            ReduceOp::Sum | ReduceOp::Mean => BinaryOp::Add,
            ReduceOp::Min => BinaryOp::Min,
            ReduceOp::Max => BinaryOp::Max,
            _ => {
                return Err(LowerError::Unsupported {
                    message: format!(
                        "`{}` of a list; lists support sum, mean, min and max",
                        op.name()
                    ),
                    span,
                });
            }
        };
        let mut acc = handles[0];
        for &h in &handles[1..] {
            acc = self
                .builder
                .binary(combine, acc, h)
                .map_err(|c| self.conflict(c, span, "this list"))?;
        }
        if op == ReduceOp::Mean {
            let n = self.builder.constant_expr(count as f64);
            acc = self
                .builder
                .binary(BinaryOp::Div, acc, n)
                .map_err(|c| self.conflict(c, span, "this mean"))?;
        }
        Ok(Value::Expr(acc))
    }

    fn matrix(
        &mut self,
        metric: Metric,
        args: &Args<'_>,
        env: &mut Env,
        ctx: Context,
    ) -> Result<Value> {
        let left = self.expr(args.positional[0], env, ctx)?;
        let left = self.expect_tensor(left, args.positional[0].span)?;
        let right = match args.positional.get(1) {
            Some(e) => {
                let value = self.expr(e, env, ctx)?;
                self.expect_tensor(value, e.span)?
            }
            None => left,
        };
        let matrix = Matrix {
            metric,
            left,
            right,
        };
        let existing = self
            .builder
            .module
            .matrices
            .iter()
            .find(|(_, m)| **m == matrix)
            .map(|(h, _)| h);
        let handle = match existing {
            Some(h) => h,
            None => self.builder.module.matrices.append(matrix),
        };
        Ok(Value::Expr(self.builder.entry(handle)))
    }

    fn unary_call(
        &mut self,
        op: UnaryOp,
        args: &Args<'_>,
        env: &mut Env,
        ctx: Context,
    ) -> Result<Value> {
        args.expect(1, 1, &[])?;
        let value = self.expr(args.positional[0], env, ctx)?;
        let h = self.expect_numeric(value, args.positional[0].span)?;
        let r = self
            .builder
            .unary(op, h)
            .map_err(|c| self.conflict(c, args.span, args.name))?;
        if let Some(value) = self.builder.constant(r)
            && !value.is_finite()
        {
            return Err(LowerError::NotFinite {
                what: format!("`{}(...)`", args.name),
                span: args.span,
            });
        }
        Ok(Value::Expr(r))
    }

    fn call(
        &mut self,
        callee: &ast::Ident,
        call_args: &[ast::Arg],
        span: Span,
        env: &mut Env,
        ctx: Context,
    ) -> Result<Value> {
        if let Some(value) = self.user_call(callee, call_args, span, env, ctx)? {
            return Ok(value);
        }
        let args = Args::new(callee, call_args, span);
        let name = callee.name.as_str();
        let unary = |op| Some(op);
        let op = match name {
            "exp" => unary(UnaryOp::Exp),
            "log" => unary(UnaryOp::Log),
            "log1p" => unary(UnaryOp::Log1p),
            "sqrt" => unary(UnaryOp::Sqrt),
            "softplus" => unary(UnaryOp::Softplus),
            "sigmoid" => unary(UnaryOp::Sigmoid),
            "relu" => unary(UnaryOp::Relu),
            "abs" => unary(UnaryOp::Abs),
            "floor" => unary(UnaryOp::Floor),
            _ => None,
        };
        if let Some(op) = op {
            return self.unary_call(op, &args, env, ctx);
        }
        let reduce = match name {
            "sum" => Some(ReduceOp::Sum),
            "mean" => Some(ReduceOp::Mean),
            "min" => Some(ReduceOp::Min),
            "max" => Some(ReduceOp::Max),
            "count" => Some(ReduceOp::Count),
            "lse" => Some(ReduceOp::Lse),
            "std" => Some(ReduceOp::Std),
            _ => None,
        };
        if let Some(op) = reduce {
            return self.reduction(op, &args, env, ctx);
        }
        match name {
            "dot" | "sqeuclid" => {
                args.expect(1, 2, &[])?;
                self.matrix(
                    if name == "dot" {
                        Metric::Dot
                    } else {
                        Metric::SqEuclid
                    },
                    &args,
                    env,
                    ctx,
                )
            }
            "euclid" => {
                args.expect(1, 2, &["eps"])?;
                let eps = match args.named("eps") {
                    Some(e) => {
                        let value = self.expr(e, env, ctx)?;
                        let eps = self.constant_of(&value, e.span, "`eps`")?;
                        if eps < 0.0 {
                            return Err(LowerError::BadValue {
                                message: format!(
                                    "`eps` must not be negative, found {}",
                                    crate::syntax::format_number(eps)
                                ),
                                span: e.span,
                                origin: self.origin(e, env),
                            });
                        }
                        eps
                    }
                    None => 1e-12,
                };
                self.matrix(Metric::Euclid { eps }, &args, env, ctx)
            }
            "clamp" => {
                args.expect(1, 1, &["min", "max"])?;
                if args.named.is_empty() {
                    return Err(LowerError::NamedArgument {
                        message: "`clamp` needs a bound".into(),
                        span,
                        help: "write `clamp(x, min = a)`, `clamp(x, max = b)` or both".into(),
                    });
                }
                let value = self.expr(args.positional[0], env, ctx)?;
                let mut h = self.expect_numeric(value, args.positional[0].span)?;
                for (bound, op) in [("min", BinaryOp::Max), ("max", BinaryOp::Min)] {
                    if let Some(e) = args.named(bound) {
                        let value = self.expr(e, env, ctx)?;
                        let b = self.expect_number(value, e.span)?;
                        h = self
                            .builder
                            .binary(op, h, b)
                            .map_err(|c| self.conflict(c, span, "`clamp`"))?;
                    }
                }
                Ok(Value::Expr(h))
            }
            "stop" => {
                args.expect(1, 1, &[])?;
                match self.expr(args.positional[0], env, ctx)? {
                    Value::Tensor(t) => {
                        let rows = self.builder.module.tensors[t].rows;
                        Ok(Value::Tensor(self.tensor(
                            TensorOp::Stop { source: t },
                            rows,
                            Some(span),
                        )))
                    }
                    other => {
                        let h = self.expect_numeric(other, args.positional[0].span)?;
                        Ok(Value::Expr(self.builder.stop(h)))
                    }
                }
            }
            "empty" => {
                args.expect(1, 1, &[])?;
                let value = self.expr(args.positional[0], env, ctx)?;
                let set = self.as_set(value, args.positional[0].span, ctx)?;
                let scope = self.scope_for(set, args.positional[0].span, ctx)?;
                let one = self.builder.constant_expr(1.0);
                let count = self.builder.reduce(ReduceOp::Count, set, one, scope);
                let zero = self.builder.constant_expr(0.0);
                Ok(Value::Expr(
                    self.builder
                        .binary(BinaryOp::Eq, count, zero)
                        .map_err(|c| self.conflict(c, span, "`empty`"))?,
                ))
            }
            "rank" => {
                args.expect(2, 2, &[])?;
                let value = self.expr(args.positional[0], env, ctx)?;
                let set = self.as_set(value, args.positional[0].span, ctx)?;
                let scope = self.scope_for(set, args.positional[0].span, ctx)?;
                let k = self.count_arg(args.positional[1], env, ctx, 0, "the rank")?;
                self.check_not_empty(set, args.positional[0].span, "rank")?;
                let h = self.builder.rank(set, k, scope);
                self.record_span(h, span);
                Ok(Value::Expr(h))
            }
            "smallest" | "largest" => {
                args.expect(2, 2, &[])?;
                let value = self.expr(args.positional[0], env, ctx)?;
                let base = self.as_set(value, args.positional[0].span, ctx)?;
                let count =
                    self.count_arg(args.positional[1], env, ctx, 1, "how many members to keep")?;
                let s = self.builder.set(base).clone();
                if !matches!(s.shape, SetShape::Members(_)) {
                    return Err(LowerError::Type {
                        expected: "a set of pair members".into(),
                        found: "another kind of set".into(),
                        span: args.positional[0].span,
                        help: None,
                    });
                }
                let block =
                    self.set_block(s.block, self.builder.expr(count).level.block(), span)?;
                let h = self.builder.add_set(
                    SetKind::Extreme {
                        base,
                        count,
                        largest: name == "largest",
                    },
                    s.value,
                    s.shape,
                    block,
                );
                self.record_set_span(h, span);
                Ok(Value::Set(h))
            }
            "sample" => {
                args.expect(3, 3, &[])?;
                let value = self.expr(args.positional[0], env, ctx)?;
                let base = self.as_set(value, args.positional[0].span, ctx)?;
                let s = self.builder.set(base).clone();
                if !matches!(s.shape, SetShape::Members(_)) || ctx.block.is_none() {
                    return Err(LowerError::Level {
                        message: "`sample` draws members for one anchor at a time".into(),
                        span,
                        help: Some("use it inside `per anchor` on a set of pair members".into()),
                    });
                }
                let count =
                    self.count_arg(args.positional[1], env, ctx, 0, "the number of draws")?;
                let weight = self.set_body(base, Some(args.positional[2]), env, ctx)?;
                let log_weight = match self.builder.expr(weight).kind {
                    ExprKind::Unary {
                        op: UnaryOp::Exp,
                        arg,
                    } => arg,
                    _ => self
                        .builder
                        .unary(UnaryOp::Log, weight)
                        .map_err(|c| self.conflict(c, span, "`sample`"))?,
                };
                let level = Builder::combine(
                    self.builder.expr(count).level,
                    self.builder.expr(log_weight).level,
                )
                .map_err(|c| self.conflict(c, span, "`sample`"))?;
                let block = self.set_block(s.block, level.block(), span)?;
                let site = self.next_site();
                let h = self.builder.add_set(
                    SetKind::Sample {
                        base,
                        count,
                        log_weight,
                        site,
                    },
                    s.value,
                    s.shape,
                    block,
                );
                self.record_set_span(h, span);
                Ok(Value::Set(h))
            }
            "cross" => {
                args.expect(3, 3, &[])?;
                let Some(block) = ctx.block else {
                    return Err(LowerError::Level {
                        message: "`cross` pairs the members of one anchor's sets".into(),
                        span,
                        help: Some("use it inside `per anchor`".into()),
                    });
                };
                let a = self.expr(args.positional[0], env, ctx)?;
                let left = self.as_set(a, args.positional[0].span, ctx)?;
                let b = self.expr(args.positional[1], env, ctx)?;
                let right = self.as_set(b, args.positional[1].span, ctx)?;
                let sl = self.builder.set(left).clone();
                let sr = self.builder.set(right).clone();
                let (SetShape::Members(space_l), SetShape::Members(space_r)) = (sl.shape, sr.shape)
                else {
                    return Err(LowerError::Type {
                        expected: "two sets of pair members".into(),
                        found: "another kind of set".into(),
                        span,
                        help: None,
                    });
                };
                let Some(space) = space_l.unify(space_r) else {
                    return Err(self.conflict(Conflict::Spaces, span, "`cross`"));
                };
                if let Some(rows) = space.rows {
                    self.fix_rows(block, rows, span)?;
                }
                let p = self
                    .builder
                    .cross_side(Side::Left, sl.value, block)
                    .map_err(|c| self.conflict(c, span, "`cross`"))?;
                let q = self
                    .builder
                    .cross_side(Side::Right, sr.value, block)
                    .map_err(|c| self.conflict(c, span, "`cross`"))?;
                let inner = Context {
                    v: None,
                    p: Some(p),
                    q: Some(q),
                    ..ctx
                };
                let body = self.expr(args.positional[2], env, inner)?;
                let body = self.expect_number(body, args.positional[2].span)?;
                let body_level = self.builder.expr(body).level;
                if matches!(body_level, Level::Member { .. }) {
                    return Err(self.conflict(
                        Conflict::MemberInCross,
                        args.positional[2].span,
                        "this cross body",
                    ));
                }
                self.set_block(sl.block, sr.block, span)?;
                let h = self.builder.add_set(
                    SetKind::Cross { left, right },
                    body,
                    SetShape::Cross(space),
                    Some(block),
                );
                self.record_set_span(h, span);
                Ok(Value::Set(h))
            }
            "hist" => {
                args.expect(4, 4, &[])?;
                let value = self.expr(args.positional[0], env, ctx)?;
                let set = self.as_set(value, args.positional[0].span, ctx)?;
                if ctx.block.is_some()
                    || !matches!(self.builder.set(set).shape, SetShape::Members(_))
                {
                    return Err(LowerError::Level {
                        message: "`hist` builds a batch-level histogram of pair values".into(),
                        span,
                        help: Some("use it at batch level on a set of pairs, e.g. `hist(s where same and i < j, 51, -1, 1)`".into()),
                    });
                }
                self.scope_for(set, args.positional[0].span, ctx)?;
                let bins =
                    self.constant_arg(args.positional[1], env, ctx, "the number of nodes")?;
                let origin = self.origin(args.positional[1], env);
                let bins = self.integer(
                    bins,
                    2,
                    args.positional[1].span,
                    "the number of nodes",
                    origin,
                )?;
                let lo = self.constant_arg(args.positional[2], env, ctx, "the lowest node")?;
                let hi = self.constant_arg(args.positional[3], env, ctx, "the highest node")?;
                if lo >= hi {
                    return Err(LowerError::BadValue {
                        message: "the lowest node must be below the highest".into(),
                        span: args.positional[2].span.to(args.positional[3].span),
                        origin: None,
                    });
                }
                self.check_not_empty(set, args.positional[0].span, "hist")?;
                Ok(Value::Expr(self.builder.hist(
                    set,
                    bins as u32,
                    lo,
                    hi,
                    Scope::Batch,
                )))
            }
            "cumsum" => {
                args.expect(1, 1, &[])?;
                let value = self.expr(args.positional[0], env, ctx)?;
                let h = self.expect_numeric(value.clone(), args.positional[0].span)?;
                self.builder
                    .cumsum(h, false)
                    .map(Value::Expr)
                    .map_err(|_| LowerError::Type {
                        expected: "a vector (like a histogram)".into(),
                        found: describe(&value, &self.builder).into(),
                        span: args.positional[0].span,
                        help: None,
                    })
            }
            "log_softmax" | "softmax" => {
                args.expect(2, 2, &[])?;
                let value = self.expr(args.positional[0], env, ctx)?;
                let set = self.as_set(value, args.positional[0].span, ctx)?;
                let scope = self.scope_for(set, args.positional[0].span, ctx)?;
                let body = self.set_body(set, Some(args.positional[1]), env, ctx)?;
                self.check_not_empty(set, args.positional[0].span, name)?;
                let lse = self.builder.reduce(ReduceOp::Lse, set, body, scope);
                self.record_span(lse, span);
                let mut h = self
                    .builder
                    .binary(BinaryOp::Sub, body, lse)
                    .map_err(|c| self.conflict(c, span, name))?;
                if name == "softmax" {
                    h = self
                        .builder
                        .unary(UnaryOp::Exp, h)
                        .map_err(|c| self.conflict(c, span, name))?;
                }
                Ok(Value::Expr(h))
            }
            "centres" => {
                args.expect(2, 2, &[])?;
                let t = self.expr(args.positional[0], env, ctx)?;
                let t = self.expect_tensor(t, args.positional[0].span)?;
                let g = self.expr(args.positional[1], env, ctx)?;
                let g = self.expect_groups(g, args.positional[1].span)?;
                if self.builder.module.tensors[t].rows != Domain::Samples {
                    return Err(LowerError::Type {
                        expected: "an embedding of the samples".into(),
                        found: "an embedding of groups".into(),
                        span: args.positional[0].span,
                        help: None,
                    });
                }
                Ok(Value::Tensor(self.tensor(
                    TensorOp::Centres {
                        source: t,
                        groups: g,
                    },
                    Domain::Groups(g),
                    Some(span),
                )))
            }
            "normalize" => {
                args.expect(1, 1, &[])?;
                let t = self.expr(args.positional[0], env, ctx)?;
                let t = self.expect_tensor(t, args.positional[0].span)?;
                let rows = self.builder.module.tensors[t].rows;
                Ok(Value::Tensor(self.tensor(
                    TensorOp::Normalize { source: t },
                    rows,
                    Some(span),
                )))
            }
            "branches" | "partition" => {
                args.expect(2, 2, &[])?;
                let t = self.expr(args.positional[0], env, ctx)?;
                let t = self.expect_tensor(t, args.positional[0].span)?;
                let cuts_expr = args.positional[1];
                let cuts = self.expr(cuts_expr, env, ctx)?;
                let cuts = self.expect_list(cuts, cuts_expr.span)?;
                let origin = self.origin(cuts_expr, env);
                let numbers = cuts
                    .iter()
                    .map(|c| {
                        let v = self.constant_of(c, cuts_expr.span, "a column")?;
                        self.integer(
                            v,
                            if name == "partition" { 1 } else { 0 },
                            cuts_expr.span,
                            if name == "partition" {
                                "a part size"
                            } else {
                                "a slice boundary"
                            },
                            origin,
                        )
                    })
                    .collect::<Result<Vec<usize>>>()?;
                let rows = self.builder.module.tensors[t].rows;
                if name == "branches" {
                    if numbers.len() < 2 || numbers.windows(2).any(|w| w[0] >= w[1]) {
                        return Err(LowerError::BadValue {
                            message: "slices must list at least two strictly increasing column boundaries".into(),
                            span: cuts_expr.span,
                            origin,
                        });
                    }
                    Ok(Value::List(
                        numbers
                            .windows(2)
                            .map(|w| {
                                Value::Tensor(self.tensor(
                                    TensorOp::Columns {
                                        source: t,
                                        start: w[0],
                                        end: w[1],
                                    },
                                    rows,
                                    Some(span),
                                ))
                            })
                            .collect(),
                    ))
                } else {
                    if numbers.is_empty() {
                        return Err(LowerError::BadValue {
                            message: "a partition needs at least one part".into(),
                            span: cuts_expr.span,
                            origin,
                        });
                    }
                    let site = self.next_site();
                    Ok(Value::List(
                        (0..numbers.len())
                            .map(|part| {
                                Value::Tensor(self.tensor(
                                    TensorOp::Partition {
                                        source: t,
                                        sizes: numbers.clone(),
                                        part,
                                        site,
                                    },
                                    rows,
                                    Some(span),
                                ))
                            })
                            .collect(),
                    ))
                }
            }
            "concat" => {
                args.expect(2, 2, &[])?;
                let a = self.expr(args.positional[0], env, ctx)?;
                let a = self.expect_tensor(a, args.positional[0].span)?;
                let b = self.expr(args.positional[1], env, ctx)?;
                let b = self.expect_tensor(b, args.positional[1].span)?;
                let rows = self.builder.module.tensors[a].rows;
                if self.builder.module.tensors[b].rows != rows {
                    return Err(LowerError::Mismatch {
                        message: "`concat` needs two embeddings of the same rows".into(),
                        span,
                        help: None,
                    });
                }
                Ok(Value::Tensor(self.tensor(
                    TensorOp::Concat { left: a, right: b },
                    rows,
                    Some(span),
                )))
            }
            "onehot" => {
                args.expect(1, 1, &[])?;
                let g = self.expr(args.positional[0], env, ctx)?;
                let g = self.expect_groups(g, args.positional[0].span)?;
                Ok(Value::Tensor(self.tensor(
                    TensorOp::OneHot { groups: g },
                    Domain::Samples,
                    Some(span),
                )))
            }
            "kmeans" => {
                args.expect(2, 2, &[])?;
                let t = self.expr(args.positional[0], env, ctx)?;
                let t = self.expect_tensor(t, args.positional[0].span)?;
                if self.builder.module.tensors[t].rows != Domain::Samples {
                    return Err(LowerError::Type {
                        expected: "an embedding of the samples".into(),
                        found: "an embedding of groups".into(),
                        span: args.positional[0].span,
                        help: None,
                    });
                }
                let k = self.expr(args.positional[1], env, ctx)?;
                let k = self.constant_of(&k, args.positional[1].span, "the number of clusters")?;
                let origin = self.origin(args.positional[1], env);
                let clusters = self.integer(
                    k,
                    1,
                    args.positional[1].span,
                    "the number of clusters",
                    origin,
                )?;
                let site = self.next_site();
                Ok(Value::Groups(self.grouping(
                    Grouping::KMeans {
                        features: t,
                        clusters,
                        site,
                    },
                    Some(span),
                )))
            }
            "split" => {
                args.expect(2, 2, &[])?;
                let g = self.expr(args.positional[0], env, ctx)?;
                let g = self.expect_groups(g, args.positional[0].span)?;
                let by = self.expr(args.positional[1], env, ctx)?;
                let by = self.expect_groups(by, args.positional[1].span)?;
                if by != self.labels {
                    return Err(LowerError::Unsupported {
                        message: "groups can only be split by `labels`".into(),
                        span: args.positional[1].span,
                    });
                }
                Ok(Value::Groups(self.grouping(
                    Grouping::SplitByLabel { groups: g },
                    Some(span),
                )))
            }
            "sizes" => {
                args.expect(1, 1, &[])?;
                let g = self.expr(args.positional[0], env, ctx)?;
                Ok(Value::GroupSizes(
                    self.expect_groups(g, args.positional[0].span)?,
                ))
            }
            "range" => {
                args.expect(1, 1, &[])?;
                let k = self.expr(args.positional[0], env, ctx)?;
                let k = self.constant_of(&k, args.positional[0].span, "a range's length")?;
                let origin = self.origin(args.positional[0], env);
                let k = self.integer(k, 0, args.positional[0].span, "a range's length", origin)?;
                Ok(Value::List(
                    (0..k)
                        .map(|i| Value::Expr(self.builder.constant_expr(i as f64)))
                        .collect(),
                ))
            }
            "pairs" => {
                args.expect(1, 1, &[])?;
                let list = self.expr(args.positional[0], env, ctx)?;
                let items = self.expect_list(list, args.positional[0].span)?;
                let mut pairs = Vec::new();
                for (a, first) in items.iter().enumerate() {
                    for second in &items[a + 1..] {
                        pairs.push(Value::Pair(
                            Box::new(first.clone()),
                            Box::new(second.clone()),
                        ));
                    }
                }
                Ok(Value::List(pairs))
            }
            _ => {
                let candidates = BUILTINS.iter().copied().chain(self.callable_names());
                Err(LowerError::UnknownFunction {
                    name: name.to_string(),
                    span: callee.span,
                    suggestion: suggest(name, candidates),
                })
            }
        }
    }

    /// Names of the `fn`s and losses callable from the current file.
    fn callable_names(&self) -> Vec<&str> {
        let file = &self.files[self.file];
        let own = file.ast.items.iter().map(|item| match item {
            ast::Item::Loss(l) => l.name.name.as_str(),
            ast::Item::Fn(f) => f.name.name.as_str(),
        });
        own.chain(file.ast.uses.iter().map(|u| u.name.as_str()))
            .collect()
    }

    /// A call of a `fn` or loss of the current file, or of a used loss; `None` when the
    /// name is none of those.
    fn user_call(
        &mut self,
        callee: &ast::Ident,
        call_args: &[ast::Arg],
        span: Span,
        env: &mut Env,
        ctx: Context,
    ) -> Result<Option<Value>> {
        let file_index = self.file;
        let file = &self.files[file_index];
        if let Some(function) = file.ast.functions().find(|f| f.name.name == callee.name) {
            return self
                .call_fn(file_index, function, call_args, span, env, ctx)
                .map(Some);
        }
        let target = if let Some(loss) = file.ast.losses().find(|l| l.name.name == callee.name) {
            Some((file_index, loss))
        } else if file.ast.uses.iter().any(|u| u.name == callee.name) {
            let Some(index) = self.files.iter().position(|f| f.name == callee.name) else {
                return Err(LowerError::MissingUse {
                    name: callee.name.clone(),
                    span: callee.span,
                    looked_for: format!("`{}.loss`", callee.name),
                });
            };
            let used = &self.files[index];
            if used.ast.losses().next().is_none() {
                // Point at the call, not at the start of the used file.
                return Err(LowerError::NoEntry {
                    message: format!("`{}` defines no `loss` to call", callee.name),
                    span: callee.span,
                });
            }
            Some((index, entry_loss(used)?))
        } else {
            None
        };
        let Some((index, loss)) = target else {
            return Ok(None);
        };
        if ctx.block.is_some() {
            return Err(LowerError::Placement {
                message: format!("the loss `{}` is called inside `per anchor`", callee.name),
                span,
                help: Some("a loss is a batch value: call it at batch level".into()),
            });
        }
        let args = Args::new(callee, call_args, span);
        let allowed: Vec<&str> = loss.params.iter().map(|p| p.name.name.as_str()).collect();
        args.expect(1, 1, &allowed)?;
        let x = self.expr(args.positional[0], env, ctx)?;
        let x = self.expect_tensor(x, args.positional[0].span)?;
        let mut overrides = Vec::new();
        for (name, value_expr) in &args.named {
            let value = self.expr(value_expr, env, ctx)?;
            let value = match value {
                Value::List(items) => ParamValue::List(
                    items
                        .iter()
                        .map(|item| self.constant_of(item, value_expr.span, "a parameter"))
                        .collect::<Result<_>>()?,
                ),
                other => {
                    ParamValue::Num(self.constant_of(&other, value_expr.span, "a parameter")?)
                }
            };
            overrides.push((name.name.clone(), value));
        }
        let params = self.bind_params(loss, &overrides, Some(span))?;
        let result = self.instantiate_loss(index, loss, params, x, span)?;
        Ok(Some(Value::Expr(result.loss)))
    }

    fn call_fn(
        &mut self,
        file: usize,
        function: &ast::FnDef,
        call_args: &[ast::Arg],
        span: Span,
        env: &mut Env,
        ctx: Context,
    ) -> Result<Value> {
        let args = Args::new(&function.name, call_args, span);
        args.expect(function.args.len(), function.args.len(), &[])?;
        let values = args
            .positional
            .iter()
            .map(|a| self.expr(a, env, ctx))
            .collect::<Result<Vec<_>>>()?;
        self.enter(file, &function.name.name, span)?;
        let caller_file = std::mem::replace(&mut self.file, file);
        let mut inner_env = Env::default();
        if let Some(x) = env.names.get("x") {
            inner_env.names.insert("x".into(), x.clone());
        }
        for (name, value) in function.args.iter().zip(values) {
            self.bind(&mut inner_env, name, value, None)?;
        }
        let mut outcome = BodyOutcome::default();
        let inner = Context {
            v: None,
            p: None,
            q: None,
            block: ctx.block,
            own_block: false,
        };
        self.body(
            &function.body,
            &mut inner_env,
            inner,
            BodyKind::Fn,
            &mut outcome,
        )?;
        self.file = caller_file;
        self.stack.pop();
        outcome.returned.ok_or_else(|| LowerError::Placement {
            message: format!("`fn {}` has no `return`", function.name.name),
            span: function.name.span,
            help: Some("end its body with `return value`".into()),
        })
    }
}

/// Either a lowered value or an expression handle, for checks that accept both.
enum ValueOrHandle {
    Value(Value),
    Handle(Handle<Expr>),
}

impl From<Value> for ValueOrHandle {
    fn from(v: Value) -> Self {
        ValueOrHandle::Value(v)
    }
}

impl From<Handle<Expr>> for ValueOrHandle {
    fn from(h: Handle<Expr>) -> Self {
        ValueOrHandle::Handle(h)
    }
}
