//! The controller's flags. The `KUMA_RUNTIME_KUBERNETES_NODE_TAINT_CONTROLLER_*`
//! variables are the Go implementation's (a contract); ours start with `KMC_`.

use std::time::Duration;

use clap::builder::BoolishValueParser;

use crate::Error;

#[derive(Debug, Clone, clap::Args)]
pub struct ControllerArgs {
    /// Taint new nodes NodeReadiness:NoSchedule until the CNI pod there is Ready.
    #[arg(long, env = "KUMA_RUNTIME_KUBERNETES_NODE_TAINT_CONTROLLER_ENABLED", default_value = "true", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub taint_enabled: bool,

    /// Value of the `app` label of the CNI DaemonSet's pods.
    #[arg(long, env = "KUMA_RUNTIME_KUBERNETES_NODE_TAINT_CONTROLLER_CNI_APP", default_value = "kong-mesh-cni")]
    pub cni_app: String,

    /// Namespace of the CNI DaemonSet's pods.
    #[arg(long, env = "KUMA_RUNTIME_KUBERNETES_NODE_TAINT_CONTROLLER_CNI_NAMESPACE", default_value = "kube-system")]
    pub cni_namespace: String,

    /// Name of the NetworkAttachmentDefinition put in mesh namespaces: the network
    /// Kuma's injector names in mesh pods' `k8s.v1.cni.cncf.io/networks` annotation,
    /// and the `name` of the plugin's standalone conf under Multus.
    #[arg(long, env = "KMC_NAD_NAME", default_value = "kuma-cni")]
    pub nad_name: String,

    /// What to do with a mesh pod whose validator found no redirect (exit 97).
    #[arg(long, env = "KMC_REPAIR_ACTION", value_enum, default_value = "delete")]
    pub repair_action: RepairAction,

    /// The Lease that elects the one replica that acts.
    #[arg(long, env = "KMC_LEASE_NAME", default_value = "kong-mesh-cni-controller")]
    pub lease_name: String,

    /// The controller's own namespace, where its Lease lives.
    #[arg(long, env = "KMC_LEASE_NAMESPACE", default_value = "kube-system")]
    pub lease_namespace: String,

    /// This replica's name in the Lease (the chart passes the pod name); by default the
    /// host name and a per-process suffix.
    #[arg(long, env = "KMC_LEADER_IDENTITY")]
    pub leader_identity: Option<String>,

    /// How long a leader's claim holds without renewal (whole seconds).
    #[arg(long, env = "KMC_LEASE_DURATION", default_value = "15s", value_parser = ops::duration)]
    pub lease_duration: Duration,

    /// A leader that could not renew for this long stops acting.
    #[arg(long, env = "KMC_LEASE_RENEW_DEADLINE", default_value = "10s", value_parser = ops::duration)]
    pub renew_deadline: Duration,

    /// Interval between attempts to acquire or renew the Lease.
    #[arg(long, env = "KMC_LEASE_RETRY_PERIOD", default_value = "2s", value_parser = ops::duration)]
    pub retry_period: Duration,

    /// Upper bound of every single API call (watches excepted: the server ends them).
    /// At most the lease duration minus the renew deadline.
    #[arg(long, env = "KMC_API_TIMEOUT", default_value = "5s", value_parser = ops::duration)]
    pub api_timeout: Duration,

    /// Port of /metrics, /healthz and /readyz on all addresses; 0 disables them.
    #[arg(long, env = "KMC_METRICS_PORT", default_value_t = 9082)]
    pub metrics_port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RepairAction {
    /// Delete the pod (its owner recreates it, now with the CNI ready).
    Delete,
    /// Label it `kong-mesh-cni/redirect-missing=true` for someone else to act on.
    Label,
    /// Do not watch for such pods at all.
    Off,
}

impl RepairAction {
    pub fn as_str(self) -> &'static str {
        match self {
            RepairAction::Delete => "delete",
            RepairAction::Label => "label",
            RepairAction::Off => "off",
        }
    }
}

impl ControllerArgs {
    /// Parses flags as the `controller` subcommand would (the environment counts too).
    pub fn from_flags<I: IntoIterator<Item = S>, S: Into<std::ffi::OsString> + Clone>(
        flags: I,
    ) -> Result<ControllerArgs, clap::Error> {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            args: ControllerArgs,
        }
        let argv = std::iter::once("controller".into()).chain(flags.into_iter().map(Into::into));
        <Flags as clap::Parser>::try_parse_from(argv).map(|f| f.args)
    }

    /// Rejects timings that would let two replicas act at once.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |why: String| Err(Error::Settings(why));
        if self.lease_duration < Duration::from_secs(1) || self.lease_duration.subsec_nanos() != 0 {
            return invalid(format!(
                "lease duration {:?} must be whole seconds, at least 1s (the Lease records seconds)",
                self.lease_duration
            ));
        }
        if self.renew_deadline >= self.lease_duration {
            return invalid(format!(
                "renew deadline {:?} must be shorter than the lease duration {:?}: the leader must stop acting before others may take over",
                self.renew_deadline, self.lease_duration
            ));
        }
        if self.retry_period.is_zero() || self.retry_period >= self.renew_deadline {
            return invalid(format!(
                "retry period {:?} must be above zero and shorter than the renew deadline {:?}",
                self.retry_period, self.renew_deadline
            ));
        }
        // A write sent just before leadership lapses must be over before another replica
        // may take the Lease (the lease duration after our last renewal).
        let slack = self.lease_duration - self.renew_deadline;
        if self.api_timeout.is_zero() || self.api_timeout > slack {
            return invalid(format!(
                "API timeout {:?} must be above zero and at most the lease duration minus the renew deadline ({slack:?}): a write in flight when leadership lapses must end before another replica may act",
                self.api_timeout
            ));
        }
        Ok(())
    }

    /// The identity written into the Lease: unique per process, readable in `kubectl`.
    pub fn identity(&self) -> String {
        if let Some(id) = self.leader_identity.as_ref().filter(|id| !id.is_empty()) {
            return id.clone();
        }
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "kong-mesh-cni-controller".into());
        // Two processes on one host (or two pods sharing a name after a restart) must
        // still differ: the pid and the start time separate them.
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        format!("{host}_{:x}{nanos:08x}", std::process::id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_go_implementation() {
        let args = ControllerArgs::from_flags(Vec::<String>::new()).unwrap();
        assert!(args.taint_enabled);
        assert_eq!(args.cni_app, "kong-mesh-cni");
        assert_eq!(args.cni_namespace, "kube-system");
        assert_eq!(args.repair_action, RepairAction::Delete);
        assert_eq!(args.metrics_port, 9082);
        args.validate().unwrap();
    }

    #[test]
    fn boolean_spellings_are_accepted() {
        for (v, want) in [("false", false), ("no", false), ("0", false), ("true", true), ("on", true)] {
            let args = ControllerArgs::from_flags(["--taint-enabled", v]).unwrap();
            assert_eq!(args.taint_enabled, want, "{v}");
        }
    }

    #[test]
    fn unsafe_lease_timings_are_refused() {
        let bad = [
            vec!["--lease-duration", "1500ms"],
            vec!["--lease-duration", "10s", "--renew-deadline", "10s"],
            vec!["--renew-deadline", "2s", "--retry-period", "2s"],
            vec!["--api-timeout", "0s"],
            vec!["--lease-duration", "15s", "--renew-deadline", "10s", "--api-timeout", "6s"],
        ];
        for flags in bad {
            let args = ControllerArgs::from_flags(&flags).unwrap();
            assert!(args.validate().is_err(), "{flags:?}");
        }
    }

    #[test]
    fn identities_differ_between_calls() {
        let args = ControllerArgs::from_flags(Vec::<String>::new()).unwrap();
        let a = args.identity();
        std::thread::sleep(std::time::Duration::from_millis(1));
        assert_ne!(a, args.identity());
        let named = ControllerArgs::from_flags(["--leader-identity", "pod-a"]).unwrap();
        assert_eq!(named.identity(), "pod-a");
    }
}
