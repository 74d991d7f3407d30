//! Which mirror serves a data read (issue 15, "reads spread over mirrors"):
//! the copy whose device has the fewest reads in flight, copy 0 on a tie.
//! A lone reader reads one copy only; concurrent readers of a raid1 volume
//! keep both devices busy.

mod common;

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chunkvol::device::fault::FaultyDevice;
use chunkvol::device::BlockDevice;
use chunkvol::format::Profile;
use chunkvol::{MkfsOptions, Pool};
use common::{mem_devices, pattern};

/// A device that counts the bytes of large reads (data, not 4 KiB tree
/// blocks) and, when `slow`, takes a while for each read, so concurrent
/// reads overlap.
struct Counting {
    inner: Arc<FaultyDevice>,
    data_bytes_read: AtomicU64,
    slow: AtomicBool,
}

impl BlockDevice for Counting {
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.len() > 4096 {
            self.data_bytes_read
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
        }
        if self.slow.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_micros(300));
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
}

const VOLUME_BYTES: u64 = 16 << 20;
const READ_BYTES: usize = 64 << 10;

fn read_all(pool: &Pool, want: &[u8]) {
    let v = pool.volume("v").unwrap();
    let mut buf = vec![0u8; READ_BYTES];
    for (i, chunk) in want.chunks(READ_BYTES).enumerate() {
        v.read_at(&mut buf, (i * READ_BYTES) as u64).unwrap();
        assert!(buf == chunk, "wrong data at {}", i * READ_BYTES);
    }
}

fn take_counts(devs: &[Arc<Counting>]) -> Vec<u64> {
    devs.iter()
        .map(|d| d.data_bytes_read.swap(0, Ordering::Relaxed))
        .collect()
}

#[test]
fn concurrent_reads_spread_over_mirrors_and_a_lone_reader_uses_one() {
    let devs: Vec<Arc<Counting>> = mem_devices(2, 256 << 20)
        .into_iter()
        .map(|inner| {
            Arc::new(Counting {
                inner,
                data_bytes_read: AtomicU64::new(0),
                slow: AtomicBool::new(false),
            })
        })
        .collect();
    let block: Vec<Arc<dyn BlockDevice>> = devs.iter().map(|d| d.clone() as _).collect();
    let opts = MkfsOptions {
        data: Some(Profile::Raid1),
        metadata: Some(Profile::Raid1),
        node_bytes: 4096,
        ..Default::default()
    };
    Pool::mkfs(block.clone(), &opts).unwrap();
    let pool = Pool::open(block).unwrap();
    let data = pattern(15, VOLUME_BYTES as usize);
    let v = pool.create_volume("v", VOLUME_BYTES).unwrap();
    v.write_at(&data, 0).unwrap();
    pool.flush().unwrap();
    take_counts(&devs);

    // One reader: every read finds nothing in flight and takes copy 0.
    read_all(&pool, &data);
    let lone = take_counts(&devs);
    assert_eq!(lone.iter().sum::<u64>(), VOLUME_BYTES, "{lone:?}");
    assert!(
        lone.contains(&0),
        "a lone reader used both mirrors: {lone:?}"
    );

    // Four readers on slow devices: both mirrors serve.
    for d in &devs {
        d.slow.store(true, Ordering::Relaxed);
    }
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| read_all(&pool, &data));
        }
    });
    let spread = take_counts(&devs);
    assert_eq!(spread.iter().sum::<u64>(), 4 * VOLUME_BYTES, "{spread:?}");
    for (i, &b) in spread.iter().enumerate() {
        assert!(
            b >= VOLUME_BYTES,
            "device {i} served {b} of {} bytes: {spread:?}",
            4 * VOLUME_BYTES
        );
    }
}
