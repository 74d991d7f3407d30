//! Transmission phase of one connection.
//!
//! The calling thread reads and validates requests, then hands them to a
//! fixed pool of worker threads through a bounded queue; replies may complete
//! out of order and leave through a [`ReplySink`], which sends whatever is
//! queued in one vectored write. Memory is bounded by a
//! [`ByteBudget`]: the reader reserves a request's data size before buffering
//! a WRITE payload or queueing a READ, and the reservation is returned when
//! the reply has been sent.

use std::io::{self, Read};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;

use thiserror::Error;

use super::budget::{ByteBudget, Permit};
use super::command::{
    block_status_descriptors, validate, Limits, Op, Rejection, BASE_ALLOCATION_FLAGS,
    DIRTY_BITMAP_FLAGS,
};
use super::errno::nbd_error_from_io;
use super::export::Export;
use super::handshake::{MetaContext, Negotiated};
use super::io_util::read_exact_or_eof;
use super::ordering::{WriteOrder, WriteTicket};
use super::payload::{Payload, PayloadPool};
use super::proto::*;
use super::queue::JobQueue;
use super::reply::ReplySink;
use super::stream::Stream;
use crate::util::aligned::DIRECT_IO_ALIGN;

/// Requests parsed but not yet picked up by a worker, per connection. Data
/// is bounded by the byte budget; this bounds the count of data-less ones.
pub const MAX_QUEUED_REQUESTS_PER_CONN: usize = 64;

/// Tuning for one connection's transmission phase.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub worker_threads: usize,
    pub max_in_flight_bytes: usize,
}

/// Why a transmission phase ended.
#[derive(Debug, Error)]
pub enum EndReason {
    #[error("client sent NBD_CMD_DISC")]
    Disconnect,
    #[error("client closed the connection")]
    Closed,
    #[error("client closed the connection mid-request")]
    Truncated,
    #[error("protocol violation: {0}")]
    BadRequest(ProtoError),
    #[error("write payload of {0} bytes exceeds the {MAX_PAYLOAD_BYTES} byte limit")]
    OversizedWrite(u32),
    #[error("i/o error reading requests: {0}")]
    Io(io::Error),
    #[error("sending a reply failed")]
    ReplyFailed,
    #[error("could not start worker threads: {0}")]
    NoWorkers(io::Error),
}

/// Counters reported when a connection closes.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    /// The server's counters, shared by every connection.
    pub server: std::sync::Arc<super::metrics::Metrics>,
}

/// A reply and the budget it holds until it has been written.
struct Outgoing<'a> {
    reply: Reply<'a>,
    _permit: Permit<'a>,
}

impl std::ops::Deref for Outgoing<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.reply
    }
}

/// The reply queue of one connection. Kept out of [`Conn`]: its replies
/// borrow the connection's buffers and budget.
type Replies<'a> = ReplySink<Outgoing<'a>>;

/// Queues a reply that holds no budget (a refusal by the reader).
fn reply_now<'a>(conn: &'a Conn<'a>, replies: &Replies<'a>, reply: Vec<u8>) {
    replies.send(Outgoing {
        reply: Reply::Owned(reply),
        _permit: conn.budget.acquire(0),
    });
}

/// State shared by the reader and the workers of one connection.
struct Conn<'a> {
    export: &'a dyn Export,
    limits: Limits,
    /// Selected metadata contexts, answered in this order by BLOCK_STATUS.
    meta_contexts: &'a [(u32, MetaContext)],
    budget: ByteBudget,
    order: WriteOrder,
    payloads: PayloadPool,
    stats: &'a Stats,
}

/// One validated request on its way to a worker.
struct Job<'a> {
    cookie: u64,
    op: Op,
    /// WRITE data.
    payload: Payload<'a>,
    /// For FLUSH: writes registered before this point must finish first.
    flush_barrier: u64,
    ticket: Option<WriteTicket<'a>>,
    _permit: Permit<'a>,
}

/// Serves requests until the client disconnects or breaks the protocol, then
/// waits for every in-flight request to be answered.
pub fn serve<R: Read>(
    reader: &mut R,
    writer: Box<dyn Stream>,
    session: &Negotiated,
    limits: ConnLimits,
    stats: &Stats,
    thread_name: &str,
) -> EndReason {
    let conn = Conn {
        export: session.export.as_ref(),
        limits: Limits {
            export_size_bytes: session.size_bytes,
            structured_replies: session.structured_replies,
            meta_contexts: !session.meta_contexts.is_empty(),
            read_only: session.transmission_flags & NBD_FLAG_READ_ONLY != 0,
        },
        meta_contexts: &session.meta_contexts,
        budget: ByteBudget::new(limits.max_in_flight_bytes),
        order: WriteOrder::default(),
        payloads: PayloadPool::default(),
        stats,
    };
    let queue = JobQueue::<Job>::new(MAX_QUEUED_REQUESTS_PER_CONN);
    let replies = ReplySink::new(writer);
    let end = thread::scope(|s| {
        let mut spawn_error = None;
        let mut workers = 0;
        for i in 0..limits.worker_threads.max(1) {
            let spawned = thread::Builder::new()
                .name(format!("{thread_name}-w{i}"))
                .spawn_scoped(s, || worker_loop(&conn, &queue, &replies));
            match spawned {
                Ok(_) => workers += 1,
                Err(e) => spawn_error = Some(e),
            }
        }
        if workers == 0 {
            return EndReason::NoWorkers(spawn_error.unwrap_or_else(|| io::Error::other("none")));
        }
        // Closing the queue when reading stops (even by a panic) lets the
        // workers drain it and exit; the scope then joins them.
        let _close = Closer {
            queue: &queue,
            only_on_panic: false,
        };
        read_loop(reader, &conn, &queue, &replies)
    });
    match end {
        // Our own shutdown after a failed reply shows up as an EOF.
        EndReason::Closed | EndReason::Truncated if replies.is_broken() => EndReason::ReplyFailed,
        end => end,
    }
}

/// Closes the job queue when dropped (or only when dropped by a panic).
struct Closer<'q, 'a> {
    queue: &'q JobQueue<Job<'a>>,
    only_on_panic: bool,
}

impl Drop for Closer<'_, '_> {
    fn drop(&mut self) {
        if !self.only_on_panic || thread::panicking() {
            self.queue.close();
        }
    }
}

fn worker_loop<'a>(conn: &'a Conn<'a>, queue: &JobQueue<Job<'a>>, replies: &Replies<'a>) {
    // `execute` catches the export's panics; one that escapes it anyway
    // closes the queue, so the reader stops instead of waiting for room.
    let _close = Closer {
        queue,
        only_on_panic: true,
    };
    while let Some(job) = queue.pop() {
        execute(conn, job, replies);
    }
}

fn read_loop<'a, R: Read>(
    reader: &mut R,
    conn: &'a Conn<'a>,
    queue: &JobQueue<Job<'a>>,
    replies: &Replies<'a>,
) -> EndReason {
    let io_end = |e: io::Error| match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => EndReason::Truncated,
        _ => EndReason::Io(e),
    };
    loop {
        if replies.is_broken() {
            return EndReason::ReplyFailed;
        }
        let mut hdr = [0u8; REQUEST_HEADER_BYTES];
        match read_exact_or_eof(reader, &mut hdr) {
            Ok(true) => {}
            Ok(false) => return EndReason::Closed,
            Err(e) => return io_end(e),
        }
        // A bad magic means we can no longer find request boundaries.
        let req = match parse_request(&hdr) {
            Ok(req) => req,
            Err(e) => return EndReason::BadRequest(e),
        };
        conn.stats.requests.fetch_add(1, Ordering::Relaxed);
        if req.command() == Some(Command::Disc) {
            return EndReason::Disconnect;
        }

        // Consume the payload before judging the request so that the stream
        // stays in sync even when the request is refused.
        let mut payload = Payload::empty();
        let mut permit = conn.budget.acquire(0);
        let payload_bytes = req.payload_bytes();
        if payload_bytes > 0 {
            if payload_bytes > MAX_PAYLOAD_BYTES {
                // Skipping up to 4 GiB to resync is not worth it; the client
                // broke the advertised limit, so answer and hang up.
                let msg = "write payload exceeds the maximum payload size";
                reply_now(
                    conn,
                    replies,
                    error_reply(&conn.limits, req.cookie, NBD_EINVAL, msg),
                );
                return EndReason::OversizedWrite(payload_bytes);
            }
            permit = conn.budget.acquire(payload_bytes as usize);
            payload = conn.payloads.take(payload_bytes as usize);
            if let Err(e) = reader.read_exact(payload.as_mut()) {
                return io_end(e);
            }
        }

        let op = match validate(&req, &conn.limits) {
            Ok(op) => op,
            Err(Rejection { error, message }) => {
                reply_now(
                    conn,
                    replies,
                    error_reply(&conn.limits, req.cookie, error, message),
                );
                continue;
            }
        };
        if let Op::Read { len, .. } = op {
            permit = conn.budget.acquire(len as usize);
        }
        let job = Job {
            cookie: req.cookie,
            op,
            payload,
            flush_barrier: conn.order.barrier(),
            ticket: op.is_write().then(|| conn.order.begin_write()),
            _permit: permit,
        };
        if queue.push(job).is_err() {
            // A worker died; nothing can be answered reliably any more.
            return EndReason::ReplyFailed;
        }
    }
}

/// Runs one job and sends its reply. A panicking export fails the request
/// with EIO instead of taking the connection (or the server) down.
fn execute<'a>(conn: &'a Conn<'a>, job: Job<'a>, replies: &Replies<'a>) {
    let Job {
        cookie,
        op,
        payload,
        flush_barrier,
        ticket,
        _permit,
    } = job;
    // A flush, or a write that must be durable, waits for the device:
    // quick replies do not wait for it.
    let quick = !matches!(
        op,
        Op::Flush | Op::Write { fua: true, .. } | Op::Trim { fua: true, .. }
    ) && !matches!(op, Op::WriteZeroes { fua: true, .. });
    let busy = quick.then(|| replies.busy());
    let t0 = std::time::Instant::now();
    let reply = catch_unwind(AssertUnwindSafe(|| {
        run_op(conn, cookie, op, &payload, flush_barrier)
    }));
    let failed = reply
        .as_ref()
        .map_or(true, |r| super::metrics::reply_is_error(r));
    conn.stats.server.record(&op, t0.elapsed(), failed);
    // The export call is over: a FLUSH queued behind this write may proceed.
    drop(ticket);
    let reply = reply.unwrap_or_else(|_| {
        tracing::error!(?op, "nbd export panicked while serving a request");
        error_reply(&conn.limits, cookie, NBD_EIO, "internal server error").into()
    });
    let out = Outgoing { reply, _permit };
    match busy {
        Some(b) => b.send(out),
        None => replies.send(out),
    }
}

/// An encoded reply: a READ's data reply sits in a pooled buffer (a fresh
/// one per request was zeroed every time: 3.6 % of the CPU of 1 MiB
/// reads), the others in a small vector of their own.
enum Reply<'a> {
    Owned(Vec<u8>),
    /// The reply is the buffer's bytes from the offset on.
    Pooled(Payload<'a>, usize),
}

impl std::ops::Deref for Reply<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Reply::Owned(v) => v,
            Reply::Pooled(p, at) => &p[*at..],
        }
    }
}

impl From<Vec<u8>> for Reply<'_> {
    fn from(v: Vec<u8>) -> Self {
        Reply::Owned(v)
    }
}

/// Performs `op` on the export and encodes the reply.
fn run_op<'a>(
    conn: &'a Conn<'a>,
    cookie: u64,
    op: Op,
    payload: &[u8],
    flush_barrier: u64,
) -> Reply<'a> {
    let export = conn.export;
    let limits = &conn.limits;
    let result = match op {
        Op::Read { offset, len } => return read_reply(conn, cookie, offset, len),
        Op::Write { offset, fua, .. } => {
            let r = export.write(offset, payload, fua);
            if r.is_ok() {
                let n = payload.len() as u64;
                conn.stats.bytes_written.fetch_add(n, Ordering::Relaxed);
            }
            r
        }
        Op::Flush => {
            conn.order.wait_for(flush_barrier);
            export.flush()
        }
        Op::Trim { offset, len, fua } => export.trim(offset, u64::from(len), fua),
        // A hint only; the range has been checked, there is nothing to do.
        Op::Cache => Ok(()),
        Op::WriteZeroes {
            offset,
            len,
            may_unmap,
            fast_only,
            fua,
        } => {
            if fast_only && !export.fast_zero() {
                let msg = "fast zeroing is not supported by this export";
                return error_reply(limits, cookie, NBD_ENOTSUP, msg).into();
            }
            export.write_zeroes(offset, u64::from(len), may_unmap, fua)
        }
        Op::BlockStatus {
            offset,
            len,
            req_one,
        } => match block_status_reply(conn, cookie, offset, len, req_one) {
            Ok(reply) => return reply.into(),
            Err(e) => Err(e),
        },
    };
    match result {
        // A simple reply is allowed for data-less success even with
        // structured replies, and is the cheapest.
        Ok(()) => encode_simple_reply(0, cookie).to_vec().into(),
        Err(e) => error_reply(limits, cookie, nbd_error_from_io(&e), &e.to_string()).into(),
    }
}

/// BLOCK_STATUS reply: one chunk per selected context, the last one DONE.
/// Any context failing fails the whole request (nothing is sent before).
fn block_status_reply(
    conn: &Conn<'_>,
    cookie: u64,
    offset: u64,
    len: u32,
    req_one: bool,
) -> io::Result<Vec<u8>> {
    let mut reply = Vec::new();
    let last = conn.meta_contexts.len().saturating_sub(1);
    for (i, (id, context)) in conn.meta_contexts.iter().enumerate() {
        let (extents, flags) = match context {
            MetaContext::BaseAllocation => (
                conn.export.block_status(offset, u64::from(len))?,
                BASE_ALLOCATION_FLAGS,
            ),
            MetaContext::DirtyBitmap(bitmap) => (
                conn.export.dirty_status(bitmap, offset, u64::from(len))?,
                DIRTY_BITMAP_FLAGS,
            ),
        };
        let descriptors = block_status_descriptors(&extents, len, req_one, flags);
        encode_block_status_chunk(&mut reply, cookie, *id, &descriptors, i == last);
    }
    Ok(reply)
}

/// READ reply: the data is read straight into the reply buffer behind room
/// for the header, so it is sent with a single write.
fn read_reply<'a>(conn: &'a Conn<'a>, cookie: u64, offset: u64, len: u32) -> Reply<'a> {
    let structured = conn.limits.structured_replies;
    let header_bytes = if structured {
        CHUNK_HEADER_BYTES + 8
    } else {
        SIMPLE_REPLY_HEADER_BYTES
    };
    // Whatever a reused buffer held is overwritten: the export fills every
    // byte of the data, the header is written below. The data starts on a
    // page, as the page cache's pages do: copying from a page to an
    // address a few bytes past a page boundary took twice as long (the
    // store and load addresses alias in their low 12 bits).
    let at = DIRECT_IO_ALIGN - header_bytes;
    let mut reply = conn.payloads.take(DIRECT_IO_ALIGN + len as usize);
    let buf = &mut reply.as_mut()[at..];
    if let Err(e) = conn.export.read(offset, &mut buf[header_bytes..]) {
        return error_reply(&conn.limits, cookie, nbd_error_from_io(&e), &e.to_string()).into();
    }
    if structured {
        // One data chunk covering the whole request, so DF is always honoured.
        let chunk_len = 8 + len;
        put_chunk_header(
            buf,
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_OFFSET_DATA,
            cookie,
            chunk_len,
        );
        buf[CHUNK_HEADER_BYTES..CHUNK_HEADER_BYTES + 8].copy_from_slice(&offset.to_be_bytes());
    } else {
        put_simple_reply_header(buf, 0, cookie);
    }
    conn.stats
        .bytes_read
        .fetch_add(u64::from(len), Ordering::Relaxed);
    Reply::Pooled(reply, at)
}

/// An error reply: a structured error chunk with a message when negotiated
/// (required for READ, preferred otherwise), else a simple reply.
fn error_reply(limits: &Limits, cookie: u64, error: u32, message: &str) -> Vec<u8> {
    if limits.structured_replies {
        encode_error_chunk(cookie, error, message)
    } else {
        encode_simple_reply(error, cookie).to_vec()
    }
}
