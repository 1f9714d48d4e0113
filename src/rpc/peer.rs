//! Who is calling: the peer's credentials from SO_PEERCRED (taken by the kernel at connect
//! time, so a client cannot lie about them) and the access rule: root, the agent's own user,
//! and members of the configured group.
//!
//! Socket permissions (0660, the group, a 0750 directory) are the first fence; this check is
//! the second, so a socket made world-accessible by mistake still only serves the allowed.

use nix::unistd::{Gid, Group, Uid};
use tokio::net::UnixStream;

/// The calling process, as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    /// 0 when the kernel does not say (never on Linux for a connected socket).
    pub pid: i32,
}

impl Peer {
    pub fn of(stream: &UnixStream) -> std::io::Result<Peer> {
        let c = stream.peer_cred()?;
        Ok(Peer {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid().unwrap_or(0),
        })
    }
}

/// The access rule, resolved once at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// The agent's own effective uid (root in production; the test user in tests).
    pub own_uid: u32,
    pub group: Option<u32>,
}

impl Access {
    pub fn new(group: Option<u32>) -> Access {
        Access {
            own_uid: Uid::effective().as_raw(),
            group,
        }
    }

    /// Is this peer allowed? The group matches the primary gid from SO_PEERCRED, or one of the
    /// supplementary groups the kernel lists for the peer's pid.
    pub fn allows(&self, peer: &Peer) -> bool {
        if peer.uid == 0 || peer.uid == self.own_uid {
            return true;
        }
        let Some(g) = self.group else {
            return false;
        };
        peer.gid == g || (peer.pid > 0 && supplementary_groups(peer.pid).contains(&g))
    }
}

/// The `Groups:` line of /proc/PID/status (empty when the process is gone).
fn supplementary_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Groups:").map(str::to_owned))
        })
        .map(|l| {
            l.split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Resolve a configured group: a name from the group database, or a numeric gid.
pub fn resolve_group(spec: &str) -> Result<u32, String> {
    if let Ok(gid) = spec.parse::<u32>() {
        return Ok(gid);
    }
    match Group::from_name(spec) {
        Ok(Some(g)) => Ok(Gid::as_raw(g.gid)),
        Ok(None) => Err(format!("group {spec:?} does not exist")),
        Err(e) => Err(format!("cannot look up group {spec:?}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_own_user_and_group_members_only() {
        let a = Access {
            own_uid: 1000,
            group: Some(500),
        };
        let p = |uid, gid| Peer { uid, gid, pid: 0 };
        assert!(a.allows(&p(0, 0)));
        assert!(a.allows(&p(1000, 1000)));
        assert!(a.allows(&p(1234, 500)));
        assert!(!a.allows(&p(1234, 501)));
        let none = Access {
            own_uid: 0,
            group: None,
        };
        assert!(!none.allows(&p(65534, 500)));
    }

    #[test]
    fn supplementary_groups_of_this_process_are_read() {
        let me = std::process::id() as i32;
        let expected: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        let mut got = supplementary_groups(me);
        got.sort();
        let mut want = expected;
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn groups_resolve_by_name_or_number() {
        assert_eq!(resolve_group("0"), Ok(0));
        assert_eq!(resolve_group("root"), Ok(0));
        assert!(
            resolve_group("no-such-group-volcrypt")
                .unwrap_err()
                .contains("does not exist")
        );
    }
}
