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
}
