//! The controller in-process against the real API server, with the identity of a
//! ServiceAccount bound to exactly the chart's RBAC files (`deployments/charts/kong-mesh-cni/files/controller-rbac/`).
//!
//! Also compiled (by path) into `crates/kong-mesh-cni/tests/controller.rs`, which runs
//! the real binary with the same grants, and into the scale benchmark.
//!
//! The controllers are cluster-wide (every node, every pod), so two tests of one binary
//! running at once would act on each other's objects: [`Harness::new`] takes a lock
//! that serialises them.

#![allow(dead_code)] // each test binary uses its own part of this module

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use controller::{ControllerArgs, Error, RepairAction, Status, TAINT_KEY};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding, RoleRef, Subject};
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use testkit::{ApiServer, TestNamespace};
use tokio::sync::{Mutex, MutexGuard, oneshot};
use tokio::task::JoinHandle;

pub const SA: &str = "kong-mesh-cni-controller";

/// A test's namespace (the controller's own and the CNI's) and its serialisation lock.
pub struct Harness {
    pub ns: TestNamespace,
    pub admin: Client,
    _serial: MutexGuard<'static, ()>,
}

impl Harness {
    pub async fn new(server: &ApiServer) -> Harness {
        static SERIAL: Mutex<()> = Mutex::const_new(());
        let serial = SERIAL.lock().await;
        // The controller's logs, shown for failing tests (RUST_LOG=debug for more).
        let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().with_ansi(false).try_init();
        let ns = server.namespace("kmc-ctl").await;
        Harness { admin: ns.client(), ns, _serial: serial }
    }

    /// Flags for a controller living in this namespace, with a short lease so that
    /// leadership tests take seconds (a stopped leader releases it, a stolen one is seen
    /// within the retry period), and no HTTP listener (tests read [`Status`]).
    /// A harness and one controller in it, running as the RBAC-bound identity.
    pub async fn with_controller(server: &ApiServer, repair: RepairAction) -> (Harness, Running) {
        let h = Harness::new(server).await;
        let client = h.controller_client(server, repair).await;
        let ctl = Running::start(client, &h.flags("only", repair)).await;
        (h, ctl)
    }

    pub fn flags(&self, identity: &str, repair: RepairAction) -> Vec<String> {
        let (ns, repair) = (self.ns.name(), repair.as_str());
        [
            "--cni-namespace",
            ns,
            "--lease-namespace",
            ns,
            "--leader-identity",
            identity,
            "--repair-action",
            repair,
            "--lease-duration",
            "6s",
            "--renew-deadline",
            "3s",
            "--retry-period",
            "200ms",
            "--api-timeout",
            "3s",
            "--metrics-port",
            "0",
        ]
        .map(String::from)
        .into()
    }

    /// Binds ServiceAccount [`SA`] of this namespace to the RBAC files the chart ships
    /// for this repair action, and nothing else; once the grants are in effect, returns
    /// a client with that identity.
    pub async fn controller_client(&self, server: &ApiServer, repair: RepairAction) -> Client {
        let mut files = vec!["clusterrole.yaml"];
        match repair {
            RepairAction::Delete => files.push("clusterrole-repair-delete.yaml"),
            RepairAction::Label => files.push("clusterrole-repair-label.yaml"),
            RepairAction::Off => {}
        }
        for file in files {
            self.bind_cluster_role(rbac_file(file)).await;
        }
        let mut role: Role = rbac_file("role-leader-election.yaml");
        role.metadata.namespace = Some(self.ns.name().into());
        Api::<Role>::namespaced(self.admin.clone(), self.ns.name())
            .create(&PostParams::default(), &role)
            .await
            .expect("creating the Role");
        let binding = RoleBinding {
            metadata: role.metadata.clone(),
            role_ref: self.role_ref("Role", role.name_any()),
            subjects: Some(vec![self.subject()]),
        };
        Api::<RoleBinding>::namespaced(self.admin.clone(), self.ns.name())
            .create(&PostParams::default(), &binding)
            .await
            .expect("creating the RoleBinding");
        // Bindings take effect a moment later (the authorizer reads through a cache):
        // wait until a node list and a Lease read are no longer refused.
        let client = server.service_account_client(self.ns.name(), SA).await;
        let (nodes, leases) =
            (Api::<Node>::all(client.clone()), Api::<Lease>::namespaced(client.clone(), self.ns.name()));
        eventually("the grants to take effect", Duration::from_secs(10), || {
            let (nodes, leases) = (nodes.clone(), leases.clone());
            async move {
                let lease = leases.get_opt("kong-mesh-cni-controller").await;
                nodes.list(&ListParams::default().limit(1)).await.is_ok() && lease.is_ok()
            }
        })
        .await;
        client
    }

    /// Creates the ClusterRole under a name unique to this namespace (the shared API
    /// server outlives the test) and binds it to the ServiceAccount.
    async fn bind_cluster_role(&self, mut role: ClusterRole) {
        let name = format!("{}-{}", role.name_any(), self.ns.name());
        role.metadata.name = Some(name.clone());
        Api::<ClusterRole>::all(self.admin.clone())
            .create(&PostParams::default(), &role)
            .await
            .expect("creating the ClusterRole");
        let binding = ClusterRoleBinding {
            metadata: kube::api::ObjectMeta { name: Some(name.clone()), ..Default::default() },
            role_ref: self.role_ref("ClusterRole", name),
            subjects: Some(vec![self.subject()]),
        };
        Api::<ClusterRoleBinding>::all(self.admin.clone())
            .create(&PostParams::default(), &binding)
            .await
            .expect("creating the ClusterRoleBinding");
    }

    fn role_ref(&self, kind: &str, name: String) -> RoleRef {
        RoleRef { api_group: Some("rbac.authorization.k8s.io".into()), kind: kind.into(), name }
    }

    fn subject(&self) -> Subject {
        Subject {
            kind: "ServiceAccount".into(),
            name: SA.into(),
            namespace: Some(self.ns.name().into()),
            ..Default::default()
        }
    }
}

pub fn rbac_file<T: k8s_openapi::serde::de::DeserializeOwned>(file: &str) -> T {
    let path = testkit::repo_root().join("deployments/charts/kong-mesh-cni/files/controller-rbac").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// One controller instance running in this process.
pub struct Running {
    pub status: Arc<Status>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), Error>>,
}

impl Running {
    /// Starts the controller and waits until it reports ready.
    pub async fn start(client: Client, flags: &[String]) -> Running {
        let args = ControllerArgs::from_flags(flags).expect("valid flags");
        let status = Arc::new(Status::new(&controller::parts(&args)));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(controller::serve(client, args, status.clone(), async {
            let _ = stopped.await;
        }));
        let ready = status.clone();
        eventually("the controller to be ready", Duration::from_secs(20), || {
            let ready = ready.clone();
            async move { ready.is_ready() }
        })
        .await;
        Running { status, stop, task }
    }

    pub fn is_leader(&self) -> bool {
        metric(&self.status.render(), "kong_mesh_cni_controller_leader") == 1
    }

    /// Stops it (it gives up the Lease) and checks it never hit a refusal: the RBAC
    /// files were enough for everything it did.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.expect("controller task").expect("controller result");
        assert_no_forbidden(&self.status);
    }
}

pub fn assert_no_forbidden(status: &Status) {
    let text = status.render();
    let refused: Vec<&str> =
        text.lines().filter(|l| l.contains("kind=\"403\"") || l.contains("kind=\"401\"")).collect();
    assert!(refused.is_empty(), "the controller was refused: {refused:?}");
}

/// The value of one sample (`name{labels}` exactly as rendered); 0 when absent.
pub fn metric(text: &str, sample: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(name, _)| *name == sample)
        .map_or(0, |(_, v)| v.parse::<f64>().expect("a number") as u64)
}

/// Polls `check` every 10 ms until it holds; panics after `limit`. Returns the time it took.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "waited {limit:?} for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Asserts that `check` holds for the whole of `period` (for "nothing happens").
pub async fn throughout<F, Fut>(what: &str, period: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < period {
        assert!(check().await, "{what} stopped holding after {:?}", start.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET path` on 127.0.0.1:`port`: the status code and the body, or None if nobody
/// answers. Enough HTTP for the controller's own endpoints.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    conn.read_to_string(&mut response).await.ok()?;
    let code = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((code, body))
}

/// The node's taints as `key:effect`.
pub async fn taints(admin: &Client, node: &str) -> Vec<String> {
    let node = Api::<Node>::all(admin.clone()).get(node).await.expect("getting the node");
    node.spec
        .and_then(|s| s.taints)
        .unwrap_or_default()
        .into_iter()
        .map(|t| format!("{}:{}", t.key, t.effect))
        .collect()
}

pub async fn tainted(admin: &Client, node: &str) -> bool {
    taints(admin, node).await.iter().any(|t| t == &format!("{TAINT_KEY}:NoSchedule"))
}

/// The label of the chart's CNI pods (the controller's `--cni-app`).
const CNI_LABEL: (&str, &str) = ("app", "kong-mesh-cni");

/// A CNI DaemonSet pod on `node`, made Ready (as its kubelet reports it) if `ready`.
pub async fn cni_pod(ns: &TestNamespace, name: &str, node: &str, ready: bool) {
    ns.create_pod(testkit::pod(name).label(CNI_LABEL.0, CNI_LABEL.1).node_name(node).build()).await;
    if ready {
        ns.set_pod_running(name, None).await;
    }
}
