//! The two netlink requests we need, without a netlink library: a dump of the
//! nf_tables tables (to see which iptables backend a namespace uses) and adding an
//! address to `lo`. Sockets are opened by the calling thread, so they talk to the
//! calling thread's network namespace.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_GETTABLE: u16 = 1;
const NFTA_TABLE_NAME: u16 = 1;
const RTM_NEWADDR: u16 = 20;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_F_NODAD: u8 = 0x02;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

struct Socket(OwnedFd);

impl Socket {
    fn open(protocol: libc::c_int) -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the result is checked before being owned.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
        let sock = Socket(unsafe { OwnedFd::from_raw_fd(fd) });
        // Replies are small; a receive timeout keeps a misbehaving kernel from hanging us.
        let tv = libc::timeval { tv_sec: 2, tv_usec: 0 };
        // SAFETY: tv outlives the call and its size is passed.
        unsafe {
            libc::setsockopt(
                sock.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as u32,
            )
        };
        Ok(sock)
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: zeroed sockaddr_nl addresses the kernel (pid 0).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: msg and addr are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    /// Reads replies until DONE (dumps) or an ACK/error (requests), calling `each` with
    /// (type, payload) of every data message.
    fn receive(&self, mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: buf is valid for writes of its length.
            let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut data = &buf[..n as usize];
            while data.len() >= NLMSG_HDRLEN {
                let len = u32::from_ne_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
                let kind = u16::from_ne_bytes(data[4..6].try_into().expect("2 bytes"));
                if len < NLMSG_HDRLEN || len > data.len() {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated netlink message"));
                }
                let payload = &data[NLMSG_HDRLEN..len];
                match kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let code = payload.get(0..4).map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")));
                        return match code {
                            Some(0) => Ok(()),
                            Some(errno) => Err(io::Error::from_raw_os_error(-errno)),
                            None => Err(io::Error::new(io::ErrorKind::InvalidData, "short netlink error")),
                        };
                    }
                    _ => each(kind, payload),
                }
                data = &data[align4(len).min(data.len())..];
            }
        }
    }
}

fn header(buf: &mut Vec<u8>, kind: u16, flags: u16) {
    buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched by `finish`
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel assigns it
}

fn attribute(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    buf.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(align4(buf.len()), 0);
}

fn finish(mut buf: Vec<u8>) -> Vec<u8> {
    let len = (buf.len() as u32).to_ne_bytes();
    buf[0..4].copy_from_slice(&len);
    buf
}

/// Iterates over (type, value) of netlink attributes.
fn attributes(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let kind = u16::from_ne_bytes([data[2], data[3]]) & 0x3fff;
        if len < 4 || len > data.len() {
            return None;
        }
        let value = &data[4..len];
        data = &data[align4(len).min(data.len())..];
        Some((kind, value))
    })
}

/// The nf_tables tables of the current namespace as (NFPROTO family, name).
pub fn nft_tables() -> io::Result<Vec<(u8, String)>> {
    let sock = Socket::open(NETLINK_NETFILTER)?;
    let mut msg = Vec::with_capacity(32);
    header(&mut msg, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE, (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16);
    msg.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]); // nfgenmsg: every family, v0
    sock.send(&finish(msg))?;
    let mut tables = Vec::new();
    sock.receive(|_, payload| {
        let Some((&family, attrs)) = payload.split_first() else { return };
        let attrs = attrs.get(3..).unwrap_or_default(); // rest of nfgenmsg
        for (kind, value) in attributes(attrs) {
            if kind == NFTA_TABLE_NAME {
                let name = value.split(|b| *b == 0).next().unwrap_or_default();
                tables.push((family, String::from_utf8_lossy(name).into_owned()));
            }
        }
    })?;
    Ok(tables)
}

/// Adds (or keeps) a /128 IPv6 address on the interface, without duplicate detection.
pub fn add_ipv6_host_address(ifindex: u32, addr: std::net::Ipv6Addr) -> io::Result<()> {
    let sock = Socket::open(libc::NETLINK_ROUTE)?;
    let mut msg = Vec::with_capacity(64);
    let flags = libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_REPLACE;
    header(&mut msg, RTM_NEWADDR, flags as u16);
    // ifaddrmsg: family, prefix length, flags, scope, interface index.
    msg.extend_from_slice(&[libc::AF_INET6 as u8, 128, IFA_F_NODAD, 0]);
    msg.extend_from_slice(&ifindex.to_ne_bytes());
    attribute(&mut msg, IFA_LOCAL, &addr.octets());
    attribute(&mut msg, IFA_ADDRESS, &addr.octets());
    sock.send(&finish(msg))?;
    sock.receive(|_, _| {})
}
