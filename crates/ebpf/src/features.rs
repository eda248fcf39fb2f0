//! What the node's kernel must offer our programs and the registry, asked of the kernel
//! itself: vendors (RHEL 9, SLES 15) backport BPF into older version numbers, so the
//! version is logged, never compared.
//!
//! One table says what each program of bpf/redirect.c is loaded as and which helpers it
//! calls (a unit test holds it to the compiled object). The check walks it with a probe
//! per feature, and the decision ([`missing`]) depends on nothing but the probe's answers,
//! so a test can answer for the kernel.

use std::io;

use aya::programs::{ProgramError, ProgramType};
use aya::sys::BpfHelper;

use crate::sys::{self, AttachType};

/// A program type of bpf/redirect.c.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgramKind {
    CgroupSockAddr,
    SockOps,
    CgroupSockopt,
    SkLookup,
}

/// A helper bpf/redirect.c calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Helper {
    MapLookupElem,
    MapUpdateElem,
    GetCurrentUidGid,
    GetSocketCookie,
    GetNetnsCookie,
    SockHashUpdate,
    SkAssign,
    SkRelease,
}

/// A map type bpf/redirect.c declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    Hash,
    LruHash,
    SockHash,
}

/// One thing the kernel must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    Program(ProgramKind),
    /// A program loaded for this attach type (`expected_attach_type`).
    Attach(AttachType),
    /// A BPF link of this attach type (`BPF_LINK_CREATE`).
    Link(AttachType),
    /// A helper, as the verifier allows it to programs of this type.
    Helper(ProgramKind, Helper),
    Map(MapKind),
    /// `BPF_LINK_UPDATE`: an upgrade swaps its programs into the pinned links.
    LinkUpdate,
    /// `BPF_LINK_DETACH`: uninstall and unregister detach at once.
    LinkDetach,
    /// `getsockopt(SO_NETNS_COOKIE)`: how the registry keys a pod.
    NetnsCookieSockopt,
}

/// The programs of bpf/redirect.c and what each is loaded and attached as.
pub(crate) const PROGRAMS: [(&str, AttachType); 9] = [
    ("kmc_connect4", AttachType::Inet4Connect),
    ("kmc_connect6", AttachType::Inet6Connect),
    ("kmc_sendmsg4", AttachType::Udp4Sendmsg),
    ("kmc_sendmsg6", AttachType::Udp6Sendmsg),
    ("kmc_recvmsg4", AttachType::Udp4Recvmsg),
    ("kmc_recvmsg6", AttachType::Udp6Recvmsg),
    ("kmc_sockops", AttachType::SockOps),
    ("kmc_getsockopt", AttachType::Getsockopt),
    ("kmc_sk_lookup", AttachType::SkLookup),
];

const MAPS: [MapKind; 3] = [MapKind::Hash, MapKind::LruHash, MapKind::SockHash];

impl ProgramKind {
    const ALL: [ProgramKind; 4] =
        [ProgramKind::CgroupSockAddr, ProgramKind::SockOps, ProgramKind::CgroupSockopt, ProgramKind::SkLookup];

    fn name(self) -> &'static str {
        match self {
            ProgramKind::CgroupSockAddr => "cgroup sock_addr",
            ProgramKind::SockOps => "sock_ops",
            ProgramKind::CgroupSockopt => "cgroup sockopt",
            ProgramKind::SkLookup => "sk_lookup",
        }
    }

    fn since(self) -> &'static str {
        match self {
            ProgramKind::CgroupSockAddr => "4.17",
            ProgramKind::SockOps => "4.13",
            ProgramKind::CgroupSockopt => "5.3",
            ProgramKind::SkLookup => "5.9",
        }
    }

    /// The helpers bpf/redirect.c calls from programs of this type.
    pub(crate) fn helpers(self) -> &'static [Helper] {
        use Helper::*;
        match self {
            ProgramKind::CgroupSockAddr => {
                &[MapLookupElem, MapUpdateElem, GetCurrentUidGid, GetSocketCookie, GetNetnsCookie]
            }
            ProgramKind::SockOps => &[MapLookupElem, MapUpdateElem, GetSocketCookie, GetNetnsCookie, SockHashUpdate],
            ProgramKind::CgroupSockopt => &[MapLookupElem, GetNetnsCookie],
            ProgramKind::SkLookup => &[MapLookupElem, SkAssign, SkRelease],
        }
    }

    fn aya(self) -> ProgramType {
        match self {
            ProgramKind::CgroupSockAddr => ProgramType::CgroupSockAddr,
            ProgramKind::SockOps => ProgramType::SockOps,
            ProgramKind::CgroupSockopt => ProgramType::CgroupSockopt,
            ProgramKind::SkLookup => ProgramType::SkLookup,
        }
    }
}

impl AttachType {
    pub(crate) fn kind(self) -> ProgramKind {
        match self {
            AttachType::SockOps => ProgramKind::SockOps,
            AttachType::Getsockopt => ProgramKind::CgroupSockopt,
            AttachType::SkLookup => ProgramKind::SkLookup,
            _ => ProgramKind::CgroupSockAddr,
        }
    }

    /// The ELF section (libbpf's name) of programs of this attach type.
    fn section(self) -> &'static str {
        match self {
            AttachType::SockOps => "sockops",
            AttachType::Inet4Connect => "cgroup/connect4",
            AttachType::Inet6Connect => "cgroup/connect6",
            AttachType::Udp4Sendmsg => "cgroup/sendmsg4",
            AttachType::Udp6Sendmsg => "cgroup/sendmsg6",
            AttachType::Udp4Recvmsg => "cgroup/recvmsg4",
            AttachType::Udp6Recvmsg => "cgroup/recvmsg6",
            AttachType::Getsockopt => "cgroup/getsockopt",
            AttachType::SkLookup => "sk_lookup",
        }
    }

    fn uapi(self) -> &'static str {
        match self {
            AttachType::SockOps => "BPF_CGROUP_SOCK_OPS",
            AttachType::Inet4Connect => "BPF_CGROUP_INET4_CONNECT",
            AttachType::Inet6Connect => "BPF_CGROUP_INET6_CONNECT",
            AttachType::Udp4Sendmsg => "BPF_CGROUP_UDP4_SENDMSG",
            AttachType::Udp6Sendmsg => "BPF_CGROUP_UDP6_SENDMSG",
            AttachType::Udp4Recvmsg => "BPF_CGROUP_UDP4_RECVMSG",
            AttachType::Udp6Recvmsg => "BPF_CGROUP_UDP6_RECVMSG",
            AttachType::Getsockopt => "BPF_CGROUP_GETSOCKOPT",
            AttachType::SkLookup => "BPF_SK_LOOKUP",
        }
    }

    fn since(self) -> &'static str {
        match self {
            AttachType::SockOps => "4.13",
            AttachType::Inet4Connect | AttachType::Inet6Connect => "4.17",
            AttachType::Udp4Sendmsg | AttachType::Udp6Sendmsg => "4.18",
            AttachType::Udp4Recvmsg | AttachType::Udp6Recvmsg => "5.2",
            AttachType::Getsockopt => "5.3",
            AttachType::SkLookup => "5.9",
        }
    }

    /// Since when a BPF link can attach it: cgroup links came in 5.7, netns links
    /// (sk_lookup's) with sk_lookup.
    fn link_since(self) -> &'static str {
        match self {
            AttachType::SkLookup => "5.9",
            _ => "5.7",
        }
    }
}

impl Helper {
    pub(crate) fn aya(self) -> BpfHelper {
        match self {
            Helper::MapLookupElem => BpfHelper::BPF_FUNC_map_lookup_elem,
            Helper::MapUpdateElem => BpfHelper::BPF_FUNC_map_update_elem,
            Helper::GetCurrentUidGid => BpfHelper::BPF_FUNC_get_current_uid_gid,
            Helper::GetSocketCookie => BpfHelper::BPF_FUNC_get_socket_cookie,
            Helper::GetNetnsCookie => BpfHelper::BPF_FUNC_get_netns_cookie,
            Helper::SockHashUpdate => BpfHelper::BPF_FUNC_sock_hash_update,
            Helper::SkAssign => BpfHelper::BPF_FUNC_sk_assign,
            Helper::SkRelease => BpfHelper::BPF_FUNC_sk_release,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Helper::MapLookupElem => "bpf_map_lookup_elem",
            Helper::MapUpdateElem => "bpf_map_update_elem",
            Helper::GetCurrentUidGid => "bpf_get_current_uid_gid",
            Helper::GetSocketCookie => "bpf_get_socket_cookie",
            Helper::GetNetnsCookie => "bpf_get_netns_cookie",
            Helper::SockHashUpdate => "bpf_sock_hash_update",
            Helper::SkAssign => "bpf_sk_assign",
            Helper::SkRelease => "bpf_sk_release",
        }
    }

    /// Since when programs of type `kind` may call it upstream.
    fn since(self, kind: ProgramKind) -> &'static str {
        match (kind, self) {
            (ProgramKind::CgroupSockAddr | ProgramKind::SockOps, Helper::GetSocketCookie) => "4.19",
            (ProgramKind::SockOps, Helper::SockHashUpdate) => "4.18",
            (ProgramKind::CgroupSockAddr, Helper::GetNetnsCookie) => "5.7",
            (ProgramKind::SockOps | ProgramKind::CgroupSockopt, Helper::GetNetnsCookie) => "5.15",
            // The map helpers, uid/gid for sock_addr and sk_assign/sk_release for
            // sk_lookup came with the program type itself.
            _ => kind.since(),
        }
    }
}

impl MapKind {
    fn aya(self) -> aya::maps::MapType {
        match self {
            MapKind::Hash => aya::maps::MapType::Hash,
            MapKind::LruHash => aya::maps::MapType::LruHash,
            MapKind::SockHash => aya::maps::MapType::SockHash,
        }
    }
}

impl Feature {
    /// The upstream kernel release that brought it.
    pub fn since(self) -> &'static str {
        match self {
            Feature::Program(kind) => kind.since(),
            Feature::Attach(attach) => attach.since(),
            Feature::Link(attach) => attach.link_since(),
            Feature::Helper(kind, helper) => helper.since(kind),
            Feature::Map(MapKind::Hash) => "3.19",
            Feature::Map(MapKind::LruHash) => "4.10",
            Feature::Map(MapKind::SockHash) => "4.18",
            Feature::LinkUpdate => "5.7",
            Feature::LinkDetach => "5.9",
            Feature::NetnsCookieSockopt => "5.14",
        }
    }
}

impl std::fmt::Display for Feature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let since = self.since();
        match self {
            Feature::Program(kind) => write!(f, "{} programs (upstream {since})", kind.name()),
            Feature::Attach(a) => write!(f, "{} programs ({}, upstream {since})", a.section(), a.uapi()),
            Feature::Link(a) => write!(f, "BPF links for {} programs (BPF_LINK_CREATE, upstream {since})", a.section()),
            Feature::Helper(kind, helper) => {
                write!(f, "{} for {} programs (upstream {since})", helper.name(), kind.name())
            }
            Feature::Map(MapKind::Hash) => write!(f, "BPF_MAP_TYPE_HASH maps (upstream {since})"),
            Feature::Map(MapKind::LruHash) => write!(f, "BPF_MAP_TYPE_LRU_HASH maps (upstream {since})"),
            Feature::Map(MapKind::SockHash) => write!(f, "BPF_MAP_TYPE_SOCKHASH maps (upstream {since})"),
            Feature::LinkUpdate => write!(f, "BPF_LINK_UPDATE (upstream {since})"),
            Feature::LinkDetach => write!(f, "BPF_LINK_DETACH (upstream {since})"),
            Feature::NetnsCookieSockopt => write!(f, "the socket option SO_NETNS_COOKIE (upstream {since})"),
        }
    }
}

/// The kernel could not be asked (not whether it has the feature).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{call}: {source}")]
    Syscall { call: &'static str, source: io::Error },
    #[error(transparent)]
    Aya(Box<ProgramError>),
}

impl From<ProgramError> for ProbeError {
    fn from(e: ProgramError) -> Self {
        match e {
            ProgramError::SyscallError(aya::sys::SyscallError { call, io_error }) => {
                ProbeError::Syscall { call, source: io_error }
            }
            e => ProbeError::Aya(Box::new(e)),
        }
    }
}

fn syscall(call: &'static str) -> impl FnOnce(io::Error) -> ProbeError {
    move |source| ProbeError::Syscall { call, source }
}

/// EINVAL: the kernel does not know the command, type or attribute; E2BIG: nor the
/// attribute's field (a kernel older than the field).
fn unknown_to_kernel(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::E2BIG))
}

/// Asks this kernel whether it has `feature`. aya's probes where it has one (program,
/// helper and map types); our own for attach types, links and SO_NETNS_COOKIE, which
/// aya 0.14 does not probe.
pub fn probe(feature: Feature) -> Result<bool, ProbeError> {
    match feature {
        Feature::Program(kind) => Ok(aya::sys::is_program_supported(kind.aya())?),
        Feature::Helper(kind, helper) => Ok(aya::sys::is_helper_supported(kind.aya(), helper.aya())?),
        Feature::Map(map) => aya::sys::is_map_supported(map.aya())
            .map_err(|aya::sys::SyscallError { call, io_error }| ProbeError::Syscall { call, source: io_error }),
        Feature::Attach(attach) => match sys::load_trivial(attach) {
            Ok(_) => Ok(true),
            Err(e) if unknown_to_kernel(&e) => Ok(false),
            Err(e) => Err(syscall("bpf_prog_load")(e)),
        },
        // The probes below pass a descriptor that is never valid: a kernel that knows
        // the operation gets as far as looking it up (EBADF), one that does not stops
        // before (EINVAL). Nothing is ever attached.
        Feature::Link(attach) => {
            let prog = sys::load_trivial(attach).map_err(syscall("bpf_prog_load"))?;
            match sys::link_create_invalid_target(&prog, attach) {
                Err(e) if e.raw_os_error() == Some(libc::EBADF) => Ok(true),
                Err(e) if unknown_to_kernel(&e) => Ok(false),
                Err(e) => Err(syscall("bpf_link_create")(e)),
                Ok(_) => Err(syscall("bpf_link_create")(io::Error::other("attached to an invalid descriptor"))),
            }
        }
        Feature::LinkUpdate | Feature::LinkDetach => {
            let update = feature == Feature::LinkUpdate;
            let call = if update { "bpf_link_update" } else { "bpf_link_detach" };
            match sys::link_command_invalid_link(update) {
                Err(e) if e.raw_os_error() == Some(libc::EBADF) => Ok(true),
                Err(e) if unknown_to_kernel(&e) => Ok(false),
                Err(e) => Err(syscall(call)(e)),
                Ok(()) => Err(syscall(call)(io::Error::other("accepted an invalid descriptor"))),
            }
        }
        Feature::NetnsCookieSockopt => match sys::netns_cookie_of_new_socket() {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => Ok(false),
            Err(e) => Err(syscall("getsockopt(SO_NETNS_COOKIE)")(e)),
        },
    }
}

/// The kernel's release, as `uname -r` prints it.
pub fn kernel_release() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|r| r.trim().to_owned())
}

/// What the node check asks: the kernel's release (logged and shown, never decisive)
/// and each feature. A test replaces either.
#[derive(Debug, Clone, Copy)]
pub struct Probes {
    pub release: fn() -> Option<String>,
    pub feature: fn(Feature) -> Result<bool, ProbeError>,
}

impl Probes {
    /// This node's kernel.
    pub const KERNEL: Probes = Probes { release: kernel_release, feature: probe };
}

/// Every feature, in the order the check asks: a program type before its attach types
/// and helpers, which are not asked without it.
fn required() -> impl Iterator<Item = (Feature, Option<Feature>)> {
    let programs = ProgramKind::ALL.into_iter().flat_map(|kind| {
        let needs = Some(Feature::Program(kind));
        let attach = PROGRAMS
            .into_iter()
            .filter(move |(_, a)| a.kind() == kind)
            .flat_map(move |(_, a)| [(Feature::Attach(a), needs), (Feature::Link(a), Some(Feature::Attach(a)))]);
        let helpers = kind.helpers().iter().map(move |h| (Feature::Helper(kind, *h), needs));
        std::iter::once((Feature::Program(kind), None)).chain(attach).chain(helpers)
    });
    let rest = MAPS.into_iter().map(Feature::Map).chain([
        Feature::LinkUpdate,
        Feature::LinkDetach,
        Feature::NetnsCookieSockopt,
    ]);
    programs.chain(rest.map(|f| (f, None)))
}

/// What the kernel lacks, one line each naming the feature and the upstream release that
/// brought it; empty when it has everything. A feature whose precondition is missing is
/// not asked (it would only repeat it). The first probe that cannot ask ends the check:
/// the rest would fail the same way (bpf(2) not permitted, for one).
pub fn missing(mut probe: impl FnMut(Feature) -> Result<bool, ProbeError>) -> Vec<String> {
    let mut lacking: Vec<Feature> = Vec::new();
    let mut lines = Vec::new();
    for (feature, needs) in required() {
        if needs.is_some_and(|n| lacking.contains(&n)) {
            lacking.push(feature);
            continue;
        }
        match probe(feature) {
            Ok(true) => {}
            Ok(false) => {
                lacking.push(feature);
                lines.push(format!("the kernel lacks {feature}"));
            }
            Err(e) => {
                lines.push(format!("cannot ask the kernel for {feature}: {e}"));
                break;
            }
        }
    }
    lines
}

/// Why the verifier refused program `name` of bpf/redirect.c when the check had found
/// every feature (a kernel whose probes and verifier disagree): the helper its log calls
/// unknown, or else everything the program needs.
pub(crate) fn refusal(name: &str, verifier_log: &str) -> String {
    let Some((_, attach)) = PROGRAMS.iter().find(|(n, _)| *n == name) else {
        return format!("the kernel refused {name}");
    };
    let kind = attach.kind();
    // "unknown func bpf_x#N" (older kernels), "program of this type cannot use helper
    // bpf_x#N" (newer ones).
    let refused_helper = kind.helpers().iter().find(|h| {
        let call = format!("{}#", h.name());
        ["unknown func ", "cannot use helper "].iter().any(|prefix| verifier_log.contains(&format!("{prefix}{call}")))
    });
    if let Some(helper) = refused_helper {
        return format!("the kernel lacks {}", Feature::Helper(kind, *helper));
    }
    let needs: Vec<String> = std::iter::once(Feature::Attach(*attach))
        .chain(kind.helpers().iter().map(|h| Feature::Helper(kind, *h)))
        .map(|f| f.to_string())
        .collect();
    format!("the kernel's verifier refused {} ({}), which needs {}", name, attach.section(), needs.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOCKOPS_COOKIE: Feature = Feature::Helper(ProgramKind::SockOps, Helper::GetNetnsCookie);

    #[test]
    fn a_kernel_with_everything_lacks_nothing_and_every_feature_is_asked() {
        let mut asked = Vec::new();
        let lines = missing(|f| {
            asked.push(f);
            Ok(true)
        });
        assert_eq!(lines, Vec::<String>::new());
        // 4 program types, 9 attach types and their links, 15 helper uses, 3 maps, 3 more.
        assert_eq!(asked.len(), 4 + 2 * 9 + 15 + 3 + 3, "{asked:?}");
        for f in [SOCKOPS_COOKIE, Feature::Helper(ProgramKind::SkLookup, Helper::SkAssign), Feature::LinkDetach] {
            assert!(asked.contains(&f), "{f:?} is not asked");
        }
    }

    #[test]
    fn each_missing_feature_is_named_with_its_upstream_release() {
        let lines = missing(|f| Ok(f != SOCKOPS_COOKIE && f != Feature::NetnsCookieSockopt));
        assert_eq!(
            lines,
            [
                "the kernel lacks bpf_get_netns_cookie for sock_ops programs (upstream 5.15)",
                "the kernel lacks the socket option SO_NETNS_COOKIE (upstream 5.14)",
            ]
        );
    }

    #[test]
    fn a_missing_program_type_is_named_once_not_with_each_of_its_helpers() {
        let mut asked = Vec::new();
        let lines = missing(|f| {
            asked.push(f);
            Ok(f != Feature::Program(ProgramKind::SkLookup) && f != Feature::Attach(AttachType::Udp4Recvmsg))
        });
        assert_eq!(
            lines,
            [
                "the kernel lacks cgroup/recvmsg4 programs (BPF_CGROUP_UDP4_RECVMSG, upstream 5.2)",
                "the kernel lacks sk_lookup programs (upstream 5.9)",
            ]
        );
        assert!(!asked.contains(&Feature::Helper(ProgramKind::SkLookup, Helper::SkAssign)));
        assert!(!asked.contains(&Feature::Link(AttachType::Udp4Recvmsg)));
    }

    #[test]
    fn a_kernel_that_cannot_be_asked_is_named_once() {
        let mut asked = 0;
        let lines = missing(|_| {
            asked += 1;
            Err(ProbeError::Syscall { call: "bpf_prog_load", source: io::Error::from_raw_os_error(libc::EPERM) })
        });
        assert_eq!(asked, 1);
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].starts_with("cannot ask the kernel for cgroup sock_addr programs (upstream 4.17): bpf_prog_load:"),
            "{lines:?}"
        );
    }

    /// A verifier refusal cannot be produced on a kernel that has the features: the
    /// logs below are the two forms kernels print for a helper they do not allow.
    #[test]
    fn a_verifier_refusal_names_the_helper_it_calls_unknown() {
        let old = "; *netns = bpf_get_netns_cookie(ctx);\n5: (85) call bpf_get_netns_cookie#122\nunknown func bpf_get_netns_cookie#122\nprocessed 6 insns";
        assert_eq!(
            refusal("kmc_sockops", old),
            "the kernel lacks bpf_get_netns_cookie for sock_ops programs (upstream 5.15)"
        );
        let new =
            "5: (85) call bpf_get_netns_cookie#122\nprogram of this type cannot use helper bpf_get_netns_cookie#122";
        assert_eq!(
            refusal("kmc_getsockopt", new),
            "the kernel lacks bpf_get_netns_cookie for cgroup sockopt programs (upstream 5.15)"
        );
        let other = refusal("kmc_sk_lookup", "R1 type=ctx expected=sock");
        assert!(other.starts_with("the kernel's verifier refused kmc_sk_lookup (sk_lookup), which needs sk_lookup programs (BPF_SK_LOOKUP, upstream 5.9), bpf_map_lookup_elem for sk_lookup programs (upstream 5.9), bpf_sk_assign"), "{other}");
    }

    /// The table is what the compiled object holds: each program's section, and the
    /// helpers the programs of each type call (recvmsg calls fewer than connect).
    #[test]
    fn the_table_matches_the_compiled_programs() {
        use aya_obj::ProgramSection;
        use aya_obj::generated::bpf_attach_type;

        let obj = aya_obj::Object::parse(crate::OBJECT).expect("parse bpf/redirect.c's object");
        let mut names: Vec<&str> = obj.programs.keys().map(String::as_str).collect();
        names.sort();
        let mut ours: Vec<&str> = PROGRAMS.iter().map(|(n, _)| *n).collect();
        ours.sort();
        assert_eq!(names, ours);
        let loaded: Vec<&str> = crate::loader::CGROUP_PROGRAMS.into_iter().chain([crate::loader::SK_LOOKUP]).collect();
        assert_eq!(loaded, PROGRAMS.map(|(n, _)| n), "the loader loads every program of the table");
        let mut called = std::collections::BTreeMap::<&str, Vec<u32>>::new();
        for (name, attach) in PROGRAMS {
            let program = &obj.programs[name];
            let section = match program.section {
                ProgramSection::CgroupSockAddr { attach_type } => bpf_attach_type::from(attach_type),
                ProgramSection::CgroupSockopt { attach_type } => bpf_attach_type::from(attach_type),
                ProgramSection::SockOps => bpf_attach_type::BPF_CGROUP_SOCK_OPS,
                ProgramSection::SkLookup => bpf_attach_type::BPF_SK_LOOKUP,
                ref other => panic!("{name}: section {other:?} is not in the table"),
            };
            assert_eq!(section as u32, attach as u32, "{name}");
            let function = &obj.functions[&(program.section_index, program.address)];
            // BPF_JMP | BPF_CALL with src_reg 0: a helper, its number in imm (every
            // function of redirect.c is inlined, so there are no other calls).
            let helpers = function.instructions.iter().filter(|i| i.code == 0x85 && i.src_reg() == 0);
            called.entry(attach.kind().name()).or_default().extend(helpers.map(|i| i.imm as u32));
        }
        for kind in ProgramKind::ALL {
            let mut calls = called.remove(kind.name()).unwrap_or_default();
            calls.sort();
            calls.dedup();
            let mut table: Vec<u32> = kind.helpers().iter().map(|h| h.aya() as u32).collect();
            table.sort();
            assert_eq!(calls, table, "{} programs: helpers called vs probed", kind.name());
        }
    }
}
