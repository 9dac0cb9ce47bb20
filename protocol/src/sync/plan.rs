//! Three-way reconciliation: given the last agreed state (the ancestor) and both sides'
//! manifests, decide what each side must do so they agree again, without losing a
//! version that only one side holds.
//!
//! Rules, path by path (`a` ancestor, `l` local, `w` workspace):
//! - `l == w`: agreed, nothing to do.
//! - `l == a`: only the workspace changed: apply `w` locally (and the other way round).
//! - both changed (a conflict):
//!   - one side deleted, the other changed: the changed version is kept on both sides;
//!   - one is a folder, the other not: the folder keeps the name;
//!   - otherwise the newer modification time keeps the name (a tie goes to the workspace).
//!
//!   The losing version is not lost: it is renamed on its side to
//!   `<stem>.conflict-<local|workspace>-<stamp><.ext>` beside the original, and reaches the
//!   other side on the next pass like any new file.
//! - A folder deleted on one side survives if anything inside it survives.

use super::{Node, same};
use std::collections::{BTreeMap, BTreeSet};

pub type Tree = BTreeMap<String, Node>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Side {
    Local,
    Workspace,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Local => Side::Workspace,
            Side::Workspace => Side::Local,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Side::Local => "local",
            Side::Workspace => "workspace",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Put this node at the path (replacing `expect`).
    Make(Node),
    /// Remove what is at the path.
    Remove,
    /// Move what is at the path to a conflict copy name.
    Rename(String),
}

/// One change to one side. `expect` is what that side held when it was scanned; the side
/// refuses the change if that is no longer so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub side: Side,
    pub path: String,
    pub expect: Option<Node>,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub path: String,
    /// The side whose version kept the name.
    pub kept: Side,
    /// Where the other version went, if it was kept as a copy (a deleted one was not).
    pub copy: Option<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Renames first, then removals (deepest first), then makes (parents first).
    pub steps: Vec<Step>,
    /// Paths both sides already agree on, with the node (None: absent on both).
    pub agreed: Vec<(String, Option<Node>)>,
    pub conflicts: Vec<Conflict>,
}

impl Plan {
    pub fn removals(&self, side: Side) -> usize {
        self.steps
            .iter()
            .filter(|s| s.side == side && s.action == Action::Remove)
            .count()
    }
}

fn mtime(node: Option<&Node>) -> i64 {
    match node {
        Some(Node::File(f)) => f.mtime_ns,
        _ => i64::MIN,
    }
}

/// `src/main.rs` -> `src/main.conflict-local-20261126-101500.rs`; numbered if taken.
pub fn conflict_name(path: &str, loser: Side, stamp: &str, taken: impl Fn(&str) -> bool) -> String {
    let (dir, name) = match path.rsplit_once('/') {
        Some((d, n)) => (format!("{d}/"), n),
        None => (String::new(), path),
    };
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => (&name[..i], &name[i..]),
        _ => (name, ""),
    };
    let label = loser.label();
    let mut n = 1;
    loop {
        let suffix = if n == 1 {
            String::new()
        } else {
            format!("-{n}")
        };
        let candidate = format!("{dir}{stem}.conflict-{label}-{stamp}{suffix}{ext}");
        if !taken(&candidate) {
            return candidate;
        }
        n += 1;
    }
}

/// Plans one pass. `stamp` names conflict copies (e.g. `20261126-101500`).
pub fn plan(ancestor: &Tree, local: &Tree, workspace: &Tree, stamp: &str) -> Plan {
    let paths: BTreeSet<&String> = ancestor
        .keys()
        .chain(local.keys())
        .chain(workspace.keys())
        .collect();
    let tree = |side: Side| match side {
        Side::Local => local,
        Side::Workspace => workspace,
    };
    let mut out = Plan::default();
    // The agreed result per path, and the copies to make (side, from).
    let mut target: BTreeMap<String, Option<Node>> = BTreeMap::new();
    let mut losers: Vec<(Side, String)> = Vec::new();
    for path in paths {
        let (a, l, w) = (ancestor.get(path), local.get(path), workspace.get(path));
        let result = if same(l, w) {
            out.agreed.push((path.clone(), l.cloned()));
            continue;
        } else if same(l, a) {
            w
        } else if same(w, a) {
            l
        } else {
            // Both changed.
            let winner = match (l, w) {
                (None, _) => Side::Workspace,
                (_, None) => Side::Local,
                (Some(Node::Dir), _) => Side::Local,
                (_, Some(Node::Dir)) => Side::Workspace,
                _ if mtime(l) > mtime(w) => Side::Local,
                _ => Side::Workspace,
            };
            let loser = winner.other();
            let copy = tree(loser).contains_key(path).then(|| {
                losers.push((loser, path.clone()));
                String::new()
            });
            out.conflicts.push(Conflict {
                path: path.clone(),
                kept: winner,
                copy,
            });
            tree(winner).get(path)
        };
        target.insert(path.clone(), result.cloned());
    }
    // Folders hold whatever survives inside them: a deleted folder comes back, and a file
    // or link in the way of a surviving entry becomes a conflict copy.
    let surviving: Vec<String> = target
        .iter()
        .filter(|(_, n)| n.is_some())
        .map(|(p, _)| p.clone())
        .collect();
    for path in surviving {
        let mut parent = super::parent(&path);
        while let Some(dir) = parent {
            let wanted = match target.get(dir) {
                Some(Some(Node::Dir)) => break,
                Some(_) => true,
                // Not planned: both sides agree on it (it must be a folder already, or
                // the child could not be there), unless it is agreed to be something else.
                None => !matches!(
                    (local.get(dir), workspace.get(dir)),
                    (Some(Node::Dir), Some(Node::Dir))
                ),
            };
            if wanted {
                for side in [Side::Local, Side::Workspace] {
                    if matches!(tree(side).get(dir), Some(n) if *n != Node::Dir)
                        && !losers.contains(&(side, dir.to_owned()))
                    {
                        losers.push((side, dir.to_owned()));
                        out.conflicts.push(Conflict {
                            path: dir.to_owned(),
                            kept: side.other(),
                            copy: Some(String::new()),
                        });
                    }
                }
                out.agreed.retain(|(p, _)| p != dir);
                target.insert(dir.to_owned(), Some(Node::Dir));
            }
            parent = super::parent(dir);
        }
    }
    // Name the copies now that every target is known.
    let mut renamed: BTreeMap<(Side, String), String> = BTreeMap::new();
    for (side, path) in &losers {
        let taken = |c: &str| {
            target.contains_key(c)
                || local.contains_key(c)
                || workspace.contains_key(c)
                || renamed.values().any(|v| v == c)
        };
        let name = conflict_name(path, *side, stamp, taken);
        renamed.insert((*side, path.clone()), name);
    }
    for c in &mut out.conflicts {
        if c.copy.is_some() {
            c.copy = renamed.get(&(c.kept.other(), c.path.clone())).cloned();
        }
    }
    let mut removes = Vec::new();
    let mut makes = Vec::new();
    for (path, want) in &target {
        for side in [Side::Local, Side::Workspace] {
            let mut have = tree(side).get(path).cloned();
            if let Some(copy) = renamed.get(&(side, path.clone())) {
                out.steps.push(Step {
                    side,
                    path: path.clone(),
                    expect: have.take(),
                    action: Action::Rename(copy.clone()),
                });
            }
            if same(have.as_ref(), want.as_ref()) {
                continue;
            }
            let step = |action| Step {
                side,
                path: path.clone(),
                expect: have.clone(),
                action,
            };
            match want {
                None => removes.push(step(Action::Remove)),
                Some(node) => makes.push(step(Action::Make(node.clone()))),
            }
        }
    }
    removes.reverse();
    out.steps.extend(removes);
    out.steps.extend(makes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::{FileMeta, Hash};

    fn file(content: u8, mtime_ns: i64) -> Node {
        Node::File(FileMeta {
            size: 1,
            mode: 0o644,
            mtime_ns,
            hash: Hash([content; 32]),
        })
    }

    fn tree(entries: &[(&str, Node)]) -> Tree {
        entries
            .iter()
            .map(|(p, n)| (p.to_string(), n.clone()))
            .collect()
    }

    fn steps(plan: &Plan) -> Vec<(Side, &str, String)> {
        plan.steps
            .iter()
            .map(|s| {
                let what = match &s.action {
                    Action::Make(Node::Dir) => "mkdir".to_owned(),
                    Action::Make(Node::File(f)) => format!("file {}", f.hash.0[0]),
                    Action::Make(Node::Symlink(t)) => format!("link {t}"),
                    Action::Remove => "remove".to_owned(),
                    Action::Rename(to) => format!("rename {to}"),
                };
                (s.side, s.path.as_str(), what)
            })
            .collect()
    }

    use Side::{Local as L, Workspace as W};

    #[test]
    fn one_sided_changes_flow_across() {
        let a = tree(&[("d", Node::Dir), ("d/x", file(1, 1)), ("gone", file(2, 1))]);
        let l = tree(&[
            ("d", Node::Dir),
            ("d/x", file(3, 2)),
            ("new", Node::Symlink("d/x".into())),
        ]);
        let w = tree(&[("d", Node::Dir), ("d/x", file(1, 1)), ("gone", file(2, 1))]);
        let p = plan(&a, &l, &w, "s");
        assert_eq!(
            steps(&p),
            vec![
                (W, "gone", "remove".into()),
                (W, "d/x", "file 3".into()),
                (W, "new", "link d/x".into()),
            ]
        );
        assert!(p.conflicts.is_empty());
        assert_eq!(p.removals(W), 1);
        // The workspace's expectations are what it held.
        assert_eq!(p.steps[1].expect, Some(file(1, 1)));
    }

    #[test]
    fn first_sync_merges_without_deleting() {
        let l = tree(&[("a", file(1, 1)), ("dir", Node::Dir)]);
        let w = tree(&[("b", file(2, 1)), ("dir", Node::Dir)]);
        let p = plan(&Tree::new(), &l, &w, "s");
        assert_eq!(
            steps(&p),
            vec![(W, "a", "file 1".into()), (L, "b", "file 2".into())]
        );
        assert_eq!(p.agreed, vec![("dir".to_owned(), Some(Node::Dir))]);
    }

    #[test]
    fn both_changed_keeps_both_versions() {
        let a = tree(&[("src", Node::Dir), ("src/m.rs", file(1, 1))]);
        let l = tree(&[("src", Node::Dir), ("src/m.rs", file(2, 5))]);
        let w = tree(&[("src", Node::Dir), ("src/m.rs", file(3, 9))]);
        let p = plan(&a, &l, &w, "S");
        // The workspace's version is newer: it keeps the name; the local one is moved.
        assert_eq!(
            steps(&p),
            vec![
                (L, "src/m.rs", "rename src/m.conflict-local-S.rs".into()),
                (L, "src/m.rs", "file 3".into()),
            ]
        );
        assert_eq!(p.steps[1].expect, None);
        assert_eq!(
            p.conflicts,
            vec![Conflict {
                path: "src/m.rs".into(),
                kept: W,
                copy: Some("src/m.conflict-local-S.rs".into())
            }]
        );
        // Newer local wins the other way round; a taken name gets a number.
        let l = tree(&[
            ("src", Node::Dir),
            ("src/m.rs", file(2, 10)),
            ("src/m.conflict-workspace-S.rs", file(4, 1)),
        ]);
        let p = plan(&a, &l, &w, "S");
        assert_eq!(
            steps(&p)[0],
            (
                W,
                "src/m.rs",
                "rename src/m.conflict-workspace-S-2.rs".into()
            )
        );
    }

    #[test]
    fn delete_against_change_keeps_the_change() {
        let a = tree(&[("f", file(1, 1))]);
        let l = Tree::new();
        let w = tree(&[("f", file(2, 2))]);
        let p = plan(&a, &l, &w, "S");
        assert_eq!(steps(&p), vec![(L, "f", "file 2".into())]);
        assert_eq!(p.conflicts[0].copy, None);
    }

    #[test]
    fn deleted_folder_survives_new_content() {
        let a = tree(&[("d", Node::Dir), ("d/old", file(1, 1))]);
        let l = Tree::new();
        let w = tree(&[
            ("d", Node::Dir),
            ("d/old", file(1, 1)),
            ("d/new", file(2, 1)),
        ]);
        let p = plan(&a, &l, &w, "S");
        assert_eq!(
            steps(&p),
            vec![
                (W, "d/old", "remove".into()),
                (L, "d", "mkdir".into()),
                (L, "d/new", "file 2".into()),
            ]
        );
    }

    #[test]
    fn file_in_the_way_of_a_folder_becomes_a_copy() {
        let a = tree(&[("x", Node::Dir)]);
        let l = tree(&[("x", file(1, 1))]);
        let w = tree(&[("x", Node::Dir), ("x/new", file(2, 1))]);
        let p = plan(&a, &l, &w, "S");
        assert_eq!(
            steps(&p),
            vec![
                (L, "x", "rename x.conflict-local-S".into()),
                (L, "x", "mkdir".into()),
                (L, "x/new", "file 2".into()),
            ]
        );
    }

    #[test]
    fn removals_go_deepest_first_and_mode_counts() {
        let a = tree(&[("d", Node::Dir), ("d/e", Node::Dir), ("d/e/f", file(1, 1))]);
        let l = a.clone();
        let p = plan(&a, &l, &Tree::new(), "S");
        assert_eq!(
            steps(&p),
            vec![
                (L, "d/e/f", "remove".into()),
                (L, "d/e", "remove".into()),
                (L, "d", "remove".into()),
            ]
        );
        let mut exec = file(1, 1);
        if let Node::File(f) = &mut exec {
            f.mode = 0o755;
        }
        let l = tree(&[("d", Node::Dir), ("d/e", Node::Dir), ("d/e/f", exec)]);
        let p = plan(&a, &l, &a, "S");
        assert_eq!(steps(&p), vec![(W, "d/e/f", "file 1".into())]);
    }
}
