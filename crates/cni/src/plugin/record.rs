//! What the plugin tells the node agent about each call, for the installer's `/metrics`
//! and the pod's Events: one JSON datagram, sent after the answer is on stdout, never
//! waited for. The agent reads it on a root-only datagram socket in the run dir.
//!
//! ```text
//! {"v":1,"command":"ADD","outcome":"redirected","lookup":"agent","backend":"iptables-nft","seconds":0.012,
//!  "pod":{"namespace":"shop","name":"web-0","uid":"8e1c..."}}
//! ```
//!
//! Every label is an enum here, so a record cannot grow the metrics' label sets.
//! When no agent reads the socket (or its queue is full) the record is dropped, and one
//! byte is appended to [`DROPPED_FILE`] in the run dir: the agent counts those bytes.
//! The installer creates that file; the plugin only appends to it, so a run dir no
//! installer ever used (a plugin run by hand, a test) gets no file from us.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use socket2::{Domain, SockAddr, Socket, Type};

use crate::proto::CniError;

pub const VERSION: u32 = 1;
/// The agent's datagram socket in the plugin's run dir.
pub const SOCKET_NAME: &str = "requests.sock";
/// One byte per record no agent took.
pub const DROPPED_FILE: &str = "requests.dropped";
/// Past this the drop file grows no more (a node with no installer at all).
pub const MAX_DROPPED: u64 = 1 << 20;
/// A record is a few labels, a pod's identity and an error message (cut to fit).
pub const MAX_RECORD: usize = 8 * 1024;
/// The error message kept in a record (the Event's text).
const MAX_MESSAGE: usize = 2 * 1024;

/// The commands that are counted (VERSION is not: it has no configuration).
pub const COMMANDS: [&str; 5] = ["ADD", "DEL", "CHECK", "STATUS", "GC"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// ADD programmed the redirect (rules, or an eBPF registration).
    Redirected,
    /// ADD let the pod start without one; [`Record::reason`] says why.
    PassedThrough,
    /// The runtime got an error; [`Record::code`] is its CNI code.
    Failed,
    /// DEL, CHECK, STATUS or GC succeeded.
    Ok,
}

/// Why ADD passed a pod through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    NoPodIdentity,
    ExcludedNamespace,
    HasKumaInit,
    NoSidecar,
    NotInjected,
    /// The pod was deleted before its ADD.
    PodGone,
    /// The API server refuses our identity this pod (RBAC, namespaceAllowList).
    Forbidden,
    /// The API server could not be asked (`on_api_error: pass-through`); the node agent
    /// repairs the pod in place when it is back.
    ApiUnavailable,
}

impl Outcome {
    /// As in the record and the metrics' labels.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Redirected => "redirected",
            Outcome::PassedThrough => "passed-through",
            Outcome::Failed => "failed",
            Outcome::Ok => "ok",
        }
    }
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::NoPodIdentity => "no-pod-identity",
            Reason::ExcludedNamespace => "excluded-namespace",
            Reason::HasKumaInit => "has-kuma-init",
            Reason::NoSidecar => "no-sidecar",
            Reason::NotInjected => "not-injected",
            Reason::PodGone => "pod-gone",
            Reason::Forbidden => "forbidden",
            Reason::ApiUnavailable => "api-unavailable",
        }
    }

    pub fn of(reason: &kuma::pod::PassReason) -> Reason {
        use kuma::pod::PassReason as P;
        match reason {
            P::NoPodIdentity => Reason::NoPodIdentity,
            P::ExcludedNamespace(_) => Reason::ExcludedNamespace,
            P::HasKumaInit => Reason::HasKumaInit,
            P::NoSidecar => Reason::NoSidecar,
            P::NotInjected(_) => Reason::NotInjected,
        }
    }
}

/// Who said what the pod is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LookupPath {
    /// The node agent, from its cache.
    Agent,
    /// The node agent, after waiting for the pod's watch event.
    WatchWait,
    /// A GET to the API server (no agent, or it could not say).
    ApiServer,
}

/// What programmed the redirect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    IptablesNft,
    IptablesLegacy,
    Nftables,
    Ebpf,
}

impl LookupPath {
    pub fn label(self) -> &'static str {
        match self {
            LookupPath::Agent => "agent",
            LookupPath::WatchWait => "watch-wait",
            LookupPath::ApiServer => "api-server",
        }
    }
}

impl Backend {
    pub fn label(self) -> &'static str {
        match self {
            Backend::IptablesNft => "iptables-nft",
            Backend::IptablesLegacy => "iptables-legacy",
            Backend::Nftables => "nftables",
            Backend::Ebpf => "ebpf",
        }
    }

    pub fn of(kind: netfilter::BackendKind) -> Backend {
        match kind {
            netfilter::BackendKind::Nft => Backend::IptablesNft,
            netfilter::BackendKind::Legacy => Backend::IptablesLegacy,
            netfilter::BackendKind::Native => Backend::Nftables,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

/// What the plugin learnt during a call, as far as it got.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen {
    pub pod: Option<PodRef>,
    pub lookup: Option<LookupPath>,
    pub pass: Option<Reason>,
    pub backend: Option<Backend>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub v: u32,
    pub command: String,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lookup: Option<LookupPath>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<Backend>,
    /// From the plugin's start to its answer.
    pub seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    /// A failure's message, as the runtime got it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("not a plugin record: {0}")]
    Malformed(String),
    #[error("unsupported plugin record version {0} (this side speaks {VERSION})")]
    Version(u32),
    #[error("field {field} of the plugin record is invalid: {reason}")]
    Field { field: &'static str, reason: String },
}

impl Record {
    /// The record of a call of `command` that answered `result` after `took`.
    pub fn of(command: &str, seen: &Seen, result: Result<(), &CniError>, took: Duration) -> Record {
        let (outcome, code, message) = match result {
            Err(e) => (Outcome::Failed, Some(e.code), Some(truncated(e.to_string(), MAX_MESSAGE))),
            Ok(()) if command != "ADD" => (Outcome::Ok, None, None),
            Ok(()) if seen.pass.is_some() => (Outcome::PassedThrough, None, None),
            Ok(()) => (Outcome::Redirected, None, None),
        };
        Record {
            v: VERSION,
            command: command.to_owned(),
            outcome,
            reason: seen.pass.filter(|_| outcome == Outcome::PassedThrough),
            code,
            lookup: seen.lookup,
            backend: seen.backend.filter(|_| outcome == Outcome::Redirected),
            seconds: took.as_secs_f64(),
            pod: seen.pod.clone(),
            message,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("strings and numbers serialize")
    }

    pub fn parse(bytes: &[u8]) -> Result<Record, RecordError> {
        if bytes.len() > MAX_RECORD {
            return Err(RecordError::Malformed(format!("longer than {MAX_RECORD} bytes")));
        }
        let record: Record = serde_json::from_slice(bytes).map_err(|e| RecordError::Malformed(e.to_string()))?;
        if record.v != VERSION {
            return Err(RecordError::Version(record.v));
        }
        if !COMMANDS.contains(&record.command.as_str()) {
            return Err(RecordError::Field {
                field: "command",
                reason: format!("{:?} is not a CNI command", record.command),
            });
        }
        if !(record.seconds.is_finite() && record.seconds >= 0.0) {
            return Err(RecordError::Field {
                field: "seconds",
                reason: format!("{} is not a duration", record.seconds),
            });
        }
        Ok(record)
    }
}

fn truncated(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// Hands `record` to the agent listening in `run_dir`, without waiting: a non-blocking
/// send of one datagram. Not taken (no agent, its queue full): counted in the drop file.
pub fn send(run_dir: &Path, record: &Record) {
    if offer(&run_dir.join(SOCKET_NAME), &record.to_bytes()).is_err() {
        count_drop(run_dir);
    }
}

fn offer(socket: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let sender = Socket::new(Domain::UNIX, Type::DGRAM, None)?;
    sender.set_nonblocking(true)?;
    sender.send_to(bytes, &SockAddr::unix(socket)?)?;
    Ok(())
}

/// One byte appended (appends of a byte do not interleave) to the installer's file, if
/// there is one and it is not at its cap.
fn count_drop(run_dir: &Path) {
    let path = run_dir.join(DROPPED_FILE);
    if !std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file() && m.len() < MAX_DROPPED) {
        return;
    }
    if let Ok(mut file) = std::fs::OpenOptions::new().append(true).open(&path) {
        let _ = file.write_all(b".");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::code;

    fn pod() -> Option<PodRef> {
        Some(PodRef { namespace: "shop".into(), name: "web-0".into(), uid: Some("u-1".into()) })
    }

    #[test]
    fn the_outcome_follows_the_call() {
        let ms = Duration::from_millis(12);
        let redirected = Seen {
            pod: pod(),
            lookup: Some(LookupPath::Agent),
            backend: Some(Backend::IptablesNft),
            ..Seen::default()
        };
        let r = Record::of("ADD", &redirected, Ok(()), ms);
        assert_eq!(
            (r.outcome, r.backend, r.reason, r.code),
            (Outcome::Redirected, Some(Backend::IptablesNft), None, None)
        );
        assert_eq!(r.seconds, 0.012);

        let passed =
            Seen { pass: Some(Reason::ApiUnavailable), lookup: Some(LookupPath::ApiServer), ..Seen::default() };
        let r = Record::of("ADD", &passed, Ok(()), ms);
        assert_eq!(
            (r.outcome, r.reason, r.lookup),
            (Outcome::PassedThrough, Some(Reason::ApiUnavailable), Some(LookupPath::ApiServer))
        );

        let error = CniError::new(code::INVALID_CONFIG, "invalid annotation", "x".repeat(10_000));
        // A backend chosen before the failure is not a redirect.
        let r = Record::of("ADD", &redirected, Err(&error), ms);
        assert_eq!((r.outcome, r.code, r.backend), (Outcome::Failed, Some(7), None));
        assert!(r.message.as_ref().unwrap().starts_with("invalid annotation: xxx"));
        assert!(r.to_bytes().len() < MAX_RECORD, "a long message is cut");

        let r = Record::of("DEL", &Seen::default(), Ok(()), ms);
        assert_eq!(r.outcome, Outcome::Ok);
    }

    #[test]
    fn records_round_trip_and_bad_ones_are_refused() {
        let seen = Seen { pod: pod(), lookup: Some(LookupPath::WatchWait), backend: Some(Backend::Ebpf), pass: None };
        let r = Record::of("ADD", &seen, Ok(()), Duration::from_micros(1500));
        assert_eq!(Record::parse(&r.to_bytes()).unwrap(), r);
        let text = String::from_utf8(r.to_bytes()).unwrap();
        assert!(text.contains(r#""lookup":"watch-wait","backend":"ebpf""#), "{text}");
        let bad = |text: &str| Record::parse(text.as_bytes()).unwrap_err().to_string();
        assert!(bad(r#"{"v":1,"command":"VERSION","outcome":"ok","seconds":0}"#).contains("field command"));
        assert!(bad(r#"{"v":1,"command":"ADD","outcome":"ok","seconds":-1}"#).contains("field seconds"));
        assert!(bad(r#"{"v":1,"command":"ADD","outcome":"maybe","seconds":0}"#).contains("not a plugin record"));
        assert!(
            bad(r#"{"v":1,"command":"ADD","outcome":"failed","backend":"ipfw","seconds":0}"#)
                .contains("not a plugin record")
        );
        assert!(bad(r#"{"v":2,"command":"ADD","outcome":"ok","seconds":0}"#).contains("version 2"));
        assert!(bad(&" ".repeat(MAX_RECORD + 1)).contains("longer than"));
    }

    #[test]
    fn labels_are_the_record_names() {
        let name = |v: serde_json::Value| v.as_str().unwrap().to_owned();
        for o in [Outcome::Redirected, Outcome::PassedThrough, Outcome::Failed, Outcome::Ok] {
            assert_eq!(name(serde_json::to_value(o).unwrap()), o.label());
        }
        use Reason as R;
        for r in [
            R::NoPodIdentity,
            R::ExcludedNamespace,
            R::HasKumaInit,
            R::NoSidecar,
            R::NotInjected,
            R::PodGone,
            R::Forbidden,
            R::ApiUnavailable,
        ] {
            assert_eq!(name(serde_json::to_value(r).unwrap()), r.label());
        }
        for l in [LookupPath::Agent, LookupPath::WatchWait, LookupPath::ApiServer] {
            assert_eq!(name(serde_json::to_value(l).unwrap()), l.label());
        }
        for b in [Backend::IptablesNft, Backend::IptablesLegacy, Backend::Nftables, Backend::Ebpf] {
            assert_eq!(name(serde_json::to_value(b).unwrap()), b.label());
        }
    }

    #[test]
    fn without_an_agent_the_drop_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let record = Record::of("DEL", &Seen::default(), Ok(()), Duration::ZERO);
        // No installer made the file: nothing is written.
        send(dir.path(), &record);
        assert!(!dir.path().join(DROPPED_FILE).exists());
        std::fs::write(dir.path().join(DROPPED_FILE), "").unwrap();
        send(dir.path(), &record);
        send(dir.path(), &record);
        assert_eq!(std::fs::read(dir.path().join(DROPPED_FILE)).unwrap(), b"..");
        // With a reader, nothing is dropped.
        let reader = std::os::unix::net::UnixDatagram::bind(dir.path().join(SOCKET_NAME)).unwrap();
        send(dir.path(), &record);
        let mut buf = [0u8; MAX_RECORD];
        let n = reader.recv(&mut buf).unwrap();
        assert_eq!(Record::parse(&buf[..n]).unwrap(), record);
        assert_eq!(std::fs::read(dir.path().join(DROPPED_FILE)).unwrap().len(), 2);
    }
}
