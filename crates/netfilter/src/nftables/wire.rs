//! Our nf_tables tables as netlink messages, on netlink-packet-netfilter's types. That
//! crate types tables, chains, sets, set elements, rules and the expressions payload/
//! cmp/meta/bitwise/immediate/lookup; the expressions it lacks (ct, redir, log, range,
//! byteorder) are encoded here as plain attributes. Also the canonical form of a rule's
//! expressions (a set looked up by its content), by which a dumped rule is compared
//! with the one we would add.

use netlink_packet_core::{DefaultNla, Emitable, NLA_F_NESTED, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST};
use netlink_packet_netfilter::nftables::{
    Bitwise, ChainAttribute, ChainMessage, Cmp, DataAttribute, ExpressionAttribute, Expressions, Hook, HookNumber,
    Immediate, InetHookNumber, ListAttribute, Lookup, Meta, MetaKey, NfTablesMessage, Operator, Payload, Register,
    RuleAttribute, RuleMessage, SetAttribute, SetDescription, SetElementAttribute, SetElementFlags, SetElementList,
    SetElementMessage, SetFlags, SetMessage, TableAttribute, TableMessage, Verdict, VerdictAttribute,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};

use ipnet::IpNet;
use kuma::{Protocol, Range16};
use rules::Family;
use rules::nft::{Action, Cond, NftRule, NftTable, TABLE, family_name};

use crate::netlink::netfilter_message;

const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// NF_DROP: a verdict code that the crate has no name for.
const NF_DROP: u32 = 0;
const IFNAMSIZ: usize = 16;
/// libnftnl's userdata type for a rule comment, which `nft` shows.
const UDATA_RULE_COMMENT: u8 = 0;

// Attributes of the expressions encoded here (include/uapi/linux/netfilter/nf_tables.h).
const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFTA_CT_SREG: u16 = 4;
const NFT_CT_STATE: u32 = 0;
const NFT_CT_ZONE: u32 = 17;
const NF_CT_STATE_INVALID_BIT: u32 = 1;
const NFTA_REDIR_REG_PROTO_MIN: u16 = 1;
const NFTA_LOG_PREFIX: u16 = 2;
const NFTA_LOG_LEVEL: u16 = 5;
const NFTA_RANGE_SREG: u16 = 1;
const NFTA_RANGE_OP: u16 = 2;
const NFTA_RANGE_FROM_DATA: u16 = 3;
const NFTA_RANGE_TO_DATA: u16 = 4;
const NFT_RANGE_EQ: u32 = 0;
const NFT_RANGE_NEQ: u32 = 1;
const NFTA_BYTEORDER_SREG: u16 = 1;
const NFTA_BYTEORDER_DREG: u16 = 2;
const NFTA_BYTEORDER_OP: u16 = 3;
const NFTA_BYTEORDER_LEN: u16 = 4;
const NFTA_BYTEORDER_SIZE: u16 = 5;
const NFT_BYTEORDER_HTON: u32 = 1;
const NFT_REG_1: u32 = 1;
pub(super) const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
pub(super) const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFTA_LOOKUP_SET: u16 = 1;
const NFTA_LOOKUP_SET_ID: u16 = 4;
const NFTA_LOOKUP_FLAGS: u16 = 5;
/// nft's datatype number of `inet_service` (ports); the kernel keeps it for listings.
const TYPE_INET_SERVICE: u32 = 13;
/// The kernel names an anonymous set, replacing `%d` with a number free in the table.
pub const ANONYMOUS_SET: &str = "__set%d";

pub fn nfproto(family: Family) -> u8 {
    match family {
        Family::V4 => NFPROTO_IPV4,
        Family::V6 => NFPROTO_IPV6,
    }
}

pub(super) fn msg(family: Family, inner: NfTablesMessage) -> NetfilterMessage {
    netfilter_message(nfproto(family), inner)
}

/// The batch framing: its header names the nf_tables subsystem.
pub(super) fn control(inner: ControlMessage) -> NetfilterMessage {
    NetfilterMessage::new(NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES), inner)
}

/// The messages of one batch, and what each does (for an error naming the refused one).
pub struct Batch {
    pub messages: Vec<(u16, NetfilterMessage)>,
    pub what: Vec<String>,
}

impl Batch {
    pub(super) fn push(&mut self, flags: u16, m: NetfilterMessage, what: String) {
        self.messages.push((flags, m));
        self.what.push(what);
    }
}

/// What one batch does: delete our tables of `delete`, then create `create`.
pub fn batch(delete: &[Family], create: &[NftTable]) -> Batch {
    let ack = NLM_F_REQUEST | NLM_F_ACK;
    let mut out = Batch { messages: Vec::new(), what: Vec::new() };
    out.push(NLM_F_REQUEST, control(ControlMessage::BatchBegin), "batch begin".into());
    for family in delete {
        let what = format!("delete table {} {TABLE}", family_name(*family));
        out.push(ack, msg(*family, NfTablesMessage::DeleteTable(table_message())), what);
    }
    // Set ids name the anonymous sets within the batch (the kernel names them on commit).
    let mut set_id = 0;
    for table in create {
        let (f, fam) = (table.family, table.family_name());
        let create = ack | NLM_F_CREATE;
        out.push(create, msg(f, NfTablesMessage::NewTable(table_message())), format!("add table {fam} {TABLE}"));
        for chain in &table.chains {
            let what = format!("add chain {fam} {TABLE} {}", chain.name);
            out.push(create, msg(f, NfTablesMessage::NewChain(chain_message(chain))), what);
        }
        for chain in &table.chains {
            for rule in &chain.rules {
                let first_id = set_id + 1;
                for ports in rule_sets(rule) {
                    set_id += 1;
                    let shown = format!("{TABLE} {{ {} }}", set_text(ports));
                    out.push(
                        create,
                        msg(f, NfTablesMessage::NewSet(set_message(set_id, ports))),
                        format!("add set {fam} {shown}"),
                    );
                    let what = format!("add elements to set {fam} {shown}");
                    out.push(create, msg(f, NfTablesMessage::NewSetElement(elements_message(set_id, ports))), what);
                }
                let attributes = rule_attributes(f, &chain.name, rule, first_id);
                let what = format!("add rule {fam} {TABLE} {} {rule}", chain.name);
                out.push(create | NLM_F_APPEND, msg(f, NfTablesMessage::NewRule(RuleMessage { attributes })), what);
            }
        }
    }
    out.push(NLM_F_REQUEST, control(ControlMessage::BatchEnd), "batch end".into());
    out
}

fn table_message() -> TableMessage {
    TableMessage { attributes: vec![TableAttribute::Name(TABLE.into())] }
}

fn chain_message(chain: &rules::nft::Chain) -> ChainMessage {
    let mut attributes = vec![ChainAttribute::Table(TABLE.into()), ChainAttribute::Name(chain.name.clone())];
    if let Some(h) = chain.hook {
        let hook = match h.hook {
            0 => InetHookNumber::PreRouting,
            _ => InetHookNumber::LocalOut,
        };
        attributes
            .push(ChainAttribute::Hook(vec![Hook::Number(HookNumber::Inet(hook)), Hook::Priority(h.priority as u32)]));
        attributes.push(ChainAttribute::Type(if h.nat { "nat" } else { "filter" }.into()));
    }
    ChainMessage { attributes }
}

/// The port sets a rule looks up, in the order of its conditions.
pub fn rule_sets(rule: &NftRule) -> impl Iterator<Item = &[Range16]> {
    rule.conds.iter().filter_map(|c| match c {
        Cond::DportIn { ports, .. } => Some(ports.as_slice()),
        _ => None,
    })
}

fn set_text(ports: &[Range16]) -> String {
    ports.iter().map(|r| rules::rule::format_range(*r, '-')).collect::<Vec<_>>().join(", ")
}

fn is_interval(ports: &[Range16]) -> bool {
    ports.iter().any(|r| r.first != r.last)
}

fn set_flags(ports: &[Range16]) -> SetFlags {
    let flags = SetFlags::Anonymous | SetFlags::Constant;
    if is_interval(ports) { flags | SetFlags::Interval } else { flags }
}

/// The keys of a port set as the kernel stores them, with the interval-end flag. A set
/// of single ports holds the ports. An interval set holds, as nft writes it: an end at 0
/// when the first range starts above it, then each range's first port and the port
/// past its last as an end (none after 65535: the range runs to the end of the keys).
/// `ports` is sorted and merged (`rules::nft::port_set`), so no end meets a start.
pub fn set_elements(ports: &[Range16]) -> Vec<(u16, bool)> {
    if !is_interval(ports) {
        return ports.iter().map(|r| (r.first, false)).collect();
    }
    let mut out = Vec::with_capacity(ports.len() * 2 + 1);
    if ports.first().is_some_and(|r| r.first > 0) {
        out.push((0, true));
    }
    for r in ports {
        out.push((r.first, false));
        if let Some(end) = r.last.checked_add(1) {
            out.push((end, true));
        }
    }
    out
}

fn set_message(id: u32, ports: &[Range16]) -> SetMessage {
    let size = set_elements(ports).len() as u32;
    SetMessage {
        attributes: vec![
            SetAttribute::Table(TABLE.into()),
            SetAttribute::Name(ANONYMOUS_SET.into()),
            SetAttribute::Flags(set_flags(ports)),
            SetAttribute::KeyType(TYPE_INET_SERVICE),
            SetAttribute::KeyLen(2),
            SetAttribute::Id(id),
            SetAttribute::Description(vec![SetDescription::Size(size)]),
        ],
    }
}

fn elements_message(id: u32, ports: &[Range16]) -> SetElementMessage {
    let elements = set_elements(ports)
        .into_iter()
        .map(|(key, end)| {
            let mut e = vec![SetElementAttribute::Key(DataAttribute::Value(key.to_be_bytes().to_vec()))];
            if end {
                e.push(SetElementAttribute::Flags(SetElementFlags::IntervalEnd));
            }
            ListAttribute::Element(e)
        })
        .collect();
    SetElementMessage {
        attributes: vec![
            SetElementList::Table(TABLE.into()),
            SetElementList::Set(ANONYMOUS_SET.into()),
            SetElementList::SetId(id),
            SetElementList::Elements(elements),
        ],
    }
}

/// The canonical text of a set: its flags, key length and keys (sorted: the kernel
/// dumps them in an order of its own).
pub fn set_canonical(flags: u32, key_len: u32, mut keys: Vec<(Vec<u8>, bool)>) -> String {
    keys.sort();
    let keys: Vec<String> = keys
        .iter()
        .map(|(k, end)| {
            format!("{}{}", k.iter().map(|b| format!("{b:02x}")).collect::<String>(), if *end { "e" } else { "" })
        })
        .collect();
    format!("set(flags={flags:x};keylen={key_len};{})", keys.join(","))
}

/// The canonical text of a port set we would add.
pub fn ports_canonical(ports: &[Range16]) -> String {
    let keys = set_elements(ports).into_iter().map(|(k, end)| (k.to_be_bytes().to_vec(), end)).collect();
    set_canonical(set_flags(ports).bits(), 2, keys)
}

/// A dumped set as (name, flags, key length).
pub fn set_of(m: SetMessage) -> Option<(String, u32, u32)> {
    let (mut name, mut flags, mut key_len) = (None, 0, 0);
    for a in m.attributes {
        match a {
            SetAttribute::Name(n) => name = Some(n),
            SetAttribute::Flags(f) => flags = f.bits(),
            SetAttribute::KeyLen(l) => key_len = l,
            _ => {}
        }
    }
    Some((name?, flags, key_len))
}

/// The keys of a dump of set elements, with their interval-end flag.
pub fn keys_of(m: SetElementMessage) -> Vec<(Vec<u8>, bool)> {
    let mut out = Vec::new();
    for a in m.attributes {
        let SetElementList::Elements(list) = a else { continue };
        for e in list {
            let ListAttribute::Element(attrs) = e else { continue };
            let (mut key, mut end) = (None, false);
            for a in attrs {
                match a {
                    SetElementAttribute::Key(DataAttribute::Value(k)) => key = Some(k),
                    SetElementAttribute::Flags(f) => end = f.contains(SetElementFlags::IntervalEnd),
                    _ => {}
                }
            }
            out.extend(key.map(|k| (k, end)));
        }
    }
    out
}

/// A request for the sets of our table, or (with a name) for one set's elements.
pub fn get_sets(family: Family) -> NetfilterMessage {
    msg(family, NfTablesMessage::GetSet(SetMessage { attributes: vec![SetAttribute::Table(TABLE.into())] }))
}

pub fn get_elements(family: Family, set: &str) -> NetfilterMessage {
    let attributes = vec![SetElementList::Table(TABLE.into()), SetElementList::Set(set.into())];
    msg(family, NfTablesMessage::GetSetElement(SetElementMessage { attributes }))
}

/// A rule's attributes; its sets (if any) are those of batch ids `first_set_id` on.
pub fn rule_attributes(family: Family, chain: &str, rule: &NftRule, first_set_id: u32) -> Vec<RuleAttribute> {
    let mut attrs = vec![
        RuleAttribute::Table(TABLE.into()),
        RuleAttribute::Chain(chain.into()),
        RuleAttribute::Expressions(expressions(family, rule, first_set_id)),
    ];
    if let Some(comment) = &rule.comment {
        attrs.push(RuleAttribute::UserData(comment_userdata(comment)));
    }
    attrs
}

/// A comment as libnftnl stores it: type, length, the text with its NUL. `nft` caps
/// comments at 128 bytes; ours are far shorter.
pub fn comment_userdata(comment: &str) -> Vec<u8> {
    let text = &comment.as_bytes()[..comment.len().min(254)];
    let mut out = vec![UDATA_RULE_COMMENT, (text.len() + 1) as u8];
    out.extend_from_slice(text);
    out.push(0);
    out
}

/// The comment in a rule's userdata, if any.
pub fn userdata_comment(data: &[u8]) -> Option<String> {
    let mut rest = data;
    while rest.len() >= 2 {
        let (kind, len) = (rest[0], rest[1] as usize);
        let value = rest.get(2..2 + len)?;
        if kind == UDATA_RULE_COMMENT {
            let text = value.split(|b| *b == 0).next().unwrap_or_default();
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        rest = &rest[2 + len..];
    }
    None
}

pub(super) fn u32_be(kind: u16, v: u32) -> DefaultNla {
    DefaultNla::new(kind, v.to_be_bytes().to_vec())
}

/// NFTA_DATA_VALUE nested in `kind`.
fn data_nla(kind: u16, value: &[u8]) -> DefaultNla {
    let inner = DataAttribute::Value(value.to_vec());
    let mut buf = vec![0; inner.buffer_len()];
    inner.emit(&mut buf);
    DefaultNla::new(kind | NLA_F_NESTED, buf)
}

pub(super) fn other(name: &str, attributes: Vec<DefaultNla>) -> ListAttribute<ExpressionAttribute> {
    Expressions::Other { expression_type: name.into(), attributes }.into()
}

pub(super) fn load_meta(key: MetaKey) -> ListAttribute<ExpressionAttribute> {
    Expressions::Meta(vec![Meta::Key(key), Meta::DestinationRegister(Register::Reg1)]).into()
}

pub(super) fn load_payload(base: u32, offset: u32, len: u32) -> ListAttribute<ExpressionAttribute> {
    Expressions::Payload(vec![
        Payload::DestinationRegister(Register::Reg1),
        Payload::Base(base),
        Payload::Offset(offset),
        Payload::Len(len),
    ])
    .into()
}

pub(super) fn cmp(negated: bool, data: Vec<u8>) -> ListAttribute<ExpressionAttribute> {
    let op = if negated { Operator::NotEqual } else { Operator::Equal };
    Expressions::Cmp(vec![Cmp::SourceRegister(Register::Reg1), Cmp::Op(op), Cmp::Data(DataAttribute::Value(data))])
        .into()
}

fn range(negated: bool, from: &[u8], to: &[u8]) -> ListAttribute<ExpressionAttribute> {
    other(
        "range",
        vec![
            u32_be(NFTA_RANGE_SREG, NFT_REG_1),
            u32_be(NFTA_RANGE_OP, if negated { NFT_RANGE_NEQ } else { NFT_RANGE_EQ }),
            data_nla(NFTA_RANGE_FROM_DATA, from),
            data_nla(NFTA_RANGE_TO_DATA, to),
        ],
    )
}

pub(super) fn bitwise(len: u32, mask: Vec<u8>) -> ListAttribute<ExpressionAttribute> {
    let xor = vec![0; mask.len()];
    Expressions::Bitwise(vec![
        Bitwise::SourceRegister(Register::Reg1),
        Bitwise::DestinationRegister(Register::Reg1),
        Bitwise::Length(len),
        Bitwise::Mask(DataAttribute::Value(mask)),
        Bitwise::Xor(DataAttribute::Value(xor)),
    ])
    .into()
}

fn immediate(data: DataAttribute, register: Register) -> ListAttribute<ExpressionAttribute> {
    Expressions::Immediate(vec![Immediate::DestinationRegister(register), Immediate::Data(data)]).into()
}

pub(super) fn verdict(code: Verdict, chain: Option<&str>) -> ListAttribute<ExpressionAttribute> {
    let mut v = vec![VerdictAttribute::Code(code)];
    if let Some(c) = chain {
        v.push(VerdictAttribute::Chain(c.into()));
    }
    immediate(DataAttribute::Verdict(v), Register::Verdict)
}

pub(super) fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => libc::IPPROTO_TCP as u8,
        Protocol::Udp => libc::IPPROTO_UDP as u8,
    }
}

fn net_bytes(net: &IpNet) -> (Vec<u8>, Vec<u8>) {
    match net {
        IpNet::V4(n) => (n.network().octets().to_vec(), n.netmask().octets().to_vec()),
        IpNet::V6(n) => (n.network().octets().to_vec(), n.netmask().octets().to_vec()),
    }
}

/// `ip saddr` / `ip6 daddr` and so on: load, mask unless a host prefix, compare.
fn address(out: &mut Vec<ListAttribute<ExpressionAttribute>>, family: Family, source: bool, net: &IpNet, neg: bool) {
    let (offset, len) = match (family, source) {
        (Family::V4, true) => (12, 4),
        (Family::V4, false) => (16, 4),
        (Family::V6, true) => (8, 16),
        (Family::V6, false) => (24, 16),
    };
    out.push(load_payload(NFT_PAYLOAD_NETWORK_HEADER, offset, len));
    let (addr, mask) = net_bytes(net);
    if net.prefix_len() != net.max_prefix_len() {
        out.push(bitwise(len, mask));
    }
    out.push(cmp(neg, addr));
}

fn ifname(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.resize(IFNAMSIZ, 0);
    v
}

/// The expressions of a rule, in the order of its conditions, then the action. Every
/// value goes through register 1; the verdict register is written last. The sets the
/// rule looks up are those of batch ids `first_set_id` on, in condition order.
pub fn expressions(family: Family, rule: &NftRule, first_set_id: u32) -> Vec<ListAttribute<ExpressionAttribute>> {
    let mut out = Vec::new();
    let mut set_id = first_set_id;
    for c in &rule.conds {
        match c {
            Cond::L4proto(p) => {
                out.push(load_meta(MetaKey::L4Proto));
                out.push(cmp(false, vec![proto_number(*p)]));
            }
            Cond::Saddr(net) => address(&mut out, family, true, net, false),
            Cond::Daddr { net, negated } => address(&mut out, family, false, net, *negated),
            Cond::Iifname(n) => {
                out.push(load_meta(MetaKey::Iifname));
                out.push(cmp(false, ifname(n)));
            }
            Cond::Oifname(n) => {
                out.push(load_meta(MetaKey::Oifname));
                out.push(cmp(false, ifname(n)));
            }
            Cond::Sport(_, port) => {
                out.push(load_payload(NFT_PAYLOAD_TRANSPORT_HEADER, 0, 2));
                out.push(cmp(false, port.to_be_bytes().to_vec()));
            }
            Cond::Dport { ports, negated, .. } => {
                out.push(load_payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2));
                if ports.first == ports.last {
                    out.push(cmp(*negated, ports.first.to_be_bytes().to_vec()));
                } else {
                    out.push(range(*negated, &ports.first.to_be_bytes(), &ports.last.to_be_bytes()));
                }
            }
            Cond::DportIn { .. } => {
                out.push(load_payload(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2));
                out.push(
                    Expressions::Lookup(vec![
                        Lookup::SourceRegister(Register::Reg1),
                        Lookup::Set(ANONYMOUS_SET.into()),
                        Lookup::SetId(set_id),
                    ])
                    .into(),
                );
                set_id += 1;
            }
            Cond::SkUid { uids, negated } => {
                out.push(load_meta(MetaKey::SocketUserId));
                if uids.first == uids.last {
                    out.push(cmp(*negated, uids.first.to_ne_bytes().to_vec()));
                } else {
                    // range compares bytes in order: the UID (host order) goes big-endian first.
                    out.push(other(
                        "byteorder",
                        vec![
                            u32_be(NFTA_BYTEORDER_SREG, NFT_REG_1),
                            u32_be(NFTA_BYTEORDER_DREG, NFT_REG_1),
                            u32_be(NFTA_BYTEORDER_OP, NFT_BYTEORDER_HTON),
                            u32_be(NFTA_BYTEORDER_LEN, 4),
                            u32_be(NFTA_BYTEORDER_SIZE, 4),
                        ],
                    ));
                    out.push(range(*negated, &uids.first.to_be_bytes(), &uids.last.to_be_bytes()));
                }
            }
            Cond::CtStateInvalid => {
                out.push(other("ct", vec![u32_be(NFTA_CT_KEY, NFT_CT_STATE), u32_be(NFTA_CT_DREG, NFT_REG_1)]));
                out.push(bitwise(4, NF_CT_STATE_INVALID_BIT.to_ne_bytes().to_vec()));
                out.push(cmp(true, 0u32.to_ne_bytes().to_vec()));
            }
        }
    }
    match &rule.action {
        Action::Return => out.push(verdict(Verdict::Return, None)),
        Action::Drop => out.push(verdict(Verdict::Other(NF_DROP), None)),
        Action::Jump(chain) => out.push(verdict(Verdict::Jump, Some(chain))),
        Action::Redirect(port) => {
            out.push(immediate(DataAttribute::Value(port.to_be_bytes().to_vec()), Register::Reg1));
            out.push(other("redir", vec![u32_be(NFTA_REDIR_REG_PROTO_MIN, NFT_REG_1)]));
        }
        Action::CtZone(zone) => {
            // The zone is a host-order u16, as the ct expression loads it.
            out.push(immediate(DataAttribute::Value(zone.to_ne_bytes().to_vec()), Register::Reg1));
            out.push(other("ct", vec![u32_be(NFTA_CT_KEY, NFT_CT_ZONE), u32_be(NFTA_CT_SREG, NFT_REG_1)]));
        }
        Action::Log { prefix, level } => {
            let mut text = prefix.as_bytes().to_vec();
            text.push(0);
            out.push(other(
                "log",
                vec![DefaultNla::new(NFTA_LOG_PREFIX, text), u32_be(NFTA_LOG_LEVEL, u32::from(*level))],
            ));
        }
    }
    out
}

/// Iterates over (kind without flags, nested?, value) of netlink attributes.
fn attrs(mut data: &[u8]) -> impl Iterator<Item = (u16, bool, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let kind = u16::from_ne_bytes([data[2], data[3]]);
        if len < 4 || len > data.len() {
            return None;
        }
        let value = &data[4..len];
        data = &data[len.next_multiple_of(4).min(data.len())..];
        Some((kind & 0x3fff, kind & NLA_F_NESTED != 0, value))
    })
}

/// Attributes of an expression that both we and the kernel's dump always carry (the
/// kernel adds defaults of its own, such as bitwise's operation or redir's flags).
fn compared(name: &str, kind: u16) -> bool {
    match name {
        "bitwise" => kind <= 5,
        "ct" => kind != 3,
        "redir" => kind == NFTA_REDIR_REG_PROTO_MIN,
        "log" => kind == NFTA_LOG_PREFIX || kind == NFTA_LOG_LEVEL,
        _ => true,
    }
}

/// Finds the canonical text of the set a lookup names: by name (a dumped rule) or by
/// batch id (a rule we would add).
pub type SetResolver<'a> = &'a dyn Fn(&str, Option<u32>) -> Option<String>;

/// The canonical text of an expression list (the value of NFTA_RULE_EXPRESSIONS), and
/// the names of its expressions. A lookup stands for the content of its set.
pub fn canonical(list: &[u8], sets: SetResolver<'_>) -> (String, Vec<String>) {
    let mut out = String::new();
    let mut names = Vec::new();
    for (_, _, elem) in attrs(list) {
        let mut name = String::new();
        let mut data: &[u8] = &[];
        for (k, _, v) in attrs(elem) {
            match k {
                1 => name = String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or_default()).into_owned(),
                2 => data = v,
                _ => {}
            }
        }
        out.push_str(&name);
        out.push('(');
        let mut parts: Vec<(u16, String)> = Vec::new();
        let (mut set_name, mut set_id) = (None, None);
        for (k, _, v) in attrs(data) {
            if name == "lookup" {
                match k {
                    NFTA_LOOKUP_SET => {
                        set_name =
                            Some(String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or_default()).into_owned())
                    }
                    NFTA_LOOKUP_SET_ID => set_id = v.try_into().ok().map(u32::from_be_bytes),
                    // The kernel's dump adds the flags (0: no inversion).
                    NFTA_LOOKUP_FLAGS if v == [0, 0, 0, 0] => {}
                    _ => parts.push((k, v.iter().map(|b| format!("{b:02x}")).collect())),
                }
                continue;
            }
            // The kernel leaves out a log level of 0; so do we, to compare.
            if !compared(&name, k) || (name == "log" && k == NFTA_LOG_LEVEL && v == [0, 0, 0, 0]) {
                continue;
            }
            // Raw bytes: the crate re-emits what it parsed, and drops NLA_F_NESTED from
            // the attributes it does not type, so nesting flags are not compared.
            parts.push((k, v.iter().map(|b| format!("{b:02x}")).collect()));
        }
        if name == "lookup" {
            let set = set_name.as_deref().and_then(|n| sets(n, set_id)).unwrap_or_else(|| "unknown set".into());
            parts.push((NFTA_LOOKUP_SET, set));
        }
        parts.sort();
        for (k, s) in parts {
            out.push_str(&format!("{k}={s};"));
        }
        out.push_str(") ");
        names.push(name);
    }
    (out, names)
}

/// The canonical text of a rule we would add, with its sets by content.
pub fn rule_canonical(family: Family, rule: &NftRule) -> String {
    let sets: Vec<String> = rule_sets(rule).map(ports_canonical).collect();
    let resolve = |_: &str, id: Option<u32>| id.and_then(|i| sets.get(i.checked_sub(1)? as usize).cloned());
    canonical(&list_bytes(&expressions(family, rule, 1)), &resolve).0
}

/// The value bytes of an expression list, as they go on the wire.
pub fn list_bytes(list: &[ListAttribute<ExpressionAttribute>]) -> Vec<u8> {
    let mut buf = vec![0; list.buffer_len()];
    list.emit(&mut buf);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload};
    use netlink_packet_netfilter::NetfilterMessageInner;
    use rules::rule::Uids;

    fn hex(bytes: &[u8]) -> String {
        bytes
            .chunks(16)
            .map(|c| c.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn wire(m: NetfilterMessage, flags: u16) -> Vec<u8> {
        let mut h = NetlinkHeader::default();
        h.flags = flags;
        h.sequence_number = 7;
        let mut msg = NetlinkMessage::new(h, NetlinkPayload::InnerMessage(m));
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        buf
    }

    /// Byte-exact golden messages (`UPDATE_GOLDEN=1` rewrites newrule.hex); that the
    /// kernel accepts such messages and lists them back as rendered is checked by
    /// tests/native.rs.
    #[test]
    fn golden_bytes() {
        let rule = NftRule {
            conds: vec![
                Cond::Oifname("lo".into()),
                Cond::L4proto(Protocol::Tcp),
                Cond::Dport { protocol: Protocol::Tcp, ports: Range16 { first: 80, last: 90 }, negated: false },
                Cond::SkUid { uids: Uids::one(5678), negated: true },
            ],
            action: Action::Redirect(15001),
            comment: Some("kuma/mesh/transparent/proxy/x".into()),
        };
        let attributes = rule_attributes(Family::V4, "nat_output", &rule, 1);
        let m = msg(Family::V4, NfTablesMessage::NewRule(RuleMessage { attributes }));
        let got = hex(&wire(m, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND));
        let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/nftables/golden/newrule.hex");
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&golden, format!("{got}\n")).unwrap();
        }
        assert_eq!(got + "\n", std::fs::read_to_string(&golden).unwrap(), "UPDATE_GOLDEN=1 to accept");

        let begin = hex(&wire(control(ControlMessage::BatchBegin), NLM_F_REQUEST));
        // length 20, type NFNL_MSG_BATCH_BEGIN (16), flags REQUEST, seq 7, nfgenmsg with res_id 10 (big-endian).
        assert_eq!(begin, "14 00 00 00 10 00 01 00 07 00 00 00 00 00 00 00\n00 00 00 0a");
        let del = hex(&wire(msg(Family::V6, NfTablesMessage::DeleteTable(table_message())), NLM_F_REQUEST));
        // NFT_MSG_DELTABLE in subsystem 10, family NFPROTO_IPV6, NFTA_TABLE_NAME "kuma_mesh".
        assert_eq!(
            del,
            "24 00 00 00 02 0a 01 00 07 00 00 00 00 00 00 00\n0a 00 00 00 0e 00 01 00 6b 75 6d 61 5f 6d 65 73\n68 00 00 00"
        );
    }

    #[test]
    fn canonical_form_ignores_kernel_defaults() {
        let rule = NftRule { conds: vec![Cond::CtStateInvalid], action: Action::Drop, comment: None };
        let none = |_: &str, _: Option<u32>| None;
        let (text, names) = canonical(&list_bytes(&expressions(Family::V4, &rule, 1)), &none);
        assert_eq!(names, ["ct", "bitwise", "cmp", "immediate"]);
        // The kernel's dump adds NFTA_BITWISE_OP (6) = 0: not compared.
        let mut dumped = expressions(Family::V4, &rule, 1);
        dumped[1] = Expressions::Bitwise(vec![
            Bitwise::SourceRegister(Register::Reg1),
            Bitwise::DestinationRegister(Register::Reg1),
            Bitwise::Length(4),
            Bitwise::Mask(DataAttribute::Value(1u32.to_ne_bytes().to_vec())),
            Bitwise::Xor(DataAttribute::Value(vec![0; 4])),
            Bitwise::Op(0),
        ])
        .into();
        assert_eq!(canonical(&list_bytes(&dumped), &none).0, text);
        let other = NftRule { action: Action::Return, ..rule };
        assert_ne!(canonical(&list_bytes(&expressions(Family::V4, &other, 1)), &none).0, text);
    }

    #[test]
    fn comments_round_trip_through_userdata() {
        let data = comment_userdata("kuma/mesh/transparent/proxy/abc");
        assert_eq!(&data[..2], &[0, 32]);
        assert_eq!(userdata_comment(&data).as_deref(), Some("kuma/mesh/transparent/proxy/abc"));
    }

    fn r(first: u16, last: u16) -> Range16 {
        Range16 { first, last }
    }

    fn set_rule(ports: Vec<Range16>) -> NftRule {
        NftRule {
            conds: vec![
                Cond::L4proto(Protocol::Tcp),
                Cond::DportIn { protocol: Protocol::Tcp, ports },
                Cond::SkUid { uids: Uids { first: 1001, last: 1010 }, negated: false },
            ],
            action: Action::Return,
            comment: None,
        }
    }

    #[test]
    fn set_keys_follow_the_interval_rules() {
        // Single ports: a plain set of the ports.
        assert_eq!(set_elements(&[r(80, 80), r(443, 443)]), [(80, false), (443, false)]);
        // Ranges: an end at 0, then start and the port past the end of each range.
        assert_eq!(
            set_elements(&[r(7000, 7000), r(7100, 7200)]),
            [(0, true), (7000, false), (7001, true), (7100, false), (7201, true)]
        );
        // A range from 0 needs no leading end; one up to 65535 has no end of its own.
        assert_eq!(set_elements(&[r(0, 10), r(60000, 65535)]), [(0, false), (11, true), (60000, false)]);
        assert_eq!(set_flags(&[r(1, 1), r(3, 3)]), SetFlags::Anonymous | SetFlags::Constant);
        assert_eq!(set_flags(&[r(1, 2), r(4, 4)]).bits(), 7);
    }

    /// A rule looking a port set up, as one batch holds it: NEWSET, NEWSETELEM and the
    /// NEWRULE with its lookup, byte for byte (`UPDATE_GOLDEN=1` rewrites portset.hex;
    /// the kernel accepts the batch and lists the set back: tests/native.rs).
    #[test]
    fn golden_set_bytes() {
        let table = NftTable {
            family: Family::V4,
            chains: vec![rules::nft::Chain {
                name: "nat_output".into(),
                hook: None,
                rules: vec![set_rule(vec![r(7000, 7000), r(7100, 7200)])],
            }],
        };
        let b = batch(&[], &[table]);
        let picked: Vec<usize> = (0..b.what.len()).filter(|i| b.what[*i].contains('{')).collect();
        assert_eq!(
            picked.iter().map(|i| b.what[*i].as_str()).collect::<Vec<_>>(),
            [
                "add set ip kuma_mesh { 7000, 7100-7200 }",
                "add elements to set ip kuma_mesh { 7000, 7100-7200 }",
                "add rule ip kuma_mesh nat_output tcp dport { 7000, 7100-7200 } meta skuid 1001-1010 return",
            ]
        );
        let got: Vec<String> = picked
            .iter()
            .map(|i| {
                let (flags, m) = b.messages[*i].clone();
                format!("# {}\n{}\n", b.what[*i], hex(&wire(m, flags)))
            })
            .collect();
        let got = got.join("");
        let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/nftables/golden/portset.hex");
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&golden, &got).unwrap();
        }
        assert_eq!(got, std::fs::read_to_string(&golden).unwrap(), "UPDATE_GOLDEN=1 to accept");

        // The fields that matter, read back through the crate's parser.
        let NetfilterMessageInner::NfTables(NfTablesMessage::NewSet(set)) = b.messages[picked[0]].1.inner.clone()
        else {
            panic!("not a set")
        };
        assert_eq!(set_of(set.clone()), Some((ANONYMOUS_SET.to_owned(), 7, 2)));
        assert!(set.attributes.contains(&SetAttribute::Id(1)));
        let NetfilterMessageInner::NfTables(NfTablesMessage::NewSetElement(e)) = b.messages[picked[1]].1.inner.clone()
        else {
            panic!("not elements")
        };
        assert!(e.attributes.contains(&SetElementList::SetId(1)));
        let keys: Vec<(u16, bool)> =
            keys_of(e).into_iter().map(|(k, end)| (u16::from_be_bytes([k[0], k[1]]), end)).collect();
        assert_eq!(keys, [(0, true), (7000, false), (7001, true), (7100, false), (7201, true)]);
    }

    /// A dumped rule names its set (the kernel's name, flags added); the rule we would
    /// add names it by batch id: both stand for the set's content.
    #[test]
    fn a_lookup_compares_by_the_content_of_its_set() {
        let rule = set_rule(vec![r(53, 53), r(5353, 5353)]);
        let want = rule_canonical(Family::V4, &rule);
        assert!(want.contains(&ports_canonical(&[r(53, 53), r(5353, 5353)])), "{want}");
        let mut dumped = expressions(Family::V4, &rule, 9);
        dumped[3] = Expressions::Lookup(vec![
            Lookup::Set("__set0".into()),
            Lookup::SourceRegister(Register::Reg1),
            Lookup::Flags(0),
        ])
        .into();
        let held = |keys: Vec<u16>| {
            move |name: &str, _: Option<u32>| {
                (name == "__set0")
                    .then(|| set_canonical(3, 2, keys.iter().map(|k| (k.to_be_bytes().to_vec(), false)).collect()))
            }
        };
        assert_eq!(canonical(&list_bytes(&dumped), &held(vec![5353, 53])).0, want);
        // One element short: not the same rule.
        assert_ne!(canonical(&list_bytes(&dumped), &held(vec![53])).0, want);
    }
}
