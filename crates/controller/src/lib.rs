//! `kong-mesh-cni controller`: the control-plane side of the Kong Mesh CNI.
//!
//! - taint: a node carries `NodeReadiness:NoSchedule` until a CNI pod on it is Ready;
//! - NAD: namespaces labelled `kuma.io/sidecar-injection` get our
//!   NetworkAttachmentDefinition while its CRD exists (Multus, OpenShift);
//! - repair: mesh pods whose validator found no redirect are deleted or labelled.
//!
//! Only the replica holding the Lease acts; every replica keeps its caches warm so that
//! a new leader acts at once. Each part is a pure decision (`taint`, `nad`, `repair`)
//! and an edge that watches and writes (`*_controller`). Every API call is bounded in
//! time; every error is logged and counted in one place ([`Status::report`]).

#![forbid(unsafe_code)]

mod args;
mod error;
mod leader;
mod nad;
mod nad_controller;
mod repair;
mod repair_controller;
mod status;
mod taint;
mod taint_controller;

use std::future::Future;
use std::sync::Arc;

pub use args::{ControllerArgs, RepairAction};
pub use error::{Error, bounded};
pub use nad::{MANAGED_BY, MANAGED_BY_LABEL, SIDECAR_INJECTION_LABEL, resource as nad_resource};
pub use repair::{EVENT_REASON, REDIRECT_MISSING_LABEL};
pub use status::{Part, Status};
pub use taint::{TAINT_EFFECT, TAINT_KEY};

use kube::Client;
use tracing::{debug, error, info};

/// The `controller` subcommand: runs until SIGTERM or SIGINT.
pub fn run(args: ControllerArgs) -> Result<(), Error> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(Error::Runtime)?;
    runtime.block_on(async {
        // Before the client: a bad flag is the first thing to report.
        args.validate()?;
        let client = Client::try_default().await.map_err(Error::ClientConfig)?;
        let status = Arc::new(Status::new(&parts(&args)));
        serve(client, args, status, ops::shutdown_signal()).await
    })
}

/// The parts readiness waits for, given what is enabled.
pub fn parts(args: &ControllerArgs) -> Vec<Part> {
    let mut parts = vec![Part::Leadership, Part::Nad];
    if args.taint_enabled {
        parts.push(Part::Taint);
    }
    if args.repair_action != RepairAction::Off {
        parts.push(Part::Repair);
    }
    parts
}

/// Runs the controllers with `client` until `shutdown`, then stops acting and gives the
/// Lease up. `status` is created by the caller (see [`parts`]) so that tests in the same
/// process can read each instance's metrics and readiness.
pub async fn serve(
    client: Client,
    args: ControllerArgs,
    status: Arc<Status>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    args.validate()?;
    let listener = match args.metrics_port {
        0 => None,
        port => Some(ops::bind(None, port).await?),
    };
    let identity = args.identity();
    info!(
        identity = %identity,
        lease = %format!("{}/{}", args.lease_namespace, args.lease_name),
        taint = args.taint_enabled,
        cni = %format!("{}/app={}", args.cni_namespace, args.cni_app),
        nad = %args.nad_name,
        repair = args.repair_action.as_str(),
        "controller starting"
    );
    let (elector, leadership) = leader::Elector::new(client.clone(), &args, identity.clone(), status.clone());
    let controllers = async {
        let taint = async {
            if args.taint_enabled {
                taint_controller::run(client.clone(), &args, leadership.clone(), status.clone()).await;
            }
        };
        let nad = nad_controller::run(client.clone(), args.clone(), leadership.clone(), status.clone());
        let repair = repair_controller::run(client.clone(), &args, identity, leadership.clone(), status.clone());
        let http = async {
            if let Some(listener) = listener {
                ops::serve(listener, status.clone(), ops::ServeOptions::default()).await;
            }
        };
        futures::join!(taint, nad, repair, http);
        // Each of them runs until dropped or is disabled: only shutdown ends `serve`,
        // through the elector, which releases the Lease first.
        std::future::pending::<()>().await
    };
    // The elector returns on shutdown, after it stopped acting and released the Lease;
    // the controllers are dropped with this select.
    tokio::select! {
        () = elector.run(shutdown) => {}
        () = controllers => {}
    }
    info!("controller stopped");
    Ok(())
}

/// Drives a controller's run stream to its end. Besides successes it yields failures:
/// reconcile failures were reported by the error policy already; watch failures are
/// reported here.
async fn drain_runs<T>(
    runs: impl futures::Stream<Item = Result<T, kube::runtime::controller::Error<Error, kube::runtime::watcher::Error>>>,
    status: &Status,
    controller: &'static str,
) {
    use futures::StreamExt;
    use kube::runtime::controller::Error as E;
    let mut runs = std::pin::pin!(runs);
    while let Some(result) = runs.next().await {
        match result {
            Ok(_) | Err(E::ReconcilerFailed(..)) => {}
            Err(E::QueueError(e)) => status.report(controller, &Error::Watch(e)),
            Err(E::ObjectNotFound(obj)) => debug!(controller, object = %obj, "gone before its turn"),
            Err(E::RunnerError(e)) => error!(controller, error = %e, "scheduler failed"),
        }
    }
}
