//! The canonical text of a spec: `losscc fmt`.
//!
//! Four-space indentation, one statement per line, spaces around binary operators, the
//! fewest parentheses that keep the meaning, numbers in their shortest exact form. `//`
//! comments are kept: a comment on its own line stays before the statement that follows
//! it, a comment at the end of a line stays there. A comment inside a multi-line
//! expression moves before its statement. The output is a fixed point:
//! `format(parse(format(x))) == format(x)`.

use super::ast::*;
use crate::diagnostic::Span;
use std::fmt::Write;

/// Statements longer than this are broken at their top-level `+` and `-`.
const MAX_WIDTH: usize = 92;

/// The canonical form of a parsed file; `source` is the text it was parsed from (for comments).
pub fn format_file(file: &SourceFile, source: &str) -> String {
    let mut printer = Printer {
        out: String::new(),
        comments: comments(source),
        next_comment: 0,
        source,
    };
    for used in &file.uses {
        printer.leading_comments(used.span.start, 0);
        printer.line(0, &format!("use {}", used.name));
    }
    for (index, item) in file.items.iter().enumerate() {
        if index > 0 || !file.uses.is_empty() {
            printer.out.push('\n');
        }
        match item {
            Item::Loss(loss) => printer.loss(loss),
            Item::Fn(function) => printer.function(function),
        }
    }
    printer.remaining_comments(0);
    printer.out
}

/// A `//` comment: its byte offset and its text (without the line break).
struct Comment {
    start: u32,
    text: String,
}

/// Finds the `//` comments of a source. The language has no string literals, so every `//`
/// that does not open a `///` doc comment starts a comment.
fn comments(source: &str) -> Vec<Comment> {
    let mut found = Vec::new();
    let mut offset = 0;
    for line in source.split_inclusive('\n') {
        if let Some(at) = line.find("//") {
            let text = line[at..].trim_end();
            let is_doc = text.starts_with("///") && !text.starts_with("////");
            if !is_doc {
                found.push(Comment {
                    start: (offset + at) as u32,
                    text: text.to_string(),
                });
            }
        }
        offset += line.len();
    }
    found
}

struct Printer<'s> {
    out: String,
    comments: Vec<Comment>,
    next_comment: usize,
    source: &'s str,
}

impl Printer<'_> {
    fn line(&mut self, indent: usize, text: &str) {
        for _ in 0..indent {
            self.out.push_str("    ");
        }
        self.out.push_str(text);
        self.out.push('\n');
    }

    /// Prints, each on its own line, the comments that start before `offset`.
    fn leading_comments(&mut self, offset: u32, indent: usize) {
        while let Some(comment) = self.comments.get(self.next_comment) {
            if comment.start >= offset {
                break;
            }
            let text = comment.text.clone();
            self.line(indent, &text);
            self.next_comment += 1;
        }
    }

    fn remaining_comments(&mut self, indent: usize) {
        self.leading_comments(u32::MAX, indent);
    }

    /// The comment that starts on the line where `span` ends, after it, if any.
    fn trailing_comment(&mut self, span: Span) -> Option<String> {
        let comment = self.comments.get(self.next_comment)?;
        let between = self.source.get(span.end as usize..comment.start as usize)?;
        if between.contains('\n') {
            return None;
        }
        self.next_comment += 1;
        Some(comment.text.clone())
    }

    fn docs(&mut self, docs: &[String]) {
        for doc in docs {
            if doc.is_empty() {
                self.line(0, "///");
            } else {
                self.line(0, &format!("/// {doc}"));
            }
        }
    }

    fn loss(&mut self, loss: &LossDef) {
        self.leading_comments(loss.span.start, 0);
        self.docs(&loss.docs);
        let params: Vec<String> = loss
            .params
            .iter()
            .map(|p| format!("{} = {}", p.name.name, expr(&p.default)))
            .collect();
        self.line(
            0,
            &format!("loss {}({}) {{", loss.name.name, params.join(", ")),
        );
        self.block_body(&loss.body, 1);
        self.line(0, "}");
    }

    fn function(&mut self, function: &FnDef) {
        self.leading_comments(function.span.start, 0);
        self.docs(&function.docs);
        let args: Vec<&str> = function.args.iter().map(|a| a.name.as_str()).collect();
        self.line(
            0,
            &format!("fn {}({}) {{", function.name.name, args.join(", ")),
        );
        self.block_body(&function.body, 1);
        self.line(0, "}");
    }

    fn block_body(&mut self, block: &Block, indent: usize) {
        for stmt in &block.stmts {
            self.stmt(stmt, indent);
        }
        self.leading_comments(block.span.end, indent);
    }

    fn stmt(&mut self, stmt: &Stmt, indent: usize) {
        self.leading_comments(stmt.span.start, indent);
        let (head, value) = match &stmt.kind {
            StmtKind::Let { name, value } => (format!("{} = ", name.name), value),
            StmtKind::Stat { name, value } => (format!("stat {} = ", name.name), value),
            StmtKind::Input { name, default } => (format!("input {} = ", name.name), default),
            StmtKind::Skip { cond } => ("skip if ".to_string(), cond),
            StmtKind::Return { value } => ("return ".to_string(), value),
            StmtKind::Loss { value } => ("loss = ".to_string(), value),
            StmtKind::PerAnchor { body } => {
                self.line(indent, "per anchor {");
                self.block_body(body, indent + 1);
                self.line(indent, "}");
                return;
            }
        };
        // Comments inside a multi-line statement move before it.
        let inside_end = stmt.span.end;
        let mut moved = Vec::new();
        while let Some(comment) = self.comments.get(self.next_comment) {
            if comment.start >= inside_end {
                break;
            }
            moved.push(comment.text.clone());
            self.next_comment += 1;
        }
        for comment in moved {
            self.line(indent, &comment);
        }
        let mut lines = statement_lines(&head, value, indent);
        if let Some(comment) = self.trailing_comment(stmt.span)
            && let Some(last) = lines.last_mut()
        {
            last.push_str("  ");
            last.push_str(&comment);
        }
        for (index, text) in lines.iter().enumerate() {
            self.line(if index == 0 { indent } else { indent + 1 }, text);
        }
    }
}

/// A statement on one line, or broken before its top-level `+`/`-` when too long.
fn statement_lines(head: &str, value: &Expr, indent: usize) -> Vec<String> {
    let flat = format!("{head}{}", expr(value));
    if flat.len() + 4 * indent <= MAX_WIDTH {
        return vec![flat];
    }
    if let ExprKind::If { .. } = value.kind {
        return conditional_lines(head, value);
    }
    let mut terms = Vec::new();
    split_additive(value, None, &mut terms);
    if terms.len() < 2 {
        return vec![flat];
    }
    let mut lines = Vec::new();
    for (op, term) in terms {
        let text = expr_at(term, Prec::Product);
        match op {
            None => lines.push(format!("{head}{text}")),
            Some(op) => lines.push(format!("{} {text}", op.symbol())),
        }
    }
    lines
}

/// `if a then b else if c then d else e`, one branch a line.
fn conditional_lines(head: &str, mut value: &Expr) -> Vec<String> {
    let mut lines = Vec::new();
    let mut prefix = head.to_string();
    while let ExprKind::If {
        cond,
        then,
        otherwise,
    } = &value.kind
    {
        lines.push(format!(
            "{prefix}if {} then {}",
            expr(cond),
            expr_at(then, Prec::Where)
        ));
        prefix = "else ".to_string();
        value = otherwise;
    }
    lines.push(format!("{prefix}{}", expr(value)));
    lines
}

fn split_additive<'e>(
    e: &'e Expr,
    op: Option<BinaryOp>,
    out: &mut Vec<(Option<BinaryOp>, &'e Expr)>,
) {
    match &e.kind {
        ExprKind::Binary {
            op: inner @ (BinaryOp::Add | BinaryOp::Sub),
            lhs,
            rhs,
        } => {
            split_additive(lhs, op, out);
            out.push((Some(*inner), rhs));
        }
        _ => out.push((op, e)),
    }
}

/// Binding strength, loosest first; a subexpression is parenthesised when it binds looser
/// than its position requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Prec {
    Top,
    Fallback,
    Where,
    Or,
    And,
    Not,
    Compare,
    Union,
    Sum,
    Product,
    Unary,
    Postfix,
}

fn prec(e: &Expr) -> Prec {
    match &e.kind {
        ExprKind::If { .. } | ExprKind::For { .. } => Prec::Top,
        ExprKind::Fallback { .. } => Prec::Fallback,
        ExprKind::Where { .. } => Prec::Where,
        ExprKind::Unary {
            op: UnaryOp::Not, ..
        } => Prec::Not,
        ExprKind::Unary {
            op: UnaryOp::Neg, ..
        } => Prec::Unary,
        ExprKind::Binary { op, .. } => binary_prec(*op),
        ExprKind::Number(v) if *v < 0.0 => Prec::Unary,
        _ => Prec::Postfix,
    }
}

fn binary_prec(op: BinaryOp) -> Prec {
    match op {
        BinaryOp::Or => Prec::Or,
        BinaryOp::And => Prec::And,
        BinaryOp::Union => Prec::Union,
        BinaryOp::Add | BinaryOp::Sub => Prec::Sum,
        BinaryOp::Mul | BinaryOp::Div => Prec::Product,
        // `a ^ b` binds tighter than unary minus on its left.
        BinaryOp::Pow => Prec::Unary,
        _ => Prec::Compare,
    }
}

/// `e` printed where an expression of at least `min` strength is required.
fn expr_at(e: &Expr, min: Prec) -> String {
    let text = expr(e);
    if prec(e) < min {
        format!("({text})")
    } else {
        text
    }
}

/// The canonical text of an expression.
pub fn expr(e: &Expr) -> String {
    match &e.kind {
        ExprKind::Number(value) => format_number(*value),
        ExprKind::Name(name) => name.clone(),
        ExprKind::List(items) => {
            let items: Vec<String> = items.iter().map(expr).collect();
            format!("[{}]", items.join(", "))
        }
        ExprKind::Call { callee, args } => {
            let mut text = format!("{}(", callee.name);
            for (index, arg) in args.iter().enumerate() {
                if index > 0 {
                    text.push_str(", ");
                }
                if let Some(name) = &arg.name {
                    let _ = write!(text, "{} = ", name.name);
                }
                text.push_str(&expr(&arg.value));
            }
            text.push(')');
            text
        }
        ExprKind::Index { base, index } => {
            format!("{}[{}]", expr_at(base, Prec::Postfix), expr(index))
        }
        ExprKind::Unary {
            op: UnaryOp::Neg,
            operand,
        } => format!("-{}", expr_at(operand, Prec::Unary)),
        ExprKind::Unary {
            op: UnaryOp::Not,
            operand,
        } => format!("!{}", expr_at(operand, Prec::Not)),
        ExprKind::Binary {
            op: BinaryOp::Pow,
            lhs,
            rhs,
        } => {
            format!(
                "{} ^ {}",
                expr_at(lhs, Prec::Postfix),
                expr_at(rhs, Prec::Unary)
            )
        }
        ExprKind::Binary { op, lhs, rhs } => {
            let own = binary_prec(*op);
            let (left_min, right_min) = if own == Prec::Compare {
                (Prec::Union, Prec::Union)
            } else {
                (own, next_prec(own))
            };
            format!(
                "{} {} {}",
                expr_at(lhs, left_min),
                op.symbol(),
                expr_at(rhs, right_min)
            )
        }
        ExprKind::Where { set, predicate } => {
            format!(
                "{} where {}",
                expr_at(set, Prec::Where),
                expr_at(predicate, Prec::Or)
            )
        }
        ExprKind::Fallback { primary, fallback } => {
            format!(
                "{} else {}",
                expr_at(primary, Prec::Fallback),
                expr_at(fallback, Prec::Where)
            )
        }
        ExprKind::If {
            cond,
            then,
            otherwise,
        } => format!(
            "if {} then {} else {}",
            expr(cond),
            expr_at(then, Prec::Where),
            expr(otherwise)
        ),
        ExprKind::For {
            binding,
            iterable,
            body,
        } => {
            let binding = match binding {
                Binding::One(name) => name.name.clone(),
                Binding::Pair(a, b) => format!("({}, {})", a.name, b.name),
            };
            format!(
                "for {binding} in {}: {}",
                expr_at(iterable, Prec::Fallback),
                expr(body)
            )
        }
    }
}

fn next_prec(p: Prec) -> Prec {
    match p {
        Prec::Top => Prec::Fallback,
        Prec::Fallback => Prec::Where,
        Prec::Where => Prec::Or,
        Prec::Or => Prec::And,
        Prec::And => Prec::Not,
        Prec::Not => Prec::Compare,
        Prec::Compare => Prec::Union,
        Prec::Union => Prec::Sum,
        Prec::Sum => Prec::Product,
        Prec::Product => Prec::Unary,
        Prec::Unary | Prec::Postfix => Prec::Postfix,
    }
}

/// The shortest text that reads back as the same number.
pub fn format_number(value: f64) -> String {
    if value == value.trunc() && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value:?}")
    }
}
