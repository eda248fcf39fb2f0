//! The Kind preset's manifests against a real API server of the test environment
//! (kube-apiserver v1.37, RBAC on): every object passes a server-side dry-run create
//! (schema, defaulting, admission), then all are created for real (the namespaced ones
//! in a fresh namespace) and read back.
//!
//! The shared test API server runs with kube-apiserver's default
//! --allow-privileged=false, which refuses any privileged container; real clusters
//! (Kind, kubeadm, the clouds) run with true. So this test starts its own k8s-testenv
//! with that one flag added.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DynamicObject, GroupVersionKind, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::discovery::{Scope, pinned_kind};
use manifests::{Chart, Options};

/// A private k8s-testenv with privileged containers allowed; stops when dropped.
struct PrivilegedApiServer {
    child: Child,
    kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
}

impl PrivilegedApiServer {
    fn start() -> PrivilegedApiServer {
        let crd = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testenv/crds/network-attachment-definition.yaml");
        let mut failure = String::new();
        // k8s-testenv picks free ports and binds them a moment later: a lost race
        // fails the start at once, and another try usually wins.
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let kubeconfig = dir.path().join("admin.kubeconfig");
            let log = std::fs::File::create(dir.path().join("k8s-testenv.log")).unwrap();
            let mut child = Command::new(testkit::bin_dir().join("k8s-testenv"))
                .arg("--data-dir")
                .arg(dir.path().join("data"))
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .arg("--crd")
                .arg(&crd)
                .arg("--apiserver-arg=--allow-privileged=true")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(log)
                .spawn()
                .expect("spawning k8s-testenv");
            let stdout = child.stdout.take().unwrap();
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let mut lines = BufReader::new(stdout).lines();
                for line in lines.by_ref().map_while(Result::ok) {
                    if line.starts_with("READY ") {
                        let _ = tx.send(());
                        break;
                    }
                }
                for _ in lines {}
            });
            if rx.recv_timeout(Duration::from_secs(180)).is_ok() {
                return PrivilegedApiServer { child, kubeconfig, _dir: dir };
            }
            let _ = child.kill();
            let _ = child.wait();
            failure = std::fs::read_to_string(dir.path().join("k8s-testenv.log")).unwrap_or_default();
        }
        panic!("k8s-testenv did not start; its log:\n{failure}");
    }

    async fn client(&self) -> kube::Client {
        let config = kube::Config::from_custom_kubeconfig(
            Kubeconfig::read_from(&self.kubeconfig).unwrap(),
            &KubeConfigOptions::default(),
        )
        .await
        .unwrap();
        kube::Client::try_from(config).unwrap()
    }
}

impl Drop for PrivilegedApiServer {
    fn drop(&mut self) {
        // EOF on stdin stops it cleanly (and it removes its data dir); kill as a backstop.
        drop(self.child.stdin.take());
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kind_preset_is_accepted_by_a_real_api_server() {
    if testkit::skip_heavy("applying the Kind manifests to the test API server") {
        return;
    }
    let server = PrivilegedApiServer::start();
    let client = server.client().await;
    let ns_name = format!("kmc-chart-{}", testkit::unique_suffix());
    let namespace: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": ns_name}})).unwrap();
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &namespace).await.unwrap();
    let ns = ns_name.as_str();
    let opts = Options { preset: Some("kind".into()), namespace: Some(ns.to_owned()), ..Options::default() };
    let manifests = Chart::embedded().render(&opts).unwrap();
    assert!(manifests.len() >= 12, "{} objects", manifests.len());

    let mut created = Vec::new();
    for m in &manifests {
        let obj: DynamicObject =
            serde_norway::from_str(&m.content).unwrap_or_else(|e| panic!("{} {}: {e}", m.kind, m.name));
        let types = obj.types.clone().expect("apiVersion and kind");
        let gvk = GroupVersionKind::try_from(&types).unwrap();
        let (resource, caps) =
            pinned_kind(&client, &gvk).await.unwrap_or_else(|e| panic!("the API server does not serve {gvk:?}: {e}"));
        let api: Api<DynamicObject> = match caps.scope {
            Scope::Namespaced => Api::namespaced_with(client.clone(), ns, &resource),
            Scope::Cluster => Api::all_with(client.clone(), &resource),
        };
        let dry_run = PostParams { dry_run: true, ..PostParams::default() };
        let answer = api
            .create(&dry_run, &obj)
            .await
            .unwrap_or_else(|e| panic!("dry-run create of {} {} refused: {e}", m.kind, m.name));
        assert_eq!(answer.metadata.name.as_deref(), Some(m.name.as_str()));
        created.push((api, obj, m));
    }
    // Then for real, in the order the stream has them (Helm's install order).
    for (api, obj, m) in &created {
        api.create(&PostParams::default(), obj)
            .await
            .unwrap_or_else(|e| panic!("create of {} {} refused: {e}", m.kind, m.name));
    }
    let ds = Api::<DaemonSet>::namespaced(client.clone(), ns).get("kong-mesh-cni").await.unwrap();
    let pod = ds.spec.template.spec.unwrap();
    assert!(
        pod.tolerations
            .unwrap()
            .iter()
            .any(|t| t.key.as_deref() == Some("NodeReadiness") && t.effect.as_deref() == Some("NoSchedule"))
    );
    let installer = &pod.containers[0];
    assert_eq!(installer.security_context.as_ref().unwrap().privileged, Some(true));
    let volumes = pod.volumes.unwrap();
    let host =
        |name: &str| volumes.iter().find(|v| v.name == name).and_then(|v| v.host_path.as_ref()).map(|h| h.path.clone());
    assert_eq!(host("cni-net-dir").as_deref(), Some("/etc/cni/net.d"));
    assert_eq!(host("cni-bin-dir").as_deref(), Some("/opt/cni/bin"));
    let deploy = Api::<Deployment>::namespaced(client, ns).get("kong-mesh-cni-controller").await.unwrap();
    assert_eq!(deploy.spec.template.spec.unwrap().service_account_name.as_deref(), Some("kong-mesh-cni-controller"));
}
