//! `serve --metrics`: Prometheus metrics over HTTP (OpenMetrics text at
//! `/metrics`), read from the pool at each scrape.
//!
//! Gauges describe the current or last job (they start again with each
//! run); `_total` counters only grow while the server runs, except the
//! device error counters, which are the pool's persisted ones.

use std::net::SocketAddr;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::nbd::{Metrics as NbdMetrics, COMMANDS};
use crate::pool::Pool;
use crate::util::error::{Error, Result};
use crate::util::histogram::HistogramSnapshot;
use crate::util::sync::{thread, Arc, AtomicBool, Ordering};

/// How often the HTTP loop looks at the stop flag.
const POLL: Duration = Duration::from_millis(200);

/// `--metrics PORT` or `--metrics ADDR:PORT` (a bare port is loopback).
pub fn parse_addr(s: &str) -> std::result::Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse()
        .map_err(|_| format!("{s:?} is not PORT or ADDR:PORT (e.g. 127.0.0.1:9187)"))
}

type Labels = Vec<(&'static str, String)>;

/// Reads the pool and the NBD server at each scrape.
struct PoolCollector {
    pool: Pool,
    nbd: Arc<NbdMetrics>,
}

impl std::fmt::Debug for PoolCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PoolCollector")
    }
}

/// One metric family: name (without `_total`), help, type, and its rows.
fn family(
    enc: &mut DescriptorEncoder,
    (name, help, kind): (&str, &str, MetricType),
    rows: &[(Labels, f64)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in rows {
        let fam = m.encode_family(labels)?;
        if matches!(kind, MetricType::Counter) {
            ConstCounter::new(*v as u64).encode(fam)?;
        } else {
            ConstGauge::new(*v).encode(fam)?;
        }
    }
    Ok(())
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, f64)],
) -> std::fmt::Result {
    family(enc, (name, help, MetricType::Gauge), rows)
}

fn histogram(
    enc: &mut DescriptorEncoder,
    (name, help): (&str, &str),
    rows: &[(Labels, HistogramSnapshot)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in rows {
        let mut fam = m.encode_family(labels)?;
        fam.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            h.sum_seconds,
            h.count,
            &h.buckets,
            None,
        )?;
    }
    Ok(())
}

fn one(v: f64) -> Vec<(Labels, f64)> {
    vec![(Vec::new(), v)]
}

/// A job's state as its JSON name ("running", "finished", ...).
fn state_name<T: serde::Serialize>(s: &T) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

impl PoolCollector {
    fn devices(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let mut errs = Vec::new();
        for d in self.pool.device_stats() {
            let s = d.stats;
            for (kind, v) in [
                ("read", s.read_errs),
                ("write", s.write_errs),
                ("flush", s.flush_errs),
                ("corruption", s.corruption_errs),
                ("generation", s.generation_errs),
            ] {
                let l = vec![
                    ("devid", d.devid.to_string()),
                    ("path", d.path.clone()),
                    ("kind", kind.into()),
                ];
                errs.push((l, v as f64));
            }
        }
        family(
            enc,
            (
                "chunkvol_device_errors",
                "Device error counters (as `device stats`)",
                MetricType::Counter,
            ),
            &errs,
        )?;
        let u = self.pool.usage();
        let dev = |f: &dyn Fn(&crate::pool::DeviceUsage) -> f64| -> Vec<(Labels, f64)> {
            u.devices
                .iter()
                .map(|d| {
                    (
                        vec![("devid", d.devid.to_string()), ("path", d.path.clone())],
                        f(d),
                    )
                })
                .collect()
        };
        gauge(
            enc,
            "chunkvol_device_size_bytes",
            "Device size",
            &dev(&|d| d.size_bytes as f64),
        )?;
        gauge(
            enc,
            "chunkvol_device_allocated_bytes",
            "Bytes of the device in chunks",
            &dev(&|d| d.allocated_bytes as f64),
        )?;
        gauge(
            enc,
            "chunkvol_device_missing",
            "1 when the device is missing (degraded)",
            &dev(&|d| f64::from(u8::from(d.missing))),
        )?;
        Self::space(enc, &u)
    }

    fn space(enc: &mut DescriptorEncoder, u: &crate::pool::Usage) -> std::fmt::Result {
        let mut by: std::collections::BTreeMap<(String, String), (f64, f64, f64)> =
            Default::default();
        for g in &u.block_groups {
            let e = by
                .entry((g.bg_type.clone(), g.profile.clone()))
                .or_default();
            e.0 += g.length as f64;
            e.1 += g.used_bytes as f64;
            e.2 += 1.0;
        }
        let rows = |i: usize| -> Vec<(Labels, f64)> {
            by.iter()
                .map(|((t, p), v)| {
                    (
                        vec![("type", t.clone()), ("profile", p.clone())],
                        [v.0, v.1, v.2][i],
                    )
                })
                .collect()
        };
        gauge(
            enc,
            "chunkvol_space_bytes",
            "Logical bytes in block groups, by type and profile",
            &rows(0),
        )?;
        gauge(
            enc,
            "chunkvol_space_used_bytes",
            "Used logical bytes in block groups, by type and profile",
            &rows(1),
        )?;
        gauge(
            enc,
            "chunkvol_block_groups",
            "Block groups, by type and profile",
            &rows(2),
        )?;
        gauge(
            enc,
            "chunkvol_pool_size_bytes",
            "Sum of device sizes",
            &one(u.device_size_bytes as f64),
        )?;
        gauge(
            enc,
            "chunkvol_pool_unallocated_bytes",
            "Device bytes in no chunk",
            &one(u.unallocated_bytes as f64),
        )?;
        gauge(
            enc,
            "chunkvol_generation",
            "Last committed generation",
            &one(u.generation as f64),
        )
    }

    fn volumes(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let vols = self.pool.list_volumes().unwrap_or_default();
        let rows = |f: &dyn Fn(&crate::pool::VolumeSummary) -> f64| -> Vec<(Labels, f64)> {
            vols.iter()
                .map(|v| (vec![("volume", v.name.clone())], f(v)))
                .collect()
        };
        gauge(
            enc,
            "chunkvol_volume_size_bytes",
            "Volume size",
            &rows(&|v| v.size_bytes as f64),
        )?;
        gauge(
            enc,
            "chunkvol_volume_allocated_bytes",
            "Mapped bytes of the volume (one copy)",
            &rows(&|v| v.allocated_bytes as f64),
        )?;
        gauge(
            enc,
            "chunkvol_volume_read_only",
            "1 when the volume is read-only",
            &rows(&|v| f64::from(u8::from(v.read_only))),
        )
    }

    fn scrub(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let Ok(s) = crate::jobs::scrub::status(self.pool.fs(), false) else {
            return Ok(());
        };
        let c = s.counters;
        let state = vec![(vec![("state", state_name(&s.state))], 1.0)];
        gauge(
            enc,
            "chunkvol_scrub_state",
            "State of the current or last scrub (1 for its state)",
            &state,
        )?;
        gauge(
            enc,
            "chunkvol_scrub_to_scrub_bytes",
            "Bytes the current or last scrub has to read",
            &one(s.bytes_total as f64),
        )?;
        gauge(
            enc,
            "chunkvol_scrub_scrubbed_bytes",
            "Bytes the current or last scrub verified",
            &one(c.bytes_scrubbed as f64),
        )?;
        gauge(
            enc,
            "chunkvol_scrub_rate_bytes_per_second",
            "Scrub rate, pauses excluded",
            &one(s.rate_bytes_per_s as f64),
        )?;
        let errs: Vec<(Labels, f64)> = [
            ("read", c.read_errors),
            ("csum", c.csum_errors),
            ("verify", c.verify_errors),
            ("super", c.super_errors),
        ]
        .into_iter()
        .map(|(k, v)| (vec![("kind", k.to_string())], v as f64))
        .collect();
        gauge(
            enc,
            "chunkvol_scrub_errors",
            "Errors found by the current or last scrub",
            &errs,
        )?;
        gauge(
            enc,
            "chunkvol_scrub_corrected_errors",
            "Errors the scrub repaired",
            &one(c.corrected_errors as f64),
        )?;
        gauge(
            enc,
            "chunkvol_scrub_uncorrectable_errors",
            "Errors with no good copy",
            &one(c.uncorrectable_errors as f64),
        )?;
        gauge(
            enc,
            "chunkvol_scrub_started_timestamp_seconds",
            "When the scrub started (unix time)",
            &one(s.started_at as f64),
        )?;
        let done = if s.state == crate::jobs::scrub::State::Finished {
            s.started_at as f64 + s.duration_s
        } else {
            0.0
        };
        gauge(
            enc,
            "chunkvol_scrub_last_completed_timestamp_seconds",
            "When the last scrub finished, at the earliest (0: none finished)",
            &one(done),
        )
    }

    fn jobs(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        if let Ok(b) = crate::jobs::balance::status(self.pool.fs()) {
            gauge(
                enc,
                "chunkvol_balance_state",
                "State of the current or last balance",
                &[(vec![("state", state_name(&b.state))], 1.0)],
            )?;
            let g = vec![
                (
                    vec![("kind", "total".to_string())],
                    b.block_groups_total as f64,
                ),
                (
                    vec![("kind", "done".to_string())],
                    b.block_groups_done as f64,
                ),
            ];
            gauge(
                enc,
                "chunkvol_balance_block_groups",
                "Block groups of the balance",
                &g,
            )?;
            gauge(
                enc,
                "chunkvol_balance_relocated_bytes",
                "Bytes the balance relocated",
                &one(b.bytes_relocated as f64),
            )?;
        }
        if let Some(r) = crate::jobs::dev_replace::status(self.pool.fs()) {
            gauge(
                enc,
                "chunkvol_replace_state",
                "State of the current or last device replace",
                &[(vec![("state", state_name(&r.state))], 1.0)],
            )?;
            let g = vec![
                (
                    vec![("kind", "total".to_string())],
                    r.block_groups_total as f64,
                ),
                (
                    vec![("kind", "done".to_string())],
                    r.block_groups_done as f64,
                ),
            ];
            gauge(
                enc,
                "chunkvol_replace_block_groups",
                "Block groups of the replace",
                &g,
            )?;
            gauge(
                enc,
                "chunkvol_replace_copied_bytes",
                "Bytes the replace copied",
                &one(r.bytes_copied as f64),
            )?;
            gauge(
                enc,
                "chunkvol_replace_uncorrectable_errors",
                "Sectors with no good copy",
                &one(r.uncorrectable_errors as f64),
            )?;
        }
        let h = self.pool.fs().commit_latency.snapshot();
        histogram(
            enc,
            (
                "chunkvol_commit_duration_seconds",
                "Time of each commit that wrote a generation",
            ),
            &[(Vec::new(), h)],
        )
    }

    /// The intent log (`engine/tree_log.rs`): how many flushes it carried
    /// and what the last open replayed.
    fn intent_log(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let st = &self.pool.fs().log_stats;
        let ld = |a: &std::sync::atomic::AtomicU64| one(a.load(Ordering::Relaxed) as f64);
        let counters = [
            (
                "chunkvol_intent_log_blocks",
                "Flushes carried by an intent log block instead of a commit",
                &st.blocks,
            ),
            (
                "chunkvol_intent_log_bytes",
                "Bytes of intent log blocks written (each device)",
                &st.bytes,
            ),
            (
                "chunkvol_intent_log_full",
                "Flushes that committed because the log area was full",
                &st.full,
            ),
        ];
        for (name, help, v) in counters {
            family(enc, (name, help, MetricType::Counter), &ld(v))?;
        }
        gauge(
            enc,
            "chunkvol_intent_log_replayed_records",
            "Intent log records replayed when the pool was opened",
            &ld(&st.replayed),
        )
    }

    fn nbd(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let per = |f: &dyn Fn(&crate::nbd::CommandMetrics) -> f64| -> Vec<(Labels, f64)> {
            COMMANDS
                .iter()
                .zip(&self.nbd.commands)
                .map(|(n, c)| (vec![("command", n.to_string())], f(c)))
                .collect()
        };
        let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
        family(
            enc,
            (
                "chunkvol_nbd_requests",
                "NBD requests served",
                MetricType::Counter,
            ),
            &per(&|c| ld(&c.requests)),
        )?;
        family(
            enc,
            (
                "chunkvol_nbd_request_errors",
                "NBD requests that got an error",
                MetricType::Counter,
            ),
            &per(&|c| ld(&c.errors)),
        )?;
        family(
            enc,
            (
                "chunkvol_nbd_request_bytes",
                "Bytes read, written, trimmed or zeroed",
                MetricType::Counter,
            ),
            &per(&|c| ld(&c.bytes)),
        )?;
        let lat: Vec<(Labels, HistogramSnapshot)> = COMMANDS
            .iter()
            .zip(&self.nbd.commands)
            .map(|(n, c)| (vec![("command", n.to_string())], c.latency.snapshot()))
            .collect();
        histogram(
            enc,
            (
                "chunkvol_nbd_request_duration_seconds",
                "Time from a request's start to its reply",
            ),
            &lat,
        )?;
        let open = self.nbd.connections_open.load(Ordering::Relaxed) as f64;
        gauge(
            enc,
            "chunkvol_nbd_connections_open",
            "Open NBD connections",
            &one(open),
        )?;
        let total = self.nbd.connections_total.load(Ordering::Relaxed) as f64;
        family(
            enc,
            (
                "chunkvol_nbd_connections",
                "NBD connections accepted",
                MetricType::Counter,
            ),
            &[(Vec::new(), total)],
        )
    }
}

impl Collector for PoolCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        self.devices(&mut enc)?;
        self.volumes(&mut enc)?;
        self.scrub(&mut enc)?;
        self.jobs(&mut enc)?;
        self.intent_log(&mut enc)?;
        self.nbd(&mut enc)
    }
}

/// The exposition text of one scrape.
fn scrape(reg: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, reg) {
        tracing::warn!("metrics: encoding failed: {e}");
    }
    out
}

/// The metrics listener, bound before the pool is opened.
pub struct Listener(tiny_http::Server);

impl Listener {
    /// Where it listens (port 0 binds a free one).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.0.server_addr().to_ip()
    }
}

pub fn bind(addr: SocketAddr) -> Result<Listener> {
    tiny_http::Server::http(addr)
        .map(Listener)
        .map_err(|e| Error::Invalid(format!("--metrics {addr}: cannot listen: {e}")))
}

/// Serves `/metrics` and the dashboard ([`dashboard::route`]) until `stop`
/// is set.
///
/// [`dashboard::route`]: crate::service::dashboard::route
pub fn spawn(
    l: Listener,
    pool: Pool,
    nbd: Arc<NbdMetrics>,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<()> {
    let http = l.0;
    let mut reg = Registry::default();
    reg.register_collector(Box::new(PoolCollector {
        pool: pool.clone(),
        nbd,
    }));
    thread::spawn(move || {
        while !stop.load(Ordering::Acquire) {
            let req = match http.recv_timeout(POLL) {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!("metrics: {e}");
                    continue;
                }
            };
            let resp = if req.url() == "/metrics" {
                let ct = tiny_http::Header::from_bytes(
                    &b"Content-Type"[..],
                    &b"application/openmetrics-text; version=1.0.0; charset=utf-8"[..],
                )
                .expect("static header");
                tiny_http::Response::from_string(scrape(&reg)).with_header(ct)
            } else if let Some(r) = crate::service::dashboard::route(req.url(), &pool) {
                let ct = tiny_http::Header::from_bytes(&b"Content-Type"[..], r.content_type)
                    .expect("static header");
                tiny_http::Response::from_string(r.body).with_header(ct)
            } else {
                tiny_http::Response::from_string("not found: try /metrics or /\n")
                    .with_status_code(404)
            };
            let _ = req.respond(resp);
        }
    })
}
