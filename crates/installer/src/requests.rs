//! The plugin's calls as metrics: each call's record ([`cni::plugin::record`]) arrives
//! as a datagram on a root-only socket in the run dir after the plugin has answered the
//! runtime, and is counted here. Records no agent took are counted by the plugin in the
//! run dir's drop file; its size is read at every scrape.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cni::plugin::record::{self, DROPPED_FILE, MAX_RECORD, Record};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

use crate::InstallError;
use crate::rootsock::RootSocket;

/// Seconds: an ADD answered by the agent takes milliseconds; one that waits for the API
/// server up to its lookup timeout; rules retried up to 15 s.
const BUCKETS: [f64; 14] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    command: String,
    outcome: &'static str,
    /// Why a pod was passed through; empty otherwise.
    reason: &'static str,
    /// The CNI error code of a failure; empty otherwise.
    code: String,
    /// What programmed the redirect; empty unless redirected.
    backend: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabel {
    command: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LookupLabels {
    command: String,
    path: &'static str,
}

/// The plugin's metrics, in the installer's registry under `plugin_`.
#[derive(Debug, Clone)]
pub struct PluginMetrics {
    requests: Family<RequestLabels, Counter>,
    durations: Family<CommandLabel, Histogram, fn() -> Histogram>,
    lookups: Family<LookupLabels, Counter>,
    invalid: Counter,
}

impl PluginMetrics {
    /// Registers them; `run_dir` holds the plugin's drop file.
    pub fn register(registry: &mut ops::Registry, run_dir: &Path) -> PluginMetrics {
        let metrics = PluginMetrics {
            requests: Family::default(),
            durations: Family::new_with_constructor(|| Histogram::new(BUCKETS)),
            lookups: Family::default(),
            invalid: Counter::default(),
        };
        let plugin = registry.sub_registry_with_prefix("plugin");
        plugin.register(
            "requests",
            "Plugin calls by command and outcome (reason: why passed through; code: the CNI error code; backend: what redirected).",
            metrics.requests.clone(),
        );
        plugin.register(
            "request_duration_seconds",
            "Plugin calls' time from start to answer, by command.",
            metrics.durations.clone(),
        );
        plugin.register(
            "pod_lookups",
            "How ADD and CHECK learnt what the pod is: agent (its cache), watch-wait (the agent waited for the watch event), api-server (a GET).",
            metrics.lookups.clone(),
        );
        plugin.register(
            "records_invalid",
            "Datagrams on the plugin record socket that were not a record (the log says why).",
            metrics.invalid.clone(),
        );
        plugin.register_collector(Box::new(Dropped(run_dir.join(DROPPED_FILE))));
        metrics
    }

    pub fn observe(&self, r: &Record) {
        self.requests
            .get_or_create(&RequestLabels {
                command: r.command.clone(),
                outcome: r.outcome.label(),
                reason: r.reason.map_or("", record::Reason::label),
                code: r.code.map(|c| c.to_string()).unwrap_or_default(),
                backend: r.backend.map_or("", record::Backend::label),
            })
            .inc();
        self.durations.get_or_create(&CommandLabel { command: r.command.clone() }).observe(r.seconds);
        if let Some(path) = r.lookup {
            self.lookups.get_or_create(&LookupLabels { command: r.command.clone(), path: path.label() }).inc();
        }
    }
}

/// The plugin's drop file, one byte per record nobody took: its size is the count (it
/// lives in the run dir, so it starts over when the node boots, as a counter may).
#[derive(Debug)]
struct Dropped(PathBuf);

impl Collector for Dropped {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let dropped = std::fs::symlink_metadata(&self.0).map_or(0, |m| m.len());
        let metric = encoder.encode_descriptor(
            "records_dropped",
            "Plugin records no agent took (none listened, or its queue was full): counted by the plugin in the run dir.",
            None,
            ConstCounter::new(dropped).metric_type(),
        )?;
        ConstCounter::new(dropped).encode(metric)
    }
}

/// The bound record socket; [`Receiver::close`] removes its file if it is still ours.
pub struct Receiver(RootSocket);

impl Receiver {
    /// Binds `run_dir`'s record socket and counts every record into `metrics`, then
    /// hands it to `then` (the Events).
    pub fn start(
        run_dir: &Path,
        metrics: PluginMetrics,
        then: impl Fn(Record) + Send + 'static,
    ) -> Result<Receiver, InstallError> {
        // The plugin appends to it only: it counts drops where an installer runs.
        std::fs::create_dir_all(run_dir).map_err(InstallError::io("creating", run_dir))?;
        let dropped = run_dir.join(DROPPED_FILE);
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&dropped)
            .map_err(InstallError::io("creating", &dropped))?;
        let (socket, datagrams) = RootSocket::bind_datagram(&run_dir.join(record::SOCKET_NAME))?;
        tokio::spawn(async move {
            // One byte more than a record: a longer datagram is cut, and refused as too long.
            let mut buf = vec![0u8; MAX_RECORD + 1];
            let mut backoff = Duration::from_millis(50);
            loop {
                match datagrams.recv(&mut buf).await {
                    Ok(n) => match Record::parse(&buf[..n]) {
                        Ok(r) => {
                            metrics.observe(&r);
                            then(r);
                        }
                        Err(e) => {
                            metrics.invalid.inc();
                            tracing::debug!(error = %e, "a datagram on the plugin record socket");
                        }
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "cannot read the plugin record socket");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
        });
        Ok(Receiver(socket))
    }

    pub fn close(self) {
        self.0.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cni::plugin::record::{Backend, LookupPath, Reason, Seen};
    use cni::proto::CniError;

    #[test]
    fn records_become_counts_by_label() {
        let dir = tempfile::tempdir().unwrap();
        let mut registry = ops::Registry::with_prefix("kong_mesh_cni_installer");
        let m = PluginMetrics::register(&mut registry, dir.path());
        let ms = Duration::from_millis(3);
        let redirected =
            Seen { lookup: Some(LookupPath::Agent), backend: Some(Backend::IptablesNft), ..Seen::default() };
        m.observe(&Record::of("ADD", &redirected, Ok(()), ms));
        m.observe(&Record::of("ADD", &redirected, Ok(()), ms));
        let gone = Seen { lookup: Some(LookupPath::ApiServer), pass: Some(Reason::PodGone), ..Seen::default() };
        m.observe(&Record::of("ADD", &gone, Ok(()), Duration::from_secs(2)));
        m.observe(&Record::of("ADD", &Seen::default(), Err(&CniError::new(7, "bad", "annotation")), ms));
        m.observe(&Record::of("DEL", &Seen::default(), Ok(()), ms));
        std::fs::write(dir.path().join(DROPPED_FILE), "...").unwrap();
        let text = ops::render(&registry);
        for line in [
            r#"kong_mesh_cni_installer_plugin_requests_total{command="ADD",outcome="redirected",reason="",code="",backend="iptables-nft"} 2"#,
            r#"kong_mesh_cni_installer_plugin_requests_total{command="ADD",outcome="passed-through",reason="pod-gone",code="",backend=""} 1"#,
            r#"kong_mesh_cni_installer_plugin_requests_total{command="ADD",outcome="failed",reason="",code="7",backend=""} 1"#,
            r#"kong_mesh_cni_installer_plugin_requests_total{command="DEL",outcome="ok",reason="",code="",backend=""} 1"#,
            r#"kong_mesh_cni_installer_plugin_request_duration_seconds_count{command="ADD"} 4"#,
            r#"kong_mesh_cni_installer_plugin_request_duration_seconds_bucket{le="2.5",command="ADD"} 4"#,
            r#"kong_mesh_cni_installer_plugin_request_duration_seconds_bucket{le="1.0",command="ADD"} 3"#,
            r#"kong_mesh_cni_installer_plugin_pod_lookups_total{command="ADD",path="agent"} 2"#,
            r#"kong_mesh_cni_installer_plugin_pod_lookups_total{command="ADD",path="api-server"} 1"#,
            "kong_mesh_cni_installer_plugin_records_dropped_total 3",
        ] {
            assert!(text.contains(&format!("{line}\n")), "{line} in:\n{text}");
        }
    }

    /// Every metric the chart's Grafana dashboard queries is one the installer serves.
    #[test]
    fn the_dashboard_queries_metrics_that_exist() {
        let dir = tempfile::tempdir().unwrap();
        let mut status = crate::health::Status::default();
        let metrics = status.register_plugin(dir.path());
        status.register_agent();
        let seen = Seen { lookup: Some(LookupPath::Agent), backend: Some(Backend::Nftables), ..Seen::default() };
        metrics.observe(&Record::of("ADD", &seen, Ok(()), Duration::from_millis(1)));
        let text = status.metrics();
        let file = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deployments/charts/kong-mesh-cni/files/grafana/kong-mesh-cni.json"
        );
        let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
        let mut queried = 0;
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"].as_str().unwrap();
                for (at, _) in expr.match_indices("kong_mesh_cni_") {
                    let name: String =
                        expr[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                    let served = text.lines().any(|l| l.strip_prefix(&name).is_some_and(|r| r.starts_with(['{', ' '])));
                    assert!(served, "{name} (panel {:?}) is not served:\n{text}", panel["title"]);
                    queried += 1;
                }
            }
        }
        assert!(queried >= 8, "{queried} metrics queried");
    }
}
