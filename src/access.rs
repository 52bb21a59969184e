//! Who may use the service, one rule for every local interface: root, the service's own user, and
//! members of the configured group (`socket.group` for the local socket, `dbus.group` for D-Bus). The
//! socket learns a peer's credentials from the kernel (SO_PEERCRED, SO_PEERGROUPS), D-Bus from the
//! bus (GetConnectionCredentials); both then ask [`may_use`], and name the caller for ownership of
//! customizations with [`crate::adapters::Identity::of_uid`].

/// Whether a caller with `uid` and `groups` (primary and supplementary) may use a service running as
/// `own_uid` that admits members of `group`.
pub fn may_use(uid: u32, groups: &[u32], own_uid: u32, group: Option<u32>) -> bool {
    uid == 0 || uid == own_uid || group.is_some_and(|g| groups.contains(&g))
}

/// [`may_use`] for a caller known by its uid alone (a loopback HTTP client): its groups come from the
/// user database, looked up only when the uid itself does not already decide.
pub fn may_use_by_uid(uid: u32, own_uid: u32, group: Option<u32>) -> bool {
    may_use(uid, &[], own_uid, None) || (group.is_some() && may_use(uid, &groups_of(uid), own_uid, group))
}

/// The groups (primary and supplementary) the user database gives `uid`, for a caller whose process
/// groups nobody reported (a loopback HTTP client is known by its uid only). Empty when `uid` has no
/// entry.
pub fn groups_of(uid: u32) -> Vec<u32> {
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: pw, buf and out outlive the call; getpwuid_r writes only within them.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() {
        return Vec::new();
    }
    let mut groups = vec![0 as libc::gid_t; 64];
    loop {
        let mut n = groups.len() as libc::c_int;
        // SAFETY: pw_name points into buf (alive); groups holds n entries.
        let rc = unsafe { libc::getgrouplist(pw.pw_name, pw.pw_gid, groups.as_mut_ptr(), &mut n) };
        if rc >= 0 {
            groups.truncate(n.max(0) as usize);
            return groups;
        }
        if groups.len() >= 1 << 16 {
            return vec![pw.pw_gid];
        }
        let want = (n.max(0) as usize).max(groups.len() * 2);
        groups.resize(want, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_the_service_user_and_group_members_may_use_the_service() {
        assert!(may_use(0, &[], 999, None), "root");
        assert!(may_use(999, &[], 999, None), "the service's own user");
        assert!(may_use(1001, &[100, 50], 999, Some(50)), "a member of the group");
        assert!(!may_use(1001, &[100], 999, Some(50)), "not a member");
        assert!(!may_use(1001, &[50], 999, None), "no group configured: members of nothing");
    }

    #[test]
    fn a_users_groups_come_from_the_user_database() {
        assert!(groups_of(0).contains(&0), "root is in group root: {:?}", groups_of(0));
        assert!(groups_of(4_000_000_000).is_empty(), "no such user");
    }
}
