//! Pod registration: what the plugin does in eBPF mode instead of iptables. A pod is
//! its network namespace cookie in `kmc_pods` (its configuration), its addresses in
//! `kmc_addrs`, and the sk_lookup program attached to its namespace, pinned as
//! `pods/<container id>_<cookie>`.

use std::net::{IpAddr, Ipv6Addr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData};
use kuma::Config;
use netns::NetNs;

use crate::abi::{self, AddrKey, POD_IPV6, Pod};
use crate::loader::{PODS_DIR, SK_LOOKUP};
use crate::sys::{self, AttachType};
use crate::{EbpfError, Paths};

/// The cookie of a network namespace: the key programs see from bpf_get_netns_cookie.
pub fn netns_cookie(netns: &NetNs) -> Result<u64, EbpfError> {
    netns
        .run(sys::netns_cookie_of_new_socket)?
        .map_err(EbpfError::io("cannot read the namespace cookie of", netns.path()))
}

/// The addresses of a namespace's interfaces other than loopback ones (link-local IPv6
/// left out): what a pod is reached at when no previous plugin's result says so (a
/// standalone configuration under Multus).
pub fn netns_addresses(netns: &NetNs) -> Result<Vec<IpAddr>, EbpfError> {
    let read = || -> std::io::Result<Vec<IpAddr>> {
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        // SAFETY: getifaddrs fills `head` with a list we free below.
        if unsafe { libc::getifaddrs(&mut head) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut out = Vec::new();
        let mut cur = head;
        while !cur.is_null() {
            // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed;
            // ifa_addr points to a sockaddr of the family it names.
            let ip = unsafe {
                let ifa = &*cur;
                cur = ifa.ifa_next;
                if ifa.ifa_flags & libc::IFF_LOOPBACK as u32 != 0 {
                    continue;
                }
                match ifa.ifa_addr.as_ref().map(|a| i32::from(a.sa_family)) {
                    Some(libc::AF_INET) => {
                        let sin = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                        IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes())
                    }
                    Some(libc::AF_INET6) => {
                        IpAddr::from((*ifa.ifa_addr.cast::<libc::sockaddr_in6>()).sin6_addr.s6_addr)
                    }
                    _ => continue,
                }
            };
            let link_local = matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local());
            if !link_local && !out.contains(&ip) {
                out.push(ip);
            }
        }
        // SAFETY: the list getifaddrs returned, freed once.
        unsafe { libc::freeifaddrs(head) };
        Ok(out)
    };
    netns.run(read)?.map_err(EbpfError::io("cannot list the addresses of", netns.path()))
}

/// A registered pod, as [`Registry::register`] left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub netns_cookie: u64,
    pub ipv6: bool,
    pub addresses: Vec<IpAddr>,
}

/// The node's registration maps, opened from their pins.
pub struct Registry {
    dir: PathBuf,
    pods: HashMap<MapData, u64, Pod>,
    addrs: HashMap<MapData, AddrKey, u64>,
}

fn open_map(dir: &Path, name: &'static str) -> Result<Map, EbpfError> {
    let path = dir.join(name);
    if !path.exists() {
        return Err(EbpfError::NotLoaded { path });
    }
    let data = MapData::from_pin(&path).map_err(EbpfError::map(name))?;
    Ok(Map::HashMap(data))
}

fn check_id(id: &str) -> Result<(), EbpfError> {
    if id.is_empty() || id.contains(['/', '.']) {
        return Err(EbpfError::ContainerId { id: id.to_owned() });
    }
    Ok(())
}

impl Registry {
    pub fn open(paths: &Paths) -> Result<Self, EbpfError> {
        let dir = paths.pin_dir();
        let pods = HashMap::try_from(open_map(&dir, "kmc_pods")?).map_err(EbpfError::map("kmc_pods"))?;
        let addrs = HashMap::try_from(open_map(&dir, "kmc_addrs")?).map_err(EbpfError::map("kmc_addrs"))?;
        Ok(Registry { dir, pods, addrs })
    }

    /// Every pod's pin, with the container ID and cookie its name carries.
    fn pins(&self) -> Result<Vec<(PathBuf, String, u64)>, EbpfError> {
        let pods = self.dir.join(PODS_DIR);
        let entries = std::fs::read_dir(&pods).map_err(EbpfError::io("cannot list", &pods))?;
        let named = |path: PathBuf| {
            let (id, cookie) = path.file_name()?.to_str()?.rsplit_once('_')?;
            let (id, cookie) = (id.to_owned(), cookie.parse().ok()?);
            Some((path, id, cookie))
        };
        Ok(entries.filter_map(Result::ok).filter_map(|e| named(e.path())).collect())
    }

    /// The pin of a pod's sk_lookup link and the cookie its name carries.
    fn find(&self, id: &str) -> Result<Option<(PathBuf, u64)>, EbpfError> {
        Ok(self.pins()?.into_iter().find(|(_, pin_id, _)| pin_id == id).map(|(pin, _, cookie)| (pin, cookie)))
    }

    /// Unregisters the pods whose network namespace is gone without a DEL (a runtime
    /// that crashed, a node agent that missed it): the kernel detached their sk_lookup
    /// links, but pins and map entries would stay until the maps are full. Returns
    /// their container IDs.
    pub fn sweep(&mut self) -> Result<Vec<String>, EbpfError> {
        let mut swept = Vec::new();
        for (pin, id, cookie) in self.pins()? {
            let gone = sys::obj_get(&pin).and_then(|link| sys::netns_link_ino(link.as_fd()));
            if !matches!(gone, Ok(Some(0))) {
                continue;
            }
            match self.remove(Some(&pin), cookie) {
                Ok(()) => swept.push(id),
                // A DEL of the same pod at this moment: it removes what is left.
                Err(e) => tracing::debug!(id, error = %e, "could not sweep a pod whose namespace is gone"),
            }
        }
        if !swept.is_empty() {
            tracing::info!(pods = ?swept, "unregistered pods whose network namespace is gone");
        }
        Ok(swept)
    }

    /// Registers the pod of container `id`, whose namespace is `netns`, with its
    /// configuration and addresses. Idempotent; on failure nothing stays registered.
    pub fn register(
        &mut self,
        id: &str,
        netns: &NetNs,
        cfg: &Config,
        addresses: &[IpAddr],
    ) -> Result<Registration, EbpfError> {
        check_id(id)?;
        let value = abi::pod(cfg, addresses)?;
        let cookie = netns_cookie(netns)?;
        let ipv6 = value.flags & POD_IPV6 != 0;
        if ipv6 {
            // Kuma's inbound passthrough source (::6) must be an address of the pod.
            netns
                .run(|| netfilter::add_ipv6_host_address(1, Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6)))?
                .map_err(EbpfError::io("cannot add ::6 to lo in", netns.path()))?;
        }
        self.unregister(id)?;
        let result = self.write(id, netns, cookie, &value, addresses);
        if result.is_err() {
            let _ = self.remove(None, cookie);
        }
        result?;
        // The caller (the plugin, the in-place repair) says it once at info, with the pod.
        tracing::debug!(id, netns = %netns.path().display(), cookie, ipv6, "pod registered for the eBPF redirect");
        Ok(Registration { netns_cookie: cookie, ipv6, addresses: addresses.to_vec() })
    }

    fn write(&mut self, id: &str, netns: &NetNs, cookie: u64, value: &Pod, addrs: &[IpAddr]) -> Result<(), EbpfError> {
        for ip in addrs {
            self.addrs.insert(AddrKey::new(*ip), cookie, 0).map_err(EbpfError::map("kmc_addrs"))?;
        }
        self.pods.insert(cookie, value, 0).map_err(EbpfError::map("kmc_pods"))?;
        // The pinned program and the link through bpf(2) directly: aya's SkLookup would
        // probe the kernel's features first, costing the plugin most of its time here.
        let prog_pin = self.dir.join(SK_LOOKUP);
        let prog = sys::obj_get(&prog_pin).map_err(EbpfError::io("cannot open the pinned program", &prog_pin))?;
        // The handle whose cookie was read, not its path again: the same namespace.
        let link = sys::link_create(prog.as_fd(), netns.as_fd(), AttachType::SkLookup)
            .map_err(EbpfError::io("cannot attach sk_lookup to", netns.path()))?;
        let pin = self.dir.join(PODS_DIR).join(format!("{id}_{cookie}"));
        sys::obj_pin(link.as_fd(), &pin).map_err(EbpfError::io("cannot pin", &pin))
    }

    /// Removes a pod's pin (detaching its sk_lookup), configuration and addresses.
    fn remove(&mut self, pin: Option<&Path>, cookie: u64) -> Result<(), EbpfError> {
        if let Some(pin) = pin {
            sys::detach_and_unpin(pin).map_err(EbpfError::io("cannot detach and unpin", pin))?;
        }
        let stale: Vec<AddrKey> =
            self.addrs.iter().filter_map(Result::ok).filter(|(_, owner)| *owner == cookie).map(|(k, _)| k).collect();
        for key in stale {
            let _ = self.addrs.remove(&key);
        }
        match self.pods.remove(&cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(EbpfError::map("kmc_pods")(e)),
        }
    }

    /// Unregisters container `id`; `false` when it was not registered (DEL is idempotent).
    pub fn unregister(&mut self, id: &str) -> Result<bool, EbpfError> {
        check_id(id)?;
        let Some((pin, cookie)) = self.find(id)? else { return Ok(false) };
        self.remove(Some(&pin), cookie)?;
        tracing::debug!(id, cookie, "pod unregistered from the eBPF redirect");
        Ok(true)
    }

    /// Verifies that container `id` is registered for `netns` exactly as `cfg` and
    /// `addresses` say (CHECK).
    pub fn check(&self, id: &str, netns: &NetNs, cfg: &Config, addresses: &[IpAddr]) -> Result<(), EbpfError> {
        check_id(id)?;
        let mismatch = |what: String| EbpfError::Mismatch { id: id.to_owned(), what };
        let expected = abi::pod(cfg, addresses)?;
        let cookie = netns_cookie(netns)?;
        match self.find(id)? {
            Some((_, pinned)) if pinned == cookie => {}
            Some(_) => {
                return Err(mismatch(format!(
                    "registered for another network namespace than {}",
                    netns.path().display()
                )));
            }
            None => return Err(mismatch("no sk_lookup link pinned".to_owned())),
        }
        let actual = self.pods.get(&cookie, 0).map_err(|_| mismatch("no configuration in kmc_pods".to_owned()))?;
        if actual != *expected {
            return Err(mismatch("its configuration in kmc_pods differs".to_owned()));
        }
        for ip in addresses {
            if self.addrs.get(&AddrKey::new(*ip), 0).ok() != Some(cookie) {
                return Err(mismatch(format!("address {ip} is not registered to it")));
            }
        }
        Ok(())
    }
}
