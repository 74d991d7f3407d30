//! Fixed-newstyle option haggling, up to the start of the transmission phase.

use std::io::{self, Read, Write};
use std::sync::Arc;

use thiserror::Error;

use super::export::{Export, ExportProvider};
use super::io_util::{discard_exact, read_exact_or_eof};
use super::proto::*;

/// Option data up to this size is buffered and parsed; the largest legitimate
/// option (a meta-context request with many queries) is far smaller.
pub const MAX_OPTION_PAYLOAD_BYTES: u32 = 64 << 10;
/// Larger option data is read and dropped (not buffered) up to this size so
/// the client gets an error reply; beyond it we hang up, as the spec allows
/// for denial-of-service behaviour.
pub const MAX_SKIPPED_OPTION_BYTES: u32 = 16 << 20;
/// Context id we assign to `base:allocation` in NBD_OPT_SET_META_CONTEXT.
pub const BASE_ALLOCATION_CONTEXT_ID: u32 = 1;
/// Dirty bitmaps selected by one SET_META_CONTEXT get ids from here on, in
/// the export's order.
pub const FIRST_DIRTY_BITMAP_CONTEXT_ID: u32 = 2;
/// Most metadata contexts one session selects: each costs one reply chunk
/// per BLOCK_STATUS, and a bitmap a diff of two trees.
pub const MAX_META_CONTEXTS: usize = 16;

/// A metadata context a session selected for NBD_CMD_BLOCK_STATUS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaContext {
    /// `base:allocation`: holes and zeroes.
    BaseAllocation,
    /// `qemu:dirty-bitmap:NAME`: what changed since the bitmap's point.
    DirtyBitmap(String),
}

impl MetaContext {
    /// The context's name on the wire.
    pub fn name(&self) -> String {
        match self {
            MetaContext::BaseAllocation => BASE_ALLOCATION.to_owned(),
            MetaContext::DirtyBitmap(b) => format!("{QEMU_DIRTY_BITMAP_PREFIX}{b}"),
        }
    }
}

/// Result of a successful negotiation: what the transmission phase serves.
pub struct Negotiated {
    /// Canonical export name (the default export's real name if "" was asked).
    pub export_name: String,
    pub export: Arc<dyn Export>,
    /// Size announced to the client; requests are bounds-checked against it.
    pub size_bytes: u64,
    pub transmission_flags: u16,
    pub structured_replies: bool,
    /// Contexts selected for this export, with their ids (empty: BLOCK_STATUS
    /// is refused).
    pub meta_contexts: Vec<(u32, MetaContext)>,
}

/// How a handshake ended without entering transmission.
#[derive(Debug)]
pub enum Outcome {
    /// The client sent NBD_OPT_ABORT.
    Aborted,
    /// The client closed the connection between options.
    Closed,
    /// STARTTLS was acknowledged: run the TLS handshake, then go on with
    /// [`negotiate_after_tls`] over the secured stream.
    StartTls(Resume),
}

/// What survives STARTTLS: the client's flags. Options negotiated before it
/// are forgotten (a man in the middle could have sent them).
#[derive(Debug, Clone, Copy)]
pub struct Resume {
    fixed_newstyle: bool,
    no_zeroes: bool,
}

/// Whether the server offers TLS, and insists on it (FORCEDTLS).
#[derive(Debug, Clone, Copy, Default)]
pub struct TlsPolicy {
    pub offered: bool,
    pub required: bool,
}

/// Reasons the server hangs up during the handshake.
#[derive(Debug, Error)]
pub enum HandshakeError {
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Protocol(#[from] ProtoError),
    #[error("NBD_OPT_EXPORT_NAME for unknown or invalid export {0:?}")]
    UnknownExport(String),
    #[error("option {option} carries {length} bytes of data, over the {MAX_SKIPPED_OPTION_BYTES} byte limit")]
    OptionTooLarge { option: u32, length: u32 },
    #[error("client without fixed newstyle sent option {0}")]
    NotFixedNewstyle(u32),
    #[error("the client did not start TLS, which this server requires")]
    TlsRequired,
}

/// Transmission flags for an export; DF needs structured replies. A
/// read-only export announces it and offers no command that writes.
pub fn transmission_flags(structured_replies: bool, read_only: bool) -> u16 {
    let mut flags = NBD_FLAG_HAS_FLAGS
        | NBD_FLAG_SEND_FLUSH
        | NBD_FLAG_SEND_FUA
        | NBD_FLAG_SEND_CACHE
        | NBD_FLAG_CAN_MULTI_CONN;
    if read_only {
        flags |= NBD_FLAG_READ_ONLY;
    } else {
        flags |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
    }
    if structured_replies {
        flags |= NBD_FLAG_SEND_DF;
    }
    flags
}

/// Negotiation state accumulated across options.
#[derive(Default)]
struct State {
    fixed_newstyle: bool,
    no_zeroes: bool,
    tls: TlsPolicy,
    /// The options are being haggled over TLS.
    tls_active: bool,
    structured_replies: bool,
    /// Canonical export name and the contexts selected for it.
    meta: Option<(String, Vec<(u32, MetaContext)>)>,
}

impl State {
    fn negotiated(&self, export_name: String, export: Arc<dyn Export>) -> Negotiated {
        let meta_contexts = match &self.meta {
            Some((name, contexts)) if *name == export_name => contexts.clone(),
            _ => Vec::new(),
        };
        Negotiated {
            size_bytes: export.size_bytes(),
            transmission_flags: transmission_flags(self.structured_replies, export.read_only()),
            structured_replies: self.structured_replies,
            meta_contexts,
            export_name,
            export,
        }
    }
}

/// Looks an export up by the name a client sent ("" means the default).
fn resolve(provider: &dyn ExportProvider, name: &str) -> Option<(String, Arc<dyn Export>)> {
    let name = if name.is_empty() {
        provider.default_name()?
    } else {
        name.to_owned()
    };
    let export = provider.open(&name)?;
    Some((name, export))
}

fn is_known_option(option: u32) -> bool {
    matches!(
        option,
        NBD_OPT_EXPORT_NAME
            | NBD_OPT_ABORT
            | NBD_OPT_LIST
            | NBD_OPT_STARTTLS
            | NBD_OPT_INFO
            | NBD_OPT_GO
            | NBD_OPT_STRUCTURED_REPLY
            | NBD_OPT_LIST_META_CONTEXT
            | NBD_OPT_SET_META_CONTEXT
    )
}

/// Runs the server side of the handshake on an established connection.
///
/// Returns `Ok(Ok(negotiated))` when the transmission phase should start,
/// `Ok(Err(outcome))` when the client ended the session politely, and `Err`
/// when we hang up.
pub fn negotiate<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    provider: &dyn ExportProvider,
    tls: TlsPolicy,
) -> Result<Result<Negotiated, Outcome>, HandshakeError> {
    w.write_all(&encode_greeting())?;
    w.flush()?;
    let mut flags = [0u8; 4];
    if !read_exact_or_eof(r, &mut flags)? {
        return Ok(Err(Outcome::Closed));
    }
    let client = parse_client_flags(&flags)?;
    // TLS needs fixed newstyle: a client without it can never start TLS,
    // so a server that requires TLS hangs up on it.
    if tls.required && !client.fixed_newstyle {
        return Err(HandshakeError::TlsRequired);
    }
    let st = State {
        fixed_newstyle: client.fixed_newstyle,
        no_zeroes: client.no_zeroes,
        tls: if client.fixed_newstyle {
            tls
        } else {
            TlsPolicy::default()
        },
        ..State::default()
    };
    haggle(r, w, provider, st)
}

/// Option haggling resumed over TLS after [`Outcome::StartTls`].
pub fn negotiate_after_tls<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    provider: &dyn ExportProvider,
    resume: Resume,
) -> Result<Result<Negotiated, Outcome>, HandshakeError> {
    let st = State {
        fixed_newstyle: resume.fixed_newstyle,
        no_zeroes: resume.no_zeroes,
        tls: TlsPolicy {
            offered: true,
            required: true,
        },
        tls_active: true,
        ..State::default()
    };
    haggle(r, w, provider, st)
}

fn haggle<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    provider: &dyn ExportProvider,
    mut st: State,
) -> Result<Result<Negotiated, Outcome>, HandshakeError> {
    loop {
        let mut hdr = [0u8; OPTION_HEADER_BYTES];
        if !read_exact_or_eof(r, &mut hdr)? {
            return Ok(Err(Outcome::Closed));
        }
        let OptionHeader { option, length } = parse_option_header(&hdr)?;
        // Old newstyle clients cannot parse option replies at all.
        if !st.fixed_newstyle && option != NBD_OPT_EXPORT_NAME {
            return Err(HandshakeError::NotFixedNewstyle(option));
        }

        let mut out = Vec::new();
        if length > MAX_OPTION_PAYLOAD_BYTES {
            // EXPORT_NAME cannot be answered with an error, and beyond the
            // skip limit the client is just wasting our time.
            if option == NBD_OPT_EXPORT_NAME || length > MAX_SKIPPED_OPTION_BYTES {
                return Err(HandshakeError::OptionTooLarge { option, length });
            }
            discard_exact(r, u64::from(length))?;
            let reply = if is_known_option(option) {
                NBD_REP_ERR_TOO_BIG
            } else {
                NBD_REP_ERR_UNSUP
            };
            encode_option_reply(&mut out, option, reply, b"option data too large");
            w.write_all(&out)?;
            w.flush()?;
            continue;
        }
        let mut data = vec![0u8; length as usize];
        r.read_exact(&mut data)?;

        let done = handle_option(option, &data, &mut st, provider, &mut out)?;
        if !out.is_empty() {
            // A client that aborts may already be gone; that is not an error.
            match w.write_all(&out).and_then(|()| w.flush()) {
                Err(_) if matches!(done, Some(Err(Outcome::Aborted))) => {}
                other => other?,
            }
        }
        if let Some(done) = done {
            return Ok(done);
        }
    }
}

/// Handles one option, appending its replies to `out`. Returns `Some` when
/// the handshake is over.
fn handle_option(
    option: u32,
    data: &[u8],
    st: &mut State,
    provider: &dyn ExportProvider,
    out: &mut Vec<u8>,
) -> Result<Option<Result<Negotiated, Outcome>>, HandshakeError> {
    if st.tls.required && !st.tls_active {
        match option {
            NBD_OPT_STARTTLS | NBD_OPT_ABORT => {}
            // It cannot be answered with an error: hang up.
            NBD_OPT_EXPORT_NAME => return Err(HandshakeError::TlsRequired),
            _ => {
                let msg = b"TLS is required: send NBD_OPT_STARTTLS first";
                encode_option_reply(out, option, NBD_REP_ERR_TLS_REQD, msg);
                return Ok(None);
            }
        }
    }
    match option {
        NBD_OPT_EXPORT_NAME => {
            let requested = parse_string(data).map_err(|_| {
                HandshakeError::UnknownExport(String::from_utf8_lossy(data).into_owned())
            })?;
            let Some((name, export)) = resolve(provider, &requested) else {
                return Err(HandshakeError::UnknownExport(requested));
            };
            let n = st.negotiated(name, export);
            out.extend_from_slice(&encode_export_name_reply(
                n.size_bytes,
                n.transmission_flags,
                st.no_zeroes,
            ));
            return Ok(Some(Ok(n)));
        }
        NBD_OPT_ABORT => {
            // Any data is ignored, as the spec recommends.
            encode_option_reply(out, option, NBD_REP_ACK, &[]);
            return Ok(Some(Err(Outcome::Aborted)));
        }
        NBD_OPT_LIST => {
            if !data.is_empty() {
                encode_option_reply(out, option, NBD_REP_ERR_INVALID, b"LIST takes no data");
            } else {
                for name in provider.list() {
                    encode_option_reply(out, option, NBD_REP_SERVER, &encode_rep_server(&name));
                }
                encode_option_reply(out, option, NBD_REP_ACK, &[]);
            }
        }
        NBD_OPT_STARTTLS => {
            let refusal: Option<(u32, &[u8])> = if !data.is_empty() {
                Some((NBD_REP_ERR_INVALID, b"STARTTLS takes no data"))
            } else if st.tls_active {
                Some((NBD_REP_ERR_INVALID, b"TLS is already on"))
            } else if !st.tls.offered {
                Some((NBD_REP_ERR_POLICY, b"TLS is not enabled on this server"))
            } else {
                None
            };
            let Some((reply, msg)) = refusal else {
                encode_option_reply(out, option, NBD_REP_ACK, &[]);
                let resume = Resume {
                    fixed_newstyle: st.fixed_newstyle,
                    no_zeroes: st.no_zeroes,
                };
                return Ok(Some(Err(Outcome::StartTls(resume))));
            };
            encode_option_reply(out, option, reply, msg);
        }
        NBD_OPT_INFO | NBD_OPT_GO => return Ok(handle_info(option, data, st, provider, out)),
        NBD_OPT_STRUCTURED_REPLY => {
            if data.is_empty() {
                st.structured_replies = true;
                encode_option_reply(out, option, NBD_REP_ACK, &[]);
            } else {
                let msg = b"STRUCTURED_REPLY takes no data";
                encode_option_reply(out, option, NBD_REP_ERR_INVALID, msg);
            }
        }
        NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => {
            handle_meta_context(option, data, st, provider, out)
        }
        _ => encode_option_reply(out, option, NBD_REP_ERR_UNSUP, b"option not supported"),
    }
    Ok(None)
}

/// NBD_OPT_INFO / NBD_OPT_GO; returns the session on a successful GO.
fn handle_info(
    option: u32,
    data: &[u8],
    st: &State,
    provider: &dyn ExportProvider,
    out: &mut Vec<u8>,
) -> Option<Result<Negotiated, Outcome>> {
    let req = match parse_info_request(data) {
        Ok(req) => req,
        Err(e) => {
            encode_option_reply(out, option, NBD_REP_ERR_INVALID, e.to_string().as_bytes());
            return None;
        }
    };
    let Some((name, export)) = resolve(provider, &req.name) else {
        encode_option_reply(out, option, NBD_REP_ERR_UNKNOWN, b"export not found");
        return None;
    };
    let n = st.negotiated(name, export);
    let info_export = encode_info_export(n.size_bytes, n.transmission_flags);
    encode_option_reply(out, option, NBD_REP_INFO, &info_export);
    if req.requests.contains(&NBD_INFO_NAME) {
        let info_name = encode_info_string(NBD_INFO_NAME, &n.export_name);
        encode_option_reply(out, option, NBD_REP_INFO, &info_name);
    }
    // NBD_INFO_DESCRIPTION is optional and we have none to give. Block sizes
    // are sent unasked too: they are the defaults, so no client is bound by them.
    encode_option_reply(out, option, NBD_REP_INFO, &encode_info_block_size());
    encode_option_reply(out, option, NBD_REP_ACK, &[]);
    (option == NBD_OPT_GO).then_some(Ok(n))
}

/// NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: `base:allocation`
/// and qemu's `qemu:dirty-bitmap:NAME`.
fn handle_meta_context(
    option: u32,
    data: &[u8],
    st: &mut State,
    provider: &dyn ExportProvider,
    out: &mut Vec<u8>,
) {
    let set = option == NBD_OPT_SET_META_CONTEXT;
    if set {
        // SET replaces the selection even when it fails.
        st.meta = None;
        if !st.structured_replies {
            let msg = b"structured replies must be negotiated first";
            encode_option_reply(out, option, NBD_REP_ERR_INVALID, msg);
            return;
        }
    }
    let req = match parse_meta_context_request(data) {
        Ok(req) => req,
        Err(e) => {
            encode_option_reply(out, option, NBD_REP_ERR_INVALID, e.to_string().as_bytes());
            return;
        }
    };
    let Some((name, export)) = resolve(provider, &req.export_name) else {
        encode_option_reply(out, option, NBD_REP_ERR_UNKNOWN, b"export not found");
        return;
    };
    let contexts = matching_contexts(&req.queries, export.as_ref(), !set);
    if set && contexts.len() > MAX_META_CONTEXTS {
        let msg = format!("at most {MAX_META_CONTEXTS} metadata contexts per session");
        encode_option_reply(out, option, NBD_REP_ERR_TOO_BIG, msg.as_bytes());
        return;
    }
    let mut selected = Vec::new();
    let mut next_bitmap_id = FIRST_DIRTY_BITMAP_CONTEXT_ID;
    for ctx in contexts {
        // LIST replies carry a reserved id of zero.
        let id = match (&ctx, set) {
            (_, false) => 0,
            (MetaContext::BaseAllocation, true) => BASE_ALLOCATION_CONTEXT_ID,
            (MetaContext::DirtyBitmap(_), true) => {
                next_bitmap_id += 1;
                next_bitmap_id - 1
            }
        };
        let reply = encode_rep_meta_context(id, &ctx.name());
        encode_option_reply(out, option, NBD_REP_META_CONTEXT, &reply);
        selected.push((id, ctx));
    }
    if set && !selected.is_empty() {
        st.meta = Some((name, selected));
    }
    encode_option_reply(out, option, NBD_REP_ACK, &[]);
}

/// The contexts of `export` that `queries` name. SET takes full names only;
/// LIST also takes the namespace wildcards `base:`, `qemu:` and
/// `qemu:dirty-bitmap:`, and no query at all means every context. Unknown
/// namespaces and names are ignored, as the spec requires.
fn matching_contexts(queries: &[String], export: &dyn Export, list: bool) -> Vec<MetaContext> {
    let all = list && queries.is_empty();
    let asked = |full: &str, wildcards: &[&str]| {
        all || queries
            .iter()
            .any(|q| q == full || (list && wildcards.contains(&q.as_str())))
    };
    let mut out = Vec::new();
    if asked(BASE_ALLOCATION, &[BASE_NAMESPACE]) {
        out.push(MetaContext::BaseAllocation);
    }
    for bitmap in export.dirty_bitmaps() {
        let ctx = MetaContext::DirtyBitmap(bitmap);
        if asked(&ctx.name(), &[QEMU_NAMESPACE, QEMU_DIRTY_BITMAP_PREFIX]) {
            out.push(ctx);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NullExport(u64);
    impl Export for NullExport {
        fn size_bytes(&self) -> u64 {
            self.0
        }
        fn read(&self, _: u64, buf: &mut [u8]) -> io::Result<()> {
            buf.fill(0);
            Ok(())
        }
        fn write(&self, _: u64, _: &[u8], _: bool) -> io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
        fn trim(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> io::Result<()> {
            Ok(())
        }
        fn block_status(&self, _: u64, len: u64) -> io::Result<Vec<(u64, u32)>> {
            Ok(vec![(len, 0)])
        }
        fn dirty_bitmaps(&self) -> Vec<String> {
            // Export "a" (1 MiB) has two bitmaps, "b" none.
            if self.0 == 1 << 20 {
                vec!["s1".into(), "s2".into()]
            } else {
                Vec::new()
            }
        }
    }

    struct Provider;
    impl ExportProvider for Provider {
        fn list(&self) -> Vec<String> {
            vec!["a".into(), "b".into()]
        }
        fn open(&self, name: &str) -> Option<Arc<dyn Export>> {
            match name {
                "a" => Some(Arc::new(NullExport(1 << 20))),
                "b" => Some(Arc::new(NullExport(4096))),
                _ => None,
            }
        }
        fn default_name(&self) -> Option<String> {
            Some("b".into())
        }
    }

    /// Builds client bytes: flags, then options.
    struct Script(Vec<u8>);
    impl Script {
        fn new(flags: u32) -> Self {
            Script(flags.to_be_bytes().to_vec())
        }
        fn opt(mut self, option: u32, data: &[u8]) -> Self {
            self.0.extend_from_slice(&IHAVEOPT.to_be_bytes());
            self.0.extend_from_slice(&option.to_be_bytes());
            self.0.extend_from_slice(&(data.len() as u32).to_be_bytes());
            self.0.extend_from_slice(data);
            self
        }
    }

    fn info_data(name: &str, reqs: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    type Run = (Result<Result<Negotiated, Outcome>, HandshakeError>, Vec<u8>);

    fn run(script: Script) -> Run {
        run_tls(script, TlsPolicy::default())
    }

    fn run_tls(script: Script, tls: TlsPolicy) -> Run {
        let mut out = Vec::new();
        let res = negotiate(&mut &script.0[..], &mut out, &Provider, tls);
        (res, out)
    }

    #[test]
    fn forced_tls_refuses_options_until_starttls() {
        let forced = TlsPolicy {
            offered: true,
            required: true,
        };
        let (res, out) = run_tls(
            Script::new(FIXED)
                .opt(NBD_OPT_LIST, &[])
                .opt(NBD_OPT_GO, &info_data("d", &[]))
                .opt(NBD_OPT_STARTTLS, &[]),
            forced,
        );
        assert!(matches!(res, Ok(Err(Outcome::StartTls(_)))));
        let kinds: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
        assert_eq!(
            kinds,
            [NBD_REP_ERR_TLS_REQD, NBD_REP_ERR_TLS_REQD, NBD_REP_ACK]
        );
        // EXPORT_NAME cannot be refused: the server hangs up.
        let (res, _) = run_tls(Script::new(FIXED).opt(NBD_OPT_EXPORT_NAME, b"d"), forced);
        assert!(matches!(res, Err(HandshakeError::TlsRequired)));
        // A client without fixed newstyle cannot start TLS: it is hung up on
        // before it can ask for an export.
        let (res, _) = run_tls(Script::new(0).opt(NBD_OPT_EXPORT_NAME, b"d"), forced);
        assert!(matches!(res, Err(HandshakeError::TlsRequired)));
        // Offered but not required: options work without TLS.
        let optional = TlsPolicy {
            offered: true,
            required: false,
        };
        let (res, out) = run_tls(Script::new(FIXED).opt(NBD_OPT_LIST, &[]), optional);
        assert!(matches!(res, Ok(Err(Outcome::Closed))));
        assert_eq!(replies(&out).last().unwrap().1, NBD_REP_ACK);
        // Over TLS, a second STARTTLS is invalid and nothing needs TLS.
        let mut out = Vec::new();
        let resume = Resume {
            fixed_newstyle: true,
            no_zeroes: false,
        };
        let script = Script(Vec::new())
            .opt(NBD_OPT_STARTTLS, &[])
            .opt(NBD_OPT_LIST, &[]);
        let res = negotiate_after_tls(&mut &script.0[..], &mut out, &Provider, resume);
        assert!(matches!(res, Ok(Err(Outcome::Closed))));
        let mut framed = vec![0u8; GREETING_BYTES];
        framed.extend_from_slice(&out);
        let kinds: Vec<u32> = replies(&framed).iter().map(|r| r.1).collect();
        assert_eq!(kinds[0], NBD_REP_ERR_INVALID);
        assert_eq!(*kinds.last().unwrap(), NBD_REP_ACK);
    }

    /// Splits server output (after the greeting) into (option, reply type, data).
    fn replies(out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        let mut p = GREETING_BYTES;
        while p + 20 <= out.len() {
            assert_eq!(&out[p..p + 8], &OPTION_REPLY_MAGIC.to_be_bytes());
            let opt = u32::from_be_bytes(out[p + 8..p + 12].try_into().unwrap());
            let rep = u32::from_be_bytes(out[p + 12..p + 16].try_into().unwrap());
            let len = u32::from_be_bytes(out[p + 16..p + 20].try_into().unwrap()) as usize;
            v.push((opt, rep, out[p + 20..p + 20 + len].to_vec()));
            p += 20 + len;
        }
        assert_eq!(p, out.len(), "trailing bytes in server output");
        v
    }

    const FIXED: u32 = NBD_FLAG_C_FIXED_NEWSTYLE;

    #[test]
    fn greeting_then_list_then_abort() {
        let (res, out) = run(Script::new(FIXED)
            .opt(NBD_OPT_LIST, &[])
            .opt(NBD_OPT_ABORT, &[]));
        assert!(matches!(res, Ok(Err(Outcome::Aborted))));
        assert_eq!(&out[..GREETING_BYTES], &encode_greeting());
        let r = replies(&out);
        assert_eq!(r.len(), 4);
        assert_eq!(r[0], (NBD_OPT_LIST, NBD_REP_SERVER, encode_rep_server("a")));
        assert_eq!(r[1], (NBD_OPT_LIST, NBD_REP_SERVER, encode_rep_server("b")));
        assert_eq!(r[2].1, NBD_REP_ACK);
        assert_eq!(r[3], (NBD_OPT_ABORT, NBD_REP_ACK, vec![]));
    }

    #[test]
    fn unknown_flags_and_bad_magic_hang_up() {
        let (res, _) = run(Script::new(1 << 7));
        assert!(matches!(
            res,
            Err(HandshakeError::Protocol(ProtoError::UnknownClientFlags(_)))
        ));
        let mut s = Script::new(FIXED);
        s.0.extend_from_slice(&[0u8; 16]);
        assert!(matches!(
            run(s).0,
            Err(HandshakeError::Protocol(ProtoError::BadOptionMagic(0)))
        ));
    }

    #[test]
    fn unknown_and_oversized_options_get_errors() {
        let big = vec![0u8; MAX_OPTION_PAYLOAD_BYTES as usize + 1];
        let (res, out) = run(Script::new(FIXED)
            .opt(0x4242, b"junk")
            .opt(NBD_OPT_LIST, b"x")
            .opt(NBD_OPT_GO, &big)
            .opt(NBD_OPT_STARTTLS, &[]));
        assert!(matches!(res, Ok(Err(Outcome::Closed))));
        let kinds: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
        assert_eq!(
            kinds,
            [
                NBD_REP_ERR_UNSUP,
                NBD_REP_ERR_INVALID,
                NBD_REP_ERR_TOO_BIG,
                NBD_REP_ERR_POLICY
            ]
        );
    }

    #[test]
    fn absurd_option_length_hangs_up() {
        let mut s = Script::new(FIXED);
        s.0.extend_from_slice(&IHAVEOPT.to_be_bytes());
        s.0.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
        s.0.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            run(s).0,
            Err(HandshakeError::OptionTooLarge { .. })
        ));
    }

    #[test]
    fn go_unknown_then_default_export() {
        let (res, out) = run(Script::new(FIXED)
            .opt(NBD_OPT_GO, &info_data("nope", &[]))
            .opt(NBD_OPT_GO, &info_data("", &[NBD_INFO_NAME])));
        let n = res.unwrap().unwrap();
        assert_eq!(n.export_name, "b");
        assert_eq!(n.size_bytes, 4096);
        assert!(!n.structured_replies);
        assert_eq!(n.transmission_flags & NBD_FLAG_SEND_DF, 0);
        let r = replies(&out);
        assert_eq!(r[0].1, NBD_REP_ERR_UNKNOWN);
        assert_eq!(
            r[1],
            (
                NBD_OPT_GO,
                NBD_REP_INFO,
                encode_info_export(4096, n.transmission_flags)
            )
        );
        assert_eq!(r[2].2, encode_info_string(NBD_INFO_NAME, "b"));
        assert_eq!(r[3].2, encode_info_block_size());
        assert_eq!(r[4].1, NBD_REP_ACK);
    }

    #[test]
    fn malformed_go_is_invalid() {
        let (_, out) = run(Script::new(FIXED).opt(NBD_OPT_GO, &[0, 0, 0, 9, b'a']));
        assert_eq!(replies(&out)[0].1, NBD_REP_ERR_INVALID);
    }

    #[test]
    fn meta_contexts() {
        let (res, out) = run(Script::new(FIXED)
            .opt(
                NBD_OPT_SET_META_CONTEXT,
                &meta_data("a", &[BASE_ALLOCATION]),
            )
            .opt(NBD_OPT_STRUCTURED_REPLY, &[])
            .opt(NBD_OPT_LIST_META_CONTEXT, &meta_data("a", &["base:"]))
            .opt(
                NBD_OPT_LIST_META_CONTEXT,
                &meta_data("a", &["qemu:dirty-bitmap:x"]),
            )
            .opt(
                NBD_OPT_SET_META_CONTEXT,
                &meta_data("zz", &[BASE_ALLOCATION]),
            )
            .opt(
                NBD_OPT_SET_META_CONTEXT,
                &meta_data("a", &["base:", BASE_ALLOCATION]),
            )
            .opt(NBD_OPT_GO, &info_data("a", &[])));
        let n = res.unwrap().unwrap();
        assert!(n.structured_replies);
        assert_eq!(
            n.meta_contexts,
            [(BASE_ALLOCATION_CONTEXT_ID, MetaContext::BaseAllocation)]
        );
        assert_ne!(n.transmission_flags & NBD_FLAG_SEND_DF, 0);
        let r = replies(&out);
        let kinds: Vec<u32> = r.iter().map(|r| r.1).collect();
        assert_eq!(
            kinds,
            [
                NBD_REP_ERR_INVALID, // SET before structured replies
                NBD_REP_ACK,         // STRUCTURED_REPLY
                NBD_REP_META_CONTEXT,
                NBD_REP_ACK, // LIST base:
                NBD_REP_ACK, // LIST unknown namespace: nothing
                NBD_REP_ERR_UNKNOWN,
                NBD_REP_META_CONTEXT,
                NBD_REP_ACK, // SET
                NBD_REP_INFO,
                NBD_REP_INFO,
                NBD_REP_ACK, // GO
            ]
        );
        assert_eq!(r[2].2, encode_rep_meta_context(0, BASE_ALLOCATION));
        assert_eq!(
            r[6].2,
            encode_rep_meta_context(BASE_ALLOCATION_CONTEXT_ID, BASE_ALLOCATION)
        );
    }

    #[test]
    fn meta_context_for_other_export_is_not_active() {
        let (res, _) = run(Script::new(FIXED)
            .opt(NBD_OPT_STRUCTURED_REPLY, &[])
            .opt(
                NBD_OPT_SET_META_CONTEXT,
                &meta_data("a", &[BASE_ALLOCATION]),
            )
            .opt(NBD_OPT_GO, &info_data("b", &[])));
        assert_eq!(res.unwrap().unwrap().meta_contexts, []);
    }

    /// qemu's `qemu:dirty-bitmap:NAME`: listed by the wildcards, selected by
    /// full name next to `base:allocation`, each with its own id.
    #[test]
    fn dirty_bitmap_contexts() {
        let list = |queries: &[&str]| {
            let (_, out) = run(Script::new(FIXED)
                .opt(NBD_OPT_LIST_META_CONTEXT, &meta_data("a", queries))
                .opt(NBD_OPT_ABORT, &[]));
            let names: Vec<Vec<u8>> = replies(&out)
                .into_iter()
                .filter(|r| r.1 == NBD_REP_META_CONTEXT)
                .map(|r| r.2)
                .collect();
            names
        };
        let ctx = |name: &str| encode_rep_meta_context(0, name);
        let (s1, s2) = ("qemu:dirty-bitmap:s1", "qemu:dirty-bitmap:s2");
        assert_eq!(list(&["qemu:"]), [ctx(s1), ctx(s2)]);
        assert_eq!(list(&["qemu:dirty-bitmap:"]), [ctx(s1), ctx(s2)]);
        assert_eq!(list(&[s2, "qemu:dirty-bitmap:nope"]), [ctx(s2)]);
        assert_eq!(list(&[]), [ctx(BASE_ALLOCATION), ctx(s1), ctx(s2)]);
        assert_eq!(list(&["base:"]), [ctx(BASE_ALLOCATION)]);
        let (res, out) = run(Script::new(FIXED)
            .opt(NBD_OPT_STRUCTURED_REPLY, &[])
            // Wildcards select nothing.
            .opt(NBD_OPT_SET_META_CONTEXT, &meta_data("a", &["qemu:"]))
            .opt(
                NBD_OPT_SET_META_CONTEXT,
                &meta_data("a", &[s2, BASE_ALLOCATION, "qemu:dirty-bitmap:nope"]),
            )
            .opt(NBD_OPT_GO, &info_data("a", &[])));
        let n = res.unwrap().unwrap();
        assert_eq!(
            n.meta_contexts,
            [
                (BASE_ALLOCATION_CONTEXT_ID, MetaContext::BaseAllocation),
                (
                    FIRST_DIRTY_BITMAP_CONTEXT_ID,
                    MetaContext::DirtyBitmap("s2".into())
                ),
            ]
        );
        let r = replies(&out);
        assert_eq!(r[1].1, NBD_REP_ACK, "SET qemu: selects nothing");
        assert_eq!(
            r[3].2,
            encode_rep_meta_context(FIRST_DIRTY_BITMAP_CONTEXT_ID, s2)
        );
    }

    #[test]
    fn export_name_with_and_without_zeroes() {
        for (flags, pad) in [
            (FIXED, EXPORT_NAME_PADDING_BYTES),
            (FIXED | NBD_FLAG_C_NO_ZEROES, 0),
        ] {
            let (res, out) = run(Script::new(flags).opt(NBD_OPT_EXPORT_NAME, b"a"));
            let n = res.unwrap().unwrap();
            assert_eq!(out.len(), GREETING_BYTES + 10 + pad);
            assert_eq!(
                &out[GREETING_BYTES..GREETING_BYTES + 8],
                &(1u64 << 20).to_be_bytes()
            );
            assert_eq!(n.export_name, "a");
        }
        // Non-fixed-newstyle clients may still use EXPORT_NAME.
        assert!(run(Script::new(0).opt(NBD_OPT_EXPORT_NAME, b"")).0.is_ok());
        assert!(matches!(
            run(Script::new(0).opt(NBD_OPT_LIST, &[])).0,
            Err(HandshakeError::NotFixedNewstyle(NBD_OPT_LIST))
        ));
    }

    #[test]
    fn export_name_unknown_hangs_up() {
        let (res, out) = run(Script::new(FIXED).opt(NBD_OPT_EXPORT_NAME, b"nope"));
        assert!(matches!(res, Err(HandshakeError::UnknownExport(_))));
        assert_eq!(out.len(), GREETING_BYTES);
        let (res, _) = run(Script::new(FIXED).opt(NBD_OPT_EXPORT_NAME, &[0xff]));
        assert!(matches!(res, Err(HandshakeError::UnknownExport(_))));
    }

    #[test]
    fn truncated_option_is_io_error() {
        let mut s = Script::new(FIXED).opt(NBD_OPT_GO, &info_data("a", &[]));
        s.0.truncate(s.0.len() - 3);
        assert!(matches!(run(s).0, Err(HandshakeError::Io(_))));
    }
}
