//! Netlink requests on the netlink crates: a socket of the calling thread's network
//! namespace (sockets talk to the namespace they were opened in), requests whose every
//! reply is checked against our port id and the request's sequence number, dumps, and
//! the kernel's extended ACK (its message and the offset of the failing attribute).

use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::os::fd::AsRawFd;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkDeserializable, NetlinkHeader,
    NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};
use netlink_packet_netfilter::nftables::{NfTablesMessage, TableAttribute, TableMessage};
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressHeaderFlags, AddressMessage};
use netlink_sys::{Socket, SocketAddr, protocols};

/// NLMSGERR_ATTR_MSG / NLMSGERR_ATTR_OFFS of an extended ACK.
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLMSGERR_ATTR_OFFS: u16 = 2;
const NLMSG_HDRLEN: usize = 16;

/// The kernel refused message `index` of a request.
#[derive(Debug)]
pub struct Refused {
    pub index: usize,
    pub error: io::Error,
    /// The kernel's extended-ACK text, if it gave one.
    pub message: Option<String>,
    /// Offset, within the refused message, of the attribute the kernel blames.
    pub offset: Option<u32>,
}

#[derive(Debug)]
pub enum NlError {
    Io(io::Error),
    Refused(Refused),
}

impl From<io::Error> for NlError {
    fn from(e: io::Error) -> Self {
        NlError::Io(e)
    }
}

pub struct Conn {
    sock: Socket,
    port: u32,
    seq: u32,
}

impl Conn {
    pub fn open(protocol: isize) -> io::Result<Self> {
        let mut sock = Socket::new(protocol)?;
        let port = sock.bind_auto()?.port_number();
        // Errors echo only the header, followed by the kernel's explanation.
        sock.set_cap_ack(true)?;
        sock.set_ext_ack(true)?;
        // Replies are quick; a bound keeps a misbehaving kernel from hanging a pod's ADD.
        let tv = libc::timeval { tv_sec: 2, tv_usec: 0 };
        // SAFETY: tv outlives the call and its size is passed.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Conn { sock, port, seq: 0 })
    }

    fn header(&mut self, flags: u16) -> NetlinkHeader {
        self.seq = self.seq.wrapping_add(1);
        let mut h = NetlinkHeader::default();
        h.flags = flags;
        h.sequence_number = self.seq;
        h
    }

    /// Serialises `msgs` into one datagram (a batch when they are framed as one),
    /// each with its own sequence number; returns those numbers.
    fn send<I: NetlinkSerializable>(&mut self, msgs: Vec<(u16, I)>) -> io::Result<Vec<u32>> {
        let mut buf = Vec::new();
        let mut seqs = Vec::with_capacity(msgs.len());
        for (flags, inner) in msgs {
            let mut msg = NetlinkMessage::new(self.header(flags), NetlinkPayload::InnerMessage(inner));
            msg.finalize();
            let start = buf.len();
            buf.resize(start + msg.buffer_len(), 0);
            msg.serialize(&mut buf[start..]);
            seqs.push(self.seq);
        }
        self.sock.send_to(&buf, &SocketAddr::new(0, 0), 0)?;
        Ok(seqs)
    }

    /// Reads datagrams, handing each reply addressed to us with a sequence number of
    /// `seqs` to `each`, until `each` says it is done.
    fn receive<I: NetlinkDeserializable>(
        &self,
        seqs: &[u32],
        mut each: impl FnMut(usize, NetlinkPayload<I>) -> Result<bool, NlError>,
    ) -> Result<(), NlError> {
        loop {
            let (data, _) = self.sock.recv_from_full()?;
            let mut rest = data.as_slice();
            while rest.len() >= NLMSG_HDRLEN {
                let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
                if len < NLMSG_HDRLEN || len > rest.len() {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated netlink message").into());
                }
                let msg = NetlinkMessage::<I>::deserialize(&rest[..len])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                rest = &rest[len.next_multiple_of(4).min(rest.len())..];
                let (header, payload) = msg.into_parts();
                // Not ours (a stale reply, or another sender): skip it.
                if header.port_number != self.port {
                    continue;
                }
                let Some(index) = seqs.iter().position(|s| *s == header.sequence_number) else { continue };
                if each(index, payload)? {
                    return Ok(());
                }
            }
        }
    }

    /// Sends `msgs` (the ones to be acknowledged carry NLM_F_ACK) and waits for an
    /// answer to each of them; the first refusal is returned.
    pub fn transact<I: NetlinkSerializable + NetlinkDeserializable>(
        &mut self,
        msgs: Vec<(u16, I)>,
    ) -> Result<(), NlError> {
        let acked: Vec<bool> = msgs.iter().map(|(f, _)| f & NLM_F_ACK != 0).collect();
        let mut pending = acked.iter().filter(|a| **a).count();
        let seqs = self.send(msgs)?;
        let mut refused: Option<Refused> = None;
        if pending == 0 {
            return Ok(());
        }
        self.receive::<I>(&seqs, |index, payload| {
            if let NetlinkPayload::Error(e) = payload {
                if let Some(code) = e.code {
                    let (message, offset) = ext_ack(&e.header);
                    let this = Refused { index, error: io::Error::from_raw_os_error(-code.get()), message, offset };
                    // The first failure is the cause; later ones often follow from it.
                    if refused.as_ref().is_none_or(|r| r.index > index) {
                        refused = Some(this);
                    }
                    // A refused message that asked for no ACK (the batch framing) ends it.
                    if !acked[index] {
                        return Ok(true);
                    }
                }
                pending -= 1;
            }
            Ok(pending == 0)
        })?;
        match refused {
            Some(r) => Err(NlError::Refused(r)),
            None => Ok(()),
        }
    }

    /// A dump request: every message the kernel answers with.
    pub fn dump<I: NetlinkSerializable + NetlinkDeserializable>(&mut self, request: I) -> Result<Vec<I>, NlError> {
        let seqs = self.send(vec![(NLM_F_REQUEST | NLM_F_DUMP, request)])?;
        let mut out = Vec::new();
        self.receive::<I>(&seqs, |index, payload| match payload {
            NetlinkPayload::InnerMessage(m) => {
                out.push(m);
                Ok(false)
            }
            NetlinkPayload::Done(_) => Ok(true),
            NetlinkPayload::Error(e) if e.code.is_some() => {
                let (message, offset) = ext_ack(&e.header);
                Err(NlError::Refused(Refused { index, error: e.to_io(), message, offset }))
            }
            _ => Ok(false),
        })?;
        Ok(out)
    }
}

/// The extended-ACK attributes after the echoed header (NETLINK_CAP_ACK is on).
fn ext_ack(echo: &[u8]) -> (Option<String>, Option<u32>) {
    let (mut message, mut offset) = (None, None);
    let mut rest = echo.get(NLMSG_HDRLEN..).unwrap_or_default();
    while rest.len() >= 4 {
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let kind = u16::from_ne_bytes([rest[2], rest[3]]);
        if len < 4 || len > rest.len() {
            break;
        }
        let value = &rest[4..len];
        match kind {
            NLMSGERR_ATTR_MSG => {
                let text = value.split(|b| *b == 0).next().unwrap_or_default();
                message = Some(String::from_utf8_lossy(text).into_owned());
            }
            NLMSGERR_ATTR_OFFS if value.len() == 4 => {
                offset = Some(u32::from_ne_bytes(value.try_into().expect("4 bytes")));
            }
            _ => {}
        }
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    (message, offset)
}

impl std::fmt::Display for NlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NlError::Io(e) => write!(f, "{e}"),
            NlError::Refused(r) => {
                write!(f, "{}", r.error)?;
                if let Some(m) = &r.message {
                    write!(f, " ({m})")?;
                }
                if let Some(o) = r.offset {
                    write!(f, " at byte {o} of the message")?;
                }
                Ok(())
            }
        }
    }
}

impl From<NlError> for io::Error {
    fn from(e: NlError) -> Self {
        match e {
            NlError::Io(e) => e,
            NlError::Refused(r) => io::Error::new(r.error.kind(), NlError::Refused(r).to_string()),
        }
    }
}

pub fn netfilter_message(family: u8, inner: impl Into<NetfilterMessageInner>) -> NetfilterMessage {
    NetfilterMessage::new(NetfilterHeader::new(NetfilterProtoFamily::from(family), 0, 0), inner)
}

/// The nf_tables tables of the current namespace as (NFPROTO family, name).
pub fn nft_tables() -> io::Result<Vec<(u8, String)>> {
    let mut conn = Conn::open(protocols::NETLINK_NETFILTER)?;
    let request = netfilter_message(0, NfTablesMessage::GetTable(TableMessage { attributes: vec![] }));
    let mut tables = Vec::new();
    for msg in conn.dump(request)? {
        let family = u8::from(msg.header.family);
        if let NetfilterMessageInner::NfTables(NfTablesMessage::NewTable(t)) = msg.inner {
            for attr in t.attributes {
                if let TableAttribute::Name(name) = attr {
                    tables.push((family, name));
                }
            }
        }
    }
    Ok(tables)
}

/// Adds (or keeps) a /128 IPv6 address on the interface, without duplicate detection.
pub fn add_ipv6_host_address(ifindex: u32, addr: Ipv6Addr) -> io::Result<()> {
    let mut conn = Conn::open(protocols::NETLINK_ROUTE)?;
    let mut msg = AddressMessage::default();
    msg.header.family = netlink_packet_route::AddressFamily::Inet6;
    msg.header.prefix_len = 128;
    msg.header.flags = AddressHeaderFlags::Nodad;
    msg.header.index = ifindex;
    msg.attributes = vec![AddressAttribute::Local(IpAddr::V6(addr)), AddressAttribute::Address(IpAddr::V6(addr))];
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
    conn.transact(vec![(flags, RouteNetlinkMessage::NewAddress(msg))]).map_err(io::Error::from)
}
