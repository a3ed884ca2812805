//! `tandem watch` (Linux): the devd of Linux. Watches rtnetlink for the virtual IP of `[watch]`
//! appearing on or leaving this host (and, with `--carrier IFACE`, that link's carrier) and
//! runs the same code as `tandem switch master|slave`.
//!
//! Whoever moves the address (ucarp, keepalived, an operator with `ip addr`) needs no script:
//! the address *is* the state. The watcher acts once at startup on the current state, then on
//! every change that held for `[watch] debounce`. Netlink messages only wake it up: it then
//! reads the whole state again with a dump, so a lost message or an overrun socket buffer
//! (ENOBUFS) cannot leave it believing something stale. It does not demote on exit.
//!
//! The netlink parsing is small and kept here (no netlink crate, no async runtime).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use log::{error, info, warn};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    socket,
};

use crate::StepOpts;
use crate::config::{Config, WatchConfig};
use crate::exit::Usage;

/// Even without any message, the state is read again this often.
const RECHECK: Duration = Duration::from_secs(10);

/// The state that decides master or slave.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Snapshot {
    /// The interface that carries the address, if any.
    vip_on: Option<String>,
    /// The watched link's carrier (None: not watched; Some(false) also when the link is gone).
    carrier: Option<bool>,
}

impl Snapshot {
    fn master(&self) -> bool {
        self.vip_on.is_some() && self.carrier != Some(false)
    }

    fn describe(&self, w: &WatchConfig, carrier_if: Option<&str>) -> String {
        let mut s = match &self.vip_on {
            Some(i) => format!("{} is on {i}", w.address),
            None => format!("{} is not on this host", w.address),
        };
        if let (Some(c), Some(i)) = (self.carrier, carrier_if) {
            s.push_str(&format!(", {i} carrier {}", if c { "up" } else { "down" }));
        }
        s
    }
}

pub fn cmd_watch(cfg: &Config, carrier: Option<&str>) -> Result<()> {
    let w = cfg.watch.as_ref().ok_or_else(|| {
        Usage(format!(
            "{}: tandem watch needs a [watch] section with address = \"VIP\"",
            cfg.file.display()
        ))
    })?;
    let mut groups = if w.address.is_ipv4() {
        nl::RTMGRP_IPV4_IFADDR
    } else {
        nl::RTMGRP_IPV6_IFADDR
    };
    if carrier.is_some() || w.interface.is_some() {
        groups |= nl::RTMGRP_LINK;
    }
    let events = nl::Socket::open(groups).context("cannot listen on rtnetlink")?;
    info!(
        "watch: watching {}{}{}, debounce {}",
        w.address,
        w.interface
            .as_deref()
            .map(|i| format!(" on {i}"))
            .unwrap_or_default(),
        carrier
            .map(|i| format!(" and the carrier of {i}"))
            .unwrap_or_default(),
        crate::config::format_duration(w.debounce)
    );

    // Startup: act on the current state at once.
    let mut snap = snapshot(w, carrier)?;
    info!("watch: at startup {}", snap.describe(w, carrier));
    let mut debounce = Debounce::new(w.debounce);
    debounce.act_now(snap.master());
    act(cfg, w, snap.master());
    let mut last_check = Instant::now();

    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let now = Instant::now();
        let wait = debounce
            .wait(now)
            .unwrap_or(RECHECK)
            .min(RECHECK.saturating_sub(now.duration_since(last_check)));
        let woke = wait_readable(&events, wait)?;
        let mut relevant = false;
        if woke {
            // Drain everything queued; any address or link message means "read the state".
            loop {
                match events.recv(&mut buf, true) {
                    Ok(n) => relevant |= nl::mentions_addr_or_link(&buf[..n]),
                    Err(Errno::EAGAIN) => break,
                    Err(Errno::ENOBUFS) => {
                        warn!("watch: netlink buffer overrun; reading the state again");
                        relevant = true;
                    }
                    Err(Errno::EINTR) => continue,
                    Err(e) => return Err(e).context("reading rtnetlink"),
                }
            }
        }
        if relevant || last_check.elapsed() >= RECHECK {
            last_check = Instant::now();
            let now_snap = snapshot(w, carrier)?;
            if now_snap != snap {
                info!("watch: {}", now_snap.describe(w, carrier));
                snap = now_snap;
            }
            debounce.observe(snap.master(), Instant::now());
        }
        if let Some(master) = debounce.due(Instant::now()) {
            act(cfg, w, master);
            // The switch can take seconds: whatever happened meanwhile is read afresh.
            last_check = Instant::now();
            snap = snapshot(w, carrier)?;
            debounce.observe(snap.master(), Instant::now());
        }
    }
}

/// Run the switch in this process, with the arguments ucarp would pass.
fn act(cfg: &Config, w: &WatchConfig, master: bool) {
    let word = if master { "master" } else { "slave" };
    let mut event = vec![word.to_string()];
    if let Some(i) = &w.interface {
        event.push(i.clone());
    }
    event.push(w.address.to_string());
    info!("watch: switch {}", event.join(" "));
    match crate::switch::cmd_switch(cfg, &event, StepOpts::default()) {
        Ok(()) => info!("watch: switch {word} done"),
        Err(e) => error!(
            "watch: switch {word} failed (exit {}): {e:#}",
            crate::exit::code_for(&e)
        ),
    }
}

fn wait_readable(s: &nl::Socket, wait: Duration) -> Result<bool> {
    let timeout = PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX);
    let mut fds = [PollFd::new(s.fd.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, timeout) {
        Ok(n) => Ok(n > 0),
        Err(Errno::EINTR) => Ok(false),
        Err(e) => Err(e).context("poll on rtnetlink"),
    }
}

/// The current state, from a dump of links and addresses.
fn snapshot(w: &WatchConfig, carrier: Option<&str>) -> Result<Snapshot> {
    let links = nl::dump_links().context("rtnetlink link dump")?;
    let addrs = nl::dump_addrs(w.address).context("rtnetlink address dump")?;
    Ok(evaluate(w, carrier, &links, &addrs))
}

fn evaluate(
    w: &WatchConfig,
    carrier: Option<&str>,
    links: &BTreeMap<u32, nl::Link>,
    addrs: &[nl::Addr],
) -> Snapshot {
    let name_of = |index: u32, label: &Option<String>| {
        links
            .get(&index)
            .map(|l| l.name.clone())
            .or_else(|| label.clone())
            .unwrap_or_else(|| format!("if{index}"))
    };
    let vip_on = addrs
        .iter()
        .filter(|a| a.addr == w.address)
        .map(|a| name_of(a.index, &a.label))
        .find(|name| w.interface.as_deref().is_none_or(|i| i == name));
    let carrier = carrier.map(|want| {
        links
            .values()
            .find(|l| l.name == want)
            .is_some_and(|l| l.up && l.lower_up)
    });
    Snapshot { vip_on, carrier }
}

/// Acts on a state only once it held for `settle`; never twice on the same state.
#[derive(Debug)]
struct Debounce {
    settle: Duration,
    acted: Option<bool>,
    pending: Option<(bool, Instant)>,
}

impl Debounce {
    fn new(settle: Duration) -> Self {
        Debounce {
            settle,
            acted: None,
            pending: None,
        }
    }

    fn act_now(&mut self, state: bool) {
        self.acted = Some(state);
        self.pending = None;
    }

    /// The state seen now; a change (re)starts the settle timer.
    fn observe(&mut self, state: bool, now: Instant) {
        match self.pending {
            Some((p, _)) if p == state => {}
            _ if self.pending.is_none() && self.acted == Some(state) => {}
            _ => self.pending = Some((state, now)),
        }
    }

    /// The state to act on now, if one has settled and differs from the last one acted on.
    fn due(&mut self, now: Instant) -> Option<bool> {
        let (state, since) = self.pending?;
        if now.duration_since(since) < self.settle {
            return None;
        }
        self.pending = None;
        if self.acted == Some(state) {
            return None;
        }
        self.acted = Some(state);
        Some(state)
    }

    /// How long until a pending state settles.
    fn wait(&self, now: Instant) -> Option<Duration> {
        self.pending
            .map(|(_, since)| self.settle.saturating_sub(now.duration_since(since)))
    }
}

/// The few rtnetlink messages tandem needs: address and link dumps and notifications.
mod nl {
    use super::*;

    // <linux/rtnetlink.h>, <linux/netlink.h>, <linux/if_addr.h>, <linux/if_link.h>
    pub const RTMGRP_LINK: u32 = 0x1;
    pub const RTMGRP_IPV4_IFADDR: u32 = 0x10;
    pub const RTMGRP_IPV6_IFADDR: u32 = 0x100;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const RTM_NEWLINK: u16 = 16;
    const RTM_DELLINK: u16 = 17;
    const RTM_GETLINK: u16 = 18;
    const RTM_NEWADDR: u16 = 20;
    const RTM_DELADDR: u16 = 21;
    const RTM_GETADDR: u16 = 22;
    const NLM_F_REQUEST: u16 = 0x1;
    const NLM_F_DUMP: u16 = 0x300;
    const IFA_ADDRESS: u16 = 1;
    const IFA_LOCAL: u16 = 2;
    const IFA_LABEL: u16 = 3;
    const IFLA_IFNAME: u16 = 3;
    const IFF_UP: u32 = 0x1;
    const IFF_LOWER_UP: u32 = 0x1_0000;
    const HDR: usize = 16;
    /// A dump of a sane host's links or addresses is far smaller than this.
    const MAX_DUMP_MESSAGES: usize = 100_000;

    pub struct Socket {
        pub fd: OwnedFd,
    }

    impl Socket {
        pub fn open(groups: u32) -> Result<Socket> {
            let fd = socket(
                AddressFamily::Netlink,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::NetlinkRoute,
            )
            .context("socket(AF_NETLINK, NETLINK_ROUTE)")?;
            bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups)).context("bind netlink socket")?;
            Ok(Socket { fd })
        }

        pub fn recv(&self, buf: &mut [u8], nonblocking: bool) -> Result<usize, Errno> {
            let flags = if nonblocking {
                MsgFlags::MSG_DONTWAIT
            } else {
                MsgFlags::empty()
            };
            recv(self.fd.as_raw_fd(), buf, flags)
        }

        /// Ask for a dump and collect every message of the answer.
        fn dump(&self, kind: u16, body: &[u8]) -> Result<Vec<(u16, Vec<u8>)>> {
            let seq: u32 = 1;
            let mut req = Vec::with_capacity(HDR + body.len());
            req.extend_from_slice(&((HDR + body.len()) as u32).to_ne_bytes());
            req.extend_from_slice(&kind.to_ne_bytes());
            req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
            req.extend_from_slice(&seq.to_ne_bytes());
            req.extend_from_slice(&0u32.to_ne_bytes());
            req.extend_from_slice(body);
            send(self.fd.as_raw_fd(), &req, MsgFlags::empty()).context("netlink send")?;
            let mut out = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            while out.len() < MAX_DUMP_MESSAGES {
                if !wait_readable(self, Duration::from_secs(5))? {
                    anyhow::bail!("no answer from the kernel within 5s");
                }
                let n = match self.recv(&mut buf, true) {
                    Ok(n) => n,
                    Err(Errno::EAGAIN | Errno::EINTR) => continue,
                    Err(e) => return Err(e).context("netlink recv"),
                };
                for (t, payload) in messages(&buf[..n]) {
                    match t {
                        NLMSG_DONE => return Ok(out),
                        NLMSG_ERROR => {
                            let code = payload
                                .get(..4)
                                .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                                .unwrap_or(0);
                            if code != 0 {
                                return Err(Errno::from_raw(-code)).context("netlink dump");
                            }
                        }
                        _ => out.push((t, payload.to_vec())),
                    }
                }
            }
            anyhow::bail!("netlink dump did not end")
        }
    }

    /// (type, payload) of each well-formed message in a datagram.
    pub fn messages(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
        let mut out = Vec::new();
        while buf.len() >= HDR {
            let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if len < HDR || len > buf.len() {
                break;
            }
            let kind = u16::from_ne_bytes([buf[4], buf[5]]);
            out.push((kind, &buf[HDR..len]));
            let next = align(len).min(buf.len());
            buf = &buf[next..];
        }
        out
    }

    fn align(n: usize) -> usize {
        (n + 3) & !3
    }

    /// (type, data) of each attribute.
    fn attrs(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
        let mut out = Vec::new();
        while buf.len() >= 4 {
            let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
            if len < 4 || len > buf.len() {
                break;
            }
            let kind = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
            out.push((kind, &buf[4..len]));
            let next = align(len).min(buf.len());
            buf = &buf[next..];
        }
        out
    }

    fn cstr(b: &[u8]) -> String {
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        String::from_utf8_lossy(&b[..end]).into_owned()
    }

    pub fn mentions_addr_or_link(buf: &[u8]) -> bool {
        messages(buf).iter().any(|(t, _)| {
            matches!(
                *t,
                RTM_NEWADDR | RTM_DELADDR | RTM_NEWLINK | RTM_DELLINK | NLMSG_ERROR
            )
        })
    }

    #[derive(Debug, Clone)]
    pub struct Link {
        pub name: String,
        pub up: bool,
        pub lower_up: bool,
    }

    #[derive(Debug, Clone)]
    pub struct Addr {
        pub index: u32,
        pub addr: IpAddr,
        pub label: Option<String>,
    }

    /// ifinfomsg: family, pad, type(2), index(4), flags(4), change(4); then attributes.
    pub fn parse_link(p: &[u8]) -> Option<(u32, Link)> {
        let index = u32::from_ne_bytes(p.get(4..8)?.try_into().ok()?);
        let flags = u32::from_ne_bytes(p.get(8..12)?.try_into().ok()?);
        let name = attrs(p.get(16..)?)
            .into_iter()
            .find(|(t, _)| *t == IFLA_IFNAME)
            .map(|(_, d)| cstr(d))?;
        Some((
            index,
            Link {
                name,
                up: flags & IFF_UP != 0,
                lower_up: flags & IFF_LOWER_UP != 0,
            },
        ))
    }

    /// ifaddrmsg: family, prefixlen, flags, scope, index(4); then attributes. One entry per
    /// address attribute (IFA_LOCAL and IFA_ADDRESS differ on point-to-point links).
    pub fn parse_addr(p: &[u8]) -> Vec<Addr> {
        let (Some(&family), Some(index)) = (p.first(), p.get(4..8)) else {
            return Vec::new();
        };
        let index = u32::from_ne_bytes([index[0], index[1], index[2], index[3]]);
        let a = attrs(p.get(8..).unwrap_or_default());
        let label = a
            .iter()
            .find(|(t, _)| *t == IFA_LABEL)
            .map(|(_, d)| cstr(d));
        a.iter()
            .filter(|(t, _)| *t == IFA_LOCAL || *t == IFA_ADDRESS)
            .filter_map(|(_, d)| {
                let addr = match (i32::from(family), d.len()) {
                    (libc::AF_INET, 4) => IpAddr::from(<[u8; 4]>::try_from(*d).ok()?),
                    (libc::AF_INET6, 16) => IpAddr::from(<[u8; 16]>::try_from(*d).ok()?),
                    _ => return None,
                };
                Some(Addr {
                    index,
                    addr,
                    label: label.clone(),
                })
            })
            .collect()
    }

    pub fn dump_links() -> Result<BTreeMap<u32, Link>> {
        let s = Socket::open(0)?;
        // struct ifinfomsg, all zero: every family, every link.
        let msgs = s.dump(RTM_GETLINK, &[0u8; 16])?;
        Ok(msgs
            .iter()
            .filter(|(t, _)| *t == RTM_NEWLINK)
            .filter_map(|(_, p)| parse_link(p))
            .collect())
    }

    pub fn dump_addrs(want: IpAddr) -> Result<Vec<Addr>> {
        let s = Socket::open(0)?;
        let family = if want.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        } as u8;
        let msgs = s.dump(RTM_GETADDR, &[family, 0, 0, 0, 0, 0, 0, 0])?;
        Ok(msgs
            .iter()
            .filter(|(t, _)| *t == RTM_NEWADDR)
            .flat_map(|(_, p)| parse_addr(p))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(data);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    fn msg(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(&[0; 10]);
        v.extend_from_slice(body);
        v
    }

    fn newaddr(index: u32, ip: [u8; 4], label: &str) -> Vec<u8> {
        let mut body = vec![libc::AF_INET as u8, 24, 0, 0];
        body.extend_from_slice(&index.to_ne_bytes());
        body.extend(attr(1, &ip));
        body.extend(attr(2, &ip));
        body.extend(attr(3, format!("{label}\0").as_bytes()));
        msg(20, &body)
    }

    fn newlink(index: u32, name: &str, flags: u32) -> Vec<u8> {
        let mut body = vec![0u8, 0, 1, 0];
        body.extend_from_slice(&index.to_ne_bytes());
        body.extend_from_slice(&flags.to_ne_bytes());
        body.extend_from_slice(&0u32.to_ne_bytes());
        body.extend(attr(3, format!("{name}\0").as_bytes()));
        msg(16, &body)
    }

    fn wcfg(interface: Option<&str>) -> WatchConfig {
        WatchConfig {
            address: "198.18.0.10".parse().unwrap(),
            interface: interface.map(String::from),
            debounce: Duration::from_millis(200),
        }
    }

    #[test]
    fn parses_addresses_and_links_from_one_datagram() {
        let mut dgram = newaddr(2, [198, 18, 0, 1], "lab0");
        dgram.extend(newaddr(2, [198, 18, 0, 10], "lab0"));
        dgram.extend(newlink(2, "lab0", 0x1_0001));
        let msgs = nl::messages(&dgram);
        assert_eq!(msgs.len(), 3);
        assert!(nl::mentions_addr_or_link(&dgram));
        let addrs: Vec<nl::Addr> = msgs[..2]
            .iter()
            .flat_map(|(_, p)| nl::parse_addr(p))
            .collect();
        assert_eq!(addrs.len(), 4);
        assert_eq!(addrs[2].addr.to_string(), "198.18.0.10");
        assert_eq!(addrs[2].label.as_deref(), Some("lab0"));
        let (index, link) = nl::parse_link(msgs[2].1).unwrap();
        assert_eq!(
            (index, link.name.as_str(), link.up, link.lower_up),
            (2, "lab0", true, true)
        );
    }

    #[test]
    fn truncated_input_is_ignored_not_a_panic() {
        let m = newaddr(2, [198, 18, 0, 10], "lab0");
        for cut in 0..m.len() {
            for (_, p) in nl::messages(&m[..cut]) {
                let _ = nl::parse_addr(p);
                let _ = nl::parse_link(p);
            }
        }
        assert!(nl::messages(&[0xff; 40]).is_empty());
    }

    #[test]
    fn master_when_the_vip_is_here_and_the_carrier_up() {
        let mut links = BTreeMap::new();
        let (_, l) = nl::parse_link(&newlink(2, "lab0", 0x1_0001)[16..]).unwrap();
        links.insert(2, l);
        let vip = nl::parse_addr(&newaddr(2, [198, 18, 0, 10], "lab0")[16..]);
        let other = nl::parse_addr(&newaddr(2, [198, 18, 0, 1], "lab0")[16..]);

        let s = evaluate(&wcfg(None), None, &links, &vip);
        assert_eq!(s.vip_on.as_deref(), Some("lab0"));
        assert!(s.master());
        assert!(!evaluate(&wcfg(None), None, &links, &other).master());
        // The address on another interface than the configured one does not count.
        assert!(!evaluate(&wcfg(Some("eth1")), None, &links, &vip).master());
        assert!(evaluate(&wcfg(None), Some("lab0"), &links, &vip).master());
        // Carrier lost (IFF_LOWER_UP clear), or the link gone: slave.
        links.get_mut(&2).unwrap().lower_up = false;
        assert!(!evaluate(&wcfg(None), Some("lab0"), &links, &vip).master());
        assert!(!evaluate(&wcfg(None), Some("nope"), &links, &vip).master());
    }

    #[test]
    fn debounce_acts_once_on_a_settled_change() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut d = Debounce::new(Duration::from_millis(200));
        d.act_now(false);
        d.observe(false, ms(0));
        assert_eq!(d.due(ms(500)), None);
        // A blip that reverts within the window does nothing.
        d.observe(true, ms(1000));
        d.observe(false, ms(1100));
        assert_eq!(d.due(ms(1250)), None);
        assert_eq!(d.due(ms(1400)), None);
        // A change that holds is acted on once, after the settle time.
        d.observe(true, ms(2000));
        assert_eq!(d.wait(ms(2050)), Some(Duration::from_millis(150)));
        assert_eq!(d.due(ms(2100)), None);
        d.observe(true, ms(2150));
        assert_eq!(d.due(ms(2200)), Some(true));
        assert_eq!(d.due(ms(3000)), None);
        d.observe(true, ms(3000));
        assert_eq!(d.due(ms(4000)), None);
    }

    #[test]
    fn reads_this_hosts_state_from_the_kernel() {
        // The loopback address is on `lo` in every network namespace.
        let w = WatchConfig {
            address: "127.0.0.1".parse().unwrap(),
            interface: Some("lo".into()),
            debounce: Duration::ZERO,
        };
        let s = snapshot(&w, Some("lo")).unwrap();
        assert_eq!(s.vip_on.as_deref(), Some("lo"));
        let w = WatchConfig {
            address: "198.18.0.99".parse().unwrap(),
            ..w
        };
        assert!(!snapshot(&w, None).unwrap().master());
    }
}
