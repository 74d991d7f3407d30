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
}

impl NodeLoader for MemStore {
    fn load(&self, c: &Child, owner: u64, level: u8) -> Result<Arc<Node>> {
        let disk = self.disk.borrow();
        let buf = disk
            .get(&c.addr)
            .ok_or(Error::NoChunk { logical: c.addr })?;
        let n = Node::decode(buf, c.addr, &UUID, CsumType::Crc32c).map_err(|e| Error::BadNode {
            logical: c.addr,
            msg: e.0,
        })?;
        assert_eq!((n.gen, n.owner, n.level), (c.gen, owner, level));
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
    Range(u16, u16),
    Commit,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (any::<u16>(), 0u16..300).prop_map(|(k, l)| Op::Insert(k % 2000, l)),
        3 => any::<u16>().prop_map(|k| Op::Delete(k % 2000)),
        1 => (any::<u16>(), any::<u16>()).prop_map(|(a, b)| Op::Range(a % 2000, b % 2000)),
        1 => Just(Op::Commit),
        1 => Just(Op::Reopen),
    ]
}

fn key(k: u16) -> Key {
    Key::new(k as u64 % 7, (k % 3) as u8, k as u64)
}

fn run(node_bytes: usize, ops: &[Op]) {
    let mut s = MemStore {
        gen: 1,
        node_bytes,
        disk: RefCell::new(HashMap::new()),
        next: 0,
        live_allocs: HashSet::new(),
    };
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
