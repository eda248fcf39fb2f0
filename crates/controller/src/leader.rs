//! Leader election through a `coordination.k8s.io/v1` Lease, the protocol of client-go's
//! leaderelection: only the holder acts; it renews every retry period; when it has not
//! renewed for the renew deadline it stops acting, which is before anyone else may take
//! the Lease (the lease duration, counted on the taker's own clock from the last change
//! it saw, so clock skew between nodes does not matter).
//!
//! Written here rather than taken from a crate: the crates that build with kube 5 write
//! the Lease with server-side apply (a `patch` grant) and do not bound their calls.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::info;

use crate::status::{Part, Status};
use crate::{ControllerArgs, Error, bounded};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Unknown,
    Follower,
    /// Acting is allowed until `until`. `term` counts the times leadership was gained, so
    /// that a regain after a lapse is seen even when nobody looked in between.
    Leader {
        until: Instant,
        term: u64,
    },
}

/// A view of this replica's leadership, cheap to clone and to ask.
#[derive(Clone)]
pub struct Leadership {
    rx: watch::Receiver<State>,
}

impl Leadership {
    /// Whether this replica may act now. Asked right before every write; it turns false
    /// at the renew deadline even if the elector is stuck.
    pub fn is_leader(&self) -> bool {
        matches!(*self.rx.borrow(), State::Leader { until, .. } if Instant::now() < until)
    }

    /// Fires each time leadership is gained, so that the controllers go over everything
    /// they skipped while another replica was in charge.
    pub fn gained(&self) -> impl Stream<Item = ()> + Send + 'static {
        futures::stream::unfold((self.rx.clone(), 0), |(mut rx, mut seen)| async move {
            loop {
                let state = *rx.borrow_and_update();
                if let State::Leader { term, .. } = state
                    && term != seen
                {
                    seen = term;
                    return Some(((), (rx, seen)));
                }
                rx.changed().await.ok()?;
            }
        })
    }
}

#[cfg(test)]
impl Leadership {
    /// Leadership held for an hour: for tests of what a leader does.
    pub(crate) fn held() -> Leadership {
        let (_, rx) = watch::channel(State::Leader { until: Instant::now() + Duration::from_secs(3600), term: 1 });
        Leadership { rx }
    }
}

/// The record of someone else's claim, and when we saw it change.
struct Observed {
    record: (Option<String>, Option<MicroTime>, Option<i32>),
    at: Instant,
}

pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    lease_seconds: i32,
    renew_deadline: Duration,
    retry_period: Duration,
    timeout: Duration,
    status: Arc<Status>,
    tx: watch::Sender<State>,
    observed: Option<Observed>,
    term: u64,
}

impl Elector {
    pub fn new(
        client: kube::Client,
        args: &ControllerArgs,
        identity: String,
        status: Arc<Status>,
    ) -> (Elector, Leadership) {
        let (tx, rx) = watch::channel(State::Unknown);
        let elector = Elector {
            api: Api::namespaced(client, &args.lease_namespace),
            name: args.lease_name.clone(),
            identity,
            lease_seconds: i32::try_from(args.lease_duration.as_secs()).unwrap_or(i32::MAX),
            renew_deadline: args.renew_deadline,
            retry_period: args.retry_period,
            // An attempt is two calls; both fit in the renew deadline, as in client-go.
            timeout: args.api_timeout.min(args.renew_deadline / 2),
            status,
            tx,
            observed: None,
            term: 0,
        };
        (elector, Leadership { rx })
    }

    /// Campaigns and renews until `shutdown`, then gives the Lease up if held, so that
    /// another replica takes over at once instead of after the lease duration.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let started = Instant::now();
            match self.try_acquire_or_renew().await {
                Ok(true) => self.lead(started + self.renew_deadline),
                Ok(false) => self.follow(),
                Err(error) => {
                    self.status.report("leader", &error);
                    if !self.valid_leader() {
                        self.follow();
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.retry_period) => {}
                _ = &mut shutdown => break,
            }
        }
        if self.valid_leader() {
            self.follow();
            if let Err(error) = self.release().await {
                self.status.report("leader", &error);
            }
        }
    }

    fn valid_leader(&self) -> bool {
        matches!(*self.tx.borrow(), State::Leader { until, .. } if Instant::now() < until)
    }

    fn lead(&mut self, until: Instant) {
        if !self.valid_leader() {
            self.term += 1;
            info!(lease = %self.name, identity = %self.identity, "became the leader");
        }
        self.tx.send_replace(State::Leader { until, term: self.term });
        self.status.set_leader(true);
        self.status.synced(Part::Leadership);
    }

    fn follow(&mut self) {
        if self.valid_leader() {
            info!(lease = %self.name, identity = %self.identity, "no longer the leader");
        }
        self.tx.send_replace(State::Follower);
        self.status.set_leader(false);
        self.status.synced(Part::Leadership);
    }

    async fn try_acquire_or_renew(&mut self) -> Result<bool, Error> {
        let described = format!("lease {}/{}", self.api.namespace().unwrap_or_default(), self.name);
        let what = || described.clone();
        let lease = match bounded(self.timeout, what, self.api.get(&self.name)).await {
            Ok(lease) => lease,
            Err(e) if e.is_status(404) => return self.create().await,
            Err(e) => return Err(e),
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let ours = holder.as_deref() == Some(self.identity.as_str());
        if !ours && holder.is_some() && !self.expired(&spec) {
            return Ok(false);
        }
        let now = MicroTime(Timestamp::now());
        let spec = LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.lease_seconds),
            renew_time: Some(now.clone()),
            acquire_time: if ours { spec.acquire_time } else { Some(now) },
            lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + i32::from(!ours)),
            ..spec
        };
        // metadata.resourceVersion comes along: a concurrent writer makes this a 409.
        let lease = Lease { spec: Some(spec), ..lease };
        match bounded(self.timeout, what, self.api.replace(&self.name, &PostParams::default(), &lease)).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_status(409) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn create(&mut self) -> Result<bool, Error> {
        let now = MicroTime(Timestamp::now());
        let lease = Lease {
            metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(self.lease_seconds),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        let what = || format!("create lease {}", self.name);
        match bounded(self.timeout, what, self.api.create(&PostParams::default(), &lease)).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_status(409) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Someone else's claim lapsed: it has not changed for its lease duration, by our clock.
    fn expired(&mut self, spec: &LeaseSpec) -> bool {
        let record = (spec.holder_identity.clone(), spec.renew_time.clone(), spec.lease_duration_seconds);
        let now = Instant::now();
        let observed = match &mut self.observed {
            Some(o) if o.record == record => o,
            _ => self.observed.insert(Observed { record, at: now }),
        };
        let duration = Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0));
        now >= observed.at + duration
    }

    async fn release(&mut self) -> Result<(), Error> {
        let what = || format!("release lease {}", self.name);
        let lease = bounded(self.timeout, what, self.api.get(&self.name)).await?;
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        let spec = LeaseSpec {
            holder_identity: None,
            lease_duration_seconds: Some(1),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..spec
        };
        let lease = Lease { spec: Some(spec), ..lease };
        bounded(self.timeout, what, self.api.replace(&self.name, &PostParams::default(), &lease)).await?;
        info!(lease = %self.name, identity = %self.identity, "released the lease");
        Ok(())
    }
}

/// The elector against a mocked API (tower-test): answers the real API server gives only
/// by chance (a 409 from a concurrent writer) or never (a call that hangs), on cue.
#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::{Method, Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::{Value, json};
    use tower_test::mock::{self, Handle, SendResponse};

    use super::*;

    type Api = Handle<Request<Body>, Response<Body>>;

    fn elector() -> (Elector, Leadership, Arc<Status>, Api) {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        let flags = ["--lease-namespace=kmc", "--lease-duration=15s", "--renew-deadline=10s", "--retry-period=2s"];
        let args = ControllerArgs::from_flags(flags).expect("valid flags");
        let status = Arc::new(Status::new(&[Part::Leadership]));
        let (elector, leadership) = Elector::new(client, &args, "me".into(), status.clone());
        (elector, leadership, status, handle)
    }

    async fn next(api: &mut Api) -> (Method, String, Value, SendResponse<Response<Body>>) {
        let (request, send) = api.next_request().await.expect("the elector makes another call");
        let (parts, body) = request.into_parts();
        let body = body.collect_bytes().await.expect("a request body");
        let body = if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).expect("JSON") };
        (parts.method, parts.uri.path().to_owned(), body, send)
    }

    fn answer(send: SendResponse<Response<Body>>, code: u16, body: Value) {
        let response = Response::builder().status(StatusCode::from_u16(code).expect("a status code"));
        send.send_response(response.body(Body::from(serde_json::to_vec(&body).expect("JSON"))).expect("a response"));
    }

    fn lease(holder: Option<&str>, version: &str) -> Value {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "kong-mesh-cni-controller", "namespace": "kmc", "resourceVersion": version},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15},
        })
    }

    fn status_body(code: u16, reason: &str) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": reason})
    }

    const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/kmc/leases/kong-mesh-cni-controller";

    #[tokio::test(start_paused = true)]
    async fn a_lost_race_is_a_follower_round_and_the_next_read_wins() {
        let (elector, leadership, status, mut api) = elector();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(elector.run(async {
            let _ = stopped.await;
        }));

        let (method, path, _, send) = next(&mut api).await;
        assert_eq!((method, path.as_str()), (Method::GET, LEASE));
        answer(send, 200, lease(None, "1"));
        let (method, _, body, send) = next(&mut api).await;
        assert_eq!(method, Method::PUT);
        assert_eq!(body["metadata"]["resourceVersion"], "1", "the write is conditional on what was read");
        answer(send, 409, status_body(409, "Conflict"));
        // Someone else wrote first: not an error, and not leadership.
        let (method, _, _, send) = next(&mut api).await;
        assert_eq!(method, Method::GET);
        assert!(!leadership.is_leader());
        assert!(!status.render().contains("errors_total{"), "a conflict is no error:\n{}", status.render());

        answer(send, 200, lease(None, "2"));
        let (_, _, body, send) = next(&mut api).await;
        assert_eq!(
            (&body["metadata"]["resourceVersion"], &body["spec"]["holderIdentity"]),
            (&json!("2"), &json!("me"))
        );
        answer(send, 200, lease(Some("me"), "3"));
        // The renewal after the win shows leadership was taken.
        let (method, _, _, send) = next(&mut api).await;
        assert_eq!(method, Method::GET);
        assert!(leadership.is_leader());

        // Stopping gives the Lease up: read it, then write it with no holder.
        let _ = stop.send(());
        answer(send, 200, lease(Some("me"), "3"));
        let (_, _, _, send) = next(&mut api).await;
        answer(send, 200, lease(Some("me"), "4"));
        let (method, _, _, send) = next(&mut api).await;
        assert_eq!(method, Method::GET, "release reads the Lease first");
        answer(send, 200, lease(Some("me"), "4"));
        let (method, _, body, send) = next(&mut api).await;
        assert_eq!((method, &body["spec"]["holderIdentity"]), (Method::PUT, &Value::Null));
        answer(send, 200, lease(None, "5"));
        task.await.expect("the elector ends");
        assert!(!leadership.is_leader());
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_whose_api_hangs_stops_acting_at_the_renew_deadline() {
        let (elector, leadership, status, mut api) = elector();
        let started = Instant::now();
        let _task = tokio::spawn(elector.run(std::future::pending()));

        let (_, _, _, send) = next(&mut api).await;
        answer(send, 404, status_body(404, "NotFound"));
        let (method, _, body, send) = next(&mut api).await;
        assert_eq!((method, &body["spec"]["holderIdentity"]), (Method::POST, &json!("me")));
        answer(send, 201, lease(Some("me"), "1"));

        // From here every call hangs: each is cut off at the call bound (5 s, half the
        // renew deadline), and leadership lapses 10 s after the last successful renewal.
        let (_, _, _, hung) = next(&mut api).await;
        tokio::time::sleep_until(started + Duration::from_secs(8)).await;
        let timeout = "kong_mesh_cni_controller_errors_total{controller=\"leader\",kind=\"timeout\"} 1";
        assert!(status.render().lines().any(|l| l == timeout), "{}", status.render());
        assert!(leadership.is_leader(), "still within the renew deadline");
        let (_, _, _, hung_again) = next(&mut api).await;
        tokio::time::sleep_until(started + Duration::from_secs(11)).await;
        assert!(!leadership.is_leader(), "acting past the renew deadline without a renewal");
        drop((hung, hung_again));
    }
}
