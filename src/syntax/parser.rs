//! pest pairs -> AST.

use super::ParseError;
use super::ast::*;
use crate::diagnostic::{FileId, Span};
use pest::Parser;
use pest::iterators::Pair;
use std::cell::Cell;
use std::sync::Mutex;

#[derive(pest_derive::Parser)]
#[grammar = "../grammar/loss.pest"]
struct Grammar;

/// Parses one spec file.
pub fn parse(source: &str, file: FileId) -> Result<SourceFile, ParseError> {
    let mut pairs = Grammar::parse(Rule::file, source).map_err(|first| {
        let error = detailed_error(source).unwrap_or(first);
        syntax_error(error, source, file)
    })?;
    let root = pairs.next().ok_or_else(|| ParseError::Syntax {
        message: "empty parse".into(),
        span: Span::new(file, 0..0),
    })?;
    Builder {
        file,
        depth: Cell::new(0),
    }
    .file(root)
}

/// The parse error of `source` again, this time with the literal tokens tried at the
/// failure point (`)`, `}`, `,`...), so that a syntax error can name them. Collecting them
/// slows every parse down, so it is switched on (a process-wide pest flag) only for this
/// second parse of a failing source, one at a time.
fn detailed_error(source: &str) -> Option<pest::error::Error<Rule>> {
    static DETAIL: Mutex<()> = Mutex::new(());
    let _one_at_a_time = DETAIL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    pest::set_error_detail(true);
    let result = Grammar::parse(Rule::file, source);
    pest::set_error_detail(false);
    result.err()
}

fn syntax_error(error: pest::error::Error<Rule>, source: &str, file: FileId) -> ParseError {
    let mut range = match error.location {
        pest::error::InputLocation::Pos(p) => p..p,
        pest::error::InputLocation::Span((a, b)) => a..b,
    };
    let message = match &error.variant {
        pest::error::ErrorVariant::ParsingError { positives, .. } => {
            let mut expected: Vec<&str> = positives.iter().filter_map(|r| describe(*r)).collect();
            if positives.contains(&Rule::kw_per) {
                // Only a statement can start with `per`: name the alternatives as one.
                expected.retain(|e| !STATEMENT_STARTS.contains(e));
                expected.push("a statement");
            }
            if let Some(attempts) = error
                .parse_attempts()
                .filter(|a| a.max_position == range.start)
            {
                expected.extend(
                    attempts
                        .expected_tokens()
                        .iter()
                        .filter_map(|token| punctuation(&token.to_string())),
                );
            }
            expected.sort_unstable();
            expected.dedup();
            let (found, length) = found(source, range.start);
            if range.is_empty() {
                // Underline the whole unexpected word or symbol.
                range.end = range.start + length;
            }
            match expected.as_slice() {
                [] => format!("unexpected {found}"),
                [one] => format!("expected {one}, found {found}"),
                many => {
                    let (last, rest) = many.split_last().unwrap_or((&"", &[]));
                    format!("expected {} or {last}, found {found}", rest.join(", "))
                }
            }
        }
        pest::error::ErrorVariant::CustomError { message } => message.clone(),
    };
    ParseError::Syntax {
        message,
        span: Span::new(file, range),
    }
}

/// The descriptions of the rules that can start a statement.
const STATEMENT_STARTS: &[&str] = &[
    "`loss`",
    "`per anchor`",
    "`skip if`",
    "`stat`",
    "`input`",
    "`return`",
    "a doc comment",
    "a name",
];

/// How a literal token of the grammar is named in an error message, for the tokens no rule
/// names (brackets and separators).
fn punctuation(token: &str) -> Option<&'static str> {
    Some(match token {
        "(" => "`(`",
        ")" => "`)`",
        "[" => "`[`",
        "]" => "`]`",
        "{" => "`{`",
        "}" => "`}`",
        "," => "`,`",
        ":" => "`:`",
        "=" => "`=`",
        "^" => "an operator",
        _ => return None,
    })
}

/// What the source has at `at`, for "found ...": a word, a keyword, a symbol or the end.
/// Also the length in bytes of what is found there (0 at the end of the file or a line).
fn found(source: &str, at: usize) -> (String, usize) {
    let Some(rest) = source.get(at..).filter(|r| !r.is_empty()) else {
        return ("end of file".into(), 0);
    };
    let word: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    if word.is_empty() {
        let symbol = rest.chars().next().unwrap_or(' ');
        return match symbol {
            '\n' | '\r' => ("end of line".into(), 0),
            _ => (format!("`{symbol}`"), symbol.len_utf8()),
        };
    }
    const KEYWORDS: &[&str] = &[
        "loss", "fn", "use", "per", "anchor", "skip", "if", "then", "else", "where", "and", "or",
        "for", "in", "stat", "input", "return",
    ];
    let text = if KEYWORDS.contains(&word.as_str()) {
        format!("the keyword `{word}`")
    } else {
        format!("`{word}`")
    };
    (text, word.len())
}

/// What a grammar rule is called in an error message; `None` for rules too internal to name.
fn describe(rule: Rule) -> Option<&'static str> {
    Some(match rule {
        Rule::EOI => "end of file",
        Rule::use_item | Rule::kw_use => "`use`",
        Rule::loss_item | Rule::kw_loss => "`loss`",
        Rule::fn_item | Rule::kw_fn => "`fn`",
        Rule::doc => "a doc comment",
        Rule::param | Rule::param_list => "a parameter",
        Rule::block => "`{`",
        Rule::per_anchor | Rule::kw_per => "`per anchor`",
        Rule::kw_anchor => "`anchor`",
        Rule::skip_stmt | Rule::kw_skip => "`skip if`",
        Rule::stat_stmt | Rule::kw_stat => "`stat`",
        Rule::input_stmt | Rule::kw_input => "`input`",
        Rule::return_stmt | Rule::kw_return => "`return`",
        Rule::let_stmt => "a statement",
        Rule::kw_if => "`if`",
        Rule::kw_then => "`then`",
        Rule::kw_else => "`else`",
        Rule::kw_where => "`where`",
        Rule::kw_and | Rule::kw_or => "`and`/`or`",
        Rule::kw_in => "`in`",
        Rule::cmp_op => "a comparison",
        Rule::add_op | Rule::mul_op | Rule::union_op => "an operator",
        Rule::ident => "a name",
        Rule::number => "a number",
        Rule::expr
        | Rule::if_expr
        | Rule::for_expr
        | Rule::fallback
        | Rule::filtered
        | Rule::disjunction
        | Rule::conjunction
        | Rule::negation
        | Rule::comparison
        | Rule::union
        | Rule::sum
        | Rule::product
        | Rule::unary
        | Rule::power
        | Rule::postfix
        | Rule::primary
        | Rule::paren
        | Rule::list
        | Rule::call
        | Rule::not_op
        | Rule::neg_op => "an expression",
        Rule::index => "`[`",
        Rule::arg | Rule::named_arg => "an argument",
        Rule::binding => "a name or `(a, b)`",
        _ => return None,
    })
}

struct Builder {
    file: FileId,
    /// How many expression rules enclose the one being built.
    depth: Cell<usize>,
}

/// How deeply expression rules may nest (a parenthesis or a call adds about 13 levels):
/// the builder, the lowering and the printer recurse over the tree, and a deeper input
/// would exhaust the stack before it could be rejected.
const MAX_NESTING: usize = 512;

/// The length of `text` without the whitespace and `//` comments that end it: pest lets a
/// rule that ends in a repetition swallow the implicit whitespace after its last token.
fn trimmed_len(text: &str) -> usize {
    let mut text = text.trim_end();
    loop {
        let line_start = text.rfind('\n').map_or(0, |at| at + 1);
        match text[line_start..].find("//") {
            Some(at) => text = text[..line_start + at].trim_end(),
            None => return text.len(),
        }
    }
}

impl Builder {
    fn span(&self, pair: &Pair<Rule>) -> Span {
        let s = pair.as_span();
        let end = s.start() + trimmed_len(s.as_str());
        Span::new(self.file, s.start()..end)
    }

    fn file(&self, root: Pair<Rule>) -> Result<SourceFile, ParseError> {
        let mut file = SourceFile {
            uses: Vec::new(),
            items: Vec::new(),
        };
        for pair in root.into_inner() {
            match pair.as_rule() {
                Rule::use_item => file.uses.push(self.ident(last(pair)?)),
                Rule::loss_item => file.items.push(Item::Loss(self.loss(pair)?)),
                Rule::fn_item => file.items.push(Item::Fn(self.function(pair)?)),
                _ => {}
            }
        }
        Ok(file)
    }

    fn ident(&self, pair: Pair<Rule>) -> Ident {
        Ident {
            name: pair.as_str().to_string(),
            span: self.span(&pair),
        }
    }

    fn doc_text(pair: &Pair<Rule>) -> String {
        let text = pair.as_str().trim_start_matches("///");
        text.strip_prefix(' ')
            .unwrap_or(text)
            .trim_end()
            .to_string()
    }

    fn loss(&self, pair: Pair<Rule>) -> Result<LossDef, ParseError> {
        let span = self.span(&pair);
        let mut docs = Vec::new();
        let mut name = None;
        let mut params = Vec::new();
        let mut body = None;
        for inner in pair.into_inner() {
            match inner.as_rule() {
                Rule::doc => docs.push(Self::doc_text(&inner)),
                Rule::ident => name = Some(self.ident(inner)),
                Rule::param_list => {
                    for param in inner.into_inner() {
                        let mut parts = param.into_inner();
                        let name = self.ident(next(&mut parts)?);
                        let default = self.expr(next(&mut parts)?)?;
                        params.push(Param { name, default });
                    }
                }
                Rule::block => body = Some(self.block(inner)?),
                _ => {}
            }
        }
        Ok(LossDef {
            docs,
            name: required(name)?,
            params,
            body: required(body)?,
            span,
        })
    }

    fn function(&self, pair: Pair<Rule>) -> Result<FnDef, ParseError> {
        let span = self.span(&pair);
        let mut docs = Vec::new();
        let mut name = None;
        let mut args = Vec::new();
        let mut body = None;
        for inner in pair.into_inner() {
            match inner.as_rule() {
                Rule::doc => docs.push(Self::doc_text(&inner)),
                Rule::ident => name = Some(self.ident(inner)),
                Rule::ident_list => args.extend(inner.into_inner().map(|a| self.ident(a))),
                Rule::block => body = Some(self.block(inner)?),
                _ => {}
            }
        }
        Ok(FnDef {
            docs,
            name: required(name)?,
            args,
            body: required(body)?,
            span,
        })
    }

    fn block(&self, pair: Pair<Rule>) -> Result<Block, ParseError> {
        let span = self.span(&pair);
        let stmts = pair
            .into_inner()
            .map(|s| self.stmt(s))
            .collect::<Result<_, _>>()?;
        Ok(Block { stmts, span })
    }

    fn stmt(&self, pair: Pair<Rule>) -> Result<Stmt, ParseError> {
        let span = self.span(&pair);
        let rule = pair.as_rule();
        let mut parts = pair.into_inner().filter(|p| !is_keyword(p.as_rule()));
        let kind = match rule {
            Rule::per_anchor => StmtKind::PerAnchor {
                body: self.block(next(&mut parts)?)?,
            },
            Rule::skip_stmt => StmtKind::Skip {
                cond: self.expr(next(&mut parts)?)?,
            },
            Rule::return_stmt => StmtKind::Return {
                value: self.expr(next(&mut parts)?)?,
            },
            Rule::loss_stmt => StmtKind::Loss {
                value: self.expr(next(&mut parts)?)?,
            },
            Rule::stat_stmt | Rule::input_stmt | Rule::let_stmt => {
                let name = self.ident(next(&mut parts)?);
                let value = self.expr(next(&mut parts)?)?;
                match rule {
                    Rule::stat_stmt => StmtKind::Stat { name, value },
                    Rule::input_stmt => StmtKind::Input {
                        name,
                        default: value,
                    },
                    _ => StmtKind::Let { name, value },
                }
            }
            Rule::stray_doc => return Err(ParseError::StrayDoc { span }),
            other => return Err(internal(other, span)),
        };
        Ok(Stmt { kind, span })
    }

    /// A chain `a op b op c ...` becomes a tree as deep as it is long: it counts against
    /// the nesting limit.
    fn check_chain(&self, pair: &Pair<Rule>) -> Result<(), ParseError> {
        let operands = pair.clone().into_inner().count().div_ceil(2);
        if self.depth.get() + operands >= MAX_NESTING {
            return Err(ParseError::Syntax {
                message: "expression too long".into(),
                span: self.span(pair),
            });
        }
        Ok(())
    }

    fn expr(&self, pair: Pair<Rule>) -> Result<Expr, ParseError> {
        let depth = self.depth.get();
        if depth >= MAX_NESTING {
            return Err(ParseError::Syntax {
                message: "expression nested too deeply".into(),
                span: self.span(&pair),
            });
        }
        self.depth.set(depth + 1);
        let result = self.nested_expr(pair);
        self.depth.set(depth);
        result
    }

    fn nested_expr(&self, pair: Pair<Rule>) -> Result<Expr, ParseError> {
        let span = self.span(&pair);
        let rule = pair.as_rule();
        let kind = match rule {
            Rule::number => {
                let value: f64 = pair.as_str().parse().map_err(|_| ParseError::Syntax {
                    message: format!("`{}` is not a number", pair.as_str()),
                    span,
                })?;
                if !value.is_finite() {
                    return Err(ParseError::NumberOverflow { span });
                }
                ExprKind::Number(value)
            }
            Rule::ident => ExprKind::Name(pair.as_str().to_string()),
            Rule::paren => return self.expr(last(pair)?),
            Rule::list => ExprKind::List(
                pair.into_inner()
                    .map(|p| self.expr(p))
                    .collect::<Result<_, _>>()?,
            ),
            Rule::call => {
                let mut parts = pair.into_inner();
                let callee = self.ident(next(&mut parts)?);
                let args = parts.map(|a| self.arg(a)).collect::<Result<_, _>>()?;
                ExprKind::Call { callee, args }
            }
            Rule::if_expr => {
                let mut parts = pair.into_inner().filter(|p| !is_keyword(p.as_rule()));
                let cond = Box::new(self.expr(next(&mut parts)?)?);
                let then = Box::new(self.expr(next(&mut parts)?)?);
                let otherwise = Box::new(self.expr(next(&mut parts)?)?);
                ExprKind::If {
                    cond,
                    then,
                    otherwise,
                }
            }
            Rule::for_expr => {
                let mut parts = pair.into_inner().filter(|p| !is_keyword(p.as_rule()));
                let binding_pair = next(&mut parts)?;
                let mut names = binding_pair.into_inner().map(|p| self.ident(p));
                let first = names.next().ok_or_else(|| internal(Rule::binding, span))?;
                let binding = match names.next() {
                    Some(second) => Binding::Pair(first, second),
                    None => Binding::One(first),
                };
                let iterable = Box::new(self.expr(next(&mut parts)?)?);
                let body = Box::new(self.expr(next(&mut parts)?)?);
                ExprKind::For {
                    binding,
                    iterable,
                    body,
                }
            }
            Rule::fallback => {
                return self.left_fold(pair, |lhs, rhs| ExprKind::Fallback {
                    primary: Box::new(lhs),
                    fallback: Box::new(rhs),
                });
            }
            Rule::filtered => {
                return self.left_fold(pair, |lhs, rhs| ExprKind::Where {
                    set: Box::new(lhs),
                    predicate: Box::new(rhs),
                });
            }
            Rule::disjunction
            | Rule::conjunction
            | Rule::comparison
            | Rule::union
            | Rule::sum
            | Rule::product => return self.binary_chain(pair),
            Rule::negation | Rule::unary => {
                let mut parts = pair.into_inner();
                let first = next(&mut parts)?;
                match first.as_rule() {
                    Rule::not_op | Rule::neg_op => {
                        let op = if first.as_rule() == Rule::not_op {
                            UnaryOp::Not
                        } else {
                            UnaryOp::Neg
                        };
                        let operand = Box::new(self.expr(next(&mut parts)?)?);
                        ExprKind::Unary { op, operand }
                    }
                    _ => return self.expr(first),
                }
            }
            Rule::power => {
                let mut parts = pair.into_inner();
                let base = self.expr(next(&mut parts)?)?;
                match parts.next() {
                    Some(exponent) => ExprKind::Binary {
                        op: BinaryOp::Pow,
                        lhs: Box::new(base),
                        rhs: Box::new(self.expr(exponent)?),
                    },
                    None => return Ok(base),
                }
            }
            Rule::postfix => {
                let mut parts = pair.into_inner();
                let mut base = self.expr(next(&mut parts)?)?;
                for index in parts {
                    let index_span = self.span(&index);
                    let index = self.expr(last(index)?)?;
                    base = Expr {
                        span: base.span.to(index_span),
                        kind: ExprKind::Index {
                            base: Box::new(base),
                            index: Box::new(index),
                        },
                    };
                }
                return Ok(base);
            }
            other => return Err(internal(other, span)),
        };
        Ok(Expr { kind, span })
    }

    fn arg(&self, pair: Pair<Rule>) -> Result<Arg, ParseError> {
        let inner = last(pair)?;
        if inner.as_rule() == Rule::named_arg {
            let mut parts = inner.into_inner();
            let name = Some(self.ident(next(&mut parts)?));
            Ok(Arg {
                name,
                value: self.expr(next(&mut parts)?)?,
            })
        } else {
            Ok(Arg {
                name: None,
                value: self.expr(inner)?,
            })
        }
    }

    /// `a KW b KW c` -> `(a KW b) KW c`, for rules whose separators are keywords.
    fn left_fold(
        &self,
        pair: Pair<Rule>,
        combine: impl Fn(Expr, Expr) -> ExprKind,
    ) -> Result<Expr, ParseError> {
        self.check_chain(&pair)?;
        let mut operands = pair.into_inner().filter(|p| !is_keyword(p.as_rule()));
        let mut acc = self.expr(next(&mut operands)?)?;
        for operand in operands {
            let rhs = self.expr(operand)?;
            let span = acc.span.to(rhs.span);
            acc = Expr {
                kind: combine(acc, rhs),
                span,
            };
        }
        Ok(acc)
    }

    /// `a op b op c` -> `(a op b) op c`.
    fn binary_chain(&self, pair: Pair<Rule>) -> Result<Expr, ParseError> {
        self.check_chain(&pair)?;
        let mut parts = pair.into_inner();
        let mut acc = self.expr(next(&mut parts)?)?;
        while let Some(op_pair) = parts.next() {
            let op = match op_pair.as_rule() {
                Rule::kw_or => BinaryOp::Or,
                Rule::kw_and => BinaryOp::And,
                Rule::union_op => BinaryOp::Union,
                Rule::cmp_op | Rule::add_op | Rule::mul_op => match op_pair.as_str() {
                    "<" => BinaryOp::Lt,
                    "<=" => BinaryOp::Le,
                    ">" => BinaryOp::Gt,
                    ">=" => BinaryOp::Ge,
                    "==" => BinaryOp::Eq,
                    "!=" => BinaryOp::Ne,
                    "+" => BinaryOp::Add,
                    "-" => BinaryOp::Sub,
                    "*" => BinaryOp::Mul,
                    _ => BinaryOp::Div,
                },
                other => return Err(internal(other, self.span(&op_pair))),
            };
            let rhs = self.expr(next(&mut parts)?)?;
            let span = acc.span.to(rhs.span);
            acc = Expr {
                kind: ExprKind::Binary {
                    op,
                    lhs: Box::new(acc),
                    rhs: Box::new(rhs),
                },
                span,
            };
        }
        Ok(acc)
    }
}

fn is_keyword(rule: Rule) -> bool {
    matches!(
        rule,
        Rule::kw_loss
            | Rule::kw_fn
            | Rule::kw_use
            | Rule::kw_per
            | Rule::kw_anchor
            | Rule::kw_skip
            | Rule::kw_if
            | Rule::kw_then
            | Rule::kw_else
            | Rule::kw_where
            | Rule::kw_for
            | Rule::kw_in
            | Rule::kw_stat
            | Rule::kw_input
            | Rule::kw_return
    )
}

fn next<'a>(
    parts: &mut impl Iterator<Item = Pair<'a, Rule>>,
) -> Result<Pair<'a, Rule>, ParseError> {
    parts.next().ok_or(ParseError::Internal {
        what: "missing child in the parse tree".into(),
    })
}

fn last(pair: Pair<Rule>) -> Result<Pair<Rule>, ParseError> {
    pair.into_inner()
        .filter(|p| !is_keyword(p.as_rule()))
        .last()
        .ok_or(ParseError::Internal {
            what: "missing child in the parse tree".into(),
        })
}

fn required<T>(value: Option<T>) -> Result<T, ParseError> {
    value.ok_or(ParseError::Internal {
        what: "missing part of an item".into(),
    })
}

fn internal(rule: Rule, span: Span) -> ParseError {
    ParseError::Internal {
        what: format!("unexpected {rule:?} at {}..{}", span.start, span.end),
    }
}
