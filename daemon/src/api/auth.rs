//! Who is on the other end of the socket (SO_PEERCRED), and whether they may use admin routes:
//! uid 0 or a member of the configured admin group (snapd's model).

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use tokio::net::UnixListener;

/// The peer's credentials, taken when the connection is accepted.
#[derive(Debug, Clone, Copy, Default)]
pub struct Peer {
    /// User id (None if the kernel would not say).
    pub uid: Option<u32>,
    /// Primary group id.
    pub gid: Option<u32>,
    /// Process id.
    pub pid: Option<i32>,
}

impl Connected<IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Peer {
        match stream.io().peer_cred() {
            Ok(c) => Peer {
                uid: Some(c.uid()),
                gid: Some(c.gid()),
                pid: c.pid(),
            },
            Err(_) => Peer::default(),
        }
    }
}

impl Peer {
    /// Whether this peer may use admin routes.
    pub fn is_admin(&self, admin_group: &str) -> bool {
        let Some(uid) = self.uid else { return false };
        if uid == 0 {
            return true;
        }
        let Ok(Some(group)) = nix::unistd::Group::from_name(admin_group) else {
            return false;
        };
        let gid = group.gid.as_raw();
        if self.gid == Some(gid) {
            return true;
        }
        // Supplementary groups of the peer process, as the kernel has them.
        if let Some(pid) = self.pid {
            if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                if let Some(line) = status.lines().find(|l| l.starts_with("Groups:")) {
                    if line
                        .split_whitespace()
                        .skip(1)
                        .any(|g| g.parse::<u32>() == Ok(gid))
                    {
                        return true;
                    }
                }
            }
        }
        // Or the group's member list, by user name.
        nix::unistd::User::from_uid(uid.into())
            .ok()
            .flatten()
            .is_some_and(|u| group.mem.contains(&u.name))
    }
}
