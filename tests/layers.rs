//! Keeps src/lib.rs's layering true: every `crate::<module>` a source file names
//! (outside comments and test code) is in a layer below its own module's, or is an
//! earlier module of the same layer. A new upward import fails here with the file
//! and the import to move.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The layers of src/lib.rs, bottom first; within a layer, a module may import
/// the ones listed before it.
const LAYERS: &[&[&str]] = &[
    &["fsutil", "procfs", "sync", "config"],
    &["logs", "process", "secrets"],
    &[
        "postgres", "tls", "admin", "proxy", "backend", "backup", "capacity", "update",
    ],
    &["control", "check", "metrics"],
    &["supervisor", "cli"],
];

fn rank() -> HashMap<&'static str, (usize, usize)> {
    let mut r = HashMap::new();
    for (layer, mods) in LAYERS.iter().enumerate() {
        for (i, m) in mods.iter().enumerate() {
            r.insert(*m, (layer, i));
        }
    }
    r
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The file's code without comments and without its `#[cfg(test)]` tail.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn no_module_imports_from_a_layer_above_its_own() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let rank = rank();
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("lib.rs");
    for line in lib.lines() {
        if let Some(m) = line
            .strip_prefix("pub mod ")
            .and_then(|l| l.strip_suffix(';'))
        {
            assert!(
                rank.contains_key(m),
                "module {m} of src/lib.rs has no layer in tests/layers.rs"
            );
        }
    }
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut wrong = Vec::new();
    for f in files {
        let rel = f.strip_prefix(&src).expect("under src");
        let top = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .map(|s| s.trim_end_matches(".rs").to_string())
            .unwrap_or_default();
        let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name == "tests.rs"
            || name.ends_with("_tests.rs")
            || rel.components().any(|c| c.as_os_str() == "tests")
        {
            continue;
        }
        let Some(&mine) = rank.get(top.as_str()) else {
            continue; // lib.rs, main.rs
        };
        let text = std::fs::read_to_string(&f).expect("read source");
        let code = code(&text);
        let mut rest = code.as_str();
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + 7..];
            let m: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if m == top {
                continue;
            }
            match rank.get(m.as_str()) {
                Some(&theirs) if theirs < mine => {}
                Some(_) => wrong.push(format!("{}: crate::{m}", rel.display())),
                None => {}
            }
        }
    }
    wrong.sort();
    wrong.dedup();
    assert!(
        wrong.is_empty(),
        "imports from a layer above (see src/lib.rs's Layers; move the code down or the caller up):\n{}",
        wrong.join("\n")
    );
}
