//! Tree algorithms over a [`NodeStore`].

use super::node::{Body, Child, Node, Value, CHILD_BYTES, LEAF_ITEM_OVERHEAD};
use crate::format::{Key, NODE_HEADER_BYTES};
use crate::util::error::{Error, Result};
use crate::util::sync::Arc;

/// Loads children that are not in memory.
pub trait NodeLoader {
    /// Load `child` of a node owned by `owner` at level `level + 1`, checking
    /// that what comes back is the block the parent expects.
    fn load(&self, child: &Child, owner: u64, level: u8) -> Result<Arc<Node>>;
}

/// What the tree needs from a transaction.
pub trait NodeStore: NodeLoader {
    /// The running transaction's generation.
    fn gen(&self) -> u64;
    fn node_bytes(&self) -> usize;
    /// A fresh address for a tree block.
    fn alloc_node(&mut self, owner: u64, level: u8) -> Result<u64>;
    /// Nothing references `node` any more: its space goes back.
    fn free_node(&mut self, node: &Node);
    /// How many tree blocks (or roots) point at `node`: 1 unless a
    /// snapshot shares it. A block of the running transaction is never
    /// shared.
    fn node_refs(&mut self, node: &Node) -> Result<u64>;
    /// Add `delta` to the reference count of the block at `addr`; the
    /// count stays at least 1 (the last reference goes with `free_node`).
    fn add_node_ref(&mut self, addr: u64, level: u8, delta: i64) -> Result<()>;
    /// Each item of `leaf` gained (`delta` 1) or lost (-1) a leaf that
    /// refers to what it refers to (data, for a volume's tree).
    fn add_item_refs(&mut self, leaf: &Node, delta: i64) -> Result<()>;
}

/// `node`'s content now lives in another block (a copy, a merge, a move):
/// let go of it. A block only this tree reaches is freed and what it
/// referenced passes to the copy. A shared block stays for its other
/// referrers, so the copy takes a reference of its own to everything the
/// block points at (Rodeh's lazy reference counting, as btrfs does).
fn release_copied(s: &mut dyn NodeStore, node: &Node) -> Result<()> {
    if node.gen == s.gen() || s.node_refs(node)? <= 1 {
        s.free_node(node);
        return Ok(());
    }
    for c in node.children() {
        s.add_node_ref(c.addr, node.level - 1, 1)?;
    }
    if node.level == 0 {
        s.add_item_refs(node, 1)?;
    }
    s.add_node_ref(node.addr, node.level, -1)
}

fn capacity(node_bytes: usize) -> usize {
    node_bytes - NODE_HEADER_BYTES
}

/// Largest value one leaf item may hold for this node size.
pub fn max_item_bytes(node_bytes: usize) -> usize {
    capacity(node_bytes) / 2 - LEAF_ITEM_OVERHEAD
}

fn load_child(l: &dyn NodeLoader, parent: &Node, idx: usize) -> Result<Arc<Node>> {
    let c = &parent.children()[idx];
    if let Some(n) = &c.node {
        return Ok(n.clone());
    }
    l.load(c, parent.owner, parent.level - 1)
}

/// The child at `idx`, taken out of its slot so that the caller holds the
/// only reference and changing it in this transaction copies nothing (an
/// `Arc` shared with the slot would be copied on every change). The caller
/// puts it back with [`child_of`].
fn take_child(l: &dyn NodeLoader, parent: &mut Node, idx: usize) -> Result<Arc<Node>> {
    let (owner, level) = (parent.owner, parent.level);
    let Body::Internal(ch) = &mut parent.body else {
        unreachable!("take_child on a leaf")
    };
    match ch[idx].node.take() {
        Some(n) => Ok(n),
        None => l.load(&ch[idx], owner, level - 1),
    }
}

fn child_index(children: &[Child], key: &Key) -> usize {
    children
        .partition_point(|c| c.key <= *key)
        .saturating_sub(1)
}

/// Make `node` writable in the running transaction, copying it to a new
/// address if it belongs to an earlier one.
fn cow<'a>(s: &mut dyn NodeStore, node: &'a mut Arc<Node>) -> Result<&'a mut Node> {
    if node.gen != s.gen() {
        let addr = s.alloc_node(node.owner, node.level)?;
        release_copied(s, node)?;
        let mut n = (**node).clone();
        n.addr = addr;
        n.gen = s.gen();
        *node = Arc::new(n);
    }
    Ok(Arc::make_mut(node))
}

fn child_of(n: Arc<Node>) -> Child {
    Child {
        key: n.first_key().unwrap_or_default(),
        addr: n.addr,
        gen: n.gen,
        node: Some(n),
    }
}

/// Move every node of the tree whose address lies in [start, end) to a
/// fresh address (relocation of a metadata block group, which is read-only so
/// that the new addresses land elsewhere). Only internal nodes and the leaves
/// inside the range are loaded. Returns how many nodes moved.
pub fn relocate(s: &mut dyn NodeStore, root: &mut Arc<Node>, start: u64, end: u64) -> Result<u64> {
    let mut moved = 0;
    reloc(s, root, start, end, &mut moved)?;
    Ok(moved)
}

fn reloc(
    s: &mut dyn NodeStore,
    node: &mut Arc<Node>,
    start: u64,
    end: u64,
    moved: &mut u64,
) -> Result<bool> {
    let inside = |a: u64| a >= start && a < end;
    let mut changed = false;
    if inside(node.addr) {
        // Even a node of the running transaction moves: its address is in
        // the group being emptied.
        let addr = s.alloc_node(node.owner, node.level)?;
        debug_assert!(
            !inside(addr),
            "relocated node {addr:#x} back into the group"
        );
        release_copied(s, node)?;
        let gen = s.gen();
        let n = Arc::make_mut(node);
        n.addr = addr;
        n.gen = gen;
        *moved += 1;
        changed = true;
    }
    if node.level == 0 {
        return Ok(changed);
    }
    for i in 0..node.children().len() {
        if node.level == 1 && !inside(node.children()[i].addr) {
            continue;
        }
        let mut child = load_child(s, node, i)?;
        if reloc(s, &mut child, start, end, moved)? {
            let n = cow(s, node)?;
            let Body::Internal(ch) = &mut n.body else {
                unreachable!()
            };
            ch[i] = child_of(child);
            changed = true;
        }
    }
    Ok(changed)
}

/// Drop a tree (a deleted volume's): every block only it references is
/// freed, with what its items reference; a block shared with another tree
/// loses one reference and its subtree is not visited. Returns how many
/// blocks were freed.
pub fn drop_tree(s: &mut dyn NodeStore, root: Arc<Node>) -> Result<u64> {
    let mut stack = vec![root];
    let mut freed = 0;
    while let Some(n) = stack.pop() {
        if n.gen != s.gen() && s.node_refs(&n)? > 1 {
            s.add_node_ref(n.addr, n.level, -1)?;
            continue;
        }
        for i in 0..n.children().len() {
            stack.push(load_child(s, &n, i)?);
        }
        if n.level == 0 {
            s.add_item_refs(&n, -1)?;
        }
        s.free_node(&n);
        freed += 1;
    }
    Ok(freed)
}

/// Drop part of a tree that is being deleted, from its left end: up to
/// `budget` blocks are freed or let go (a shared block costs one), the
/// rest stays a valid tree (path-copied like any change), so the work can
/// be committed step by step and resumed after a crash. Returns whether the
/// tree is now empty (its root an empty leaf or childless node, for
/// [`drop_tree`] to free).
pub fn drop_some(s: &mut dyn NodeStore, root: &mut Arc<Node>, budget: u64) -> Result<bool> {
    let mut left = budget.max(1);
    drop_left(s, root, &mut left)?;
    Ok(root.is_empty())
}

fn drop_left(s: &mut dyn NodeStore, node: &mut Arc<Node>, left: &mut u64) -> Result<()> {
    if node.level == 0 {
        if !node.is_empty() {
            // Its items lose this leaf's reference; the leaf stays, empty.
            let n = cow(s, node)?;
            s.add_item_refs(n, -1)?;
            n.body = Body::Leaf(Vec::new());
            *left = left.saturating_sub(1);
        }
        return Ok(());
    }
    let n = cow(s, node)?;
    while *left > 0 && !n.children().is_empty() {
        let mut child = take_child(s, n, 0)?;
        if child.gen != s.gen() && s.node_refs(&child)? > 1 {
            // Shared: one reference less, nothing below it is visited.
            s.add_node_ref(child.addr, child.level, -1)?;
            *left -= 1;
        } else if child.level == 0 {
            // Only this tree reaches it: its items let go, then the block.
            s.add_item_refs(&child, -1)?;
            s.free_node(&child);
            *left = left.saturating_sub(1 + child.len() as u64 / 8);
        } else {
            drop_left(s, &mut child, left)?;
            if !child.is_empty() {
                let Body::Internal(ch) = &mut n.body else {
                    unreachable!()
                };
                ch[0] = child_of(child);
                break;
            }
            s.free_node(&child);
            *left = left.saturating_sub(1);
        }
        let Body::Internal(ch) = &mut n.body else {
            unreachable!()
        };
        ch.remove(0);
    }
    Ok(())
}

/// A new root for a snapshot of the tree at `root`: a copy of the root
/// block at `addr`, owned by `owner`, sharing everything below it. The cost
/// is one block whatever the tree's size. `root` must be committed (not of
/// the running transaction), so that nothing it shares is changed in place.
pub fn snapshot_root(s: &mut dyn NodeStore, root: &Arc<Node>, owner: u64) -> Result<Arc<Node>> {
    assert_ne!(root.gen, s.gen(), "a snapshot shares only committed blocks");
    let addr = s.alloc_node(owner, root.level)?;
    for c in root.children() {
        s.add_node_ref(c.addr, root.level - 1, 1)?;
    }
    if root.level == 0 {
        s.add_item_refs(root, 1)?;
    }
    let mut n = (**root).clone();
    n.addr = addr;
    n.gen = s.gen();
    n.owner = owner;
    if let Body::Internal(ch) = &mut n.body {
        for c in ch.iter_mut() {
            c.node = None;
        }
    }
    Ok(Arc::new(n))
}

/// Look a key up.
pub fn get(l: &dyn NodeLoader, root: &Arc<Node>, key: &Key) -> Result<Option<Vec<u8>>> {
    Ok(get_value(l, root, key)?.map(|v| v.to_vec()))
}

/// Whether `key` is in the tree (a [`get`] that copies nothing out).
pub fn contains(l: &dyn NodeLoader, root: &Arc<Node>, key: &Key) -> Result<bool> {
    Ok(get_value(l, root, key)?.is_some())
}

/// The shared value stored under `key`.
fn get_value(l: &dyn NodeLoader, root: &Arc<Node>, key: &Key) -> Result<Option<Value>> {
    let mut node = root.clone();
    loop {
        match &node.body {
            Body::Leaf(items) => {
                return Ok(items
                    .binary_search_by(|(k, _)| k.cmp(key))
                    .ok()
                    .map(|i| items[i].1.clone()))
            }
            Body::Internal(ch) => {
                let i = child_index(ch, key);
                node = load_child(l, &node, i)?;
            }
        }
    }
}

/// The greatest key <= `key`, if any: where a forward scan for items that
/// may extend over `key` (extents keyed by their start) begins, in
/// O(log n) rather than a scan back over the longest possible item.
pub fn last_at_or_before(l: &dyn NodeLoader, root: &Arc<Node>, key: &Key) -> Result<Option<Key>> {
    match &root.body {
        Body::Leaf(items) => {
            let i = items.partition_point(|(k, _)| k <= key);
            Ok(i.checked_sub(1).map(|i| items[i].0))
        }
        Body::Internal(ch) => {
            // Slot keys equal their child's first key (`child_of` refreshes
            // them on every change), so the routed child holds the answer.
            // Stepping back a child keeps the answer right for a tree whose
            // slot keys are merely lower bounds, as a B-tree only requires.
            let mut i = ch.partition_point(|c| c.key <= *key);
            while i > 0 {
                i -= 1;
                let c = load_child(l, root, i)?;
                if let Some(k) = last_at_or_before(l, &c, key)? {
                    return Ok(Some(k));
                }
            }
            Ok(None)
        }
    }
}

/// Insert or replace.
pub fn insert(
    s: &mut dyn NodeStore,
    root: &mut Arc<Node>,
    key: Key,
    val: impl Into<Value>,
) -> Result<()> {
    let val: Value = val.into();
    let max = max_item_bytes(s.node_bytes());
    if val.len() > max {
        return Err(Error::Invalid(format!(
            "item {key} of {} bytes exceeds the {max}-byte limit",
            val.len()
        )));
    }
    if let Some(right) = ins(s, root, key, val)? {
        let level = root.level + 1;
        let addr = s.alloc_node(root.owner, level)?;
        let left = root.clone();
        *root = Arc::new(Node {
            addr,
            gen: s.gen(),
            owner: left.owner,
            level,
            body: Body::Internal(vec![child_of(left), child_of(right)]),
        });
    }
    Ok(())
}

fn ins(
    s: &mut dyn NodeStore,
    node: &mut Arc<Node>,
    key: Key,
    val: Value,
) -> Result<Option<Arc<Node>>> {
    let cap = capacity(s.node_bytes());
    let gen = s.gen();
    let n = cow(s, node)?;
    match &mut n.body {
        Body::Leaf(items) => {
            let grew = match items.binary_search_by(|(k, _)| k.cmp(&key)) {
                Ok(i) => {
                    let grew = val.len() > items[i].1.len();
                    items[i].1 = val;
                    grew
                }
                Err(i) => {
                    items.insert(i, (key, val));
                    true
                }
            };
            // A leaf that did not grow still fits (every node fits when
            // its change begins).
            debug_assert!(grew || n.body_bytes() <= cap, "leaf over capacity");
            if !grew || n.body_bytes() <= cap {
                return Ok(None);
            }
            let Body::Leaf(items) = &mut n.body else {
                unreachable!()
            };
            let at = leaf_split_point(items, cap);
            let right = items.split_off(at);
            let addr = s.alloc_node(n.owner, 0)?;
            Ok(Some(Arc::new(Node {
                addr,
                gen,
                owner: n.owner,
                level: 0,
                body: Body::Leaf(right),
            })))
        }
        Body::Internal(_) => {
            let idx = child_index(n.children(), &key);
            let mut child = take_child(s, n, idx)?;
            let split = ins(s, &mut child, key, val);
            let Body::Internal(ch) = &mut n.body else {
                unreachable!()
            };
            ch[idx] = child_of(child);
            if let Some(r) = split? {
                ch.insert(idx + 1, child_of(r));
            }
            if ch.len() * CHILD_BYTES <= cap {
                return Ok(None);
            }
            let right = ch.split_off(ch.len() / 2);
            let addr = s.alloc_node(n.owner, n.level)?;
            Ok(Some(Arc::new(Node {
                addr,
                gen,
                owner: n.owner,
                level: n.level,
                body: Body::Internal(right),
            })))
        }
    }
}

/// Split index that keeps both halves within capacity, as even as possible.
fn leaf_split_point(items: &[(Key, Value)], cap: usize) -> usize {
    let sizes: Vec<usize> = items
        .iter()
        .map(|(_, d)| LEAF_ITEM_OVERHEAD + d.len())
        .collect();
    let total: usize = sizes.iter().sum();
    let mut best = (usize::MAX, 1);
    let mut left = 0;
    for (i, sz) in sizes.iter().enumerate().take(sizes.len() - 1) {
        left += sz;
        let worst = left.max(total - left);
        if worst < best.0 {
            best = (worst, i + 1);
        }
    }
    debug_assert!(best.0 <= cap, "leaf cannot be split within capacity");
    best.1
}

/// Delete a key; returns whether it was present.
pub fn delete(s: &mut dyn NodeStore, root: &mut Arc<Node>, key: &Key) -> Result<bool> {
    // Looked up first so that deleting a missing key copies nothing.
    if !contains(s, root, key)? {
        return Ok(false);
    }
    delete_expected(s, root, key)
}

/// Delete a key the caller has just seen, or that an invariant says is
/// there: one descent instead of two. A missing key still copies the path
/// to where it would be (harmless, wasted); returns whether it was present.
pub fn delete_expected(s: &mut dyn NodeStore, root: &mut Arc<Node>, key: &Key) -> Result<bool> {
    let found = del(s, root, key)?;
    // Shrink the root while it is an internal node with one child.
    loop {
        match &root.body {
            Body::Internal(ch) if ch.len() == 1 => {
                let child = load_child(s, root, 0)?;
                s.free_node(root);
                *root = child;
            }
            Body::Internal(ch) if ch.is_empty() => {
                // A fresh leaf rather than a level change, so the block's
                // extent item (keyed by level) stays true.
                let addr = s.alloc_node(root.owner, 0)?;
                s.free_node(root);
                *root = Arc::new(Node::new_leaf(addr, s.gen(), root.owner));
            }
            _ => break,
        }
    }
    Ok(found)
}

fn del(s: &mut dyn NodeStore, node: &mut Arc<Node>, key: &Key) -> Result<bool> {
    let cap = capacity(s.node_bytes());
    let n = cow(s, node)?;
    if let Body::Leaf(items) = &mut n.body {
        let at = items.binary_search_by(|(k, _)| k.cmp(key));
        if let Ok(i) = at {
            items.remove(i);
        }
        return Ok(at.is_ok());
    }
    let idx = child_index(n.children(), key);
    let mut child = take_child(s, n, idx)?;
    let r = del(s, &mut child, key);
    let Body::Internal(ch) = &mut n.body else {
        unreachable!()
    };
    if r.is_ok() && child.is_empty() {
        s.free_node(&child);
        ch.remove(idx);
        return r;
    }
    let underfull = child.body_bytes_below(cap / 4);
    ch[idx] = child_of(child);
    let found = r?;
    if underfull && n.len() > 1 {
        let (l, r) = if idx + 1 < n.len() {
            (idx, idx + 1)
        } else {
            (idx - 1, idx)
        };
        try_merge(s, n, l, r, cap)?;
    }
    Ok(found)
}

/// Merge child `r` into child `l` when the result fits in one node.
fn try_merge(s: &mut dyn NodeStore, n: &mut Node, l: usize, r: usize, cap: usize) -> Result<()> {
    let right = load_child(s, n, r)?;
    if load_child(s, n, l)?.body_bytes() + right.body_bytes() > cap {
        return Ok(());
    }
    let mut left = take_child(s, n, l)?;
    let ln = cow(s, &mut left)?;
    match (&mut ln.body, &right.body) {
        (Body::Leaf(a), Body::Leaf(b)) => a.extend(b.iter().cloned()),
        (Body::Internal(a), Body::Internal(b)) => a.extend(b.iter().cloned()),
        _ => {
            return Err(Error::BadNode {
                logical: right.addr,
                msg: "siblings at different levels".into(),
            })
        }
    }
    release_copied(s, &right)?;
    let Body::Internal(ch) = &mut n.body else {
        unreachable!()
    };
    ch[l] = child_of(left);
    ch.remove(r);
    Ok(())
}

/// Forward iterator over items with keys in [start, end].
pub struct Iter<'a> {
    loader: &'a dyn NodeLoader,
    /// (node, index): for a leaf the next item; for an internal node the child being walked.
    stack: Vec<(Arc<Node>, usize)>,
    end: Key,
    failed: bool,
}

impl<'a> Iter<'a> {
    /// Position at the first key >= `start`.
    pub fn new(loader: &'a dyn NodeLoader, root: &Arc<Node>, start: Key, end: Key) -> Iter<'a> {
        let mut it = Iter {
            loader,
            stack: Vec::new(),
            end,
            failed: false,
        };
        let mut node = root.clone();
        loop {
            match &node.body {
                Body::Leaf(items) => {
                    let i = items.partition_point(|(k, _)| *k < start);
                    it.stack.push((node, i));
                    break;
                }
                Body::Internal(ch) => {
                    let i = child_index(ch, &start);
                    match load_child(loader, &node, i) {
                        Ok(c) => {
                            it.stack.push((node, i));
                            node = c;
                        }
                        Err(_) => {
                            it.stack.push((node, i));
                            it.failed = true;
                            break;
                        }
                    }
                }
            }
        }
        it
    }
}

impl Iterator for Iter<'_> {
    type Item = Result<(Key, Value)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            // Report the load failure once, by loading again for its error.
            self.failed = false;
            let (n, i) = self.stack.pop()?;
            self.stack.clear();
            return load_child(self.loader, &n, i).err().map(Err);
        }
        loop {
            let (node, idx) = self.stack.last_mut()?;
            if let Body::Leaf(items) = &node.body {
                if *idx < items.len() {
                    let (k, v) = &items[*idx];
                    *idx += 1;
                    if *k > self.end {
                        self.stack.clear();
                        return None;
                    }
                    return Some(Ok((*k, v.clone())));
                }
                self.stack.pop();
                continue;
            }
            *idx += 1;
            if *idx >= node.len() {
                self.stack.pop();
                continue;
            }
            if node.children()[*idx].key > self.end {
                self.stack.clear();
                return None;
            }
            let (node, idx) = (node.clone(), *idx);
            match load_child(self.loader, &node, idx) {
                Ok(c) => {
                    let mut c = c;
                    loop {
                        let internal = !c.is_leaf();
                        self.stack.push((c.clone(), 0));
                        if !internal {
                            break;
                        }
                        match load_child(self.loader, &c, 0) {
                            Ok(x) => c = x,
                            Err(e) => {
                                self.stack.clear();
                                return Some(Err(e));
                            }
                        }
                    }
                }
                Err(e) => {
                    self.stack.clear();
                    return Some(Err(e));
                }
            }
        }
    }
}

/// A cursor over a tree that descends only when asked, so that a
/// comparison can step over a block both trees share without reading it.
struct Cursor<'a> {
    l: &'a dyn NodeLoader,
    /// (node, index of the next child or item), root first.
    path: Vec<(Arc<Node>, usize)>,
}

/// Items of a tree, in key order.
pub type Items = Vec<(Key, Value)>;

/// What a cursor stands on.
enum Head {
    Item(Key, Value),
    /// A child not read yet: address, level, lowest key.
    Child(u64, u8, Key),
    End,
}

impl<'a> Cursor<'a> {
    fn new(l: &'a dyn NodeLoader, root: &Arc<Node>) -> Cursor<'a> {
        let mut c = Cursor {
            l,
            path: vec![(root.clone(), 0)],
        };
        c.pop_done();
        c
    }

    /// Leave every node whose entries are all behind.
    fn pop_done(&mut self) {
        while let Some((n, i)) = self.path.last() {
            if *i < n.len() {
                return;
            }
            self.path.pop();
            if let Some(top) = self.path.last_mut() {
                top.1 += 1;
            }
        }
    }

    fn head(&self) -> Head {
        let Some((n, i)) = self.path.last() else {
            return Head::End;
        };
        match &n.body {
            Body::Leaf(items) => Head::Item(items[*i].0, items[*i].1.clone()),
            Body::Internal(ch) => Head::Child(ch[*i].addr, n.level - 1, ch[*i].key),
        }
    }

    /// Step over the current item or child.
    fn advance(&mut self) {
        if let Some(top) = self.path.last_mut() {
            top.1 += 1;
        }
        self.pop_done();
    }

    /// Read the current child and stand on its first entry.
    fn descend(&mut self) -> Result<()> {
        let (n, i) = self.path.last().expect("descend at the end").clone();
        let child = load_child(self.l, &n, i)?;
        self.path.push((child, 0));
        self.pop_done();
        Ok(())
    }
}

/// The items in which two trees differ, each side's own: a block both
/// trees reach is stepped over without being read, so the cost grows with
/// what differs, not with the trees (snapshots share all they did not
/// change). Items equal in both (same key and value) are left out too.
pub fn diff(l: &dyn NodeLoader, a: &Arc<Node>, b: &Arc<Node>) -> Result<(Items, Items)> {
    use std::cmp::Ordering::{Equal, Greater, Less};
    let (mut ca, mut cb) = (Cursor::new(l, a), Cursor::new(l, b));
    let (mut only_a, mut only_b) = (Vec::new(), Vec::new());
    if a.addr == b.addr {
        return Ok((only_a, only_b));
    }
    loop {
        match (ca.head(), cb.head()) {
            (Head::End, Head::End) => return Ok((only_a, only_b)),
            (Head::Item(k, v), Head::End) => {
                only_a.push((k, v));
                ca.advance();
            }
            (Head::End, Head::Item(k, v)) => {
                only_b.push((k, v));
                cb.advance();
            }
            (Head::Child(..), Head::End) => ca.descend()?,
            (Head::End, Head::Child(..)) => cb.descend()?,
            (Head::Child(x, _, _), Head::Child(y, _, _)) if x == y => {
                ca.advance();
                cb.advance();
            }
            (Head::Child(_, lx, kx), Head::Child(_, ly, ky)) => match (lx.cmp(&ly), kx.cmp(&ky)) {
                (Greater, _) | (Equal, Less) => ca.descend()?,
                (Less, _) | (Equal, Greater) => cb.descend()?,
                (Equal, Equal) => {
                    ca.descend()?;
                    cb.descend()?;
                }
            },
            (Head::Item(k, v), Head::Child(_, _, ky)) => {
                if k < ky {
                    only_a.push((k, v));
                    ca.advance();
                } else {
                    cb.descend()?;
                }
            }
            (Head::Child(_, _, kx), Head::Item(k, v)) => {
                if k < kx {
                    only_b.push((k, v));
                    cb.advance();
                } else {
                    ca.descend()?;
                }
            }
            (Head::Item(kx, vx), Head::Item(ky, vy)) => match kx.cmp(&ky) {
                Less => {
                    only_a.push((kx, vx));
                    ca.advance();
                }
                Greater => {
                    only_b.push((ky, vy));
                    cb.advance();
                }
                Equal => {
                    if vx != vy {
                        only_a.push((kx, vx));
                        only_b.push((ky, vy));
                    }
                    ca.advance();
                    cb.advance();
                }
            },
        }
    }
}
