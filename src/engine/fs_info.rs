//! Shared state of an open pool: devices, chunk maps, block groups, the node
//! cache, the running transaction, and the bookkeeping that decides when a
//! freed extent may be reused. Also the mirrored I/O paths that verify what
//! they read and repair a bad copy from a good one.

use std::any::{Any, TypeId};
use std::collections::{BTreeMap, HashMap};

use crate::btree::cache::NodeCache;
use crate::btree::{Child, Node, NodeLoader};
use crate::chunk::volumes::{Device, Mapped, MappingTree};
use crate::engine::block_group::{BlockGroup, UnusedList};
use crate::engine::transaction::TransState;
use crate::format::csum::CsumType;
use crate::format::{tree_id, SECTOR_BYTES};
use crate::util::error::{Error, Result};
use crate::util::sync::{
    lock, read, Arc, AtomicBool, AtomicU64, Mutex, OrderedMutex, OrderedRwLock, Ordering, Rank,
    RwLock,
};

/// Stripes of [`FsInfo::rmw_locks`].
pub const RMW_LOCKS: usize = 64;

/// Pieces at least this large write their copies in parallel (below it a
/// thread costs more than the second copy's write).
pub const PARALLEL_COPY_MIN_BYTES: usize = 128 << 10;

/// Index of a tree in root arrays, in [`tree_id::ALL`] order.
pub fn tree_index(id: u64) -> usize {
    tree_id::ALL
        .iter()
        .position(|&t| t == id)
        .unwrap_or_else(|| panic!("tree {id} is not a fixed tree"))
}

/// Roots of the last committed transaction: an immutable view for scrub,
/// relocation and check.
#[derive(Clone)]
pub struct CommitRoots {
    pub gen: u64,
    /// Fixed trees, in [`tree_id::ALL`] order.
    pub roots: Vec<Arc<Node>>,
    /// Each volume's mapping tree, by volume id.
    pub volumes: BTreeMap<u64, Arc<Node>>,
}

impl CommitRoots {
    /// Root of a fixed tree or of a volume's tree; None for a volume that
    /// did not exist at this commit.
    pub fn tree(&self, id: u64) -> Option<&Arc<Node>> {
        if tree_id::is_volume(id) {
            self.volumes.get(&id)
        } else {
            Some(&self.roots[tree_index(id)])
        }
    }

    /// Every root: the fixed trees, then the volume trees.
    pub fn all(&self) -> impl Iterator<Item = (u64, &Arc<Node>)> {
        tree_id::ALL
            .iter()
            .copied()
            .zip(self.roots.iter())
            .chain(self.volumes.iter().map(|(&id, r)| (id, r)))
    }
}

/// Extents freed by each transaction, (logical, length), not yet reusable.
/// Keyed by generation so a release takes only the ready generations.
type Pinned = BTreeMap<u64, Vec<(u64, u64)>>;

/// Which copy failed and how, for error counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyFault {
    Io,
    Csum,
    Generation,
}

/// What [`FsInfo::new`] starts from: the superblock's identity and the
/// devices, the transaction to run next and the last committed generation.
pub struct FsParams {
    pub pool_uuid: [u8; 16],
    pub csum_type: CsumType,
    pub node_bytes: usize,
    pub label: String,
    pub devices: BTreeMap<u64, Arc<Device>>,
    pub trans: TransState,
    pub committed_gen: u64,
    pub cache_bytes: usize,
}

/// Everything an open pool shares between threads.
pub struct FsInfo {
    pub pool_uuid: [u8; 16],
    pub csum_type: CsumType,
    pub node_bytes: usize,
    pub label: String,
    pub devices: RwLock<BTreeMap<u64, Arc<Device>>>,
    pub mapping: MappingTree,
    pub block_groups: OrderedRwLock<BTreeMap<u64, Arc<BlockGroup>>>,
    /// Block groups whose used bytes reached zero, for the cleaner.
    pub unused_bgs: UnusedList,
    pub cache: NodeCache,
    /// Nodes of a commit whose write-out is still in flight.
    pub writeback: Mutex<HashMap<u64, Arc<Node>>>,
    pub trans: OrderedMutex<TransState>,
    /// Serialises commits and intent log writes (outermost lock of the
    /// commit path); holds where the next log block goes.
    pub commit_lock: OrderedMutex<crate::engine::tree_log::LogRing>,
    /// Flushes write the intent log instead of committing (on unless
    /// `serve --intent-log off`, a switch for comparisons).
    pub intent_log: AtomicBool,
    pub log_stats: crate::engine::tree_log::LogStats,
    /// Time of each commit that wrote a new generation (for metrics).
    pub commit_latency: crate::util::histogram::Histogram,
    pub committed_gen: AtomicU64,
    pub commit_roots: RwLock<CommitRoots>,
    readers: OrderedMutex<BTreeMap<u64, usize>>,
    pinned: OrderedMutex<Pinned>,
    aborted: Mutex<Option<String>>,
    /// Striped locks for read-modify-write of partial sectors, shared by
    /// every handle and connection of every volume.
    pub rmw_locks: [OrderedMutex<()>; RMW_LOCKS],
    /// Client reads and writes so far (scrub yields when it moves).
    pub client_ops: AtomicU64,
    /// Reads do not rewrite bad copies (check, dump-tree).
    pub no_repair: AtomicBool,
    /// Largest new metadata chunk, 0 for the default (btrfs's
    /// `allocation/metadata/chunk_size` in sysfs); not persisted.
    pub metadata_chunk_cap_bytes: AtomicU64,
    /// Device error counters changed since the last commit.
    pub dev_stats_dirty: AtomicBool,
    /// Longest data extent (bounded so its checksum item fits a leaf).
    pub max_extent_bytes: u64,
    /// Pool members that were not given at open (`--degraded`), by devid.
    pub missing: RwLock<BTreeMap<u64, crate::format::DevItem>>,
    /// Relocation steps that want scrub to hold still; scrub waits between
    /// units while this is non-zero (as btrfs pauses scrub around
    /// relocation's critical section).
    pub scrub_hold: AtomicU64,
    /// Serialises relocations, device removals and replaces.
    pub reloc_lock: OrderedMutex<()>,
    /// State that layers above keep per pool (the jobs' slots), by type:
    /// the core holds it without naming those layers.
    extensions: Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
}

/// Registration of a reader of trees as of generation `gen`: extents freed at
/// or after `gen` stay pinned until it drops.
pub struct ReadGuard<'a> {
    fs: &'a FsInfo,
    gen: u64,
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        // Only the last reader of the oldest generation can unpin anything:
        // other drops skip the release (every client read takes a guard).
        let oldest_left = {
            let mut r = lock(&self.fs.readers);
            let oldest = r.keys().next() == Some(&self.gen);
            match r.get_mut(&self.gen) {
                Some(c) if *c > 1 => {
                    *c -= 1;
                    false
                }
                Some(_) => {
                    r.remove(&self.gen);
                    oldest
                }
                None => {
                    debug_assert!(
                        false,
                        "reader of generation {} was not registered",
                        self.gen
                    );
                    false
                }
            }
        };
        if oldest_left {
            self.fs.release_pinned();
        }
    }
}

impl FsInfo {
    /// The shared state of a pool about to be made or opened.
    pub fn new(p: FsParams) -> FsInfo {
        let FsParams {
            pool_uuid,
            csum_type,
            node_bytes,
            label,
            devices,
            trans,
            committed_gen,
            cache_bytes,
        } = p;
        assert!(node_bytes.is_power_of_two() && node_bytes >= 4096);
        let cap = crate::btree::max_item_bytes(node_bytes) / 2;
        let mut sectors = 256u64;
        while sectors > 1 && sectors as usize * csum_type.size_bytes() > cap {
            sectors /= 2;
        }
        FsInfo {
            pool_uuid,
            csum_type,
            node_bytes,
            label,
            devices: RwLock::new(devices),
            mapping: MappingTree::default(),
            block_groups: OrderedRwLock::new(Rank::Leaf, BTreeMap::new()),
            unused_bgs: UnusedList::default(),
            cache: NodeCache::new(cache_bytes, node_bytes),
            writeback: Mutex::new(HashMap::new()),
            trans: OrderedMutex::new(Rank::Trans, trans),
            commit_lock: OrderedMutex::new(
                Rank::Commit,
                crate::engine::tree_log::LogRing::new(committed_gen),
            ),
            intent_log: AtomicBool::new(true),
            log_stats: Default::default(),
            commit_latency: Default::default(),
            committed_gen: AtomicU64::new(committed_gen),
            commit_roots: RwLock::new(CommitRoots {
                gen: committed_gen,
                roots: Vec::new(),
                volumes: BTreeMap::new(),
            }),
            readers: OrderedMutex::new(Rank::Leaf, BTreeMap::new()),
            pinned: OrderedMutex::new(Rank::Leaf, BTreeMap::new()),
            aborted: Mutex::new(None),
            dev_stats_dirty: AtomicBool::new(false),
            rmw_locks: std::array::from_fn(|_| OrderedMutex::new(Rank::Rmw, ())),
            no_repair: AtomicBool::new(false),
            metadata_chunk_cap_bytes: AtomicU64::new(0),
            client_ops: AtomicU64::new(0),
            max_extent_bytes: sectors * SECTOR_BYTES,
            missing: RwLock::new(BTreeMap::new()),
            scrub_hold: AtomicU64::new(0),
            reloc_lock: OrderedMutex::new(Rank::Reloc, ()),
            extensions: Mutex::new(HashMap::new()),
        }
    }

    /// The device `devid` names. A replace target that took its source's
    /// devid stays reachable under its own old devid too, for maps taken
    /// before the rename (its physical layout did not change).
    pub fn device(&self, devid: u64) -> Option<Arc<Device>> {
        read(&self.devices).get(&devid).cloned()
    }
    /// The device whose devid is `devid` (not one only reachable by it, an
    /// alias): what commands naming a devid act on.
    pub fn member(&self, devid: u64) -> Option<Arc<Device>> {
        self.device(devid).filter(|d| d.devid == devid)
    }
    /// The pool's devices, each once (aliases left out).
    pub fn devices(&self) -> Vec<Arc<Device>> {
        read(&self.devices)
            .iter()
            .filter(|(&k, d)| k == d.devid)
            .map(|(_, d)| d.clone())
            .collect()
    }
    /// Devices new chunks may use (not being removed or replaced).
    pub fn alloc_devices(&self) -> Vec<Arc<Device>> {
        self.devices()
            .into_iter()
            .filter(|d| d.allocatable.load(Ordering::Acquire))
            .collect()
    }
    /// Whether the chunk at `start` has a stripe on a missing device.
    pub fn has_missing_stripe(&self, start: u64) -> bool {
        let missing = read(&self.missing);
        if missing.is_empty() {
            return false;
        }
        self.mapping.get(start).is_some_and(|m| {
            m.item
                .stripes
                .iter()
                .any(|s| missing.contains_key(&s.devid))
        })
    }

    /// The block group containing `logical`.
    pub fn block_group(&self, logical: u64) -> Option<Arc<BlockGroup>> {
        let bgs = read(&self.block_groups);
        let (_, bg) = bgs.range(..=logical).next_back()?;
        (logical < bg.end()).then(|| bg.clone())
    }
    /// The pool's value of type `T`, made on first use.
    pub fn extension<T: Any + Send + Sync + Default>(&self) -> Arc<T> {
        let any = lock(&self.extensions)
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Arc::new(T::default()))
            .clone();
        any.downcast::<T>()
            .unwrap_or_else(|_| unreachable!("extensions are keyed by their type"))
    }

    /// The group that starts exactly at `start` (not one containing it).
    pub fn block_group_at(&self, start: u64) -> Option<Arc<BlockGroup>> {
        read(&self.block_groups).get(&start).cloned()
    }
    pub fn block_group_list(&self) -> Vec<Arc<BlockGroup>> {
        read(&self.block_groups).values().cloned().collect()
    }

    /// Fail fast once a transaction has aborted.
    pub fn check_abort(&self) -> Result<()> {
        match &*lock(&self.aborted) {
            Some(m) => Err(Error::Aborted(m.clone())),
            None => Ok(()),
        }
    }
    /// Put the pool in the failed state: no more commits.
    pub fn abort(&self, why: &str) -> Error {
        let mut a = lock(&self.aborted);
        if a.is_none() {
            tracing::error!("pool aborted: {why}");
            *a = Some(why.to_string());
        }
        Error::Aborted(a.clone().unwrap_or_default())
    }
    pub fn is_aborted(&self) -> bool {
        lock(&self.aborted).is_some()
    }

    /// Register a reader of generation `gen` (call with the transaction lock held).
    pub fn register_reader(&self, gen: u64) -> ReadGuard<'_> {
        // A reader of a generation already unpinned past could reach reused
        // space: only the running one and later commits are registered.
        debug_assert!(
            gen >= self.committed_gen.load(Ordering::Acquire),
            "reader registered at generation {gen}, older than the last commit"
        );
        *lock(&self.readers).entry(gen).or_insert(0) += 1;
        ReadGuard { fs: self, gen }
    }

    /// The last committed roots, registered as a reader so that nothing
    /// they reference is reused while the guard lives. Registration happens
    /// under the commit-roots lock: a commit swaps the roots before it
    /// releases pinned extents, so the reader is always seen in time.
    pub fn commit_snapshot(&self) -> (CommitRoots, ReadGuard<'_>) {
        let roots = read(&self.commit_roots);
        let g = self.register_reader(roots.gen);
        (roots.clone(), g)
    }

    /// Record that [logical, +len) was freed by transaction `gen`.
    pub fn pin(&self, gen: u64, logical: u64, len: u64) {
        debug_assert!(len > 0, "pinning nothing at {logical:#x}");
        debug_assert!(
            gen > self.committed_gen.load(Ordering::Acquire),
            "extent {logical:#x} freed by generation {gen}, which is already durable"
        );
        lock(&self.pinned)
            .entry(gen)
            .or_default()
            .push((logical, len));
    }

    /// Bytes pinned, waiting for a commit or for readers.
    pub fn pinned_bytes(&self) -> u64 {
        lock(&self.pinned)
            .values()
            .flatten()
            .map(|&(_, len)| len)
            .sum()
    }

    /// Return pinned extents to free space once their transaction is durable
    /// and no reader that could still see them remains.
    pub fn release_pinned(&self) {
        let committed = self.committed_gen.load(Ordering::Acquire);
        let min_reader = lock(&self.readers)
            .keys()
            .next()
            .copied()
            .unwrap_or(u64::MAX);
        // Generations up to `limit` are ready.
        let limit = committed.min(min_reader.saturating_sub(1));
        let ready: Pinned = {
            let mut p = lock(&self.pinned);
            let keep = p.split_off(&limit.saturating_add(1));
            std::mem::replace(&mut *p, keep)
        };
        for (logical, len) in ready.into_values().flatten() {
            if let Some(bg) = self.block_group(logical) {
                bg.unpin(self, logical, len);
            }
        }
    }

    /// Count a bad copy against its device.
    pub fn count_fault(&self, devid: u64, f: CopyFault) {
        if let Some(d) = self.device(devid) {
            let c = match f {
                CopyFault::Io => &d.stats.read_errs,
                CopyFault::Csum => &d.stats.corruption_errs,
                CopyFault::Generation => &d.stats.generation_errs,
            };
            c.fetch_add(1, Ordering::Relaxed);
            self.dev_stats_dirty.store(true, Ordering::Release);
        }
    }

    /// [`count_fault`](Self::count_fault) unless the reader changes nothing.
    fn count_fault_if(&self, count: bool, devid: u64, f: CopyFault) {
        if count {
            self.count_fault(devid, f);
        }
    }

    /// Read `buf.len()` bytes of one mapped piece from copy `mirror`.
    pub fn read_copy(&self, m: &Mapped, mirror: usize, buf: &mut [u8]) -> Result<()> {
        let (devid, phys) = m.mirrors[mirror];
        let dev = self.device(devid).ok_or_else(|| Error::Device {
            path: format!("devid {devid}").into(),
            msg: "device is missing".into(),
        })?;
        dev.dev.read_at(buf, phys).map_err(|e| Error::DeviceIo {
            path: dev.dev.path().into(),
            op: "read",
            physical: phys,
            len: buf.len() as u64,
            source: e,
        })
    }

    /// Write `data` to one copy of a mapped piece.
    pub fn write_copy(&self, m: &Mapped, mirror: usize, data: &[u8]) -> Result<()> {
        let (devid, phys) = m.mirrors[mirror];
        let dev = self.device(devid).ok_or_else(|| Error::Device {
            path: format!("devid {devid}").into(),
            msg: "device is missing".into(),
        })?;
        dev.dev.write_at(data, phys).map_err(|e| {
            dev.stats.write_errs.fetch_add(1, Ordering::Relaxed);
            self.dev_stats_dirty.store(true, Ordering::Release);
            Error::DeviceIo {
                path: dev.dev.path().into(),
                op: "write",
                physical: phys,
                len: data.len() as u64,
                source: e,
            }
        })
    }

    /// Write `data` at `logical` to every copy.
    pub fn write_logical(&self, logical: u64, data: &[u8]) -> Result<()> {
        let map = self
            .mapping
            .lookup(logical)
            .ok_or(Error::NoChunk { logical })?;
        let pieces = map.map(logical, data.len() as u64)?;
        // A writer that holds a map may be slow to use it (R8).
        crate::failpoint!("write_logical::mapped", map.start());
        let missing = read(&self.missing);
        for p in &pieces {
            let off = (p.logical - logical) as usize;
            let chunk = &data[off..off + p.len as usize];
            // Degraded: tree blocks still reach every present mirror (data
            // never lands in such a group; the allocator avoids it).
            let present: Vec<usize> = (0..p.mirrors.len())
                .filter(|&i| !missing.contains_key(&p.mirrors[i].0))
                .collect();
            let mut written = 0;
            let mut first_err = None;
            for r in self.write_copies(p, &present, chunk) {
                match r {
                    Ok(()) => written += 1,
                    Err(e) => {
                        tracing::warn!("{e}; the other copies carry the write");
                        first_err.get_or_insert(e);
                    }
                }
            }
            // As btrfs: a write stands if one copy made it. The failed copy
            // holds older bytes, which checksums reject and repair replaces;
            // the device's write_errs counts it.
            if written == 0 {
                if let Some(e) = first_err {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Write `data` to the copies `which` of a piece: at once, each on its
    /// own thread, when the piece is large enough to pay for the threads
    /// (a raid1 write then takes as long as its slowest copy, not the sum);
    /// one after another otherwise, and always inside a deterministic
    /// simulation, whose actors must be the only threads that move.
    fn write_copies(&self, p: &Mapped, which: &[usize], data: &[u8]) -> Vec<Result<()>> {
        let serial = which.len() < 2
            || data.len() < PARALLEL_COPY_MIN_BYTES
            || crate::util::sched::in_sim()
            || which.iter().any(|&i| {
                self.device(p.mirrors[i].0)
                    .is_some_and(|d| !d.dev.parallel_writes())
            });
        crate::util::fan_out::each(which, !serial, "copy-writer", |&i| {
            self.write_copy(p, i, data)
        })
    }

    /// Whether I/O to each of `devs` may run on its own thread at once:
    /// not inside a deterministic simulation (its actors must be the only
    /// threads that move), nor on devices that must replay in order.
    pub fn fan_out(&self, devs: &[Arc<Device>]) -> bool {
        devs.len() > 1
            && !crate::util::sched::in_sim()
            && devs.iter().all(|d| d.dev.parallel_writes())
    }

    /// Flush every device. A device whose flush fails is tolerated only if
    /// every chunk it holds has a copy on a device that flushed.
    pub fn flush_devices(&self) -> Result<()> {
        let mut failed = Vec::new();
        // One after another: flushing all at once measured no gain here
        // (bench/fsync_ab.sh) and made tests/enospc.rs's metadata test
        // take 130 s instead of 6 (not understood yet).
        for d in self.devices() {
            if let Err(e) = d.dev.flush() {
                d.stats.flush_errs.fetch_add(1, Ordering::Relaxed);
                self.dev_stats_dirty.store(true, Ordering::Release);
                failed.push(Error::DeviceIo {
                    path: d.dev.path().into(),
                    op: "flush",
                    physical: 0,
                    len: 0,
                    source: e,
                });
            }
        }
        if failed.is_empty() {
            return Ok(());
        }
        let bad: Vec<u64> = self
            .devices()
            .iter()
            .filter(|d| {
                failed
                    .iter()
                    .any(|e| matches!(e, Error::DeviceIo { path, .. } if path == d.dev.path()))
            })
            .map(|d| d.devid)
            .collect();
        let missing = read(&self.missing);
        let uncovered = self.mapping.all().into_iter().any(|m| {
            m.item.stripes.iter().any(|s| bad.contains(&s.devid))
                && !m
                    .item
                    .stripes
                    .iter()
                    .any(|s| !bad.contains(&s.devid) && !missing.contains_key(&s.devid))
        });
        if uncovered || bad.len() == self.devices().len() {
            return Err(failed.remove(0));
        }
        for e in &failed {
            tracing::warn!("{e}; every chunk it holds has a flushed copy elsewhere");
        }
        Ok(())
    }

    /// Read a tree block, trying every copy; a copy that fails is rewritten
    /// from the good one. `expect` = (generation, owner, level) from the parent.
    pub fn read_node(&self, addr: u64, expect: Option<(u64, u64, u8)>) -> Result<Arc<Node>> {
        self.read_node_with(addr, expect, true)
    }

    /// [`read_node`](Self::read_node), choosing whether a bad copy is rewritten.
    pub fn read_node_with(
        &self,
        addr: u64,
        expect: Option<(u64, u64, u8)>,
        repair: bool,
    ) -> Result<Arc<Node>> {
        let map = self
            .mapping
            .lookup(addr)
            .ok_or(Error::NoChunk { logical: addr })?;
        let pieces = map.map(addr, self.node_bytes as u64)?;
        let copies = pieces[0].mirrors.len();
        let mut buf = vec![0u8; self.node_bytes];
        let mut bad = Vec::new();
        let mut last_err = String::new();
        for m in 0..copies {
            let mut ok = true;
            for p in &pieces {
                let off = (p.logical - addr) as usize;
                if let Err(e) = self.read_copy(p, m, &mut buf[off..off + p.len as usize]) {
                    self.count_fault_if(repair, p.mirrors[m].0, CopyFault::Io);
                    last_err = e.to_string();
                    ok = false;
                    break;
                }
            }
            if !ok {
                bad.push(m);
                continue;
            }
            let node = match Node::decode(&buf, addr, &self.pool_uuid, self.csum_type) {
                Ok(n) => n,
                Err(e) => {
                    self.count_fault_if(repair, pieces[0].mirrors[m].0, CopyFault::Csum);
                    last_err = e.to_string();
                    bad.push(m);
                    continue;
                }
            };
            if let Some((gen, owner, level)) = expect {
                // A block of a volume tree may be shared by snapshots and
                // keeps the owner that wrote it: any volume tree will do.
                let owner_ok = node.owner == owner
                    || (tree_id::is_volume(owner) && tree_id::is_volume(node.owner));
                if node.gen != gen || !owner_ok || node.level != level {
                    self.count_fault_if(repair, pieces[0].mirrors[m].0, CopyFault::Generation);
                    last_err = format!(
                        "expected gen {gen} owner {owner} level {level}, found gen {} owner {} level {}",
                        node.gen, node.owner, node.level
                    );
                    bad.push(m);
                    continue;
                }
            }
            for &b in bad
                .iter()
                .filter(|_| repair && !self.no_repair.load(Ordering::Relaxed))
            {
                for p in &pieces {
                    let off = (p.logical - addr) as usize;
                    if self
                        .write_copy(p, b, &buf[off..off + p.len as usize])
                        .is_ok()
                    {
                        tracing::warn!("repaired tree block {addr:#x} on devid {}", p.mirrors[b].0);
                    }
                }
            }
            return Ok(Arc::new(node));
        }
        Err(Error::BadNode {
            logical: addr,
            msg: format!("no good copy among {copies}: {last_err}"),
        })
    }

    /// Load a node through the write-back set and the cache.
    pub fn load_node(&self, addr: u64, gen: u64, owner: u64, level: u8) -> Result<Arc<Node>> {
        self.load_node_with(addr, gen, owner, level, true)
    }

    /// [`load_node`](Self::load_node), choosing whether a bad copy is rewritten.
    pub fn load_node_with(
        &self,
        addr: u64,
        gen: u64,
        owner: u64,
        level: u8,
        repair: bool,
    ) -> Result<Arc<Node>> {
        if let Some(n) = lock(&self.writeback).get(&addr) {
            if n.gen == gen {
                return Ok(n.clone());
            }
        }
        if let Some(n) = self.cache.get(addr, gen) {
            return Ok(n);
        }
        let n = self.read_node_with(addr, Some((gen, owner, level)), repair)?;
        self.cache.insert(n.clone());
        Ok(n)
    }

    /// Ask the device of the copy [`read_data`](Self::read_data) reads
    /// first to start reading [logical, +len) into the page cache. A hint:
    /// an unmapped address or a missing device is left to the read itself.
    pub fn prefetch_data(&self, logical: u64, len: u64) {
        let Some(map) = self.mapping.lookup(logical) else {
            return;
        };
        let Ok(pieces) = map.map(logical, len) else {
            return;
        };
        for p in &pieces {
            let Some(&(devid, phys)) = p.mirrors.first() else {
                continue;
            };
            if let Some(dev) = self.device(devid) {
                dev.dev.prefetch(phys, p.len as usize);
            }
        }
    }

    /// Read data at `logical` into `out`, verifying each sector against
    /// `csums` (one per sector; None = no checksums) and repairing bad copies.
    /// `name` describes the data for errors (volume and LBA).
    pub fn read_data(
        &self,
        logical: u64,
        out: &mut [u8],
        csums: Option<&[u8]>,
        name: &dyn Fn(u64, u64) -> Error,
    ) -> Result<()> {
        let map = self
            .mapping
            .lookup(logical)
            .ok_or(Error::NoChunk { logical })?;
        let pieces = map.map(logical, out.len() as u64)?;
        let cs = self.csum_type.size_bytes();
        let sector = SECTOR_BYTES as usize;
        for p in &pieces {
            let off = (p.logical - logical) as usize;
            let buf = &mut out[off..off + p.len as usize];
            let copies = p.mirrors.len();
            // Copy 0 first, the others only on failure: predictable, and a
            // read then repairs what it finds on the copy it uses.
            let first = 0;
            let sums = csums.map(|c| &c[off / sector * cs..(off + buf.len()) / sector * cs]);
            let whole_ok = self.read_copy(p, first, buf).is_ok();
            if !whole_ok {
                self.count_fault(p.mirrors[first].0, CopyFault::Io);
            }
            let bad: Vec<usize> = (0..buf.len() / sector)
                .filter(|&i| {
                    !whole_ok
                        || sums.is_some_and(|s| !self.csum_type.sector_matches(buf, s, sector, i))
                })
                .collect();
            if whole_ok && !bad.is_empty() {
                for _ in &bad {
                    self.count_fault(p.mirrors[first].0, CopyFault::Csum);
                }
            }
            for i in bad {
                let sec_logical = p.logical + (i * sector) as u64;
                let one = Mapped {
                    logical: sec_logical,
                    len: SECTOR_BYTES,
                    mirrors: p
                        .mirrors
                        .iter()
                        .map(|&(d, ph)| (d, ph + (i * sector) as u64))
                        .collect(),
                };
                let dst = &mut buf[i * sector..(i + 1) * sector];
                let mut failed = vec![first];
                let mut good = false;
                for m in (0..copies).filter(|&m| m != first) {
                    if self.read_copy(&one, m, dst).is_err() {
                        self.count_fault(one.mirrors[m].0, CopyFault::Io);
                        failed.push(m);
                        continue;
                    }
                    let ok =
                        sums.is_none_or(|s| self.csum_type.matches(dst, &s[i * cs..(i + 1) * cs]));
                    if ok {
                        good = true;
                        break;
                    }
                    self.count_fault(one.mirrors[m].0, CopyFault::Csum);
                    failed.push(m);
                }
                if !good {
                    return Err(name(sec_logical, SECTOR_BYTES));
                }
                for &m in failed
                    .iter()
                    .filter(|_| !self.no_repair.load(Ordering::Relaxed))
                {
                    if self.write_copy(&one, m, dst).is_ok() {
                        tracing::warn!(
                            "repaired data sector at logical {sec_logical:#x} on devid {} physical {:#x}",
                            one.mirrors[m].0,
                            one.mirrors[m].1
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

/// Loads nodes without rewriting bad copies (read-only scrub).
pub struct NoRepair<'a>(pub &'a FsInfo);

impl NodeLoader for NoRepair<'_> {
    fn load(&self, child: &Child, owner: u64, level: u8) -> Result<Arc<Node>> {
        self.0
            .load_node_with(child.addr, child.gen, owner, level, false)
    }
}

impl NodeLoader for FsInfo {
    fn load(&self, child: &Child, owner: u64, level: u8) -> Result<Arc<Node>> {
        self.load_node(child.addr, child.gen, owner, level)
    }
}
