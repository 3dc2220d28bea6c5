//! flanneld's command line, so a flanneld unit file or environment file can start `linen run`
//! unchanged for the flags both have:
//!
//! - Go's flag syntax: `-etcd-endpoints=…` and `-ip-masq` are read as `--etcd-endpoints=…` and
//!   `--ip-masq` (clap takes only the double dash);
//! - `FLANNELD_<NAME>` environment variables (upper case, `-` as `_`) for [`FLANNEL_FLAGS`],
//!   after the command line and the `LINEN_<NAME>` variable: a value from the command line wins,
//!   then `LINEN_*`, then `FLANNELD_*`, then the default.

use std::collections::HashMap;
use std::ffi::OsString;

use clap::{Arg, Command};

/// The `linen run` flags that flanneld has under the same name and meaning.
pub const FLANNEL_FLAGS: &[&str] = &[
    "etcd-endpoints",
    "etcd-prefix",
    "etcd-keyfile",
    "etcd-certfile",
    "etcd-cafile",
    "etcd-username",
    "etcd-password",
    "iface",
    "iface-regex",
    "iface-can-reach",
    "public-ip",
    "public-ipv6",
    "subnet-file",
    "subnet-lease-renew-margin",
    "ip-masq",
    "ip-masq-fully-random-disable",
    "iptables-resync",
    "iptables-forward-rules",
    "healthz-ip",
    "healthz-port",
];

/// flanneld's flags that linen does not have (the Kubernetes subnet manager's, and
/// `-ip-blackhole-route`): on the command line clap refuses them; their `FLANNELD_*`
/// variables are named by [`ignored_flanneld_variables`].
pub const FLANNEL_ONLY_FLAGS: &[&str] = &[
    "kube-subnet-mgr",
    "kube-api-url",
    "kubeconfig-file",
    "kube-annotation-prefix",
    "net-config-path",
    "ip-blackhole-route",
];

/// Those of [`FLANNEL_ONLY_FLAGS`] that are switches, off by default.
const FLANNEL_ONLY_SWITCHES: &[&str] = &["kube-subnet-mgr", "ip-blackhole-route"];

/// The `FLANNELD_*` variables that ask for something linen does not have
/// ([`FLANNEL_ONLY_FLAGS`]), which it ignores: an environment file written for flanneld's
/// Kubernetes subnet manager, say, where linen uses its own registry instead. A switch counts
/// unless Go reads it as false (`false`, `0`, `f`, …), a value flag unless empty. The daemon
/// warns of each at start. (`-set-node-network-unavailable`, on by default and only for the
/// Kubernetes manager, is left out.)
pub fn ignored_flanneld_variables(lookup: impl Fn(&str) -> Option<OsString>) -> Vec<String> {
    let go_false = |v: &str| matches!(v, "0" | "f" | "F" | "false" | "FALSE" | "False");
    FLANNEL_ONLY_FLAGS
        .iter()
        .filter_map(|name| {
            let var = env_name("FLANNELD_", name);
            let value = lookup(&var)?;
            let value = value.to_string_lossy();
            let off = FLANNEL_ONLY_SWITCHES.contains(name) && go_false(value.trim());
            let asks = !value.is_empty() && !off;
            asks.then_some(var)
        })
        .collect()
}

/// Warnings for a `linen run` started from flanneld's environment (`flanneld_env`: some
/// `FLANNELD_*` variable is set) where one of flanneld's defaults that linen does not share
/// is left in place: without endpoints linen uses its directory registry (flanneld: etcd on
/// this host), and it writes its own subnet.env (flanneld: the one the flannel CNI plugin
/// reads). Such a start waits for a config that is in etcd, or gives pods no network.
pub fn flanneld_default_warnings(flanneld_env: bool, run: &crate::cli::RunArgs) -> Vec<String> {
    let mut out = Vec::new();
    if !flanneld_env {
        return out;
    }
    if run.registry.etcd_endpoints.is_empty() {
        out.push(format!(
            "FLANNELD_* variables are set, but no etcd endpoint is: linen uses its directory \
             registry at {}, where flanneld would use etcd at http://127.0.0.1:4001 and \
             http://127.0.0.1:2379; for etcd, set FLANNELD_ETCD_ENDPOINTS (or \
             --etcd-endpoints)",
            run.registry.registry_dir.display()
        ));
    }
    if run.subnet_file == std::path::Path::new(crate::cli::DEFAULT_SUBNET_FILE) {
        out.push(format!(
            "FLANNELD_* variables are set, but no subnet file is: linen writes {}, where \
             flanneld writes /run/flannel/subnet.env, which the flannel CNI plugin reads; for \
             it, set FLANNELD_SUBNET_FILE=/run/flannel/subnet.env (or --subnet-file)",
            crate::cli::DEFAULT_SUBNET_FILE
        ));
    }
    out
}

/// Whether any `FLANNELD_*` variable is set (to something): linen started from flanneld's
/// environment file.
pub fn flanneld_env_in_use(vars: impl Iterator<Item = (OsString, OsString)>) -> bool {
    vars.into_iter()
        .any(|(k, v)| k.to_string_lossy().starts_with("FLANNELD_") && !v.is_empty())
}

/// The environment variable `prefix` + `name` in flannel's spelling: `FLANNELD_` and
/// `etcd-endpoints` give `FLANNELD_ETCD_ENDPOINTS`.
pub fn env_name(prefix: &str, name: &str) -> String {
    format!("{prefix}{}", name.to_ascii_uppercase().replace('-', "_"))
}

/// `linen run --help`'s note on flanneld's spellings, listing [`FLANNEL_FLAGS`].
pub fn run_after_help() -> String {
    format!(
        "flanneld's spellings work too: `-etcd-endpoints=URL` for `--etcd-endpoints URL`, and \
         FLANNELD_* variables (after LINEN_* ones; empty ones are ignored, as flannel does) for \
         the flags flannel has: {}.",
        FLANNEL_FLAGS.join(", ")
    )
}

/// Points each of [`FLANNEL_FLAGS`] of `run` at its `FLANNELD_*` variable when `lookup` finds
/// that variable and not the flag's `LINEN_*` one (the command line still wins: clap reads an
/// argument's variable only when the flag is absent). An empty variable counts as unset, as in
/// flannel (`FLANNELD_IFACE=${ADVERTISE_IP}` with nothing to expand).
pub fn flanneld_env(cmd: Command, lookup: impl Fn(&str) -> Option<OsString>) -> Command {
    let set = |name: &str| lookup(name).is_some_and(|v| !v.is_empty());
    cmd.mut_subcommand("run", |mut run| {
        for name in FLANNEL_FLAGS {
            let flannel = env_name("FLANNELD_", name);
            if !set(&env_name("LINEN_", name)) && set(&flannel) {
                run = run.mut_arg(name.replace('-', "_"), |a| a.env(flannel));
            }
        }
        run
    })
}

/// Rewrites Go-style single-dash long flags in `args` (the program name first) to clap's double
/// dash: `-name` and `-name=value`, where `name` is a long flag of the (sub)command being read
/// or a global one, and unknown names of two or more letters, which clap then reports by their
/// name. Nothing else changes: short flags (`-h`), words after `--`, and the word after a flag that needs a value (so
/// `--subnet-file -x` still names a file called `-x`; clap, unlike Go, refuses it).
pub fn double_dash(args: Vec<OsString>, cmd: &Command) -> Vec<OsString> {
    // Most command lines have no single-dash word of two or more letters: leave them be
    // without walking the command tree (which costs the daemon's peak RSS).
    let go_style = |a: &OsString| {
        a.to_str().is_some_and(|t| {
            t.len() > 2
                && t.starts_with('-')
                && !t.starts_with("--")
                && t.as_bytes()[1].is_ascii_alphabetic()
        })
    };
    if !args.iter().skip(1).any(go_style) {
        return args;
    }
    let globals: Vec<&Arg> = cmd.get_arguments().filter(|a| a.is_global_set()).collect();
    let mut current = cmd;
    let mut takes_value = long_flags(current, &globals);
    let mut out = Vec::with_capacity(args.len());
    let mut iter = args.into_iter();
    out.extend(iter.next());
    let mut value_next = false;
    while let Some(arg) = iter.next() {
        if std::mem::take(&mut value_next) {
            out.push(arg);
            continue;
        }
        if arg == "--" {
            out.push(arg);
            out.extend(iter);
            break;
        }
        let text = arg.to_str().unwrap_or("");
        let long = text
            .strip_prefix("--")
            .or_else(|| text.strip_prefix('-').filter(|rest| !rest.starts_with('-')));
        let Some(rest) = long else {
            // A subcommand's name: its flags apply from here on.
            if let Some(sub) = current.find_subcommand(&arg) {
                current = sub;
                takes_value = long_flags(current, &globals);
            }
            out.push(arg);
            continue;
        };
        let (name, inline_value) = match rest.split_once('=') {
            Some((name, _)) => (name, true),
            None => (rest, false),
        };
        let known = takes_value.get(name).copied();
        value_next = known.is_some_and(|needs_value| needs_value && !inline_value);
        // An unknown name is doubled too, so that clap names it: read with one dash it is a
        // cluster of short flags, and flanneld's `-ip-blackhole-route` was reported as '-i'.
        // A real cluster (`-hV`) stays.
        let cluster = name.chars().all(|c| c == 'h' || c == 'V');
        if text.starts_with("--") || (known.is_none() && (name.len() < 2 || cluster)) {
            out.push(arg);
        } else {
            let mut fixed = OsString::from("-");
            fixed.push(&arg);
            out.push(fixed);
        }
    }
    out
}

/// The environment variable a refused value came from: when clap's error `e` names a flag
/// that is not on the command line `args`, the variable clap read it from (`LINEN_*`, or the
/// `FLANNELD_*` one [`flanneld_env`] pointed it at) if that is set. clap's message names only
/// the flag, which an operator whose setting lives in an environment file looks for in vain.
pub fn value_from_env(
    e: &clap::Error,
    cmd: &Command,
    args: &[OsString],
    lookup: impl Fn(&str) -> Option<OsString>,
) -> Option<String> {
    use clap::error::{ContextKind, ContextValue};
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    let long = arg.strip_prefix("--")?.split([' ', '=']).next()?;
    let on_line = args.iter().any(|a| {
        a.to_str().is_some_and(|a| {
            a.strip_prefix("--")
                .is_some_and(|a| a == long || a.starts_with(&format!("{long}=")))
        })
    });
    if on_line {
        return None;
    }
    let mut stack = vec![cmd];
    while let Some(c) = stack.pop() {
        let var = c
            .get_arguments()
            .filter(|a| a.get_long() == Some(long))
            .find_map(|a| a.get_env())
            .and_then(|v| v.to_str())
            .filter(|v| lookup(v).is_some());
        if let Some(var) = var {
            return Some(var.to_owned());
        }
        stack.extend(c.get_subcommands());
    }
    None
}

/// The long flags of `cmd` and the `globals`, with whether each must be followed by a value
/// (read from the unbuilt command: the derive sets each argument's action, and `num_args` only
/// where a value is optional; clap adds `--help` and `--version` itself when it builds).
fn long_flags(cmd: &Command, globals: &[&Arg]) -> HashMap<String, bool> {
    let mut out = HashMap::from([("help".to_owned(), false), ("version".to_owned(), false)]);
    for arg in cmd.get_arguments().chain(globals.iter().copied()) {
        if let Some(long) = arg.get_long() {
            let needs_value = arg.get_action().takes_values()
                && arg.get_num_args().is_none_or(|n| n.min_values() > 0);
            out.insert(long.to_owned(), needs_value);
        }
    }
    out
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::cli::Cli;
    use clap::{CommandFactory, FromArgMatches};
    use std::ffi::OsStr;

    /// A start from flanneld's environment that leaves flanneld's registry or subnet file
    /// default in place is warned of each; one that names both, or no FLANNELD_* variable at
    /// all, is not.
    #[test]
    fn flanneld_defaults_linen_lacks_are_warned_of() {
        let vars = |pairs: &[(&str, &str)]| {
            flanneld_env_in_use(pairs.iter().map(|(k, v)| (k.into(), v.into())))
        };
        assert!(vars(&[("PATH", "/bin"), ("FLANNELD_IFACE", "eth1")]));
        assert!(!vars(&[("PATH", "/bin"), ("FLANNELD_IFACE", "")]));
        assert!(!vars(&[("LINEN_IFACE", "eth1")]));
        let run = |args: &[&str]| match <Cli as clap::Parser>::try_parse_from(
            ["linen", "run"].iter().chain(args),
        )
        .unwrap()
        .command
        {
            crate::cli::Command::Run(run) => *run,
            _ => unreachable!(),
        };
        let warned = flanneld_default_warnings(true, &run(&[]));
        assert_eq!(warned.len(), 2, "{warned:?}");
        assert!(warned[0].contains("FLANNELD_ETCD_ENDPOINTS"), "{warned:?}");
        assert!(warned[1].contains("/run/flannel/subnet.env"), "{warned:?}");
        let named = run(&[
            "--etcd-endpoints=http://198.18.0.1:2379",
            "--subnet-file=/run/flannel/subnet.env",
        ]);
        assert!(flanneld_default_warnings(true, &named).is_empty());
        assert!(flanneld_default_warnings(false, &run(&[])).is_empty());
    }

    #[test]
    fn flanneld_variables_for_flags_linen_lacks_are_named() {
        let env: HashMap<&str, &str> = [
            ("FLANNELD_KUBE_SUBNET_MGR", "true"),
            ("FLANNELD_IP_BLACKHOLE_ROUTE", "false"),
            ("FLANNELD_KUBE_API_URL", ""),
            ("FLANNELD_SET_NODE_NETWORK_UNAVAILABLE", "true"),
            ("FLANNELD_IFACE", "eth1"),
            (
                "FLANNELD_NET_CONFIG_PATH",
                "/etc/kube-flannel/net-conf.json",
            ),
        ]
        .into();
        let ignored = ignored_flanneld_variables(|k| env.get(k).map(OsString::from));
        // An empty one is unset, as flannel reads it; a switch set false asks for nothing; one
        // linen has is not ignored.
        assert_eq!(
            ignored,
            ["FLANNELD_KUBE_SUBNET_MGR", "FLANNELD_NET_CONFIG_PATH"]
        );
        // None of them is a flag linen has.
        for flag in FLANNEL_ONLY_FLAGS {
            assert!(!FLANNEL_FLAGS.contains(flag), "{flag}");
        }
    }

    fn os_args(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    fn rewritten(args: &[&str]) -> Vec<String> {
        double_dash(os_args(args), &Cli::command())
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn go_style_flags_get_a_second_dash() {
        assert_eq!(
            rewritten(&[
                "linen",
                "run",
                "-etcd-endpoints=http://198.18.0.1:2379",
                "-iface",
                "eth0",
                "-ip-masq",
                "-subnet-lease-renew-margin=30",
            ]),
            [
                "linen",
                "run",
                "--etcd-endpoints=http://198.18.0.1:2379",
                "--iface",
                "eth0",
                "--ip-masq",
                "--subnet-lease-renew-margin=30",
            ]
        );
        // Global flags and clap's own.
        assert_eq!(
            rewritten(&["linen", "-log-level", "debug", "-version"]),
            ["linen", "--log-level", "debug", "--version"]
        );
    }

    #[test]
    fn everything_else_is_left_alone() {
        for args in [
            // Short flags (linen has only clap's), clusters of them, double dashes.
            &["linen", "-h"][..],
            &["linen", "-hV"],
            &["linen", "run", "-x", "--no-such-flag", "--iface", "eth0"],
            // The value of a flag that needs one, even when it looks like a flag.
            &[
                "linen",
                "run",
                "--iface-regex",
                "-iface",
                "--iface",
                "-public-ip",
            ],
            // After `--`.
            &["linen", "run", "--", "-iface"],
            // Negative numbers.
            &["linen", "run", "--mtu", "-1"],
        ] {
            assert_eq!(rewritten(args), args, "{args:?}");
        }
        // A single-dash flag's value is skipped too.
        assert_eq!(
            rewritten(&["linen", "run", "-iface-regex", "-iface"]),
            ["linen", "run", "--iface-regex", "-iface"]
        );
        // Each subcommand's own flags: `--json` takes a value in `bench` only.
        assert_eq!(
            rewritten(&["linen", "status", "--json", "-metrics-addr=127.0.0.1:1"]),
            ["linen", "status", "--json", "--metrics-addr=127.0.0.1:1"]
        );
        assert_eq!(
            rewritten(&["linen", "bench", "--json", "-runs"]),
            ["linen", "bench", "--json", "-runs"]
        );
        // An unknown name, or a flag of another subcommand, is doubled so that clap names it
        // (with one dash it would report '-i', the first letter of a cluster of short flags).
        assert_eq!(
            rewritten(&["linen", "status", "-iface=eth0"]),
            ["linen", "status", "--iface=eth0"]
        );
        assert_eq!(
            rewritten(&[
                "linen",
                "run",
                "-ip-blackhole-route",
                "-kube-subnet-mgr=true"
            ]),
            [
                "linen",
                "run",
                "--ip-blackhole-route",
                "--kube-subnet-mgr=true"
            ]
        );
        // Nested subcommands and global flags after them.
        assert_eq!(
            rewritten(&[
                "linen",
                "lease",
                "list",
                "-registry-dir=/x",
                "-log-level=debug"
            ]),
            [
                "linen",
                "lease",
                "list",
                "--registry-dir=/x",
                "--log-level=debug"
            ]
        );
        // A boolean flag's optional value is not required, so the next word is still a flag.
        assert_eq!(
            rewritten(&["linen", "run", "-ip-masq", "-iface=eth0"]),
            ["linen", "run", "--ip-masq", "--iface=eth0"]
        );
    }

    /// The variable clap will read for `run`'s flag `name`, given these variables.
    fn env_of(vars: &[(&str, &str)], name: &str) -> Option<String> {
        let vars: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), OsString::from(v)))
            .collect();
        let cmd = flanneld_env(Cli::command(), |k| vars.get(k).cloned());
        let run = cmd.find_subcommand("run").unwrap();
        let arg = run
            .get_arguments()
            .find(|a| a.get_long() == Some(name))
            .unwrap();
        arg.get_env().map(|e| e.to_string_lossy().into_owned())
    }

    #[test]
    fn flanneld_variables_come_after_linens() {
        assert_eq!(
            env_of(&[], "etcd-endpoints").as_deref(),
            Some("LINEN_ETCD_ENDPOINTS")
        );
        assert_eq!(
            env_of(&[("FLANNELD_ETCD_ENDPOINTS", "x")], "etcd-endpoints").as_deref(),
            Some("FLANNELD_ETCD_ENDPOINTS")
        );
        assert_eq!(
            env_of(
                &[("FLANNELD_IP_MASQ", "true"), ("LINEN_IP_MASQ", "false")],
                "ip-masq"
            )
            .as_deref(),
            Some("LINEN_IP_MASQ")
        );
        // Empty variables count as unset, as in flannel.
        assert_eq!(
            env_of(&[("FLANNELD_IFACE", "")], "iface").as_deref(),
            Some("LINEN_IFACE")
        );
        assert_eq!(
            env_of(&[("FLANNELD_IFACE", "eth1"), ("LINEN_IFACE", "")], "iface").as_deref(),
            Some("FLANNELD_IFACE")
        );
        // Only flannel's flags: there is no FLANNELD_WORKERS.
        assert_eq!(
            env_of(&[("FLANNELD_WORKERS", "3")], "workers").as_deref(),
            Some("LINEN_WORKERS")
        );
    }

    /// Every name in the list is a flag of `run` with a `LINEN_*` variable, so the list cannot
    /// name a flag that does not exist (`mut_arg` would panic at start).
    #[test]
    fn every_flannel_flag_exists_with_its_linen_variable() {
        let cmd = flanneld_env(Cli::command(), |k| {
            k.starts_with("FLANNELD_").then(|| OsString::from("1"))
        });
        let run = cmd.find_subcommand("run").unwrap();
        assert_eq!(
            run.get_after_help().map(|h| h.to_string()),
            Some(run_after_help())
        );
        for name in FLANNEL_FLAGS {
            let arg = run
                .get_arguments()
                .find(|a| a.get_long() == Some(name))
                .unwrap_or_else(|| panic!("--{name} is not a flag of `linen run`"));
            assert_eq!(
                arg.get_env().map(|e| e.to_string_lossy().into_owned()),
                Some(env_name("FLANNELD_", name)),
                "{name}"
            );
            assert!(
                Cli::command()
                    .find_subcommand("run")
                    .unwrap()
                    .get_arguments()
                    .any(|a| a.get_env() == Some(OsStr::new(&env_name("LINEN_", name)))),
                "--{name} has no LINEN_ variable"
            );
        }
    }

    /// A flanneld command line parses into the same options as linen's own spelling.
    #[test]
    fn a_flanneld_command_line_parses_as_linens() {
        let parse = |args: &[&str]| {
            let cmd = Cli::command();
            let args = double_dash(os_args(args), &cmd);
            let m = cmd.try_get_matches_from(args).unwrap();
            match Cli::from_arg_matches(&m).unwrap().command {
                crate::cli::Command::Run(run) => run,
                _ => unreachable!(),
            }
        };
        let go = parse(&[
            "linen",
            "run",
            "-etcd-endpoints=http://198.18.0.1:2379,http://198.18.0.2:2379",
            "-etcd-prefix=/coreos.com/network",
            "-iface=eth1",
            "-iface-regex=^198\\.18\\.",
            "-iface-can-reach=198.18.0.1",
            "-public-ip=198.18.0.9",
            "-ip-masq",
            "-iptables-forward-rules=false",
            "-iptables-resync=10",
            "-subnet-file=/run/flannel/subnet.env",
        ]);
        let ours = parse(&[
            "linen",
            "run",
            "--etcd-endpoints",
            "http://198.18.0.1:2379,http://198.18.0.2:2379",
            "--etcd-prefix",
            "/coreos.com/network",
            "--iface",
            "eth1",
            "--iface-regex",
            "^198\\.18\\.",
            "--iface-can-reach",
            "198.18.0.1",
            "--public-ip",
            "198.18.0.9",
            "--ip-masq",
            "--iptables-forward-rules=false",
            "--iptables-resync",
            "10",
            "--subnet-file",
            "/run/flannel/subnet.env",
        ]);
        assert_eq!(format!("{go:?}"), format!("{ours:?}"));
        assert_eq!(go.registry.etcd_endpoints.len(), 2);
        assert!(go.ip_masq && !go.iptables_forward_rules);
        assert_eq!(go.iptables_resync, 10);
        assert_eq!(go.iface_regex.len(), 1);
    }
}
