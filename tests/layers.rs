//! The layering rule of `src/` (see `src/lib.rs` and docs/architecture.md), checked over the
//! source text: every module's imports (`crate::...`, `super::...`, and a parent's `use child::`)
//! form a graph of files; that graph must have no cycle, and no module may import from a layer
//! above its own. Test code (`#[cfg(test)] mod tests`, `tests.rs` files) is left out: tests may
//! reach anywhere.
//!
//! Run alone, with the graph printed: `cargo test --test layers -- --nocapture`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each top-level module's layer, bottom (0) to top. A new module must be placed here.
const LAYERS: &[(&str, u8)] = &[
    // Foundation: no Tollgate state.
    ("http", 0),
    ("clock", 0),
    ("metrics", 0),
    ("error", 0),
    // Concerns.
    ("store", 1),
    ("observe", 1),
    ("access_log", 1),
    ("otlp", 1),
    ("upstream", 1),
    ("shed", 1),
    ("identity", 1),
    ("limit", 1),
    ("cache", 1),
    ("route", 1),
    ("admission", 1),
    ("tls", 1),
    ("acme", 1),
    ("front", 1),
    // The file compiled into the concerns' types.
    ("config", 2),
    // What survives reloads.
    ("state", 3),
    // One generation of the running config.
    ("snapshot", 4),
    // The request flow, the control plane, the admin API.
    ("proxy", 5),
    ("control", 5),
    ("admin", 5),
];

type Module = Vec<String>;

struct Source {
    module: Module,
    text: String,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read src")
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The module a file holds: `src/a/b.rs` and `src/a/b/mod.rs` are `a::b`; `src/lib.rs` is the
/// crate root (empty).
fn module_of(path: &Path) -> Module {
    let rel = path.strip_prefix(src_dir()).expect("under src");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().expect("file name");
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_string());
    }
    parts
}

/// The file's text without test code and without whole-line comments.
fn non_test_code(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        if t == "#[cfg(test)]" {
            let next = lines.get(i + 1).map_or("", |l| l.trim_start());
            if next.starts_with("mod tests") || next.starts_with("pub(crate) mod tests") {
                break;
            }
        }
        if t.starts_with("//") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn sources() -> Vec<Source> {
    let mut files = Vec::new();
    collect(&src_dir(), &mut files);
    files
        .into_iter()
        // The binary (imports the library by name) and test-only files.
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            name.as_deref() != Some("main.rs") && name.as_deref() != Some("tests.rs")
        })
        .map(|p| Source {
            module: module_of(&p),
            text: non_test_code(&std::fs::read_to_string(&p).expect("read")),
        })
        .collect()
}

/// The `a::b::c` path segments (snake_case identifiers) starting at `rest`.
fn segments(rest: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut s = rest;
    loop {
        let end = s
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(s.len());
        let ident = &s[..end];
        if ident.is_empty() || !ident.starts_with(|c: char| c.is_ascii_lowercase()) {
            break;
        }
        out.push(ident.to_string());
        match s[end..].strip_prefix("::") {
            Some(next) => s = next,
            None => break,
        }
    }
    out
}

/// The modules `source` names: absolute module paths (not yet resolved to files).
fn references(source: &Source, children: &BTreeSet<String>) -> Vec<Module> {
    let text = &source.text;
    let mut refs = Vec::new();
    for (at, _) in text.match_indices("crate::") {
        let before = text[..at].chars().last();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let rest = &text[at + "crate::".len()..];
        assert!(
            !rest.starts_with('{'),
            "{}: `crate::{{..}}` groups hide imports from this check: one `use` per module",
            source.module.join("::")
        );
        refs.push(segments(rest));
    }
    // `super::` (possibly repeated) is relative to the module's parent.
    for (at, _) in text.match_indices("super::") {
        let before = text[..at].chars().last();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let mut base = source.module.clone();
        let mut rest = &text[at..];
        while let Some(r) = rest.strip_prefix("super::") {
            base.pop();
            rest = r;
        }
        let mut m = base;
        m.extend(segments(rest));
        refs.push(m);
    }
    // A parent's relative paths to its children (`use child::X`, `child::f()`).
    for child in children {
        let pat = format!("{child}::");
        for (at, _) in text.match_indices(&pat) {
            let before = text[..at].chars().last();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let mut m = source.module.clone();
            m.extend(segments(&text[at..]));
            refs.push(m);
        }
    }
    refs
}

/// The child modules a file declares (`mod x;`, `pub mod x;`, `pub(crate) mod x;`).
fn declared_children(text: &str) -> BTreeSet<String> {
    text.lines()
        .map(str::trim)
        .filter_map(|l| {
            let l = l
                .strip_prefix("pub(crate) ")
                .or_else(|| l.strip_prefix("pub "))
                .unwrap_or(l);
            let name = l.strip_prefix("mod ")?.strip_suffix(';')?;
            Some(name.to_string())
        })
        .collect()
}

/// The import graph between files (modules), self-references dropped.
fn graph() -> BTreeMap<Module, BTreeSet<Module>> {
    let sources = sources();
    let known: BTreeSet<Module> = sources.iter().map(|s| s.module.clone()).collect();
    let mut graph = BTreeMap::new();
    for s in &sources {
        let children = declared_children(&s.text);
        let mut deps = BTreeSet::new();
        for mut r in references(s, &children) {
            // The longest prefix that is a module of its own file.
            while !r.is_empty() && !known.contains(&r) {
                r.pop();
            }
            if !r.is_empty() && r != s.module {
                deps.insert(r);
            }
        }
        graph.insert(s.module.clone(), deps);
    }
    graph
}

fn layer_of(module: &Module) -> u8 {
    let top = module.first().map_or("", String::as_str);
    LAYERS
        .iter()
        .find(|(name, _)| *name == top)
        .map(|(_, l)| *l)
        .unwrap_or_else(|| {
            panic!("module `{top}` has no layer: add it to LAYERS in tests/layers.rs")
        })
}

/// A cycle through `graph`, if any (depth-first search with colours).
fn find_cycle(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Option<Vec<Module>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        m: &Module,
        graph: &BTreeMap<Module, BTreeSet<Module>>,
        marks: &mut BTreeMap<Module, Mark>,
        stack: &mut Vec<Module>,
    ) -> Option<Vec<Module>> {
        match marks.get(m) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let from = stack.iter().position(|s| s == m).unwrap_or(0);
                let mut cycle = stack[from..].to_vec();
                cycle.push(m.clone());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(m.clone(), Mark::Open);
        stack.push(m.clone());
        for d in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(d, graph, marks, stack) {
                return Some(c);
            }
        }
        stack.pop();
        marks.insert(m.clone(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for m in graph.keys() {
        if let Some(c) = visit(m, graph, &mut marks, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

fn name(m: &Module) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

#[test]
fn no_module_imports_from_a_layer_above_it() {
    let graph = graph();
    let mut wrong = Vec::new();
    for (m, deps) in &graph {
        if m.is_empty() {
            continue; // lib.rs declares every module
        }
        for d in deps {
            if layer_of(d) > layer_of(m) {
                wrong.push(format!(
                    "{} (layer {}) imports {} (layer {})",
                    name(m),
                    layer_of(m),
                    name(d),
                    layer_of(d)
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layering:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_module_graph_has_no_cycle() {
    let mut graph = graph();
    graph.remove(&Vec::new());
    // Printed with --nocapture: the graph this test checked.
    for (m, deps) in &graph {
        let list: Vec<String> = deps.iter().map(name).collect();
        println!("{} -> {}", name(m), list.join(", "));
    }
    assert!(graph.len() > 20, "found only {} modules", graph.len());
    if let Some(cycle) = find_cycle(&graph) {
        let names: Vec<String> = cycle.iter().map(name).collect();
        panic!("import cycle: {}", names.join(" -> "));
    }
}

#[test]
fn the_checker_sees_imports_and_cycles() {
    let children = BTreeSet::from(["child".to_string()]);
    let s = Source {
        module: vec!["a".into(), "b".into()],
        text: "use crate::x::y::Z;\nuse super::c::D;\nuse child::E;\nfn f() { crate::q::r(); }\n"
            .into(),
    };
    let refs = references(&s, &children);
    let want: Vec<Module> = [
        vec!["x", "y"],
        vec!["q", "r"],
        vec!["a", "c"],
        vec!["a", "b", "child"],
    ]
    .iter()
    .map(|v| v.iter().map(|p| p.to_string()).collect())
    .collect();
    for w in &want {
        assert!(refs.contains(w), "{w:?} not found in {refs:?}");
    }
    assert_eq!(
        declared_children("pub mod a;\nmod b;\n#[cfg(x)]\npub(crate) mod c;\n").len(),
        3
    );
    let m = |s: &str| vec![s.to_string()];
    let cyclic = BTreeMap::from([
        (m("a"), BTreeSet::from([m("b")])),
        (m("b"), BTreeSet::from([m("c")])),
        (m("c"), BTreeSet::from([m("a")])),
    ]);
    assert_eq!(find_cycle(&cyclic).map(|c| c.len()), Some(4));
    let acyclic = BTreeMap::from([
        (m("a"), BTreeSet::from([m("b"), m("c")])),
        (m("b"), BTreeSet::from([m("c")])),
        (m("c"), BTreeSet::new()),
    ]);
    assert_eq!(find_cycle(&acyclic), None);
    assert!(
        non_test_code("use crate::a;\n#[cfg(test)]\nmod tests {\nuse crate::b;\n}\n")
            .contains("crate::a")
    );
    assert!(
        !non_test_code("use crate::a;\n#[cfg(test)]\nmod tests {\nuse crate::b;\n}\n")
            .contains("crate::b")
    );
}
