//! Two replicas: only the Lease holder acts; a successor takes over; a leader that loses
//! the Lease stops at once and catches up when it gets it back.

mod common;

use std::time::Duration;

use common::{Harness, Running, eventually, metric, tainted, throughout};
use controller::{RepairAction, SIDECAR_INJECTION_LABEL, nad_resource};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::json;
use testkit::ApiServer;

const LEASE: &str = "kong-mesh-cni-controller";

/// Every action counter of one replica, summed.
fn actions(ctl: &Running) -> u64 {
    let text = ctl.status.render();
    [
        "taint_changes_total{change=\"add\"}",
        "taint_changes_total{change=\"remove\"}",
        "nad_changes_total{change=\"create\"}",
        "repair_actions_total{action=\"delete\"}",
    ]
    .iter()
    .map(|s| metric(&text, &format!("kong_mesh_cni_controller_{s}")))
    .sum()
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases.get(LEASE).await.unwrap().spec.and_then(|s| s.holder_identity)
}

/// Writes the Lease as another replica would: `holder` (none: released) with a fresh
/// renewal and a long duration.
async fn write_lease(leases: &Api<Lease>, holder: Option<&str>) {
    let mut lease = leases.get(LEASE).await.unwrap();
    let spec = lease.spec.get_or_insert_default();
    spec.holder_identity = holder.map(Into::into);
    spec.renew_time = Some(MicroTime(k8s_openapi::jiff::Timestamp::now()));
    spec.lease_duration_seconds = Some(3600);
    leases.replace(LEASE, &PostParams::default(), &lease).await.expect("writing the lease");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_acts_and_a_successor_takes_over() {
    if testkit::skip_heavy("leader election") {
        return;
    }
    let server = ApiServer::shared();
    let h = Harness::new(server).await;
    let client = h.controller_client(server, RepairAction::Delete).await;
    let a = Running::start(client.clone(), &h.flags("replica-a", RepairAction::Delete)).await;
    eventually("replica-a to lead", Duration::from_secs(5), || async { a.is_leader() }).await;
    let b = Running::start(client, &h.flags("replica-b", RepairAction::Delete)).await;
    let leases = Api::<Lease>::namespaced(h.admin.clone(), h.ns.name());
    assert_eq!(holder(&leases).await.as_deref(), Some("replica-a"));

    let admin = &h.admin;
    let node = server.node("kmc-leader", &[]).await;
    eventually("the node to be tainted", Duration::from_secs(5), || tainted(admin, node.name())).await;
    let mesh = server.namespace("kmc-mesh").await;
    let label = json!({"metadata": {"labels": {SIDECAR_INJECTION_LABEL: "enabled"}}});
    Api::<Namespace>::all(admin.clone())
        .patch(mesh.name(), &PatchParams::default(), &Patch::Merge(label))
        .await
        .unwrap();
    let nads = Api::<DynamicObject>::namespaced_with(admin.clone(), mesh.name(), &nad_resource());
    eventually("the NAD", Duration::from_secs(5), || async { nads.get_opt("kuma-cni").await.unwrap().is_some() }).await;

    assert!(actions(&a) >= 2, "replica-a:\n{}", a.status.render());
    assert_eq!(actions(&b), 0, "replica-b acted:\n{}", b.status.render());
    assert!(!b.is_leader());

    // replica-a goes away cleanly (a rolling update): it gives the Lease up and
    // replica-b takes over within a retry period, not after the lease duration.
    a.stop().await;
    let took = eventually("replica-b to lead", Duration::from_secs(5), || async { b.is_leader() }).await;
    eprintln!("replica-b took over {took:?} after replica-a stopped");
    assert!(took < Duration::from_secs(2), "took over only after {took:?}");
    let second = server.node("kmc-leader", &[]).await;
    eventually("the second node to be tainted", Duration::from_secs(5), || tainted(admin, second.name())).await;
    assert!(actions(&b) >= 1);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_loses_the_lease_stops_at_once_and_catches_up_when_back() {
    if testkit::skip_heavy("leader election") {
        return;
    }
    let server = ApiServer::shared();
    let h = Harness::new(server).await;
    let client = h.controller_client(server, RepairAction::Off).await;
    let ctl = Running::start(client, &h.flags("replica-a", RepairAction::Off)).await;
    eventually("replica-a to lead", Duration::from_secs(5), || async { ctl.is_leader() }).await;
    let leases = Api::<Lease>::namespaced(h.admin.clone(), h.ns.name());

    // Another holder appears (say replica-a was partitioned and its claim lapsed).
    write_lease(&leases, Some("someone-else")).await;
    let took = eventually("replica-a to step down", Duration::from_secs(5), || async { !ctl.is_leader() }).await;
    eprintln!("stepped down {took:?} after the Lease changed hands");
    assert!(took < Duration::from_secs(1), "stepped down only after {took:?}");

    let admin = &h.admin;
    let node = server.node("kmc-leader", &[]).await;
    throughout("the node untouched while another replica holds the Lease", Duration::from_secs(1), || async {
        !tainted(admin, node.name()).await
    })
    .await;
    assert_eq!(actions(&ctl), 0);

    // Released: replica-a leads again and goes over what it skipped.
    write_lease(&leases, None).await;
    eventually("the skipped node to be tainted", Duration::from_secs(5), || tainted(admin, node.name())).await;
    assert_eq!(holder(&leases).await.as_deref(), Some("replica-a"));
    ctl.stop().await;
}
