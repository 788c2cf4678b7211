//! The crate's module graph, read from the sources, and a cycle finder.
//!
//! Included by `tests/tune_loop.rs` only (through `#[path]`, so it adds no
//! test binary and is compiled once): the check that `src/` has no module
//! cycles, and tests of the extractor and of the cycle finder on small
//! synthetic inputs (so the check can fail).
//!
//! Nodes are modules that own a file (`tune::grad` for `src/tune/grad.rs`,
//! `tune` for `src/tune/mod.rs`, the crate root for `src/lib.rs`); inline
//! modules (`mod tests { … }`) count as their file. An edge `a → b` means a
//! file of `a` names an item of `b` through `use crate::…` / `super::…` /
//! `self::…` / a child module, or through such a path in code. Comments (doc
//! comments included), string and char literals are ignored. A path through
//! a `pub use` re-export is followed to the module that defines the item, so
//! a facade (`model` re-exporting `model::forward::Model`) does not make its
//! children depend on it. Each binary under `src/bin` is its own crate.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module → (module it depends on → where: `file:line`).
pub type Graph = BTreeMap<String, BTreeMap<String, String>>;

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    /// `::`
    Path,
    Sym(char),
}

/// Code tokens with their line numbers; comments, strings and chars dropped.
fn lex(src: &str) -> Vec<(Tok, usize)> {
    let c: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line) = (0usize, 1usize);
    let at = |i: usize| c.get(i).copied().unwrap_or('\0');
    // Skips a "…" string starting at the quote `i`; returns the index after it.
    let skip_str = |mut i: usize, line: &mut usize| {
        i += 1;
        while i < c.len() && c[i] != '"' {
            if c[i] == '\\' {
                i += 1;
            }
            if at(i) == '\n' {
                *line += 1;
            }
            i += 1;
        }
        i + 1
    };
    while i < c.len() {
        let ch = c[i];
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if ch == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if c[i] == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
        } else if ch == '"' {
            i = skip_str(i, &mut line);
        } else if ch == '\'' {
            if at(i + 1) == '\\' {
                i += 2;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                // A lifetime or label: skip the quote, the name follows.
                i += 1;
                while at(i).is_alphanumeric() || at(i) == '_' {
                    i += 1;
                }
            }
        } else if ch.is_ascii_digit() {
            while at(i).is_alphanumeric() || at(i) == '_' {
                i += 1;
            }
        } else if ch.is_alphabetic() || ch == '_' {
            let s = i;
            while at(i).is_alphanumeric() || at(i) == '_' {
                i += 1;
            }
            let word: String = c[s..i].iter().collect();
            // Raw and byte strings / chars: r"…", r#"…"#, b"…", br#"…"#, b'…'.
            if (word == "r" || word == "br") && (at(i) == '"' || at(i) == '#') {
                let mut hashes = 0;
                while at(i) == '#' {
                    hashes += 1;
                    i += 1;
                }
                if at(i) == '"' {
                    i += 1;
                    loop {
                        if i >= c.len() {
                            break;
                        }
                        if c[i] == '"' && (0..hashes).all(|k| at(i + 1 + k) == '#') {
                            i += 1 + hashes;
                            break;
                        }
                        if c[i] == '\n' {
                            line += 1;
                        }
                        i += 1;
                    }
                    continue;
                }
                // `r#ident`: a raw identifier.
                let s = i;
                while at(i).is_alphanumeric() || at(i) == '_' {
                    i += 1;
                }
                out.push((Tok::Ident(c[s..i].iter().collect()), line));
                continue;
            }
            if word == "b" && at(i) == '"' {
                i = skip_str(i, &mut line);
                continue;
            }
            if word == "b" && at(i) == '\'' {
                i += if at(i + 1) == '\\' { 4 } else { 3 };
                while i < c.len() && c[i - 1] != '\'' {
                    i += 1;
                }
                continue;
            }
            out.push((Tok::Ident(word), line));
        } else if ch == ':' && at(i + 1) == ':' {
            out.push((Tok::Path, line));
            i += 2;
        } else {
            out.push((Tok::Sym(ch), line));
            i += 1;
        }
    }
    out
}

/// The module path of a file relative to its crate's directory (`root` is
/// the crate root's file name: `lib.rs` or `main.rs`).
fn module_of(rel: &Path, root: &str) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap_or_default();
    if !(last == "mod.rs" || (parts.is_empty() && last == root)) {
        parts.push(last.trim_end_matches(".rs").to_string());
    }
    parts
}

/// One `use` tree, expanded into paths (`self` in a group is the group's
/// prefix, `as` renames are kept as the path's name). Each entry is the path
/// and the name it is bound to.
fn expand_use(toks: &[Tok]) -> Vec<(Vec<String>, String)> {
    fn tree(
        toks: &[Tok],
        i: &mut usize,
        prefix: Vec<String>,
        out: &mut Vec<(Vec<String>, String)>,
    ) {
        let mut path = prefix;
        loop {
            match toks.get(*i) {
                Some(Tok::Ident(w)) if w == "self" && !path.is_empty() => {
                    *i += 1;
                }
                Some(Tok::Ident(w)) => {
                    path.push(w.clone());
                    *i += 1;
                }
                Some(Tok::Sym('$')) => {
                    *i += 1;
                }
                Some(Tok::Sym('*')) => {
                    *i += 1;
                    out.push((path, "*".into()));
                    return;
                }
                Some(Tok::Sym('{')) => {
                    *i += 1;
                    loop {
                        match toks.get(*i) {
                            Some(Tok::Sym('}')) | None => {
                                *i += 1;
                                return;
                            }
                            Some(Tok::Sym(',')) => *i += 1,
                            _ => tree(toks, i, path.clone(), out),
                        }
                    }
                }
                _ => break,
            }
            if toks.get(*i) == Some(&Tok::Path) {
                *i += 1;
            } else {
                break;
            }
        }
        let mut name = path.last().cloned().unwrap_or_default();
        if toks.get(*i) == Some(&Tok::Ident("as".into())) {
            if let Some(Tok::Ident(a)) = toks.get(*i + 1) {
                name = a.clone();
            }
            *i += 2;
        }
        out.push((path, name));
    }
    let mut out = Vec::new();
    let mut i = 0;
    if toks.first() == Some(&Tok::Path) {
        return out; // `use ::extern_crate…`
    }
    tree(toks, &mut i, Vec::new(), &mut out);
    out
}

/// What one file names: `(scope, path, line)` for every path that may be
/// intra-crate, plus the `pub use` re-exports `(scope, name, path)`.
struct FileRefs {
    refs: Vec<(Vec<String>, Vec<String>, usize)>,
    reexports: Vec<(Vec<String>, String, Vec<String>)>,
}

fn scan(file_mod: &[String], toks: &[(Tok, usize)]) -> FileRefs {
    let mut refs = Vec::new();
    let mut reexports = Vec::new();
    let mut scope: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut pending_mod: Option<String> = None;
    let cur = |scope: &[(String, usize)]| {
        let mut p = file_mod.to_vec();
        p.extend(scope.iter().map(|(n, _)| n.clone()));
        p
    };
    let word = |i: usize| match toks.get(i) {
        Some((Tok::Ident(w), _)) => Some(w.as_str()),
        _ => None,
    };
    let mut i = 0;
    while i < toks.len() {
        let (t, line) = &toks[i];
        match t {
            Tok::Sym('{') => {
                depth += 1;
                if let Some(n) = pending_mod.take() {
                    scope.push((n, depth));
                }
            }
            Tok::Sym('}') => {
                if scope.last().is_some_and(|(_, d)| *d == depth) {
                    scope.pop();
                }
                depth = depth.saturating_sub(1);
            }
            Tok::Sym(';') => pending_mod = None,
            Tok::Ident(w) if w == "mod" => {
                if let Some(n) = word(i + 1) {
                    pending_mod = Some(n.to_string());
                    i += 1;
                }
            }
            Tok::Ident(w) if w == "use" => {
                // Visibility: `pub use` or `pub(…) use` re-exports.
                let public = match i.checked_sub(1).map(|k| &toks[k].0) {
                    Some(Tok::Ident(v)) => v == "pub",
                    Some(Tok::Sym(')')) => {
                        // `pub(crate)`, `pub(super)`, `pub(in …)`.
                        let mut k = i - 1;
                        while k > 0 && toks[k].0 != Tok::Sym('(') {
                            k -= 1;
                        }
                        k > 0 && word(k - 1) == Some("pub")
                    }
                    _ => false,
                };
                let s = i + 1;
                let mut e = s;
                while e < toks.len() && toks[e].0 != Tok::Sym(';') {
                    e += 1;
                }
                let body: Vec<Tok> = toks[s..e].iter().map(|(t, _)| t.clone()).collect();
                for (p, name) in expand_use(&body) {
                    if public && name != "*" {
                        reexports.push((cur(&scope), name, p.clone()));
                    }
                    refs.push((cur(&scope), p, *line));
                }
                i = e;
                continue;
            }
            // The start of a path in code: `a::b…` not preceded by `::`.
            Tok::Ident(w)
                if (i == 0 || toks[i - 1].0 != Tok::Path)
                    && toks.get(i + 1).map(|t| &t.0) == Some(&Tok::Path)
                    && w != "Self" =>
            {
                let mut p = vec![w.clone()];
                let mut j = i + 1;
                while toks.get(j).map(|t| &t.0) == Some(&Tok::Path) {
                    match word(j + 1) {
                        Some(n) => {
                            p.push(n.to_string());
                            j += 2;
                        }
                        None => break,
                    }
                }
                refs.push((cur(&scope), p, *line));
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    FileRefs { refs, reexports }
}

/// The graph of one crate from `(path relative to the crate's directory,
/// source)` pairs; `root` is the crate root's file name.
pub fn crate_graph(files: &[(String, String)], root: &str) -> Graph {
    let mods: BTreeMap<Vec<String>, String> = files
        .iter()
        .map(|(rel, _)| (module_of(Path::new(rel), root), rel.clone()))
        .collect();
    let scanned: Vec<(Vec<String>, String, FileRefs)> = files
        .iter()
        .map(|(rel, src)| {
            let m = module_of(Path::new(rel), root);
            let refs = scan(&m, &lex(src));
            (m, rel.clone(), refs)
        })
        .collect();
    // Re-exports: absolute path of the name → absolute target path.
    let mut reexp: BTreeMap<Vec<String>, Vec<String>> = BTreeMap::new();
    for (_, _, fr) in &scanned {
        for (scope, name, p) in &fr.reexports {
            if let Some(abs) = absolute(scope, p, &mods) {
                let mut key = scope.clone();
                key.push(name.clone());
                reexp.insert(key, abs);
            }
        }
    }
    let name = |m: &[String]| {
        if m.is_empty() {
            "crate".to_string()
        } else {
            m.join("::")
        }
    };
    let mut g = Graph::new();
    for (m, rel, fr) in &scanned {
        let edges = g.entry(name(m)).or_default();
        for (scope, p, line) in &fr.refs {
            let Some(abs) = absolute(scope, p, &mods) else {
                continue;
            };
            let target = owner(&abs, &mods, &reexp, 0);
            if target != *m {
                edges
                    .entry(name(&target))
                    .or_insert_with(|| format!("{rel}:{line}"));
            }
        }
    }
    g
}

/// The absolute path that `p`, written in module `scope`, names; `None`
/// for paths outside the crate.
fn absolute(
    scope: &[String],
    p: &[String],
    mods: &BTreeMap<Vec<String>, String>,
) -> Option<Vec<String>> {
    let first = p.first()?;
    let mut base = scope.to_vec();
    let mut rest = &p[1..];
    match first.as_str() {
        "crate" => base.clear(),
        "self" => {}
        "super" => {
            base.pop()?;
            while rest.first().map(String::as_str) == Some("super") {
                base.pop()?;
                rest = &rest[1..];
            }
        }
        child => {
            // A child module of `scope` (file modules only; inline ones are
            // part of their file).
            let mut c = scope.to_vec();
            c.push(child.to_string());
            if !mods.contains_key(&c) {
                return None;
            }
            base = c;
        }
    }
    base.extend(rest.iter().cloned());
    Some(base)
}

/// The file module that defines what `abs` names: its longest prefix that
/// is a file module, following `pub use` re-exports of the next segment.
fn owner(
    abs: &[String],
    mods: &BTreeMap<Vec<String>, String>,
    reexp: &BTreeMap<Vec<String>, Vec<String>>,
    hops: usize,
) -> Vec<String> {
    let k = (0..=abs.len())
        .rev()
        .find(|&k| mods.contains_key(&abs[..k]))
        .unwrap_or(0);
    if k < abs.len() && hops < 16 {
        if let Some(t) = reexp.get(&abs[..=k]) {
            let mut next = t.clone();
            next.extend(abs[k + 1..].iter().cloned());
            return owner(&next, mods, reexp, hops + 1);
        }
    }
    abs[..k].to_vec()
}

/// A strongly connected component with more than one module (or a module
/// that names itself): its members and one cycle through it.
#[derive(Clone, Debug)]
pub struct Cycle {
    pub members: BTreeSet<String>,
    /// `(a → b, file:line)` for each edge of one shortest cycle through the
    /// component's first member.
    pub path: Vec<(String, String)>,
}

/// Every nontrivial strongly connected component of `g`, each with one
/// cycle through it (`a → b → … → a`) and the evidence of each edge.
pub fn cycles(g: &Graph) -> Vec<Cycle> {
    // Tarjan's algorithm (recursive: the graphs are small).
    struct T<'g> {
        g: &'g Graph,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on: BTreeSet<&'g str>,
        sccs: Vec<Vec<&'g str>>,
    }
    impl<'g> T<'g> {
        fn visit(&mut self, v: &'g str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on.insert(v);
            let g = self.g;
            for w in g.get(v).into_iter().flat_map(|e| e.keys()) {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if self.on.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut scc = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on.remove(w);
                    scc.push(w);
                    if w == v {
                        break;
                    }
                }
                self.sccs.push(scc);
            }
        }
    }
    let mut t = T {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        sccs: Vec::new(),
    };
    let nodes: Vec<&str> = g
        .iter()
        .flat_map(|(a, e)| std::iter::once(a.as_str()).chain(e.keys().map(String::as_str)))
        .collect();
    for v in nodes {
        if !t.index.contains_key(v) {
            t.visit(v);
        }
    }
    let edge = |a: &str, b: &str| g.get(a).and_then(|e| e.get(b)).cloned();
    let mut out = Vec::new();
    for scc in t.sccs {
        let set: BTreeSet<&str> = scc.iter().copied().collect();
        let start = *set.iter().next().unwrap();
        if scc.len() == 1 && edge(start, start).is_none() {
            continue;
        }
        // Shortest path start → … → start inside the component (BFS).
        let mut prev: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([start]);
        let mut closing = None;
        'bfs: while let Some(v) = queue.pop_front() {
            for w in g.get(v).into_iter().flat_map(|e| e.keys()) {
                let w = w.as_str();
                if w == start {
                    closing = Some(v);
                    break 'bfs;
                }
                if set.contains(w) && !prev.contains_key(w) {
                    prev.insert(w, v);
                    queue.push_back(w);
                }
            }
        }
        let mut path = vec![start];
        let mut v = closing.unwrap_or(start);
        while v != start {
            path.push(v);
            v = prev[v];
        }
        path[1..].reverse();
        path.push(start);
        out.push(Cycle {
            members: set.iter().map(|m| m.to_string()).collect(),
            path: path
                .windows(2)
                .map(|w| {
                    (
                        format!("{} → {}", w[0], w[1]),
                        edge(w[0], w[1]).unwrap_or_default(),
                    )
                })
                .collect(),
        });
    }
    out
}

/// Reads every `.rs` file under `dir` (skipping `skip`), as paths relative
/// to `dir`.
pub fn read_tree(dir: &Path, skip: Option<&Path>) -> Vec<(String, String)> {
    fn walk(d: &Path, skip: Option<&Path>, out: &mut Vec<std::path::PathBuf>) {
        let mut es: Vec<_> = std::fs::read_dir(d)
            .unwrap_or_else(|e| panic!("{}: {e}", d.display()))
            .map(|e| e.unwrap().path())
            .collect();
        es.sort();
        for p in es {
            if Some(p.as_path()) == skip {
                continue;
            }
            if p.is_dir() {
                walk(&p, skip, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut ps = Vec::new();
    walk(dir, skip, &mut ps);
    ps.into_iter()
        .map(|p| {
            let src = std::fs::read_to_string(&p).unwrap();
            let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            (rel, src)
        })
        .collect()
}

/// The graphs of the library and of every binary under `src/bin/<name>/`,
/// by crate name.
pub fn source_graphs(manifest_dir: &Path) -> Vec<(String, Graph)> {
    let src = manifest_dir.join("src");
    let bin = src.join("bin");
    let mut out = vec![(
        "lib".to_string(),
        crate_graph(&read_tree(&src, Some(&bin)), "lib.rs"),
    )];
    if let Ok(rd) = std::fs::read_dir(&bin) {
        let mut dirs: Vec<_> = rd
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        for d in dirs {
            let name = d.file_name().unwrap().to_string_lossy().into_owned();
            out.push((name, crate_graph(&read_tree(&d, None), "main.rs")));
        }
    }
    out
}

/// `a → b (file:line)` lines of the cycles, for a failure message.
pub fn describe(cycles: &[Cycle]) -> String {
    cycles
        .iter()
        .map(|c| {
            format!(
                "  {{{}}}:\n",
                c.members.iter().cloned().collect::<Vec<_>>().join(", ")
            ) + &c
                .path
                .iter()
                .map(|(e, at)| format!("    {e}   ({at})"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect::<Vec<_>>()
        .join("\n  and\n")
}

/// Cycles that predate this check, outside the tuning modules: each is a
/// façade (`mod.rs` owns the API types and dispatches to its backends, and
/// the backends use those types). A component is tolerated when all its
/// modules are in one entry (it may shrink, never grow); anything else fails.
/// Remove an entry when its cycle is gone.
const KNOWN_CYCLES: &[(&str, &[&str])] = &[
    (
        "lib",
        &[
            "wkv7",
            "wkv7::cuda",
            "wkv7::emu",
            "wkv7::reference",
            "wkv7::v2",
        ],
    ),
    // ops/mod.rs's host GEMM calls ops::reference, which uses ops' `Act`.
    ("lib", &["ops", "ops::reference"]),
];

#[test]
fn the_crate_has_no_module_cycles() {
    let graphs = source_graphs(Path::new(env!("CARGO_MANIFEST_DIR")));
    let lib = &graphs[0].1;
    // The extractor sees the crate (guards against a silently empty graph).
    assert!(
        lib.get("tune::train")
            .is_some_and(|e| e.contains_key("tune::engine")),
        "the module graph misses tune::train → tune::engine: {lib:#?}"
    );
    let mut report = String::new();
    for (name, g) in &graphs {
        let (known, new): (Vec<Cycle>, Vec<Cycle>) = cycles(g).into_iter().partition(|c| {
            KNOWN_CYCLES
                .iter()
                .any(|(k, ms)| k == name && c.members.iter().all(|m| ms.contains(&m.as_str())))
        });
        for c in &known {
            eprintln!(
                "{name}: known module cycle (KNOWN_CYCLES):\n{}",
                describe(std::slice::from_ref(c))
            );
        }
        if !new.is_empty() {
            report += &format!(
                "{name}: {} module cycle(s):\n{}\n",
                new.len(),
                describe(&new)
            );
        }
    }
    assert!(
        report.is_empty(),
        "module cycles in src/ (a module must not depend, even indirectly, on one that depends \
         on it; move the shared items into a module both can use):\n{report}"
    );
}

#[test]
fn the_cycle_finder_finds_a_synthetic_cycle() {
    let mut g = Graph::new();
    for (a, b) in [("a", "b"), ("b", "c"), ("c", "a"), ("d", "a"), ("c", "e")] {
        g.entry(a.into())
            .or_default()
            .insert(b.into(), format!("{a}.rs:1"));
    }
    let c = cycles(&g);
    assert_eq!(c.len(), 1, "{c:?}");
    let edges: Vec<&str> = c[0].path.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(edges, ["a → b", "b → c", "c → a"]);
    assert_eq!(c[0].path[2].1, "c.rs:1");
    assert_eq!(c[0].members.iter().collect::<Vec<_>>(), ["a", "b", "c"]);
    // Without the closing edge the graph is acyclic.
    g.get_mut("c").unwrap().remove("a");
    assert!(cycles(&g).is_empty());
    // A self-loop is a cycle.
    g.entry("e".into())
        .or_default()
        .insert("e".into(), "e.rs:9".into());
    assert_eq!(cycles(&g).len(), 1);
}

#[test]
fn the_extractor_reads_paths_not_comments_or_strings() {
    let files =
        |b: &str| {
            vec![
            ("lib.rs".to_string(), "pub mod a; pub mod b; pub mod m;".to_string()),
            (
                "a.rs".to_string(),
                "//! uses [`crate::b`] in docs only\nuse crate::m::Item;\n/* super::b::x() */\n\
                 fn f() -> &'static str { let _c = '\"'; \"crate::b::Y\" }\n"
                    .to_string(),
            ),
            ("b.rs".to_string(), b.to_string()),
            (
                "m/mod.rs".to_string(),
                "mod inner;\npub use inner::Item;\n".to_string(),
            ),
            ("m/inner.rs".to_string(), "pub struct Item;".to_string()),
        ]
        };
    // b → a through a path in code: a cycle a → m::inner is not one, a ↔ b is.
    let g = crate_graph(&files("fn g() { super::a::f(); }"), "lib.rs");
    assert_eq!(
        g["a"].keys().collect::<Vec<_>>(),
        ["m::inner"],
        "the re-export is followed; comments and strings are not read"
    );
    assert_eq!(g["b"].keys().collect::<Vec<_>>(), ["a"]);
    assert!(cycles(&g).is_empty());
    let g = crate_graph(
        &files("use crate::{a::f, m};\nmod tests { use super::super::a; }"),
        "lib.rs",
    );
    assert_eq!(g["b"].keys().collect::<Vec<_>>(), ["a", "m"]);
    // A real cycle: a → b → a.
    let mut fs = files("pub fn h() { crate::a::f(); }");
    fs[1].1 += "fn k() { super::b::h(); }";
    let c = cycles(&crate_graph(&fs, "lib.rs"));
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!(c[0].path[0].0, "a → b");
    assert_eq!(c[0].path[0].1, "a.rs:5");
}
