//! Transactions. Every change joins the running transaction; commit runs the
//! delayed work (chunk items, tree-block extent items, block group items)
//! to a fixed point, serialises the dirty nodes, opens the next transaction,
//! and only then writes: nodes to every mirror, flush, superblocks, flush.
//! Extents freed by a transaction stay pinned until it is durable (and no
//! reader of an older view remains), so a crash always finds the last
//! committed tree intact.

use std::collections::{BTreeMap, BTreeSet};

use crate::btree::{self, Body, Child, Node, NodeLoader, NodeStore};
use crate::chunk::volumes::alloc_chunk;
use crate::engine::block_group::BlockGroup;
use crate::engine::fs_info::{tree_index, CommitRoots, FsInfo};
use crate::format::{
    bg_type, item, objectid, tree_id, BlockGroupItem, ChunkItem, DevExtent, Key, MetadataItem,
    Profile, RootPtr, Superblock, SUPER_BYTES, SUPER_OFFSETS, SYS_ARRAY_MAX_BYTES,
};
use crate::util::error::{Error, Result};
use crate::util::sync::{lock, write, Arc, Ordering};

/// A tree block's pending extent-tree change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaRef {
    Insert {
        level: u8,
        owner: u64,
    },
    Delete {
        level: u8,
    },
    /// A shared block gained or lost references (snapshots).
    Refs {
        level: u8,
        delta: i64,
    },
}

/// A volume as the running transaction sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub id: u64,
    pub size_bytes: u64,
    /// Writes, discards and resizes are refused.
    pub read_only: bool,
}

/// A snapshot or clone asked for: made by the next commit, right after its
/// writeout, when every tree is committed (a snapshot shares only
/// committed blocks).
#[derive(Debug, Clone)]
pub struct PendingSnapshot {
    pub src_id: u64,
    pub new_id: u64,
    pub name: String,
    pub read_only: bool,
}

/// The running transaction. Lock order: commit lock, then this, then block
/// group locks, then chunk maps, then devices.
pub struct TransState {
    pub gen: u64,
    /// Live roots in [`tree_id::ALL`] order (taken out while a tree is changed).
    pub roots: [Option<Arc<Node>>; 5],
    /// Live root of each volume's mapping tree, by volume id (taken out
    /// while the tree is changed). Its ROOT_ITEM follows it at commit.
    pub vol_roots: BTreeMap<u64, Arc<Node>>,
    /// Superblock `INCOMPAT_*` bits the next commit writes.
    pub incompat_flags: u64,
    /// Per volume tree: generation of the last snapshot that shares its
    /// blocks (see [`crate::format::RootItem`]).
    pub last_snapshot: BTreeMap<u64, u64>,
    /// Volume trees whose ROOT_ITEM must be rewritten although their root
    /// did not change (a snapshot moved `last_snapshot`).
    pub root_items_dirty: BTreeSet<u64>,
    /// Data references gained or lost by copied or dropped leaves, by
    /// logical address, applied when the tree change returns.
    pub pending_data_refs: Vec<(u64, i64)>,
    /// Deleted volumes whose trees the cleaner is still dropping (their
    /// roots stay in `vol_roots` until they are empty).
    pub dead_volumes: BTreeSet<u64>,
    /// Snapshots the next commit makes.
    pub pending_snapshots: Vec<PendingSnapshot>,
    /// What making each pending snapshot came to, by new volume id, until
    /// its requester collects it.
    pub snapshot_results: BTreeMap<u64, Result<()>>,
    pub delayed_meta: BTreeMap<u64, MetaRef>,
    pub dirty_bgs: BTreeSet<u64>,
    pub pending_chunks: Vec<ChunkItem>,
    pub dirty: bool,
    /// Client changes of this transaction for the intent log.
    pub log: crate::engine::tree_log::LogPending,
    pub data_profile: Profile,
    pub metadata_profile: Profile,
    pub next_volume_id: u64,
    pub volumes: BTreeMap<String, VolumeInfo>,
}

impl TransState {
    pub fn new(gen: u64, data_profile: Profile, metadata_profile: Profile) -> TransState {
        TransState {
            gen,
            roots: Default::default(),
            vol_roots: BTreeMap::new(),
            incompat_flags: crate::format::INCOMPAT_KNOWN,
            last_snapshot: BTreeMap::new(),
            root_items_dirty: BTreeSet::new(),
            pending_data_refs: Vec::new(),
            pending_snapshots: Vec::new(),
            dead_volumes: BTreeSet::new(),
            snapshot_results: BTreeMap::new(),
            delayed_meta: BTreeMap::new(),
            dirty_bgs: BTreeSet::new(),
            pending_chunks: Vec::new(),
            dirty: false,
            log: Default::default(),
            data_profile,
            metadata_profile,
            next_volume_id: objectid::FIRST_VOLUME,
            volumes: BTreeMap::new(),
        }
    }
    /// Live root of a fixed tree.
    pub fn root(&self, tree: u64) -> Arc<Node> {
        self.roots[tree_index(tree)]
            .clone()
            .expect("tree root taken out")
    }

    /// Live root of any tree. A volume tree that does not exist (its volume
    /// was deleted under the caller) is `NoVolume`, not a panic.
    pub fn tree_root(&self, tree: u64) -> Result<Arc<Node>> {
        if !tree_id::is_volume(tree) {
            return Ok(self.root(tree));
        }
        self.vol_roots
            .get(&tree)
            .cloned()
            .ok_or_else(|| Error::NoVolume(format!("volume id {tree}")))
    }

    fn take_root(&mut self, tree: u64) -> Result<Arc<Node>> {
        if !tree_id::is_volume(tree) {
            return Ok(self.roots[tree_index(tree)]
                .take()
                .expect("tree root taken out"));
        }
        self.vol_roots
            .remove(&tree)
            .ok_or_else(|| Error::NoVolume(format!("volume id {tree}")))
    }

    fn put_root(&mut self, tree: u64, root: Arc<Node>) {
        if tree_id::is_volume(tree) {
            let before = self.vol_roots.insert(tree, root);
            assert!(before.is_none(), "volume tree {tree} root put back twice");
        } else {
            let slot = &mut self.roots[tree_index(tree)];
            assert!(slot.is_none(), "tree {tree} root put back twice");
            *slot = Some(root);
        }
    }
}

/// The running transaction, joined: what tree code changes through.
pub struct Ctx<'a> {
    pub fs: &'a FsInfo,
    pub st: &'a mut TransState,
    /// The tree being changed: whose `last_snapshot` says whether a block
    /// may be shared.
    cur_tree: u64,
}

/// Metadata space kept free before a change starts, in nodes.
pub const META_RESERVE_NODES: u64 = 128;
/// Below this many free nodes a change fails with ENOSPC up front.
const META_MIN_NODES: u64 = 32;

impl NodeLoader for Ctx<'_> {
    fn load(&self, child: &Child, owner: u64, level: u8) -> Result<Arc<Node>> {
        self.fs.load(child, owner, level)
    }
}

impl NodeStore for Ctx<'_> {
    fn gen(&self) -> u64 {
        self.st.gen
    }
    fn node_bytes(&self) -> usize {
        self.fs.node_bytes
    }
    fn alloc_node(&mut self, owner: u64, level: u8) -> Result<u64> {
        let t = if owner == tree_id::CHUNK {
            bg_type::SYSTEM
        } else {
            bg_type::METADATA
        };
        let nb = self.fs.node_bytes as u64;
        let (addr, _) = self.alloc_extent(t, nb, nb)?;
        self.st
            .delayed_meta
            .insert(addr, MetaRef::Insert { level, owner });
        Ok(addr)
    }
    fn free_node(&mut self, node: &Node) {
        match self.st.delayed_meta.get(&node.addr) {
            Some(MetaRef::Insert { .. }) => {
                self.st.delayed_meta.remove(&node.addr);
            }
            _ => {
                self.st
                    .delayed_meta
                    .insert(node.addr, MetaRef::Delete { level: node.level });
            }
        }
        self.fs.cache.remove(node.addr);
        self.free_extent(node.addr, self.fs.node_bytes as u64);
    }

    fn node_refs(&mut self, node: &Node) -> Result<u64> {
        let may_share = tree_id::is_volume(self.cur_tree)
            && node.gen != self.st.gen
            && node.gen
                <= self
                    .st
                    .last_snapshot
                    .get(&self.cur_tree)
                    .copied()
                    .unwrap_or(0);
        if !may_share {
            return Ok(1);
        }
        let pending = match self.st.delayed_meta.get(&node.addr) {
            Some(MetaRef::Refs { delta, .. }) => *delta,
            Some(m) => {
                return Err(self.fs.abort(&format!(
                    "tree block {:#x} of generation {} is pending {m:?}",
                    node.addr, node.gen
                )))
            }
            None => 0,
        };
        let k = Key::new(node.addr, item::METADATA, node.level as u64);
        let Some(v) = self.get(tree_id::EXTENT, &k)? else {
            return Err(self
                .fs
                .abort(&format!("tree block {:#x} has no extent item", node.addr)));
        };
        let m = MetadataItem::decode(&v).map_err(|e| Error::Corrupt(format!("{k}: {e}")))?;
        let refs = m.refs as i64 + pending;
        assert!(
            refs >= 1,
            "tree block {:#x} has {refs} references",
            node.addr
        );
        Ok(refs as u64)
    }

    fn add_node_ref(&mut self, addr: u64, level: u8, delta: i64) -> Result<()> {
        let e = self
            .st
            .delayed_meta
            .entry(addr)
            .or_insert(MetaRef::Refs { level, delta: 0 });
        match e {
            MetaRef::Refs { delta: d, .. } => *d += delta,
            m => panic!("reference change on tree block {addr:#x} pending {m:?}"),
        }
        self.st.dirty = true;
        Ok(())
    }

    fn add_item_refs(&mut self, leaf: &Node, delta: i64) -> Result<()> {
        if !tree_id::is_volume(leaf.owner) {
            return Ok(());
        }
        for (k, v) in leaf.leaf_items() {
            if k.ty != item::VOLUME_EXTENT {
                continue;
            }
            let ve = crate::format::VolumeExtent::decode(v)
                .map_err(|e| Error::Corrupt(format!("tree block {:#x}: {k}: {e}", leaf.addr)))?;
            self.st.pending_data_refs.push((ve.logical, delta));
        }
        Ok(())
    }
}

impl<'a> Ctx<'a> {
    /// Join the running transaction for a change, making sure metadata space
    /// exists before anything is modified.
    pub fn begin(fs: &'a FsInfo, st: &'a mut TransState) -> Result<Ctx<'a>> {
        Self::begin_needing(fs, st, META_MIN_NODES)
    }

    /// [`begin`](Self::begin), failing with ENOSPC unless `min_nodes` of
    /// metadata are free (or a new chunk can be had).
    fn begin_needing(fs: &'a FsInfo, st: &'a mut TransState, min_nodes: u64) -> Result<Ctx<'a>> {
        fs.check_abort()?;
        let mut c = Ctx {
            fs,
            st,
            cur_tree: 0,
        };
        c.ensure_meta_space(min_nodes)?;
        Ok(c)
    }

    /// Join without the space check (mkfs and commit-time work).
    pub fn join(fs: &'a FsInfo, st: &'a mut TransState) -> Ctx<'a> {
        Ctx {
            fs,
            st,
            cur_tree: 0,
        }
    }

    /// The profile new allocations of type `t` use (balance may convert it).
    pub fn target_profile(&self, t: u64) -> Profile {
        if t == bg_type::DATA {
            self.st.data_profile
        } else {
            self.st.metadata_profile
        }
    }

    /// Whether allocation of type `t` may use `bg`: same type, the target
    /// profile, writable, and (degraded) every stripe present.
    fn allocatable(&self, bg: &BlockGroup, t: u64) -> bool {
        bg.bg_type == t
            && bg.profile == self.target_profile(t)
            && (t != bg_type::DATA || !self.fs.has_missing_stripe(bg.start))
    }

    /// Free bytes allocation of type `t` could use outside the group at
    /// `except` (relocation checks there is room before emptying it).
    pub fn free_of_type_except(&self, t: u64, except: u64) -> u64 {
        self.fs
            .block_group_list()
            .iter()
            .filter(|b| b.start != except && self.allocatable(b, t))
            .map(|b| b.allocatable_bytes())
            .sum()
    }

    fn ensure_meta_space(&mut self, min_nodes: u64) -> Result<()> {
        let nb = self.fs.node_bytes as u64;
        let wants = [
            (bg_type::METADATA, META_RESERVE_NODES),
            (bg_type::SYSTEM, META_RESERVE_NODES / 8),
        ];
        // One pass over the groups for both types: every change starts here.
        let mut free = [0u64; 2];
        for b in self.fs.block_group_list() {
            for (f, (t, _)) in free.iter_mut().zip(wants) {
                if self.allocatable(&b, t) {
                    *f += b.allocatable_bytes();
                }
            }
        }
        for ((t, want), free) in wants.into_iter().zip(free) {
            if free >= want * nb {
                continue;
            }
            if let Err(e) = self.new_chunk(t) {
                let min = if t == bg_type::SYSTEM {
                    min_nodes / 8
                } else {
                    min_nodes
                };
                if free < min * nb {
                    return Err(match e {
                        Error::NoSpace(m) => Error::NoSpace(format!("metadata: {m}")),
                        e => e,
                    });
                }
            }
        }
        Ok(())
    }

    /// Create a chunk and its block group; its items are inserted at commit.
    pub fn new_chunk(&mut self, t: u64) -> Result<Arc<BlockGroup>> {
        let profile = self.target_profile(t);
        let logical = self.fs.mapping.next_logical();
        let cap = match t {
            bg_type::METADATA => self.fs.metadata_chunk_cap_bytes.load(Ordering::Relaxed),
            _ => 0,
        };
        let item = alloc_chunk(&self.fs.alloc_devices(), logical, t, profile, cap).map_err(|e| {
            let missing: Vec<String> = crate::util::sync::read(&self.fs.missing)
                .keys()
                .map(|d| format!("devid {d}"))
                .collect();
            if missing.is_empty() {
                return e;
            }
            // Degraded: refuse rather than write fewer copies than the profile.
            Error::Degraded(format!(
                "pool is degraded ({} missing): no {} chunk with every {} mirror present can be made ({e}); replace or remove the missing device",
                missing.join(", "),
                bg_type::name(t),
                profile.name()
            ))
        })?;
        if t == bg_type::SYSTEM {
            let mut sys: Vec<ChunkItem> = self
                .fs
                .mapping
                .all()
                .iter()
                .filter(|m| m.item.bg_type == bg_type::SYSTEM)
                .map(|m| m.item.clone())
                .collect();
            sys.push(item.clone());
            if Superblock::encode_sys_chunks(&sys).len() > SYS_ARRAY_MAX_BYTES {
                self.undo_chunk_alloc(&item);
                return Err(Error::NoSpace("system chunk array is full".into()));
            }
        }
        self.fs.mapping.insert(item.clone());
        let bg = Arc::new(BlockGroup::new_empty(
            item.logical,
            item.length,
            t,
            item.profile,
            self.st.gen,
        ));
        write(&self.fs.block_groups).insert(item.logical, bg.clone());
        self.st.dirty_bgs.insert(item.logical);
        self.st.pending_chunks.push(item);
        self.st.dirty = true;
        tracing::debug!(
            "new {} chunk at {logical:#x} ({} bytes)",
            bg_type::name(t),
            bg.length
        );
        Ok(bg)
    }

    fn undo_chunk_alloc(&self, item: &ChunkItem) {
        for s in &item.stripes {
            if let Some(d) = self.fs.device(s.devid) {
                write(&d.extents).remove(&s.physical);
            }
        }
    }

    /// Take [min, max] bytes from a group of type `t`, creating a chunk when
    /// none has room. Data space is reserved (the caller inserts its extent
    /// item later); metadata space counts as used at once.
    pub fn alloc_extent(&mut self, t: u64, min: u64, max: u64) -> Result<(u64, u64)> {
        for attempt in 0..2 {
            for bg in self.fs.block_group_list() {
                if !self.allocatable(&bg, t) {
                    continue;
                }
                if let Some((addr, len)) = bg.alloc(min, max) {
                    crate::failpoint!("alloc::picked", bg.start);
                    if t != bg_type::DATA {
                        self.st.dirty_bgs.insert(bg.start);
                    }
                    self.st.dirty = true;
                    return Ok((addr, len));
                }
            }
            if attempt == 0 {
                self.new_chunk(t)?;
            }
        }
        Err(Error::NoSpace(format!(
            "no free {} space",
            bg_type::name(t)
        )))
    }

    /// A removed group's pending work goes with it.
    pub(crate) fn forget_group(&mut self, start: u64) {
        self.st.dirty_bgs.remove(&start);
        self.st.pending_chunks.retain(|c| c.logical != start);
    }

    /// Give back an unused data reservation (a write that failed).
    pub fn unreserve(&mut self, logical: u64, len: u64) {
        if let Some(bg) = self.fs.block_group(logical) {
            bg.unreserve(self.fs, logical, len);
        }
    }

    /// A reservation became an extent item.
    pub fn commit_reservation(&mut self, logical: u64, len: u64) {
        if let Some(bg) = self.fs.block_group(logical) {
            bg.reservation_to_used(self.fs, len);
            self.st.dirty_bgs.insert(bg.start);
        }
    }

    /// [logical, +len) no longer holds live data or metadata: pin it.
    pub fn free_extent(&mut self, logical: u64, len: u64) {
        let Some(bg) = self.fs.block_group(logical) else {
            return;
        };
        crate::failpoint!("extent::free", bg.start);
        if !bg.free_extent(self.fs, len) {
            return;
        }
        self.fs.pin(self.st.gen, logical, len);
        self.st.dirty_bgs.insert(bg.start);
        self.st.dirty = true;
    }

    /// Run `f` on a tree's live root; an error while changing a tree aborts
    /// the pool, since the in-memory tree may be half changed.
    pub fn with_tree<R>(
        &mut self,
        tree: u64,
        f: impl FnOnce(&mut Ctx<'a>, &mut Arc<Node>) -> Result<R>,
    ) -> Result<R> {
        // A missing volume tree changes nothing: no abort.
        let mut root = self.st.take_root(tree)?;
        let outer = std::mem::replace(&mut self.cur_tree, tree);
        let r = f(self, &mut root);
        self.cur_tree = outer;
        self.st.put_root(tree, root);
        self.st.dirty = true;
        let r = r.and_then(|x| self.apply_data_refs().map(|_| x));
        r.map_err(|e| match e {
            Error::Aborted(_) => e,
            e => self
                .fs
                .abort(&format!("changing the {} tree: {e}", tree_id::name(tree))),
        })
    }

    /// Give volume `id` an empty mapping tree (its ROOT_ITEM is written at
    /// commit).
    pub fn create_volume_tree(&mut self, id: u64) -> Result<()> {
        assert!(tree_id::is_volume(id), "tree {id} is not a volume tree");
        assert!(
            !self.st.vol_roots.contains_key(&id),
            "volume {id} already has a tree"
        );
        // The log names volumes by id: one made after the last commit is
        // not there at replay.
        self.st.log.force_commit();
        let addr = btree::NodeStore::alloc_node(self, id, 0)?;
        let leaf = Node::new_leaf(addr, self.st.gen, id);
        self.st.vol_roots.insert(id, Arc::new(leaf));
        self.st.dirty = true;
        Ok(())
    }

    /// Drop volume `id`'s tree: free every block only it references, and
    /// the data only those reference; delete its ROOT_ITEM.
    pub fn drop_volume_tree(&mut self, id: u64) -> Result<()> {
        let root = self.st.take_root(id)?;
        let outer = std::mem::replace(&mut self.cur_tree, id);
        let r = btree::drop_tree(self, root);
        self.cur_tree = outer;
        self.st.last_snapshot.remove(&id);
        let r = r
            .and_then(|_| self.apply_data_refs())
            .and_then(|_| self.delete(tree_id::VOLUME, &crate::format::root_item_key(id)));
        self.st.dirty = true;
        r.map(|_| ()).map_err(|e| match e {
            Error::Aborted(_) => e,
            e => self.fs.abort(&format!("dropping volume tree {id}: {e}")),
        })
    }

    /// Delete volume `id` at once: its item goes, its tree stays to be
    /// dropped by the cleaner ([`drop_dead_step`](Self::drop_dead_step)).
    pub fn kill_volume(&mut self, name: &str, id: u64) -> Result<()> {
        self.st.log.force_commit();
        self.delete(
            tree_id::VOLUME,
            &Key::new(objectid::VOLUMES, item::VOLUME_ITEM, id),
        )?;
        self.insert(
            tree_id::VOLUME,
            Key::new(objectid::VOLUMES, item::DEAD_ROOT, id),
            Vec::new(),
        )?;
        self.st.volumes.remove(name);
        self.st.dead_volumes.insert(id);
        Ok(())
    }

    /// Drop up to `budget` blocks of deleted volume `id`'s tree; when it is
    /// empty, free its root and forget it. Returns whether it is gone.
    pub fn drop_dead_step(&mut self, id: u64, budget: u64) -> Result<bool> {
        assert!(
            self.st.dead_volumes.contains(&id),
            "volume id {id} is not dead"
        );
        let empty = self.with_tree(id, |c, root| btree::drop_some(c, root, budget))?;
        if !empty {
            return Ok(false);
        }
        self.drop_volume_tree(id)?;
        self.delete(
            tree_id::VOLUME,
            &Key::new(objectid::VOLUMES, item::DEAD_ROOT, id),
        )?;
        self.st.dead_volumes.remove(&id);
        Ok(true)
    }

    pub fn insert(&mut self, tree: u64, key: Key, val: impl Into<btree::Value>) -> Result<()> {
        let val = val.into();
        self.with_tree(tree, |c, root| btree::insert(c, root, key, val))
    }
    pub fn delete(&mut self, tree: u64, key: &Key) -> Result<bool> {
        self.with_tree(tree, |c, root| btree::delete(c, root, key))
    }
    /// [`btree::delete_expected`]: for a key just seen, or one an invariant
    /// says is there.
    pub fn delete_expected(&mut self, tree: u64, key: &Key) -> Result<bool> {
        self.with_tree(tree, |c, root| btree::delete_expected(c, root, key))
    }
    pub fn get(&self, tree: u64, key: &Key) -> Result<Option<Vec<u8>>> {
        btree::get(self.fs, &self.st.tree_root(tree)?, key)
    }
    /// Items with keys in [start, end].
    pub fn range(&self, tree: u64, start: Key, end: Key) -> Result<Vec<(Key, btree::Value)>> {
        btree::Iter::new(self.fs, &self.st.tree_root(tree)?, start, end).collect()
    }

    /// A shared tree block's count changes by `delta`; it keeps at least
    /// one reference (the last one goes with the block's free).
    fn apply_node_refs(&mut self, addr: u64, level: u8, delta: i64) -> Result<()> {
        if delta == 0 {
            return Ok(());
        }
        let k = Key::new(addr, item::METADATA, level as u64);
        let Some(v) = self.get(tree_id::EXTENT, &k)? else {
            return Err(self
                .fs
                .abort(&format!("shared tree block {addr:#x} has no extent item")));
        };
        let mut m = MetadataItem::decode(&v).map_err(|e| Error::Corrupt(format!("{k}: {e}")))?;
        let refs = m.refs as i64 + delta;
        if refs < 1 {
            return Err(self.fs.abort(&format!(
                "tree block {addr:#x}: reference count would fall to {refs}"
            )));
        }
        m.refs = refs as u64;
        self.insert(tree_id::EXTENT, k, m.encode())
    }

    /// Point each changed volume tree's ROOT_ITEM at its live root (the
    /// root's address is fixed when it is copied, before writeout).
    fn update_root_items(&mut self) -> Result<bool> {
        let gen = self.st.gen;
        let forced = std::mem::take(&mut self.st.root_items_dirty);
        let changed: Vec<(u64, Vec<u8>)> = self
            .st
            .vol_roots
            .iter()
            .filter(|(id, r)| r.gen == gen || forced.contains(id))
            .map(|(&id, r)| {
                let item = crate::format::RootItem {
                    root: RootPtr {
                        addr: r.addr,
                        gen: r.gen,
                        level: r.level,
                    },
                    last_snapshot_gen: self.st.last_snapshot.get(&id).copied().unwrap_or(0),
                };
                (id, item.encode())
            })
            .collect();
        let mut did = false;
        for (id, v) in changed {
            let k = crate::format::root_item_key(id);
            if self.get(tree_id::VOLUME, &k)?.as_deref() != Some(&v[..]) {
                self.insert(tree_id::VOLUME, k, v)?;
                did = true;
            }
        }
        Ok(did)
    }

    /// Apply delayed work until nothing more is pending.
    fn run_delayed(&mut self) -> Result<()> {
        for _round in 0..64 {
            let mut did = false;
            for c in std::mem::take(&mut self.st.pending_chunks) {
                did = true;
                self.insert(
                    tree_id::CHUNK,
                    Key::new(objectid::FIRST_CHUNK, item::CHUNK, c.logical),
                    c.encode(),
                )?;
                for s in &c.stripes {
                    let de = DevExtent {
                        chunk_logical: c.logical,
                        length: c.stripe_bytes,
                    };
                    self.insert(
                        tree_id::DEV,
                        Key::new(s.devid, item::DEV_EXTENT, s.physical),
                        de.encode(),
                    )?;
                }
            }
            if self.fs.dev_stats_dirty.swap(false, Ordering::AcqRel) {
                did = true;
                for d in self.fs.devices() {
                    self.insert(
                        tree_id::DEV,
                        Key::new(objectid::DEV_STATS, item::DEV_STATS, d.devid),
                        d.stats.snapshot().encode(),
                    )?;
                }
            }
            did |= self.update_root_items()?;
            let refs = std::mem::take(&mut self.st.delayed_meta);
            for (addr, r) in refs {
                did = true;
                match r {
                    MetaRef::Insert { level, owner } => {
                        let v = MetadataItem {
                            gen: self.st.gen,
                            owner,
                            refs: 1,
                        };
                        self.insert(
                            tree_id::EXTENT,
                            Key::new(addr, item::METADATA, level as u64),
                            v.encode(),
                        )?;
                    }
                    MetaRef::Refs { level, delta } => self.apply_node_refs(addr, level, delta)?,
                    MetaRef::Delete { level } => {
                        let k = Key::new(addr, item::METADATA, level as u64);
                        if !self.delete(tree_id::EXTENT, &k)? {
                            return Err(self
                                .fs
                                .abort(&format!("freed tree block {addr:#x} has no extent item")));
                        }
                    }
                }
            }
            for start in std::mem::take(&mut self.st.dirty_bgs) {
                let Some(bg) = self.fs.block_group_at(start) else {
                    continue;
                };
                let v = bg.view();
                if v.removed {
                    continue;
                }
                let used = v.used_bytes;
                let k = Key::new(bg.start, item::BLOCK_GROUP, bg.length);
                let v = BlockGroupItem {
                    used,
                    bg_type: bg.bg_type,
                }
                .encode();
                if self.get(tree_id::EXTENT, &k)?.as_deref() != Some(&v[..]) {
                    did = true;
                    self.insert(tree_id::EXTENT, k, v)?;
                }
            }
            if !did {
                return Ok(());
            }
        }
        Err(self.fs.abort("commit did not converge"))
    }
}

/// Make the snapshots asked for, in the transaction that has just opened:
/// every root is committed now. A failure is the requester's error, not the
/// commit's; a half-made snapshot aborts the pool (its tree changes may be
/// partial).
fn make_pending_snapshots(fs: &FsInfo, st: &mut TransState) {
    for p in std::mem::take(&mut st.pending_snapshots) {
        let r = Ctx::join(fs, st).make_snapshot(&p);
        st.snapshot_results.insert(p.new_id, r);
    }
}

impl Ctx<'_> {
    fn make_snapshot(&mut self, p: &PendingSnapshot) -> Result<()> {
        let Some(src) = self.st.volumes.values().find(|v| v.id == p.src_id).cloned() else {
            return Err(Error::NoVolume(format!("volume id {} (deleted)", p.src_id)));
        };
        if self.st.volumes.contains_key(&p.name) {
            return Err(Error::VolumeExists(p.name.clone()));
        }
        self.ensure_meta_space(META_MIN_NODES)?;
        let root = self.st.tree_root(p.src_id)?;
        let committed = self.st.gen - 1;
        let outer = std::mem::replace(&mut self.cur_tree, p.new_id);
        let r = btree::snapshot_root(self, &root, p.new_id);
        self.cur_tree = outer;
        let snap = r.and_then(|n| self.apply_data_refs().map(|_| n));
        let snap = snap.map_err(|e| {
            self.fs
                .abort(&format!("snapshot of volume id {}: {e}", p.src_id))
        })?;
        self.st.vol_roots.insert(p.new_id, snap);
        // Blocks up to the committed generation may now be shared by both.
        self.st.last_snapshot.insert(p.src_id, committed);
        self.st.last_snapshot.insert(p.new_id, committed);
        self.st.root_items_dirty.insert(p.src_id);
        let v = VolumeInfo {
            id: p.new_id,
            size_bytes: src.size_bytes,
            read_only: p.read_only,
        };
        self.put_volume_item(&p.name, &v)?;
        self.st.volumes.insert(p.name.clone(), v);
        self.st.dirty = true;
        Ok(())
    }

    /// Write a volume's VOLUME_ITEM from its in-memory record.
    pub fn put_volume_item(&mut self, name: &str, v: &VolumeInfo) -> Result<()> {
        // Replay checks writes against the committed size and flags.
        self.st.log.force_commit();
        let flags = if v.read_only {
            crate::format::VOLUME_FLAG_READ_ONLY
        } else {
            0
        };
        self.insert(
            tree_id::VOLUME,
            Key::new(objectid::VOLUMES, item::VOLUME_ITEM, v.id),
            crate::format::VolumeItem {
                size_bytes: v.size_bytes,
                name: name.into(),
                flags,
            }
            .encode(),
        )
    }
}

/// Serialise every tree's changed nodes; the live roots become the clean
/// copies. Returns the superblock's root pointers and the new commit roots.
fn writeout_roots(
    fs: &FsInfo,
    st: &mut TransState,
    bufs: &mut Vec<(u64, Vec<u8>)>,
    written: &mut Vec<Arc<Node>>,
) -> ([RootPtr; 5], CommitRoots) {
    let gen = st.gen;
    let mut ptrs = [RootPtr::default(); 5];
    let mut clean_roots = Vec::new();
    for (i, ptr) in ptrs.iter_mut().enumerate() {
        let root = st.roots[i].take().expect("tree root taken out");
        let c = writeout(fs, &root, gen, bufs, written);
        *ptr = RootPtr {
            addr: c.addr,
            gen: c.gen,
            level: c.level,
        };
        clean_roots.push(c.clone());
        st.roots[i] = Some(c);
    }
    let mut clean_volumes = BTreeMap::new();
    for (&id, root) in st.vol_roots.iter_mut() {
        *root = writeout(fs, root, gen, bufs, written);
        clean_volumes.insert(id, root.clone());
    }
    let clean = CommitRoots {
        gen,
        roots: clean_roots,
        volumes: clean_volumes,
    };
    (ptrs, clean)
}

/// Serialise every node of the running transaction under `node`, returning
/// the clean (children unlinked) version.
fn writeout(
    fs: &FsInfo,
    node: &Arc<Node>,
    gen: u64,
    out: &mut Vec<(u64, Vec<u8>)>,
    clean: &mut Vec<Arc<Node>>,
) -> Arc<Node> {
    if node.gen != gen {
        return node.clone();
    }
    let mut n = (**node).clone();
    if let Body::Internal(ch) = &mut n.body {
        for c in ch.iter_mut() {
            if let Some(child) = c.node.take() {
                let w = writeout(fs, &child, gen, out, clean);
                c.addr = w.addr;
                c.gen = w.gen;
            }
        }
    }
    out.push((n.addr, n.encode(&fs.pool_uuid, fs.node_bytes, fs.csum_type)));
    let a = Arc::new(n);
    clean.push(a.clone());
    a
}

/// How long a change (or a write) that finds no space waits for pinned
/// space to come back (readers of older views letting go) before ENOSPC.
pub const ENOSPC_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Metadata nodes that ordinary changes leave free for changes that free
/// space (discards, deletes), as btrfs's global reserve: a pool whose
/// metadata is full refuses writes with ENOSPC but can still be emptied.
pub const GLOBAL_RESERVE_NODES: u64 = 64;

/// Run a change in the running transaction. When metadata is short, commit
/// first (what earlier transactions freed comes back once they are durable)
/// and try again, as btrfs flushes before it gives up with ENOSPC; while
/// freed space is still pinned by readers, keep trying for a bounded time.
/// It fails with ENOSPC rather than use the [`GLOBAL_RESERVE_NODES`].
pub fn change<R>(fs: &FsInfo, f: impl FnMut(&mut Ctx) -> Result<R>) -> Result<R> {
    change_needing(fs, META_MIN_NODES + GLOBAL_RESERVE_NODES, f)
}

/// [`change`] for a change that frees space: it may use the global reserve.
/// Keep each one small (a bounded number of items) so the reserve covers it.
pub fn change_freeing<R>(fs: &FsInfo, f: impl FnMut(&mut Ctx) -> Result<R>) -> Result<R> {
    change_needing(fs, META_MIN_NODES, f)
}

fn change_needing<R>(
    fs: &FsInfo,
    min_nodes: u64,
    mut f: impl FnMut(&mut Ctx) -> Result<R>,
) -> Result<R> {
    let deadline = crate::util::sched::now() + ENOSPC_WAIT;
    for attempt in 0.. {
        // Ask for the full reserve before the first commit, the minimum after.
        let need = if attempt == 0 {
            META_RESERVE_NODES.max(min_nodes)
        } else {
            min_nodes
        };
        {
            let mut st = lock(&fs.trans);
            match Ctx::begin_needing(fs, &mut st, need) {
                Ok(mut ctx) => return f(&mut ctx),
                Err(Error::NoSpace(m))
                    if attempt >= 1
                        && (fs.pinned_bytes() == 0 || crate::util::sched::now() >= deadline) =>
                {
                    return Err(Error::NoSpace(m))
                }
                Err(Error::NoSpace(_)) => {}
                Err(e) => return Err(e),
            }
        }
        commit(fs)?;
        if attempt >= 1 {
            crate::util::sched::sleep(std::time::Duration::from_millis(5));
        }
    }
    unreachable!("the loop returns")
}

/// Generation of the running transaction.
pub fn running_gen(fs: &FsInfo) -> u64 {
    lock(&fs.trans).gen
}

/// Make everything done so far durable, sharing a commit with concurrent
/// callers (group commit): a caller whose changes a commit that started after
/// them already covered returns without committing again.
pub fn flush(fs: &FsInfo) -> Result<u64> {
    let target = running_gen(fs);
    commit_upto(fs, target)
}

/// Commit the running transaction if it has changes; otherwise just flush.
/// Returns the generation that is now durable.
pub fn commit(fs: &FsInfo) -> Result<u64> {
    commit_upto(fs, u64::MAX)
}

/// Commit unless a commit is already running: for callers that must not
/// wait behind one stuck on a slow device (scrub's start, R6). None when
/// one was running (the commit lock was taken).
pub fn commit_unless_running(fs: &FsInfo) -> Option<Result<u64>> {
    let held = fs.commit_lock.try_lock_now()?;
    Some(commit_held(fs, u64::MAX, held))
}

fn commit_upto(fs: &FsInfo, target: u64) -> Result<u64> {
    commit_held(fs, target, lock(&fs.commit_lock))
}

/// Commit, with the commit lock already held (the intent log's fallback).
pub fn commit_locked(fs: &FsInfo, held: CommitGuard<'_>) -> Result<u64> {
    commit_held(fs, u64::MAX, held)
}

/// The commit lock, held.
pub type CommitGuard<'a> = crate::util::sync::OrderedGuard<'a, crate::engine::tree_log::LogRing>;

/// The commit, with the commit lock held by the caller.
fn commit_held(fs: &FsInfo, target: u64, mut ring: CommitGuard<'_>) -> Result<u64> {
    let started = std::time::Instant::now();
    fs.check_abort()?;
    let done = fs.committed_gen.load(Ordering::Acquire);
    if done >= target {
        return Ok(done);
    }
    let mut bufs = Vec::new();
    let mut written = Vec::new();
    let (gen, sb, clean) = {
        let mut st = lock(&fs.trans);
        if !st.dirty && !fs.dev_stats_dirty.load(Ordering::Acquire) {
            drop(st);
            fs.flush_devices()?;
            return Ok(fs.committed_gen.load(Ordering::Acquire));
        }
        Ctx::join(fs, &mut st).run_delayed()?;
        let gen = st.gen;
        // One transaction at a time becomes durable, in order.
        assert_eq!(gen, done + 1, "committing generation {gen} after {done}");
        let (ptrs, clean) = writeout_roots(fs, &mut st, &mut bufs, &mut written);
        let sys: Vec<ChunkItem> = fs
            .mapping
            .all()
            .iter()
            .filter(|m| m.item.bg_type == bg_type::SYSTEM)
            .filter(|m| {
                fs.block_group(m.start())
                    .is_some_and(|b| b.start == m.start())
            })
            .map(|m| m.item.clone())
            .collect();
        let sb = Superblock {
            pool_uuid: fs.pool_uuid,
            dev_uuid: [0; 16],
            devid: 0,
            generation: gen,
            csum_type: fs.csum_type,
            sector_bytes: crate::format::SECTOR_BYTES as u32,
            node_bytes: fs.node_bytes as u32,
            num_devices: (fs.devices().len() + crate::util::sync::read(&fs.missing).len()) as u64,
            data_profile: st.data_profile,
            metadata_profile: st.metadata_profile,
            next_volume_id: st.next_volume_id,
            roots: ptrs,
            label: fs.label.clone(),
            sys_chunk_array: Superblock::encode_sys_chunks(&sys),
            incompat_flags: st.incompat_flags,
        };
        st.gen += 1;
        st.dirty = false;
        // This commit carries every record kept so far.
        st.log.reset();
        {
            let mut wb = lock(&fs.writeback);
            for n in &written {
                wb.insert(n.addr, n.clone());
            }
        }
        // After writeback holds this commit's nodes: the snapshot loads them.
        make_pending_snapshots(fs, &mut st);
        (gen, sb, clean)
    };
    crate::failpoint!("transaction::before_io", gen);
    // The next transaction runs while this one is written: it copies every
    // node of `gen` before changing it, and what `gen` freed stays pinned.
    let io = (|| -> Result<()> {
        for (addr, buf) in &bufs {
            fs.write_logical(*addr, buf)?;
        }
        fs.flush_devices()?;
        write_supers(fs, &sb)?;
        fs.flush_devices()
    })();
    if let Err(e) = io {
        return Err(fs.abort(&format!("commit of generation {gen}: {e}")));
    }
    for n in written {
        fs.cache.insert(n);
    }
    lock(&fs.writeback).clear();
    // Swap the commit roots before publishing the generation: a reader that
    // registered on the old roots must be visible to any release_pinned that
    // sees this generation as durable.
    *write(&fs.commit_roots) = clean;
    let before = fs.committed_gen.swap(gen, Ordering::AcqRel);
    debug_assert_eq!(before, done, "another commit ran under the commit lock");
    // The log written after `done` is stale now; the next starts afresh.
    ring.reset(gen);
    fs.release_pinned();
    fs.commit_latency.observe(started.elapsed());
    Ok(gen)
}

/// Write every superblock copy on every device.
pub fn write_supers(fs: &FsInfo, sb: &Superblock) -> Result<()> {
    // One device failing does not fail the commit: the others carry it, and
    // a later open takes the newest superblock it finds.
    let devs = fs.devices();
    let mut first_err = None;
    let mut ok = 0;
    for d in &devs {
        match write_dev_supers(d, sb) {
            Ok(()) => {
                ok += 1;
                d.supers_valid.store(true, Ordering::Release);
            }
            Err(e) => {
                tracing::warn!("{e}");
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) if ok == 0 => Err(e),
        _ => Ok(()),
    }
}

fn write_dev_supers(d: &crate::chunk::volumes::Device, sb: &Superblock) -> Result<()> {
    {
        let mut s = sb.clone();
        s.devid = d.devid;
        s.dev_uuid = d.uuid;
        let buf = s.encode();
        for &o in &SUPER_OFFSETS {
            if o + SUPER_BYTES as u64 > d.total_bytes {
                break;
            }
            d.dev.write_at(&buf, o).map_err(|e| {
                d.stats.write_errs.fetch_add(1, Ordering::Relaxed);
                Error::DeviceIo {
                    path: d.dev.path().into(),
                    op: "superblock write",
                    physical: o,
                    len: SUPER_BYTES as u64,
                    source: e,
                }
            })?;
        }
    }
    Ok(())
}
