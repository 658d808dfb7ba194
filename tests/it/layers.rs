//! Imports run one way: every `crate::relay::<module>` a module of `src/relay/` names in code
//! (not in comments) belongs to a lower layer of the table in docs/architecture.md, and
//! `relay` names neither `cli` nor `sim`.

use std::collections::BTreeMap;
use std::path::Path;

/// Module → layer, from the fenced block after the `<!-- layers:` marker.
fn layers(doc: &str) -> BTreeMap<String, usize> {
    let block = doc
        .split("<!-- layers:")
        .nth(1)
        .and_then(|rest| rest.split("```text").nth(1))
        .and_then(|rest| rest.split("```").next())
        .expect("docs/architecture.md has the layer table");
    let mut out = BTreeMap::new();
    for line in block.lines() {
        // `<layer>  <modules>  <description>`: the columns are two spaces or more apart.
        let Some((layer, rest)) = line.trim().split_once(' ') else {
            continue;
        };
        let Ok(layer) = layer.parse::<usize>() else {
            continue;
        };
        let modules = rest.trim_start().split("  ").next().unwrap_or("");
        for m in modules.split_whitespace() {
            out.insert(m.to_string(), layer);
        }
    }
    out
}

/// The relay modules `source` names in code lines (comments skipped).
fn named_modules(source: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in source.lines() {
        let code = line.split("//").next().unwrap_or("");
        for (i, _) in code.match_indices("crate::relay::") {
            let rest = &code[i + "crate::relay::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            out.push(name);
        }
        // `use crate::relay::{a, b}` names several.
        if let Some(list) = code.split("crate::relay::{").nth(1) {
            for item in list.split([',', '}']) {
                let name = item.trim().split("::").next().unwrap_or("").to_string();
                if name.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                    out.push(name);
                }
            }
        }
    }
    out.retain(|n| !n.is_empty());
    out
}

/// Every import that does not run down: (module, what it names, why).
fn violations(
    table: &BTreeMap<String, usize>,
    files: &[(String, String)],
) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for (module, source) in files {
        let Some(&mine) = table.get(module) else {
            out.push((
                module.clone(),
                String::new(),
                "not in the layer table".into(),
            ));
            continue;
        };
        for other in named_modules(source) {
            if other == *module {
                continue;
            }
            match table.get(&other) {
                Some(&theirs) if theirs < mine => {}
                Some(&theirs) => out.push((
                    module.clone(),
                    other,
                    format!("layer {mine} uses layer {theirs}"),
                )),
                None => out.push((module.clone(), other, "not in the layer table".into())),
            }
        }
        if source
            .lines()
            .map(|l| l.split("//").next().unwrap_or(""))
            .any(|code| code.contains("crate::cli") || code.contains("crate::sim"))
        {
            out.push((
                module.clone(),
                "cli/sim".into(),
                "relay uses cli or sim".into(),
            ));
        }
    }
    out
}

/// `src/relay/`'s modules and their source (`store/` as one).
fn relay_sources() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/relay");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&root).expect("src/relay") {
        let path = entry.expect("entry").path();
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("")
            .to_string();
        if path.is_dir() {
            let mut all = String::new();
            for f in std::fs::read_dir(&path).expect("a module folder") {
                let f = f.expect("entry").path();
                if f.extension().is_some_and(|e| e == "rs") {
                    all.push_str(&std::fs::read_to_string(&f).expect("source"));
                }
            }
            out.push((name, all));
        } else if path.extension().is_some_and(|e| e == "rs") && name != "mod" {
            out.push((name, std::fs::read_to_string(&path).expect("source")));
        }
    }
    out
}

#[test]
fn every_relay_import_runs_down_the_documented_layers() {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/architecture.md"))
            .expect("docs/architecture.md");
    let table = layers(&doc);
    let found = violations(&table, &relay_sources());
    assert!(
        found.is_empty(),
        "imports that run up or sideways: {found:#?}"
    );
}

#[test]
fn the_check_catches_an_import_that_runs_up_or_sideways() {
    let table = layers(
        "<!-- layers: -->\n```text\n0  low   the bottom\n1  mid peer  two\n2  high  top\n```\n",
    );
    assert_eq!(table.len(), 4);
    let files = vec![
        (
            "low".to_string(),
            "use crate::relay::high::Thing;\n".to_string(),
        ),
        (
            "mid".to_string(),
            "use crate::relay::{low, peer::X};\n// crate::relay::high in a comment\n".to_string(),
        ),
        (
            "high".to_string(),
            "fn f() { crate::relay::mid::g(); crate::sim::Sim::x(); }\n".to_string(),
        ),
    ];
    let found: Vec<(String, String)> = violations(&table, &files)
        .into_iter()
        .map(|(m, o, _)| (m, o))
        .collect();
    assert_eq!(
        found,
        vec![
            ("low".to_string(), "high".to_string()),
            ("mid".to_string(), "peer".to_string()),
            ("high".to_string(), "cli/sim".to_string()),
        ]
    );
}
