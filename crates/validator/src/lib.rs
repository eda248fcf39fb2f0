//! `kong-mesh-cni validate`: the init container of mesh pods, which proves the pod's
//! traffic is redirected before the application starts. It listens where a redirect
//! must land, connects to an address nothing answers on, and passes only if the
//! connection arrives on its own listener with that address as the original
//! destination and a payload makes the round trip.
//!
//! Which redirect is probed follows the UID it runs as:
//! - as the sidecar's UID (how the injector runs it): the sidecar's own traffic to a
//!   local address that is not 127.0.0.1 (127.0.0.6, ::6) must land on the inbound
//!   port; the sidecar's traffic is otherwise exempt from redirection;
//! - as any other UID: traffic to an unroutable address must land on the outbound
//!   port, as an application's would.
//!
//! The exit code is the contract with the repair controller: `kong-mesh-cni validate`
//! exits with `kuma::pod::VALIDATOR_EXIT_NOT_REDIRECTED` on
//! [`ValidateError::NotRedirected`], 1 for any other trouble.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Where a redirected TCP connection was originally headed: after a nat `REDIRECT` the
/// accepted socket's local address is the listener's, while conntrack keeps the address
/// the client asked for (`SO_ORIGINAL_DST`). For a connection that was not redirected
/// this is its local address.
pub fn original_destination(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let addr = match stream.local_addr()? {
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "original destination is not an IP address"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FamilyChoice {
    /// IPv4, and IPv6 when IPv6 is enabled in the pod (as the plugin decides).
    Auto,
    Ipv4,
    Ipv6,
}

/// What to probe (the `validate` command's flags, in `kong-mesh-cni`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the outbound redirect lands (the sidecar's outbound listener).
    pub outbound_port: u16,
    /// Where the inbound redirect lands (the sidecar's inbound listener).
    pub inbound_port: u16,
    /// The sidecar's UID: running as it selects the sidecar probe.
    pub sidecar_uid: u32,
    /// The address the outbound probe connects to; nothing must answer there.
    pub probe_ipv4: Ipv4Addr,
    pub probe_ipv6: Ipv6Addr,
    /// Give up when no probe succeeded within this time.
    pub timeout: Duration,
    pub family: FamilyChoice,
}

#[derive(Debug, thiserror::Error)]
pub enum ValidateError {
    #[error(
        "{family} traffic is not redirected: {reason} (is the kong-mesh-cni plugin chained on this node? see its logs)"
    )]
    NotRedirected { family: &'static str, reason: String },
    #[error("cannot listen on {addr} for the probe: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
}

/// What one successful probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validated {
    pub family: &'static str,
    pub listener: SocketAddr,
    pub original_destination: SocketAddr,
}

/// How often a failed probe is tried again before the timeout.
const RETRY_EVERY: Duration = Duration::from_millis(200);

struct Probe {
    family: &'static str,
    listen: SocketAddr,
    /// The connection's own source, when it must be fixed (the sidecar probe).
    bind: Option<SocketAddr>,
    target: IpAddr,
}

fn probes(args: &Settings, as_sidecar: bool, families: &[bool]) -> Vec<Probe> {
    families
        .iter()
        .map(|&v6| {
            let family = if v6 { "ipv6" } else { "ipv4" };
            let (loopback, passthrough, any): (IpAddr, IpAddr, IpAddr) = if v6 {
                (Ipv6Addr::LOCALHOST.into(), "::6".parse().expect("literal"), Ipv6Addr::UNSPECIFIED.into())
            } else {
                (Ipv4Addr::LOCALHOST.into(), Ipv4Addr::new(127, 0, 0, 6).into(), Ipv4Addr::UNSPECIFIED.into())
            };
            if as_sidecar {
                Probe {
                    family,
                    listen: SocketAddr::new(loopback, args.inbound_port),
                    bind: Some(SocketAddr::new(loopback, 0)),
                    target: passthrough,
                }
            } else {
                let target = if v6 { IpAddr::from(args.probe_ipv6) } else { IpAddr::from(args.probe_ipv4) };
                Probe { family, listen: SocketAddr::new(any, args.outbound_port), bind: None, target }
            }
        })
        .collect()
}

/// Runs every probe; the first failure ends the validation.
pub fn validate(args: &Settings) -> Result<Vec<Validated>, ValidateError> {
    // SAFETY: getuid has no preconditions.
    let as_sidecar = unsafe { libc::getuid() } == args.sidecar_uid;
    let families: Vec<bool> = match args.family {
        FamilyChoice::Ipv4 => vec![false],
        FamilyChoice::Ipv6 => vec![true],
        FamilyChoice::Auto if netns::ipv6_enabled() => vec![false, true],
        FamilyChoice::Auto => vec![false],
    };
    let deadline = Instant::now() + args.timeout;
    probes(args, as_sidecar, &families).iter().map(|p| run_probe(p, deadline)).collect()
}

fn run_probe(probe: &Probe, deadline: Instant) -> Result<Validated, ValidateError> {
    let listener =
        TcpListener::bind(probe.listen).map_err(|source| ValidateError::Listen { addr: probe.listen, source })?;
    listener.set_nonblocking(true).map_err(|source| ValidateError::Listen { addr: probe.listen, source })?;
    let mut attempt = 0u16;
    loop {
        // A fresh port per attempt: no stale conntrack entry can answer for a retry.
        let target = SocketAddr::new(probe.target, 20000 + (std::process::id() as u16 % 5000) + attempt * 7);
        let reason = match round_trip(&listener, probe, target, deadline) {
            Ok(original) => {
                tracing::info!(family = probe.family, listener = %probe.listen, original = %original, "redirect validated");
                return Ok(Validated { family: probe.family, listener: probe.listen, original_destination: original });
            }
            Err(reason) => reason,
        };
        if Instant::now() + RETRY_EVERY >= deadline {
            return Err(ValidateError::NotRedirected { family: probe.family, reason });
        }
        tracing::debug!(family = probe.family, %reason, "probe failed; retrying");
        std::thread::sleep(RETRY_EVERY);
        attempt = attempt.wrapping_add(1);
    }
}

/// One probe connection: connect, see it arrive on the listener from the expected
/// original destination, echo a payload back. Returns the original destination.
fn round_trip(
    listener: &TcpListener,
    probe: &Probe,
    target: SocketAddr,
    deadline: Instant,
) -> Result<SocketAddr, String> {
    let left = |d: Instant| d.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    let connect_timeout = left(deadline).min(Duration::from_secs(2));
    let client = match probe.bind {
        None => TcpStream::connect_timeout(&target, connect_timeout),
        Some(bind) => connect_from(bind, target, connect_timeout),
    };
    let mut client = client.map_err(|e| format!("connecting to {target} failed: {e}"))?;
    let mut server = loop {
        match listener.accept() {
            Ok((conn, _)) => break conn,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(format!("the connection to {target} did not arrive on {}: {e}", probe.listen)),
        }
    };
    let original = original_destination(&server).map_err(|e| format!("no original destination: {e}"))?;
    if original != target {
        return Err(format!("a connection to {original} arrived instead of ours to {target}"));
    }
    let payload = format!("kong-mesh-cni validate {target}");
    let io = |e: io::Error| format!("the payload did not make the round trip: {e}");
    for s in [&client, &server] {
        s.set_read_timeout(Some(left(deadline))).map_err(io)?;
    }
    server.set_nonblocking(false).map_err(io)?;
    client.write_all(payload.as_bytes()).map_err(io)?;
    let mut got = vec![0; payload.len()];
    server.read_exact(&mut got).map_err(io)?;
    server.write_all(&got).map_err(io)?;
    client.read_exact(&mut got).map_err(io)?;
    if got != payload.as_bytes() {
        return Err("the payload came back changed".into());
    }
    Ok(original)
}

/// A connection from a fixed source address (std cannot bind before connecting).
fn connect_from(bind: SocketAddr, target: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(target), socket2::Type::STREAM, None)?;
    socket.bind(&bind.into())?;
    socket.connect_timeout(&target.into(), timeout)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            outbound_port: 15001,
            inbound_port: 15006,
            sidecar_uid: 5678,
            probe_ipv4: Ipv4Addr::new(10, 255, 255, 254),
            probe_ipv6: "fd00::fe".parse().unwrap(),
            timeout: Duration::from_secs(1),
            family: FamilyChoice::Auto,
        }
    }

    fn plan(as_sidecar: bool, families: &[bool]) -> Vec<(&'static str, String, Option<String>, String)> {
        probes(&settings(), as_sidecar, families)
            .into_iter()
            .map(|p| (p.family, p.listen.to_string(), p.bind.map(|b| b.to_string()), p.target.to_string()))
            .collect()
    }

    #[test]
    fn an_application_probes_the_outbound_redirect_to_the_unroutable_address() {
        let want = |family, listen: &str, target: &str| (family, listen.to_owned(), None, target.to_owned());
        assert_eq!(
            plan(false, &[false, true]),
            [want("ipv4", "0.0.0.0:15001", "10.255.255.254"), want("ipv6", "[::]:15001", "fd00::fe")]
        );
    }

    #[test]
    fn the_sidecar_probes_the_inbound_redirect_of_its_own_local_traffic() {
        let want = |family, listen: &str, bind: &str, target: &str| {
            (family, listen.to_owned(), Some(bind.to_owned()), target.to_owned())
        };
        assert_eq!(
            plan(true, &[false, true]),
            [
                want("ipv4", "127.0.0.1:15006", "127.0.0.1:0", "127.0.0.6"),
                want("ipv6", "[::1]:15006", "[::1]:0", "::6")
            ]
        );
        assert_eq!(plan(true, &[true]).len(), 1);
    }
}
