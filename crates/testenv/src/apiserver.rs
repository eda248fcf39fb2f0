//! A real kube-apiserver + etcd (`k8s-testenv`), and objects that clean up after
//! themselves.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Container, Namespace, Node, Pod, PodSpec, ServiceAccount};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::{Value, json};

use crate::{bin_dir, block_on_thread, repo_root, unique_suffix};

/// How long the first start may take (a cold page cache after a build is the slow case).
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// A running `k8s-testenv`: etcd + kube-apiserver v1.37 on 127.0.0.1, RBAC on,
/// ServiceAccount admission off (no controller-manager creates `default` SAs), no
/// controllers or scheduler (tests write node and pod status themselves). The CRDs in
/// `testenv/crds/` (Multus NetworkAttachmentDefinition) are installed.
pub struct ApiServer {
    dir: PathBuf,
    kubeconfig: PathBuf,
    child: Mutex<Child>,
}

impl ApiServer {
    /// The API server of this test binary, started on first use and shared by all its
    /// tests. It holds the server's stdin pipe until the process exits, at which point
    /// the server sees EOF, stops, and removes its data dir. Tests must therefore use
    /// unique names ([`ApiServer::namespace`], [`ApiServer::node`]).
    pub fn shared() -> &'static ApiServer {
        static SHARED: OnceLock<ApiServer> = OnceLock::new();
        SHARED.get_or_init(|| ApiServer::start(&default_crds()))
    }

    /// Starts a private API server with these CRD files installed before it reports
    /// ready. Stopped (and its data removed) on drop. Prefer [`ApiServer::shared`]:
    /// each start costs seconds.
    pub fn start(crds: &[PathBuf]) -> ApiServer {
        // k8s-testenv picks free loopback ports and binds them a moment later; another
        // process can take one in between. That start fails at once: try again.
        let mut failure = String::new();
        for attempt in 1..=3 {
            match ApiServer::try_start(crds) {
                Ok(server) => return server,
                Err(e) => {
                    eprintln!("testenv: start attempt {attempt} failed");
                    failure = e;
                }
            }
        }
        panic!("{failure}");
    }

    fn try_start(crds: &[PathBuf]) -> Result<ApiServer, String> {
        let dir = std::env::temp_dir().join(format!("kmc-testenv-{}", unique_suffix()));
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let kubeconfig = dir.join("admin.kubeconfig");
        let log_path = dir.join("k8s-testenv.log");
        let log = std::fs::File::create(&log_path).expect("creating k8s-testenv log");

        let mut cmd = Command::new(bin_dir().join("k8s-testenv"));
        cmd.arg("--data-dir")
            .arg(&dir)
            .arg("--kubeconfig")
            .arg(&kubeconfig);
        for crd in crds {
            cmd.arg("--crd").arg(crd);
        }
        // stdin is the lifeline: k8s-testenv exits when it reads EOF, i.e. when we die.
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        if std::env::var_os("KMC_TESTENV_VERBOSE").is_some() {
            cmd.stderr(Stdio::inherit());
        } else {
            cmd.stderr(log);
        }
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {:?}: {e}", cmd.get_program()));

        // Wait for "READY <path>" on stdout, then keep draining stdout on that thread so
        // that a late write can never block or SIGPIPE the server.
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            for line in lines.by_ref() {
                let Ok(line) = line else { break };
                if line.starts_with("READY ") {
                    let _ = tx.send(());
                    break;
                }
            }
            for _ in lines {}
        });
        if let Err(e) = rx.recv_timeout(READY_TIMEOUT) {
            let _ = child.kill();
            let _ = child.wait();
            let tail = log_tail(&log_path);
            let _ = std::fs::remove_dir_all(&dir);
            if e == mpsc::RecvTimeoutError::Timeout {
                // Not a lost port race: trying again would only wait as long again.
                panic!(
                    "k8s-testenv did not become ready within {READY_TIMEOUT:?}; end of its log:\n{tail}"
                );
            }
            return Err(format!(
                "k8s-testenv exited before it was ready; end of its log:\n{tail}"
            ));
        }
        eprintln!(
            "testenv: API server ready in {:.1?} ({})",
            started.elapsed(),
            dir.display()
        );
        Ok(ApiServer {
            dir,
            kubeconfig,
            child: Mutex::new(child),
        })
    }

    /// The admin (system:masters) kubeconfig. Server address is `https://127.0.0.1:PORT`.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The server's working dir (certs, etcd, logs, and the service-account kubeconfigs
    /// written by [`ApiServer::service_account_kubeconfig`]); removed when it stops.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// An admin client. Create one per test (per tokio runtime): a client's connections
    /// belong to the runtime it was created in.
    pub async fn client(&self) -> Client {
        client_from(&self.kubeconfig).await
    }

    /// Creates namespace `PREFIX-xxxxxxxx` (labelled `kmc-test=true`); removed on drop.
    pub async fn namespace(&self, prefix: &str) -> TestNamespace {
        let name = format!("{prefix}-{}", unique_suffix());
        let client = self.client().await;
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([(
                    "kmc-test".to_string(),
                    "true".to_string(),
                )])),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
        TestNamespace {
            name,
            client,
            kubeconfig: self.kubeconfig.clone(),
        }
    }

    /// Creates node `PREFIX-xxxxxxxx` with these labels (not Ready until
    /// [`TestNode::set_ready`]); deleted on drop. Note that the TaintNodesByCondition
    /// admission plugin gives a new node the `node.kubernetes.io/not-ready` taint.
    pub async fn node(&self, prefix: &str, labels: &[(&str, &str)]) -> TestNode {
        let name = format!("{prefix}-{}", unique_suffix());
        let client = self.client().await;
        let node = Node {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Node>::all(client.clone())
            .create(&PostParams::default(), &node)
            .await
            .unwrap_or_else(|e| panic!("creating node {name}: {e}"));
        TestNode {
            name,
            client,
            kubeconfig: self.kubeconfig.clone(),
        }
    }

    /// A kubeconfig for ServiceAccount `namespace/name` (created if missing), with a bound
    /// token minted through the TokenRequest API (valid one hour). It has only the RBAC
    /// the test grants it through the admin client.
    pub async fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> PathBuf {
        let client = self.client().await;
        let sas = Api::<ServiceAccount>::namespaced(client, namespace);
        let sa = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..Default::default()
            },
            ..Default::default()
        };
        match sas.create(&PostParams::default(), &sa).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("creating ServiceAccount {namespace}/{name}: {e}"),
        }
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(3600),
                ..Default::default()
            }),
            ..Default::default()
        };
        let token = sas
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .unwrap_or_else(|e| panic!("TokenRequest for {namespace}/{name}: {e}"))
            .status
            .expect("TokenRequest has a status")
            .token;

        let admin = Kubeconfig::read_from(&self.kubeconfig).expect("reading admin kubeconfig");
        let cluster = admin.clusters[0]
            .cluster
            .clone()
            .expect("admin kubeconfig has a cluster");
        // JSON is YAML: kube and kubectl both read it.
        let kubeconfig = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "k8s-testenv", "cluster": {
                "server": cluster.server,
                "certificate-authority-data": cluster.certificate_authority_data,
            }}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": "sa", "context": {"cluster": "k8s-testenv", "user": name, "namespace": namespace}}],
            "current-context": "sa",
        });
        let path = self.dir.join(format!(
            "sa-{namespace}-{name}-{}.kubeconfig",
            unique_suffix()
        ));
        std::fs::write(&path, serde_json::to_vec_pretty(&kubeconfig).unwrap())
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }

    /// What the kubelet projects into a pod running as ServiceAccount `namespace/name`,
    /// written to `dir`: its token and the cluster CA as files, with the API server's
    /// address as `KUBERNETES_SERVICE_HOST`/`_PORT` would give it. For the installer.
    pub async fn project_service_account(&self, namespace: &str, name: &str, dir: &Path) -> ProjectedServiceAccount {
        use base64::Engine;
        let minted: Value = serde_json::from_slice(&std::fs::read(self.service_account_kubeconfig(namespace, name).await).unwrap())
            .expect("the kubeconfig is JSON");
        let cluster = &minted["clusters"][0]["cluster"];
        let ca = base64::engine::general_purpose::STANDARD
            .decode(cluster["certificate-authority-data"].as_str().expect("CA data"))
            .expect("CA data is base64");
        let server = cluster["server"].as_str().expect("server URL");
        let (host, port) = server.trim_start_matches("https://").rsplit_once(':').expect("host:port");
        let projected = ProjectedServiceAccount {
            token_file: dir.join("token"),
            ca_file: dir.join("ca.crt"),
            host: host.to_owned(),
            port: port.to_owned(),
        };
        std::fs::write(&projected.token_file, minted["users"][0]["user"]["token"].as_str().expect("token")).unwrap();
        std::fs::write(&projected.ca_file, ca).unwrap();
        projected
    }

    /// A client with the identity of ServiceAccount `namespace/name` (see
    /// [`ApiServer::service_account_kubeconfig`]).
    pub async fn service_account_client(&self, namespace: &str, name: &str) -> Client {
        client_from(&self.service_account_kubeconfig(namespace, name).await).await
    }
}

/// A service account's credentials as files, and where the API server is.
#[derive(Debug, Clone)]
pub struct ProjectedServiceAccount {
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
    pub host: String,
    pub port: String,
}

impl Drop for ApiServer {
    /// Only private servers are dropped ([`ApiServer::shared`] lives in a static): close
    /// stdin, which makes k8s-testenv stop and remove its dir; kill it if it lingers.
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        drop(child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("testenv: k8s-testenv did not stop within 30s; killing it");
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Every CRD shipped in `testenv/crds/`.
fn default_crds() -> Vec<PathBuf> {
    let dir = repo_root().join("testenv/crds");
    let mut crds: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    crds.sort();
    crds
}

async fn client_from(kubeconfig: &Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig)
        .unwrap_or_else(|e| panic!("reading {}: {e}", kubeconfig.display()));
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("loading {}: {e}", kubeconfig.display()));
    Client::try_from(config).expect("building kube client")
}

fn log_tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(8000)));
        let _ = f.read_to_string(&mut text);
    }
    text
}

/// A namespace that is removed on drop: its pods are deleted at once (grace period 0,
/// no kubelet would confirm), then the namespace, whose `kubernetes` finalizer is
/// cleared by hand since no namespace controller runs.
pub struct TestNamespace {
    name: String,
    client: Client,
    kubeconfig: PathBuf,
}

impl TestNamespace {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The admin client this namespace was created with (same runtime as the test).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// An admin `Api` for namespaced kind `K` in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Creates the pod in this namespace (its `metadata.namespace` is overwritten).
    pub async fn create_pod(&self, mut pod: Pod) -> Pod {
        pod.metadata.namespace = Some(self.name.clone());
        let name = pod.metadata.name.clone().unwrap_or_default();
        self.api::<Pod>()
            .create(&PostParams::default(), &pod)
            .await
            .unwrap_or_else(|e| panic!("creating pod {}/{name}: {e}", self.name))
    }

    /// Writes the status a kubelet would once the pod runs: phase Running, all
    /// containers running and ready, conditions True, and `pod_ip` if given.
    pub async fn set_pod_running(&self, name: &str, pod_ip: Option<&str>) -> Pod {
        let pods = self.api::<Pod>();
        let pod = pods
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("getting pod {name}: {e}"));
        let spec = pod.spec.unwrap_or_default();
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let running = |c: &Container| {
            json!({
                "name": c.name, "image": c.image, "imageID": "", "ready": true, "started": true,
                "restartCount": 0, "state": {"running": {"startedAt": now}},
            })
        };
        let conditions = ["PodScheduled", "Initialized", "ContainersReady", "Ready"]
            .map(|t| json!({"type": t, "status": "True", "lastTransitionTime": now}));
        let containers: Vec<Value> = spec.containers.iter().map(running).collect();
        let mut status = json!({
            "phase": "Running",
            "startTime": now,
            "conditions": conditions,
            "containerStatuses": containers,
        });
        if let Some(ip) = pod_ip {
            status["podIP"] = json!(ip);
            status["podIPs"] = json!([{ "ip": ip }]);
        }
        pods.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await
        .unwrap_or_else(|e| panic!("updating status of pod {}/{name}: {e}", self.name))
    }

    /// Creates Role `role` with these rules and binds it to ServiceAccount `sa` of this
    /// namespace (the SA itself is created by [`ApiServer::service_account_kubeconfig`]),
    /// and returns once the grant is in effect.
    pub async fn grant(&self, sa: &str, role: &str, rules: Vec<PolicyRule>) {
        let rules_copy = rules.clone();
        let meta = ObjectMeta {
            name: Some(role.to_string()),
            ..Default::default()
        };
        self.api::<Role>()
            .create(
                &PostParams::default(),
                &Role {
                    metadata: meta.clone(),
                    rules: Some(rules),
                },
            )
            .await
            .unwrap_or_else(|e| panic!("creating Role {role}: {e}"));
        let binding = RoleBinding {
            metadata: meta,
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "Role".into(),
                name: role.into(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: sa.into(),
                namespace: Some(self.name.clone()),
                ..Default::default()
            }]),
        };
        self.api::<RoleBinding>()
            .create(&PostParams::default(), &binding)
            .await
            .unwrap_or_else(|e| panic!("creating RoleBinding {role}: {e}"));
        // The RBAC authorizer reads through an informer: a new binding takes effect a
        // moment later. Wait until a SubjectAccessReview says the first verb of each
        // rule is allowed, so the caller's next request sees the grant.
        let user = format!("system:serviceaccount:{}:{sa}", self.name);
        let reviews = Api::<SubjectAccessReview>::all(self.client.clone());
        for rule in &rules_copy {
            let first = |v: &Option<Vec<String>>| v.as_ref().and_then(|v| v.first().cloned());
            let review = SubjectAccessReview {
                spec: SubjectAccessReviewSpec {
                    user: Some(user.clone()),
                    resource_attributes: Some(ResourceAttributes {
                        namespace: Some(self.name.clone()),
                        group: first(&rule.api_groups),
                        resource: first(&rule.resources),
                        verb: rule.verbs.first().cloned(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let allowed = reviews
                    .create(&PostParams::default(), &review)
                    .await
                    .map(|r| r.status.is_some_and(|s| s.allowed))
                    .unwrap_or(false);
                if allowed {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "grant {role} to {user}: not effective after 10s"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let (name, kubeconfig) = (self.name.clone(), self.kubeconfig.clone());
        block_on_thread(move || async move {
            let client = client_from(&kubeconfig).await;
            let now = DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            };
            let pods = Api::<Pod>::namespaced(client.clone(), &name);
            if let Err(e) = pods.delete_collection(&now, &ListParams::default()).await {
                eprintln!("testenv: deleting pods of {name}: {e}");
            }
            let namespaces = Api::<Namespace>::all(client);
            if let Err(e) = namespaces.delete(&name, &DeleteParams::default()).await {
                eprintln!("testenv: deleting namespace {name}: {e}");
                return;
            }
            // Empty spec.finalizers through the finalize subresource: the namespace goes.
            let finalize = json!({"metadata": {"name": name}, "spec": {"finalizers": []}});
            if let Err(e) = namespaces
                .replace_subresource("finalize", &name, &PostParams::default(), &finalize)
                .await
                && !matches!(&e, kube::Error::Api(s) if s.code == 404)
            {
                eprintln!("testenv: finalizing namespace {name}: {e}");
            }
        });
    }
}

/// A node object (no kubelet behind it), deleted on drop.
pub struct TestNode {
    name: String,
    client: Client,
    kubeconfig: PathBuf,
}

impl TestNode {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the node's Ready condition, as its kubelet would.
    pub async fn set_ready(&self, ready: bool) -> Node {
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let status = if ready { "True" } else { "False" };
        let patch = json!({"status": {"conditions": [{
            "type": "Ready", "status": status, "reason": "KubeletReady", "message": "set by test",
            "lastHeartbeatTime": now, "lastTransitionTime": now,
        }]}});
        Api::<Node>::all(self.client.clone())
            .patch_status(
                &self.name,
                &PatchParams::default(),
                &Patch::Strategic(patch),
            )
            .await
            .unwrap_or_else(|e| panic!("updating status of node {}: {e}", self.name))
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        let (name, kubeconfig) = (self.name.clone(), self.kubeconfig.clone());
        block_on_thread(move || async move {
            let nodes = Api::<Node>::all(client_from(&kubeconfig).await);
            if let Err(e) = nodes.delete(&name, &DeleteParams::default()).await {
                eprintln!("testenv: deleting node {name}: {e}");
            }
        });
    }
}

/// Starts a pod description: `pod("app").annotation(k, v).container("kuma-sidecar").build()`.
pub fn pod(name: &str) -> PodBuilder {
    PodBuilder {
        pod: Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        },
    }
}

/// Builds a [`Pod`]; with no container given, it gets one named `app`.
pub struct PodBuilder {
    pod: Pod,
}

impl PodBuilder {
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.pod
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(key.into(), value.into());
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.pod
            .metadata
            .labels
            .get_or_insert_default()
            .insert(key.into(), value.into());
        self
    }

    pub fn container(mut self, name: &str) -> Self {
        self.spec().containers.push(test_container(name));
        self
    }

    pub fn init_container(mut self, name: &str) -> Self {
        self.spec()
            .init_containers
            .get_or_insert_default()
            .push(test_container(name));
        self
    }

    /// A native sidecar: an init container with `restartPolicy: Always`.
    pub fn sidecar_init_container(mut self, name: &str) -> Self {
        let c = Container {
            restart_policy: Some("Always".into()),
            ..test_container(name)
        };
        self.spec().init_containers.get_or_insert_default().push(c);
        self
    }

    /// Binds the pod to a node, as the scheduler would.
    pub fn node_name(mut self, node: &str) -> Self {
        self.spec().node_name = Some(node.into());
        self
    }

    pub fn build(mut self) -> Pod {
        if self.spec().containers.is_empty() {
            self.spec().containers.push(test_container("app"));
        }
        self.pod
    }

    fn spec(&mut self) -> &mut PodSpec {
        self.pod.spec.get_or_insert_default()
    }
}

fn test_container(name: &str) -> Container {
    // Never pulled: no kubelet runs.
    Container {
        name: name.into(),
        image: Some("kmc-test/none:0".into()),
        ..Default::default()
    }
}

/// A [`PolicyRule`]: `policy_rule(&[""], &["pods"], &["get"])`.
pub fn policy_rule(api_groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
    let strings = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect());
    PolicyRule {
        api_groups: strings(api_groups),
        resources: strings(resources),
        verbs: verbs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}
