//! The abstract syntax tree of a spec file, with a span on every node.
//!
//! The tree mirrors the source: names are not resolved, parameters are not folded and
//! `for` comprehensions are not expanded. `ir::lower` does all of that.

use crate::diagnostic::Span;

/// One parsed `.loss` file.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceFile {
    pub uses: Vec<Ident>,
    pub items: Vec<Item>,
}

impl SourceFile {
    /// The loss definitions of the file, in source order.
    pub fn losses(&self) -> impl Iterator<Item = &LossDef> {
        self.items.iter().filter_map(|item| match item {
            Item::Loss(loss) => Some(loss),
            Item::Fn(_) => None,
        })
    }

    /// The `fn` helpers of the file, in source order.
    pub fn functions(&self) -> impl Iterator<Item = &FnDef> {
        self.items.iter().filter_map(|item| match item {
            Item::Fn(f) => Some(f),
            Item::Loss(_) => None,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Loss(LossDef),
    Fn(FnDef),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

/// `/// docs` `loss name(param = default, ...) { ... }`
#[derive(Debug, Clone, PartialEq)]
pub struct LossDef {
    pub docs: Vec<String>,
    pub name: Ident,
    pub params: Vec<Param>,
    pub body: Block,
    pub span: Span,
}

impl LossDef {
    /// The first line of the doc comment: what `losscc list` shows.
    pub fn summary(&self) -> &str {
        self.docs.first().map(String::as_str).unwrap_or("")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub name: Ident,
    pub default: Expr,
}

/// `/// docs` `fn name(arg, ...) { ... return expr }`
#[derive(Debug, Clone, PartialEq)]
pub struct FnDef {
    pub docs: Vec<String>,
    pub name: Ident,
    pub args: Vec<Ident>,
    pub body: Block,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    pub stmts: Vec<Stmt>,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Stmt {
    pub kind: StmtKind,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StmtKind {
    /// `name = value`
    Let { name: Ident, value: Expr },
    /// `loss = value`: the loss of the `loss` item.
    Loss { value: Expr },
    /// `stat name = value`: an extra named output.
    Stat { name: Ident, value: Expr },
    /// `input name = default`: a value the caller may supply instead of the default.
    Input { name: Ident, default: Expr },
    /// `skip if cond`: the anchor adds nothing when `cond` holds.
    Skip { cond: Expr },
    /// `return value`, the result of a `fn`.
    Return { value: Expr },
    /// `per anchor { ... }`: statements evaluated once per anchor row.
    PerAnchor { body: Block },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ExprKind {
    Number(f64),
    Name(String),
    List(Vec<Expr>),
    Call {
        callee: Ident,
        args: Vec<Arg>,
    },
    Index {
        base: Box<Expr>,
        index: Box<Expr>,
    },
    Unary {
        op: UnaryOp,
        operand: Box<Expr>,
    },
    Binary {
        op: BinaryOp,
        lhs: Box<Expr>,
        rhs: Box<Expr>,
    },
    /// `set where predicate`
    Where {
        set: Box<Expr>,
        predicate: Box<Expr>,
    },
    /// `primary else fallback`: `primary` unless it is empty.
    Fallback {
        primary: Box<Expr>,
        fallback: Box<Expr>,
    },
    If {
        cond: Box<Expr>,
        then: Box<Expr>,
        otherwise: Box<Expr>,
    },
    /// `for binding in iterable: body`, a list built at compile time.
    For {
        binding: Binding,
        iterable: Box<Expr>,
        body: Box<Expr>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Arg {
    pub name: Option<Ident>,
    pub value: Expr,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Binding {
    One(Ident),
    Pair(Ident, Ident),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnaryOp {
    Neg,
    Not,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Or,
    And,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    Union,
    Add,
    Sub,
    Mul,
    Div,
    Pow,
}

impl BinaryOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinaryOp::Or => "or",
            BinaryOp::And => "and",
            BinaryOp::Lt => "<",
            BinaryOp::Le => "<=",
            BinaryOp::Gt => ">",
            BinaryOp::Ge => ">=",
            BinaryOp::Eq => "==",
            BinaryOp::Ne => "!=",
            BinaryOp::Union => "|",
            BinaryOp::Add => "+",
            BinaryOp::Sub => "-",
            BinaryOp::Mul => "*",
            BinaryOp::Div => "/",
            BinaryOp::Pow => "^",
        }
    }

    pub fn is_comparison(self) -> bool {
        matches!(
            self,
            BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge | BinaryOp::Eq | BinaryOp::Ne
        )
    }
}
