//! The nat rules of transparent mode, as data: a pure function of the
//! [`Options`] gives the [`Step`]s that install them ([`install_plan`]) or
//! remove them ([`cleanup_plan`]). Nothing here runs a command; `backend`
//! executes the steps (or prints them for `--dry-run`).
//!
//! The rules live in four chains of the `nat` table that belong to meshlet
//! alone, so installing can flush and rebuild them and cleaning up can
//! delete them without touching anyone else's rules:
//!
//! ```text
//! PREROUTING ─► MESHLET_INBOUND ─► (proxy ports, excluded ports: RETURN)
//!                                  └► MESHLET_IN_REDIRECT ─► REDIRECT :15006
//! OUTPUT ────► MESHLET_OUTPUT ──► (proxy UID, -o lo, 127.0.0.1 / ::1,
//!                                  proxy ports, excluded ports and CIDRs: RETURN)
//!                                  └► MESHLET_REDIRECT ────► REDIRECT :15001
//! ```
//!
//! The one rule in each built-in chain (the jump) is added only when it is
//! missing, so running the installer twice leaves one identical set.
//!
//! The fuzz target of the planner is the property tests at the end of this
//! file (proptest on stable Rust: nightly and `cargo fuzz` are not on the
//! CI machine): for any valid options, a small evaluator walks packets
//! through the planned chains and checks that the proxy's UID is never
//! redirected, no packet to a proxy port is redirected (no loop), every
//! other packet goes where the options say, and the plan is deterministic.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// Inbound entry chain (jumped to from `PREROUTING`).
pub const INBOUND: &str = "MESHLET_INBOUND";
/// Redirects to the inbound listener.
pub const IN_REDIRECT: &str = "MESHLET_IN_REDIRECT";
/// Outbound entry chain (jumped to from `OUTPUT`).
pub const OUTPUT: &str = "MESHLET_OUTPUT";
/// Redirects to the outbound listener.
pub const REDIRECT: &str = "MESHLET_REDIRECT";
/// Every chain meshlet owns, in creation order.
pub const CHAINS: [&str; 4] = [INBOUND, IN_REDIRECT, OUTPUT, REDIRECT];

/// IPv4 (`iptables`) or IPv6 (`ip6tables`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    fn matches(self, ip: IpAddr) -> bool {
        matches!(
            (self, ip),
            (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_))
        )
    }
}

/// An address range, `10.0.0.0/8` or `fd00::/8` (a bare address is a /32
/// or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not a CIDR (e.g. 10.0.0.0/8 or fd00::/8)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0..={max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Which inbound ports are redirected to the sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundPorts {
    /// Every port (`*`), less the excluded ones.
    All,
    /// Only these.
    Only(Vec<u16>),
}

impl FromStr for InboundPorts {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text.trim() == "*" {
            return Ok(InboundPorts::All);
        }
        text.split(',')
            .filter(|p| !p.trim().is_empty())
            .map(|p| {
                p.trim()
                    .parse::<u16>()
                    .map_err(|_| format!("{p:?} is not a port (use a list like 8080,9090 or *)"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(InboundPorts::Only)
    }
}

/// What the rules intercept and what they leave alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The sidecar's UID: its own traffic is never redirected.
    pub proxy_uid: u32,
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub admin_port: u16,
    pub control_plane_port: u16,
    pub include_inbound_ports: InboundPorts,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    pub exclude_outbound_cidrs: Vec<Cidr>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            proxy_uid: 1337,
            inbound_port: 15006,
            outbound_port: 15001,
            admin_port: 15020,
            control_plane_port: 15010,
            include_inbound_ports: InboundPorts::All,
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
        }
    }
}

impl Options {
    /// The mesh's own ports, never redirected in either direction.
    fn proxy_ports(&self) -> Vec<u16> {
        let mut ports = vec![
            self.inbound_port,
            self.outbound_port,
            self.admin_port,
            self.control_plane_port,
        ];
        dedup(&mut ports);
        ports
    }
}

/// Sorted, without repeats (so the generated list does not depend on how
/// the user ordered a flag's values).
fn dedup(ports: &mut Vec<u16>) {
    ports.sort_unstable();
    ports.dedup();
}

/// One rule of the `nat` table: its chain and its match/target arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub chain: &'static str,
    pub spec: Vec<String>,
}

impl Rule {
    fn new(chain: &'static str, spec: &[&str]) -> Self {
        Rule {
            chain,
            spec: spec.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn port(chain: &'static str, port: u16, target: &str) -> Self {
        Rule::new(
            chain,
            &["-p", "tcp", "--dport", &port.to_string(), "-j", target],
        )
    }
}

/// One step of installing or removing the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Create the chain, or empty it when it already exists.
    ResetChain(&'static str),
    /// Append to a chain just reset.
    Append(Rule),
    /// Append unless an identical rule is already there (built-in chains).
    Ensure(Rule),
    /// Delete every copy of the rule (none is fine).
    DeleteAll(Rule),
    /// Empty the chain if it exists.
    Flush(&'static str),
    /// Delete the (empty) chain if it exists.
    DeleteChain(&'static str),
}

/// The jumps from the built-in chains into meshlet's.
fn jumps() -> [Rule; 2] {
    [
        Rule::new("PREROUTING", &["-p", "tcp", "-j", INBOUND]),
        Rule::new("OUTPUT", &["-p", "tcp", "-j", OUTPUT]),
    ]
}

/// Everything that installs the rules for `family`, in order.
pub fn install_plan(options: &Options, family: Family) -> Vec<Step> {
    let mut steps: Vec<Step> = CHAINS.iter().map(|c| Step::ResetChain(c)).collect();
    let mut append = |rule: Rule| steps.push(Step::Append(rule));
    let redirect = |chain, port: u16| {
        Rule::new(
            chain,
            &[
                "-p",
                "tcp",
                "-j",
                "REDIRECT",
                "--to-ports",
                &port.to_string(),
            ],
        )
    };
    append(redirect(IN_REDIRECT, options.inbound_port));
    append(redirect(REDIRECT, options.outbound_port));

    // Inbound: the mesh's own ports and the user's exclusions stay as
    // they are; the rest (or only the included ports) go to the sidecar.
    let mut skip_inbound = options.proxy_ports();
    skip_inbound.extend(&options.exclude_inbound_ports);
    dedup(&mut skip_inbound);
    for port in skip_inbound {
        append(Rule::port(INBOUND, port, "RETURN"));
    }
    match &options.include_inbound_ports {
        InboundPorts::All => append(Rule::new(INBOUND, &["-p", "tcp", "-j", IN_REDIRECT])),
        InboundPorts::Only(ports) => {
            let mut ports = ports.clone();
            dedup(&mut ports);
            for port in ports {
                append(Rule::port(INBOUND, port, IN_REDIRECT));
            }
        }
    }

    // Outbound: the sidecar's own connections, anything to this host
    // (loopback, which includes the app calling its own pod IP), the
    // mesh's ports and the user's exclusions stay as they are.
    let uid = options.proxy_uid.to_string();
    append(Rule::new(
        OUTPUT,
        &["-m", "owner", "--uid-owner", &uid, "-j", "RETURN"],
    ));
    append(Rule::new(OUTPUT, &["-o", "lo", "-j", "RETURN"]));
    append(Rule::new(
        OUTPUT,
        &["-d", family.loopback(), "-j", "RETURN"],
    ));
    let mut skip_outbound = options.proxy_ports();
    skip_outbound.extend(&options.exclude_outbound_ports);
    dedup(&mut skip_outbound);
    for port in skip_outbound {
        append(Rule::port(OUTPUT, port, "RETURN"));
    }
    for cidr in options
        .exclude_outbound_cidrs
        .iter()
        .filter(|c| family.matches(c.addr))
    {
        append(Rule::new(
            OUTPUT,
            &["-d", &cidr.to_string(), "-j", "RETURN"],
        ));
    }
    append(Rule::new(OUTPUT, &["-p", "tcp", "-j", REDIRECT]));

    steps.extend(jumps().into_iter().map(Step::Ensure));
    steps
}

/// Everything that removes what [`install_plan`] made (whatever options it
/// was made with): the jumps, then the chains.
pub fn cleanup_plan() -> Vec<Step> {
    let mut steps: Vec<Step> = jumps().into_iter().map(Step::DeleteAll).collect();
    steps.extend(CHAINS.iter().map(|c| Step::Flush(c)));
    steps.extend(CHAINS.iter().map(|c| Step::DeleteChain(c)));
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plan as `iptables -t nat` argument lines, easy to read in asserts.
    fn lines(steps: &[Step]) -> Vec<String> {
        steps
            .iter()
            .map(|step| match step {
                Step::ResetChain(c) => format!("reset {c}"),
                Step::Append(r) => format!("-A {} {}", r.chain, r.spec.join(" ")),
                Step::Ensure(r) => format!("ensure {} {}", r.chain, r.spec.join(" ")),
                Step::DeleteAll(r) => format!("delete {} {}", r.chain, r.spec.join(" ")),
                Step::Flush(c) => format!("flush {c}"),
                Step::DeleteChain(c) => format!("delete-chain {c}"),
            })
            .collect()
    }

    #[test]
    fn defaults_redirect_all_tcp_but_the_mesh_itself() {
        let got = lines(&install_plan(&Options::default(), Family::V4));
        let want = [
            "reset MESHLET_INBOUND",
            "reset MESHLET_IN_REDIRECT",
            "reset MESHLET_OUTPUT",
            "reset MESHLET_REDIRECT",
            "-A MESHLET_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            "-A MESHLET_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "-A MESHLET_INBOUND -p tcp --dport 15001 -j RETURN",
            "-A MESHLET_INBOUND -p tcp --dport 15006 -j RETURN",
            "-A MESHLET_INBOUND -p tcp --dport 15010 -j RETURN",
            "-A MESHLET_INBOUND -p tcp --dport 15020 -j RETURN",
            "-A MESHLET_INBOUND -p tcp -j MESHLET_IN_REDIRECT",
            "-A MESHLET_OUTPUT -m owner --uid-owner 1337 -j RETURN",
            "-A MESHLET_OUTPUT -o lo -j RETURN",
            "-A MESHLET_OUTPUT -d 127.0.0.1/32 -j RETURN",
            "-A MESHLET_OUTPUT -p tcp --dport 15001 -j RETURN",
            "-A MESHLET_OUTPUT -p tcp --dport 15006 -j RETURN",
            "-A MESHLET_OUTPUT -p tcp --dport 15010 -j RETURN",
            "-A MESHLET_OUTPUT -p tcp --dport 15020 -j RETURN",
            "-A MESHLET_OUTPUT -p tcp -j MESHLET_REDIRECT",
            "ensure PREROUTING -p tcp -j MESHLET_INBOUND",
            "ensure OUTPUT -p tcp -j MESHLET_OUTPUT",
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn exclusions_and_included_ports() {
        let options = Options {
            proxy_uid: 2000,
            include_inbound_ports: "9090, 8080,8080".parse().unwrap(),
            exclude_inbound_ports: vec![22],
            exclude_outbound_ports: vec![5432, 15010],
            exclude_outbound_cidrs: vec![
                "10.96.0.0/12".parse().unwrap(),
                "fd00::/8".parse().unwrap(),
            ],
            ..Options::default()
        };
        let v4 = lines(&install_plan(&options, Family::V4));
        assert!(v4.contains(&"-A MESHLET_INBOUND -p tcp --dport 22 -j RETURN".to_owned()));
        assert!(v4
            .contains(&"-A MESHLET_INBOUND -p tcp --dport 8080 -j MESHLET_IN_REDIRECT".to_owned()));
        assert!(v4
            .contains(&"-A MESHLET_INBOUND -p tcp --dport 9090 -j MESHLET_IN_REDIRECT".to_owned()));
        assert!(!v4
            .iter()
            .any(|l| l == "-A MESHLET_INBOUND -p tcp -j MESHLET_IN_REDIRECT"));
        assert_eq!(
            v4.iter().filter(|l| l.contains("--dport 8080")).count(),
            1,
            "repeated ports appear once"
        );
        assert_eq!(v4.iter().filter(|l| l.contains("--dport 15010")).count(), 2);
        assert!(v4.contains(&"-A MESHLET_OUTPUT -p tcp --dport 5432 -j RETURN".to_owned()));
        assert!(v4.contains(&"-A MESHLET_OUTPUT -m owner --uid-owner 2000 -j RETURN".to_owned()));
        assert!(v4.contains(&"-A MESHLET_OUTPUT -d 10.96.0.0/12 -j RETURN".to_owned()));
        assert!(!v4.iter().any(|l| l.contains("fd00::")));
        // Exclusions come before the catch-all redirect.
        let redirect = v4
            .iter()
            .position(|l| l == "-A MESHLET_OUTPUT -p tcp -j MESHLET_REDIRECT")
            .unwrap();
        let cidr = v4.iter().position(|l| l.contains("10.96.0.0/12")).unwrap();
        assert!(cidr < redirect);

        let v6 = lines(&install_plan(&options, Family::V6));
        assert!(v6.contains(&"-A MESHLET_OUTPUT -d ::1/128 -j RETURN".to_owned()));
        assert!(v6.contains(&"-A MESHLET_OUTPUT -d fd00::/8 -j RETURN".to_owned()));
        assert!(!v6.iter().any(|l| l.contains("10.96.")));
    }

    #[test]
    fn the_plan_is_the_same_every_time_and_resets_before_filling() {
        let options = Options {
            exclude_outbound_ports: vec![9000, 3306, 9000],
            ..Options::default()
        };
        let first = install_plan(&options, Family::V4);
        assert_eq!(first, install_plan(&options, Family::V4));
        // Every own chain is reset before any rule is appended, and the
        // built-in chains only get the jumps, each ensured (added once).
        let first_append = first
            .iter()
            .position(|s| matches!(s, Step::Append(_)))
            .unwrap();
        let resets: Vec<_> = first[..first_append].to_vec();
        assert_eq!(resets.len(), CHAINS.len());
        for step in &first {
            match step {
                Step::Append(rule) => assert!(CHAINS.contains(&rule.chain), "{rule:?}"),
                Step::Ensure(rule) => {
                    assert!(["PREROUTING", "OUTPUT"].contains(&rule.chain), "{rule:?}")
                }
                Step::ResetChain(_) => {}
                other => panic!("install does not remove: {other:?}"),
            }
        }
    }

    #[test]
    fn cleanup_removes_the_jumps_then_every_chain() {
        let got = lines(&cleanup_plan());
        let want = [
            "delete PREROUTING -p tcp -j MESHLET_INBOUND",
            "delete OUTPUT -p tcp -j MESHLET_OUTPUT",
            "flush MESHLET_INBOUND",
            "flush MESHLET_IN_REDIRECT",
            "flush MESHLET_OUTPUT",
            "flush MESHLET_REDIRECT",
            "delete-chain MESHLET_INBOUND",
            "delete-chain MESHLET_IN_REDIRECT",
            "delete-chain MESHLET_OUTPUT",
            "delete-chain MESHLET_REDIRECT",
        ];
        assert_eq!(got, want);
        // The jumps removed are exactly the ones installed.
        let installed: Vec<_> = install_plan(&Options::default(), Family::V4)
            .into_iter()
            .filter_map(|s| match s {
                Step::Ensure(rule) => Some(rule),
                _ => None,
            })
            .collect();
        let removed: Vec<_> = cleanup_plan()
            .into_iter()
            .filter_map(|s| match s {
                Step::DeleteAll(rule) => Some(rule),
                _ => None,
            })
            .collect();
        assert_eq!(installed, removed);
    }

    #[test]
    fn cidr_and_port_list_parsing() {
        assert_eq!(
            "10.0.0.0/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            "10.1.2.3".parse::<Cidr>().unwrap().to_string(),
            "10.1.2.3/32"
        );
        assert_eq!("fd00::/8".parse::<Cidr>().unwrap().prefix, 8);
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope/8".parse::<Cidr>().is_err());
        assert_eq!("*".parse::<InboundPorts>().unwrap(), InboundPorts::All);
        assert_eq!(
            "80,443".parse::<InboundPorts>().unwrap(),
            InboundPorts::Only(vec![80, 443])
        );
        assert!("80,http".parse::<InboundPorts>().is_err());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn config() -> ProptestConfig {
            crate::testing::proptest_config(2_000)
        }

        /// A packet as the nat table sees it: inbound (PREROUTING) or
        /// locally generated by `uid` (OUTPUT).
        #[derive(Debug, Clone)]
        struct Packet {
            uid: Option<u32>,
            dport: u16,
            dst: IpAddr,
            out_lo: bool,
        }

        fn in_cidr(ip: IpAddr, cidr: &Cidr) -> bool {
            let bits = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32u32),
                IpAddr::V6(v6) => (u128::from(v6), 128u32),
            };
            let ((a, width), (b, width_b)) = (bits(ip), bits(cidr.addr));
            if width != width_b {
                return false;
            }
            let prefix = u32::from(cidr.prefix);
            prefix == 0 || (a >> (width - prefix)) == (b >> (width - prefix))
        }

        /// Whether every match of `spec` holds for `packet`.
        fn matches(spec: &[String], packet: &Packet) -> bool {
            let mut args = spec.iter().map(String::as_str);
            while let Some(arg) = args.next() {
                let ok = match arg {
                    "-p" => args.next() == Some("tcp"),
                    "--dport" => args.next().and_then(|p| p.parse().ok()) == Some(packet.dport),
                    "-m" => args.next() == Some("owner"),
                    "--uid-owner" => {
                        let uid = args.next().and_then(|u| u.parse().ok());
                        packet.uid.is_some() && packet.uid == uid
                    }
                    "-o" => args.next() == Some("lo") && packet.out_lo,
                    "-d" => args
                        .next()
                        .and_then(|c| c.parse::<Cidr>().ok())
                        .is_some_and(|c| in_cidr(packet.dst, &c)),
                    "-j" | "--to-ports" => {
                        args.next();
                        true
                    }
                    other => panic!("the evaluator does not know {other}"),
                };
                if !ok {
                    return false;
                }
            }
            true
        }

        fn target(spec: &[String]) -> (&str, Option<u16>) {
            let after = |flag: &str| {
                spec.iter()
                    .position(|a| a == flag)
                    .map(|i| spec[i + 1].as_str())
            };
            (
                after("-j").expect("every rule has a target"),
                after("--to-ports").and_then(|p| p.parse().ok()),
            )
        }

        /// Walks `packet` from the built-in `entry` chain through the
        /// appended/ensured rules; returns the port it is redirected to.
        fn evaluate(steps: &[Step], entry: &str, packet: &Packet) -> Option<u16> {
            let rules: Vec<&Rule> = steps
                .iter()
                .filter_map(|s| match s {
                    Step::Append(r) | Step::Ensure(r) => Some(r),
                    _ => None,
                })
                .collect();
            let mut chain = entry.to_owned();
            for _hops in 0..8 {
                let next = rules
                    .iter()
                    .filter(|r| r.chain == chain)
                    .find(|r| matches(&r.spec, packet))?;
                match target(&next.spec) {
                    ("RETURN", _) => return None,
                    ("REDIRECT", port) => return Some(port.expect("REDIRECT names a port")),
                    (jump, _) => chain = jump.to_owned(),
                }
            }
            panic!("chains loop for {packet:?}");
        }

        fn ports() -> impl Strategy<Value = Vec<u16>> {
            prop::collection::vec(prop_oneof![1u16..100, 15000u16..15030, any::<u16>()], 0..5)
        }

        fn options() -> impl Strategy<Value = Options> {
            let cidr =
                (any::<bool>(), any::<u128>(), any::<u8>()).prop_map(|(v4, bits, prefix)| {
                    if v4 {
                        Cidr {
                            addr: IpAddr::V4((bits as u32).into()),
                            prefix: prefix % 33,
                        }
                    } else {
                        Cidr {
                            addr: IpAddr::V6(bits.into()),
                            prefix: prefix % 129,
                        }
                    }
                });
            (
                prop_oneof![Just(1337u32), any::<u32>()],
                prop::array::uniform4(prop_oneof![15000u16..15030, any::<u16>()]),
                prop_oneof![
                    Just(InboundPorts::All),
                    ports().prop_map(InboundPorts::Only)
                ],
                ports(),
                ports(),
                prop::collection::vec(cidr, 0..3),
            )
                .prop_map(
                    |(proxy_uid, [inbound, outbound, admin, cp], include, ex_in, ex_out, cidrs)| {
                        Options {
                            proxy_uid,
                            inbound_port: inbound,
                            outbound_port: outbound,
                            admin_port: admin,
                            control_plane_port: cp,
                            include_inbound_ports: include,
                            exclude_inbound_ports: ex_in,
                            exclude_outbound_ports: ex_out,
                            exclude_outbound_cidrs: cidrs,
                        }
                    },
                )
        }

        fn packet() -> impl Strategy<Value = Packet> {
            (
                prop::option::of(prop_oneof![Just(1337u32), any::<u32>()]),
                prop_oneof![1u16..100, 15000u16..15030, any::<u16>()],
                prop_oneof![
                    any::<u32>().prop_map(|b| IpAddr::V4(b.into())),
                    any::<u128>().prop_map(|b| IpAddr::V6(b.into())),
                    Just(IpAddr::from([127, 0, 0, 1])),
                ],
                any::<bool>(),
            )
                // Traffic to a loopback address always leaves through `lo`.
                .prop_map(|(uid, dport, dst, out_lo)| Packet {
                    uid,
                    dport,
                    dst,
                    out_lo: out_lo || dst.is_loopback(),
                })
        }

        proptest! {
            #![proptest_config(config())]

            /// The proxy's own traffic and anything to a proxy port is
            /// never redirected (no loop); everything else goes where the
            /// options say.
            #[test]
            fn the_proxy_is_never_redirected_and_the_rest_is(
                options in options(),
                packets in prop::collection::vec(packet(), 1..16),
            ) {
                let proxy_ports = options.proxy_ports();
                for family in [Family::V4, Family::V6] {
                    let plan = install_plan(&options, family);
                    for packet in &packets {
                        if !family.matches(packet.dst) {
                            continue;
                        }
                        let to_proxy = proxy_ports.contains(&packet.dport);
                        // Outbound, from a local process.
                        let mut out = packet.clone();
                        out.uid = Some(packet.uid.unwrap_or(0));
                        let got = evaluate(&plan, "OUTPUT", &out);
                        let loopback = out.out_lo;
                        let excluded = options.exclude_outbound_ports.contains(&packet.dport)
                            || options.exclude_outbound_cidrs.iter().any(|c| in_cidr(packet.dst, c));
                        let own = out.uid == Some(options.proxy_uid);
                        let want = (!own && !loopback && !to_proxy && !excluded).then_some(options.outbound_port);
                        prop_assert_eq!(got, want, "OUTPUT {:?}", out);
                        // Inbound, arriving from the network.
                        let mut inbound = packet.clone();
                        inbound.uid = None;
                        inbound.out_lo = false;
                        let got = evaluate(&plan, "PREROUTING", &inbound);
                        let included = match &options.include_inbound_ports {
                            InboundPorts::All => true,
                            InboundPorts::Only(ports) => ports.contains(&packet.dport),
                        };
                        let excluded = options.exclude_inbound_ports.contains(&packet.dport);
                        let want = (included && !excluded && !to_proxy).then_some(options.inbound_port);
                        prop_assert_eq!(got, want, "PREROUTING {:?}", inbound);
                    }
                }
            }

            /// The plan depends on the options' values only: the same
            /// options give the same steps, whatever the order of or
            /// repeats in the port lists; cleanup removes every chain the
            /// plan made.
            #[test]
            fn the_plan_is_deterministic(options in options(), seed in any::<u64>()) {
                let mut shuffled = options.clone();
                let mut rng = seed;
                let mut shuffle = |ports: &mut Vec<u16>| {
                    ports.extend(ports.clone());
                    for i in (1..ports.len()).rev() {
                        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        ports.swap(i, (rng >> 33) as usize % (i + 1));
                    }
                };
                shuffle(&mut shuffled.exclude_inbound_ports);
                shuffle(&mut shuffled.exclude_outbound_ports);
                if let InboundPorts::Only(ports) = &mut shuffled.include_inbound_ports {
                    shuffle(ports);
                }
                for family in [Family::V4, Family::V6] {
                    let plan = install_plan(&options, family);
                    prop_assert_eq!(&plan, &install_plan(&options, family));
                    prop_assert_eq!(&plan, &install_plan(&shuffled, family));
                    let made: Vec<&str> = plan.iter().filter_map(|s| match s {
                        Step::ResetChain(c) => Some(*c),
                        _ => None,
                    }).collect();
                    let removed: Vec<&str> = cleanup_plan().iter().filter_map(|s| match s {
                        Step::DeleteChain(c) => Some(*c),
                        _ => None,
                    }).collect();
                    prop_assert_eq!(made, removed);
                }
            }
        }
    }
}
