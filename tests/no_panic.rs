//! The front end never panics, whatever the input, and `fmt` is a fixed point.
//!
//! Inputs: seeded random byte strings, random text from the language's alphabet, random
//! token soup and random UTF-8; and mutations of every shipped spec (truncations, deleted
//! and duplicated spans, swapped tokens, numbers replaced by awkward values, identifiers
//! replaced by other identifiers of the file). Each goes through `load_source` (with a
//! resolver that serves the shipped specs, so `use` resolves), `ir::lower` and
//! `ir::validate` inside `catch_unwind`; a panic is reported with the input that caused it.
//!
//! Also, for every shipped spec and every mutation that parses,
//! `fmt(parse(fmt(x))) == fmt(x)`, and when `x` lowers, `fmt(x)` lowers to the same IR.

use losscc::diagnostic::{FileId, Sources};
use losscc::ir::{self, BUILTINS, Params};
use losscc::syntax::{self, format_file};
use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

// ---- a small deterministic generator ---------------------------------------------------------

/// SplitMix64: enough randomness for fuzzing, and the same sequence on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

// ---- the shipped specs -----------------------------------------------------------------------

/// Every `losses/*.loss`, by name (file stem), in name order.
fn shipped() -> BTreeMap<String, String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("losses");
    let mut specs = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).expect("losses/") {
        let path = entry.expect("a directory entry").path();
        if path.extension().is_some_and(|e| e == "loss") {
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&path).expect("a readable spec");
            specs.insert(name, text);
        }
    }
    assert!(specs.len() >= 10, "the shipped specs are missing");
    specs
}

// ---- one input through the front end ---------------------------------------------------------

/// What happened to one input, when it did not panic.
struct Outcome {
    /// The canonical text, when the input parses.
    formatted: Option<String>,
    /// The printed IR, when it lowers and validates.
    ir: Option<String>,
}

/// Parses, loads (resolving `use` against the shipped specs), lowers and validates `source`.
/// `Err` describes an internal failure: a validation error after a successful lowering.
fn front_end(
    name: &str,
    source: &str,
    specs: &BTreeMap<String, String>,
) -> Result<Outcome, String> {
    let formatted = syntax::parse(source, FileId(0))
        .ok()
        .map(|ast| format_file(&ast, source));
    let mut sources = Sources::new();
    let resolve = |used: &str| {
        specs
            .get(used)
            .map(|text| (format!("losses/{used}.loss"), text.clone()))
    };
    let Ok(program) = syntax::load_source(
        &format!("{name}.loss"),
        name,
        source.to_string(),
        &mut sources,
        resolve,
    ) else {
        return Ok(Outcome {
            formatted,
            ir: None,
        });
    };
    let ir = match ir::lower(&program, &Params::new()) {
        Ok(module) => {
            ir::validate(&module).map_err(|e| format!("lowered to invalid IR: {e}"))?;
            Some(ir::print_module(&module))
        }
        Err(error) => {
            // Rendering must not panic either.
            let _ = sources.render(&error.to_diagnostic());
            None
        }
    };
    Ok(Outcome { formatted, ir })
}

/// Runs the front end on every input, catching panics; fails listing the inputs that
/// panicked, failed validation, or broke the formatter's contract.
fn check_inputs(what: &str, inputs: &[(String, String)], specs: &BTreeMap<String, String>) {
    let mut failures = Vec::new();
    let mut parsed = 0usize;
    let mut lowered = 0usize;
    for (name, source) in inputs {
        let outcome = catch_unwind(AssertUnwindSafe(|| front_end(name, source, specs)));
        let outcome = match outcome {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(message)) => {
                failures.push(format!("{message}\n--- input ---\n{source}"));
                continue;
            }
            Err(payload) => {
                let message = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "a panic".into());
                failures.push(format!("panicked: {message}\n--- input ---\n{source:?}"));
                continue;
            }
        };
        let Some(formatted) = outcome.formatted else {
            continue;
        };
        parsed += 1;
        let check = catch_unwind(AssertUnwindSafe(|| {
            check_formatted(name, source, &formatted, outcome.ir.as_deref(), specs)
        }));
        match check {
            Ok(Ok(())) => {}
            Ok(Err(message)) => failures.push(format!("{message}\n--- input ---\n{source}")),
            Err(_) => failures.push(format!(
                "panicked while checking the formatted text\n--- input ---\n{source:?}"
            )),
        }
        if outcome.ir.is_some() {
            lowered += 1;
        }
    }
    eprintln!(
        "{what}: {} inputs, {parsed} parsed, {lowered} lowered, {} failures",
        inputs.len(),
        failures.len()
    );
    if !failures.is_empty() {
        let shown: Vec<&String> = failures.iter().take(5).collect();
        panic!(
            "{what}: {} of {} inputs failed; the first ones:\n\n{}",
            failures.len(),
            inputs.len(),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n\n=====\n\n")
        );
    }
}

/// `fmt` is a fixed point, and the formatted text means what the input meant.
fn check_formatted(
    name: &str,
    source: &str,
    formatted: &str,
    ir: Option<&str>,
    specs: &BTreeMap<String, String>,
) -> Result<(), String> {
    let reparsed = syntax::parse(formatted, FileId(0))
        .map_err(|e| format!("fmt output does not parse: {e}\n--- fmt ---\n{formatted}"))?;
    let again = format_file(&reparsed, formatted);
    if again != formatted {
        return Err(format!(
            "fmt is not idempotent\n--- fmt ---\n{formatted}\n--- fmt of fmt ---\n{again}"
        ));
    }
    if let Some(ir) = ir {
        let outcome = front_end(name, formatted, specs)?;
        if outcome.ir.as_deref() != Some(ir) {
            return Err(format!(
                "the formatted spec lowers differently\n--- fmt ---\n{formatted}\n--- source ---\n{source}"
            ));
        }
    }
    Ok(())
}

// ---- random inputs ---------------------------------------------------------------------------

/// The characters specs are made of.
const ALPHABET: &[u8] =
    b"abcdefghijklmnopqrstuvwxyz_ABCXYZ0123456789.e+-*/^<>=!|,:()[]{}#;  \n\n\t/";

/// Words and symbols of the language besides the built-in functions, for token soup.
const TOKENS: &[&str] = &[
    "loss",
    "fn",
    "use",
    "per",
    "anchor",
    "skip",
    "if",
    "then",
    "else",
    "where",
    "and",
    "or",
    "for",
    "in",
    "stat",
    "input",
    "return",
    "x",
    "labels",
    "n",
    "v",
    "p",
    "q",
    "i",
    "j",
    "same",
    "self",
    "skipped",
    "d",
    "s",
    "pos",
    "neg",
    "term",
    "margin",
    "k",
    "bin_deviance",
    "0",
    "1",
    "0.5",
    "-1",
    "1e300",
    "2",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    "=",
    "==",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
    "+",
    "-",
    "*",
    "/",
    "^",
    "!",
    "|",
    ",",
    ":",
    "///",
    "//",
    "\n",
    "\n",
    "\n",
];

fn random_inputs(rng: &mut Rng) -> Vec<(String, String)> {
    let tokens: Vec<&str> = TOKENS.iter().chain(BUILTINS).copied().collect();
    let mut inputs = Vec::new();
    for index in 0..4000 {
        let len = rng.below(160);
        let text = match index % 4 {
            // Arbitrary bytes, read as UTF-8 where they can be.
            0 => {
                let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
            // Text from the language's alphabet.
            1 => (0..len).map(|_| *rng.pick(ALPHABET) as char).collect(),
            // Token soup, often inside a loss item so that the parser gets further.
            2 => {
                let words: Vec<&str> = (0..len / 3).map(|_| *rng.pick(&tokens)).collect();
                let body = words.join(" ");
                if rng.below(2) == 0 {
                    format!("loss fuzz(margin = 0.5) {{\n    {body}\n}}\n")
                } else {
                    body
                }
            }
            // Random UTF-8: any scalar value, weighted towards ASCII.
            _ => (0..len)
                .map(|_| match rng.below(4) {
                    0 => char::from_u32(rng.below(0x11_0000) as u32).unwrap_or('\u{fffd}'),
                    1 => char::from_u32(0x80 + rng.below(0x800) as u32).unwrap_or('é'),
                    _ => *rng.pick(ALPHABET) as char,
                })
                .collect(),
        };
        inputs.push(("fuzz".to_string(), text));
    }
    inputs
}

#[test]
fn random_input_never_panics() {
    let specs = shipped();
    let mut rng = Rng(0x5eed_0001);
    let inputs = random_inputs(&mut rng);
    check_inputs("random input", &inputs, &specs);
}

// ---- random specs from the grammar -----------------------------------------------------------

/// Names a generated expression may use: bindings of the generated spec and built-ins.
const NAMES: &[&str] = &[
    "d", "s", "c", "r", "pos", "neg", "term", "v", "p", "q", "margin", "k", "slices", "n", "same",
    "self", "i", "j", "x", "labels", "skipped", "b",
];

/// Names a generated expression may call, besides the built-ins: the helper, a shipped
/// loss and the generated loss itself.
const CALLABLE: &[&str] = &["helper", "bin_deviance", "gen"];

const OPERATORS: &[&str] = &[
    "+", "-", "*", "/", "^", "<", "<=", ">", ">=", "==", "!=", "and", "or", "|", "where", "else",
];

/// A random expression of at most `depth` levels, in source form.
fn random_expr(rng: &mut Rng, depth: usize) -> String {
    if depth == 0 || rng.below(4) == 0 {
        return match rng.below(3) {
            0 => rng
                .pick(&["0", "1", "2", "0.5", "-1", "3", "1e-3", "1e300"])
                .to_string(),
            _ => rng.pick(NAMES).to_string(),
        };
    }
    let d = depth - 1;
    match rng.below(9) {
        0..=2 => {
            let functions: Vec<&str> = BUILTINS.iter().chain(CALLABLE).copied().collect();
            let f = *rng.pick(&functions);
            let count = rng.below(5);
            let mut args: Vec<String> = (0..count).map(|_| random_expr(rng, d)).collect();
            if rng.below(4) == 0 {
                let name = rng.pick(&["eps", "min", "max", "margin", "k", "alpha"]);
                args.push(format!("{name} = {}", random_expr(rng, d)));
            }
            format!("{f}({})", args.join(", "))
        }
        3..=5 => format!(
            "{} {} {}",
            random_expr(rng, d),
            rng.pick(OPERATORS),
            random_expr(rng, d)
        ),
        6 => format!("{}({})", rng.pick(&["-", "!", ""]), random_expr(rng, d)),
        7 => format!(
            "if {} then {} else {}",
            random_expr(rng, d),
            random_expr(rng, d),
            random_expr(rng, d)
        ),
        _ => match rng.below(3) {
            0 => format!("[{}, {}]", random_expr(rng, d), random_expr(rng, d)),
            1 => format!("for b in {}: {}", random_expr(rng, d), random_expr(rng, d)),
            _ => format!("{}[{}]", rng.pick(NAMES), random_expr(rng, d)),
        },
    }
}

/// A random spec in the shape of the shipped ones, with random expressions in it.
fn random_spec(rng: &mut Rng) -> String {
    let mut spec = String::new();
    if rng.below(3) == 0 {
        spec.push_str("use bin_deviance\n\n");
    }
    if rng.below(3) == 0 {
        spec.push_str(&format!(
            "fn helper(a, b) {{\n    return {}\n}}\n\n",
            random_expr(rng, 2).replace("margin", "a")
        ));
    }
    spec.push_str("/// Generated.\nloss gen(margin = 0.5, k = 3, slices = [0, 2, 4]) {\n");
    let batch = [
        "d = euclid(x)",
        "s = dot(x)",
        "c = centres(x, labels)",
        "r = sqeuclid(x, c)",
    ];
    for line in batch {
        if rng.below(5) != 0 {
            spec.push_str(&format!("    {line}\n"));
        }
    }
    if rng.below(4) != 0 {
        spec.push_str("    per anchor {\n");
        spec.push_str("        pos = d where same and !self\n");
        spec.push_str("        neg = d where !same\n");
        for _ in 0..rng.below(3) {
            let head = rng.pick(&["t1 = ", "t2 = ", "skip if ", "hard = neg where ", "term = "]);
            spec.push_str(&format!("        {head}{}\n", random_expr(rng, 3)));
        }
        spec.push_str(&format!("        term = {}\n", random_expr(rng, 3)));
        spec.push_str("    }\n");
    }
    if rng.below(4) == 0 {
        spec.push_str(&format!("    stat extra = {}\n", random_expr(rng, 3)));
    }
    spec.push_str(&format!("    loss = {}\n}}\n", random_expr(rng, 3)));
    spec
}

#[test]
fn random_specs_never_panic() {
    let specs = shipped();
    let mut rng = Rng(0x5eed_0003);
    let inputs: Vec<(String, String)> = (0..3000)
        .map(|_| ("gen".to_string(), random_spec(&mut rng)))
        .collect();
    check_inputs("random specs", &inputs, &specs);
}

// ---- mutations of the shipped specs ----------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum TokenKind {
    Word,
    Number,
    Symbol,
}

/// A rough lexer: words, numbers and single symbols, with their byte ranges (comments are
/// lexed like code, which only makes the mutations more varied).
fn tokens(text: &str) -> Vec<(TokenKind, std::ops::Range<usize>)> {
    let bytes = text.as_bytes();
    let mut found = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let c = bytes[at];
        let start = at;
        let kind = if c.is_ascii_alphabetic() || c == b'_' {
            while at < bytes.len() && (bytes[at].is_ascii_alphanumeric() || bytes[at] == b'_') {
                at += 1;
            }
            TokenKind::Word
        } else if c.is_ascii_digit() {
            while at < bytes.len() && (bytes[at].is_ascii_digit() || bytes[at] == b'.') {
                at += 1;
            }
            TokenKind::Number
        } else if c.is_ascii_whitespace() {
            at += 1;
            continue;
        } else {
            // One character, whole (specs may hold non-ASCII text in comments).
            at += text[at..].chars().next().map_or(1, char::len_utf8);
            TokenKind::Symbol
        };
        found.push((kind, start..at));
    }
    found
}

/// A byte offset of `text` on a character boundary, in `0..=len`.
fn boundary(rng: &mut Rng, text: &str) -> usize {
    let mut at = rng.below(text.len() + 1);
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// A random range of `text` of at most `max` bytes, on character boundaries.
fn span(rng: &mut Rng, text: &str, max: usize) -> std::ops::Range<usize> {
    let start = boundary(rng, text);
    let mut end = (start + 1 + rng.below(max)).min(text.len());
    while !text.is_char_boundary(end) {
        end += 1;
    }
    start..end
}

fn mutations(name: &str, text: &str, rng: &mut Rng) -> Vec<(String, String)> {
    let mut out: Vec<String> = Vec::new();
    // Truncation at every 11th byte.
    for at in (0..text.len()).step_by(11) {
        if text.is_char_boundary(at) {
            out.push(text[..at].to_string());
        }
    }
    let toks = tokens(text);
    let words: Vec<&str> = toks
        .iter()
        .filter(|(k, _)| *k == TokenKind::Word)
        .map(|(_, r)| &text[r.clone()])
        .collect();
    let numbers: Vec<&std::ops::Range<usize>> = toks
        .iter()
        .filter(|(k, _)| *k == TokenKind::Number)
        .map(|(_, r)| r)
        .collect();
    for _ in 0..25 {
        // Deletion of a random span.
        let cut = span(rng, text, 40);
        out.push(format!("{}{}", &text[..cut.start], &text[cut.end..]));
        // Duplication of a random span, in place or elsewhere.
        let copy = span(rng, text, 60);
        let at = if rng.below(2) == 0 {
            copy.end
        } else {
            boundary(rng, text)
        };
        out.push(format!("{}{}{}", &text[..at], &text[copy], &text[at..]));
        // Swapping two random tokens.
        if toks.len() >= 2 {
            let (mut a, mut b) = (rng.below(toks.len()), rng.below(toks.len()));
            if a > b {
                std::mem::swap(&mut a, &mut b);
            }
            if a != b {
                let (ra, rb) = (toks[a].1.clone(), toks[b].1.clone());
                out.push(format!(
                    "{}{}{}{}{}",
                    &text[..ra.start],
                    &text[rb.clone()],
                    &text[ra.end..rb.start],
                    &text[ra],
                    &text[rb.end..]
                ));
            }
        }
        // A number replaced by an awkward value.
        if !numbers.is_empty() {
            let r = rng.pick(&numbers);
            let value = rng.pick(&["0", "-1", "1e300", "0.5", "1e-300", "3", "100000"]);
            out.push(format!("{}{value}{}", &text[..r.start], &text[r.end..]));
        }
        // An identifier replaced by another identifier of the file.
        if !words.is_empty() {
            let word_tokens: Vec<&std::ops::Range<usize>> = toks
                .iter()
                .filter(|(k, _)| *k == TokenKind::Word)
                .map(|(_, r)| r)
                .collect();
            let r = rng.pick(&word_tokens);
            let other = rng.pick(&words);
            out.push(format!("{}{other}{}", &text[..r.start], &text[r.end..]));
        }
    }
    out.into_iter().map(|t| (name.to_string(), t)).collect()
}

#[test]
fn mutated_specs_never_panic() {
    let specs = shipped();
    let mut rng = Rng(0x5eed_0002);
    let mut inputs = Vec::new();
    for (name, text) in &specs {
        inputs.extend(mutations(name, text, &mut rng));
    }
    check_inputs("mutated specs", &inputs, &specs);
}

// ---- the shipped specs themselves ------------------------------------------------------------

#[test]
fn shipped_specs_lower_and_format_to_a_fixed_point() {
    let specs = shipped();
    for (name, text) in &specs {
        let outcome = front_end(name, text, &specs).unwrap_or_else(|e| panic!("{name}: {e}"));
        let formatted = outcome
            .formatted
            .unwrap_or_else(|| panic!("{name} does not parse"));
        let ir = outcome
            .ir
            .unwrap_or_else(|| panic!("{name} does not lower"));
        check_formatted(name, text, &formatted, Some(&ir), &specs)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

// ---- deep nesting ----------------------------------------------------------------------------

/// Deeply nested input parses or is a syntax error, never a stack overflow, even on the
/// 2 MiB stack of a test thread. (Nesting is limited to about 40 parentheses or calls.)
#[test]
fn deep_nesting_is_an_error() {
    let specs = shipped();
    let mut inputs = Vec::new();
    for depth in [10, 30, 100, 1000, 20_000] {
        let open = "(".repeat(depth);
        let close = ")".repeat(depth);
        inputs.push(format!("loss deep() {{\n    loss = {open}1{close}\n}}\n"));
        inputs.push(format!(
            "loss deep() {{\n    loss = {}1\n}}\n",
            "-".repeat(depth)
        ));
        inputs.push(format!(
            "loss deep() {{\n    loss = {}1{}\n}}\n",
            "exp(".repeat(depth),
            ")".repeat(depth)
        ));
        inputs.push(format!(
            "loss deep() {{\n    loss = {}0{}\n}}\n",
            "[".repeat(depth),
            "]".repeat(depth)
        ));
    }
    let inputs: Vec<(String, String)> = inputs.into_iter().map(|t| ("deep".into(), t)).collect();
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            for (_, source) in inputs.iter().filter(|(_, s)| s.len() > 3000) {
                let error = syntax::parse(source, FileId(0)).expect_err("too deep to parse");
                assert!(
                    matches!(error, syntax::ParseError::Syntax { .. }),
                    "{error:?}"
                );
            }
            check_inputs("deep nesting", &inputs, &specs);
        })
        .expect("a thread")
        .join()
        .expect("no panic");
}
