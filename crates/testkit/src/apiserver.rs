//! A real kube-apiserver + etcd (`k8s-testenv`), its clients and identities.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, PostParams};
use kube::config::Kubeconfig;
use serde_json::{Value, json};

use crate::objects::{TestNamespace, TestNode};
use crate::{bin_dir, client_from, repo_root, unique_suffix};

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
        cmd.arg("--data-dir").arg(&dir).arg("--kubeconfig").arg(&kubeconfig);
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
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {:?}: {e}", cmd.get_program()));

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
                panic!("k8s-testenv did not become ready within {READY_TIMEOUT:?}; end of its log:\n{tail}");
            }
            return Err(format!("k8s-testenv exited before it was ready; end of its log:\n{tail}"));
        }
        eprintln!("testenv: API server ready in {:.1?} ({})", started.elapsed(), dir.display());
        Ok(ApiServer { dir, kubeconfig, child: Mutex::new(child) })
    }

    /// Stops the server where it is (SIGSTOP to k8s-testenv: etcd and kube-apiserver
    /// freeze with their data, port and certs). Its port still accepts connections, but
    /// nothing answers: what a node sees when the API server hangs or the network drops
    /// its packets. [`ApiServer::resume`] brings it back as it was; dropping the server
    /// resumes it first. For a private server only ([`ApiServer::start`]): the shared
    /// one serves the other tests of the binary.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: i32) {
        let child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's, not reaped.
        let sent = unsafe { libc::kill(child.id() as i32, signal) };
        assert_eq!(sent, 0, "signal {signal} to k8s-testenv: {}", std::io::Error::last_os_error());
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
                labels: Some(BTreeMap::from([("kmc-test".to_string(), "true".to_string())])),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
        TestNamespace { name, client, kubeconfig: self.kubeconfig.clone() }
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
                labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Node>::all(client.clone())
            .create(&PostParams::default(), &node)
            .await
            .unwrap_or_else(|e| panic!("creating node {name}: {e}"));
        TestNode { name, client, kubeconfig: self.kubeconfig.clone() }
    }

    /// A kubeconfig for ServiceAccount `namespace/name` (created if missing), with a bound
    /// token minted through the TokenRequest API (valid one hour). It has only the RBAC
    /// the test grants it through the admin client.
    pub async fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> PathBuf {
        let client = self.client().await;
        let sas = Api::<ServiceAccount>::namespaced(client, namespace);
        let sa = ServiceAccount {
            metadata: ObjectMeta { name: Some(name.to_string()), ..Default::default() },
            ..Default::default()
        };
        match sas.create(&PostParams::default(), &sa).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("creating ServiceAccount {namespace}/{name}: {e}"),
        }
        let request = TokenRequest {
            spec: Some(TokenRequestSpec { expiration_seconds: Some(3600), ..Default::default() }),
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
        let cluster = admin.clusters[0].cluster.clone().expect("admin kubeconfig has a cluster");
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
        let path = self.dir.join(format!("sa-{namespace}-{name}-{}.kubeconfig", unique_suffix()));
        std::fs::write(&path, serde_json::to_vec_pretty(&kubeconfig).unwrap())
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }

    /// What the kubelet projects into a pod running as ServiceAccount `namespace/name`,
    /// written to `dir`: its token and the cluster CA as files, with the API server's
    /// address as `KUBERNETES_SERVICE_HOST`/`_PORT` would give it. For the installer.
    pub async fn project_service_account(&self, namespace: &str, name: &str, dir: &Path) -> ProjectedServiceAccount {
        use base64::Engine;
        let minted: Value =
            serde_json::from_slice(&std::fs::read(self.service_account_kubeconfig(namespace, name).await).unwrap())
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
        // A paused server (a test that failed before resuming it) must read the EOF.
        // SAFETY: as in `signal`.
        unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
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

fn log_tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(8000)));
        let _ = f.read_to_string(&mut text);
    }
    text
}
