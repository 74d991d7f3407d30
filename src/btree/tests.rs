//! Property test: the tree against a BTreeMap model through inserts,
//! deletes, range scans, commits and reopen, on several node sizes, with an
//! in-memory page store so only tree logic and the node codec are exercised.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};

use proptest::prelude::*;

use super::*;
use crate::format::csum::CsumType;
use crate::format::Key;
use crate::util::error::{Error, Result};
use crate::util::sync::Arc;

const UUID: [u8; 16] = [3; 16];

struct MemStore {
    gen: u64,
    node_bytes: usize,
    disk: RefCell<HashMap<u64, Vec<u8>>>,
    next: u64,
    live_allocs: HashSet<u64>,
    /// Reference counts of shared blocks (absent: 1).
    refs: HashMap<u64, u64>,
    /// Leaf items referring to each (key, value), as a volume tree's
    /// mapping items refer to data extents.
    item_refs: ItemRefs,
    /// Blocks read from "disk".
    loads: std::cell::Cell<usize>,
}

impl MemStore {
    fn new(node_bytes: usize) -> MemStore {
        MemStore {
            gen: 1,
            node_bytes,
            disk: RefCell::new(HashMap::new()),
            next: 0,
            live_allocs: HashSet::new(),
            refs: HashMap::new(),
            item_refs: BTreeMap::new(),
            loads: std::cell::Cell::new(0),
        }
    }
}

impl NodeLoader for MemStore {
    fn load(&self, c: &Child, owner: u64, level: u8) -> Result<Arc<Node>> {
        self.loads.set(self.loads.get() + 1);
        let disk = self.disk.borrow();
        let buf = disk
            .get(&c.addr)
            .ok_or(Error::NoChunk { logical: c.addr })?;
        let n = Node::decode(buf, c.addr, &UUID, CsumType::Crc32c).map_err(|e| Error::BadNode {
            logical: c.addr,
            msg: e.0,
        })?;
        assert_eq!((n.gen, n.level), (c.gen, level));
        // Blocks shared between trees keep the owner that wrote them.
        assert!(n.owner == owner || (owner >= 256 && n.owner >= 256));
        Ok(Arc::new(n))
    }
}

impl NodeStore for MemStore {
    fn gen(&self) -> u64 {
        self.gen
    }
    fn node_bytes(&self) -> usize {
        self.node_bytes
    }
    fn alloc_node(&mut self, _owner: u64, _level: u8) -> Result<u64> {
        self.next += self.node_bytes as u64;
        assert!(self.live_allocs.insert(self.next));
        Ok(self.next)
    }
    fn free_node(&mut self, node: &Node) {
        assert!(
            self.live_allocs.remove(&node.addr),
            "double free {:#x}",
            node.addr
        );
        assert!(
            self.refs.remove(&node.addr).unwrap_or(1) == 1,
            "freed shared block {:#x}",
            node.addr
        );
    }
    fn node_refs(&mut self, node: &Node) -> Result<u64> {
        assert!(self.live_allocs.contains(&node.addr));
        Ok(self.refs.get(&node.addr).copied().unwrap_or(1))
    }
    fn add_node_ref(&mut self, addr: u64, _level: u8, delta: i64) -> Result<()> {
        assert!(
            self.live_allocs.contains(&addr),
            "{addr:#x} is not allocated"
        );
        let r = self.refs.entry(addr).or_insert(1);
        *r = (*r as i64 + delta) as u64;
        assert!(*r >= 1, "{addr:#x} fell to {r} references");
        Ok(())
    }
    fn add_item_refs(&mut self, leaf: &Node, delta: i64) -> Result<()> {
        for (k, v) in leaf.leaf_items() {
            *self.item_refs.entry((*k, v.to_vec())).or_default() += delta;
        }
        Ok(())
    }
}

impl MemStore {
    fn write(&self, n: &Arc<Node>) -> Arc<Node> {
        if n.gen != self.gen {
            return n.clone();
        }
        let mut c = (**n).clone();
        if let Body::Internal(ch) = &mut c.body {
            for x in ch.iter_mut() {
                if let Some(child) = x.node.take() {
                    let w = self.write(&child);
                    x.addr = w.addr;
                    x.gen = w.gen;
                }
            }
        }
        self.disk
            .borrow_mut()
            .insert(c.addr, c.encode(&UUID, self.node_bytes, CsumType::Crc32c));
        Arc::new(c)
    }
    fn commit(&mut self, root: &Arc<Node>) -> Arc<Node> {
        let r = self.write(root);
        self.gen += 1;
        r
    }
}

#[derive(Debug, Clone)]
enum Op {
    Insert(u16, u16),
    Delete(u16),
    DeleteExpected(u16),
    Range(u16, u16),
    Commit,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (any::<u16>(), 0u16..300).prop_map(|(k, l)| Op::Insert(k % 2000, l)),
        3 => any::<u16>().prop_map(|k| Op::Delete(k % 2000)),
        2 => any::<u16>().prop_map(|k| Op::DeleteExpected(k % 2000)),
        1 => (any::<u16>(), any::<u16>()).prop_map(|(a, b)| Op::Range(a % 2000, b % 2000)),
        1 => Just(Op::Commit),
        1 => Just(Op::Reopen),
    ]
}

fn key(k: u16) -> Key {
    Key::new(k as u64 % 7, (k % 3) as u8, k as u64)
}

fn run(node_bytes: usize, ops: &[Op]) {
    let mut s = MemStore::new(node_bytes);
    let addr = s.alloc_node(9, 0).unwrap();
    let mut root = Arc::new(Node::new_leaf(addr, 1, 9));
    let mut model: BTreeMap<Key, Vec<u8>> = BTreeMap::new();
    let mut committed: (Arc<Node>, BTreeMap<Key, Vec<u8>>) = (s.commit(&root), model.clone());
    root = committed.0.clone();
    for o in ops {
        match *o {
            Op::Insert(k, l) => {
                let v: Vec<u8> = (0..l).map(|i| (i as u8).wrapping_add(k as u8)).collect();
                insert(&mut s, &mut root, key(k), v.clone()).unwrap();
                model.insert(key(k), v);
            }
            Op::Delete(k) => {
                let had = delete(&mut s, &mut root, &key(k)).unwrap();
                assert_eq!(had, model.remove(&key(k)).is_some());
            }
            // Also for missing keys: it must then change nothing.
            Op::DeleteExpected(k) => {
                let had = delete_expected(&mut s, &mut root, &key(k)).unwrap();
                assert_eq!(had, model.remove(&key(k)).is_some());
            }
            Op::Range(a, b) => {
                let (lo, hi) = (
                    key(a.min(b)).min(key(a.max(b))),
                    key(a.min(b)).max(key(a.max(b))),
                );
                let got: Vec<(Key, Vec<u8>)> = Iter::new(&s, &root, lo, hi)
                    .map(|r| r.map(|(k, v)| (k, v.to_vec())))
                    .collect::<Result<_>>()
                    .unwrap();
                let want: Vec<(Key, Vec<u8>)> =
                    model.range(lo..=hi).map(|(k, v)| (*k, v.clone())).collect();
                assert_eq!(got, want);
                // The predecessor seek agrees with the model at both ends.
                for at in [lo, hi] {
                    let want = model.range(..=at).next_back().map(|(k, _)| *k);
                    assert_eq!(last_at_or_before(&s, &root, &at).unwrap(), want);
                }
            }
            Op::Commit => {
                root = s.commit(&root);
                committed = (root.clone(), model.clone());
            }
            Op::Reopen => {
                // Uncommitted changes vanish; the committed tree reads back from "disk".
                let c = Child {
                    key: Key::MIN,
                    addr: committed.0.addr,
                    gen: committed.0.gen,
                    node: None,
                };
                root = s.load(&c, 9, committed.0.level).unwrap();
                model = committed.1.clone();
                // Blocks allocated since the commit were never written; forget them.
                s.gen += 1;
                let mut live = HashSet::new();
                collect(&s, &root, &mut live);
                s.live_allocs = live;
            }
        }
        for (k, v) in model.iter().take(3) {
            assert_eq!(get(&s, &root, k).unwrap().as_ref(), Some(v));
        }
    }
    let all: Vec<(Key, Vec<u8>)> = Iter::new(&s, &root, Key::MIN, Key::MAX)
        .map(|r| r.map(|(k, v)| (k, v.to_vec())))
        .collect::<Result<_>>()
        .unwrap();
    assert_eq!(all, model.into_iter().collect::<Vec<_>>());
    // Every reachable block is allocated exactly once, and nothing else is.
    let mut live = HashSet::new();
    collect(&s, &root, &mut live);
    assert_eq!(live, s.live_allocs);
}

fn collect(s: &MemStore, n: &Arc<Node>, out: &mut HashSet<u64>) {
    assert!(out.insert(n.addr));
    for (i, c) in n.children().iter().enumerate() {
        let child = match &c.node {
            Some(x) => x.clone(),
            None => s.load(c, n.owner, n.level - 1).unwrap(),
        };
        assert_eq!(child.first_key(), Some(c.key), "child {i} key");
        collect(s, &child, out);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn btree_matches_model_4k(ops in proptest::collection::vec(op(), 1..1500)) {
        run(4096, &ops);
    }
    #[test]
    fn btree_matches_model_16k(ops in proptest::collection::vec(op(), 1..1500)) {
        run(16384, &ops);
    }
}

#[test]
fn btree_deep_sequential_then_drain() {
    let ops: Vec<Op> = (0..1999u16)
        .map(|k| Op::Insert(k, 200))
        .chain([Op::Commit])
        .chain((0..1999u16).step_by(2).map(Op::Delete))
        .chain([Op::Commit, Op::Reopen])
        .chain((1..1999u16).step_by(2).map(Op::Delete))
        .collect();
    run(4096, &ops);
}

/// Leaf items referring to each (key, value).
type ItemRefs = BTreeMap<(Key, Vec<u8>), i64>;
/// A tree's root and the model of its content.
type Tree = (Arc<Node>, BTreeMap<Key, Vec<u8>>);

/// Operations on a forest of trees that share blocks through snapshots.
#[derive(Debug, Clone)]
enum SnapOp {
    Insert(u8, u16, u16),
    Delete(u8, u16),
    Snapshot(u8),
    Drop(u8),
    Commit,
}

fn snap_op() -> impl Strategy<Value = SnapOp> {
    prop_oneof![
        8 => (any::<u8>(), any::<u16>(), 0u16..200).prop_map(|(t, k, l)| SnapOp::Insert(t, k % 1500, l)),
        4 => (any::<u8>(), any::<u16>()).prop_map(|(t, k)| SnapOp::Delete(t, k % 1500)),
        1 => any::<u8>().prop_map(SnapOp::Snapshot),
        1 => any::<u8>().prop_map(SnapOp::Drop),
        1 => Just(SnapOp::Commit),
    ]
}

/// Walk every tree: each block once, counting who points at it, and each
/// leaf's items once.
fn census(s: &MemStore, roots: &[Arc<Node>]) -> (HashMap<u64, u64>, ItemRefs) {
    let mut seen: HashMap<u64, u64> = HashMap::new();
    let mut items = ItemRefs::new();
    let mut stack: Vec<Arc<Node>> = roots.to_vec();
    while let Some(n) = stack.pop() {
        let c = seen.entry(n.addr).or_default();
        *c += 1;
        if *c > 1 {
            continue;
        }
        for (k, v) in n.leaf_items() {
            *items.entry((*k, v.to_vec())).or_default() += 1;
        }
        for c in n.children() {
            let child = match &c.node {
                Some(x) => x.clone(),
                None => s.load(c, n.owner, n.level - 1).unwrap(),
            };
            stack.push(child);
        }
    }
    (seen, items)
}

/// The diff of every pair of trees is exactly what their models say differs.
fn assert_pairwise_diffs(s: &MemStore, trees: &[Tree]) {
    for (i, (ra, ma)) in trees.iter().enumerate() {
        for (rb, mb) in trees.iter().skip(i) {
            let (da, db) = diff(s, ra, rb).unwrap();
            let only = |x: &BTreeMap<Key, Vec<u8>>, y: &BTreeMap<Key, Vec<u8>>| {
                x.iter()
                    .filter(|(k, v)| y.get(*k) != Some(*v))
                    .map(|(k, v)| (*k, v.clone()))
                    .collect::<Vec<_>>()
            };
            let got = |d: Vec<(Key, Value)>| {
                d.into_iter()
                    .map(|(k, v)| (k, v.to_vec()))
                    .collect::<Vec<_>>()
            };
            assert_eq!(got(da), only(ma, mb));
            assert_eq!(got(db), only(mb, ma));
        }
    }
}

fn run_snapshots(node_bytes: usize, ops: &[SnapOp]) {
    let mut s = MemStore::new(node_bytes);
    let addr = s.alloc_node(256, 0).unwrap();
    let mut trees: Vec<Tree> = vec![(Arc::new(Node::new_leaf(addr, 1, 256)), BTreeMap::new())];
    let mut next_owner = 257;
    let commit = |s: &mut MemStore, trees: &mut Vec<Tree>| {
        for (r, _) in trees.iter_mut() {
            *r = s.write(r);
        }
        s.gen += 1;
    };
    for o in ops {
        let n = trees.len();
        match *o {
            SnapOp::Insert(t, k, l) if n > 0 => {
                let (root, model) = &mut trees[t as usize % n];
                let v: Vec<u8> = (0..l).map(|i| (i as u8) ^ (k as u8)).collect();
                insert(&mut s, root, key(k), v.clone()).unwrap();
                // What the caller does for a mapping item: the new value
                // is referred to, the one it replaced no longer.
                *s.item_refs.entry((key(k), v.clone())).or_default() += 1;
                if let Some(old) = model.insert(key(k), v) {
                    *s.item_refs.entry((key(k), old)).or_default() -= 1;
                }
            }
            SnapOp::Delete(t, k) if n > 0 => {
                let (root, model) = &mut trees[t as usize % n];
                let had = delete(&mut s, root, &key(k)).unwrap();
                let old = model.remove(&key(k));
                assert_eq!(had, old.is_some());
                if let Some(old) = old {
                    *s.item_refs.entry((key(k), old)).or_default() -= 1;
                }
            }
            SnapOp::Snapshot(t) if n > 0 && n < 12 => {
                commit(&mut s, &mut trees);
                let (root, model) = trees[t as usize % n].clone();
                let snap = snapshot_root(&mut s, &root, next_owner).unwrap();
                next_owner += 1;
                trees.push((snap, model));
            }
            // Keep one tree to work on; the end drops every tree.
            SnapOp::Drop(t) if n > 1 => {
                let (mut root, _) = trees.remove(t as usize % n);
                // Odd trees in steps, committed between them (a deletion
                // in the background), even ones at once.
                if t % 2 == 1 {
                    let budget = 1 + t as u64 % 7;
                    while !drop_some(&mut s, &mut root, budget).unwrap() {
                        root = s.write(&root);
                        commit(&mut s, &mut trees);
                        // Every other tree is still whole and readable.
                        for (r, m) in &trees {
                            if let Some((k, v)) = m.iter().next() {
                                assert_eq!(get(&s, r, k).unwrap().as_ref(), Some(v));
                            }
                        }
                    }
                }
                drop_tree(&mut s, root).unwrap();
            }
            SnapOp::Commit => commit(&mut s, &mut trees),
            _ => {}
        }
    }
    for (root, model) in &trees {
        let all: Vec<(Key, Vec<u8>)> = Iter::new(&s, root, Key::MIN, Key::MAX)
            .map(|r| r.map(|(k, v)| (k, v.to_vec())))
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(all, model.clone().into_iter().collect::<Vec<_>>());
    }
    assert_pairwise_diffs(&s, &trees);
    // Reference counts equal the referrers, exactly; nothing leaks.
    let roots: Vec<Arc<Node>> = trees.iter().map(|(r, _)| r.clone()).collect();
    let (seen, items) = census(&s, &roots);
    assert_eq!(
        seen.keys().copied().collect::<HashSet<u64>>(),
        s.live_allocs
    );
    for (addr, n) in &seen {
        assert_eq!(
            s.refs.get(addr).copied().unwrap_or(1),
            *n,
            "block {addr:#x}"
        );
    }
    s.item_refs.retain(|_, v| *v != 0);
    assert_eq!(s.item_refs, items);
    // Dropping every tree frees everything.
    for (root, _) in trees {
        drop_tree(&mut s, root).unwrap();
    }
    assert!(
        s.live_allocs.is_empty(),
        "{} blocks leaked",
        s.live_allocs.len()
    );
    s.item_refs.retain(|_, v| *v != 0);
    assert!(
        s.item_refs.is_empty(),
        "item references left: {:?}",
        s.item_refs.len()
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
    #[test]
    fn snapshots_share_blocks_with_exact_counts_4k(ops in proptest::collection::vec(snap_op(), 1..1200)) {
        run_snapshots(4096, &ops);
    }
    /// Small nodes: trees three and four levels deep, so shared internal
    /// blocks are copied too.
    #[test]
    fn snapshots_share_blocks_with_exact_counts_1k(ops in proptest::collection::vec(snap_op(), 1..1200)) {
        run_snapshots(1024, &ops);
    }
}

#[test]
fn snapshot_of_a_deep_tree_costs_one_block() {
    let mut s = MemStore::new(4096);
    let addr = s.alloc_node(256, 0).unwrap();
    let mut root = Arc::new(Node::new_leaf(addr, 1, 256));
    for k in 0..1500u16 {
        insert(&mut s, &mut root, key(k), vec![k as u8; 400]).unwrap();
        *s.item_refs.entry((key(k), vec![k as u8; 400])).or_default() += 1;
    }
    root = s.write(&root);
    s.gen += 1;
    assert!(root.level >= 2);
    let before = s.live_allocs.len();
    let snap = snapshot_root(&mut s, &root, 257).unwrap();
    assert_eq!(s.live_allocs.len(), before + 1);
    // One change to the source copies one path, not the tree.
    insert(&mut s, &mut root, key(7), vec![1; 10]).unwrap();
    let grew = s.live_allocs.len() - before;
    assert!(
        grew <= 2 + root.level as usize,
        "grew by {grew} blocks at level {}",
        root.level
    );
    assert_eq!(get(&s, &snap, &key(7)).unwrap(), Some(vec![7u8; 400]));
    // The diff reads the changed path only, not the tree.
    let loads = s.loads.get();
    let (a, b) = diff(&s, &snap, &root).unwrap();
    assert_eq!((a.len(), b.len()), (1, 1));
    let read = s.loads.get() - loads;
    assert!(
        read <= 2 * (root.level as usize + 1),
        "diff loaded {read} blocks"
    );
}
