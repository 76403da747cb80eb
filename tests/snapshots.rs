//! The IR and the gradient IR of every shipped loss, lowered with its default parameters,
//! snapshot-tested.
//!
//! A change to lowering, differentiation, interning or the printers shows as a diff here.
//! Each snapshot is named after its spec (`snapshots__triplet.snap`, and
//! `snapshots__triplet.grad.snap` for the gradient) and described by the loss's one-line doc.

use losscc::Spec;

#[test]
fn ir() {
    insta::glob!("../losses", "*.loss", |path| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
        let relative = path.strip_prefix(&root).unwrap_or(path);
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("a spec file name")
            .to_string();
        let spec = match Spec::load(relative) {
            Ok(spec) => spec,
            Err((sources, error)) => panic!("{}", losscc::render(&sources, &error)),
        };
        let module = spec
            .lower(&Vec::new())
            .unwrap_or_else(|error| panic!("{}", spec.render(&error)));
        let summary = losscc::ir::entry_loss(spec.program.main_file())
            .map(|loss| loss.summary().to_string())
            .unwrap_or_default();
        let mut settings = insta::Settings::clone_current();
        settings.remove_snapshot_suffix();
        settings.set_description(summary);
        settings.set_omit_expression(true);
        let gradient =
            losscc::grad::differentiate(&module).unwrap_or_else(|e| panic!("{name}: {e}"));
        settings.bind(|| {
            insta::assert_snapshot!(name.clone(), losscc::ir::print_program(&module));
            insta::assert_snapshot!(
                format!("{name}.grad"),
                losscc::grad::print_gradient(&gradient)
            );
        });
    });
}
