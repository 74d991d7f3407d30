//! A FUSE filesystem that loses power on command.
//!
//! Written data that no `fsync`/`fdatasync` has made durable is held in
//! memory, 4 KiB at a time, above a durable copy kept in a backing file on
//! the host. [`CutFs::cut`] is the power cut: each pending block reaches the
//! durable copy or is lost (all lost, or a random subset survives, as a disk
//! with a volatile write cache may do). Files are opened with `direct_io`, so
//! no page cache of the kernel hides a dropped block.
//!
//! Simplifications, stated: the namespace (create, unlink, truncate) is
//! durable at once, and a block is never torn inside its 4 KiB.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

/// Granule of loss: a block survives a cut whole or not at all.
pub const BLOCK_BYTES: u64 = 4096;
/// Bound on data held unsynced: a flush-less writer past it is a test bug.
const PENDING_LIMIT_BYTES: u64 = 1 << 30;
const TTL: Duration = Duration::from_secs(1);
const ROOT: u64 = 1;

/// One regular file.
struct Node {
    name: OsString,
    /// Size as the writers see it.
    size_bytes: u64,
    /// Durable content; sparse.
    backing: File,
    /// Unsynced blocks, whole, by block index.
    pending: BTreeMap<u64, Vec<u8>>,
}

/// Counters of what the filesystem saw and what the cuts did.
#[derive(Clone, Copy, Debug, Default)]
pub struct CutStats {
    pub cuts: u64,
    pub syncs: u64,
    /// Writes through a file opened with O_DSYNC or O_SYNC: durable on
    /// return, and only their own blocks.
    pub sync_writes: u64,
    /// Cuts that found unsynced blocks.
    pub cuts_with_pending: u64,
    pub blocks_dropped: u64,
    pub blocks_kept: u64,
}

struct State {
    dir: PathBuf,
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    pending_bytes: u64,
    stats: CutStats,
}

impl State {
    fn by_name(&self, name: &OsStr) -> Option<u64> {
        self.nodes
            .iter()
            .find(|(_, n)| n.name == name)
            .map(|(i, _)| *i)
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        if ino == ROOT {
            return Some(attr(ino, 0, FileType::Directory, 0o755));
        }
        self.nodes
            .get(&ino)
            .map(|n| attr(ino, n.size_bytes, FileType::RegularFile, 0o644))
    }

    /// Current content of one block: pending, else durable, else zeroes.
    fn block(&self, n: &Node, idx: u64) -> Vec<u8> {
        if let Some(b) = n.pending.get(&idx) {
            return b.clone();
        }
        let mut b = vec![0u8; BLOCK_BYTES as usize];
        let mut done = 0;
        while done < b.len() {
            match n
                .backing
                .read_at(&mut b[done..], idx * BLOCK_BYTES + done as u64)
            {
                Ok(0) => break,
                Ok(k) => done += k,
                Err(e) => panic!("cutfs backing read: {e}"),
            }
        }
        b
    }

    fn write(&mut self, ino: u64, offset: u64, data: &[u8], durable: bool) -> Result<(), Errno> {
        let n = self.nodes.get(&ino).ok_or(Errno::ENOENT)?;
        let mut updates = Vec::new();
        let mut pos = 0usize;
        while pos < data.len() {
            let at = offset + pos as u64;
            let idx = at / BLOCK_BYTES;
            let inner = (at % BLOCK_BYTES) as usize;
            let take = (BLOCK_BYTES as usize - inner).min(data.len() - pos);
            let mut b = self.block(n, idx);
            b[inner..inner + take].copy_from_slice(&data[pos..pos + take]);
            updates.push((idx, b));
            pos += take;
        }
        let n = self.nodes.get_mut(&ino).expect("looked up above");
        for (idx, b) in updates {
            if durable {
                Self::persist(n, idx, &b);
                if n.pending.remove(&idx).is_some() {
                    self.pending_bytes -= BLOCK_BYTES;
                }
            } else if n.pending.insert(idx, b).is_none() {
                self.pending_bytes += BLOCK_BYTES;
            }
        }
        self.stats.sync_writes += u64::from(durable);
        n.size_bytes = n.size_bytes.max(offset + data.len() as u64);
        assert!(
            self.pending_bytes <= PENDING_LIMIT_BYTES,
            "cutfs: {} bytes written without a sync",
            self.pending_bytes
        );
        Ok(())
    }

    fn read(&self, ino: u64, offset: u64, len: u64) -> Result<Vec<u8>, Errno> {
        let n = self.nodes.get(&ino).ok_or(Errno::ENOENT)?;
        let end = (offset + len).min(n.size_bytes);
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut at = offset;
        while at < end {
            let idx = at / BLOCK_BYTES;
            let inner = (at % BLOCK_BYTES) as usize;
            let take = (BLOCK_BYTES - inner as u64).min(end - at) as usize;
            out.extend_from_slice(&self.block(n, idx)[inner..inner + take]);
            at += take as u64;
        }
        Ok(out)
    }

    /// Makes one pending block durable.
    fn persist(n: &Node, idx: u64, b: &[u8]) {
        n.backing
            .write_all_at(b, idx * BLOCK_BYTES)
            .unwrap_or_else(|e| panic!("cutfs backing write: {e}"));
    }

    fn sync(&mut self, ino: u64) -> Result<(), Errno> {
        let n = self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        let pending = std::mem::take(&mut n.pending);
        for (idx, b) in &pending {
            Self::persist(n, *idx, b);
        }
        self.pending_bytes -= pending.len() as u64 * BLOCK_BYTES;
        self.stats.syncs += 1;
        Ok(())
    }

    fn truncate(&mut self, ino: u64, size_bytes: u64) -> Result<(), Errno> {
        let n = self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        let first_gone = size_bytes.div_ceil(BLOCK_BYTES);
        let gone = n.pending.split_off(&first_gone);
        self.pending_bytes -= gone.len() as u64 * BLOCK_BYTES;
        if !size_bytes.is_multiple_of(BLOCK_BYTES) {
            // The tail of a kept partial block reads as zeroes afterwards.
            let idx = size_bytes / BLOCK_BYTES;
            if let Some(b) = n.pending.get_mut(&idx) {
                b[(size_bytes % BLOCK_BYTES) as usize..].fill(0);
            }
        }
        n.backing
            .set_len(size_bytes)
            .unwrap_or_else(|e| panic!("cutfs backing truncate: {e}"));
        n.size_bytes = size_bytes;
        Ok(())
    }
}

fn attr(ino: u64, size_bytes: u64, kind: FileType, perm: u16) -> FileAttr {
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    FileAttr {
        ino: INodeNo(ino),
        size: size_bytes,
        blocks: size_bytes.div_ceil(512),
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind,
        perm,
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLOCK_BYTES as u32,
        flags: 0,
    }
}

/// The filesystem, shared between the FUSE session and the test.
#[derive(Clone)]
pub struct CutFs(Arc<Mutex<State>>);

/// A mounted [`CutFs`]; unmounts on drop.
pub struct Mounted {
    pub fs: CutFs,
    pub mnt: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

impl CutFs {
    /// Mounts a new, empty filesystem at `mnt`; durable data goes to `backing_dir`.
    pub fn mount(mnt: &Path, backing_dir: &Path) -> Mounted {
        assert!(
            Path::new("/dev/fuse").exists(),
            "/dev/fuse is missing: the power-loss tests need FUSE"
        );
        std::fs::create_dir_all(mnt).unwrap();
        std::fs::create_dir_all(backing_dir).unwrap();
        let fs = CutFs(Arc::new(Mutex::new(State {
            dir: backing_dir.to_path_buf(),
            nodes: HashMap::new(),
            next_ino: ROOT + 1,
            pending_bytes: 0,
            stats: CutStats::default(),
        })));
        let mut cfg = Config::default();
        cfg.mount_options = vec![MountOption::FSName("cutfs".into())];
        cfg.n_threads = Some(2);
        let session = fuser::spawn_mount(fs.clone(), mnt, &cfg)
            .unwrap_or_else(|e| panic!("cannot mount cutfs at {}: {e}", mnt.display()));
        Mounted {
            fs,
            mnt: mnt.to_path_buf(),
            session: Some(session),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The power cut. `keep_per_mille` of the pending blocks, chosen by
    /// `rng`, reach the durable copy; the rest are lost.
    pub fn cut(&self, keep_per_mille: u64, rng: &mut impl FnMut() -> u64) {
        let mut st = self.state();
        let mut kept = 0;
        let mut dropped = 0;
        for n in st.nodes.values_mut() {
            for (idx, b) in std::mem::take(&mut n.pending) {
                if rng() % 1000 < keep_per_mille {
                    State::persist(n, idx, &b);
                    kept += 1;
                } else {
                    dropped += 1;
                }
            }
            n.size_bytes = n.backing.metadata().map(|m| m.len()).unwrap_or(0);
        }
        st.pending_bytes = 0;
        st.stats.cuts += 1;
        st.stats.cuts_with_pending += u64::from(kept + dropped > 0);
        st.stats.blocks_kept += kept;
        st.stats.blocks_dropped += dropped;
    }

    pub fn stats(&self) -> CutStats {
        self.state().stats
    }
}

impl Mounted {
    pub fn path(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            if let Err(e) = s.umount_and_join() {
                eprintln!("cutfs: unmount of {}: {e}", self.mnt.display());
            }
        }
    }
}

impl Filesystem for CutFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let st = self.state();
        match st.by_name(name).filter(|_| parent.0 == ROOT) {
            Some(ino) => reply.entry(&TTL, &st.attr(ino).unwrap(), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.state().attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut st = self.state();
        if let Some(sz) = size {
            if let Err(e) = st.truncate(ino.0, sz) {
                return reply.error(e);
            }
        }
        match st.attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut st = self.state();
        let Some(ino) = st.by_name(name) else {
            return reply.error(Errno::ENOENT);
        };
        let n = st.nodes.remove(&ino).expect("found by name");
        st.pending_bytes -= n.pending.len() as u64 * BLOCK_BYTES;
        let _ = std::fs::remove_file(st.dir.join(&n.name));
        reply.ok();
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.state().nodes.contains_key(&ino.0) {
            reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        if parent.0 != ROOT {
            return reply.error(Errno::ENOENT);
        }
        let mut st = self.state();
        let ino = match st.by_name(name) {
            Some(ino) => ino,
            None => {
                let path = st.dir.join(name);
                let backing = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)
                    .unwrap_or_else(|e| panic!("cutfs backing {}: {e}", path.display()));
                let ino = st.next_ino;
                st.next_ino += 1;
                let node = Node {
                    name: name.to_os_string(),
                    size_bytes: 0,
                    backing,
                    pending: BTreeMap::new(),
                };
                st.nodes.insert(ino, node);
                ino
            }
        };
        let a = st.attr(ino).unwrap();
        reply.created(
            &TTL,
            &a,
            Generation(0),
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO,
        );
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.state().read(ino.0, offset, u64::from(size)) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // The kernel passes the open flags; with direct_io it sends no
        // fsync after an O_DSYNC write, so the filesystem keeps the promise.
        // (O_SYNC includes the O_DSYNC bit.)
        let durable = flags.0 & rustix::fs::OFlags::DSYNC.bits() as i32 != 0;
        match self.state().write(ino.0, offset, data, durable) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) makes nothing durable.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.state().sync(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let st = self.state();
        let mut entries: Vec<(u64, FileType, OsString)> = vec![
            (ROOT, FileType::Directory, ".".into()),
            (ROOT, FileType::Directory, "..".into()),
        ];
        let mut files: Vec<_> = st
            .nodes
            .iter()
            .map(|(i, n)| (*i, FileType::RegularFile, n.name.clone()))
            .collect();
        files.sort_by_key(|f| f.0);
        entries.extend(files);
        for (k, (i, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(i), k as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(1 << 24, 1 << 23, 1 << 23, 1 << 20, 1 << 19, 4096, 255, 4096);
    }
}
