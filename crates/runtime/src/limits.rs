//! Process limits raised at start.

/// Raises the open-files soft limit to the hard one (as the Go runtime does at start): every
/// agent connection, watch and proxied stream holds a socket, and the usual soft limit of 1,024
/// is reached long before the hard one. A failure is logged, not fatal.
pub fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open-files limit"),
        Err(err) => tracing::warn!(%err, "could not raise the open-files limit"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After the call the soft limit equals the hard limit (or the call was refused and the
    /// limits are unchanged).
    #[test]
    fn soft_limit_reaches_the_hard_limit() {
        let (_, hard) = rlimit::Resource::NOFILE.get().unwrap();
        raise_open_files_limit();
        let (soft, after) = rlimit::Resource::NOFILE.get().unwrap();
        assert_eq!(after, hard);
        // macOS caps the soft limit below an infinite hard limit; Linux raises it all the way.
        if cfg!(target_os = "linux") {
            assert_eq!(soft, hard);
        }
    }
}
