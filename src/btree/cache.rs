//! Clean tree nodes in memory, bounded by bytes. Dirty nodes never live here:
//! they hang off their parent until commit writes them.

use std::collections::{HashMap, VecDeque};

use crate::btree::Node;
use crate::util::sync::{lock, Arc, Mutex};

struct Inner {
    map: HashMap<u64, Arc<Node>>,
    /// Insertion order for plain FIFO eviction: the oldest insertion goes
    /// first, and a hit does not move an entry. May hold stale addresses
    /// (removed by `remove`); they are pruned when the queue grows past
    /// twice the bound.
    order: VecDeque<u64>,
}

/// Node cache keyed by logical address.
pub struct NodeCache {
    inner: Mutex<Inner>,
    max_nodes: usize,
}

impl NodeCache {
    pub fn new(max_bytes: usize, node_bytes: usize) -> NodeCache {
        NodeCache {
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                order: VecDeque::new(),
            }),
            max_nodes: (max_bytes / node_bytes).max(64),
        }
    }

    /// A cached node, if it is the generation the caller expects.
    pub fn get(&self, addr: u64, gen: u64) -> Option<Arc<Node>> {
        let inner = lock(&self.inner);
        inner.map.get(&addr).filter(|n| n.gen == gen).cloned()
    }

    pub fn insert(&self, node: Arc<Node>) {
        let mut inner = lock(&self.inner);
        if inner.map.insert(node.addr, node.clone()).is_none() {
            inner.order.push_back(node.addr);
        }
        while inner.map.len() > self.max_nodes {
            let Some(a) = inner.order.pop_front() else {
                break;
            };
            inner.map.remove(&a);
        }
        // Drop order entries of addresses removed by `remove`.
        if inner.order.len() > 2 * self.max_nodes {
            let Inner { map, order } = &mut *inner;
            order.retain(|a| map.contains_key(a));
        }
    }

    pub fn remove(&self, addr: u64) {
        lock(&self.inner).map.remove(&addr);
    }

    pub fn len(&self) -> usize {
        lock(&self.inner).map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
