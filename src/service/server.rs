//! `chunkvol serve`: owns a pool, serves every volume as an NBD export,
//! commits in the background, runs the cleaner, and answers the control
//! socket.

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::data::volume::Volume;
use crate::device::owner_note_path;
use crate::format::Profile;
use crate::nbd::{self, Export, ExportProvider};
use crate::pool::{MkfsOptions, Pool};
use crate::util::error::{Error, Result};
use crate::util::sync::{thread, Arc, AtomicBool, Ordering};

/// Demo pool: directory, device size, volume size.
pub const DEMO_DIR: &str = "chunkvol-data";
pub const DEMO_DEVICE_BYTES: u64 = 4 << 30;
pub const DEMO_VOLUME_BYTES: u64 = 4 << 30;

/// Settings of `chunkvol serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// "ADDR:PORT" or "unix:PATH".
    pub listen: String,
    pub socket: Option<PathBuf>,
    pub commit_interval: Duration,
    pub devs: Vec<PathBuf>,
    /// Relocate groups used below this percent in the background (0: off).
    pub reclaim_threshold_percent: u64,
    /// Open although members are missing.
    pub degraded: bool,
    /// Export every volume read-only.
    pub read_only: bool,
    /// Serve NBD over TLS.
    pub tls: Option<TlsFiles>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    pub metrics: Option<std::net::SocketAddr>,
    /// Flushes write the intent log (false: every flush commits).
    pub intent_log: bool,
    /// Print the ready banner as one JSON object (`--json`).
    pub json_banner: bool,
}

/// `serve --tls-cert/--tls-key/--tls-client-ca/--tls`.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    /// Refuse clients that do not start TLS.
    pub required: bool,
}

impl TlsFiles {
    fn load(&self) -> Result<nbd::TlsSetup> {
        let config = nbd::load_tls_config(&self.cert, &self.key, self.client_ca.as_deref())
            .map_err(Error::Invalid)?;
        Ok(nbd::TlsSetup {
            config: Arc::new(config),
            required: self.required,
        })
    }
}

/// A volume served over NBD; `read_only` is the server's `--read-only`
/// (a volume's own read-only flag is checked by the volume itself). The pool
/// answers its dirty bitmaps: one per snapshot, what changed since it.
struct VolumeExport(Volume, bool, Pool);

impl VolumeExport {
    fn writable(&self) -> std::io::Result<()> {
        if self.1 {
            let msg = format!("volume {}: the server exports it read-only", self.0.name());
            return Err(std::io::Error::new(
                std::io::ErrorKind::ReadOnlyFilesystem,
                msg,
            ));
        }
        Ok(())
    }
}

impl Export for VolumeExport {
    fn size_bytes(&self) -> u64 {
        self.0.size_bytes().unwrap_or(0)
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        Ok(self.0.read_at(buf, offset)?)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> std::io::Result<()> {
        self.writable()?;
        self.0.write_at(data, offset)?;
        if fua {
            self.0.flush()?;
        }
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(self.0.flush()?)
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> std::io::Result<()> {
        self.writable()?;
        self.0.discard(offset, len)?;
        if fua {
            self.0.flush()?;
        }
        Ok(())
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _may_unmap: bool,
        fua: bool,
    ) -> std::io::Result<()> {
        self.writable()?;
        // Zeroes are always holes here: a thin volume reads them back as
        // zeroes without storing them, so NO_HOLE changes nothing we keep.
        self.0.write_zeroes(offset, len)?;
        if fua {
            self.0.flush()?;
        }
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> std::io::Result<Vec<(u64, u32)>> {
        Ok(self
            .0
            .block_status(offset, len)?
            .into_iter()
            .map(|e| (e.len, if e.allocated { 0 } else { 3 }))
            .collect())
    }
    fn read_only(&self) -> bool {
        self.1 || self.0.read_only().unwrap_or(false)
    }
    fn dirty_bitmaps(&self) -> Vec<String> {
        let mut names = self.2.snapshot_names();
        names.retain(|n| n != self.0.name());
        names
    }
    fn dirty_status(
        &self,
        bitmap: &str,
        offset: u64,
        len: u64,
    ) -> std::io::Result<Vec<(u64, u32)>> {
        let changed = self.2.volume_diff(bitmap, self.0.name())?;
        Ok(dirty_extents(&changed, offset, len))
    }
}

/// `changed` (sorted, disjoint byte ranges) as NBD dirty-bitmap extents
/// covering exactly [offset, offset+len): flag 1 where changed, 0 elsewhere.
fn dirty_extents(changed: &[(u64, u64)], offset: u64, len: u64) -> Vec<(u64, u32)> {
    let end = offset + len;
    let mut out = Vec::new();
    let mut pos = offset;
    let first = changed.partition_point(|&(o, l)| o + l <= offset);
    for &(o, l) in changed[first..].iter().take_while(|&&(o, _)| o < end) {
        let (s, e) = (o.max(pos), (o + l).min(end));
        if s > pos {
            out.push((s - pos, 0));
        }
        out.push((e - s, 1));
        pos = e;
    }
    if pos < end {
        out.push((end - pos, 0));
    }
    out
}

struct PoolExports(Pool, bool);

impl ExportProvider for PoolExports {
    fn list(&self) -> Vec<String> {
        self.0.volume_names()
    }
    fn open(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.0
            .volume(name)
            .ok()
            .map(|v| Arc::new(VolumeExport(v, self.1, self.0.clone())) as Arc<dyn Export>)
    }
    fn default_name(&self) -> Option<String> {
        let names = self.0.volume_names();
        if names.iter().any(|n| n == "disk0") {
            return Some("disk0".into());
        }
        names.into_iter().next()
    }
}

/// Create the demo pool if it does not exist; return its device paths.
pub fn demo_pool(dir: &Path) -> Result<Vec<PathBuf>> {
    let devs = vec![dir.join("dev1.img"), dir.join("dev2.img")];
    let exist: Vec<bool> = devs.iter().map(|d| d.exists()).collect();
    if exist.iter().all(|&e| e) {
        return Ok(devs);
    }
    if exist.iter().any(|&e| e) {
        return Err(Error::Invalid(format!(
            "demo pool in {} is incomplete: one device file is missing",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::Device {
        path: dir.into(),
        msg: format!("cannot create directory: {e}"),
    })?;
    let opts = MkfsOptions {
        data: Some(Profile::Raid1),
        metadata: Some(Profile::Raid1),
        ..Default::default()
    };
    Pool::mkfs_paths(&devs, Some(DEMO_DEVICE_BYTES), &opts)?;
    let pool = Pool::open_paths(&devs)?;
    pool.create_volume("disk0", DEMO_VOLUME_BYTES)?;
    pool.close()?;
    // On stderr: stdout carries only the banner (one JSON line under --json).
    eprintln!(
        "created demo pool in {}: two {} GiB sparse devices, raid1, volume disk0",
        dir.display(),
        DEMO_DEVICE_BYTES >> 30
    );
    Ok(devs)
}

/// A device replace a crash or a restart interrupted goes on, as btrfs
/// continues one at mount.
fn resume_replace(pool: &Pool) {
    use crate::jobs::dev_replace;
    let interrupted =
        dev_replace::status(pool.fs()).is_some_and(|s| s.state == dev_replace::State::Interrupted);
    if interrupted {
        match dev_replace::resume(pool.fs(), false) {
            Ok(_) => tracing::info!("resumed the interrupted device replace"),
            Err(e) => tracing::warn!("cannot resume the interrupted device replace: {e}"),
        }
    }
}

/// Background commits and the cleaner.
fn background(pool: Pool, interval: Duration, stop: Arc<AtomicBool>) {
    let fs = pool.fs().clone();
    let mut last = Instant::now();
    while !stop.load(Ordering::Acquire) {
        thread::sleep(Duration::from_millis(200));
        if fs.is_aborted() {
            continue;
        }
        if last.elapsed() >= interval {
            last = Instant::now();
            if let Err(e) = crate::engine::transaction::commit(&fs) {
                tracing::error!("background commit: {e}");
                continue;
            }
        }
        if !crate::util::sync::lock(&fs.trans).dead_volumes.is_empty() {
            let stop = || stop.load(Ordering::Acquire) || fs.is_aborted();
            if let Err(e) = crate::jobs::cleaner::drop_dead_volumes(&fs, &stop) {
                tracing::error!("cleaner: dropping deleted volumes: {e}");
            }
        }
        let pending = !fs.unused_bgs.is_empty();
        if pending {
            match crate::engine::block_group::delete_unused_bgs(&fs) {
                Ok(p) if p.deleted > 0 => {
                    if let Err(e) = crate::engine::transaction::commit(&fs) {
                        tracing::error!("commit after cleaner: {e}");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::error!("cleaner: {e}"),
            }
        }
    }
}

/// Seconds between automatic reclaim passes.
const RECLAIM_INTERVAL: Duration = Duration::from_secs(2);

fn reclaimer(pool: Pool, threshold_percent: u64, stop: Arc<AtomicBool>) {
    let fs = pool.fs().clone();
    let mut last = Instant::now();
    while !stop.load(Ordering::Acquire) {
        thread::sleep(Duration::from_millis(100));
        if fs.is_aborted() || last.elapsed() < RECLAIM_INTERVAL {
            continue;
        }
        last = Instant::now();
        match crate::jobs::cleaner::reclaim_pass(&fs, threshold_percent) {
            // Another one may be waiting: go again at once.
            Ok(Some(_)) => last -= RECLAIM_INTERVAL,
            Ok(None) => {}
            Err(e) => tracing::warn!("reclaim: {e}"),
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// Run the server until SIGINT or SIGTERM. Returns the exit code.
pub fn run(cfg: ServeConfig) -> Result<()> {
    let devs = if cfg.devs.is_empty() {
        demo_pool(Path::new(DEMO_DIR))?
    } else {
        cfg.devs.clone()
    };
    // Bad TLS files fail before the pool is opened.
    let tls = cfg.tls.as_ref().map(TlsFiles::load).transpose()?;
    let metrics = cfg.metrics.map(crate::service::metrics::bind).transpose()?;
    let pool = Pool::open_paths_with(
        &devs,
        crate::pool::OpenOptions {
            degraded: cfg.degraded,
            ..Default::default()
        },
    )?;
    pool.fs()
        .intent_log
        .store(cfg.intent_log, Ordering::Relaxed);
    resume_replace(&pool);
    let (sock_path, control) = bind_control(cfg.socket.clone(), &devs)?;
    let listener = bind_listener(&cfg.listen)?;
    for d in &devs {
        let _ = std::fs::write(
            owner_note_path(d),
            format!(
                "held by chunkvol serve pid {}, control socket {}",
                std::process::id(),
                sock_path.display()
            ),
        );
    }
    let server = nbd::Server::new(
        Arc::new(PoolExports(pool.clone(), cfg.read_only)),
        nbd::ServerConfig {
            tls,
            ..Default::default()
        },
    );
    let stop = Arc::new(AtomicBool::new(false));
    install_signal_handlers(stop.clone(), server.shutdown_handle())?;
    let ctl = {
        let (p, s) = (pool.clone(), stop.clone());
        thread::spawn(move || crate::service::control::serve(p, control, s))
    };
    let bg = {
        let (p, s, i) = (pool.clone(), stop.clone(), cfg.commit_interval);
        thread::spawn(move || background(p, i, s))
    };
    let metrics = metrics.map(|l| {
        let (p, s) = (pool.clone(), stop.clone());
        crate::service::metrics::spawn(l, p, server.metrics(), s)
    });
    let reclaim = (cfg.reclaim_threshold_percent > 0).then(|| {
        let (p, s, t) = (pool.clone(), stop.clone(), cfg.reclaim_threshold_percent);
        thread::spawn(move || reclaimer(p, t, s))
    });
    let tls_required = cfg.tls.as_ref().is_some_and(|t| t.required);
    print_banner(
        &pool,
        (&listener, &cfg.listen, tls_required),
        &sock_path,
        cfg.json_banner,
    );
    let served = match listener {
        Listener::Tcp(l) => server.serve_tcp(l),
        Listener::Unix(l, p) => {
            let r = server.serve_unix(l);
            let _ = std::fs::remove_file(p);
            r
        }
    };
    stop.store(true, Ordering::Release);
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let _ = ctl.join();
    let _ = bg.join();
    if let Some(r) = reclaim {
        let _ = r.join();
    }
    // Not joined: a scraper that never reads its reply must not hold up
    // shutdown. The thread sees `stop` within its poll interval otherwise.
    drop(metrics);
    let closed = pool.close();
    let _ = std::fs::remove_file(&sock_path);
    for d in &devs {
        let _ = std::fs::remove_file(owner_note_path(d));
    }
    served.map_err(|e| Error::Invalid(format!("NBD server: {e}")))?;
    closed
}

/// Bind the control socket (default: beside the first device), refusing
/// when another server still answers on it; a stale file is replaced.
fn bind_control(socket: Option<PathBuf>, devs: &[PathBuf]) -> Result<(PathBuf, UnixListener)> {
    let sock_path = socket.unwrap_or_else(|| {
        devs[0]
            .parent()
            .map(|p| p.join("chunkvol.sock"))
            .unwrap_or_else(|| PathBuf::from("chunkvol.sock"))
    });
    let sock_path = std::path::absolute(&sock_path).unwrap_or(sock_path);
    if std::os::unix::net::UnixStream::connect(&sock_path).is_ok() {
        return Err(Error::Busy(format!(
            "{}: another chunkvol serve is answering on this control socket",
            sock_path.display()
        )));
    }
    let control = bind_private(&sock_path).map_err(|e| Error::Device {
        path: sock_path.clone(),
        msg: format!("cannot bind control socket: {e}"),
    })?;
    Ok((sock_path, control))
}

/// Binds a Unix socket that is never reachable with a wider mode than 0600:
/// it is bound in a fresh 0700 directory, set to 0600, then renamed into
/// place. Control commands act as the server (import and export open
/// files), so only its owner may connect (and `control` checks the peer).
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let parent = path.parent().unwrap_or(Path::new("."));
    let tmp_dir = parent.join(format!(".chunkvol-sock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp_dir);
    std::fs::DirBuilder::new().mode(0o700).create(&tmp_dir)?;
    let tmp = tmp_dir.join("sock");
    let bound = UnixListener::bind(&tmp).and_then(|l| {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, path)?;
        Ok(l)
    });
    let _ = std::fs::remove_dir_all(&tmp_dir);
    bound
}

/// `--listen` is ADDR:PORT, or unix:PATH (a stale socket file is replaced).
fn bind_listener(listen: &str) -> Result<Listener> {
    Ok(if let Some(p) = listen.strip_prefix("unix:") {
        let _ = std::fs::remove_file(p);
        Listener::Unix(
            UnixListener::bind(p).map_err(|e| Error::Device {
                path: p.into(),
                msg: format!("cannot listen: {e}"),
            })?,
            p.into(),
        )
    } else {
        Listener::Tcp(
            TcpListener::bind(listen)
                .map_err(|e| Error::Invalid(format!("cannot listen on {listen}: {e}")))?,
        )
    })
}

/// The first signal drains in-flight requests and stops; a second one
/// exits at once.
fn install_signal_handlers(stop: Arc<AtomicBool>, shutdown: nbd::ShutdownHandle) -> Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .map_err(|e| Error::Invalid(format!("cannot install signal handlers: {e}")))?;
    thread::spawn(move || {
        let mut seen = 0;
        for sig in signals.forever() {
            seen += 1;
            if seen == 1 {
                tracing::info!("signal {sig}: finishing in-flight requests, then exiting");
                stop.store(true, Ordering::Release);
                shutdown.shutdown();
            } else {
                // Acknowledged flushes are durable already.
                std::process::exit(130);
            }
        }
    });
    Ok(())
}

/// Tell the user where to connect; flushed, since scripts wait for it.
/// `nbd://` or, when TLS is required, `nbds://` (as libnbd spells it).
fn print_banner(
    pool: &Pool,
    (listener, listen, tls): (&Listener, &str, bool),
    sock_path: &Path,
    json: bool,
) {
    let scheme = if tls { "nbds" } else { "nbd" };
    let exports = pool.volume_names();
    let uri = match listener {
        Listener::Tcp(l) => {
            let a = l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or(listen.to_string());
            format!("{scheme}://{a}")
        }
        Listener::Unix(_, p) => format!("{scheme}+unix:///?socket={}", p.display()),
    };
    if json {
        let v = serde_json::json!({
            "exports": exports,
            "uri": uri,
            "control_socket": sock_path,
        });
        println!("{v}");
    } else {
        print_banner_text(listener, &uri, &exports, sock_path);
    }
    {
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
    // Under systemd (Type=notify): ready once the listeners are bound.
    let status = format!("serving {} on {uri}", exports.join(", "));
    let ready = [
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status),
    ];
    if let Err(e) = sd_notify::notify(&ready) {
        tracing::warn!("sd_notify: {e}");
    }
}

fn print_banner_text(listener: &Listener, uri: &str, exports: &[String], sock_path: &Path) {
    let first = exports.first().cloned().unwrap_or_else(|| "NAME".into());
    println!("chunkvol serving {} on {uri}", exports.join(", "));
    println!("control socket: {}", sock_path.display());
    match listener {
        Listener::Tcp(_) => println!("try: nbdinfo {uri}/{first}"),
        Listener::Unix(_, p) => {
            println!("try: nbdinfo 'nbd+unix:///{first}?socket={}'", p.display())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::dirty_extents;

    #[test]
    fn dirty_extents_cover_the_range_exactly() {
        let changed = [(0, 10), (20, 5), (40, 100)];
        assert_eq!(
            dirty_extents(&changed, 5, 40),
            [(5, 1), (10, 0), (5, 1), (15, 0), (5, 1)]
        );
        assert_eq!(dirty_extents(&changed, 10, 10), [(10, 0)]);
        assert_eq!(dirty_extents(&changed, 50, 10), [(10, 1)]);
        assert_eq!(dirty_extents(&[], 0, 7), [(7, 0)]);
    }
}
