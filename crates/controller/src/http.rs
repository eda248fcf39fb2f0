//! `/metrics`, `/healthz` and `/readyz` over HTTP/1.1.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::Error;
use crate::status::Status;

/// A scrape or probe that has not finished in this time is dropped: a stuck client
/// must not hold a task forever.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);

/// Binds `port` on all addresses (IPv6 and IPv4 where the kernel maps them).
pub async fn bind(port: u16) -> Result<TcpListener, Error> {
    let listen = |source| Error::Listen { port, source };
    match TcpListener::bind(SocketAddr::from(([0u16; 8], port))).await {
        Ok(l) => Ok(l),
        // A node or pod without IPv6.
        Err(_) => TcpListener::bind(SocketAddr::from(([0u8; 4], port))).await.map_err(listen),
    }
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, status: Arc<Status>) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving /metrics, /healthz, /readyz");
    }
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(error) => {
                // Out of file descriptors and the like: pause rather than spin.
                debug!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let status = status.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let status = status.clone();
                async move { Ok::<_, Infallible>(respond(&req, &status)) }
            });
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_DEADLINE, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => debug!(%peer, %error, "connection failed"),
                Err(_) => debug!(%peer, "connection dropped after {CONNECTION_DEADLINE:?}"),
            }
        });
    }
}

fn respond(req: &Request<Incoming>, status: &Status) -> Response<Full<Bytes>> {
    let (code, content_type, body) = match req.uri().path() {
        "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", status.render()),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if status.is_ready() => (StatusCode::OK, "text/plain", "ready\n".into()),
        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("waiting for {:?}\n", status.pending())),
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    };
    Response::builder()
        .status(code)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}
