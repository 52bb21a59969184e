//! Who is on the other end of a loopback HTTP connection. A process on this machine that connects to
//! 127.0.0.1 or ::1 owns the client end of the TCP connection, and the kernel's socket table
//! (`/proc/net/tcp`, `/proc/net/tcp6`: the question identd answers) records its uid. Tokenless local
//! HTTP uses it as the socket uses SO_PEERCRED: to name the app (`uid:N`) for ownership of
//! customizations and for its fair share of admission and turns.

use std::net::{IpAddr, SocketAddr};

/// Whether `peer` is on this machine's loopback (also as an IPv4-mapped IPv6 address).
pub fn is_loopback(peer: SocketAddr) -> bool {
    peer.ip().to_canonical().is_loopback()
}

/// The uid owning the client end of the loopback connection from `peer` to `local`; `None` when the
/// peer is not on loopback or the kernel's table does not show the connection established (no
/// /proc, another network namespace, or a client that already closed: its row is then in TIME_WAIT,
/// which reports uid 0 and must never be read as root).
pub fn loopback_peer_uid(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    if !is_loopback(peer) {
        return None;
    }
    // The client's own socket has its own family: an IPv4 client of a dual-stack listener is seen here
    // as ::ffff:127.0.0.1 but listed in /proc/net/tcp in IPv4 form.
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (peer, local) = (canonical(peer), canonical(local));
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|table| {
        let text = std::fs::read_to_string(table).ok()?;
        find_uid(&text, &encode(peer), &encode(local))
    })
}

/// An address as the kernel's table writes it: each 32-bit word of the address in host byte order,
/// in hex, then the port.
fn encode(addr: SocketAddr) -> String {
    let words: Vec<[u8; 4]> = match addr.ip() {
        IpAddr::V4(v4) => vec![v4.octets()],
        IpAddr::V6(v6) => v6.octets().chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]).collect(),
    };
    let ip: String = words.iter().map(|w| format!("{:08X}", u32::from_ne_bytes(*w))).collect();
    format!("{ip}:{:04X}", addr.port())
}

/// TCP_ESTABLISHED in the table's `st` column.
const ESTABLISHED: &str = "01";

/// The uid column of the established row (with a socket inode) whose local end is `client` and
/// remote end `server`.
fn find_uid(table: &str, client: &str, server: &str) -> Option<u32> {
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (local, remote, state, uid, inode) = (f.get(1)?, f.get(2)?, f.get(3)?, f.get(7)?, f.get(9)?);
        let ours = local.eq_ignore_ascii_case(client) && remote.eq_ignore_ascii_case(server);
        (ours && *state == ESTABLISHED && *inode != "0").then(|| uid.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_encoded_as_the_kernel_writes_them() {
        let v4: SocketAddr = "127.0.0.1:8090".parse().unwrap();
        let want = if cfg!(target_endian = "little") { "0100007F:1F9A" } else { "7F000001:1F9A" };
        assert_eq!(encode(v4), want);
        let v6: SocketAddr = "[::1]:80".parse().unwrap();
        let one = if cfg!(target_endian = "little") { "01000000" } else { "00000001" };
        assert_eq!(encode(v6), format!("000000000000000000000000{one}:0050"));
    }

    #[test]
    fn the_row_of_the_client_end_names_its_uid() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
             0: 0100007F:1F9A 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n\
             1: 0100007F:1F9A 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 2 1\n\
             2: 0100007F:C350 0100007F:1F9A 01 00000000:00000000 00:00000000 00000000  1001        0 3 1\n\
             3: 0100007F:C351 0100007F:1F9A 06 00000000:00000000 03:00001770 00000000     0        0 0 3\n";
        assert_eq!(find_uid(table, "0100007F:C350", "0100007F:1F9A"), Some(1001));
        assert_eq!(find_uid(table, "0100007F:C352", "0100007F:1F9A"), None);
        // A closed client's TIME_WAIT row says uid 0 and has no inode: never root.
        assert_eq!(find_uid(table, "0100007F:C351", "0100007F:1F9A"), None);
    }

    /// A real loopback connection from this process: the kernel names our own uid.
    #[test]
    fn a_real_loopback_connection_is_ours() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_conn, peer) = listener.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        let uid = loopback_peer_uid(peer, listener.local_addr().unwrap());
        assert_eq!(uid, Some(unsafe { libc::geteuid() }));
    }

    /// An IPv4 client of a dual-stack listener: the server sees ::ffff:127.0.0.1, the table lists the
    /// client's socket in IPv4 form.
    #[test]
    fn a_mapped_ipv4_client_of_a_dual_stack_listener_is_found() {
        let Ok(listener) = std::net::TcpListener::bind("[::]:0") else { return };
        let port = listener.local_addr().unwrap().port();
        let Ok(_client) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return };
        let (conn, peer) = listener.accept().unwrap();
        assert!(is_loopback(peer), "{peer}");
        let uid = loopback_peer_uid(peer, conn.local_addr().unwrap());
        assert_eq!(uid, Some(unsafe { libc::geteuid() }), "{peer}");
    }
}
