//! The layer rule, read from the source: a module may name (`crate::…`)
//! only modules of its own layer or of lower ones, and modules of one layer
//! form no import cycle, except inside the transaction core (`engine`).
//! docs/ARCHITECTURE.md ("Layers") draws the same stack.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

/// Top-level folders of src/, bottom to top. Equal numbers share a layer.
const LAYERS: &[(&str, u32)] = &[
    ("util", 0),
    ("format", 1),
    ("nbd", 1),
    ("device", 2),
    ("btree", 3),
    ("chunk", 4),
    ("engine", 5),
    ("data", 6),
    ("jobs", 7),
    ("pool", 8),
    ("service", 9),
    ("stress", 9),
    ("cli", 10),
];

/// The one layer whose modules may import each other in a cycle.
const CYCLE_ALLOWED: &str = "engine";

fn layer(top: &str) -> Option<u32> {
    LAYERS.iter().find(|(n, _)| *n == top).map(|&(_, l)| l)
}

/// A module as the rule sees it: top folder and the module below it.
type Module = (String, String);

/// Every `crate::a::b` a source file names outside comments.
fn imports(text: &str) -> BTreeSet<Module> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        };
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let before = rest[..i].chars().last();
            rest = &rest[i + "crate::".len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let path: Vec<&str> = rest
                .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .next()
                .unwrap_or("")
                .split("::")
                .collect();
            let top = path[0].to_string();
            let sub = path.get(1).map(|s| s.to_string()).unwrap_or_default();
            if top.is_empty() {
                // `crate::{a, b}` would hide the layers it names from this
                // reader: one path per top-level module, please.
                out.insert(("{grouped}".to_string(), code.trim().to_string()));
            } else if layer(&top).is_some() {
                out.insert((top, sub));
            }
        }
    }
    out
}

/// The module a file under src/ belongs to.
fn module_of(rel: &Path) -> Option<Module> {
    let parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.len() < 2 {
        return None; // lib.rs, main.rs
    }
    let sub = if parts.len() == 2 && parts[1] == "mod" {
        String::new()
    } else {
        parts[1].clone()
    };
    Some((parts[0].clone(), sub))
}

fn walk(dir: &Path, root: &Path, out: &mut Vec<(Module, String)>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk(&p, root, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            if let Some(m) = module_of(p.strip_prefix(root).unwrap()) {
                out.push((m, fs::read_to_string(&p).unwrap()));
            }
        }
    }
}

/// Violations of the rule in a set of (module, source text).
fn violations(files: &[(Module, String)]) -> Vec<String> {
    let mut bad = Vec::new();
    let mut graph: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (m, text) in files {
        let Some(own) = layer(&m.0) else {
            bad.push(format!(
                "src/{}: a top-level module outside every layer",
                m.0
            ));
            continue;
        };
        for dep in imports(text) {
            let Some(l) = layer(&dep.0) else {
                bad.push(format!("{}::{}: grouped import `{}`", m.0, m.1, dep.1));
                continue;
            };
            if l > own {
                bad.push(format!(
                    "{}::{} (layer {own}) imports {}::{} (layer {l})",
                    m.0, m.1, dep.0, dep.1
                ));
            } else if l == own && dep != *m {
                graph.entry(m.clone()).or_default().insert(dep);
            }
        }
    }
    for cycle in cycles(&graph) {
        if cycle.iter().any(|m| m.0 != CYCLE_ALLOWED) {
            let names: Vec<String> = cycle.iter().map(|m| format!("{}::{}", m.0, m.1)).collect();
            bad.push(format!("import cycle: {}", names.join(" -> ")));
        }
    }
    bad
}

/// Modules that reach themselves again, one entry per cycle's members.
fn cycles(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    let reach = |from: &Module| {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<Module> = graph.get(from).into_iter().flatten().cloned().collect();
        while let Some(m) = stack.pop() {
            if seen.insert(m.clone()) {
                stack.extend(graph.get(&m).into_iter().flatten().cloned());
            }
        }
        seen
    };
    let mut out: Vec<Vec<Module>> = Vec::new();
    for m in graph.keys() {
        let r = reach(m);
        if r.contains(m) {
            let members: Vec<Module> = r.into_iter().filter(|o| reach(o).contains(m)).collect();
            if !out.contains(&members) {
                out.push(members);
            }
        }
    }
    out
}

#[test]
fn lower_layers_never_import_higher_ones() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&root, &root, &mut files);
    assert!(files.len() > 40, "read only {} files", files.len());
    let bad = violations(&files);
    assert!(bad.is_empty(), "layer rule broken:\n{}", bad.join("\n"));
}

#[test]
fn the_rule_catches_an_upward_import_and_a_cycle() {
    let f =
        |top: &str, sub: &str, text: &str| ((top.to_string(), sub.to_string()), text.to_string());
    let up = [f(
        "engine",
        "transaction",
        "use crate::jobs::scrub::ScrubRun;",
    )];
    assert_eq!(violations(&up).len(), 1);
    let cycle = [
        f("jobs", "cleaner", "use crate::jobs::relocation::x;"),
        f("jobs", "relocation", "fn a() { crate::jobs::cleaner::y() }"),
    ];
    assert_eq!(violations(&cycle).len(), 1);
    let grouped = [f(
        "data",
        "volume",
        "use crate::{engine::fs_info::FsInfo, jobs::scrub};",
    )];
    assert_eq!(violations(&grouped).len(), 1);
    let allowed = [
        f("engine", "fs_info", "use crate::engine::transaction::x;"),
        f("engine", "transaction", "use crate::engine::fs_info::y;"),
        f(
            "data",
            "volume",
            "// see crate::jobs::scrub\nuse crate::engine::fs_info::FsInfo;",
        ),
    ];
    assert!(violations(&allowed).is_empty());
}
