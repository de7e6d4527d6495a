//! The proxy's path policy: a proxied path is normalised and then matched, by whole segments,
//! against deny rules (`--proxy-deny`), so that no spelling of a denied path reaches an agent.
//!
//! # Normalisation
//! The router has already percent-decoded the path once (axum's `Path`), so what reaches
//! [`ProxyPolicy::check`] is what the caller meant. From there:
//! - empty segments are collapsed (`/api/v1//secrets` is `/api/v1/secrets`, as the API server's
//!   router treats it), and a trailing `/` dropped;
//! - `..` anywhere (as OpenChoreo's validator), a `.` segment, NUL, and any character outside a URI path segment's (RFC 3986
//!   `pchar`: letters, digits, `-._~!$&'()*+,;=:@`) refuse the request with 400 `InvalidPath`.
//!   That includes `%`: a path still percent-encoded after one decoding was encoded twice, and
//!   would be decoded again by the API server behind the agent (`%252F` becomes `/` there), so it
//!   is refused outright rather than decoded a second time. It includes `?` and `#` too, which
//!   would end the path early in the URI the agent builds. Kubernetes object names never hold
//!   these characters, so no legitimate request is refused.
//!
//! The normalised path is the one forwarded to the agent.
//!
//! # Matching
//! The legacy watch prefix is removed for matching only (`/api/v1/watch/secrets` is matched as
//! `/api/v1/secrets`, `/apis/G/V/watch/...` as `/apis/G/V/...`); the API server still gets it.
//! A rule is a path of segments, `*` matching any one segment, and denies the path it names and
//! every path below it: `/api/v1/secrets` denies `/api/v1/secrets/x` but not
//! `/api/v1/secrets-backup`. Rules do not look at the method or the query.

use std::{fmt, str::FromStr};

use http::StatusCode;

/// The rules used when `--proxy-deny` is not given: Secrets cluster-wide and in `kube-system`,
/// and the TokenRequest subresource (`POST .../serviceaccounts/NAME/token` mints tokens of the
/// build cluster) in every namespace.
pub const DEFAULT_DENY: &[&str] = &[
    "/api/v1/secrets",
    "/api/v1/namespaces/kube-system/secrets",
    "/api/v1/namespaces/*/serviceaccounts/*/token",
];

/// The `--proxy-deny` value that stands for [`DEFAULT_DENY`] (to add rules to the defaults).
pub const DEFAULT_KEYWORD: &str = "default";

/// The paths the proxy refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyPolicy {
    deny: Vec<DenyRule>,
}

impl Default for ProxyPolicy {
    fn default() -> Self {
        Self {
            deny: DEFAULT_DENY
                .iter()
                // The defaults are constants that `default_rules_parse` checks.
                .filter_map(|rule| rule.parse().ok())
                .collect(),
        }
    }
}

impl ProxyPolicy {
    /// A policy denying exactly `deny`.
    pub fn new(deny: Vec<DenyRule>) -> Self {
        Self { deny }
    }

    /// The policy of repeated `--proxy-deny` values: the defaults when there are none,
    /// [`DEFAULT_KEYWORD`] standing for the defaults among others.
    pub fn from_flags<S: AsRef<str>>(values: &[S]) -> Result<Self, InvalidRule> {
        if values.is_empty() {
            return Ok(Self::default());
        }
        let mut deny = Vec::new();
        for value in values {
            match value.as_ref().trim() {
                DEFAULT_KEYWORD => deny.extend(Self::default().deny),
                rule => deny.push(rule.parse()?),
            }
        }
        deny.dedup();
        Ok(Self { deny })
    }

    /// The deny rules.
    pub fn rules(&self) -> &[DenyRule] {
        &self.deny
    }

    /// The normalised path to forward, or why the path is refused.
    pub fn check(&self, path: &str) -> Result<String, Refusal> {
        let segments = normalise(path)?;
        let matched = match_view(&segments);
        if let Some(rule) = self.deny.iter().find(|rule| rule.matches(&matched)) {
            return Err(Refusal::Blocked {
                rule: rule.to_string(),
            });
        }
        Ok(format!("/{}", segments.join("/")))
    }
}

/// Why a proxied path is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A deny rule matched: 403 `PathBlocked`.
    Blocked {
        /// The rule, as written.
        rule: String,
    },
    /// The path cannot be normalised safely: 400 `InvalidPath`.
    Invalid(&'static str),
}

impl Refusal {
    /// The HTTP status of the refusal.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Blocked { .. } => StatusCode::FORBIDDEN,
            Self::Invalid(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// The `error` field of the refusal's JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Blocked { .. } => "PathBlocked",
            Self::Invalid(_) => "InvalidPath",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Blocked { rule } => write!(f, "{rule} may not be proxied"),
            Self::Invalid(why) => f.write_str(why),
        }
    }
}

/// The segments of `path` with empty ones collapsed, or why it is refused.
fn normalise(path: &str) -> Result<Vec<&str>, Refusal> {
    if path.contains('\0') {
        return Err(Refusal::Invalid("the path must not contain NUL"));
    }
    if path.contains('%') {
        return Err(Refusal::Invalid(
            "the path must not stay percent-encoded after decoding (double encoding is refused)",
        ));
    }
    if !path.chars().all(|c| c == '/' || is_pchar(c)) {
        return Err(Refusal::Invalid(
            "the path may hold only letters, digits and -._~!$&'()*+,;=:@ between slashes",
        ));
    }
    // `..` anywhere, as OpenChoreo's validator refuses it (no Kubernetes name holds it).
    if path.contains("..") {
        return Err(Refusal::Invalid("the path must not contain '..'"));
    }
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if segments.contains(&".") {
        return Err(Refusal::Invalid("the path must not contain '.' segments"));
    }
    Ok(segments)
}

/// A character a URI path segment may hold unencoded (RFC 3986 `pchar` without `%`).
fn is_pchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@".contains(c)
}

/// The segments rules are matched against: the legacy `watch` segment after the group version
/// removed (`/api/v1/watch/...`, `/apis/GROUP/VERSION/watch/...`).
fn match_view<'a>(segments: &[&'a str]) -> Vec<&'a str> {
    let mut view = segments.to_vec();
    let watch_at = match view.first() {
        Some(&"api") => 2,
        Some(&"apis") => 3,
        _ => return view,
    };
    if view.get(watch_at) == Some(&"watch") {
        view.remove(watch_at);
    }
    view
}

/// One deny rule: `/`-separated segments, `*` matching any one segment; it denies the path it
/// names and everything below it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenyRule {
    segments: Vec<String>,
}

impl DenyRule {
    fn matches(&self, path: &[&str]) -> bool {
        self.segments.len() <= path.len()
            && self
                .segments
                .iter()
                .zip(path)
                .all(|(rule, segment)| rule == "*" || rule == segment)
    }
}

impl fmt::Display for DenyRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}", self.segments.join("/"))
    }
}

/// A `--proxy-deny` value that is not a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid proxy deny rule {rule:?}: {why}")]
pub struct InvalidRule {
    /// The value given.
    pub rule: String,
    /// What is wrong with it.
    pub why: &'static str,
}

impl FromStr for DenyRule {
    type Err = InvalidRule;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = |why| InvalidRule {
            rule: text.to_owned(),
            why,
        };
        let Some(rest) = text.strip_prefix('/') else {
            return Err(invalid("a rule starts with '/'"));
        };
        let segments: Vec<String> = rest
            .split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if segments.is_empty() {
            return Err(invalid("a rule names at least one segment"));
        }
        for segment in &segments {
            if matches!(segment.as_str(), "." | "..") || !segment.chars().all(is_pchar) {
                return Err(invalid(
                    "segments are '*' or letters, digits and -._~!$&'()+,;=:@ (not '.' or '..')",
                ));
            }
        }
        // Paths are matched without the legacy watch segment, so a rule holding it would match
        // nothing: `/api/v1/watch/secrets` would let every watch of Secrets through.
        let borrowed: Vec<&str> = segments.iter().map(String::as_str).collect();
        if match_view(&borrowed).len() != segments.len() {
            return Err(invalid(
                "paths are matched without the legacy 'watch' segment: leave it out of the rule",
            ));
        }
        Ok(Self { segments })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The verdict of a policy on one path.
    enum Expect {
        /// Forwarded, as this normalised path.
        Forward(&'static str),
        /// 403 `PathBlocked` by this rule.
        Blocked(&'static str),
        /// 400 `InvalidPath`.
        Invalid,
    }

    fn check(policy: &ProxyPolicy, cases: &[(&str, Expect)]) {
        for (path, expected) in cases {
            let res = match policy.check(path) {
                Ok(path) => ("forward", path),
                Err(Refusal::Blocked { rule }) => ("blocked", rule),
                Err(Refusal::Invalid(_)) => ("invalid", String::new()),
            };
            let expected = match expected {
                Expect::Forward(path) => ("forward", (*path).to_owned()),
                Expect::Blocked(rule) => ("blocked", (*rule).to_owned()),
                Expect::Invalid => ("invalid", String::new()),
            };
            assert_eq!(res, expected, "{path:?}");
        }
    }

    /// Every spelling of a denied path is denied, and only denied paths (issue #19: the old
    /// `starts_with` list let `/api/v1//secrets`, `/k8s//api/v1/secrets` and the watch prefix
    /// through, blocked `/api/v1/secrets-backup`, and let TokenRequest pass).
    #[test]
    fn default_policy_table() {
        use Expect::*;
        let secrets = "/api/v1/secrets";
        let kube_system = "/api/v1/namespaces/kube-system/secrets";
        let token = "/api/v1/namespaces/*/serviceaccounts/*/token";
        check(
            &ProxyPolicy::default(),
            &[
                ("/api/v1/secrets", Blocked(secrets)),
                ("/api/v1/secrets/", Blocked(secrets)),
                ("/api/v1/secrets/anything", Blocked(secrets)),
                ("/api/v1//secrets", Blocked(secrets)),
                ("//api/v1/secrets", Blocked(secrets)),
                ("/api//v1///secrets", Blocked(secrets)),
                ("/api/v1/watch/secrets", Blocked(secrets)),
                (
                    "/api/v1/namespaces/kube-system/secrets",
                    Blocked(kube_system),
                ),
                (
                    "/api/v1/namespaces/kube-system//secrets",
                    Blocked(kube_system),
                ),
                (
                    "/api/v1/namespaces/kube-system/secrets/admin-token",
                    Blocked(kube_system),
                ),
                (
                    "/api/v1/watch/namespaces/kube-system/secrets",
                    Blocked(kube_system),
                ),
                (
                    "/api/v1/namespaces/build/serviceaccounts/builder/token",
                    Blocked(token),
                ),
                (
                    "/api/v1/namespaces/build//serviceaccounts/builder/token/",
                    Blocked(token),
                ),
                ("/api/v1/secrets-backup", Forward("/api/v1/secrets-backup")),
                (
                    "/api/v1/serviceaccounts",
                    Forward("/api/v1/serviceaccounts"),
                ),
                (
                    "/api/v1/namespaces/build/serviceaccounts/builder",
                    Forward("/api/v1/namespaces/build/serviceaccounts/builder"),
                ),
                (
                    "/api/v1/namespaces/build/secrets/registry",
                    Forward("/api/v1/namespaces/build/secrets/registry"),
                ),
                (
                    "/api/v1/namespaces/kube-system/configmaps",
                    Forward("/api/v1/namespaces/kube-system/configmaps"),
                ),
                ("/api/v1//namespaces/", Forward("/api/v1/namespaces")),
                (
                    "/apis/v1/serviceaccounts",
                    Forward("/apis/v1/serviceaccounts"),
                ),
                (
                    "/apis/rbac.authorization.k8s.io/v1/clusterroles/system:aggregate-to-edit",
                    Forward(
                        "/apis/rbac.authorization.k8s.io/v1/clusterroles/system:aggregate-to-edit",
                    ),
                ),
                (
                    "/api/v1/watch/configmaps",
                    Forward("/api/v1/watch/configmaps"),
                ),
                ("/api/v1/../v1/secrets", Invalid),
                ("/api/v1/./secrets", Invalid),
                ("/api/v1/namespaces/..", Invalid),
                ("/api/v1/namespaces/a..b/pods", Invalid),
                (
                    "/api/v1/namespaces/a.b/pods",
                    Forward("/api/v1/namespaces/a.b/pods"),
                ),
                ("/api/v1/sec\0rets", Invalid),
                ("/api/v1/%73ecrets", Invalid),
                ("/api/v1/namespaces/kube-system%2Fsecrets", Invalid),
                ("/api/v1/namespaces/kube-system/secrets%3F", Invalid),
                ("/api/v1/secrets?x", Invalid),
                ("/api/v1/secrets#x", Invalid),
                ("/api/v1\\secrets", Invalid),
                ("/api/v1/se crets", Invalid),
                ("/api/v1/sécrets", Invalid),
            ],
        );
    }

    /// A policy built from `--proxy-deny` values: the defaults when none, `default` to extend
    /// them, `*` for one segment; rules that are not paths are refused at parse time.
    #[test]
    fn flags_build_the_policy() {
        use Expect::*;
        let none: [&str; 0] = [];
        assert_eq!(
            ProxyPolicy::from_flags(&none).expect("defaults"),
            ProxyPolicy::default()
        );
        let extended = ProxyPolicy::from_flags(&["default", "/apis/*/v1/clusterroles"])
            .expect("default and one more");
        assert_eq!(extended.rules().len(), DEFAULT_DENY.len() + 1);
        check(
            &extended,
            &[
                ("/api/v1/secrets", Blocked("/api/v1/secrets")),
                (
                    "/apis/rbac.authorization.k8s.io/v1/clusterroles/admin",
                    Blocked("/apis/*/v1/clusterroles"),
                ),
                (
                    "/apis/rbac.authorization.k8s.io/v1/watch/clusterroles",
                    Blocked("/apis/*/v1/clusterroles"),
                ),
                (
                    "/apis/rbac.authorization.k8s.io/v1/roles",
                    Forward("/apis/rbac.authorization.k8s.io/v1/roles"),
                ),
            ],
        );
        let replaced = ProxyPolicy::from_flags(&["/api/v1/configmaps"]).expect("one rule");
        check(
            &replaced,
            &[
                ("/api/v1/secrets", Forward("/api/v1/secrets")),
                ("/api/v1/configmaps", Blocked("/api/v1/configmaps")),
            ],
        );
        for bad in [
            "api/v1/secrets",
            "/",
            "/api/../secrets",
            "/api/v1/se%63rets",
            "",
        ] {
            assert!(ProxyPolicy::from_flags(&[bad]).is_err(), "{bad:?}");
        }
    }

    /// A rule holding the legacy watch segment is refused: paths are matched without it, so the
    /// rule would deny nothing (found by fuzzing: `/apis/apps/v1/watch/deployments` as a rule
    /// let that very path through). The rule without it denies both spellings.
    #[test]
    fn a_rule_with_the_watch_segment_is_refused() {
        for bad in [
            "/api/v1/watch/secrets",
            "/api/v1/watch",
            "/apis/apps/v1/watch/deployments",
            "/apis/*/v1/watch",
        ] {
            let err = ProxyPolicy::from_flags(&[bad]).expect_err(bad);
            assert!(err.why.contains("watch"), "{err}");
        }
        let policy = ProxyPolicy::from_flags(&["/apis/apps/v1/deployments"]).expect("a rule");
        check(
            &policy,
            &[
                (
                    "/apis/apps/v1/watch/deployments",
                    Expect::Blocked("/apis/apps/v1/deployments"),
                ),
                (
                    "/apis/apps/v1/deployments",
                    Expect::Blocked("/apis/apps/v1/deployments"),
                ),
                ("/api/v1/watch", Expect::Forward("/api/v1/watch")),
            ],
        );
        assert!(ProxyPolicy::from_flags(&["/api/v1/watchers"]).is_ok());
    }

    /// The default rules are valid rules.
    #[test]
    fn default_rules_parse() {
        for rule in DEFAULT_DENY {
            assert_eq!(
                rule.parse::<DenyRule>()
                    .expect("a default rule")
                    .to_string(),
                *rule
            );
        }
    }

    /// Refusals carry the status and error code of the proxy's JSON answer.
    #[test]
    fn refusals_map_to_status_and_code() {
        let blocked = ProxyPolicy::default()
            .check("/api/v1/secrets")
            .expect_err("blocked");
        assert_eq!(
            (blocked.status(), blocked.code()),
            (StatusCode::FORBIDDEN, "PathBlocked")
        );
        let invalid = ProxyPolicy::default()
            .check("/api/..")
            .expect_err("invalid");
        assert_eq!(
            (invalid.status(), invalid.code()),
            (StatusCode::BAD_REQUEST, "InvalidPath")
        );
    }
}
