// The transparent-proxy redirect of registered mesh pods, without iptables.
//
// Attached to a cgroup2 (the node's root in production): connect4/6 send a registered
// pod's outbound TCP to its outbound listener (and the sidecar's loopback connections to
// its inbound listener), sendmsg/recvmsg/connect do the same for DNS over UDP, sockops
// remembers each redirected connection by its 4-tuple, and getsockopt answers
// SO_ORIGINAL_DST from that memory. Attached to a pod's network namespace: sk_lookup
// steers inbound TCP for the pod's addresses to its inbound listener, which sockops put
// in a socket hash when it started listening. A socket whose network namespace is not
// registered is never touched.
//
// Kept in step with src/abi.rs (the same structures, #[repr(C)]).

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>

#define SEC(name) __attribute__((section(name), used))
#define INLINE static inline __attribute__((always_inline))
#define __uint(name, val) int(*name)[val]
#define __type(name, val) typeof(val) *name

// Helpers, called by their number from linux/bpf.h.
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)BPF_FUNC_map_lookup_elem;
static long (*bpf_map_update_elem)(void *map, const void *key, const void *value, __u64 flags) = (void *)
    BPF_FUNC_map_update_elem;
static __u64 (*bpf_get_current_uid_gid)(void) = (void *)BPF_FUNC_get_current_uid_gid;
static __u64 (*bpf_get_socket_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;
static __u64 (*bpf_get_netns_cookie)(void *ctx) = (void *)BPF_FUNC_get_netns_cookie;
static long (*bpf_sock_hash_update)(struct bpf_sock_ops *skops, void *map, void *key, __u64 flags) = (void *)
    BPF_FUNC_sock_hash_update;
static long (*bpf_sk_assign)(void *ctx, void *sk, __u64 flags) = (void *)BPF_FUNC_sk_assign;
static long (*bpf_sk_release)(void *sk) = (void *)BPF_FUNC_sk_release;

#define READ(field) (*(volatile typeof(field) *)&(field))
#define bswap16(x) __builtin_bswap16(x)
#define bswap32(x) __builtin_bswap32(x)
#define LOOPBACK4 0x0100007fu /* 127.0.0.1 in network order, read as a little-endian u32 */
#define PASSTHROUGH4 0x0600007fu /* 127.0.0.6 */

#define AF_INET 2
#define AF_INET6 10
#define SOL_IP 0
#define SOL_IPV6 41
#define SO_ORIGINAL_DST 80 /* linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same number */
#define SK_DROP 0
#define SK_PASS 1

// --- The ABI shared with the loader (src/abi.rs) ---

#define MAX_CIDRS 32
#define MAX_UID_RULES 16
#define MAX_UID_PORT_RANGES 8
#define PORT_BITMAP_BYTES 8192

#define POD_IPV4 1
#define POD_IPV6 2
#define POD_DNS 4

#define PROTO_TCP 1
#define PROTO_UDP 2

struct cidr {
    __u32 addr[4]; // network order, already masked
    __u32 mask[4];
    __u32 family; // AF_INET or AF_INET6
};

struct port_range {
    __u16 first, last;
};

struct uid_rule {
    __u32 uid_first, uid_last;
    __u8 protocols; // PROTO_*
    __u8 nports;    // 0: every port
    __u16 pad;
    struct port_range ports[MAX_UID_PORT_RANGES];
};

struct flow {
    __u16 port;
    __u8 enabled;
    __u8 has_include; // `include` is in force and `exclude` ignored
    __u8 ncidrs;
    __u8 nuids;
    __u16 pad;
    struct cidr cidrs[MAX_CIDRS]; // inbound: sources; outbound: destinations
    struct uid_rule uids[MAX_UID_RULES]; // outbound only
    __u8 exclude[PORT_BITMAP_BYTES];
    __u8 include[PORT_BITMAP_BYTES];
};

struct pod {
    __u32 uid; // the sidecar's
    __u16 dns_port;
    __u8 flags; // POD_*
    __u8 pad;
    struct flow in, out;
};

_Static_assert(sizeof(struct pod) == 36504, "struct pod changed: update src/abi.rs");

struct addr_key {
    __u32 family;
    __u32 addr[4];
};

struct orig {
    __u32 addr[4];
    __u16 port; // host order
    __u16 family;
};

struct pair_key {
    __u64 netns;
    __u32 family;
    __u32 client[4];
    __u32 server[4];
    __u16 client_port, server_port; // host order
};

struct listener_key {
    __u64 netns;
    __u32 family;
    __u32 pad;
};

// --- Maps, pinned by the loader under <bpffs>/kong-mesh-cni/ ---

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __uint(max_entries, 4096);
    __type(key, __u64); // network namespace cookie
    __type(value, struct pod);
} kmc_pods SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 16384);
    __type(key, struct addr_key); // a registered pod's address
    __type(value, __u64);         // its network namespace cookie
} kmc_addrs SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 65536);
    __type(key, __u64); // socket cookie, from connect/sendmsg to sockops/recvmsg
    __type(value, struct orig);
} kmc_sockets SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 65536);
    __type(key, struct pair_key);
    __type(value, struct orig);
} kmc_pairs SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_SOCKHASH);
    __uint(max_entries, 8192);
    __type(key, struct listener_key);
    __type(value, __u64);
} kmc_listeners SEC(".maps");

// --- Decisions ---

enum verdict { PASS, TO_OUTBOUND, TO_INBOUND, TO_DNS };

INLINE int port_in(const __u8 *bitmap, __u16 port) {
    return (bitmap[(port >> 3) & (PORT_BITMAP_BYTES - 1)] >> (port & 7)) & 1;
}

INLINE int cidr_match(const struct flow *f, __u32 family, const __u32 *a) {
    for (int i = 0; i < MAX_CIDRS; i++) {
        if (i >= f->ncidrs)
            break;
        const struct cidr *c = &f->cidrs[i];
        if (c->family == family && (a[0] & c->mask[0]) == c->addr[0] && (a[1] & c->mask[1]) == c->addr[1] &&
            (a[2] & c->mask[2]) == c->addr[2] && (a[3] & c->mask[3]) == c->addr[3])
            return 1;
    }
    return 0;
}

INLINE int uid_excluded(const struct flow *f, __u8 proto, __u16 port, __u32 uid) {
    for (int i = 0; i < MAX_UID_RULES; i++) {
        if (i >= f->nuids)
            break;
        const struct uid_rule *r = &f->uids[i];
        if (!(r->protocols & proto) || uid < r->uid_first || uid > r->uid_last)
            continue;
        if (r->nports == 0)
            return 1;
        for (int j = 0; j < MAX_UID_PORT_RANGES; j++) {
            if (j >= r->nports)
                break;
            if (port >= r->ports[j].first && port <= r->ports[j].last)
                return 1;
        }
    }
    return 0;
}

INLINE int is_v4_loopback(__u32 a) { return (a & 0xff) == 127; }

INLINE int is_v6_loopback(const __u32 *a) {
    return a[0] == 0 && a[1] == 0 && a[2] == 0 && (a[3] == bswap32(1) || a[3] == bswap32(6));
}

// Whether a destination is routed over the pod's loopback: loopback, or one of the
// pod's own addresses (what `-o lo` means in the iptables rules).
INLINE int is_local(__u64 netns, __u32 family, const __u32 *a) {
    if (family == AF_INET ? is_v4_loopback(a[0]) : is_v6_loopback(a))
        return 1;
    struct addr_key k = {.family = family, .addr = {a[0], a[1], a[2], a[3]}};
    __u64 *owner = bpf_map_lookup_elem(&kmc_addrs, &k);
    return owner && *owner == netns;
}

INLINE int is_localhost(__u32 family, const __u32 *a) {
    return family == AF_INET ? a[0] == LOOPBACK4 : (a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == bswap32(1));
}

INLINE int is_passthrough(__u32 family, const __u32 *a) {
    return family == AF_INET ? a[0] == PASSTHROUGH4 : (a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == bswap32(6));
}

// The iptables OUTPUT and KUMA_MESH_OUTBOUND chains, for one TCP connect.
INLINE enum verdict outbound_tcp(const struct pod *p, __u64 netns, __u32 family, const __u32 *dst, __u16 dport,
                                 const __u32 *src, __u32 uid) {
    const struct flow *out = &p->out;
    if (uid_excluded(out, PROTO_TCP, dport, uid) || cidr_match(out, family, dst))
        return PASS;
    if ((p->flags & POD_DNS) && dport == 53 && uid != p->uid)
        return PASS;
    if (!out->enabled)
        return PASS;
    if (!out->has_include && port_in(out->exclude, dport))
        return PASS;
    int local = is_local(netns, family, dst);
    if (local && is_passthrough(family, src))
        return PASS;
    if (local && uid == p->uid && !is_localhost(family, dst))
        return TO_INBOUND;
    if (local || uid == p->uid || is_localhost(family, dst))
        return PASS;
    if (out->has_include && !port_in(out->include, dport))
        return PASS;
    return TO_OUTBOUND;
}

// The DNS rules, for one UDP datagram or connect.
INLINE enum verdict outbound_udp(const struct pod *p, __u32 family, const __u32 *dst, __u16 dport, __u32 uid) {
    if (!(p->flags & POD_DNS) || dport != 53)
        return PASS;
    if (uid_excluded(&p->out, PROTO_UDP, dport, uid) || cidr_match(&p->out, family, dst) || uid == p->uid)
        return PASS;
    return TO_DNS;
}

INLINE const struct pod *registered(void *ctx, __u64 *netns, __u8 family_flag) {
    *netns = bpf_get_netns_cookie(ctx);
    const struct pod *p = bpf_map_lookup_elem(&kmc_pods, netns);
    return p && (p->flags & family_flag) ? p : 0;
}

INLINE void remember(void *ctx, __u32 family, const __u32 *dst, __u16 dport) {
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct orig o = {.addr = {dst[0], dst[1], dst[2], dst[3]}, .port = dport, .family = family};
    bpf_map_update_elem(&kmc_sockets, &cookie, &o, BPF_ANY);
}

INLINE enum verdict decide(struct bpf_sock_addr *ctx, const struct pod *p, __u64 netns, __u32 family,
                           const __u32 *dst, __u16 dport) {
    __u32 uid = (__u32)bpf_get_current_uid_gid();
    if (ctx->protocol == IPPROTO_UDP)
        return outbound_udp(p, family, dst, dport, uid);
    if (ctx->protocol != IPPROTO_TCP)
        return PASS;
    struct bpf_sock *sk = ctx->sk;
    __u32 src[4] = {0, 0, 0, 0};
    if (sk) {
        if (family == AF_INET) {
            src[0] = sk->src_ip4;
        } else {
            src[0] = sk->src_ip6[0];
            src[1] = sk->src_ip6[1];
            src[2] = sk->src_ip6[2];
            src[3] = sk->src_ip6[3];
        }
    }
    return outbound_tcp(p, netns, family, dst, dport, src, uid);
}

INLINE __u16 target_port(const struct pod *p, enum verdict v) {
    return v == TO_OUTBOUND ? p->out.port : v == TO_INBOUND ? p->in.port : p->dns_port;
}

INLINE int redirect4(struct bpf_sock_addr *ctx) {
    __u64 netns;
    const struct pod *p = registered(ctx, &netns, POD_IPV4);
    if (!p)
        return 1;
    __u32 dst[4] = {ctx->user_ip4, 0, 0, 0};
    __u16 dport = bswap16((__u16)ctx->user_port);
    enum verdict v = decide(ctx, p, netns, AF_INET, dst, dport);
    if (v == PASS)
        return 1;
    remember(ctx, AF_INET, dst, dport);
    ctx->user_ip4 = LOOPBACK4;
    ctx->user_port = bswap16(target_port(p, v));
    return 1;
}

INLINE int redirect6(struct bpf_sock_addr *ctx) {
    __u64 netns;
    const struct pod *p = registered(ctx, &netns, POD_IPV6);
    if (!p)
        return 1;
    __u32 dst[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]};
    __u16 dport = bswap16((__u16)ctx->user_port);
    enum verdict v = decide(ctx, p, netns, AF_INET6, dst, dport);
    if (v == PASS)
        return 1;
    remember(ctx, AF_INET6, dst, dport);
    ctx->user_ip6[0] = 0;
    ctx->user_ip6[1] = 0;
    ctx->user_ip6[2] = 0;
    ctx->user_ip6[3] = bswap32(1);
    ctx->user_port = bswap16(target_port(p, v));
    return 1;
}

SEC("cgroup/connect4")
int kmc_connect4(struct bpf_sock_addr *ctx) { return redirect4(ctx); }

SEC("cgroup/connect6")
int kmc_connect6(struct bpf_sock_addr *ctx) { return redirect6(ctx); }

SEC("cgroup/sendmsg4")
int kmc_sendmsg4(struct bpf_sock_addr *ctx) { return redirect4(ctx); }

SEC("cgroup/sendmsg6")
int kmc_sendmsg6(struct bpf_sock_addr *ctx) { return redirect6(ctx); }

// A DNS answer from the DNS proxy shows the server the query was sent to.
INLINE int restore_source(struct bpf_sock_addr *ctx, __u32 family) {
    __u64 netns;
    const struct pod *p = registered(ctx, &netns, family == AF_INET ? POD_IPV4 : POD_IPV6);
    if (!p || !(p->flags & POD_DNS) || bswap16((__u16)ctx->user_port) != p->dns_port)
        return 1;
    if (family == AF_INET ? ctx->user_ip4 != LOOPBACK4
                          : (ctx->user_ip6[0] | ctx->user_ip6[1] | ctx->user_ip6[2]) != 0 ||
                                ctx->user_ip6[3] != bswap32(1))
        return 1;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct orig *o = bpf_map_lookup_elem(&kmc_sockets, &cookie);
    if (!o || o->family != family)
        return 1;
    if (family == AF_INET) {
        ctx->user_ip4 = o->addr[0];
    } else {
        ctx->user_ip6[0] = o->addr[0];
        ctx->user_ip6[1] = o->addr[1];
        ctx->user_ip6[2] = o->addr[2];
        ctx->user_ip6[3] = o->addr[3];
    }
    ctx->user_port = bswap16(o->port);
    return 1;
}

SEC("cgroup/recvmsg4")
int kmc_recvmsg4(struct bpf_sock_addr *ctx) { return restore_source(ctx, AF_INET); }

SEC("cgroup/recvmsg6")
int kmc_recvmsg6(struct bpf_sock_addr *ctx) { return restore_source(ctx, AF_INET6); }

INLINE void copy_addr(__u32 *to, __u32 family, __u32 ip4, const __u32 *ip6) {
    if (family == AF_INET) {
        to[0] = ip4;
    } else {
        to[0] = ip6[0];
        to[1] = ip6[1];
        to[2] = ip6[2];
        to[3] = ip6[3];
    }
}

// A redirected connection is established: remember its original destination by its
// 4-tuple, as the accepting side will see it. A registered pod's inbound listener
// starts listening: keep it for sk_lookup.
SEC("sockops")
int kmc_sockops(struct bpf_sock_ops *skops) {
    __u32 family = skops->family;
    if (family != AF_INET && family != AF_INET6)
        return 1;
    if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
        __u64 cookie = bpf_get_socket_cookie(skops);
        struct orig *o = bpf_map_lookup_elem(&kmc_sockets, &cookie);
        if (!o)
            return 1;
        struct pair_key k = {.netns = bpf_get_netns_cookie(skops), .family = family};
        __u32 l6[4] = {skops->local_ip6[0], skops->local_ip6[1], skops->local_ip6[2], skops->local_ip6[3]};
        __u32 r6[4] = {skops->remote_ip6[0], skops->remote_ip6[1], skops->remote_ip6[2], skops->remote_ip6[3]};
        copy_addr(k.client, family, skops->local_ip4, l6);
        copy_addr(k.server, family, skops->remote_ip4, r6);
        k.client_port = (__u16)skops->local_port;
        k.server_port = (__u16)bswap32(skops->remote_port);
        struct orig v = *o;
        bpf_map_update_elem(&kmc_pairs, &k, &v, BPF_ANY);
    } else if (skops->op == BPF_SOCK_OPS_TCP_LISTEN_CB) {
        __u64 netns = bpf_get_netns_cookie(skops);
        const struct pod *p = bpf_map_lookup_elem(&kmc_pods, &netns);
        if (!p || !p->in.enabled || skops->local_port != p->in.port)
            return 1;
        struct listener_key k = {.netns = netns, .family = family};
        bpf_sock_hash_update(skops, &kmc_listeners, &k, BPF_ANY);
    }
    return 1;
}

// getsockopt(SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST) on an accepted connection that
// was redirected by connect: answered from the pairs map. One steered by sk_lookup
// kept its destination as its local address, which is then the answer.
SEC("cgroup/getsockopt")
int kmc_getsockopt(struct bpf_sockopt *ctx) {
    if (ctx->optname != SO_ORIGINAL_DST || ctx->retval == 0)
        return 1;
    __u32 family;
    if (ctx->level == SOL_IP)
        family = AF_INET;
    else if (ctx->level == SOL_IPV6)
        family = AF_INET6;
    else
        return 1;
    struct bpf_sock *sk = ctx->sk;
    if (!sk || sk->family != family)
        return 1;
    __u64 netns = bpf_get_netns_cookie(ctx);
    const struct pod *p = bpf_map_lookup_elem(&kmc_pods, &netns);
    if (!p)
        return 1;
    // Field by field, volatile: the verifier takes only direct loads from a socket.
    struct pair_key k = {.netns = netns, .family = family};
    if (family == AF_INET) {
        k.client[0] = READ(sk->dst_ip4);
        k.server[0] = READ(sk->src_ip4);
    } else {
        k.client[0] = READ(sk->dst_ip6[0]);
        k.client[1] = READ(sk->dst_ip6[1]);
        k.client[2] = READ(sk->dst_ip6[2]);
        k.client[3] = READ(sk->dst_ip6[3]);
        k.server[0] = READ(sk->src_ip6[0]);
        k.server[1] = READ(sk->src_ip6[1]);
        k.server[2] = READ(sk->src_ip6[2]);
        k.server[3] = READ(sk->src_ip6[3]);
    }
    k.client_port = bswap16((__u16)READ(sk->dst_port));
    k.server_port = (__u16)READ(sk->src_port);
    struct orig local = {.addr = {k.server[0], k.server[1], k.server[2], k.server[3]},
                         .port = k.server_port,
                         .family = family};
    struct orig *o = bpf_map_lookup_elem(&kmc_pairs, &k);
    if (!o) {
        // Steered by sk_lookup: accepted on the inbound listener with another local port.
        if (!p->in.enabled || k.server_port == p->in.port)
            return 1;
        struct addr_key a = {.family = family, .addr = {local.addr[0], local.addr[1], local.addr[2], local.addr[3]}};
        __u64 *owner = bpf_map_lookup_elem(&kmc_addrs, &a);
        if (!owner || *owner != netns)
            return 1;
        o = &local;
    }
    if (family == AF_INET) {
        struct sockaddr_in_ {
            __u16 family;
            __u16 port;
            __u32 addr;
            __u8 zero[8];
        } *sin = ctx->optval;
        if ((void *)(sin + 1) > ctx->optval_end)
            return 1;
        sin->family = AF_INET;
        sin->port = bswap16(o->port);
        sin->addr = o->addr[0];
        __builtin_memset(sin->zero, 0, sizeof(sin->zero));
        ctx->optlen = sizeof(*sin);
    } else {
        struct sockaddr_in6_ {
            __u16 family;
            __u16 port;
            __u32 flowinfo;
            __u32 addr[4];
            __u32 scope_id;
        } *sin6 = ctx->optval;
        if ((void *)(sin6 + 1) > ctx->optval_end)
            return 1;
        sin6->family = AF_INET6;
        sin6->port = bswap16(o->port);
        sin6->flowinfo = 0;
        sin6->addr[0] = o->addr[0];
        sin6->addr[1] = o->addr[1];
        sin6->addr[2] = o->addr[2];
        sin6->addr[3] = o->addr[3];
        sin6->scope_id = 0;
        ctx->optlen = sizeof(*sin6);
    }
    ctx->retval = 0;
    return 1;
}

// Inbound TCP to a registered pod's address goes to the pod's inbound listener (the
// iptables KUMA_MESH_INBOUND chain). Traffic from the pod to itself is left to connect.
SEC("sk_lookup")
int kmc_sk_lookup(struct bpf_sk_lookup *ctx) {
    __u32 family = ctx->family;
    if (ctx->protocol != IPPROTO_TCP || (family != AF_INET && family != AF_INET6))
        return SK_PASS;
    struct addr_key a = {.family = family};
    __u32 l6[4] = {ctx->local_ip6[0], ctx->local_ip6[1], ctx->local_ip6[2], ctx->local_ip6[3]};
    __u32 r6[4] = {ctx->remote_ip6[0], ctx->remote_ip6[1], ctx->remote_ip6[2], ctx->remote_ip6[3]};
    __u32 remote[4] = {0, 0, 0, 0};
    copy_addr(a.addr, family, ctx->local_ip4, l6);
    copy_addr(remote, family, ctx->remote_ip4, r6);
    __u64 *netns = bpf_map_lookup_elem(&kmc_addrs, &a);
    if (!netns)
        return SK_PASS;
    __u64 ns = *netns;
    const struct pod *p = bpf_map_lookup_elem(&kmc_pods, &ns);
    if (!p || !p->in.enabled || !(p->flags & (family == AF_INET ? POD_IPV4 : POD_IPV6)))
        return SK_PASS;
    __u16 port = (__u16)ctx->local_port;
    if (port == p->in.port || is_local(ns, family, remote) || cidr_match(&p->in, family, remote))
        return SK_PASS;
    if (p->in.has_include ? !port_in(p->in.include, port) : port_in(p->in.exclude, port))
        return SK_PASS;
    struct listener_key k = {.netns = ns, .family = family};
    struct bpf_sock *sk = bpf_map_lookup_elem(&kmc_listeners, &k);
    if (!sk && family == AF_INET) {
        k.family = AF_INET6; // a dual-stack listener takes IPv4 too
        sk = bpf_map_lookup_elem(&kmc_listeners, &k);
    }
    if (!sk)
        return SK_DROP; // no listener yet: never let inbound bypass the sidecar
    long err = bpf_sk_assign(ctx, sk, 0);
    bpf_sk_release(sk);
    return err ? SK_DROP : SK_PASS;
}

char _license[] SEC("license") = "Dual MIT/GPL";
