use std::os::unix::fs::{MetadataExt, PermissionsExt};

use super::*;

#[test]
fn activation_needs_our_pid_and_a_count() {
    assert_eq!(activation_fd_count(None, None, 7).unwrap(), 0);
    assert_eq!(activation_fd_count(Some("7"), None, 7).unwrap(), 0);
    assert_eq!(activation_fd_count(None, Some("1"), 7).unwrap(), 0);
    assert_eq!(activation_fd_count(Some("8"), Some("1"), 7).unwrap(), 0);
    assert_eq!(activation_fd_count(Some("7"), Some("1"), 7).unwrap(), 1);
    assert_eq!(activation_fd_count(Some("7"), Some("2\n"), 7).unwrap(), 2);
    let err = activation_fd_count(Some("x"), Some("1"), 7).unwrap_err();
    assert!(err.to_string().contains("LISTEN_PID"), "{err}");
    let err = activation_fd_count(Some("7"), Some("-1"), 7).unwrap_err();
    assert!(err.to_string().contains("LISTEN_FDS"), "{err}");
}

#[test]
fn watchdog_feeder_pings_once_per_half_interval() {
    let mut feeder = WatchdogFeeder::with_interval(Duration::from_secs(10));
    let t0 = Instant::now();
    assert!(feeder.due(t0), "first ping is always due");
    assert!(!feeder.due(t0 + Duration::from_secs(4)));
    assert!(feeder.due(t0 + Duration::from_secs(5)));
    assert!(!feeder.due(t0 + Duration::from_secs(9)));
    assert!(feeder.due(t0 + Duration::from_secs(10)));
}

#[test]
fn notifications_are_noops_outside_systemd() {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        eprintln!("skipped: NOTIFY_SOCKET is set");
        return;
    }
    notify_status("testing");
    notify_extend_timeout(Duration::from_secs(u64::MAX / 2));
    notify_watchdog();
}

#[test]
fn bind_creates_the_directory_and_sets_the_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("run/sub/t.sock");
    let listener = bind_socket(&path, 0o660, "").unwrap();
    let meta = fs::metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660);
    let client = UnixStream::connect(&path);
    assert!(client.is_ok());
    drop(listener);
}

#[test]
fn a_stale_socket_is_replaced_but_a_live_one_is_not() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("t.sock");
    let live = bind_socket(&path, 0o600, "").unwrap();
    let err = bind_socket(&path, 0o600, "").unwrap_err();
    assert!(matches!(err, SocketError::InUse { .. }), "{err}");
    drop(live); // the file stays behind, nothing accepts on it
    assert!(path.exists());
    let again = bind_socket(&path, 0o600, "").unwrap();
    assert!(UnixStream::connect(&path).is_ok());
    drop(again);
}

#[test]
fn a_regular_file_is_never_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("t.sock");
    fs::write(&path, "precious").unwrap();
    let err = bind_socket(&path, 0o600, "").unwrap_err();
    assert!(matches!(err, SocketError::NotASocket { .. }), "{err}");
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(fs::read_to_string(&path).unwrap(), "precious");
}

#[test]
fn group_by_name_or_gid_and_missing_group_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let root = nix::unistd::geteuid().is_root();
    let own_gid = nix::unistd::getegid().as_raw();
    let own = nix::unistd::Group::from_gid(nix::unistd::getegid())
        .ok()
        .flatten()
        .map(|g| g.name);
    if let Some(name) = own {
        let path = tmp.path().join("named.sock");
        let _l = bind_socket(&path, 0o660, &name).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().gid(), own_gid);
    }
    let path = tmp.path().join("gid.sock");
    let _l = bind_socket(&path, 0o660, &own_gid.to_string()).unwrap();
    assert_eq!(fs::metadata(&path).unwrap().gid(), own_gid);

    let path = tmp.path().join("missing.sock");
    let result = bind_socket(&path, 0o660, "tileflow-no-such-group");
    if root {
        let err = result.unwrap_err();
        assert!(matches!(err, SocketError::NoGroup { .. }), "{err}");
        assert!(!path.exists(), "a failed bind leaves no socket file behind");
    } else {
        assert!(
            result.is_ok(),
            "unprivileged: a missing group is only a warning"
        );
    }
}

#[test]
fn socket_file_removes_only_its_own_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("t.sock");
    let l = bind_socket(&path, 0o600, "").unwrap();
    drop(SocketFile::new(&path));
    assert!(!path.exists());
    drop(l);

    let l = bind_socket(&path, 0o600, "").unwrap();
    let guard = SocketFile::new(&path);
    drop(l);
    fs::remove_file(&path).unwrap();
    fs::write(&path, "someone else's").unwrap();
    drop(guard);
    assert!(path.exists(), "a replaced file is left alone");
}

#[test]
fn open_api_socket_binds_when_not_activated() {
    if std::env::var_os("LISTEN_FDS").is_some() {
        eprintln!("skipped: LISTEN_FDS is set");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let server = ServerConfig {
        socket: tmp.path().join("api.sock"),
        socket_group: String::new(),
        ..ServerConfig::default()
    };
    let socket = open_api_socket(&server).unwrap();
    assert!(!socket.activated);
    assert_eq!(
        fs::metadata(&server.socket).unwrap().permissions().mode() & 0o777,
        0o660
    );
    drop(socket);
    assert!(
        !server.socket.exists(),
        "the socket file goes when the daemon does"
    );
}
