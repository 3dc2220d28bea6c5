//! Host integration over netlink (`rtnetlink`, not by running `ip`): finding the underlay
//! interface, its addresses and MTU; giving the TUN device its address and the route for the
//! whole overlay network; writing `subnet.env` atomically.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use futures_util::TryStreamExt;
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, Prop};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::dataplane::worker::SEGMENTS;

/// The underlay interface: where datagrams to peers leave.
#[derive(Clone, Debug)]
pub struct Underlay {
    /// Interface name.
    pub name: String,
    /// Interface index.
    pub index: u32,
    /// Its MTU.
    pub mtu: u32,
    /// The IPv4 address that chose it (`--iface ADDRESS`, a pattern, a route's source), else
    /// its first.
    pub ipv4: Option<Ipv4Addr>,
    /// The IPv6 address that chose it, else its first global one that is not temporary,
    /// deprecated or DAD-failed (and, among those, not tentative when another is not).
    pub ipv6: Option<Ipv6Addr>,
    /// The interface's IPv6 addresses the kernel does not yet or never sends from (usually
    /// none): duplicate address detection still runs on them, or found another node on the
    /// link claiming them.
    pub dad_v6: Vec<(Ipv6Addr, Dad)>,
}

impl Underlay {
    /// Where duplicate address detection stands on the interface's address `a`, if it keeps
    /// the kernel from sending from it (`None` too for an address not on the interface).
    pub fn dad(&self, a: Ipv6Addr) -> Option<Dad> {
        dad_in(&self.dad_v6, a)
    }

    /// [`Underlay::dad`] of `ipv6`.
    pub fn ipv6_dad(&self) -> Option<Dad> {
        self.ipv6.and_then(|a| self.dad(a))
    }
}

/// Where duplicate address detection stands on an IPv6 address the kernel will not send from
/// yet (or ever).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dad {
    /// Still tentative: detection runs (a second or so; `dad_transmits` probes, each
    /// `retrans_time_ms` apart). Optimistic addresses (RFC 4429), usable meanwhile, are not.
    Tentative,
    /// Detection found another node on the link claiming the address (IFA_F_DADFAILED; the
    /// kernel keeps only addresses without a lifetime, those added by hand, in this state, and
    /// deletes SLAAC and DHCPv6 ones).
    Failed,
}

impl std::fmt::Display for Dad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dad::Tentative => "is still tentative (duplicate address detection has not finished)",
            Dad::Failed => {
                "failed duplicate address detection (another node on the link claims it)"
            }
        })
    }
}

struct Link {
    name: String,
    /// Its alternative names (`ip link property add … altname`; systemd gives interfaces their
    /// path-based names this way), which `--iface NAME` matches too, as `ip link` does.
    altnames: Vec<String>,
    index: u32,
    /// Administratively up.
    up: bool,
    mtu: u32,
    gso_max_segs: Option<u32>,
    addrs: Vec<IpAddr>,
    /// Its IPv6 addresses that make a poor identity for the host: temporary (privacy, gone
    /// within days), deprecated, or refused by duplicate address detection.
    poor_v6: Vec<Ipv6Addr>,
    /// Its IPv6 addresses the kernel will not send from (yet): see [`Dad`].
    dad_v6: Vec<(Ipv6Addr, Dad)>,
}

/// Every address of every interface of this host.
pub async fn local_addresses(handle: &Handle) -> Result<Vec<IpAddr>> {
    Ok(links(handle)
        .await?
        .into_iter()
        .flat_map(|l| l.addrs)
        .collect())
}

/// Which of `wanted` are on some interface of this host: one address dump, no device one (the
/// underlay check runs every 5 s, or every second for a while when a new IPv6 address is
/// still tentative, on hosts that may have a veth per container). An IPv6 address that failed
/// duplicate address detection does not count: the kernel sends nothing from it. (Detection
/// runs again on an address already there only when the link comes up again with
/// `keep_addr_on_down` set; by default a link going down takes IPv6 addresses.)
pub async fn present_addresses(handle: &Handle, wanted: &[IpAddr]) -> Result<Vec<IpAddr>> {
    let mut found = Vec::new();
    let mut stream = handle.address().get().execute();
    while let Some(msg) = stream
        .try_next()
        .await
        .context("netlink: listing addresses")?
    {
        if msg.header.family == AddressFamily::Inet6 && dad_state(&msg) == Some(Dad::Failed) {
            continue;
        }
        for attr in &msg.attributes {
            if let AddressAttribute::Address(ip) | AddressAttribute::Local(ip) = attr
                && wanted.contains(ip)
                && !found.contains(ip)
            {
                found.push(*ip);
            }
        }
    }
    Ok(found)
}

/// The index of the device named `name` (the TUN device, which may have been deleted).
async fn link_index(handle: &Handle, name: &str) -> Result<u32> {
    link_named(handle, name)
        .await?
        .map(|l| l.index)
        .ok_or_else(|| anyhow!("the device {name} has vanished"))
}

/// Whether a network device named `name` exists.
pub async fn link_exists(handle: &Handle, name: &str) -> Result<bool> {
    Ok(link_named(handle, name).await?.is_some())
}

/// A netlink connection (its task runs on the current tokio runtime).
pub fn connect() -> Result<Handle> {
    let (conn, handle, _) =
        rtnetlink::new_connection().context("cannot open a netlink socket (are you root?)")?;
    tokio::spawn(conn);
    Ok(handle)
}

/// A second netlink connection, for the TUN check's route dumps, with strict checking
/// (`NETLINK_GET_STRICT_CHK`, Linux 4.20): the kernel then sends only the main table's routes
/// out of the TUN device, where a plain dump sends every route of every table (a router's full
/// table: hundreds of thousands, every 5 s). `None` where the kernel refuses strict checking;
/// the whole dump is then read and filtered here, as with the other connection.
pub fn connect_strict() -> Option<Handle> {
    match rtnetlink::new_connection_with_strict_check() {
        Ok((conn, handle, _)) => {
            tokio::spawn(conn);
            Some(handle)
        }
        Err(e) => {
            tracing::debug!(error = %e, "no strict netlink checking; the TUN check reads every route");
            None
        }
    }
}

/// Every device of this host, with its addresses.
async fn links(handle: &Handle) -> Result<Vec<Link>> {
    read_links(handle, None).await
}

/// The device named `name`, if there is one, with its addresses: the kernel answers with that
/// device alone, where a dump parses every device (the TUN check runs every 5 s, on hosts that
/// may have a veth per container).
async fn link_named(handle: &Handle, name: &str) -> Result<Option<Link>> {
    Ok(read_links(handle, Some(name)).await?.pop())
}

/// The devices (only the one named `name`, when given) and their addresses.
async fn read_links(handle: &Handle, name: Option<&str>) -> Result<Vec<Link>> {
    let mut out = Vec::new();
    let mut request = handle.link().get();
    if let Some(name) = name {
        request = request.match_name(name);
    }
    let mut stream = request.execute();
    loop {
        let msg = match stream.try_next().await {
            Ok(Some(msg)) => msg,
            Ok(None) => break,
            // No device of that name.
            Err(rtnetlink::Error::NetlinkError(e))
                if name.is_some() && e.raw_code() == -libc::ENODEV =>
            {
                break;
            }
            Err(e) => return Err(e).context("netlink: listing links"),
        };
        let mut ifname = String::new();
        let mut altnames = Vec::new();
        let mut mtu = 1500;
        let mut gso_max_segs = None;
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => ifname = n,
                LinkAttribute::PropList(props) => {
                    altnames.extend(props.into_iter().filter_map(|p| match p {
                        Prop::AltIfName(n) => Some(n),
                        _ => None,
                    }));
                }
                LinkAttribute::Mtu(m) => mtu = m,
                LinkAttribute::GsoMaxSegs(n) => gso_max_segs = Some(n),
                _ => {}
            }
        }
        out.push(Link {
            name: ifname,
            altnames,
            index: msg.header.index,
            up: msg.header.flags.contains(LinkFlags::Up),
            mtu,
            gso_max_segs,
            addrs: Vec::new(),
            poor_v6: Vec::new(),
            dad_v6: Vec::new(),
        });
    }
    let mut request = handle.address().get();
    match (name, out.first()) {
        (Some(_), None) => return Ok(out),
        (Some(_), Some(link)) => request = request.set_link_index_filter(link.index),
        (None, _) => {}
    }
    let mut stream = request.execute();
    while let Some(msg) = stream
        .try_next()
        .await
        .context("netlink: listing addresses")?
    {
        let index = msg.header.index;
        let addr = own_address(&msg);
        if let (Some(link), Some(addr)) = (out.iter_mut().find(|l| l.index == index), addr) {
            link.addrs.push(addr);
            if let IpAddr::V6(v6) = addr {
                if is_poor_identity(&msg) {
                    link.poor_v6.push(v6);
                }
                if let Some(dad) = dad_state(&msg) {
                    link.dad_v6.push((v6, dad));
                }
            }
        }
    }
    Ok(out)
}

/// The main routing table's number.
const MAIN_TABLE: u32 = 254;

/// The table a route is in (the attribute holds numbers above 255).
fn route_table(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

/// A route's metric (0 when it has none).
fn route_metric(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Priority(m) => Some(*m),
            _ => None,
        })
        .unwrap_or(0)
}

async fn default_route_index(handle: &Handle) -> Result<Option<u32>> {
    // IPv4's, else IPv6's (a host with an IPv6-only underlay), as flannel looks.
    for query in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let mut stream = handle.route().get(query).execute();
        let mut routes = Vec::new();
        while let Some(msg) = stream.try_next().await.context("netlink: listing routes")? {
            routes.push(msg);
        }
        if let Some(index) = default_route_of(&routes) {
            return Ok(Some(index));
        }
    }
    Ok(None)
}

/// The interface of the main table's default route with the lowest metric, as flannel picks
/// it: a default route in another table (wg-quick's or Tailscale's policy routing) is not the
/// host's way out, and the dump lists those tables first.
///
/// Only unicast routes: an `unreachable` or `blackhole` default (hardened images, BGP set-ups)
/// names `lo`. An ECMP default names its interfaces in its next hops: the first is taken.
fn default_route_of(routes: &[RouteMessage]) -> Option<u32> {
    routes
        .iter()
        .filter(|m| {
            m.header.destination_prefix_length == 0
                && route_table(m) == MAIN_TABLE
                && m.header.kind == RouteType::Unicast
        })
        .filter_map(|m| Some((route_metric(m), output_interface(&m.attributes)?)))
        .min_by_key(|(metric, _)| *metric)
        .map(|(_, oif)| oif)
}

/// The route's interface, or its first next hop's for a multipath route.
fn output_interface(attrs: &[RouteAttribute]) -> Option<u32> {
    attrs.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        RouteAttribute::MultiPath(hops) => hops.first().map(|h| h.interface_index),
        _ => None,
    })
}

/// An address's flags: its IFA_FLAGS, else the header's (which holds only the low 8 bits).
fn address_flags(msg: &AddressMessage) -> AddressFlags {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            AddressAttribute::Flags(f) => Some(*f),
            _ => None,
        })
        .unwrap_or_else(|| AddressFlags::from_bits_retain(u32::from(msg.header.flags.bits())))
}

/// Whether an IPv6 address is temporary (IFA_F_TEMPORARY, which is IFA_F_SECONDARY's bit),
/// deprecated or DAD-failed.
fn is_poor_identity(msg: &AddressMessage) -> bool {
    address_flags(msg)
        .intersects(AddressFlags::Secondary | AddressFlags::Deprecated | AddressFlags::Dadfailed)
}

/// Where duplicate address detection keeps the kernel from sending from an address: failed
/// (the kernel keeps IFA_F_TENTATIVE set with it), or tentative and not optimistic.
fn dad_state(msg: &AddressMessage) -> Option<Dad> {
    let flags = address_flags(msg);
    if flags.contains(AddressFlags::Dadfailed) {
        Some(Dad::Failed)
    } else if flags.contains(AddressFlags::Tentative) && !flags.contains(AddressFlags::Optimistic) {
        Some(Dad::Tentative)
    } else {
        None
    }
}

fn usable_v6(a: &Ipv6Addr) -> bool {
    !a.is_loopback() && !a.is_unicast_link_local() && !a.is_unspecified()
}

/// An address a peer could send to: not loopback, unspecified, multicast or (IPv6) link-local.
fn advertisable(a: &IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_unspecified() && !v4.is_multicast(),
        IpAddr::V6(v6) => usable_v6(v6) && !v6.is_multicast(),
    }
}

/// Whether a link has an address to advertise: flannel moves on to the next `-iface` or
/// pattern when the one it found has none.
fn has_advertisable(link: &Link) -> bool {
    link.addrs.iter().any(advertisable)
}

/// How the operator named the underlay interface: flannel's `-iface` (names or addresses),
/// `-iface-regex` and `-iface-can-reach`, checked in that order.
#[derive(Clone, Debug, Default)]
pub struct InterfaceChoice {
    /// Names or addresses; the first that exists wins.
    pub iface: Vec<String>,
    /// Patterns matched (unanchored, as Go's `regexp.MatchString`) against every interface's
    /// addresses first, then against the names; the first pattern that matches anything wins.
    pub regex: Vec<regex_lite::Regex>,
    /// The interface the route to this address leaves through, with the route's source address.
    pub can_reach: Option<IpAddr>,
}

impl InterfaceChoice {
    /// Whether no interface was named (the default choice).
    pub fn is_empty(&self) -> bool {
        self.iface.is_empty() && self.regex.is_empty() && self.can_reach.is_none()
    }

    /// What was asked for, for error messages.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.iface.is_empty() {
            parts.push(format!("--iface {}", self.iface.join(",")));
        }
        for r in &self.regex {
            parts.push(format!("--iface-regex {:?}", r.as_str()));
        }
        if let Some(ip) = self.can_reach {
            parts.push(format!("--iface-can-reach {ip}"));
        }
        parts.join(", ")
    }
}

/// An interface and, when the choice named one, the address to use on it.
type Picked<'a> = (&'a Link, Option<IpAddr>);

/// Finds the underlay interface as flannel does: when any of `choice` is given, the first
/// `--iface` (name or address) that exists, else the first `--iface-regex` that matches an
/// address or a name, else the interface of the route to `--iface-can-reach`; none matching is
/// an error. As in flannel, an interface without an address to advertise does not count as a
/// match, and patterns are matched against advertisable addresses only (never 127.0.0.1).
/// Without them: the one holding `public_ip` (not loopback); else the main table's default
/// route's (IPv4, else IPv6); else the only interface with an address a peer could use. An
/// address that picked the interface (`--iface 198.18.0.9`, a regex matching it, the route's
/// source) is the one advertised, as in flannel; otherwise the interface's first (for IPv6, the
/// first lasting one).
pub async fn discover_underlay(
    handle: &Handle,
    choice: &InterfaceChoice,
    public_ip: Option<Ipv4Addr>,
    public_ipv6: Option<Ipv6Addr>,
    leased: &(dyn Fn(IpAddr) -> bool + Sync),
) -> Result<Underlay> {
    let links = links(handle).await?;
    // Only addresses a peer could use count: every interface with IPv6 on has a link-local
    // one, so counting those would leave no "only interface" on most hosts.
    // Nor, while others remain, do addresses in subnets the overlay leases: another linen's
    // TUN device, or a container bridge on this host's subnet (cni0, docker0), which would
    // otherwise make a host that started fine fail on its next start. (An underlay inside
    // `Network` but outside SubnetMin..SubnetMax, as in flannel's docs, still counts.)
    let usable: Vec<&Link> = links
        .iter()
        .filter(|l| l.name != "lo" && has_advertisable(l))
        .collect();
    let outside: Vec<&Link> = usable
        .iter()
        .copied()
        .filter(|l| l.addrs.iter().any(|a| advertisable(a) && !leased(*a)))
        .collect();
    let candidates = if outside.is_empty() { usable } else { outside };
    let (pick, matched): Picked<'_> = if !choice.is_empty() {
        let mut why = "no interface with an address peers could use matches (lo and IPv6 \
                       link-local addresses do not count; a node address kept on lo is \
                       advertised with --public-ip)"
            .to_owned();
        let mut picked = pick_by_name_or_regex(&links, choice);
        if let (None, Some(ip)) = (picked, choice.can_reach) {
            match route_to(handle, ip).await? {
                Some((index, src)) => {
                    picked = links
                        .iter()
                        .find(|l| l.index == index && has_advertisable(l))
                        .map(|l| (l, route_source(l, src)));
                    if picked.is_none() {
                        why = format!(
                            "the route to {ip} leaves through no interface with an address"
                        );
                    }
                }
                None => why = format!("there is no route to {ip}"),
            }
        }
        // A runtime failure (exit 1), as in flannel, not bad flags: at boot the interface, its
        // address or the route may come a little later, and a supervisor's restart finds them.
        picked.ok_or_else(|| {
            anyhow!(
                "{}: {why}; interfaces here: {}",
                choice.describe(),
                names_and_addresses(&links)
            )
        })?
    } else if let Some(l) = links.iter().find(|l| {
        // Not loopback: a node address kept on `lo` (routed setups, anycast) is advertised,
        // but datagrams leave through a real interface, whose MTU the overlay's must fit.
        l.name != "lo"
            && (public_ip.is_some_and(|ip| l.addrs.contains(&IpAddr::V4(ip)))
                || public_ipv6.is_some_and(|ip| l.addrs.contains(&IpAddr::V6(ip))))
    }) {
        (l, None)
    } else if let Some(l) = default_route_index(handle)
        .await?
        .and_then(|idx| candidates.iter().find(|l| l.index == idx))
    {
        // A default route through an interface without an address to advertise (or lo) is
        // no way to peers: then the only candidate, as without a default route.
        (l, None)
    } else if candidates.len() == 1 {
        (candidates[0], None)
    } else {
        bail!(
            "cannot tell which interface is the underlay (no default route, and {} interfaces \
             with addresses peers could use, those in leased overlay subnets left out: {}); pass \
             --iface NAME or --iface ADDRESS",
            candidates.len(),
            names_and_addresses(candidates.iter().copied())
        );
    };
    let ipv4 = match matched {
        Some(IpAddr::V4(v4)) => Some(v4),
        _ => first_v4(pick),
    };
    let ipv6 = match matched {
        Some(IpAddr::V6(v6)) if usable_v6(&v6) => Some(v6),
        _ => first_v6(pick),
    };
    Ok(underlay_of(pick, ipv4, ipv6))
}

/// The interface named `name` as the underlay with its addresses now, as
/// [`discover_underlay`] would give it when it picked it without an address: `None` when
/// there is no such interface.
pub async fn underlay_named(handle: &Handle, name: &str) -> Result<Option<Underlay>> {
    Ok(links(handle)
        .await?
        .into_iter()
        .find(|l| l.name == name)
        .map(|l| underlay_of(&l, first_v4(&l), first_v6(&l))))
}

/// The address a route's source `src` gives the interface `link` it leaves through: the
/// source, unless it is an IPv6 address that makes a poor identity (a temporary one, which the
/// kernel prefers as a source with `use_tempaddr=2`, or a deprecated one): then none, so that
/// the interface's first lasting address is advertised, as without `--iface-can-reach`.
fn route_source(link: &Link, src: Option<IpAddr>) -> Option<IpAddr> {
    src.filter(|a| !matches!(a, IpAddr::V6(v6) if link.poor_v6.contains(v6)))
}

/// The interface's IPv4 address to advertise: the first that is not link-local, else the
/// first, as flannel's `GetInterfaceIP4Addr` chooses. A 169.254/16 address added while DHCP
/// was slow at boot (by dhcpcd, avahi-autoipd), listed before the DHCP one, would otherwise
/// be the host's identity, which peers cannot reach.
fn first_v4(link: &Link) -> Option<Ipv4Addr> {
    let v4 = || {
        link.addrs.iter().filter_map(|a| match a {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
    };
    v4().find(|a| !a.is_link_local()).or_else(|| v4().next())
}

/// The interface's IPv6 address to advertise: the first global one that is not temporary,
/// deprecated or DAD-failed (the kernel lists the newest first, so on a host with privacy
/// extensions the first is usually a temporary one), one past its duplicate address detection
/// first; else the first global one.
fn first_v6(link: &Link) -> Option<Ipv6Addr> {
    let global = || {
        link.addrs.iter().filter_map(|a| match a {
            IpAddr::V6(v6) if usable_v6(v6) => Some(*v6),
            _ => None,
        })
    };
    let lasting = || global().filter(|a| !link.poor_v6.contains(a));
    lasting()
        .find(|a| dad_in(&link.dad_v6, *a).is_none())
        .or_else(|| lasting().next())
        .or_else(|| global().next())
}

/// Where duplicate address detection stands on the address `a`, by the states of the
/// addresses it keeps the kernel from sending from (`None` for one not among them).
fn dad_in(states: &[(Ipv6Addr, Dad)], a: Ipv6Addr) -> Option<Dad> {
    states.iter().find(|(v6, _)| *v6 == a).map(|(_, d)| *d)
}

/// The underlay `link` with the addresses chosen on it.
fn underlay_of(link: &Link, ipv4: Option<Ipv4Addr>, ipv6: Option<Ipv6Addr>) -> Underlay {
    Underlay {
        name: link.name.clone(),
        index: link.index,
        mtu: link.mtu,
        ipv4,
        ipv6,
        dad_v6: link.dad_v6.clone(),
    }
}

/// `--iface` values in order (an address, or a name: the interface's or one of its alternative
/// names, as `ip link` takes them), then `--iface-regex` patterns in order (each against all
/// addresses, then all names; alternative names are left to `--iface`, as flannel, which knows
/// none, matches patterns against the names it has).
fn pick_by_name_or_regex<'a>(links: &'a [Link], choice: &InterfaceChoice) -> Option<Picked<'a>> {
    let usable = || links.iter().filter(|l| has_advertisable(l));
    let by_iface = choice
        .iface
        .iter()
        .find_map(|want| match want.parse::<IpAddr>() {
            // As with names, an address counts only where peers could use it, and not on lo:
            // a node address kept there is no underlay (datagrams leave through a real
            // interface, whose MTU the overlay's must fit); `--public-ip` advertises it.
            Ok(ip) => links
                .iter()
                .find(|l| l.name != "lo" && advertisable(&ip) && l.addrs.contains(&ip))
                .map(|l| (l, Some(ip))),
            Err(_) => usable()
                .find(|l| l.name == *want || l.altnames.contains(want))
                .map(|l| (l, None)),
        });
    by_iface.or_else(|| {
        choice.regex.iter().find_map(|re| {
            usable()
                .find_map(|l| {
                    let ip = l
                        .addrs
                        .iter()
                        .filter(|a| advertisable(a))
                        .find(|a| re.is_match(&a.to_string()))?;
                    Some((l, Some(*ip)))
                })
                .or_else(|| usable().find(|l| re.is_match(&l.name)).map(|l| (l, None)))
        })
    })
}

/// The output interface and preferred source of the main routing decision for `ip`
/// (`ip route get`), or `None` when there is no route.
async fn route_to(handle: &Handle, ip: IpAddr) -> Result<Option<(u32, Option<IpAddr>)>> {
    let msg = match ip {
        IpAddr::V4(v4) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(v4, 32)
            .build(),
        IpAddr::V6(v6) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(v6, 128)
            .build(),
    };
    let mut stream = handle.route().get(msg).execute();
    let reply = match stream.try_next().await {
        Ok(reply) => reply,
        // ENETUNREACH and the like: no route, which the caller reports with the interfaces.
        Err(rtnetlink::Error::NetlinkError(e)) => {
            tracing::debug!(%ip, error = %e, "no route for --iface-can-reach");
            None
        }
        Err(e) => return Err(e).context("netlink: looking up a route"),
    };
    Ok(reply.and_then(|msg| {
        let oif = output_interface(&msg.attributes)?;
        let src = msg.attributes.iter().find_map(|a| match a {
            RouteAttribute::PrefSource(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
            RouteAttribute::PrefSource(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
            _ => None,
        });
        Some((oif, src))
    }))
}

/// `eth0 altname enp0s3 [198.18.0.1, fd00::1], lo [127.0.0.1]`, for errors about the interface
/// choice.
fn names_and_addresses<'a>(links: impl IntoIterator<Item = &'a Link>) -> String {
    links
        .into_iter()
        .map(|l| {
            let addrs: Vec<String> = l.addrs.iter().map(IpAddr::to_string).collect();
            let alt: String = l.altnames.iter().map(|a| format!(" altname {a}")).collect();
            format!("{}{alt} [{}]", l.name, addrs.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Gives the TUN device its addresses (as /32 and /128, flannel's choice of the subnet's network
/// address), brings it up, and routes the whole overlay network(s) through it.
pub async fn configure_tun(
    handle: &Handle,
    tun_name: &str,
    mtu: u32,
    v4: Option<(Ipv4Addr, Ipv4Network)>,
    v6: Option<(Ipv6Addr, Ipv6Network)>,
) -> Result<()> {
    let index = link_index(handle, tun_name).await?;
    // A worker splits one offloaded TUN read into at most SEGMENTS packets. Without this cap a
    // TCP flow with an MSS under ~512 bytes would get super-packets of more segments, which a
    // worker must drop whole (and their retransmits too); with it the kernel builds smaller ones.
    let cap = LinkUnspec::new_with_index(index)
        .append_extra_attribute(LinkAttribute::GsoMaxSegs(SEGMENTS as u32))
        .build();
    let capped = match handle.link().set(cap).execute().await {
        Err(e) => Err(e.to_string()),
        // Read back: a kernel may take the attribute and ignore it.
        Ok(()) => match link_named(handle, tun_name).await? {
            Some(l) if l.gso_max_segs.is_some_and(|n| n > SEGMENTS as u32) => Err(format!(
                "the kernel kept gso_max_segs {}",
                l.gso_max_segs.unwrap_or_default()
            )),
            _ => Ok(()),
        },
    };
    if let Err(e) = capped {
        tracing::warn!(error = %e, device = %tun_name, "cannot cap the TUN device's gso_max_segs at {SEGMENTS}; TCP flows with an MSS under 512 bytes will stall (run with --no-offload if you have such flows)");
    }
    // No IPv6 link-local address (addr_gen_mode 1, "none"): the overlay uses its global
    // addresses, and with a link-local one the kernel sends router solicitations and MLD
    // reports into the TUN, which nobody can route (counted as no_route from the start).
    // Set while the device is down; absent when IPv6 is off, which needs nothing.
    let had_ipv6 = no_link_local(tun_name);
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
        .execute()
        .await
        .with_context(|| format!("netlink: bringing {tun_name} up"))?;
    // A device without IPv6 state (an MTU under 1280, set by hand) gets it back from the MTU
    // just set, with the default address mode: a link-local address is already there.
    if !had_ipv6 && no_link_local(tun_name) {
        remove_addresses(handle, index, tun_name, |ip| match ip {
            IpAddr::V6(a) => a.is_unicast_link_local(),
            IpAddr::V4(_) => false,
        })
        .await?;
    }
    if let Some((addr, network)) = v4 {
        add_address(handle, index, IpAddr::V4(addr), 32, tun_name).await?;
        // ICMP errors that linen writes into the TUN come from the TUN's own address; without
        // accept_local the kernel drops them as martians whenever the offending packet also came
        // from a local address (a ping from the host itself).
        let sysctl = format!("/proc/sys/net/ipv4/conf/{tun_name}/accept_local");
        if let Err(e) = std::fs::write(&sysctl, "1") {
            tracing::warn!(error = %e, path = %sysctl, "cannot enable accept_local; ICMP errors for locally sent packets may be dropped");
        }
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(network.network(), network.prefix())
            .output_interface(index)
            .pref_source(addr)
            .build();
        add_route(handle, route, IpNetwork::V4(network), tun_name).await?;
    }
    if let Some((addr, network)) = v6 {
        add_address(handle, index, IpAddr::V6(addr), 128, tun_name).await?;
        // No preferred source for IPv6: the kernel refuses one while the new address is still
        // tentative, and source selection picks the device's address anyway.
        let route = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(network.network(), network.prefix())
            .output_interface(index)
            .build();
        add_route(handle, route, IpNetwork::V6(network), tun_name).await?;
    }
    Ok(())
}

/// What [`configure_tun`] set up and is gone now (someone ran `ip link set linen0 down`, which
/// also takes its routes; flushed the routes or addresses; a network manager claimed the
/// device): a description of each missing piece, empty when all is in place. An error when the
/// device itself is gone or netlink cannot be read. Routes are listed through `strict` when
/// there is one (see [`connect_strict`]).
pub async fn tun_missing(
    handle: &Handle,
    strict: Option<&Handle>,
    tun_name: &str,
    mtu: u32,
    v4: Option<(Ipv4Addr, Ipv4Network)>,
    v6: Option<(Ipv6Addr, Ipv6Network)>,
) -> Result<Vec<String>> {
    let link = link_named(handle, tun_name)
        .await?
        .ok_or_else(|| anyhow!("the device {tun_name} has vanished"))?;
    let mut missing = Vec::new();
    if !link.up {
        missing.push(format!("{tun_name} is down"));
    }
    // A larger MTU set by hand lets the kernel hand the workers packets longer than their
    // buffers' stride, which they must drop; a smaller one fragments what need not be.
    if link.mtu != mtu {
        missing.push(format!("the MTU {mtu} (it is {})", link.mtu));
    }
    let wanted = [
        v4.map(|(a, n)| (IpAddr::V4(a), IpNetwork::V4(n))),
        v6.map(|(a, n)| (IpAddr::V6(a), IpNetwork::V6(n))),
    ];
    for (addr, net) in wanted.into_iter().flatten() {
        if !link.addrs.contains(&addr) {
            missing.push(format!("the address {addr}"));
        }
        if !routes_via(strict.unwrap_or(handle), strict.is_some(), net, link.index).await? {
            missing.push(format!("the route to {net}"));
        }
    }
    Ok(missing)
}

/// A dump request for every route of `net`'s family.
fn route_dump(net: IpNetwork) -> RouteMessage {
    match net {
        IpNetwork::V4(_) => RouteMessageBuilder::<Ipv4Addr>::new().build(),
        IpNetwork::V6(_) => RouteMessageBuilder::<Ipv6Addr>::new().build(),
    }
}

/// Whether the main table routes exactly `net` out of interface `index`. With `filtered` (a
/// connection with strict checking), the kernel sends only the main table's routes out of
/// `index`: the header's table (the builder's, main) and `RTA_OIF` filter; its protocol and
/// type, 0, filter nothing. What comes is checked here all the same.
async fn routes_via(handle: &Handle, filtered: bool, net: IpNetwork, index: u32) -> Result<bool> {
    let mut query = route_dump(net);
    if filtered {
        query.header.protocol = RouteProtocol::Unspec;
        query.header.kind = RouteType::Unspec;
        query.attributes.push(RouteAttribute::Oif(index));
    }
    let mut stream = handle.route().get(query).execute();
    let mut found = false;
    // The whole dump is read even once the route is found: each message of a dump left unread
    // is a warning from netlink-proto (no one to hand it to), and a router's full table made
    // hundreds of thousands of them with every check.
    while let Some(msg) = stream.try_next().await.context("netlink: listing routes")? {
        found = found
            || (route_table(&msg) == MAIN_TABLE
                && msg.header.destination_prefix_length == net.prefix()
                && route_matches(&msg.attributes, net)
                && output_interface(&msg.attributes) == Some(index));
    }
    Ok(found)
}

/// Moves the TUN device to a new lease's addresses: adds the new ones and re-points the overlay
/// routes at them (their preferred source is the host's source address for overlay traffic),
/// then removes every other address of the overlay networks from the device: the old lease's,
/// which belong to another host's subnet now, and any left by a move that failed half-way.
pub async fn readdress_tun(
    handle: &Handle,
    tun_name: &str,
    mtu: u32,
    v4: Option<(Ipv4Addr, Ipv4Network)>,
    v6: Option<(Ipv6Addr, Ipv6Network)>,
) -> Result<()> {
    configure_tun(handle, tun_name, mtu, v4, v6).await?;
    let index = link_index(handle, tun_name).await?;
    let stale = |ip: IpAddr| match ip {
        IpAddr::V4(a) => v4.is_some_and(|(ours, net)| net.contains(a) && a != ours),
        IpAddr::V6(a) => v6.is_some_and(|(ours, net)| net.contains(a) && a != ours),
    };
    remove_addresses(handle, index, tun_name, stale).await
}

/// Turns the IPv6 link-local address of `tun_name` off (`addr_gen_mode` 1, "none"); whether
/// the device has IPv6 state to set it in (not when IPv6 is off, or its MTU is under 1280).
fn no_link_local(tun_name: &str) -> bool {
    let gen_mode = format!("/proc/sys/net/ipv6/conf/{tun_name}/addr_gen_mode");
    match std::fs::write(&gen_mode, "1") {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            tracing::debug!(error = %e, path = %gen_mode, "cannot turn the TUN's link-local address off");
            true
        }
    }
}

/// The interface's own address in an address message: `IFA_LOCAL` when there is one (on a
/// point-to-point link, `ip addr add A peer B`, `IFA_ADDRESS` holds the far end B: a PPPoE or
/// LTE gateway advertised its provider's router), else `IFA_ADDRESS`.
fn own_address(msg: &AddressMessage) -> Option<IpAddr> {
    let mut address = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(ip) => return Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    address
}

/// Removes the addresses of device `index` that `unwanted` picks.
async fn remove_addresses(
    handle: &Handle,
    index: u32,
    tun_name: &str,
    unwanted: impl Fn(IpAddr) -> bool,
) -> Result<()> {
    let mut found = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    let mut old = Vec::new();
    while let Some(msg) = found
        .try_next()
        .await
        .with_context(|| format!("netlink: listing the addresses of {tun_name}"))?
    {
        if own_address(&msg).is_some_and(&unwanted) {
            old.push(msg);
        }
    }
    for msg in old {
        handle
            .address()
            .del(msg)
            .execute()
            .await
            .with_context(|| format!("netlink: removing an address from {tun_name}"))?;
    }
    Ok(())
}

async fn add_address(handle: &Handle, index: u32, ip: IpAddr, len: u8, dev: &str) -> Result<()> {
    match handle.address().add(index, ip, len).execute().await {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
        Err(e) => Err(anyhow!(e)).with_context(|| format!("netlink: adding {ip}/{len} to {dev}")),
    }
}

async fn add_route(
    handle: &Handle,
    route: netlink_packet_route::route::RouteMessage,
    net: IpNetwork,
    dev: &str,
) -> Result<()> {
    let ours = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    });
    // A replace takes the main table's route of the same metric: the kernel's default, 0 for
    // IPv4 and 1024 for IPv6, as linen sets none.
    let our_metric = if net.is_ipv4() { 0 } else { 1024 };
    if let Some((previous, metric)) = other_route(handle, net, ours).await {
        if metric == our_metric {
            // flannel keeps such a route and silently forwards nothing; linen takes it over.
            tracing::warn!(network = %net, previous = %previous, device = dev,
                "replacing an existing route for the overlay network, which pointed elsewhere");
        } else {
            tracing::warn!(network = %net, previous = %previous, metric, device = dev,
                "another route for the overlay network stays next to linen's (metric \
                 {our_metric}) and wins if its metric is lower; remove it if it is stale");
        }
    }
    match handle.route().add(route).replace().execute().await {
        Ok(()) => Ok(()),
        Err(e) => Err(anyhow!(e)).with_context(|| {
            format!("netlink: routing {net} via {dev} (another route for it may exist)")
        }),
    }
}

/// The device and metric of a main-table route for exactly `net` that does not go out of
/// interface `ours`, if there is one (best effort: for a warning, so listing errors count as
/// none).
async fn other_route(handle: &Handle, net: IpNetwork, ours: Option<u32>) -> Option<(String, u32)> {
    let mut stream = handle.route().get(route_dump(net)).execute();
    let mut found = None;
    // The whole dump is read (see [`routes_via`]).
    while let Ok(Some(msg)) = stream.try_next().await {
        if found.is_some()
            || route_table(&msg) != MAIN_TABLE
            || msg.header.destination_prefix_length != net.prefix()
            || !route_matches(&msg.attributes, net)
        {
            continue;
        }
        let oif = output_interface(&msg.attributes);
        if oif != ours {
            found = Some((oif, route_metric(&msg)));
        }
    }
    let (oif, metric) = found?;
    let Some(index) = oif else {
        let what = "no device (a blackhole, unreachable or multipath route)";
        return Some((what.to_owned(), metric));
    };
    let name = links(handle)
        .await
        .ok()
        .and_then(|ls| ls.into_iter().find(|l| l.index == index))
        .map_or_else(|| format!("interface {index}"), |l| l.name);
    Some((name, metric))
}

/// Whether a route's destination equals `net` (used by tests and cleanup checks).
pub fn route_matches(attrs: &[RouteAttribute], net: IpNetwork) -> bool {
    attrs.iter().any(|a| match (a, net) {
        (RouteAttribute::Destination(RouteAddress::Inet(d)), IpNetwork::V4(n)) => *d == n.network(),
        (RouteAttribute::Destination(RouteAddress::Inet6(d)), IpNetwork::V6(n)) => {
            *d == n.network()
        }
        _ => false,
    })
}

/// [`write_atomic`] on a blocking thread: the `fsync` may take long on a slow disk (an SD card
/// in a gateway), and the control plane's one runtime thread also renews the lease.
pub async fn write_atomic_off_thread(path: &Path, contents: String) -> Result<()> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || write_atomic(&path, &contents)).await?
}

/// Writes `contents` to `path` atomically ([`crate::files::write_atomic`]; flannel too writes
/// `.subnet.env` and renames it). Creates the directory if needed.
pub fn write_atomic(path: &Path, contents: &str) -> Result<()> {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::files::write_atomic(path, contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// The IPv6 MTU of interface `name` (`net.ipv6.conf.<name>.mtu`, which a router advertisement
/// may set below the link's), or `None` where it has none (IPv6 off on it).
pub fn ipv6_mtu(name: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{name}/mtu"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The running kernel's version (major, minor, patch), from `/proc/sys/kernel/osrelease`.
pub fn kernel_version() -> Option<(u32, u32, u32)> {
    parse_kernel_release(&std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?)
}

/// "6.1.0-26-amd64" → (6, 1, 0); "5.12" → (5, 12, 0); "7.1.4+" → (7, 1, 4). A release
/// candidate counts as the release it leads to ("7.1.0-rc3" → (7, 1, 0)).
fn parse_kernel_release(release: &str) -> Option<(u32, u32, u32)> {
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    let patch = parts.next().map_or(0, |p| {
        let digits = p.find(|c: char| !c.is_ascii_digit()).unwrap_or(p.len());
        p[..digits].parse().unwrap_or(0)
    });
    Some((major, minor, patch))
}

/// Whether this kernel is one whose UDP GSO can send corrupt datagrams: Linux 7.0.0 to 7.1.4
/// mangle UDP headers and checksums of segmented datagrams with some network drivers (the
/// regression of commit b10b446 in 7.0-rc1, fixed by 78effd8 and 5f17ae0; the range is the
/// one tailscale switches its workaround on for: tailscale#19777, PR #19918). Which drivers
/// cannot be told from here, so every host on such a kernel counts; a distribution kernel that
/// took the fixes into its 7.0.y is counted too (`--udp-gso on` for it).
pub fn udp_gso_may_corrupt(version: (u32, u32, u32)) -> bool {
    ((7, 0, 0)..=(7, 1, 4)).contains(&version)
}

/// Whether this process may administer the network (`CAP_NET_ADMIN` in its effective set,
/// from `/proc/self/status`); `None` when that cannot be read.
pub fn has_net_admin() -> Option<bool> {
    effective_has(
        &std::fs::read_to_string("/proc/self/status").ok()?,
        CAP_NET_ADMIN,
    )
}

/// The capability's bit number (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;

/// Whether the `CapEff:` line of a `/proc/<pid>/status` text has capability `bit`.
fn effective_has(status: &str, bit: u32) -> Option<bool> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    let caps = u64::from_str_radix(hex.trim(), 16).ok()?;
    Some(caps & (1 << bit) != 0)
}

#[cfg(test)]
pub(crate) mod test {
    use super::*;

    /// Runs `test` as root in a network namespace of its own thread (skipped otherwise), with
    /// a veth pair lt0–lt1 up there, a runner of `ip` commands that returns their output (`ip`
    /// runs in the thread's namespace, as a child takes its parent thread's) and a runtime.
    pub(crate) fn in_own_namespace(
        test: impl FnOnce(&dyn Fn(&str) -> String, &tokio::runtime::Runtime) + Send + 'static,
    ) {
        if crate::sys::effective_uid() != 0 {
            eprintln!("SKIPPED: needs root");
            return;
        }
        std::thread::spawn(|| {
            if let Err(e) = crate::sys::enter_new_network_namespace() {
                eprintln!("SKIPPED: cannot make a network namespace: {e}");
                return;
            }
            let ip = |args: &str| {
                let out = std::process::Command::new("ip")
                    .args(args.split(' '))
                    .output()
                    .unwrap();
                assert!(out.status.success(), "ip {args}: {out:?}");
                String::from_utf8_lossy(&out.stdout).into_owned()
            };
            ip("link add lt0 type veth peer name lt1");
            for dev in ["lo", "lt0", "lt1"] {
                ip(&format!("link set {dev} up"));
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            test(&ip, &runtime);
        })
        .join()
        .unwrap();
    }

    /// The TUN check's route listing, through the strict connection (the kernel filters by
    /// table and device) and the plain one (filtered here), finds the main table's route out of
    /// the device and no other: not one out of another device, nor one in another table.
    /// Root, in a network namespace of its own thread.
    #[test]
    fn the_route_to_the_network_is_found_out_of_its_device_only() {
        in_own_namespace(|ip, runtime| {
            ip("route add 198.19.0.0/16 dev lt0");
            ip("route add 198.19.0.0/16 dev lt1 table 100");
            ip("route add 198.20.0.0/16 dev lt1");
            ip("-6 route add fd00:19::/48 dev lt0");
            runtime.block_on(async {
                let nl = connect().unwrap();
                let strict = connect_strict().expect("strict checking (Linux 4.20)");
                let lt0 = link_named(&nl, "lt0").await.unwrap().unwrap().index;
                let lt1 = link_named(&nl, "lt1").await.unwrap().unwrap().index;
                let v4: IpNetwork = "198.19.0.0/16".parse().unwrap();
                let v6: IpNetwork = "fd00:19::/48".parse().unwrap();
                let other: IpNetwork = "198.20.0.0/16".parse().unwrap();
                for (handle, filtered) in [(&strict, true), (&nl, false)] {
                    let found = |net, dev| routes_via(handle, filtered, net, dev);
                    assert!(found(v4, lt0).await.unwrap(), "strict {filtered}");
                    assert!(found(v6, lt0).await.unwrap(), "strict {filtered}");
                    // Only in table 100 out of lt1; out of lt1, another network.
                    assert!(!found(v4, lt1).await.unwrap(), "strict {filtered}");
                    assert!(!found(v6, lt1).await.unwrap(), "strict {filtered}");
                    assert!(!found(other, lt0).await.unwrap(), "strict {filtered}");
                    assert!(found(other, lt1).await.unwrap(), "strict {filtered}");
                }
            });
        });
    }

    /// Duplicate address detection as the kernel reports it: an address another interface on
    /// the link holds fails, and is then neither present nor advertised while any other is;
    /// one still tentative is present, and advertised only when it is the one left. Root, in
    /// a network namespace of its own thread.
    #[test]
    fn addresses_held_back_by_duplicate_address_detection_are_told_apart() {
        in_own_namespace(|ip, runtime| {
            ip("-6 addr add fd00:18::7/64 dev lt1 nodad");
            ip("-6 addr add fd00:18::8/64 dev lt0 nodad");
            // Whatever a new namespace inherits: detection on, one probe.
            let conf = |key: &str, value: &str| {
                std::fs::write(format!("/proc/sys/net/ipv6/conf/lt0/{key}"), value).unwrap();
            };
            conf("accept_dad", "1");
            conf("dad_transmits", "1");
            // lt1 answers lt0's probe for its own address.
            ip("-6 addr add fd00:18::7/64 dev lt0");
            let failed = (0..100).any(|_| {
                std::thread::sleep(std::time::Duration::from_millis(100));
                ip("-6 -o addr show dev lt0").contains("dadfailed")
            });
            assert!(failed, "no DAD failure: {}", ip("-6 -o addr show dev lt0"));
            // Only lt0's, failed, is left.
            ip("-6 addr del fd00:18::7/64 dev lt1");
            // Fifty probes a second apart: tentative through the rest of the test.
            conf("dad_transmits", "50");
            ip("-6 addr add fd00:18::9/64 dev lt0");
            let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
            runtime.block_on(async {
                let nl = connect().unwrap();
                let all = ["fd00:18::7", "fd00:18::8", "fd00:18::9"].map(|a| IpAddr::V6(v6(a)));
                let mut present = present_addresses(&nl, &all).await.unwrap();
                present.sort();
                assert_eq!(present, all[1..]);
                let underlay = || async {
                    let u = underlay_named(&nl, "lt0").await.unwrap().unwrap();
                    (u.ipv6, u.ipv6_dad())
                };
                assert_eq!(underlay().await, (Some(v6("fd00:18::8")), None));
                ip("-6 addr del fd00:18::8/64 dev lt0");
                assert_eq!(
                    underlay().await,
                    (Some(v6("fd00:18::9")), Some(Dad::Tentative))
                );
                ip("-6 addr del fd00:18::9/64 dev lt0");
                assert_eq!(
                    underlay().await,
                    (Some(v6("fd00:18::7")), Some(Dad::Failed))
                );
            });
        });
    }

    /// On a point-to-point link the kernel gives the far end as `IFA_ADDRESS` and this host's
    /// address as `IFA_LOCAL`; elsewhere only `IFA_ADDRESS` (or both, equal).
    #[test]
    fn the_own_address_is_the_local_one() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let msg = |attrs: Vec<AddressAttribute>| {
            let mut m = AddressMessage::default();
            m.attributes = attrs;
            m
        };
        let ppp = msg(vec![
            AddressAttribute::Address(ip("198.18.0.1")),
            AddressAttribute::Local(ip("198.18.0.2")),
        ]);
        assert_eq!(own_address(&ppp), Some(ip("198.18.0.2")));
        let v6 = msg(vec![AddressAttribute::Address(ip("fd00:18::2"))]);
        assert_eq!(own_address(&v6), Some(ip("fd00:18::2")));
        assert_eq!(own_address(&msg(Vec::new())), None);
    }

    /// An up interface named eth0 with `addrs`, of which `poor_v6` make a poor identity.
    fn eth0(addrs: Vec<IpAddr>, poor_v6: Vec<Ipv6Addr>) -> Link {
        Link {
            name: "eth0".into(),
            altnames: Vec::new(),
            index: 2,
            up: true,
            mtu: 1500,
            gso_max_segs: None,
            addrs,
            poor_v6,
            dad_v6: Vec::new(),
        }
    }

    /// The kernel's flags tell tentative, optimistic and DAD-failed addresses apart, in the
    /// IFA_FLAGS attribute or, without one, in the header.
    #[test]
    fn duplicate_address_detection_is_read_from_the_flags() {
        let with = |flags: AddressFlags, attribute: bool| {
            let mut m = AddressMessage::default();
            if attribute {
                m.attributes.push(AddressAttribute::Flags(flags));
            } else {
                m.header.flags =
                    netlink_packet_route::address::AddressHeaderFlags::from_bits_retain(
                        u8::try_from(flags.bits()).unwrap(),
                    );
            }
            dad_state(&m)
        };
        for attribute in [true, false] {
            assert_eq!(with(AddressFlags::Permanent, attribute), None);
            assert_eq!(
                with(AddressFlags::Tentative, attribute),
                Some(Dad::Tentative)
            );
            assert_eq!(
                with(
                    AddressFlags::Tentative | AddressFlags::Optimistic,
                    attribute
                ),
                None
            );
            assert_eq!(
                with(AddressFlags::Tentative | AddressFlags::Dadfailed, attribute),
                Some(Dad::Failed)
            );
        }
    }

    /// An address past its detection is advertised before a newer one still tentative; one
    /// tentative address alone is taken, and the underlay says so.
    #[test]
    fn a_tentative_address_gives_way_to_a_ready_one() {
        let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        let mut link = eth0(
            vec![IpAddr::V6(v6("fd00:18::12")), IpAddr::V6(v6("fd00:18::2"))],
            Vec::new(),
        );
        link.dad_v6.push((v6("fd00:18::12"), Dad::Tentative));
        assert_eq!(first_v6(&link), Some(v6("fd00:18::2")));
        let underlay = underlay_of(&link, None, first_v6(&link));
        assert_eq!(underlay.ipv6_dad(), None);
        link.addrs.pop();
        assert_eq!(first_v6(&link), Some(v6("fd00:18::12")));
        let underlay = underlay_of(&link, None, first_v6(&link));
        assert_eq!(underlay.ipv6_dad(), Some(Dad::Tentative));
    }

    /// A link-local IPv4 address listed first gives way to another one; alone, it is taken.
    #[test]
    fn a_link_local_ipv4_address_gives_way_to_another() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let mut link = eth0(
            vec![ip("169.254.7.7"), ip("fd00:18::2"), ip("198.18.0.2")],
            Vec::new(),
        );
        assert_eq!(first_v4(&link), Some("198.18.0.2".parse().unwrap()));
        link.addrs.pop();
        assert_eq!(first_v4(&link), Some("169.254.7.7".parse().unwrap()));
        link.addrs.remove(0);
        assert_eq!(first_v4(&link), None);
    }

    #[test]
    fn a_temporary_route_source_gives_way_to_a_lasting_address() {
        let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        let link = eth0(
            // The kernel lists the newest first: the temporary address.
            vec![
                IpAddr::V6(v6("fd00:18::a1b2:c3d4")),
                IpAddr::V6(v6("fd00:18::2")),
                IpAddr::V4("198.18.0.2".parse().unwrap()),
            ],
            vec![v6("fd00:18::a1b2:c3d4")],
        );
        // The temporary source is dropped, and the interface's lasting address is taken.
        assert_eq!(
            route_source(&link, Some(IpAddr::V6(v6("fd00:18::a1b2:c3d4")))),
            None
        );
        assert_eq!(first_v6(&link), Some(v6("fd00:18::2")));
        // Other sources stay.
        for src in [IpAddr::V6(v6("fd00:18::2")), "198.18.0.2".parse().unwrap()] {
            assert_eq!(route_source(&link, Some(src)), Some(src));
        }
        assert_eq!(route_source(&link, None), None);
    }

    #[test]
    fn cap_net_admin_is_read_from_the_effective_set() {
        let status =
            |eff: &str| format!("Name:\tlinen\nCapPrm:\t000001ffffffffff\nCapEff:\t{eff}\n");
        for (eff, want) in [
            ("000001ffffffffff", Some(true)),
            ("0000000000001000", Some(true)),
            ("000001ffffffefff", Some(false)),
            ("0000000000000000", Some(false)),
            ("zz", None),
        ] {
            assert_eq!(effective_has(&status(eff), CAP_NET_ADMIN), want, "{eff}");
        }
        assert_eq!(effective_has("Name:\tlinen\n", CAP_NET_ADMIN), None);
    }

    fn default_via(oif: u32, table: u32, metric: u32) -> RouteMessage {
        RouteMessageBuilder::<Ipv4Addr>::new()
            .table_id(table)
            .output_interface(oif)
            .priority(metric)
            .build()
    }

    #[test]
    fn the_default_route_is_the_main_tables_lowest_metric() {
        let subnet = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::new(198, 18, 0, 0), 24)
            .output_interface(2)
            .build();
        // wg-quick's full tunnel (table 51820) and Tailscale's (52) come first in a dump.
        let routes = [
            default_via(9, 51_820, 0),
            default_via(8, 52, 0),
            subnet,
            default_via(3, MAIN_TABLE, 600),
            default_via(2, MAIN_TABLE, 100),
        ];
        assert_eq!(default_route_of(&routes), Some(2));
        assert_eq!(default_route_of(&routes[..3]), None);
        // The same for an IPv6 dump (an IPv6-only underlay).
        let v6 = |oif, metric| {
            RouteMessageBuilder::<Ipv6Addr>::new()
                .table_id(MAIN_TABLE)
                .output_interface(oif)
                .priority(metric)
                .build()
        };
        assert_eq!(default_route_of(&[v6(5, 1024), v6(4, 100)]), Some(4));
        // An unreachable default (it names lo) is no way out.
        let unreachable = RouteMessageBuilder::<Ipv6Addr>::new()
            .table_id(MAIN_TABLE)
            .kind(RouteType::Unreachable)
            .output_interface(1)
            .build();
        assert_eq!(default_route_of(std::slice::from_ref(&unreachable)), None);
        assert_eq!(default_route_of(&[unreachable, v6(5, 1024)]), Some(5));
    }

    #[test]
    fn an_ecmp_default_route_names_its_first_next_hop() {
        use netlink_packet_route::route::RouteNextHop;
        let hop = |i| {
            let mut h = RouteNextHop::default();
            h.interface_index = i;
            h
        };
        let mut ecmp = RouteMessageBuilder::<Ipv4Addr>::new()
            .table_id(MAIN_TABLE)
            .build();
        ecmp.attributes
            .push(RouteAttribute::MultiPath(vec![hop(7), hop(8)]));
        assert_eq!(default_route_of(&[ecmp]), Some(7));
    }

    #[test]
    fn kernel_releases_parse() {
        assert_eq!(parse_kernel_release("6.1.0-26-amd64\n"), Some((6, 1, 0)));
        assert_eq!(parse_kernel_release("5.12"), Some((5, 12, 0)));
        assert_eq!(parse_kernel_release("4.19.0-rc1"), Some((4, 19, 0)));
        assert_eq!(parse_kernel_release("7.1.4-arch1-1"), Some((7, 1, 4)));
        assert_eq!(parse_kernel_release("7.1.5+"), Some((7, 1, 5)));
        assert_eq!(parse_kernel_release("7.0-rc2"), Some((7, 0, 0)));
        assert_eq!(parse_kernel_release("6.18.0-rc5+\n"), Some((6, 18, 0)));
        assert_eq!(parse_kernel_release("garbage"), None);
        assert_eq!(parse_kernel_release("6"), None);
    }

    #[test]
    fn udp_gso_is_distrusted_from_7_0_to_7_1_4() {
        let release = |r: &str| udp_gso_may_corrupt(parse_kernel_release(r).unwrap());
        for bad in [
            "7.0.0-rc1",
            "7.0",
            "7.0.2-6-pve",
            "7.0.0-14-generic",
            "7.1.0",
            "7.1.4",
        ] {
            assert!(release(bad), "{bad}");
        }
        for good in [
            "6.17.0-41-generic",
            "6.18.0",
            "7.1.5",
            "7.2.0-rc1",
            "8.0",
            "5.10.0",
        ] {
            assert!(!release(good), "{good}");
        }
    }
}
