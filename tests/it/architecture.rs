//! The source tree's dependencies point one way: no module imports a module that imports it
//! back, directly or through others, and the same holds between the folders (`config`,
//! `postgres`, `kafka`, `relay`, `service`, `commands`, `inbox`). A cycle means a piece sits in
//! the wrong place; this test names the modules of the first cycle it finds.
//!
//! It reads the crate's sources as text: every `crate::`, `super::` and `self::` path outside
//! comments and outside `#[cfg(test)]` modules is an import of the longest module it names.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The library's modules (by path, e.g. `relay::stalled`) and the modules each one imports.
type Graph = BTreeMap<String, BTreeSet<String>>;

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    let graph = module_graph();
    assert!(graph.len() > 20, "expected the crate's modules, found {:?}", graph.keys());
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle between modules: {}", cycle.join(" -> "));
    }
}

#[test]
fn no_folder_imports_a_folder_that_imports_it_back() {
    let mut folders = Graph::new();
    for (module, imports) in module_graph() {
        let from = top_level(&module);
        let entry = folders.entry(from.clone()).or_default();
        entry.extend(imports.iter().map(|m| top_level(m)).filter(|to| *to != from));
    }
    if let Some(cycle) = find_cycle(&folders) {
        panic!("import cycle between folders: {}", cycle.join(" -> "));
    }
}

#[test]
fn config_imports_nothing_else_of_the_crate() {
    let graph = module_graph();
    for (module, imports) in graph.iter().filter(|(m, _)| top_level(m) == "config") {
        let outside: Vec<_> = imports.iter().filter(|m| top_level(m) != "config").collect();
        assert!(outside.is_empty(), "{module} imports {outside:?}; config must be a leaf");
    }
}

fn top_level(module: &str) -> String {
    module.split("::").next().unwrap_or(module).to_string()
}

fn module_graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    collect_rust_files(&src, &mut files);
    let modules: BTreeMap<String, PathBuf> =
        files.into_iter().filter_map(|file| module_path(&src, &file).map(|module| (module, file))).collect();
    let known: BTreeSet<&str> = modules.keys().map(String::as_str).collect();
    modules
        .iter()
        .map(|(module, file)| {
            let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let imports = imported_paths(module, &code_outside_tests(&text))
                .into_iter()
                .filter_map(|path| longest_module(&known, &path))
                .filter(|imported| imported != module && !module.starts_with(&format!("{imported}::")))
                .collect();
            (module.clone(), imports)
        })
        .collect()
}

fn collect_rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_rust_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

/// `src/relay/stalled.rs` is `relay::stalled`, `src/relay/mod.rs` is `relay`; `lib.rs` and
/// the binary's `main.rs` are not modules of the library.
fn module_path(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).ok()?.with_extension("");
    let mut parts: Vec<String> = relative.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|last| last == "mod") {
        parts.pop();
    }
    if parts == ["lib"] || parts == ["main"] {
        return None;
    }
    Some(parts.join("::"))
}

/// The file's text without comments and without the `#[cfg(test)]` module at its end: what a
/// test imports does not shape the library.
fn code_outside_tests(text: &str) -> String {
    let mut code = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("#[cfg(test)]") && lines.peek().is_some_and(|next| next.trim_start().starts_with("mod "))
        {
            break;
        }
        if trimmed.starts_with("//") {
            continue;
        }
        code.push_str(line.split(" //").next().unwrap_or(line));
        code.push('\n');
    }
    code
}

/// Every module path the code names, absolute (`relay::stalled::StalledRecords`), with `use`
/// groups (`crate::{a::X, b}`) expanded and `self::`/`super::` resolved against `module`.
fn imported_paths(module: &str, code: &str) -> Vec<String> {
    let mut paths = Vec::new();
    for anchor in ["crate::", "super::", "self::"] {
        let mut rest = code;
        while let Some(at) = rest.find(anchor) {
            let before = rest[..at].chars().next_back();
            let tail = &rest[at + anchor.len()..];
            rest = tail;
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let base = match anchor {
                "crate::" => String::new(),
                "self::" => module.to_string(),
                _ => module.rsplit_once("::").map(|(parent, _)| parent.to_string()).unwrap_or_default(),
            };
            for path in expand(tail) {
                paths.push(if base.is_empty() { path } else { format!("{base}::{path}") });
            }
        }
    }
    paths
}

/// The paths written at the start of `tail`: `a::b::C` gives `a::b::C`; `a::{b::C, d}` gives
/// `a::b::C` and `a::d`.
fn expand(tail: &str) -> Vec<String> {
    let mut prefix = String::new();
    for (i, c) in tail.char_indices() {
        if c.is_alphanumeric() || c == '_' || c == ':' {
            prefix.push(c);
        } else if c == '{' {
            let group = &tail[i + 1..];
            let mut depth = 0;
            let mut end = group.len();
            for (j, g) in group.char_indices() {
                match g {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        end = j;
                        break;
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            return split_top_level(&group[..end])
                .into_iter()
                .flat_map(|item| expand(item.trim()))
                .map(|path| format!("{prefix}{path}"))
                .collect();
        } else {
            break;
        }
    }
    vec![prefix.trim_end_matches(':').to_string()]
}

fn split_top_level(group: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&group[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&group[start..]);
    items.into_iter().filter(|item| !item.trim().is_empty()).collect()
}

fn longest_module(known: &BTreeSet<&str>, path: &str) -> Option<String> {
    let parts: Vec<&str> = path.split("::").collect();
    (1..=parts.len()).rev().map(|n| parts[..n].join("::")).find(|candidate| known.contains(candidate.as_str()))
}

/// The first cycle found by a depth-first walk, as the modules along it (first = last).
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(node: &str, graph: &Graph, path: &mut Vec<String>, done: &mut BTreeSet<String>) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_import_reader_finds_grouped_relative_and_nested_paths() {
    let code = "use crate::{config::Config, kafka::{record::Record, publisher}};\nuse super::backoff::Backoff;\nlet x = self::shards::FENCE;";
    let paths = imported_paths("relay::wakeup", code);
    assert_eq!(
        paths,
        [
            "config::Config",
            "kafka::record::Record",
            "kafka::publisher",
            "relay::backoff::Backoff",
            "relay::wakeup::shards::FENCE"
        ]
    );
    let graph: Graph = [("a", vec!["b"]), ("b", vec!["c"]), ("c", vec!["a"]), ("d", vec![])]
        .into_iter()
        .map(|(m, to)| (m.to_string(), to.into_iter().map(String::from).collect()))
        .collect();
    assert_eq!(find_cycle(&graph), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
}
